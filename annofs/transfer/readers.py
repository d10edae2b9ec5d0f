"""Reading host files for an import: open, chunk, hash, store fragments; in worker processes.

Measured on the 2-core test machine (64 MiB, two threads against one after the other):
FastCDC's C code holds the GIL (speedup 0.99), BLAKE3 releases it (1.5-2.0). Threads
would leave chunking on one core, so reads run in worker processes. Each worker opens
the store itself and stores the fragments it cut (LMDB serialises writers across
processes); only fragment lists and digests come back, never file bytes. The importer
turns them into versions after the worker has committed the fragments, so a version
never names a fragment that is not stored.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from annofs.content import workers
from annofs.content.fragments import FragmentStore
from annofs.content.holes import HOLE_MIN
from annofs.content.ingest import (
    FragmentBatch,
    Ingested,
    ingest_bytes,
    ingest_sparse,
    ingest_stream,
)
from annofs.content.versions import DIGEST_HOLE_LIMIT
from annofs.store import Store, open_store
from chunker import ChunkParams

Job = tuple[bytes, int]  # (host path, size when stat'ed)
SMALL_FILE = 1 << 20  # read whole, in one call; larger files are streamed in bounded memory


@dataclass
class ReadError:
    """A file that could not be read: the importer raises it in its own process."""

    errno: int
    strerror: str
    path: bytes

    def exception(self) -> OSError:
        """The error as the OSError the read raised."""
        return OSError(self.errno, self.strerror, os.fsdecode(self.path))


@dataclass
class BatchResult:
    """What reading one batch of files gave, in the batch's order."""

    files: list[Ingested | ReadError]
    new_bytes: int


def read_batch(store: Store, fragments: FragmentStore, params: ChunkParams,
               jobs: Sequence[Job]) -> BatchResult:
    """Read, chunk and hash each file, storing its fragments; every fragment is committed
    when this returns. A file that cannot be read gives a ReadError; the others go on."""
    batch = FragmentBatch(store, fragments, limit=32 << 20)
    out: list[Ingested | ReadError] = []
    for path, size in jobs:
        try:
            out.append(_read_one(store, fragments, params, batch, path, size))
        except OSError as e:
            out.append(ReadError(e.errno or 0, e.strerror or str(e), path))
        if batch.full:
            batch.flush()
    batch.flush()
    return BatchResult(out, batch.new_bytes)


def _read_one(store: Store, fragments: FragmentStore, params: ChunkParams,
              batch: FragmentBatch, path: bytes, size: int) -> Ingested:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if size <= SMALL_FILE:
            # Most source files: one read of the whole file (one byte more tells whether it
            # grew since its stat), chunked in place. Per file this was a third of the cost
            # of the streaming path, whose buffer is max_size larger than the file.
            data = os.read(fd, size + 1)
            if len(data) <= size:
                return ingest_bytes(data, params, batch)
            os.lseek(fd, 0, os.SEEK_SET)
        if os.fstat(fd).st_blocks * 512 < size:
            # Fewer blocks than bytes: the host file has holes. Read only its data
            # (SEEK_DATA/SEEK_HOLE) and keep the holes as holes.
            got = ingest_sparse(store, fragments, fd, size, params, batch, HOLE_MIN,
                                DIGEST_HOLE_LIMIT)
            if got is not None:
                return got
        # Unbuffered: the chunker's readinto fills its own buffer, no second copy.
        with open(fd, "rb", buffering=0, closefd=False) as f:
            return ingest_stream(store, fragments, f, params, batch)
    finally:
        os.close(fd)


# -- the worker side -----------------------------------------------------------------------

_worker: tuple[Store, FragmentStore, ChunkParams] | None = None


def _exit_with(importer: int) -> None:
    """Exit when the importer does, even when it is killed: kill -9 leaves no one to shut
    the pool down, and the workers would wait for work forever (keeping the importer's
    stderr open). Their parent is the fork server, which waits for them in turn, so the
    parent-death signal cannot tell; a thread waits on the importer's pidfd instead."""
    try:
        fd: int | None = os.pidfd_open(importer)
    except (AttributeError, OSError):  # not Linux >= 5.3, or the importer is gone
        fd = None

    def wait() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            while True:
                try:
                    os.kill(importer, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=wait, daemon=True, name="exit-with-importer").start()


def _init_worker(store_path: str, params: str, importer: int) -> None:
    global _worker
    _exit_with(importer)
    # Ctrl-C reaches the whole process group; the importer shuts the pool down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One reader process per core already: compression threads on top of them made the
    # import of linux-source-6.1 slower (24.1-24.8 s against 19.2 s without, at load 2-3).
    workers.caller_only()
    store = open_store(Path(store_path))
    _worker = (store, FragmentStore(store), ChunkParams.parse(params))


def _worker_batch(jobs: list[Job]) -> BatchResult:
    assert _worker is not None, "the pool's initializer opens the store"
    return read_batch(*_worker, jobs)


# -- the importer's side ---------------------------------------------------------------------


def default_workers() -> int:
    """Two readers per core the process may use (at most 8).

    Reading a tree that is not in the page cache waits on the disk more than it computes:
    on the 2-core test machine the cold linux-6.1 import took 14.4 s with 2 workers,
    11.3 s with 4 and 11.3 s with 6.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return min(8, 2 * cores)


class ReadPool:
    """Batches of reads, run in this process until there is enough work for workers.

    Small imports (and re-imports that read a few changed files) never pay the start of
    worker processes: the pool starts at the first full batch. At most `inflight` batches
    are outstanding, so memory stays bounded whatever the tree's size; `done` receives
    each batch's results in submission order.

    Workers come from a fork server, so a script that imports with workers must guard its
    top level with `if __name__ == "__main__":` (the usual multiprocessing rule), or pass 0.
    """

    def __init__(self, store: Store, fragments: FragmentStore, params: ChunkParams, *,
                 workers: int, done: Callable[[list[object], BatchResult], None],
                 batch_files: int = 256, batch_bytes: int = 16 << 20) -> None:
        self._store = store
        self._fragments = fragments
        self._params = params
        self._workers = workers
        self._done = done
        self.batch_files = batch_files
        self.batch_bytes = batch_bytes
        self._jobs: list[Job] = []
        self._tags: list[object] = []
        self._bytes = 0
        self._inflight: deque[tuple[Future[BatchResult], list[object]]] = deque()
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.started_workers = 0

    def add(self, path: bytes, size: int, tag: object) -> None:
        """Queue a file; `tag` comes back with its result."""
        self._jobs.append((path, size))
        self._tags.append(tag)
        self._bytes += size
        if len(self._jobs) >= self.batch_files or self._bytes >= self.batch_bytes:
            self._submit(full=True)

    def finish(self) -> None:
        """Read what is queued and deliver every outstanding result."""
        if self._jobs:
            self._submit(full=False)
        while self._inflight:
            self._complete_oldest()

    def close(self) -> None:
        """Stop the workers (after an error, without waiting for queued batches)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _submit(self, *, full: bool) -> None:
        jobs, tags = self._jobs, self._tags
        self._jobs, self._tags, self._bytes = [], [], 0
        if self._pool is None and full and self._workers > 0:
            self._start()
        fut: Future[BatchResult] | None = None
        if self._pool is not None:
            try:
                fut = self._pool.submit(_worker_batch, jobs)
            except OSError:
                if self._inflight:
                    raise
                # No processes to be had (a limit, a sandbox): read here, as small imports do.
                self.close()
                self._workers = self.started_workers = 0
        if fut is None:
            fut = Future()
            fut.set_result(read_batch(self._store, self._fragments, self._params, jobs))
        self._inflight.append((fut, tags))
        # Two batches per worker keep every worker busy while results are applied.
        limit = 2 * self._workers if self._pool is not None else 0
        while len(self._inflight) > limit:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        fut, tags = self._inflight.popleft()
        self._done(tags, fut.result())

    def _start(self) -> None:
        # Not fork: a forked child must not touch the parent's LMDB environment. The fork
        # server is a fresh process that imports the readers once; each worker is then a
        # fork of it (spawning each was ~0.15 s of CPU per worker, importing the same).
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        self._pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self._workers, mp_context=ctx, initializer=_init_worker,
            initargs=(str(self._store.path), str(self._params), os.getpid()))
        self.started_workers = self._workers

