"""annofs.content.workers: work split into ordered runs over the caller and a thread pool."""

from __future__ import annotations

import itertools
import os
import threading
import time

import pytest

from annofs.content import workers


def test_split_gives_contiguous_nonempty_runs_of_about_equal_weight() -> None:
    sizes = [10] * 100
    runs = workers.split(sizes, 3)
    assert runs[0][0] == 0 and runs[-1][1] == 100
    assert all(a[1] == b[0] for a, b in itertools.pairwise(runs))
    assert all(j > i for i, j in runs)
    assert [sum(sizes[i:j]) for i, j in runs] == [330, 330, 340]
    # One heavy item cannot be cut: fewer runs, none empty, nothing lost.
    runs = workers.split([1000, 1, 1], 4)
    assert runs[0] == (0, 1) and runs[-1][1] == 3 and all(j > i for i, j in runs)
    assert workers.split([5], 2) == [(0, 1)]


def test_map_runs_keeps_the_order_and_uses_the_pool_for_large_work() -> None:
    names: set[str] = set()
    lock = threading.Lock()

    def double(run: list[int]) -> list[int]:
        with lock:
            names.add(threading.current_thread().name)
        time.sleep(0.02)  # slow work, without the GIL: the pool's thread starts some runs
        return [2 * x for x in run]

    items = list(range(1000))
    sizes = [workers.MIN_SPLIT_BYTES // 100] * len(items)  # 10x the split threshold
    assert workers.map_runs(double, items, sizes) == [2 * x for x in items]
    assert threading.current_thread().name in names
    if workers.helpers():
        assert any(n.startswith("annofs-work") for n in names)
    names.clear()
    assert workers.map_runs(double, items[:3], [1, 1, 1]) == [0, 2, 4]
    assert names == {threading.current_thread().name}  # little work: the caller alone


def test_a_forked_child_gets_a_pool_of_its_own() -> None:
    parent = workers.pool()
    if parent is None:
        return  # one CPU: nothing to fork
    assert parent.submit(os.getpid).result() == os.getpid()
    pid = os.fork()
    if pid == 0:
        # The parent's pool object has no threads here: work given to it would never run.
        child = workers.pool()
        ok = child is not parent and child is not None and \
            child.submit(lambda: 41 + 1).result(timeout=10) == 42
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_map_runs_from_a_pool_thread_runs_there_instead_of_waiting_for_itself() -> None:
    p = workers.pool()
    if p is None:
        return
    items = list(range(100))
    sizes = [workers.MIN_SPLIT_BYTES] * len(items)
    nested = [p.submit(workers.map_runs, lambda run: [x + 1 for x in run], items, sizes)
              for _ in range(workers.helpers() + 1)]  # every pool thread busy with one
    assert all(f.result(timeout=10) == [x + 1 for x in items] for f in nested)


def test_finish_runs_work_no_thread_started_and_waits_for_started_work() -> None:
    done: list[str] = []
    workers.finish(None, done.append, "no pool")  # one CPU: nothing was submitted
    assert done == ["no pool"]
    p = workers.pool()
    if p is None:
        return
    gate = threading.Event()
    blockers = [p.submit(gate.wait, 10) for _ in range(workers.helpers())]
    queued = p.submit(done.append, "queued")  # every thread busy: not started
    workers.finish(queued, done.append, "taken back")
    assert done == ["no pool", "taken back"] and queued.cancelled()
    gate.set()
    assert all(b.result(timeout=10) for b in blockers)
    started = p.submit(done.append, "in the pool")
    started.result(timeout=10)
    workers.finish(started, done.append, "not run twice")
    assert done == ["no pool", "taken back", "in the pool"]



def test_the_caller_takes_back_runs_no_thread_has_started() -> None:
    p = workers.pool()
    if p is None:
        return
    gate = threading.Event()
    blockers = [p.submit(gate.wait, 10) for _ in range(workers.helpers())]
    ran: list[str] = []

    def work(run: list[int]) -> list[int]:
        ran.append(threading.current_thread().name)
        return [x + 1 for x in run]

    items = list(range(64))
    sizes = [workers.MIN_RUN_BYTES] * len(items)
    try:
        # Every pool thread is busy: the caller does every run, in order, without waiting.
        assert workers.map_runs(work, items, sizes) == [x + 1 for x in items]
        assert set(ran) == {threading.current_thread().name} and len(ran) > 2
    finally:
        gate.set()
    assert all(b.result(timeout=10) for b in blockers)


def test_annofs_threads_caps_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workers, "_cpus", lambda: 8)
    assert workers.helpers() == workers.MAX_THREADS - 1
    monkeypatch.setenv("ANNOFS_THREADS", "1")
    assert workers.helpers() == 0 and workers.pool() is None
    monkeypatch.setenv("ANNOFS_THREADS", "2")
    assert workers.helpers() == 1
    monkeypatch.setenv("ANNOFS_THREADS", "many")  # not a number: the default
    assert workers.helpers() == workers.MAX_THREADS - 1


def test_caller_only_leaves_the_process_without_a_pool() -> None:
    pid = os.fork()
    if pid == 0:  # process-wide: in a child, as an import's reader process does it
        workers.caller_only()
        ok = workers.helpers() == 0 and workers.pool() is None and \
            workers.map_runs(lambda run: list(run), list(range(10)), [1 << 20] * 10) == \
            list(range(10))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
