"""A second process that scans part of the tree while the importer scans the rest.

A re-import after a small change is mostly stat calls and comparisons in Python, one
core's work; this puts the second core on it. The helper gets subtrees (the shallowest
the importer has not reached yet), scans up to BUDGET directories of each, and answers
with what was clean, which directories were not (the importer changes those itself: it
is the only writer) and what it did not reach, which go back to the importer's pile.
It only reads: its own read-only LMDB environment, the host tree.

The helper is a fresh interpreter (`python -P -c ...`), not a fork: a forked child must
not touch the parent's LMDB environment, and a fork server costs far more to start. If it
dies or cannot start, its outstanding subtrees go back to the importer, which scans them
itself; an answer is one message, so nothing is half done.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import msgpack

import annofs
from annofs.transfer.scan import Item

# Directories per request: large enough that requests are few (one costs ~0.1 ms of the
# importer's time), small enough that neither side waits long for the other at the end.
BUDGET = 256
_LEN = struct.Struct(">I")


class Answer:
    """A request's outcome: clean counts, directories the importer must change, and
    directories still to scan."""

    __slots__ = ("dirs", "dirty", "files", "rest")

    def __init__(self, files: int, dirs: int, dirty: list[Item], rest: list[Item]) -> None:
        self.files = files
        self.dirs = dirs
        self.dirty = dirty
        self.rest = rest


def _write(out: BinaryIO, msg: object) -> None:
    body = msgpack.packb(msg, use_bin_type=True)
    out.write(_LEN.pack(len(body)) + body)
    out.flush()


def _read(inp: BinaryIO) -> object | None:
    head = inp.read(_LEN.size)
    if len(head) < _LEN.size:
        return None
    (n,) = _LEN.unpack(head)
    body = inp.read(n)
    if len(body) < n:
        return None
    return msgpack.unpackb(body)


def _item(raw: list) -> Item:
    host, stage, base = raw
    return host, tuple(stage), base


def _command() -> list[str]:
    """The helper's command line. -P: the working directory is not put on the path (an
    annofs package there would be imported instead of this one)."""
    return [sys.executable, "-P", "-c",
            "from annofs.transfer.scanhelper import serve; serve()"]


class ScanHelper:
    """The importer's side: starts the helper, hands it subtrees, collects answers."""

    def __init__(self, store_path: Path, dest_key: bytes, max_key: int, src: bytes,
                 excludes: Sequence[str] = (), git: bool = False) -> None:
        """A helper for the import of the host directory `src` (with its --exclude
        patterns and --git, which the helper applies itself: it runs git ls-files too)
        to the destination whose import-cache key is `dest_key`."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(annofs.__file__)))
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(
                   p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self._proc = subprocess.Popen(_command(), stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._to = self._proc.stdin
        self._outstanding: dict[int, Item] = {}
        self._answers: collections.deque[Answer] = collections.deque()
        self._ready = threading.Condition()
        self._next_id = 0
        self.alive = True
        self.died = False  # ended before it was closed
        self.requests = 0
        try:
            _write(self._to, [os.fsencode(store_path), dest_key, max_key, src,
                              list(excludes), git])
        except OSError:
            self._died()
        self._reader = threading.Thread(target=self._read_answers, args=(self._proc.stdout,),
                                        daemon=True, name="import-scan-answers")
        self._reader.start()

    @property
    def busy(self) -> bool:
        """Whether answers are still to come."""
        return bool(self._outstanding) or bool(self._answers)

    def feed(self, pile: list[Item]) -> None:
        """Hand the helper the bottom (shallowest) of the importer's pile, keeping two
        requests in flight and at least one directory for the importer."""
        while len(pile) > 1:
            with self._ready:  # not after _died has taken back what was outstanding
                if not self.alive or len(self._outstanding) >= 2:
                    return
                item = pile.pop(0)
                self._next_id += 1
                self._outstanding[self._next_id] = item
            self.requests += 1
            try:
                _write(self._to, [self._next_id, list(item), BUDGET])
            except OSError:
                self._died()

    def take(self) -> list[Answer]:
        """The answers that have arrived (not waiting)."""
        with self._ready:
            got = list(self._answers)
            self._answers.clear()
        return got

    def wait(self) -> None:
        """Until an answer arrives (or the helper is gone, which answers too)."""
        with self._ready:
            self._ready.wait_for(lambda: bool(self._answers))

    def close(self) -> None:
        """Stop the helper."""
        with self._ready:
            self.alive = False
        with contextlib.suppress(OSError):
            self._to.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join(timeout=5)

    def _read_answers(self, inp: BinaryIO) -> None:
        while True:
            try:
                msg = _read(inp)
            except (OSError, ValueError):
                msg = None
            if not isinstance(msg, list):
                self._died()
                return
            req_id, files, dirs, dirty, rest = msg
            with self._ready:
                self._outstanding.pop(req_id, None)
                self._answers.append(Answer(files, dirs, [_item(i) for i in dirty],
                                            [_item(i) for i in rest]))
                self._ready.notify_all()

    def _died(self) -> None:
        """Gone (or never started): what it was given is the importer's to scan again."""
        with self._ready:
            self.died = self.died or self.alive  # not when closed
            self.alive = False
            lost = list(self._outstanding.values())
            self._outstanding.clear()
            self._answers.append(Answer(0, 0, [], lost))
            self._ready.notify_all()


def serve() -> None:
    """The helper process: answer requests on stdin until it closes."""
    from annofs.store.env import open_env_readonly
    from annofs.transfer.hostwalk import HostFilter, git_tracked
    from annofs.transfer.scan import Scanner

    # Ctrl-C reaches the whole process group; the importer ends the helper by closing
    # its stdin (and a killed importer closes it too).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    init = _read(inp)
    if not isinstance(init, list):
        return
    store_path, dest_key, max_key, src, excludes, git = init
    host_filter = None
    if excludes or git:
        host_filter = HostFilter(excludes, git_tracked(Path(os.fsdecode(src))) if git else None)
    env = open_env_readonly(Path(os.fsdecode(store_path)))
    scanner = Scanner(env.open_db(b"entries", create=False),
                      env.open_db(b"importcache", create=False), max_key, dest_key,
                      host_filter)
    try:
        while (msg := _read(inp)) is not None:
            req_id, raw_item, budget = msg  # type: ignore[misc]
            files = dirs = 0
            dirty: list[Item] = []
            pile = [_item(raw_item)]
            with env.begin(buffers=False) as txn:
                for _ in range(budget):
                    if not pile:
                        break
                    item = pile.pop()
                    try:
                        got = scanner.scan(txn, item)
                    except Exception:  # a damaged record: the importer reports it
                        got = None
                    if got is None:
                        dirty.append(item)
                        continue
                    files += got[0]
                    dirs += got[1]
                    pile.extend(reversed(got[2]))
            _write(out, [req_id, files, dirs, [list(i) for i in dirty],
                         [list(i) for i in pile]])
    except BrokenPipeError:  # the importer is gone: nothing to say, to no one
        env.close()
        os._exit(0)
    env.close()
