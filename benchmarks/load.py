"""Load: concurrent readers and writers, threads and processes, on shared and own files.

What POSIX (and annofs) promise, and what is checked:

- own files (one writer each, overwrite / append / in-place write / truncate, some
  fsynced): after every close the writer reads back exactly what it wrote, and at the end
  each file holds the writer's last content (no lost write);
- shared files replaced by the atomic-rename idiom (write a temporary name, rename over):
  every reader that opens one reads one complete version some writer wrote, never a mix
  (rename is atomic; an open file keeps the content it was opened with), and at the end
  each holds the last version of one of its writers;
- a shared log appended with O_APPEND by several writers, one write() per record: every
  record is there exactly once and whole at the end, and readers see whole records
  (only the last one may be cut short: a read racing an append).

Concurrent in-place writes to one file and reads of it are not checked for atomicity:
Linux itself does not make write() atomic against read() beyond a page, on any
filesystem.

No deadlock: every worker must finish within its time plus a grace period. Latency is
the time of one whole operation (open .. close, and the rename for a replacement).

`run_load(root, ...)` drives it (tests/t4_reliability_load.py, and the figure `load`
here, which runs the same load on the native disk for the ratio). Worker processes are
`python -m benchmarks.load worker KIND ID ROOT SECONDS SEED OUT`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import blake3

from benchmarks.registry import Context, FigureResult, Row, figure

REPO = Path(__file__).resolve().parents[1]
SHARED = 3  # shared files replaced by rename
KINDS = ("own", "swap", "reader", "log")
GRACE = 60.0  # seconds past the end before a worker counts as hung
T = TypeVar("T")


def blob(tag: str, size: int) -> bytes:
    """Self-checking content: a header naming it, then bytes derived from the tag."""
    head = f"BLOB {tag} {size}\n".encode()
    return head + blake3.blake3(tag.encode()).digest(length=max(0, size - len(head)))


def blob_tag(data: bytes) -> str | None:
    """The tag of a complete blob; None if the bytes are not exactly one (torn, mixed)."""
    line, _, _ = data.partition(b"\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"BLOB" or not parts[2].isdigit():
        return None
    tag = parts[1].decode(errors="replace")
    return tag if data == blob(tag, int(parts[2])) else None


def log_record(wid: str, n: int, rnd: random.Random) -> bytes:
    """One line of the shared log: writer, number, padding, and a check of the three."""
    body = f"{wid} {n} {'x' * rnd.randrange(0, 3000)}"
    return f"{body} {blake3.blake3(body.encode()).hexdigest()[:16]}\n".encode()


def parse_log(data: bytes) -> tuple[list[tuple[str, int]], list[str]]:
    """(writer, number) of each whole record, and what is wrong (a partial last line is
    allowed: the read may race an append)."""
    recs, problems = [], []
    lines = data.split(b"\n")
    for i, line in enumerate(lines[:-1]):
        parts = line.decode(errors="replace").split(" ")
        body = " ".join(parts[:-1])
        if len(parts) != 4 or blake3.blake3(body.encode()).hexdigest()[:16] != parts[-1]:
            problems.append(f"log line {i} is not a whole record: {line[:60]!r}")
            continue
        recs.append((parts[0], int(parts[1])))
    return recs, problems


# -- the workers ----------------------------------------------------------------------------


@dataclass
class Result:
    """What one worker did and saw."""

    kind: str
    wid: str
    ops: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    final: dict[str, str] = field(default_factory=dict)  # own file -> digest of last content
    last_swaps: dict[str, str] = field(default_factory=dict)  # shared file -> last tag
    appended: int = 0


def timed(res: Result, fn: Callable[..., T], *args: Any) -> T:
    """Run one operation, counting it and its latency."""
    t = time.perf_counter()
    out = fn(*args)
    res.latencies_ms.append((time.perf_counter() - t) * 1000)
    res.ops += 1
    return out


def _write(path: Path, flags: int, data: bytes, sync: bool, at: int | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        if at is None:
            os.write(fd, data)
        else:
            os.pwrite(fd, data, at)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _own(root: Path, wid: str, rnd: random.Random, deadline: float, res: Result) -> None:
    path = root / f"own-{wid}"
    content = b""
    while time.monotonic() < deadline:
        op = rnd.random()
        sync = rnd.random() < 0.2
        if op < 0.3 or not content:
            content = rnd.randbytes(rnd.choice([0, 100, 5_000, 100_000]))
            timed(res, _write, path, os.O_TRUNC, content, sync)
        elif op < 0.6:
            extra = rnd.randbytes(rnd.randrange(1, 20_000))
            content += extra
            timed(res, _write, path, os.O_APPEND, extra, sync)
        elif op < 0.85:
            at = rnd.randrange(len(content) + 1)
            patch = rnd.randbytes(rnd.randrange(1, 5_000))
            content = content[:at] + patch + content[at + len(patch):]
            timed(res, _write, path, 0, patch, sync, at)
        else:
            size = rnd.randrange(len(content) + 1000)
            content = content[:size] + bytes(max(0, size - len(content)))
            timed(res, os.truncate, path, size)
        got = timed(res, path.read_bytes)
        if got != content:
            res.problems.append(f"own-{wid}: read back {len(got)} bytes after op {res.ops}, "
                                f"not the {len(content)} just written")
            return
    res.final[path.name] = blake3.blake3(content).hexdigest()


def _swap(root: Path, wid: str, rnd: random.Random, deadline: float, res: Result) -> None:
    n = 0
    while time.monotonic() < deadline:
        n += 1
        target = f"shared-{rnd.randrange(SHARED)}"
        tag = f"{wid}.{n}"
        tmp = root / f".tmp-{tag}"

        def replace(tmp: Path = tmp, tag: str = tag, target: str = target) -> None:
            _write(tmp, os.O_EXCL, blob(tag, rnd.choice([10, 3_000, 60_000, 300_000])),
                   rnd.random() < 0.2)
            os.rename(tmp, root / target)

        timed(res, replace)
        res.last_swaps[target] = tag


def _append(root: Path, wid: str, rnd: random.Random, deadline: float, res: Result) -> None:
    path = root / "log"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while time.monotonic() < deadline:
            rec = log_record(wid, res.appended, rnd)
            n = timed(res, os.write, fd, rec)
            if n != len(rec):
                res.problems.append(f"log: short append by {wid} ({n} of {len(rec)} bytes)")
                return
            res.appended += 1
            if rnd.random() < 0.05:
                os.fsync(fd)
    finally:
        os.close(fd)


def _reader(root: Path, wid: str, rnd: random.Random, deadline: float, res: Result) -> None:
    while time.monotonic() < deadline:
        if rnd.random() < 0.8:
            name = f"shared-{rnd.randrange(SHARED)}"
            try:
                data = timed(res, (root / name).read_bytes)
            except FileNotFoundError:
                continue  # not written yet
            if blob_tag(data) is None:
                res.problems.append(f"{name}: read {len(data)} bytes that are not one "
                                    f"complete version: {data[:40]!r}")
        else:
            try:
                data = timed(res, (root / "log").read_bytes)
            except FileNotFoundError:
                continue
            res.problems += parse_log(data)[1]


WORKERS = {"own": _own, "swap": _swap, "reader": _reader, "log": _append}


def work(kind: str, wid: str, root: Path, seconds: float, seed: int) -> Result:
    """Run one worker for `seconds`; an exception is a problem, not a crash."""
    res = Result(kind, wid)
    try:
        WORKERS[kind](root, wid, random.Random(seed), time.monotonic() + seconds, res)
    except Exception:
        res.problems.append(f"{kind} {wid}: {traceback.format_exc()}")
    return res


# -- the driver -------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What a load run found."""

    clients: int
    seconds: float
    ops: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    by_kind: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    lost_writes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds

    def summary(self) -> str:
        kinds = "; ".join(f"{k}: {n} ops, p50 {p50:.2f} ms, p99 {p99:.2f} ms"
                          for k, (n, p50, p99) in self.by_kind.items())
        return (f"{self.clients} clients, {self.seconds:.0f} s: {self.ops_per_s:.0f} ops/s, "
                f"p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms, "
                f"{self.lost_writes} lost writes, {len(self.problems)} problem(s) ({kinds})")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def plan(clients: int) -> list[tuple[str, bool]]:
    """(kind, as a process?) per client: every kind, threads and processes alternating."""
    order = ["own", "swap", "reader", "log", "reader", "own", "swap", "reader"]
    return [(order[i % len(order)], i % 2 == 1) for i in range(clients)]


def run_load(root: Path, clients: int, seconds: float, seed: int, work_dir: Path) -> LoadReport:
    """Run `clients` workers on `root` for `seconds`, then check what they left."""
    root.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    results: list[Result] = []
    threads: list[tuple[str, threading.Thread]] = []
    procs: list[tuple[str, str, subprocess.Popen, Path]] = []
    lock = threading.Lock()

    def run_thread(kind: str, wid: str, s: int) -> None:
        r = work(kind, wid, root, seconds, s)
        with lock:
            results.append(r)

    for i, (kind, as_process) in enumerate(plan(clients)):
        wid, s = f"{'p' if as_process else 't'}{i}", rnd.randrange(1 << 32)
        if as_process:
            out = work_dir / f"load-{wid}.json"
            p = subprocess.Popen([sys.executable, "-m", "benchmarks.load", "worker", kind, wid,
                                  str(root), str(seconds), str(s), str(out)],
                                 cwd=REPO, stderr=subprocess.PIPE)
            procs.append((kind, wid, p, out))
        else:
            t = threading.Thread(target=run_thread, args=(kind, wid, s), daemon=True)
            t.start()
            threads.append((wid, t))
    rep = LoadReport(clients, seconds)
    end = time.monotonic() + seconds + GRACE
    for wid, t in threads:
        t.join(max(0.0, end - time.monotonic()))
        if t.is_alive():
            rep.problems.append(f"thread {wid} still running {GRACE:.0f} s after its end: hung")
    for _kind, wid, p, out in procs:
        try:
            _, err = p.communicate(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            rep.problems.append(f"process {wid} still running {GRACE:.0f} s after its end: hung")
            continue
        if p.returncode != 0 or not out.exists():
            rep.problems.append(f"process {wid} exited {p.returncode}: {err.decode()[-2000:]}")
            continue
        results.append(Result(**json.loads(out.read_text())))
    _check(root, results, rep)
    return rep


def _check(root: Path, results: list[Result], rep: LoadReport) -> None:
    """Latencies, and whether every write is where it should be."""
    lat: list[float] = []
    for kind in KINDS:
        mine = [x for r in results if r.kind == kind for x in r.latencies_ms]
        n = sum(r.ops for r in results if r.kind == kind)
        rep.by_kind[kind] = (n, _pct(mine, 0.5), _pct(mine, 0.99))
        lat += mine
    rep.ops = sum(r.ops for r in results)
    rep.p50_ms, rep.p99_ms = _pct(lat, 0.5), _pct(lat, 0.99)
    for r in results:
        rep.problems += r.problems
        for name, d in r.final.items():
            got = blake3.blake3((root / name).read_bytes()).hexdigest()
            if got != d:
                rep.lost_writes += 1
                rep.problems.append(f"{name}: not the writer's last content")
    for k in range(SHARED):
        name = f"shared-{k}"
        last = {r.last_swaps[name] for r in results if name in r.last_swaps}
        if not last:
            continue
        tag = blob_tag((root / name).read_bytes())
        if tag not in last:
            rep.lost_writes += 1
            rep.problems.append(f"{name}: holds {tag}, not the last version of any writer "
                                f"({sorted(last)})")
    appended = {(r.wid, n) for r in results if r.kind == "log" for n in range(r.appended)}
    if appended:
        recs, problems = parse_log((root / "log").read_bytes())
        rep.problems += problems
        missing = appended - set(recs)
        rep.lost_writes += len(missing)
        if missing:
            rep.problems.append(f"log: {len(missing)} appended records missing, e.g. "
                                f"{sorted(missing)[:3]}")
        if len(recs) != len(set(recs)) or set(recs) - appended:
            rep.problems.append("log: records duplicated or never written")


# -- the figure -----------------------------------------------------------------------------


def _ms(x: float) -> str:
    return f"{x:.2f} ms" if x >= 1 else f"{x * 1000:.0f} µs"

FIGURE_CLIENTS = 8


@figure("load", "concurrent readers and writers on the mount: ops/s, latency, nothing lost")
def load(ctx: Context) -> FigureResult:
    """The same load on the mount and on the native disk; nothing may be lost on either."""
    from annofs.maintenance.fsck import check_store
    from annofs.volume import Volume
    from benchmarks.mount import code_revision, daemon, daemon_log_note, new_store, running

    seconds = 5.0 if ctx.quick else 30.0
    seed = 1
    store = new_store(ctx.work / "load-store")
    ann = daemon(ctx, store, "mnt-load")
    with running(ann):
        ctx.log(f"load: {FIGURE_CLIENTS} clients on the mount for {seconds:.0f} s")
        with ann.guard("the load run", seconds + 2 * GRACE):
            a = run_load(ann.mountpoint / "load", FIGURE_CLIENTS, seconds, seed, ctx.work)
    vol = Volume.open(store)
    try:
        fsck = check_store(vol).problems
    finally:
        vol.close()
    ctx.log(f"load: the same on the native disk for {seconds:.0f} s")
    n = run_load(ctx.work / "load-native", FIGURE_CLIENTS, seconds, seed, ctx.work)
    bad = a.lost_writes + len(a.problems) + len(fsck)
    rows = [
        Row(f"operations/s at {FIGURE_CLIENTS} clients (4 threads, 4 processes)",
            f"{a.ops_per_s:.0f} ops/s", f"{n.ops_per_s:.0f} ops/s native",
            a.ops_per_s / n.ops_per_s),
        Row("latency p50 (one open..close, or a write+rename)", _ms(a.p50_ms),
            f"{_ms(n.p50_ms)} native", a.p50_ms / n.p50_ms if n.p50_ms else None),
        Row("latency p99", _ms(a.p99_ms), f"{_ms(n.p99_ms)} native",
            a.p99_ms / n.p99_ms if n.p99_ms else None),
        Row("lost writes, torn reads, hangs, fsck problems after the load",
            f"{a.lost_writes} lost, {len(a.problems)} other, {len(fsck)} fsck",
            f"{n.lost_writes} lost, {len(n.problems)} other native", float(bad), "<= 0"),
    ]
    kinds = "; ".join(f"{k} {c} ops, p50 {p50:.2f} ms, p99 {p99:.2f} ms"
                      for k, (c, p50, p99) in a.by_kind.items())
    problems = " / ".join(a.problems[:3] + fsck[:3])
    notes = (
        f"{FIGURE_CLIENTS} clients for {seconds:.0f} s (seed {seed}), alternately threads of "
        "the benchmark and separate processes: writers of their own file (overwrite, append, "
        "in-place write, truncate, each read back at once), writers replacing 3 shared "
        "files by write + rename, O_APPEND writers of one shared log, and readers of the "
        "shared files and the log. Checked: every read of a shared file is one whole "
        "version (self-checking content), every own file ends with its writer's last "
        "content, every shared file with the last version of one of its writers, every "
        "log record is there once and whole, no worker still running 60 s after its end, "
        f"and fsck of the store afterwards. Per kind on the mount: {kinds}. The baseline "
        f"is the same load (same seed) in a directory of the native disk. Code: "
        f"{code_revision()}. {daemon_log_note(ann)}"
        + (f" Problems: {problems}" if problems else ""))
    return FigureResult(rows, notes)


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "worker":
        _, _, kind, wid, root, seconds, seed, out = sys.argv
        r = work(kind, wid, Path(root), float(seconds), int(seed))
        Path(out).write_text(json.dumps(r.__dict__))
        sys.exit(0)
    print("usage: python -m benchmarks.load worker KIND ID ROOT SECONDS SEED OUT",
          file=sys.stderr)
    sys.exit(2)
