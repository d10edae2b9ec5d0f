"""The events log: opens the policy refused or warned about, as JSON lines in the store.

The daemon appends; `annofs events` reads, and follows. One line per event, flushed as
written, so a reader sees a refusal as soon as the process that hit it does. The file
is rotated (one previous generation kept) so it cannot fill the disk.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from annofs.printable import one_line

EVENTS_FILE = "events.jsonl"
MAX_BYTES = 16 << 20


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


class EventLog:
    """Appends events to the store's log file."""

    def __init__(self, store: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = store / EVENTS_FILE
        self.max_bytes = max_bytes

    def record(self, event: Event) -> None:
        """Append one event (rotating first if the file is full)."""
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
