"""The policy enforced at open() on a real mount, and the ways people try to get around it."""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import Mount, Templates, annofs_cmd, serve

from annofs.daemon.events import read_events


def annofs(store: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(annofs_cmd("--store", str(store), *args), capture_output=True,
                          text=True, check=check)


def write_policy(path: Path, mode: str = "enforce", signers: int = 1,
                 carve_outs: Sequence[tuple[str, int]] = ()) -> Path:
    """The tests' policy: `/src/**` needs `signers`, `/scratch/**` none; `carve_outs`
    (glob, signers) come first, so they win over both."""
    rules = [*carve_outs, ("/src/**", signers), ("/scratch/**", 0)]
    path.write_text(f'mode = "{mode}"\ndefault = "allow"\ntrusted-keys-dir = "keys"\n'
                    + "".join(f'\n[[rules]]\npath = "{glob}"\nsigners = {n}\n'
                              for glob, n in rules))
    return path


def sign_tree(root: Path, tree: Path, dest: str = "/src/proj") -> Path:
    """A store at root/store (made if missing) holding `tree` imported at `dest` and
    signed by alice-1, whose keys are in root/keys; root/policy.toml (`write_policy`).
    Returns the store."""
    store = root / "store"
    if not store.exists():
        subprocess.run(annofs_cmd("--store", str(store), "init"), check=True,
                       stdout=subprocess.DEVNULL)
    keys = root / "keys"
    keys.mkdir(exist_ok=True)
    annofs(store, "import", str(tree), dest)
    annofs(store, "key", "generate", "alice-1", "--dir", str(keys))
    annofs(store, "sign", "--key", str(keys / "alice-1.secret"), dest)
    write_policy(root / "policy.toml")
    return store


def _make_signed(root: Path) -> None:
    """What `signed` starts from: /src/proj (root/proj) signed (`sign_tree`)."""
    tree = root / "proj"
    (tree / "lib").mkdir(parents=True)
    (tree / "main.c").write_text("int main(void) { return 0; }\n")
    (tree / "lib" / "util.c").write_text("int util(void) { return 1; }\n")
    sign_tree(root, tree)


@pytest.fixture
def signed(tmp_path: Path, templates: Templates,
           request: pytest.FixtureRequest) -> Iterator[Mount]:
    """/src/proj imported and signed by alice-1; mounted with an enforcing policy."""
    templates.copy("t4_fuse_trust.signed", tmp_path, _make_signed)
    (tmp_path / "mnt").mkdir()
    yield from serve(Mount(tmp_path / "store", tmp_path / "mnt"), request,
                     "--policy", str(tmp_path / "policy.toml"))


def refused(path: Path, flags: int = os.O_RDONLY) -> bool:
    try:
        os.close(os.open(path, flags))
    except PermissionError:
        return True
    return False


@pytest.mark.expected_log()
def test_signed_tree_reads_and_a_patched_file_is_refused(signed: Mount) -> None:
    proj = signed.path / "src" / "proj"
    assert (proj / "main.c").read_text().startswith("int main")
    with open(proj / "main.c", "a") as f:  # writing still works
        f.write("int patched;\n")
    assert refused(proj / "main.c")
    assert (proj / "lib" / "util.c").read_text().startswith("int util")  # siblings still read
    assert os.stat(proj / "main.c").st_size > 0  # stat works
    assert "main.c" in os.listdir(proj)  # readdir works
    why = os.getxattr(proj / "main.c", "user.annofs.why").decode()
    assert "needs 1 distinct trusted signer, has 0" in why
    assert os.getxattr(proj / "lib" / "util.c", "user.annofs.status").startswith(b"allowed")
    events = read_events(signed.store)
    assert events[-1].path == "/src/proj/main.c" and events[-1].verdict == "refused"
    assert events[-1].pid > 0 and events[-1].digest.startswith("blake3:")


def test_read_write_open_and_mmap_of_a_refused_file_fail(signed: Mount) -> None:
    f = signed.path / "src" / "proj" / "main.c"
    with open(f, "a") as out:
        out.write("/* changed */\n")
    assert refused(f, os.O_RDWR)
    with pytest.raises(PermissionError), open(f, "rb") as fh:
        mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
    fd = os.open(f, os.O_WRONLY)  # write-only opens are not reads: allowed
    os.close(fd)


def test_handle_keeps_the_version_verified_at_open(signed: Mount) -> None:
    f = signed.path / "src" / "proj" / "main.c"
    original = f.read_bytes()
    with open(f, "rb") as reader:
        assert reader.read(4) == original[:4]
        # Read-write beside a judged reader of a guarded file: EBUSY (it would fill the
        # page cache with bytes nobody judged, see t4_fuse_attacker).
        with pytest.raises(OSError) as e:
            os.open(f, os.O_RDWR)
        assert e.value.errno == errno.EBUSY
        fd = os.open(f, os.O_WRONLY)  # rewritten in place while the reader is open
        os.write(fd, b"EVIL" * 20)
        os.close(fd)
        reader.seek(0)
        assert reader.read() == original  # the verified bytes, not the new ones
    assert refused(f)


def test_bypasses_through_links_renames_and_copies(signed: Mount) -> None:
    proj = signed.path / "src" / "proj"
    scratch = signed.path / "scratch"
    scratch.mkdir()
    (scratch / "payload.c").write_text("int payload;\n")  # unsigned, fine under /scratch
    assert (scratch / "payload.c").read_text() == "int payload;\n"
    # a hard link across the rule boundary: EXDEV, in both directions
    with pytest.raises(OSError) as e:
        os.link(proj / "main.c", scratch / "alias.c")
    assert e.value.errno == errno.EXDEV
    with pytest.raises(OSError) as e:
        os.link(scratch / "payload.c", proj / "payload.c")
    assert e.value.errno == errno.EXDEV
    # a symlink from an unprotected path resolves to the protected name
    with open(proj / "main.c", "a") as f:
        f.write("int patched;\n")
    os.symlink(proj / "main.c", scratch / "link.c")
    assert refused(scratch / "link.c")
    # unsigned content renamed or copied into a protected path is refused there
    os.rename(scratch / "payload.c", proj / "moved.c")
    assert refused(proj / "moved.c")
    (scratch / "again.c").write_text("int again;\n")
    subprocess.run(annofs_cmd("cp", str(scratch / "again.c"), str(proj / "copied.c")),
                   check=True, capture_output=True)
    assert refused(proj / "copied.c")


def test_policy_inside_the_mount_is_refused(mounted: Mount) -> None:
    mounted.stop()
    res = subprocess.run(annofs_cmd("--store", str(mounted.store), "mount", "--policy",
                                    str(mounted.path / "etc" / "policy.toml"), str(mounted.path)),
                         capture_output=True, text=True)
    assert res.returncode == 2 and "must live outside the mount" in res.stderr
    assert res.stderr.count("\n") == 1
    mounted.start()


@pytest.mark.expected_log("policy reload failed")
def test_warn_mode_and_reload_without_remount(signed: Mount, tmp_path: Path) -> None:
    f = signed.path / "src" / "proj" / "main.c"
    with open(f, "a") as out:
        out.write("int patched;\n")
    assert refused(f)
    policy = tmp_path / "policy.toml"
    write_policy(policy, mode="warn")
    assert signed.proc is not None
    signed.proc.send_signal(signal.SIGHUP)
    deadline = 100
    while refused(f) and deadline:
        deadline -= 1
        os.sched_yield()
        import time

        time.sleep(0.05)
    assert not refused(f)  # warn: allowed, and recorded
    assert read_events(signed.store)[-1].verdict == "warned"
    write_policy(policy, mode="enforce")
    res = subprocess.run(annofs_cmd("policy", "reload", str(signed.path)), capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert refused(f)
    policy.write_text("mode = [broken\n")  # a bad policy keeps the old one in force
    res = subprocess.run(annofs_cmd("policy", "reload", str(signed.path)), capture_output=True,
                         text=True)
    assert res.returncode == 2 and "old policy stays in force" in res.stderr
    assert refused(f)


def test_two_party_rule_and_malicious_label_on_the_mount(mounted: Mount, tmp_path: Path) -> None:
    mounted.stop()
    tree = tmp_path / "proj"
    tree.mkdir()
    (tree / "a.c").write_text("int a;\n")
    keys = tmp_path / "keys"
    keys.mkdir()
    annofs(mounted.store, "import", str(tree), "/src/proj")
    for name in ("alice-1", "bob-1"):
        annofs(mounted.store, "key", "generate", name, "--dir", str(keys))
    policy = write_policy(tmp_path / "policy.toml", signers=2)
    annofs(mounted.store, "sign", "--key", str(keys / "alice-1.secret"), "/src/proj")
    annofs(mounted.store, "sign", "--key", str(keys / "alice-1.secret"), "--claim", "built",
           "/src/proj")  # one key twice is still one signer
    mounted.start("--policy", str(policy))
    f = mounted.path / "src" / "proj" / "a.c"
    assert refused(f)
    assert b"has 1" in os.getxattr(f, "user.annofs.why")
    mounted.stop()
    annofs(mounted.store, "sign", "--key", str(keys / "bob-1.secret"), "/src/proj")
    mounted.start("--policy", str(policy))
    assert f.read_text() == "int a;\n"
    mounted.stop()
    annofs(mounted.store, "label", "--key", str(keys / "bob-1.secret"), "--label", "malicious",
           "/src/proj/a.c")
    mounted.start("--policy", str(policy))
    assert refused(f)
    assert b"malicious" in os.getxattr(f, "user.annofs.why")
