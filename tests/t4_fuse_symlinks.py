"""Symlinks are content under a rule that needs signers (SPEC §4; issue 15, point 1).

Tried as a hostile local user would: uid 65534 through an `--allow-other` mount with an
enforcing policy (one trusted signer under /src/**, none under /scratch/**), who may
write in the signed tree (writing is allowed; only reading unsigned content is not).
The kernel follows a symlink through FUSE READLINK on every path walk (pyfuse3 3.5.0
never asks for FUSE_CAP_CACHE_SYMLINKS, and libfuse leaves it off): refusing readlink
refuses every path through an unsigned symlink, and the refusal is recorded like a
refused open.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, Templates, annofs_cmd, empty_dir
from fuse_helpers import NOBODY, as_user, stop_and_check
from t4_fuse_trust import write_policy

from annofs.daemon.events import read_events

MAIN = b"int main(void) { return 0; }\n"
UTIL = b"int util(void) { return 1; }\n"
EVIL = b"int evil(void) { return 666; }\n"


def run(*args: str) -> None:
    res = subprocess.run(annofs_cmd(*args), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.fixture
def base(shared_dir: Path) -> Iterator[Path]:
    """A directory other users can traverse (pytest's tmp_path is private to root): the
    same one for every test of the session, as the absolute symlinks of the store
    `make_mount` copies point into it; emptied after each test."""
    try:
        yield shared_dir
    finally:
        empty_dir(shared_dir)


def _make_signed_links(base: Path, mp: Path) -> None:
    """What `make_mount` starts from: base/store with /src/proj of files and signed
    symlinks (relative, absolute into the mountpoint `mp`, to a directory, a chain, a
    loop, one to /scratch) signed by alice-1, keys in base/keys."""
    store = base / "store"
    tree = base / "proj"
    (tree / "lib").mkdir(parents=True)
    (tree / "main.c").write_bytes(MAIN)
    (tree / "lib" / "util.c").write_bytes(UTIL)
    os.symlink("main.c", tree / "rel")
    os.symlink(str(mp / "src/proj/main.c"), tree / "abs")
    os.symlink("lib", tree / "dirlink")
    os.symlink("chain2", tree / "chain1")
    os.symlink("lib/../main.c", tree / "chain2")
    os.symlink("loop2", tree / "loop1")
    os.symlink("loop1", tree / "loop2")
    os.symlink(str(mp / "scratch/approved.c"), tree / "to-scratch")
    os.symlink("../../proj/main.c", tree / "lib" / "deep")  # lands on /src/proj/main.c
    keys = base / "keys"
    keys.mkdir()
    run("--store", str(store), "init")
    run("--store", str(store), "import", str(tree), "/src/proj")
    run("--store", str(store), "key", "generate", "alice-1", "--dir", str(keys))
    run("--store", str(store), "sign", "--key", str(keys / "alice-1.secret"), "/src/proj")


def make_mount(base: Path, templates: Templates, policy_mode: str = "enforce",
               signers: int = 1) -> Mount:
    """/src/proj with files and signed symlinks (`_make_signed_links`), signed by
    alice-1; /src/proj and /scratch belong to uid 65534; mounted --allow-other with the
    policy. `base` is the `base` fixture's directory."""
    # The template's absolute symlinks name base/mnt: one template serves the session
    # because `base` is the session's one shared directory.
    store, mp = base / "store", base / "mnt"
    templates.copy("t4_fuse_symlinks.signed_links", base,
                   lambda root: _make_signed_links(root, mp))
    mp.mkdir()
    mp.chmod(0o755)
    policy = write_policy(base / "policy.toml", policy_mode, signers)
    m = Mount(store, mp)
    m.start("--allow-other", "--policy", str(policy))
    os.chown(m.path / "src" / "proj", NOBODY, NOBODY)
    (m.path / "scratch").mkdir()
    os.chown(m.path / "scratch", NOBODY, NOBODY)
    (m.path / "scratch" / "evil.c").write_bytes(EVIL)
    (m.path / "scratch" / "approved.c").write_bytes(b"whatever is here\n")
    return m


@pytest.fixture
def mnt(base: Path, templates: Templates) -> Iterator[Mount]:
    m = make_mount(base, templates)
    try:
        yield m
    finally:
        stop_and_check(m)


def proj(m: Mount) -> Path:
    return m.path / "src" / "proj"


def errno_of(fn: object, *args: object) -> int:
    """The errno `fn(*args)` fails with as uid 65534 (0 if it succeeds)."""
    try:
        as_user(fn, *args)  # type: ignore[arg-type]
    except OSError as e:
        return e.errno or -1
    return 0


def read(path: Path) -> bytes:
    return path.read_bytes()


def swap_for_symlink(path: str, target: str) -> None:
    """What the attacker does: remove the signed file, put a symlink in its place."""
    os.unlink(path)
    os.symlink(target, path)


def cat(path: str) -> tuple[int, str]:
    res = subprocess.run(["cat", path], capture_output=True, text=True)
    return res.returncode, res.stdout + res.stderr


def ls_l(path: str) -> tuple[int, str]:
    res = subprocess.run(["ls", "-l", path], capture_output=True, text=True)
    return res.returncode, res.stdout + res.stderr


def refusals(m: Mount, path: str) -> list[object]:
    return [e for e in read_events(m.store) if e.path == path and e.verdict == "refused"]


@pytest.mark.parametrize("where", ["host file", "scratch absolute", "scratch relative"])
def test_a_signed_file_swapped_for_a_symlink_is_refused(mnt: Mount, base: Path,
                                                        where: str) -> None:
    host = base / "evil-host.c"
    host.write_bytes(EVIL)
    host.chmod(0o644)
    target = {"host file": str(host),
              "scratch absolute": str(mnt.path / "scratch" / "evil.c"),
              "scratch relative": "../../scratch/evil.c"}[where]
    f = proj(mnt) / "main.c"
    assert as_user(read, f) == MAIN
    as_user(swap_for_symlink, str(f), target)
    code, out = as_user(cat, str(f))
    assert code != 0 and "Permission denied" in out and "666" not in out
    assert errno_of(read, f) == errno.EACCES
    assert errno_of(os.readlink, f) == errno.EACCES
    with pytest.raises(PermissionError):
        os.readlink(f)  # root too: the policy binds every user of the mount
    # lstat, readdir and ls -l still work: only the target is refused.
    assert as_user(lambda p: os.lstat(p).st_size, f) == len(target)
    assert "main.c" in as_user(os.listdir, proj(mnt))
    code, out = as_user(ls_l, str(proj(mnt)))
    assert "main.c" in out and "rel -> main.c" in out
    [ev, *_] = refusals(mnt, "/src/proj/main.c")
    assert ev.rule == "rules[0] /src/**"  # type: ignore[attr-defined]
    assert "needs 1 distinct trusted signer, has 0" in ev.reason  # type: ignore[attr-defined]
    assert ev.digest.startswith("annofs-symlink-v1:")  # type: ignore[attr-defined]
    assert f"symlink to {target!r}" in ev.explanation  # type: ignore[attr-defined]
    # The signed tree names this path: the explanation says a signed file was here.
    assert "signed original (found by signed tree path)" in ev.explanation  # type: ignore[attr-defined]
    assert "a signed regular file was here; now a symlink" in ev.explanation  # type: ignore[attr-defined]


def test_a_signed_directory_swapped_for_a_symlink_refuses_paths_through_it(
        mnt: Mount) -> None:
    def swap() -> None:
        lib = proj(mnt) / "lib"
        for name in os.listdir(lib):  # the attacker owns the directory
            os.unlink(lib / name)
        os.rmdir(lib)
        (mnt.path / "scratch" / "lib").mkdir()
        (mnt.path / "scratch" / "lib" / "util.c").write_bytes(EVIL)
        os.symlink("../../scratch/lib", lib)

    os.chown(proj(mnt) / "lib", NOBODY, NOBODY)
    as_user(swap)
    assert errno_of(read, proj(mnt) / "lib" / "util.c") == errno.EACCES
    assert errno_of(read, proj(mnt) / "dirlink" / "util.c") == errno.EACCES  # via a signed link
    assert errno_of(os.listdir, proj(mnt) / "lib") == errno.EACCES
    assert refusals(mnt, "/src/proj/lib")


def test_signed_symlinks_keep_working(mnt: Mount) -> None:
    p = proj(mnt)
    # Signed, but refused where it sits (its absolute target lands in /scratch, a looser
    # rule: the test below); ls -l would report it. The others are what this checks.
    (p / "to-scratch").unlink()
    for name in ("rel", "abs", "chain1", "chain2"):
        assert as_user(read, p / name) == MAIN, name
    assert as_user(read, p / "dirlink" / "util.c") == UTIL
    assert as_user(os.readlink, p / "rel") == "main.c"
    assert as_user(os.readlink, p / "abs") == str(p / "main.c")
    assert errno_of(read, p / "loop1") == errno.ELOOP  # a signed loop is still a loop
    code, out = as_user(ls_l, str(p))
    assert code == 0 and "rel -> main.c" in out and "chain1 -> chain2" in out
    assert not [e for e in read_events(mnt.store) if e.verdict == "refused"]


def test_unsigned_links_in_a_chain_and_loops(mnt: Mount) -> None:
    p = proj(mnt)
    scratch = mnt.path / "scratch"

    def plant() -> None:
        # Unsigned symlinks under /src: in a chain from /scratch, and a loop.
        os.symlink("../../scratch/evil.c", p / "sneaky")
        os.symlink(str(p / "sneaky"), scratch / "via-src")
        os.symlink("loop-b", p / "loop-a")
        os.symlink("loop-a", p / "loop-b")
        # Unguarded symlinks in /scratch pointing at signed names: judged where they
        # lead, and readable (their own rule needs no signer).
        os.symlink(str(p / "chain1"), scratch / "to-chain")
        os.symlink("evil.c", scratch / "local")

    as_user(plant)
    assert errno_of(read, scratch / "via-src") == errno.EACCES
    assert errno_of(read, p / "loop-a") == errno.EACCES  # refused before it can loop
    assert as_user(read, scratch / "to-chain") == MAIN
    assert as_user(read, scratch / "local") == EVIL  # /scratch is unguarded by its rule
    assert refusals(mnt, "/src/proj/sneaky") and refusals(mnt, "/src/proj/loop-a")


def test_a_signed_absolute_target_into_a_looser_place_in_the_mount_is_refused(
        mnt: Mount) -> None:
    """A signature binds the target string, not where it sits: a signed absolute symlink
    into /scratch (which needs no signer) could be planted in place of any signed file
    and read whatever another user writes there. So an absolute target into the mount is
    placed like a relative one: under a rule at least as strict, or refused at readlink
    (the attacker review's finding); one into /src itself still reads."""
    assert errno_of(read, proj(mnt) / "to-scratch") == errno.EACCES
    assert errno_of(os.readlink, proj(mnt) / "to-scratch") == errno.EACCES
    assert as_user(read, proj(mnt) / "abs") == MAIN
    # Planted in place of a signed file: the same refusal, recorded.
    as_user(swap_for_symlink, str(proj(mnt) / "main.c"), str(mnt.path / "scratch/approved.c"))
    assert errno_of(read, proj(mnt) / "main.c") == errno.EACCES
    events = subprocess.run(annofs_cmd("--store", str(mnt.store), "events"),
                            capture_output=True, text=True).stdout
    assert "its absolute target leads to /scratch/approved.c, under a looser rule" in events


@pytest.mark.expected_log()
def test_the_kernel_does_not_cache_symlink_targets(base: Path, templates: Templates) -> None:
    """A symlink read while the policy allowed it is refused after a reload to a
    stricter one, well within the entry timeout: every walk asks READLINK again."""
    m = make_mount(base, templates, signers=0)
    try:
        p = proj(m)
        as_user(swap_for_symlink, str(p / "main.c"), "../../scratch/evil.c")
        for _ in range(3):
            assert as_user(read, p / "main.c") == EVIL
            assert as_user(os.readlink, p / "main.c") == "../../scratch/evil.c"
        write_policy(base / "policy.toml", "enforce", 1)
        run("policy", "reload", str(m.path))
        assert errno_of(read, p / "main.c") == errno.EACCES
        assert errno_of(os.readlink, p / "main.c") == errno.EACCES
    finally:
        stop_and_check(m)


def test_a_signed_relative_target_planted_elsewhere_cannot_climb_to_a_looser_place(
        mnt: Mount) -> None:
    """Approval is bound to content, and a relative target means something else at
    another depth: lib/deep -> ../../proj/main.c is signed (it lands on the signed
    main.c), the same string put in main.c's place lands on /proj/main.c, which no
    rule guards. Refused: a relative target under a rule that needs signers must land
    under a rule at least as strict."""
    loose = mnt.path / "proj"
    loose.mkdir()
    os.chown(loose, NOBODY, NOBODY)

    def plant() -> None:
        (loose / "main.c").write_bytes(EVIL)
        swap_for_symlink(str(proj(mnt) / "main.c"), "../../proj/main.c")

    assert as_user(read, proj(mnt) / "lib" / "deep") == MAIN  # signed, where it was signed
    as_user(plant)
    assert errno_of(read, proj(mnt) / "main.c") == errno.EACCES
    [ev, *_] = refusals(mnt, "/src/proj/main.c")
    assert "signed, but its relative target leads to /proj/main.c, under a looser rule " \
           "(default allow)" in ev.reason  # type: ignore[attr-defined]
    # The signed lib/deep still lands on main.c, which is now the refused symlink.
    assert errno_of(read, proj(mnt) / "lib" / "deep") == errno.EACCES
