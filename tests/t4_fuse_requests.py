"""What a reader costs the daemon in requests and CPU: no FLUSH at a read-only close
(scripts/pyfuse3-noflush.patch), and a request loop that polls /dev/fuse briefly after
a request but never while the mount is idle (scripts/pyfuse3-spin.patch)."""

from __future__ import annotations

import os
import time

from conftest import Mount
from fuse_helpers import cpu_seconds, restart_on_one_cpu, stats, stop_and_check

from annofs.daemon.mount import FUSE_SPIN_NS


def test_readers_closes_send_no_flush_and_writers_still_commit(mounted: Mount) -> None:
    f = mounted.path / "f"
    f.write_bytes(b"first")
    before = stats(mounted).get("flushes", 0)
    for _ in range(20):
        assert f.read_bytes() == b"first"
    assert stats(mounted).get("flushes", 0) == before  # 20 reader closes, no FLUSH
    reader = os.open(f, os.O_RDONLY)  # a reader open beside the writer
    try:
        with open(f, "r+b") as w:
            w.write(b"FIRST")
        assert stats(mounted).get("flushes", 0) == before + 1
        assert os.pread(reader, 5, 0) == b"FIRST"
    finally:
        os.close(reader)
    mounted.stop()
    mounted.start()  # what the writer's close committed is what a new daemon serves
    assert f.read_bytes() == b"FIRST"
    stop_and_check(mounted)


def test_the_daemon_polls_only_after_a_request(mounted: Mount) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        # The daemon then never polls; the next test covers that case.
        assert "fuse_spin_ns" not in stats(mounted)
        return
    assert stats(mounted)["fuse_spin_ns"] == FUSE_SPIN_NS
    assert mounted.proc is not None
    for i in range(200):
        (mounted.path / f"f{i}").write_bytes(b"x")
        (mounted.path / f"f{i}").read_bytes()
    time.sleep(0.2)
    idle_from = cpu_seconds(mounted.proc.pid)
    time.sleep(2.0)
    # Idle, the loop sleeps in the event loop: a poll that went on would burn 2 s here.
    assert cpu_seconds(mounted.proc.pid) - idle_from < 0.3
    stop_and_check(mounted)


def test_on_one_cpu_the_daemon_does_not_poll(mounted: Mount) -> None:
    restart_on_one_cpu(mounted)
    assert "fuse_spin_ns" not in stats(mounted)
    (mounted.path / "f").write_bytes(b"one cpu")
    assert (mounted.path / "f").read_bytes() == b"one cpu"
    stop_and_check(mounted)
