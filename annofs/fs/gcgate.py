"""Keeping gc apart from writers while both run off the event loop.

A commit stores fragments before the version that uses them, and a NAR restore stores a
staging tree before it swaps it in; gc must never fall between (it would free what is
about to be referenced, or delete a parent a new version is being given). gc used to run
on the event loop for that reason, and so the whole mount waited for it. Now gc runs in
a worker thread holding this gate exclusively, writers that store content hold it
shared, and everything else (lookups, reads, getattr, readdir) goes on meanwhile.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio


class GcGate:
    """Any number of shared holders (writers of content) or one exclusive holder (gc).

    A waiting gc stops new shared holders, so a steady stream of commits cannot starve it.
    """

    def __init__(self) -> None:
        self._cond = trio.Condition()
        self._shared = 0
        self._exclusive = False
        self._exclusive_waiting = 0

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        """Store content (fragments, then the versions or tree that use them)."""
        async with self._cond:
            while self._exclusive or self._exclusive_waiting:
                await self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                async with self._cond:
                    self._shared -= 1
                    self._cond.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Collect garbage: no content is being stored meanwhile."""
        async with self._cond:
            self._exclusive_waiting += 1
            try:
                while self._exclusive or self._shared:
                    await self._cond.wait()
            finally:
                self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                async with self._cond:
                    self._exclusive = False
                    self._cond.notify_all()
