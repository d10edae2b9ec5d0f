"""The enforcement gate against a hostile local user: uid 65534 through --allow-other.

A real mount with an enforcing policy (t4_fuse_trust's: /src/** needs one signer,
/scratch/** none) over a tree signed by alice-1. The attacker may write under /src
(writing is allowed; reading unsigned content there is not) and tries to make a process
read, through a /src path, bytes no trusted key signed: through the kernel's page cache
(shared writable mappings, a writer renamed in), through the one-writer rule (opens that
race with hashing, O_RDONLY|O_TRUNC), through /proc/self/fd, copy_file_range, sendfile,
renames and hard links. Each attempt is refused, or sees only the signed bytes; a refusal
the daemon makes is in the events log.

The attacker runs in a forked child as 65534 (fuse_helpers.as_user). pytest's tmp_path
is private to root, so the child reaches the mount through a directory descriptor opened
here: `/proc/self/fd/N/...` (inherited across the fork).
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, Templates, serve
from fuse_helpers import as_user, read_while
from t4_fuse_bypass import reload
from t4_fuse_trust import sign_tree, write_policy

from annofs.daemon.events import read_events

SCRIPT = b"#!/bin/sh\necho signed\n"
EVIL = b"#!/bin/sh\necho EVILxx\n"  # as long as SCRIPT: a page written in place
MAIN = b"int main(void) { return 0; }\n"


def _make_attacked(root: Path) -> None:
    """What `attacked` starts from: /src/proj (main.c, run.sh, lib/util.c) signed
    (`sign_tree`)."""
    tree = root / "proj"
    (tree / "lib").mkdir(parents=True)
    (tree / "main.c").write_bytes(MAIN)
    (tree / "run.sh").write_bytes(SCRIPT)
    (tree / "lib" / "util.c").write_text("int util(void) { return 1; }\n")
    sign_tree(root, tree)


@pytest.fixture
def attacked(tmp_path: Path, templates: Templates,
             request: pytest.FixtureRequest) -> Iterator[tuple[Mount, str]]:
    """/src/proj (main.c, run.sh, lib/util.c) signed by alice-1, writable by anyone, and
    an empty /scratch; mounted --allow-other with an enforcing policy. Yields the mount
    and the mount's root as the attacker's child sees it (a /proc/self/fd path)."""
    templates.copy("t4_fuse_attacker.attacked", tmp_path, _make_attacked)
    (tmp_path / "mnt").mkdir()
    for mounted in serve(Mount(tmp_path / "store", tmp_path / "mnt"), request,
                         "--policy", str(tmp_path / "policy.toml"), "--allow-other"):
        yield from _opened_to_all(mounted)


def _opened_to_all(mounted: Mount) -> Iterator[tuple[Mount, str]]:
    """`mounted` with /src/proj writable by everyone (modes are not content: no verdict
    changes) and a /scratch of everyone's; yields it and a /proc/self/fd path of its
    root, held open meanwhile."""
    for d in (mounted.path, mounted.path / "src", mounted.path / "src" / "proj",
              mounted.path / "src" / "proj" / "lib"):
        d.chmod(0o777)
    for f in ("main.c", "run.sh", "lib/util.c"):
        (mounted.path / "src" / "proj" / f).chmod(0o777)
    (mounted.path / "scratch").mkdir(mode=0o777)
    (mounted.path / "scratch").chmod(0o777)
    fd = os.open(mounted.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield mounted, f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def refusals(m: Mount, path: str) -> list[str]:
    """The reasons of the refusals the events log holds for `path`."""
    return [e.reason for e in read_events(m.store) if e.path == path and e.verdict == "refused"]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _errno(fn, *args) -> int | None:  # type: ignore[no-untyped-def]
    """None if fn(*args) succeeds, else its errno (in the attacker's child)."""
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return None


def _try(fn, *args) -> object:  # type: ignore[no-untyped-def]
    """fn(*args), or its errno if it fails (in the attacker's child)."""
    try:
        return fn(*args)
    except OSError as e:
        return e.errno


def _sh(path: str) -> tuple[int, bytes]:
    """Run a script with sh; the mount's directory descriptor (in `path`) passed on."""
    fd = int(path.split("/")[4])
    res = subprocess.run(["sh", path], capture_output=True, pass_fds=(fd,))
    return res.returncode, res.stdout


# -- 15.2: shared mappings and the page cache ------------------------------------------------


def _dirty_shared_map_then_read(root: str) -> dict[str, object]:
    """Open a signed script read-write (allowed: it is signed), map it shared and write
    the mapping without msync; then read it through new opens and run it with sh."""
    f = f"{root}/src/proj/run.sh"
    out: dict[str, object] = {}
    fd = os.open(f, os.O_RDWR)
    try:
        try:
            m = mmap.mmap(fd, 0)  # MAP_SHARED, PROT_READ | PROT_WRITE
        except OSError as e:
            out["mmap"] = e.errno
            m = None
        if m is not None:
            m[:len(EVIL)] = EVIL  # a dirty page in the kernel's cache, no msync
        out["read"] = _try(_read, f)
        out["proc_fd"] = _try(_read, f"/proc/self/fd/{fd}")
        out["sh"] = _sh(f)
        out["exec"] = _try(_exec, f)
        if m is not None:
            m.close()
    finally:
        os.close(fd)
    return out


def _exec(path: str) -> tuple[int, bytes]:
    """execve the script itself (the mount's directory descriptor passed on)."""
    fd = int(path.split("/")[4])
    res = subprocess.run([path], capture_output=True, pass_fds=(fd,))
    return res.returncode, res.stdout


def test_a_shared_writable_mapping_of_a_guarded_file_is_refused(
        attacked: tuple[Mount, str]) -> None:
    """Under a rule that needs signers, a writer handle bypasses the page cache (direct
    I/O): MAP_SHARED on it is ENODEV, so no dirty page can reach a reader or `sh`. While
    the read-write handle is open, readers are refused (EBUSY, recorded); after it, they
    read the signed bytes."""
    m, root = attacked
    out = as_user(_dirty_shared_map_then_read, root)
    assert out.get("mmap") == errno.ENODEV, out
    assert out["read"] == errno.EBUSY and out["proc_fd"] == errno.EBUSY
    assert out["sh"][1] == b""
    # execve: the kernel's ETXTBSY (a writer holds it) or ours (EBUSY), never the page.
    assert out["exec"] in (errno.ETXTBSY, errno.EBUSY), out
    assert as_user(_sh, f"{root}/src/proj/run.sh") == (0, b"signed\n")
    assert as_user(_exec, f"{root}/src/proj/run.sh") == (0, b"signed\n")
    assert (m.path / "src" / "proj" / "run.sh").read_bytes() == SCRIPT
    reasons = refusals(m, "/src/proj/run.sh")
    assert len(reasons) == 4 and all(r.startswith("busy") for r in reasons), reasons


def _private_map_of_a_writer(root: str) -> dict[str, object]:
    """MAP_PRIVATE of a read-write handle (allowed: what it writes stays private), a write
    through the handle, then a reader and sh (refused while it is open: EBUSY)."""
    f = f"{root}/src/proj/run.sh"
    out: dict[str, object] = {}
    fd = os.open(f, os.O_RDWR)
    try:
        m = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE)
        m[:len(EVIL)] = EVIL  # copy-on-write: never the file's
        out["private"] = m[:len(EVIL)]
        out["read"] = _try(_read, f)
        out["sh"] = _sh(f)
        m.close()
        os.pwrite(fd, EVIL, 0)  # the writer's own bytes: unsigned, not committed yet
        out["after_write"] = _errno(_read, f)
    finally:
        os.close(fd)
    return out


def test_a_private_mapping_of_a_writer_shows_nothing_unsigned(
        attacked: tuple[Mount, str]) -> None:
    m, root = attacked
    out = as_user(_private_map_of_a_writer, root)
    assert out["private"] == EVIL, out
    assert out["read"] == errno.EBUSY and out["sh"][1] == b""
    assert out["after_write"] == errno.EBUSY
    assert len(refusals(m, "/src/proj/run.sh")) == 3
    # Closed: what it wrote is committed, and judged: unsigned.
    assert as_user(_try, _read, f"{root}/src/proj/run.sh") == errno.EACCES


def _cached_writer_renamed_in(root: str) -> dict[str, object]:
    """A writer opened under /scratch (no signers needed: it may use the page cache), the
    file there a copy of the signed script, written through a shared mapping; then the
    file is renamed over the signed script. Reads through /src must not see the page."""
    src, tmp = f"{root}/src/proj/run.sh", f"{root}/scratch/run.sh"
    with open(tmp, "wb") as w:
        w.write(SCRIPT)  # the signed bytes: its digest is signed wherever it lives
    out: dict[str, object] = {}
    fd = os.open(tmp, os.O_RDWR)
    try:
        m = mmap.mmap(fd, 0)
        m[:len(EVIL)] = EVIL  # dirty, not written back
        os.rename(tmp, src)
        out["read"] = _try(_read, src)
        out["sh"] = _sh(src)
        m.close()
    finally:
        os.close(fd)
    # Closed: the mapping's pages were written back, the next open judges them.
    out["after"] = _try(_read, src)
    return out


def test_a_cached_writer_renamed_under_a_guarded_path_keeps_readers_out(
        attacked: tuple[Mount, str]) -> None:
    m, root = attacked
    out = as_user(_cached_writer_renamed_in, root)
    # EBUSY while the page is only in the cache; EACCES once the kernel wrote it back
    # (FUSE's strict dirty limit does that within moments): never the page itself.
    assert out["read"] in (errno.EBUSY, errno.EACCES), out
    assert out["sh"][1] == b""  # sh could not read it either
    assert out["after"] == errno.EACCES  # the written-back page is unsigned content
    reasons = refusals(m, "/src/proj/run.sh")
    assert len(reasons) >= 3, reasons
    assert any("needs 1 distinct trusted signer" in r for r in reasons), reasons


def _hard_linked_name_moved_out(root: str) -> object:
    """A directory holding one name of a hard link moved to /scratch: the loose name is
    still a name of a guarded file, so its writers bypass the cache too."""
    sub = f"{root}/src/proj/sub"
    os.mkdir(sub)
    with open(f"{sub}/a.sh", "wb") as w:
        w.write(SCRIPT)
    os.link(f"{sub}/a.sh", f"{root}/src/proj/b.sh")
    os.rename(sub, f"{root}/scratch/sub")
    fd = os.open(f"{root}/scratch/sub/a.sh", os.O_RDWR)
    try:
        try:
            mmap.mmap(fd, 0)
        except OSError as e:
            return e.errno, _try(_read, f"{root}/src/proj/b.sh")
        return "mapped"
    finally:
        os.close(fd)


def test_a_hard_link_under_a_guarded_path_guards_its_other_names(
        attacked: tuple[Mount, str]) -> None:
    _, root = attacked
    # Mapping refused; the strict name's readers wait for the read-write handle.
    assert as_user(_hard_linked_name_moved_out, root) == (errno.ENODEV, errno.EBUSY)
    assert as_user(_read, f"{root}/src/proj/b.sh") == SCRIPT


def test_writers_on_unguarded_paths_keep_the_page_cache(attacked: tuple[Mount, str]) -> None:
    """Only guarded paths pay: under /scratch a shared writable mapping works."""
    m, _ = attacked
    f = m.path / "scratch" / "free.txt"
    f.write_bytes(b"x" * 100)
    with open(f, "r+b") as w:
        mm = mmap.mmap(w.fileno(), 0)
        mm[:3] = b"abc"
        mm.flush()
        mm.close()
    assert f.read_bytes() == b"abc" + b"x" * 97


# -- 15.3: the one-writer rule ---------------------------------------------------------------


def _open_write_only_and_write(path: str) -> tuple[int | None, float]:
    """(errno or None, when the open was made)."""
    t = time.monotonic()
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        return e.errno, t
    try:
        os.pwrite(fd, b"EVIL", 0)
    finally:
        os.close(fd)
    return None, t


def test_a_write_only_open_racing_the_hashing_of_a_read_write_open(
        attacked: tuple[Mount, str]) -> None:
    """Content written through the mount has no digest until an open needs it: the
    read-write open hashes it first. A write-only open arriving meanwhile must not get in
    beside the judged read-write handle (which would then read the attacker's bytes).
    (/scratch needs no signers, but every judged read-write handle is its file's only
    writer.)"""
    m, root = attacked
    f = m.path / "scratch" / "big.bin"
    data = os.urandom(1 << 20) * 48  # 48 MiB: hashing it takes a while
    busy = 0
    for _ in range(4):
        f.write_bytes(data)  # a new version: its digest deferred again
        f.chmod(0o666)
        seen: dict[str, object] = {}

        def victim(seen: dict[str, object] = seen) -> None:
            seen["start"] = time.monotonic()
            try:
                with open(f, "r+b", buffering=0) as rw:
                    time.sleep(0.3)  # the attacker's write, if let in, lands now
                    seen["head"] = os.pread(rw.fileno(), 4, 0)
                seen["end"] = time.monotonic()
            except OSError as e:
                seen["error"] = e.errno

        t = threading.Thread(target=victim)
        t.start()
        time.sleep(0.005)  # the victim's open is hashing now (or soon)
        err, when = as_user(_open_write_only_and_write, f"{root}/scratch/big.bin")
        t.join()
        assert seen.get("error") in (None, errno.EBUSY)
        assert err in (None, errno.EBUSY)
        if err is None and "head" in seen:
            # Both were let in: only allowed if they did not overlap.
            assert not seen["start"] < when < seen["end"], "two writers beside a judged one"
            assert seen["head"] == data[:4]
        busy += (err == errno.EBUSY) + (seen.get("error") == errno.EBUSY)
    assert busy, "the two opens never met: the race was not tried"
    assert any(r.startswith("busy") for r in refusals(m, "/scratch/big.bin"))


def _truncate_beside_writer(root: str) -> dict[str, object]:
    f = f"{root}/src/proj/main.c"
    out: dict[str, object] = {}
    out["rdonly_trunc"] = _errno(lambda: os.close(os.open(f, os.O_RDONLY | os.O_TRUNC)))
    out["truncate"] = _errno(os.truncate, f, 0)
    out["wronly"] = _errno(lambda: os.close(os.open(f, os.O_WRONLY)))
    return out


def test_truncating_beside_a_judged_read_write_handle_is_busy(
        attacked: tuple[Mount, str]) -> None:
    m, root = attacked
    f = m.path / "src" / "proj" / "main.c"
    with open(f, "r+b", buffering=0) as rw:
        out = as_user(_truncate_beside_writer, root)
        assert rw.read() == MAIN
    assert out == {"rdonly_trunc": errno.EBUSY, "truncate": errno.EBUSY,
                   "wronly": errno.EBUSY}
    assert f.read_bytes() == MAIN
    busy = [r for r in refusals(m, "/src/proj/main.c") if r.startswith("busy")]
    assert len(busy) == 3, busy


# -- other ways in ---------------------------------------------------------------------------


def _copy_out(root: str) -> dict[str, object]:
    """A reader of the signed file open; the file patched through another handle; the
    reader's fd copied with copy_file_range and sendfile; a patched file copied directly."""
    f = f"{root}/src/proj/main.c"
    out: dict[str, object] = {}
    r = os.open(f, os.O_RDONLY)
    try:
        w = os.open(f, os.O_WRONLY)  # in place, beside the reader
        os.pwrite(w, b"int evil(void) { return 66; }\n", 0)
        os.close(w)
        for name in ("cfr", "sendfile"):
            dst = f"{root}/scratch/{name}.c"
            o = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                if name == "cfr":
                    os.copy_file_range(r, o, 4096, 0, 0)
                else:
                    os.sendfile(o, r, 0, 4096)
            finally:
                os.close(o)
            out[name] = _read(dst)
    finally:
        os.close(r)
    o = os.open(f"{root}/scratch/direct.c", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        out["patched_open"] = _errno(os.open, f, os.O_RDONLY)
    finally:
        os.close(o)
    return out


def test_copy_file_range_and_sendfile_copy_only_signed_bytes(
        attacked: tuple[Mount, str]) -> None:
    m, root = attacked
    out = as_user(_copy_out, root)
    assert out["cfr"] == MAIN and out["sendfile"] == MAIN
    assert out["patched_open"] == errno.EACCES
    assert refusals(m, "/src/proj/main.c")


def _proc_fd_reopen(root: str) -> dict[str, object]:
    """Write-only opens are not judged; reopening one for reading through /proc/self/fd is
    a real open, judged on what was written (committed first)."""
    f = f"{root}/src/proj/main.c"
    fd = os.open(f, os.O_WRONLY)
    try:
        os.pwrite(fd, b"int evil(void) { return 66; }\n", 0)
        return {"reopen": _errno(os.open, f"/proc/self/fd/{fd}", os.O_RDONLY),
                "reopen_rw": _errno(os.open, f"/proc/self/fd/{fd}", os.O_RDWR)}
    finally:
        os.close(fd)


def test_proc_self_fd_reopen_of_a_writer_is_judged(attacked: tuple[Mount, str]) -> None:
    m, root = attacked
    # Read-write beside a writer is EBUSY before anything is judged.
    assert as_user(_proc_fd_reopen, root) == {"reopen": errno.EACCES,
                                              "reopen_rw": errno.EBUSY}
    reasons = refusals(m, "/src/proj/main.c")
    assert len(reasons) == 2 and reasons[1].startswith("busy"), reasons


def _swap_loop(root: str, rounds: int) -> int:
    """Rename unsigned, then signed, content over the signed file, `rounds` times."""
    f = f"{root}/src/proj/main.c"
    n = 0
    for _ in range(rounds):
        for content in (b"int evil(void) { return 66; }\n", MAIN):
            tmp = f"{root}/src/proj/.tmp{n}"
            with open(tmp, "wb") as w:
                w.write(content)
            os.rename(tmp, f)
            n += 1
    return n


def test_renaming_unsigned_content_over_a_signed_file_while_opening(
        attacked: tuple[Mount, str]) -> None:
    m, root = attacked
    f = m.path / "src" / "proj" / "main.c"
    seen = read_while(f, MAIN, lambda: as_user(_swap_loop, root, 150))
    assert seen.result == 300
    assert not seen.wrong, seen.wrong[:3]
    # (rename over is atomic: the name never goes missing)
    assert seen.counts["read"] and seen.counts["refused"] and not seen.counts["gone"], \
        seen.counts
    assert refusals(m, "/src/proj/main.c")


def _private_map_fills_the_cache(root: str, victim_fd: int) -> dict[str, object]:
    """A read-write handle (judged: signed) would write unsigned bytes, then map the file
    privately and touch it: the kernel would fill the inode's cache through it, with
    bytes nobody judged, and the reader opened before (its fd inherited here) reads the
    cache. So the read-write open is refused beside judged readers."""
    f = f"{root}/src/proj/run.sh"
    out: dict[str, object] = {}
    try:
        fd = os.open(f, os.O_RDWR)
    except OSError as e:
        return {"error": e.errno}
    try:
        os.pwrite(fd, EVIL, 0)
        m = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        out["writer_map"] = m[:len(EVIL)]
        out["old_reader"] = os.pread(victim_fd, 100, 0)
        r = os.open(f, os.O_RDONLY)  # judged on what the writer wrote: refused
        os.close(r)
        m.close()
    except OSError as e:
        out["error"] = e.errno
    finally:
        os.close(fd)
    return out


def test_a_private_mapping_of_a_writer_does_not_feed_older_readers(
        attacked: tuple[Mount, str]) -> None:
    m, root = attacked
    f = m.path / "src" / "proj" / "run.sh"
    with open(f, "rb", buffering=0) as victim:
        assert victim.read() == SCRIPT  # the cache now holds the signed bytes
        out = as_user(_private_map_fills_the_cache, root, victim.fileno())
        victim.seek(0)
        assert victim.read() == SCRIPT
    assert out == {"error": errno.EBUSY}, out
    assert refusals(m, "/src/proj/run.sh")[-1].startswith("busy")
    # Under /scratch (no signers needed) the same is allowed.
    g = m.path / "scratch" / "g.sh"
    g.write_bytes(SCRIPT)
    with open(g, "rb") as r, open(g, "r+b"):
        assert r.read() == SCRIPT


def test_a_cached_writer_from_before_enforcement_keeps_readers_out(
        attacked: tuple[Mount, str], tmp_path: Path) -> None:
    """A writer opened while the policy was off used the page cache (and wrote a shared
    mapping without msync); after a reload to enforce, judged readers wait for it."""
    m, root = attacked
    write_policy(tmp_path / "policy.toml", mode="off")
    reload(m)
    f = m.path / "src" / "proj" / "run.sh"
    fd = os.open(f, os.O_RDWR)
    mm = mmap.mmap(fd, 0)
    try:
        mm[:len(EVIL)] = EVIL
        write_policy(tmp_path / "policy.toml")
        # SIGHUP, not `annofs policy reload`: a fork and exec here would close the
        # child's copy of the mapping, which writes the dirty page back to the daemon.
        log = m.store / "daemon.log"
        before = log.read_text().count("policy reloaded")
        assert m.proc is not None
        m.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while log.read_text().count("policy reloaded") == before:
            assert time.monotonic() < deadline, "the policy was not reloaded"
            time.sleep(0.02)
        # EBUSY, or EACCES if the kernel already wrote the page back: never the page.
        assert as_user(_try, _read, f"{root}/src/proj/run.sh") in (errno.EBUSY,
                                                                    errno.EACCES)
    finally:
        mm.close()
        os.close(fd)
    assert as_user(_try, _read, f"{root}/src/proj/run.sh") == errno.EACCES
    reasons = refusals(m, "/src/proj/run.sh")
    assert len(reasons) == 2 and "needs 1" in reasons[1], reasons
