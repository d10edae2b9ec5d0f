"""A small per-process thread pool for the work that releases the GIL: zstd and BLAKE3.

zstandard's `compress` and blake3's `update`/`digest` release the GIL, so on a machine of
N cores the caller and N-1 threads (at most MAX_THREADS in all) compress and hash at
once, as restic does (measured: two threads compressing 16 KiB fragments took 0.58x the
time of one). FastCDC's C code holds the GIL, so chunking stays on the caller.

The pool is made on first use and again after a fork (a child inherits the pool object
but not its threads: work handed to it would never run).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Beyond four threads the per-fragment Python work on the caller is the limit.
MAX_THREADS = 4
# Below this much work in one call, handing half of it to a thread costs more than it saves.
MIN_SPLIT_BYTES = 256 << 10
# map_runs cuts work into up to this many runs per thread (the caller included), of at
# least MIN_RUN_BYTES: runs are the unit the caller and the pool balance by.
RUNS_PER_THREAD = 4
MIN_RUN_BYTES = 128 << 10

_PREFIX = "annofs-work"
_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None
_alone = False


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def caller_only() -> None:
    """No pool in this process: its work is already one of several processes, one per
    core (an import's readers), where threads on top only add switching."""
    global _alone
    _alone = True


def helpers() -> int:
    """How many pool threads work beside the caller (0 on one CPU). ANNOFS_THREADS, if
    set, caps the threads in all (1: the caller alone, no pool)."""
    if _alone:
        return 0
    cap = MAX_THREADS
    with contextlib.suppress(ValueError):
        cap = max(1, min(cap, int(os.environ.get("ANNOFS_THREADS", cap))))
    return max(0, min(cap, _cpus()) - 1)


def pool() -> ThreadPoolExecutor | None:
    """This process's pool, or None when there is only one CPU."""
    global _pool
    n = helpers()
    if n == 0:
        return None
    pid = os.getpid()
    with _lock:
        if _pool is None or _pool[0] != pid:
            _pool = (pid, ThreadPoolExecutor(max_workers=n, thread_name_prefix=_PREFIX))
        return _pool[1]


def in_pool() -> bool:
    """Whether the calling thread is one of the pool's."""
    return threading.current_thread().name.startswith(_PREFIX)


def submit(fn: Callable[..., R], *args: object) -> Future[R] | None:
    """Run `fn(*args)` in the pool; None (nothing started) when there is no pool: the
    caller then runs it itself."""
    p = pool()
    return p.submit(fn, *args) if p is not None else None


def split(sizes: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Cut indexes [0, len(sizes)) into at most `parts` contiguous [i, j) runs of about
    equal total size, none empty."""
    total = sum(sizes)
    bounds: list[tuple[int, int]] = []
    i = acc = 0
    for k in range(1, parts + 1):
        goal = total * k / parts
        j = i
        while j < len(sizes) and (acc + sizes[j] <= goal or j == i or k == parts):
            acc += sizes[j]
            j += 1
        if j > i:
            bounds.append((i, j))
        i = j
    return bounds


def map_runs(fn: Callable[[Sequence[T]], list[R]], items: Sequence[T],
             sizes: Sequence[int]) -> list[R]:
    """`fn(items)` computed on contiguous runs of `items` at once, results concatenated
    in order. `sizes` weigh the items (bytes of work); little work runs on the caller
    alone.

    The pool's threads take runs from the front; the caller does the first, then takes
    runs back from the end as long as no thread has started them, and waits only for
    those a thread did start. So the work divides itself by how fast each side goes: an
    idle helper takes most of it, and on a busy machine, where the pool's thread may not
    be scheduled for a while, the caller does it rather than wait (measured: at load
    3-4 on 2 cores, waiting on a fixed half cost as much as it saved).
    """
    p = pool()
    total = sum(sizes)
    # From a pool thread, waiting on the pool could wait for itself: run it here.
    if p is None or len(items) < 2 or total < MIN_SPLIT_BYTES or in_pool():
        return fn(items)
    count = min(RUNS_PER_THREAD * (helpers() + 1), max(2, total // MIN_RUN_BYTES))
    runs = split(sizes, count)
    futures = [p.submit(fn, items[i:j]) for i, j in runs[1:]]
    i, j = runs[0]
    done: list[list[R] | None] = [fn(items[i:j])] + [None] * len(futures)
    k = len(futures)
    while k >= 1 and futures[k - 1].cancel():
        i, j = runs[k]
        done[k] = fn(items[i:j])
        k -= 1
    out: list[R] = []
    for n, part in enumerate(done):
        out += part if part is not None else futures[n - 1].result()
    return out


def finish(f: Future[None] | None, fn: Callable[..., None], *args: object) -> None:
    """Wait for `fn(*args)` submitted as `f`, or run it here if no thread started it."""
    if f is None or f.cancel():
        fn(*args)
    else:
        f.result()
