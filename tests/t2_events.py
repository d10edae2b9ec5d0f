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
