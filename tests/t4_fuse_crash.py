"""kill -9 of the daemon: whatever was fsynced is there after a remount, nothing read
back is torn, and the store passes `annofs fsck`.

A few cycles by default; 50 with ANNOFS_FULL=1, or ANNOFS_CRASH_CYCLES.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Mount
from fuse_helpers import annofs, stop_and_check

CYCLES = int(os.environ.get("ANNOFS_CRASH_CYCLES",
                            "50" if os.environ.get("ANNOFS_FULL") == "1" else "3"))


@pytest.fixture
def mnt(mounted: Mount) -> Iterator[Mount]:
    """A fresh store and daemon; after the test, unmounted and checked by fsck."""
    yield mounted
    stop_and_check(mounted)


def fsck_cli(m: Mount) -> None:
    res = annofs("--store", str(m.store), "fsck", check=False)
    assert res.returncode == 0, f"annofs fsck failed:\n{res.stdout}{res.stderr}"


def blob(tag: str, size: int) -> bytes:
    """Self-checking content: a header naming it, then bytes derived from the tag."""
    head = f"{tag} {size}\n".encode()
    body = random.Random(tag).randbytes(max(0, size - len(head)))
    return head + body


def check_blob(data: bytes) -> str:
    """The tag of a self-checking blob; fails if the bytes are torn or mixed."""
    tag, size = data.split(b"\n", 1)[0].decode().rsplit(" ", 1)
    assert data == blob(tag, int(size)), f"{tag}: content torn or mixed"
    return tag


def test_fsynced_write_survives_and_unsynced_tail_is_cleanly_lost(mnt: Mount) -> None:
    f = mnt.path / "f"
    durable = blob("durable", 2_000_000)
    fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, durable)
    os.fsync(fd)
    os.write(fd, b"never synced" * 1000)  # still in the daemon's memory
    mnt.kill()
    with contextlib.suppress(OSError):
        os.close(fd)  # ENOTCONN: the daemon is gone
    mnt.start()
    assert f.read_bytes() == durable
    mnt.stop()
    fsck_cli(mnt)


def test_fsynced_rename_and_directory_survive(mnt: Mount) -> None:
    d = mnt.path / "a" / "b"
    d.mkdir(parents=True)
    tmp = d / ".tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o640)
    os.write(fd, b"committed by rename")
    os.fsync(fd)
    os.close(fd)
    os.rename(tmp, d / "final")
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    mnt.kill()
    mnt.start()
    assert os.listdir(d) == ["final"]
    assert (d / "final").read_bytes() == b"committed by rename"
    assert (d / "final").stat().st_mode & 0o777 == 0o640
    mnt.stop()
    fsck_cli(mnt)


def test_kill_during_a_large_unsynced_write(mnt: Mount) -> None:
    # Past the daemon's spill threshold (64 MiB) fragments are stored before any version
    # names them: after the kill they belong to nothing, and the store stays consistent.
    f = mnt.path / "large"
    f.write_bytes(b"small committed content")
    chunk = random.Random(1).randbytes(1 << 20)
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    for i in range(80):
        os.write(fd, chunk[i:] + chunk[:i])
    mnt.kill()
    with contextlib.suppress(OSError):
        os.close(fd)  # ENOTCONN: the daemon is gone
    mnt.start()
    assert f.read_bytes() == b"small committed content"
    mnt.stop()
    fsck_cli(mnt)


@dataclass
class Chaos:
    """A writer that keeps changing the mount; it records what was fsynced."""

    root: Path
    rnd: random.Random
    durable: dict[str, bytes] = field(default_factory=dict)  # name -> fsynced content
    log_synced: int = 0  # bytes of `log_stream` known fsynced
    log_stream: bytes = b""  # everything ever appended to the log
    removed: set[str] = field(default_factory=set)  # unlinked, maybe not durably
    replacing: bytes | None = None  # the content a rename in flight may have installed
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    n: int = 0

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step()
        except OSError:
            pass  # the daemon was killed under us
        except BaseException as e:  # pragma: no cover - reported by the test
            self.error = e

    def step(self) -> None:
        self.n += 1
        tag = f"g{self.n}-{self.rnd.randrange(1 << 30)}"
        op = self.rnd.random()
        if op < 0.4:
            # a new durable file: write, fsync, then it counts
            data = blob(tag, self.rnd.choice([0, 100, 5_000, 70_000, 400_000]))
            fd = os.open(self.root / tag, os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.durable[tag] = data
        elif op < 0.6:
            # append to the log; fsync sometimes
            rec = f"{tag}\n".encode() * self.rnd.randrange(1, 50)
            fd = os.open(self.root / "log", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
            try:
                self.log_stream += rec
                os.write(fd, rec)
                if self.rnd.random() < 0.5:
                    os.fsync(fd)
                    self.log_synced = len(self.log_stream)
            finally:
                os.close(fd)
        elif op < 0.75:
            # atomic replace of a durable file, by write-fsync-rename
            data = blob(tag, self.rnd.randrange(0, 200_000))
            tmp = self.root / f".tmp-{tag}"
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.replacing = data
            os.rename(tmp, self.root / "replaced")
            self.durable["replaced"] = data
            self.replacing = None
        elif op < 0.85:
            # an unsynced file left open with data in flight
            fd = os.open(self.root / f"open-{tag}", os.O_CREAT | os.O_WRONLY, 0o644)
            os.write(fd, blob(tag, 50_000))
            time.sleep(0.005)
            os.close(fd)
        else:
            # remove a durable file (it may or may not be gone after the crash)
            names = sorted(k for k in self.durable if k != "replaced")
            if names:
                name = self.rnd.choice(names)
                del self.durable[name]
                self.removed.add(name)
                os.unlink(self.root / name)


def verify(chaos: Chaos) -> None:
    """After a remount: every fsynced thing is there, nothing is torn."""
    root = chaos.root
    present = set(os.listdir(root))
    for name, data in chaos.durable.items():
        assert name in present, f"{name}: fsynced, gone after the crash"
        got = (root / name).read_bytes()
        if name == "replaced" and got == chaos.replacing:
            chaos.durable[name] = got  # the rename in flight at the kill was done
        else:
            assert got == data, f"{name}: fsynced content changed"
    chaos.replacing = None
    for name in present:
        data = (root / name).read_bytes()
        if name == "log":
            assert chaos.log_stream.startswith(data), "log: bytes that were never written"
            assert len(data) >= chaos.log_synced, "log: fsynced records lost"
            chaos.log_stream = data  # appends not committed at the kill are gone
        elif data:
            check_blob(data)
    # an unsynced removal may have happened or not; a crash must not resurrect it later
    for name in chaos.removed & present:
        os.unlink(root / name)
    chaos.removed.clear()


def test_kill_9_at_random_moments(mnt: Mount) -> None:
    rnd = random.Random(int(os.environ.get("ANNOFS_CRASH_SEED", "7")))
    root = mnt.path / "work"
    root.mkdir()
    chaos = Chaos(root, rnd)
    for _cycle in range(CYCLES):
        chaos.stop.clear()
        t = threading.Thread(target=chaos.run)
        t.start()
        time.sleep(rnd.uniform(0.2, 0.8))
        mnt.kill()
        chaos.stop.set()
        t.join(timeout=30)
        assert not t.is_alive()
        assert chaos.error is None, chaos.error
        mnt.start()
        verify(chaos)
    assert chaos.durable, "the writer made nothing durable: the test proved nothing"
    mnt.stop()
    fsck_cli(mnt)


def test_sigterm_commits_open_files_before_the_daemon_exits(mnt: Mount) -> None:
    f = mnt.path / "f"
    fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"written, never closed nor synced")
    assert mnt.proc is not None
    mnt.proc.send_signal(signal.SIGTERM)
    assert mnt.proc.wait(timeout=30) == 0
    with contextlib.suppress(OSError):
        os.close(fd)  # ENOTCONN: unmounted under us
    mnt.proc = None
    assert not os.path.ismount(mnt.path)
    mnt.start()
    assert f.read_bytes() == b"written, never closed nor synced"
    mnt.stop()
    fsck_cli(mnt)


def test_annofs_umount_waits_for_the_daemon(mnt: Mount) -> None:
    (mnt.path / "f").write_bytes(b"data")
    res = annofs("umount", str(mnt.path), check=False)
    assert res.returncode == 0, res.stderr
    assert not os.path.ismount(mnt.path)
    assert mnt.proc is not None and mnt.proc.poll() == 0  # gone by the time it returned
    mnt.proc = None
    assert annofs("umount", str(mnt.path), check=False).returncode == 2  # not mounted
    assert annofs("--store", str(mnt.store), "cat", "/f").stdout == "data"


# -- a killed daemon's dead mount (issue 16) ------------------------------------------------


def kill_9_leaving_the_mount(m: Mount, *, reap: bool = True) -> int:
    """kill -9 the daemon and leave its dead mount as the kernel keeps it; its pid.
    Without `reap` it stays a zombie: the test process is its parent and does not wait."""
    assert m.proc is not None
    pid = m.proc.pid
    m.proc.send_signal(signal.SIGKILL)
    if reap:
        m.proc.wait(timeout=30)
        release(m)
    else:
        deadline = time.monotonic() + 30
        while process_state(pid) != "Z":
            assert time.monotonic() < deadline, "the killed daemon did not become a zombie"
            time.sleep(0.01)
    # The thread-group leader turns zombie before its other threads have all exited; the
    # connection to /dev/fuse closes with the last of them, moments later.
    deadline = time.monotonic() + 10
    while not is_listed_dead(m.path):
        assert time.monotonic() < deadline, "the killed daemon's mount never went dead"
        time.sleep(0.02)
    return pid


def release(m: Mount) -> None:
    """Forget a daemon process that is gone (reaped by now)."""
    assert m.proc is not None
    if m.proc.stderr:
        m.proc.stderr.close()
    m.proc = None


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0].decode()


def is_listed_dead(mp: Path) -> bool:
    """The kernel still lists the mount, and it answers ENOTCONN."""
    listed = is_listed(mp)
    try:
        os.statvfs(mp)  # stat may come from the kernel's attribute cache
    except OSError as e:
        return listed and e.errno == errno.ENOTCONN
    return False


def is_listed(mp: Path) -> bool:
    """Whether the kernel lists a mount at `mp` (dead or alive)."""
    return any(line.split(" - ")[0].split()[4] == str(mp)
               for line in Path("/proc/self/mountinfo").read_text().splitlines())


def test_umount_after_kill_9_clears_the_dead_mount_and_says_so(mnt: Mount) -> None:
    (mnt.path / "f").write_bytes(b"committed")
    kill_9_leaving_the_mount(mnt)
    res = annofs("umount", str(mnt.path), check=False)
    assert res.returncode == 0, res.stderr
    assert res.stderr == (f"annofs: {mnt.path}: its daemon was gone (killed?); "
                          f"cleared the dead mount\n")
    assert not is_listed(mnt.path)
    res = annofs("umount", str(mnt.path), check=False)
    assert (res.returncode, res.stderr) == (2, f"annofs: {mnt.path}: not mounted\n")
    mnt.start()
    assert (mnt.path / "f").read_bytes() == b"committed"


def test_mount_after_kill_9_works_without_fusermount(mnt: Mount) -> None:
    (mnt.path / "f").write_bytes(b"committed")
    kill_9_leaving_the_mount(mnt)
    res = annofs("--store", str(mnt.store), "mount", str(mnt.path), check=False)
    assert res.returncode == 0, res.stderr
    assert res.stderr == (f"annofs: {mnt.path}: its daemon was gone (killed?); "
                          f"cleared the dead mount\n")
    assert (mnt.path / "f").read_bytes() == b"committed"
    assert annofs("umount", str(mnt.path), check=False).returncode == 0
    assert not is_listed(mnt.path)


def test_mount_elsewhere_after_kill_9_clears_the_stores_old_dead_mount(
        mnt: Mount, tmp_path: Path) -> None:
    kill_9_leaving_the_mount(mnt)
    other = tmp_path / "other"
    other.mkdir()
    res = annofs("--store", str(mnt.store), "mount", str(other), check=False)
    assert res.returncode == 0, res.stderr
    assert "cleared the dead mount" in res.stderr and str(mnt.path) in res.stderr
    assert not is_listed(mnt.path)
    assert annofs("umount", str(other), check=False).returncode == 0


def test_a_zombie_daemon_does_not_block_a_remount(mnt: Mount) -> None:
    """Its parent (here, this test) has not reaped it: a pid probe finds it 'alive', but it
    holds no lock any more."""
    (mnt.path / "f").write_bytes(b"committed")
    pid = kill_9_leaving_the_mount(mnt, reap=False)
    try:
        res = annofs("--store", str(mnt.store), "mount", str(mnt.path), check=False)
        assert res.returncode == 0, res.stderr
        assert process_state(pid) == "Z"  # still unreaped while the new mount works
        assert (mnt.path / "f").read_bytes() == b"committed"
        assert annofs("umount", str(mnt.path), check=False).returncode == 0
    finally:
        assert mnt.proc is not None
        mnt.proc.wait(timeout=30)
        release(mnt)


def test_mounting_a_store_twice_is_refused_while_its_daemon_lives(
        mnt: Mount, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    res = annofs("--store", str(mnt.store), "mount", str(other), check=False)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and f"already mounted at {mnt.path}" in res.stderr


def test_a_dead_mount_is_cleared_only_by_a_path_without_symlinks(mnt: Mount,
                                                                tmp_path: Path) -> None:
    """Root clearing a dead mount under a directory another user controls: a parent
    swapped for a symlink between the check and the unmount would have root detach
    some other mount (attacker review finding 7). A path with a symlink is refused;
    the real one is detached through a descriptor of the checked mount."""
    from annofs.daemon import deadmount
    from annofs.errors import UsageError

    kill_9_leaving_the_mount(mnt)
    link = tmp_path / "link"
    link.symlink_to(mnt.path.parent)
    with pytest.raises(UsageError, match="only by a path without symlinks"):
        deadmount.clear(link / mnt.path.name)
    assert is_listed(mnt.path)
    deadmount.clear(mnt.path)
    assert not is_listed(mnt.path)
    mnt.start()
