"""The events log: appended whole, read back, followed across rotation, torn lines skipped."""

from __future__ import annotations

import itertools
import subprocess
import threading
from pathlib import Path

from conftest import annofs_cmd

from annofs.daemon.events import Event, EventLog, follow_events, read_events


def test_record_read_and_rotate(tmp_path: Path) -> None:
    log = EventLog(tmp_path, max_bytes=2000)
    for i in range(30):
        log.record(Event(f"/src/f{i}", "refused", "needs 2 signers, has 1", pid=100 + i))
    events = read_events(tmp_path)
    assert (tmp_path / "events.jsonl.1").exists()
    assert events[-1].path == "/src/f29" and events[-1].pid == 129
    assert [e.path for e in events] == sorted((e.path for e in events),
                                              key=lambda p: int(p[6:]))
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"path": "/torn", "verd')  # a crash mid-line
    assert read_events(tmp_path)[-1].path == "/src/f29"


def test_follow_sees_new_events_across_rotation(tmp_path: Path) -> None:
    log = EventLog(tmp_path, max_bytes=600)
    log.record(Event("/old", "refused", "before following"))
    seen: list[str] = []
    it = follow_events(tmp_path, poll=0.01)

    def reader() -> None:
        for e in itertools.islice(it, 10):
            seen.append(e.path)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    import time

    time.sleep(0.1)
    for i in range(10):
        log.record(Event(f"/new{i}", "warned", "x" * 100))
        time.sleep(0.03)
    t.join(timeout=10)
    assert seen == [f"/new{i}" for i in range(10)]


def test_events_command(tmp_path: Path) -> None:
    store = tmp_path / "store"
    subprocess.run(annofs_cmd("--store", str(store), "init"), check=True, capture_output=True)
    EventLog(store).record(Event("/src/a.c", "refused", "no trusted signature", rule="/src/**"))
    out = subprocess.run(annofs_cmd("--store", str(store), "events"), check=True,
                         capture_output=True, text=True).stdout
    assert "refused" in out and "/src/a.c [/src/**]: no trusted signature" in out
    js = subprocess.run(annofs_cmd("--store", str(store), "events", "--json"), check=True,
                        capture_output=True, text=True).stdout
    assert Event.from_json(js.strip()) is not None
    bad = subprocess.run(annofs_cmd("--store", str(tmp_path / "none"), "events"),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_uid_s_flood_is_summed_up_and_cannot_push_out_others(tmp_path: Path) -> None:
    """A user who causes refusals at will (any user who may write under a rule) writes
    `burst` lines, then one per 1/rate seconds; the rest is counted and written as one
    summary line. Other uids' events, and events of no uid, are written as ever."""
    clock = Clock()
    log = EventLog(tmp_path, max_bytes=1 << 20, burst=5, rate=0.5, clock=clock)
    for i in range(1000):
        log.record(Event(f"/src/x{i % 2}", "refused", "needs 1 signer", pid=7, uid=65534))
    log.record(Event("/src/root.c", "refused", "needs 1 signer", pid=1, uid=0))
    log.record(Event("bundle", "bundle-stale", "expired"))  # no uid: never held
    events = read_events(tmp_path)
    assert [e.uid for e in events] == [65534] * 5 + [0, None]
    clock.now += 4  # two more lines earned
    log.record(Event("/src/x0", "refused", "needs 1 signer", uid=65534))
    log.record(Event("/src/x0", "refused", "needs 1 signer", uid=65534))
    log.record(Event("/src/x1", "refused", "needs 1 signer", uid=65534))  # held again
    assert len(read_events(tmp_path)) == 9
    log.flush(due_only=True)
    assert len(read_events(tmp_path)) == 9  # not due yet
    clock.now += 60
    log.flush(due_only=True)
    summary = read_events(tmp_path)[-1]
    assert summary.uid == 65534 and summary.verdict == "refused"
    assert summary.reason == ("996 more events caused by uid 65534 not written one by one "
                              "(flood limit): 499 of /src/x1, 497 of /src/x0")
    log.flush()
    assert len(read_events(tmp_path)) == 10  # nothing held any more: no empty summary


def test_a_flood_summary_comes_with_the_next_event_once_due(tmp_path: Path) -> None:
    clock = Clock()
    log = EventLog(tmp_path, max_bytes=1 << 20, burst=1, rate=0.0, clock=clock)
    for _ in range(3):
        log.record(Event("/src/a", "refused", "r", uid=5))
    clock.now += 61
    log.record(Event("/src/b", "refused", "r", uid=5))  # itself held (no lines earned)
    events = read_events(tmp_path)
    assert [e.path for e in events] == ["/src/a", "/src/a"]
    assert events[-1].reason.startswith("2 more events caused by uid 5")
