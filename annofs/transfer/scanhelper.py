"""A second process that scans part of the tree while the importer scans the rest.

A re-import after a small change is mostly stat calls and comparisons in Python, one
core's work; this puts the second core on it. The helper gets subtrees (the shallowest
the importer has not reached yet), scans up to BUDGET directories per request, and
answers with what was clean, which directories were not (the importer changes those
itself: it is the only writer) and what it did not reach, which go back to the
importer's pile. It only reads: its own read-only LMDB environment, the host tree.

The helper is a fresh interpreter (`python -P -c ...`), not a fork: a forked child must
not touch the parent's LMDB environment, and a fork server costs far more to start. It
answers on a pipe of its own (not stdout, where anything the interpreter prints would
garble the answers). If it cannot start, or dies, or says something that is not an
answer, its outstanding subtrees go back to the importer, which scans them itself; an
answer is one message, applied whole or not at all.
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

from annofs.transfer.scan import Item

# Directories per request: large enough that requests are few (one costs ~0.1 ms of the
# importer's time), small enough that neither side waits long for the other at the end.
BUDGET = 256
# Subtrees per request, at most: many small ones (a wide tree of leaf directories) go
# together rather than one request each.
ITEMS_PER_REQUEST = 64
_LEN = struct.Struct(">I")
_MAX_MESSAGE = 1 << 30


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
    """The next message; None at the end of the stream (or a cut-off message)."""
    head = inp.read(_LEN.size)
    if len(head) < _LEN.size:
        return None
    (n,) = _LEN.unpack(head)
    if n > _MAX_MESSAGE:
        raise ValueError(f"message of {n} bytes")
    body = inp.read(n)
    if len(body) < n:
        return None
    return msgpack.unpackb(body)


def _item(raw: list) -> Item:
    host, stage, base = raw
    if not (isinstance(host, bytes) and isinstance(base, int)
            and all(isinstance(n, bytes) for n in stage)):
        raise ValueError("not a directory to scan")
    return host, tuple(stage), base


def _answer(msg: object) -> tuple[int, Answer]:
    """A request's id and its answer, from a message (ValueError if it is not one)."""
    if not isinstance(msg, list) or len(msg) != 5:
        raise ValueError("not an answer")
    req_id, files, dirs, dirty, rest = msg
    if not all(isinstance(n, int) for n in (req_id, files, dirs)):
        raise ValueError("not an answer")
    return req_id, Answer(files, dirs, [_item(i) for i in dirty], [_item(i) for i in rest])


def _command(answers_fd: int) -> list[str]:
    """The helper's command line. -P: the working directory is not put on the path (an
    annofs package there would be imported instead of this one)."""
    return [sys.executable, "-P", "-c",
            f"from annofs.transfer.scanhelper import serve; serve({answers_fd})"]


def _child_env() -> dict[str, str]:
    """The environment with this process's module path, in its order: the helper imports
    the same annofs (a source checkout run with -m, a venv, an install) and the same
    libraries, and nothing goes ahead of the standard library that is not ahead here."""
    path = [p or os.getcwd() for p in sys.path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


class ScanHelper:
    """The importer's side: starts the helper, hands it subtrees, collects answers."""

    def __init__(self, store_path: Path, dest: Sequence[bytes], max_key: int,
                 excludes: Sequence[str] = (),
                 git_listing: tuple[bytes, bytes] | None = None) -> None:
        """A helper for an import to the store path `dest`, with its --exclude patterns
        and, for --git, the listing the importer took (hostwalk.git_listing; one
        listing, so both sides filter alike)."""
        self._outstanding: dict[int, list[Item]] = {}
        self._answers: collections.deque[Answer] = collections.deque()
        self._ready = threading.Condition()
        self._next_id = 0
        self.alive = True
        self.died = False  # ended (or never started) before it was closed
        self.requests = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        theirs, ours = -1, -1
        try:
            ours, theirs = os.pipe()
            # Its own process group: a Ctrl-C at the terminal is the importer's to handle
            # (the helper ends when its stdin closes), even before the helper could set
            # its signals.
            self._proc = subprocess.Popen(
                _command(theirs), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                pass_fds=(theirs,), env=_child_env(), process_group=0)
        except OSError:
            if ours >= 0:
                os.close(ours)
            self._died()
            return
        finally:
            if theirs >= 0:
                os.close(theirs)
        assert self._proc.stdin is not None
        self._to = self._proc.stdin
        self._reader = threading.Thread(target=self._read_answers,
                                        args=(os.fdopen(ours, "rb"),), daemon=True,
                                        name="import-scan-answers")
        self._reader.start()
        try:
            _write(self._to, [os.fsencode(store_path), list(dest), max_key, list(excludes),
                              git_listing])
        except OSError:
            self._died()

    @property
    def busy(self) -> bool:
        """Whether answers are still to come (or have come and not been taken)."""
        with self._ready:
            return bool(self._outstanding or self._answers)

    def feed(self, pile: collections.deque[Item]) -> None:
        """Hand the helper the bottom (shallowest) of the importer's pile, keeping two
        requests in flight and at least one directory for the importer."""
        while len(pile) > 1:
            with self._ready:  # not after _died has taken back what was outstanding
                if not self.alive or len(self._outstanding) >= 2:
                    return
                n = max(1, min(ITEMS_PER_REQUEST, (len(pile) - 1) // 2))
                items = [pile.popleft() for _ in range(n)]
                self._next_id += 1
                self._outstanding[self._next_id] = items
            self.requests += 1
            try:
                _write(self._to, [self._next_id, [list(i) for i in items], BUDGET])
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
        if self._proc is None:
            return
        with contextlib.suppress(OSError):
            self._to.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)

    def _read_answers(self, inp: BinaryIO) -> None:
        """The reader thread: answers in, until the helper's pipe ends or says something
        that is not an answer; either way the helper is then taken as gone."""
        try:
            while (msg := _read(inp)) is not None:
                req_id, answer = _answer(msg)
                with self._ready:  # one step: never neither outstanding nor answered
                    if self._outstanding.pop(req_id, None) is None:
                        raise ValueError(f"answer to no request ({req_id})")
                    self._answers.append(answer)
                    self._ready.notify_all()
        except Exception:  # garbled: what is outstanding is scanned again
            pass
        finally:
            inp.close()
            self._died()

    def _died(self) -> None:
        """Gone (or never started): what it was given is the importer's to scan again."""
        with self._ready:
            self.died = self.died or self.alive  # not when closed
            self.alive = False
            lost = [item for items in self._outstanding.values() for item in items]
            self._outstanding.clear()
            self._answers.append(Answer(0, 0, [], lost))
            self._ready.notify_all()


def serve(answers_fd: int) -> None:
    """The helper process: answer requests on stdin, on `answers_fd`, until stdin closes."""
    from annofs.store.env import open_env_readonly
    from annofs.transfer.hostwalk import HostFilter, tracked_paths
    from annofs.transfer.scan import Scanner

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the importer's to handle (see above)
    inp = sys.stdin.buffer
    out = os.fdopen(answers_fd, "wb")
    init = _read(inp)
    if not isinstance(init, list):
        return
    store_path, dest, max_key, excludes, git_listing = init
    host_filter = None
    if excludes or git_listing is not None:
        host_filter = HostFilter(excludes, None if git_listing is None
                                 else tracked_paths(*git_listing))
    env = open_env_readonly(Path(os.fsdecode(store_path)))
    scanner = Scanner(env.open_db(b"entries", create=False),
                      env.open_db(b"importcache", create=False), max_key, dest,
                      host_filter)
    try:
        while (msg := _read(inp)) is not None:
            req_id, raw_items, budget = msg  # type: ignore[misc]
            files = dirs = 0
            dirty: list[Item] = []
            pile = [_item(i) for i in reversed(raw_items)]
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
                         [list(i) for i in reversed(pile)]])
    except BrokenPipeError:  # the importer is gone: nothing to say, to no one
        env.close()
        os._exit(0)
    env.close()
