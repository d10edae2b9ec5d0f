"""The live feed of judged opens: the mount publishes, the dashboard subscribes.

In process and on the daemon's trio loop (the verdict sink is called there). Publishing
never blocks and never fails the open it reports: a subscriber that falls behind loses
events (and is told how many), recent ones are kept in a small ring for a page that
connects later. With nobody subscribed a publish is one deque append.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from annofs.daemon.events import Event
from annofs.fs.enforce import VerdictSink
from annofs.trust.symlink import Content, digest_text
from annofs.trust.verdict import Verdict

if TYPE_CHECKING:  # only a type here; the mount imports it at its first explanation
    from annofs.explain.report import Explanation

RECENT = 500
SUBSCRIBER_BUFFER = 1000

# Verdict.status -> the events log's words.
_EVENT_WORD = {"allowed": "allowed", "refused": "refused", "warn": "warned", "off": "allowed"}


@dataclass(frozen=True)
class FeedItem:
    """One judged open, numbered in publish order."""

    seq: int
    event: Event
    signers: tuple[str, ...] = field(default=())


def event_of(path: str, version: Content, verdict: Verdict, pid: int,
             explanation: Explanation | None = None) -> Event:
    """The event for a judged open or symlink read (as the events log would word it)."""
    return Event(path=path, verdict=_EVENT_WORD.get(verdict.status, verdict.status),
                 reason=verdict.reason, digest=digest_text(version),
                 version=version.id, rule=verdict.rule, pid=pid,
                 explanation=explanation.to_text() if explanation is not None else "",
                 details=explanation.to_json() if explanation is not None else None)


class Subscription:
    """What a subscriber reads: items, and how many it missed by falling behind."""

    def __init__(self, receive: trio.MemoryReceiveChannel[FeedItem]) -> None:
        self.receive = receive
        self.dropped = 0


class Feed:
    """Recent judged opens, and the subscribers to new ones."""

    def __init__(self, recent: int = RECENT, buffer: int = SUBSCRIBER_BUFFER) -> None:
        self.recent: deque[FeedItem] = deque(maxlen=recent)
        self._buffer = buffer
        self._seq = itertools.count(1)
        self._subs: dict[Subscription, trio.MemorySendChannel[FeedItem]] = {}

    def publish(self, event: Event, signers: tuple[str, ...] = ()) -> None:
        """Record one event and hand it to every subscriber that has room."""
        item = FeedItem(next(self._seq), event, signers)
        self.recent.append(item)
        for sub, send in self._subs.items():
            try:
                send.send_nowait(item)
            except trio.WouldBlock:
                sub.dropped += 1

    def tee(self, sink: VerdictSink | None) -> VerdictSink:
        """A verdict sink that calls `sink` (the events log's) and then publishes."""

        def both(path: str, version: Content, verdict: Verdict, pid: int, uid: int,
                 explanation: Explanation | None = None) -> bool | None:
            try:
                if sink is not None:
                    return sink(path, version, verdict, pid, uid, explanation)
                return None
            finally:
                self.publish(event_of(path, version, verdict, pid, explanation),
                             verdict.signers)

        return both

    @contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        """Receive every item published while the context is open."""
        send, receive = trio.open_memory_channel[FeedItem](self._buffer)
        sub = Subscription(receive)
        self._subs[sub] = send
        try:
            yield sub
        finally:
            del self._subs[sub]
            send.close()
            receive.close()

    @property
    def subscribers(self) -> int:
        """How many subscribers are connected."""
        return len(self._subs)
