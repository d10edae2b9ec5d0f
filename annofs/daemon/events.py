"""The events log: opens the policy refused or warned about, as JSON lines in the store.

The daemon appends; `annofs events` reads, and follows. One line per event, flushed as
written, so a reader sees a refusal as soon as the process that hit it does. The file
is rotated (one previous generation kept) so it cannot fill the disk.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from annofs.printable import one_line

EVENTS_FILE = "events.jsonl"
MAX_BYTES = 16 << 20
# Each uid may write FLOOD_BURST lines at once, then one per 1/FLOOD_RATE seconds; what
# it causes beyond that is counted, and the counts written as one summary line per
# SUMMARY_EVERY seconds. Any user who may write under a rule can cause refusals at will:
# unbounded, 96,000 of them rotated everyone else's out of the log.
FLOOD_BURST = 200
FLOOD_RATE = 0.2
SUMMARY_EVERY = 60.0
_FLOOD_UIDS = 1024  # buckets kept; beyond that, the full ones holding nothing are dropped


@dataclass
class Event:
    """One open the policy had something to say about."""

    path: str
    verdict: str  # "refused", "warned", "allowed"
    reason: str
    digest: str = ""
    version: int = 0
    rule: str = ""
    pid: int = 0
    time: float = field(default_factory=time.time)
    explanation: str = ""  # the text `annofs why` shows; empty when not explained
    details: dict[str, Any] | None = None  # the same as JSON (`annofs why --json`)
    # Who caused it (the refused caller); None for events no local user causes directly
    # (a trust bundle's), which the flood limit never holds back.
    uid: int | None = None

    def to_json(self) -> str:
        """The event as one line of JSON."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> Event | None:
        """Parse a line; None for a line that is not an event (a torn write at a crash)."""
        try:
            raw: Any = json.loads(line)
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        except (ValueError, TypeError, KeyError):
            return None


@dataclass
class _Bucket:
    """One uid's flood limit: lines it may still write, and what it caused beyond them."""

    tokens: float
    stamp: float
    held: Counter[tuple[str, str]] = field(default_factory=Counter)  # (verdict, path)
    held_since: float = 0.0


class EventLog:
    """Appends events to the store's log file, with a flood limit per uid."""

    def __init__(self, store: Path, max_bytes: int = MAX_BYTES, *,
                 burst: int = FLOOD_BURST, rate: float = FLOOD_RATE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = store / EVENTS_FILE
        self.max_bytes = max_bytes
        self._burst, self._rate, self._clock = burst, rate, clock
        self._buckets: dict[int, _Bucket] = {}
        # Refusals come from the event loop, bundle events from elsewhere.
        self._lock = threading.Lock()

    def record(self, event: Event) -> bool:
        """Append one event (rotating first if the file is full), unless its uid has
        spent its lines: then it is counted, summed up later (`flush`), and False
        returned (the caller logs nothing of it either)."""
        with self._lock:
            if event.uid is not None and not self._admit(event):
                return False
            self._write(event)
            return True

    def flush(self, *, due_only: bool = False) -> None:
        """Write the summary lines of what the flood limit held back (only those older
        than SUMMARY_EVERY with `due_only`; the daemon calls this now and then, and at
        exit)."""
        with self._lock:
            now = self._clock()
            for uid, b in list(self._buckets.items()):
                if b.held and (not due_only or now - b.held_since >= SUMMARY_EVERY):
                    self._write_summary(uid, b)

    def _admit(self, event: Event) -> bool:
        assert event.uid is not None
        now = self._clock()
        b = self._buckets.get(event.uid)
        if b is None:
            if len(self._buckets) >= _FLOOD_UIDS:
                self._buckets = {u: k for u, k in self._buckets.items()
                                 if k.held or k.tokens + (now - k.stamp) * self._rate
                                 < self._burst}
            b = self._buckets[event.uid] = _Bucket(float(self._burst), now)
        b.tokens = min(float(self._burst), b.tokens + (now - b.stamp) * self._rate)
        b.stamp = now
        if b.held and now - b.held_since >= SUMMARY_EVERY:
            self._write_summary(event.uid, b)
        if b.tokens >= 1:
            b.tokens -= 1
            return True
        if not b.held:
            b.held_since = now
        b.held[(event.verdict, event.path)] += 1
        return False

    def _write_summary(self, uid: int, b: _Bucket) -> None:
        total = sum(b.held.values())
        top = b.held.most_common(3)
        (verdict, path), _ = top[0]
        shown = ", ".join(f"{n} of {p}" for (_, p), n in top)
        more = len(b.held) - len(top)
        self._write(Event(path=path, verdict=verdict, uid=uid, reason=(
            f"{total} more events caused by uid {uid} not written one by one (flood limit): "
            f"{shown}" + (f" and {more} other path{'s' if more != 1 else ''}" if more else ""))))
        b.held.clear()

    def _write(self, event: Event) -> None:
        line = (event.to_json() + "\n").encode()
        try:
            if self.path.stat().st_size + len(line) > self.max_bytes:
                os.replace(self.path, self.path.with_suffix(".jsonl.1"))
        except FileNotFoundError:
            pass
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)  # one write per line: O_APPEND keeps lines whole
        finally:
            os.close(fd)


def read_events(store: Path) -> list[Event]:
    """Every event in the log, oldest first (the rotated generation included)."""
    events: list[Event] = []
    for p in (store / (EVENTS_FILE + ".1"), store / EVENTS_FILE):
        try:
            text = p.read_text(errors="replace")
        except FileNotFoundError:
            continue
        events += [e for line in text.splitlines() if (e := Event.from_json(line))]
    return events


def follow_events(store: Path, poll: float = 0.2) -> Iterator[Event]:
    """Events as they are appended, from now on (survives rotation)."""
    path = store / EVENTS_FILE
    pos = path.stat().st_size if path.exists() else 0
    ino = path.stat().st_ino if path.exists() else None
    partial = b""
    while True:
        try:
            st = path.stat()
        except FileNotFoundError:
            time.sleep(poll)
            continue
        if st.st_ino != ino or st.st_size < pos:  # rotated: start the new file
            ino, pos, partial = st.st_ino, 0, b""
        if st.st_size > pos:
            with open(path, "rb") as f:
                f.seek(pos)
                data = partial + f.read(st.st_size - pos)
            pos = st.st_size
            *lines, partial = data.split(b"\n")
            for line in lines:
                e = Event.from_json(line.decode(errors="replace"))
                if e is not None:
                    yield e
        else:
            time.sleep(poll)


def format_event(e: Event) -> str:
    """One line for people."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
    rule = f" [{e.rule}]" if e.rule else ""
    # The path is a name anybody who may write may choose: never a second line.
    return one_line(f"{when} {e.verdict:<8} pid {e.pid:<7} {e.path}{rule}: {e.reason}")
