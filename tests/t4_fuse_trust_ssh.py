"""A real mount enforcing a policy whose trusted keys are an OpenSSH allowed_signers
file: a file signed with an SSH key (through the real ssh-agent) opens, the same file
patched does not, and an allowed_signers file inside the mount is refused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import Mount, annofs_cmd
from ssh_helpers import make_key, public_line, ssh_agent
from t4_fuse_trust import annofs, refused


def test_a_file_signed_with_an_ssh_key_opens(mounted: Mount, tmp_path: Path) -> None:
    mounted.stop()
    tree = tmp_path / "proj"
    tree.mkdir()
    (tree / "main.c").write_text("int main(void) { return 0; }\n")
    (tree / "util.c").write_text("int util;\n")
    keys = tmp_path / "keys"
    keys.mkdir()
    alice = make_key(keys, "alice", "alice@laptop")
    annofs(mounted.store, "import", str(tree), "/src/proj")
    (tmp_path / "allowed_signers").write_text(f"alice@example.org {public_line(alice)}\n")
    policy = tmp_path / "policy.toml"
    policy.write_text('mode = "enforce"\ntrusted-ssh-signers = "allowed_signers"\n\n'
                      '[[rules]]\npath = "/src/**"\nsigners = 1\n')
    mounted.start("--policy", str(policy))
    proj = mounted.path / "src" / "proj"
    assert refused(proj / "main.c")
    with ssh_agent(tmp_path, alice):
        subprocess.run(annofs_cmd("sign", "--ssh-key", f"{alice}.pub", str(proj / "main.c")),
                       check=True, capture_output=True)
    assert (proj / "main.c").read_text() == "int main(void) { return 0; }\n"
    status = os.getxattr(proj / "main.c", "user.annofs.status").decode()
    assert status.startswith("allowed; signers: alice@example.org;"), status
    assert refused(proj / "util.c")
    with open(proj / "main.c", "a") as f:
        f.write("int patched;\n")
    assert refused(proj / "main.c")


def test_allowed_signers_inside_the_mount_is_refused(mounted: Mount, tmp_path: Path) -> None:
    etc = mounted.path / "etc"
    etc.mkdir()
    (etc / "allowed_signers").write_text("")
    mounted.stop()
    policy = tmp_path / "policy.toml"
    policy.write_text(f'trusted-ssh-signers = "{etc}/allowed_signers"\n')
    res = subprocess.run(annofs_cmd("--store", str(mounted.store), "mount", "--policy",
                                    str(policy), str(mounted.path)),
                         capture_output=True, text=True)
    assert res.returncode == 2 and "must live outside the mount" in res.stderr
    assert res.stderr.count("\n") == 1
    mounted.start()
