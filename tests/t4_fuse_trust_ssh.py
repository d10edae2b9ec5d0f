"""A real mount enforcing a policy whose trusted keys are an OpenSSH allowed_signers
file: a file signed with an SSH key (through the real ssh-agent) opens, the same file
patched does not, and an allowed_signers file inside the mount is refused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import blake3
from conftest import Mount, annofs_cmd
from ssh_helpers import make_key, public_line, ssh_agent, token_statement
from t1_trust_sshsig import SoftToken
from t4_fuse_trust import annofs, refused

from annofs.trust.statement import Subject


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


def test_a_fido_signature_without_a_touch_is_refused_where_a_rule_asks(
        mounted: Mount, tmp_path: Path) -> None:
    mounted.stop()
    tree = tmp_path / "proj"
    tree.mkdir()
    (tree / "release.c").write_text("int release;\n")
    (tree / "dev.c").write_text("int dev;\n")
    annofs(mounted.store, "import", str(tree), "/src/proj")
    token = SoftToken()
    (tmp_path / "allowed_signers").write_text(f"yubi@example.org {token.public.to_text()}\n")
    policy = tmp_path / "policy.toml"
    policy.write_text('mode = "enforce"\ntrusted-ssh-signers = "allowed_signers"\n\n'
                      '[[rules]]\npath = "/src/proj/release.c"\nsigners = 1\n'
                      'user-presence = true\n\n'
                      '[[rules]]\npath = "/src/**"\nsigners = 1\n')
    mounted.start("--policy", str(policy))
    proj = mounted.path / "src" / "proj"
    untouched = [token_statement(token, [Subject(n, blake3.blake3(data).digest())], flags=0)
                 for n, data in (("release.c", b"int release;\n"), ("dev.c", b"int dev;\n"))]
    (tmp_path / "att.jsonl").write_text("".join(ss.envelope.to_json() + "\n"
                                                for ss in untouched))
    res = subprocess.run(annofs_cmd("--store", str(mounted.store), "attest", "import",
                                    str(tmp_path / "att.jsonl")), capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert (proj / "dev.c").read_text() == "int dev;\n"  # no user-presence asked there
    assert refused(proj / "release.c")
    why = os.getxattr(proj / "release.c", "user.annofs.why").decode()
    assert "the FIDO token did not assert user presence (no touch)" in why
    touched = token_statement(token, [Subject("release.c", blake3.blake3(
        b"int release;\n").digest())])
    (tmp_path / "touched.jsonl").write_text(touched.envelope.to_json() + "\n")
    res = subprocess.run(annofs_cmd("--store", str(mounted.store), "attest", "import",
                                    str(tmp_path / "touched.jsonl")), capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert (proj / "release.c").read_text() == "int release;\n"


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


def test_a_signed_git_tag_imported_into_the_mount(mounted: Mount, tmp_path: Path) -> None:
    from t5_git_signed_cli import git

    keys = tmp_path / "keys"
    keys.mkdir()
    alice = make_key(keys, "alice", "alice@laptop")
    r = tmp_path / "repo"
    r.mkdir()
    (r / "main.c").write_text("int main(void) { return 0; }\n")
    git(r, "init", "-q", "-b", "main")
    git(r, "config", "gpg.format", "ssh")
    git(r, "config", "user.signingkey", str(alice))
    git(r, "add", ".")
    git(r, "commit", "-q", "-S", "-m", "first")
    git(r, "tag", "-s", "v1.0", "-m", "release")
    (tmp_path / "allowed_signers").write_text(
        f'alice@example.org namespaces="git" {public_line(alice)}\n')
    policy = tmp_path / "policy.toml"
    policy.write_text('mode = "enforce"\ntrusted-ssh-signers = "allowed_signers"\n\n'
                      '[[rules]]\npath = "/src/**"\nsigners = 1\nclaims = ["source"]\n')
    mounted.stop()
    mounted.start("--policy", str(policy))
    (mounted.path / "src").mkdir()
    res = subprocess.run(annofs_cmd("import", "--git", "--verify-signatures", "--policy",
                                    str(policy), str(r), str(mounted.path / "src" / "repo")),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "tag v1.0 (commit " in res.stderr
    main = mounted.path / "src" / "repo" / "main.c"
    assert main.read_text() == "int main(void) { return 0; }\n"
    with open(main, "a") as f:
        f.write("int patched;\n")
    assert refused(main)
