"""Crash consistency: `kill -9` of the daemon at random moments under a writer that fsyncs.

A writer runs as its own process on the real mount (`python -m benchmarks.reliability
writer ROOT JOURNAL SEED`): it creates files (in one or several writes), appends,
overwrites, edits a large file in place, truncates, replaces files by write-fsync-rename,
moves and removes them. Before each change it appends an *intent* to a journal on the
host (outside the mount): every path the change touches and the BLAKE3 digest of the
content it will have (or null: absent). After the change is fsynced (the file, and the
directory for a new, moved or removed name) it appends a *synced* record naming the
intent and fsyncs the journal. Some changes are left unsynced on purpose.

After each kill the store must pass `annofs fsck` (offline), mount again, and every path
must hold one of these states, in journal order per path: the state of the last synced
intent touching it (or the verified state the cycle started from), or a state a later
intent gave it. So nothing fsynced is lost, nothing is torn: annofs makes a version at
close/fsync only, so a half-done write of several `write()` calls is never seen (stricter
than POSIX, which allows any prefix of unsynced data), and no name appears that the
writer never made.

Every other cycle is also a simulated machine crash: the saved state of the daemon's
last sync is marked as from an earlier boot, so the next open takes the store back to
that sync (annofs/store/env.py), dropping whatever was committed but never synced; the
same check applies (what was journalled as fsynced was synced by the fsync).

`CrashLoop` is the driver, shared by tests/t4_reliability_crash.py (8 cycles; 50 with
ANNOFS_FULL=1) and the figure `crash` here (50 cycles, or ANNOFS_CRASH_CYCLES).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from annofs.store.env import read_synced_meta, write_synced_meta
from benchmarks.registry import Context, FigureResult, Row, figure

REPO = Path(__file__).resolve().parents[1]
EMPTY = blake3.blake3(b"").hexdigest()
BIG = "big"  # the large file the writer edits in place
BIG_SIZE = 6 << 20
SUBDIR = "sub"
MAX_FILES = 40
# What a killed daemon's mount answers; anything else the writer sees is a failure.
DEAD_MOUNT = {errno.ENOTCONN, errno.ECONNABORTED}


def digest(data: bytes | None) -> str | None:
    """The journal's name for a state: BLAKE3 hex of the content, None for absent."""
    return None if data is None else blake3.blake3(data).hexdigest()


# -- the writer (a separate process) -----------------------------------------------------


class Writer:
    """Changes files under `root` and journals what it intends and what it fsynced.

    Files are tracked by inode (hard links share one), so a change made through one name
    is journalled for every name of the file.
    """

    def __init__(self, root: Path, journal: Path, rnd: random.Random, tag: str) -> None:
        self.root = root
        self.rnd = rnd
        self.tag = tag
        self.n = 0
        self.seq = 0
        self.jfd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        # What the files hold now, as far as this process knows (it is the only writer).
        self.ino: dict[str, int] = {}  # name -> inode
        self.data: dict[int, bytes] = {}  # inode -> content
        dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.sub = dirs[0] if dirs else SUBDIR  # renamed from time to time
        for p in sorted(root.rglob("*")):
            if p.is_file():
                st = p.lstat()
                self.ino[str(p.relative_to(root))] = st.st_ino
                self.data.setdefault(st.st_ino, p.read_bytes())

    def content(self, name: str) -> bytes:
        return self.data[self.ino[name]]

    def names(self, name: str) -> list[str]:
        """Every name of the file `name` is one of (hard links)."""
        return [n for n, i in self.ino.items() if i == self.ino[name]]

    def _journal(self, rec: dict, sync: bool) -> None:
        # One write(2) per record: the journal survives the death of any process; the
        # fsync is for the synced records, as an application would do it.
        os.write(self.jfd, (json.dumps(rec) + "\n").encode())
        if sync:
            os.fsync(self.jfd)

    def intent(self, states: dict[str, bytes | None]) -> int:
        """Record the states a change is about to give these paths; its sequence number."""
        self.seq += 1
        self._journal({"seq": self.seq, "intent": {p: digest(d) for p, d in states.items()}},
                      sync=False)
        return self.seq

    def intent_content(self, name: str, data: bytes) -> int:
        """A content change of the file `name`: every one of its names shows it."""
        return self.intent(dict.fromkeys(self.names(name), data))

    def synced(self, seq: int) -> None:
        """Record that intent `seq` is fsynced (every path it touched)."""
        self._journal({"synced": seq}, sync=True)

    def _fsync_dir(self, rel: str) -> None:
        d = os.path.dirname(rel)
        fd = os.open(self.root / d if d else self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _name(self) -> str:
        self.n += 1
        name = f"{self.tag}-{self.n}"
        return f"{self.sub}/{name}" if self.rnd.random() < 0.3 else name

    def _data(self, size: int) -> bytes:
        return self.rnd.randbytes(size)

    def _write_all(self, fd: int, data: bytes, pieces: int, at: int | None = None) -> None:
        cuts = sorted(self.rnd.randrange(len(data) + 1) for _ in range(pieces - 1))
        pos = 0
        for end in [*cuts, len(data)]:
            if at is None:
                os.write(fd, data[pos:end])
            else:
                os.pwrite(fd, data[pos:end], at + pos)
            pos = end

    def _new_inode(self, name: str, data: bytes) -> None:
        key = min(self.data, default=0) - 1  # writer-local keys below any real inode
        self.ino[name] = key
        self.data[key] = data

    # -- the changes --

    def new_file(self, name: str, data: bytes, sync: bool) -> None:
        self.intent({name: b""})  # the name exists (empty) as soon as it is created
        fd = os.open(self.root / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            self._new_inode(name, b"")
            seq = self.intent({name: data})
            self._write_all(fd, data, self.rnd.randint(1, 4))
            self.data[self.ino[name]] = data
            if sync:
                os.fsync(fd)
                self._fsync_dir(name)
                self.synced(seq)
        finally:
            os.close(fd)

    def rewrite(self, name: str, new: bytes, flags: int, sync: bool,
                at: int | None = None, patch: bytes = b"") -> None:
        """Append (O_APPEND), replace (O_TRUNC) or patch in place (`at`) one file."""
        seq = self.intent_content(name, new)
        fd = os.open(self.root / name, os.O_WRONLY | flags)
        try:
            if at is not None:
                os.pwrite(fd, patch, at)
            else:
                self._write_all(fd, new if flags & os.O_TRUNC else patch,
                                self.rnd.randint(1, 3))
            self.data[self.ino[name]] = new
            if sync:
                os.fsync(fd)
                self.synced(seq)
        finally:
            os.close(fd)

    def truncate(self, name: str, size: int, sync: bool) -> None:
        old = self.content(name)
        new = old[:size] + bytes(max(0, size - len(old)))
        seq = self.intent_content(name, new)
        fd = os.open(self.root / name, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
            self.data[self.ino[name]] = new
            if sync:
                os.fsync(fd)
                self.synced(seq)
        finally:
            os.close(fd)

    def replace(self, target: str, data: bytes) -> None:
        """The atomic-replace idiom: write a temporary name, fsync, rename over, fsync dir."""
        tmp = f".tmp-{self.tag}-{self.n}"
        self.new_file(tmp, data, sync=True)
        seq = self.intent({tmp: None, target: data})
        os.rename(self.root / tmp, self.root / target)
        self.ino[target] = self.ino.pop(tmp)
        self._fsync_dir(target)
        self.synced(seq)

    def move(self, src: str, dst: str) -> None:
        seq = self.intent({src: None, dst: self.content(src)})
        os.rename(self.root / src, self.root / dst)
        self.ino[dst] = self.ino.pop(src)
        self._fsync_dir(src)
        self._fsync_dir(dst)
        self.synced(seq)

    def move_while_open(self, src: str, dst: str) -> None:
        """Write, rename the open file, write more, fsync: the bytes follow the file."""
        old = self.content(src)
        part1, part2 = self._data(self.rnd.randrange(1, 9000)), self._data(50)
        fd = os.open(self.root / src, os.O_WRONLY | os.O_APPEND)
        try:
            self.intent_content(src, old + part1)
            os.write(fd, part1)
            self.data[self.ino[src]] = old + part1
            # The rename may carry the content as of the last commit or with part1.
            self.intent({src: None, dst: old})
            self.intent({dst: old + part1})
            os.rename(self.root / src, self.root / dst)
            self.ino[dst] = self.ino.pop(src)
            seq = self.intent_content(dst, old + part1 + part2)
            os.write(fd, part2)
            self.data[self.ino[dst]] = old + part1 + part2
            os.fsync(fd)
            self._fsync_dir(src)
            self._fsync_dir(dst)
            self.synced(seq)
        finally:
            os.close(fd)

    def link(self, src: str, dst: str) -> None:
        seq = self.intent({dst: self.content(src)})
        os.link(self.root / src, self.root / dst)
        self.ino[dst] = self.ino[src]
        self._fsync_dir(dst)
        self.synced(seq)

    def rename_dir(self) -> None:
        """Rename the subdirectory with everything in it."""
        new = f"d-{self.tag}-{self.n}"
        self.n += 1
        inside = [n for n in self.ino if n.startswith(self.sub + "/")]
        states: dict[str, bytes | None] = dict.fromkeys(inside)
        states.update({new + n[len(self.sub):]: self.content(n) for n in inside})
        seq = self.intent(states)
        os.rename(self.root / self.sub, self.root / new)
        for n in inside:
            self.ino[new + n[len(self.sub):]] = self.ino.pop(n)
        self.sub = new
        self._fsync_dir(new)
        self.synced(seq)

    def remove(self, name: str) -> None:
        seq = self.intent({name: None})
        os.unlink(self.root / name)
        key = self.ino.pop(name)
        if key not in self.ino.values():
            del self.data[key]
        self._fsync_dir(name)
        self.synced(seq)

    def step(self) -> None:
        """One random change."""
        rnd = self.rnd
        sync = rnd.random() < 0.75
        small = sorted(n for n in self.ino if n != BIG and not n.startswith(".tmp"))
        op = rnd.random()
        if BIG not in self.ino:
            self.new_file(BIG, self._data(BIG_SIZE), sync=True)
        elif op < 0.22 or not small:
            if len(small) >= MAX_FILES:
                self.remove(rnd.choice(small))
                return
            size = rnd.choice([0, 1, 100, 4_000, 70_000, 300_000])
            self.new_file(self._name(), self._data(size), sync)
        elif op < 0.36:
            name = rnd.choice(small)
            if len(self.content(name)) > 1_000_000:
                self.truncate(name, rnd.randrange(1000), sync)
                return
            patch = self._data(rnd.choice([1, 50, 9_000, 120_000]))
            self.rewrite(name, self.content(name) + patch, os.O_APPEND, sync, patch=patch)
        elif op < 0.48:
            name = rnd.choice(small)
            data = self._data(rnd.choice([0, 10, 5_000, 200_000]))
            self.rewrite(name, data, os.O_TRUNC, sync)
        elif op < 0.62:
            old = self.content(BIG)
            at = rnd.randrange(len(old) + 1)
            patch = self._data(rnd.choice([1, 17, 4096, 70_000]))
            new = old[:at] + patch + old[at + len(patch):]
            self.rewrite(BIG, new, 0, sync, at=at, patch=patch)
        elif op < 0.67:
            name = rnd.choice(small)
            self.truncate(name, rnd.randrange(2 * len(self.content(name)) + 10), sync)
        elif op < 0.77:
            target = rnd.choice(small) if rnd.random() < 0.7 else self._name()
            self.replace(target, self._data(rnd.choice([0, 300, 50_000])))
        elif op < 0.83:
            self.move(rnd.choice(small), self._name())
        elif op < 0.87:
            self.move_while_open(rnd.choice(small), self._name())
        elif op < 0.92:
            self.link(rnd.choice(small), self._name())
        elif op < 0.94:
            self.rename_dir()
        else:
            self.remove(rnd.choice(small))


def writer_main(root: Path, journal: Path, seed: int, tag: str) -> int:
    """Run changes until the mount dies under us (exit 0) or something is wrong (exit 1)."""
    w = Writer(root, journal, random.Random(seed), tag)
    try:
        while True:
            w.step()
    except OSError as e:
        if e.errno in DEAD_MOUNT:
            return 0
        traceback.print_exc()
        return 1


# -- checking what survived --------------------------------------------------------------


def observe(root: Path) -> dict[str, str]:
    """Every file under `root` and the digest of what reading it gives."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = blake3.blake3(p.read_bytes()).hexdigest()
        elif not p.is_dir():
            out[str(p.relative_to(root))] = "not a regular file"
    return out


@dataclass
class Verdict:
    """One cycle's check: what was wrong, and how much was checked."""

    problems: list[str] = field(default_factory=list)
    synced: int = 0  # synced intents in the journal
    paths: int = 0  # paths checked
    later: int = 0  # paths found in a state newer than their last synced one


def verify(base: dict[str, str], journal: Path, seen: dict[str, str]) -> Verdict:
    """Whether `seen` (after the crash) is allowed by `base` (the verified state before
    the cycle) and the journal of the cycle (see the module docstring)."""
    v = Verdict()
    # per path: the states in order; index 0 is the base, which is durable
    history: dict[str, list[str | None]] = {p: [d] for p, d in base.items()}
    last_synced: dict[str, int] = dict.fromkeys(base, 0)
    where: dict[int, dict[str, int]] = {}  # intent seq -> path -> index in history
    for line in journal.read_text().splitlines():
        rec = json.loads(line)
        if "intent" in rec:
            where[rec["seq"]] = {}
            for p, d in rec["intent"].items():
                h = history.setdefault(p, [None])
                last_synced.setdefault(p, 0)
                where[rec["seq"]][p] = len(h)
                h.append(d)
        else:
            v.synced += 1
            for p, i in where[rec["synced"]].items():
                last_synced[p] = max(last_synced[p], i)
    for p in sorted(history.keys() | seen.keys()):
        v.paths += 1
        got = seen.get(p)
        if p not in history:
            v.problems.append(f"{p}: present ({got}) but the writer never made it")
            continue
        states, k = history[p], last_synced[p]
        if got in states[k:]:
            v.later += got != states[k]
            continue
        shown = ", ".join("absent" if s is None else s[:16] for s in states[k:])
        if got is None:
            v.problems.append(f"{p}: lost: absent after the crash (allowed: {shown})")
        elif got in states[:k]:
            v.problems.append(f"{p}: content {got[:16]} is older than what was fsynced "
                              f"(allowed: {shown})")
        else:
            v.problems.append(f"{p}: content {got[:16]} was never written: torn or foreign "
                              f"(allowed: {shown})")
    return v


# -- the driver ---------------------------------------------------------------------------


@dataclass
class CrashReport:
    """What a run of crash cycles found."""

    seed: int
    cycles: int = 0
    survived: int = 0
    synced: int = 0
    later: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class CrashLoop:
    """Drives cycles of: mount, writer, kill -9 at a random moment, fsck, remount, verify.

    `start()` mounts the store at `mountpoint` and returns once it is a mount; `pid()`
    is the daemon's pid; `reap()` waits for the killed daemon and lazily unmounts what it
    left (conftest's Mount.kill, FuseDaemon.kill). `annofs` runs the command line.
    """

    store: Path
    mountpoint: Path
    work: Path
    start: Callable[[], None]
    pid: Callable[[], int]
    reap: Callable[[], None]
    annofs: Callable[..., subprocess.CompletedProcess]
    seed: int
    log: Callable[[str], None] = print
    kill_after: tuple[float, float] = (0.3, 2.0)
    # Every Nth cycle (N > 0) is a simulated machine crash: the store comes back at the
    # daemon's last sync (annofs/store/env.py), not at its last commit.
    power_loss_every: int = 2
    base: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.mountpoint / "w"

    def run(self, cycles: int) -> CrashReport:
        """`cycles` kills; the store is mounted when it returns (unless a cycle failed)."""
        rep = CrashReport(self.seed)
        rnd = random.Random(self.seed)
        self.log(f"crash loop: seed {self.seed} (ANNOFS_CRASH_SEED={self.seed} repeats it)")
        (self.root / SUBDIR).mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(fd)
        os.close(fd)
        self.base = observe(self.root)
        for cycle in range(cycles):
            problems, verdict = self.cycle(cycle, rnd)
            rep.cycles += 1
            if verdict is not None:
                rep.synced += verdict.synced
                rep.later += verdict.later
            if problems:
                rep.problems += [f"cycle {cycle} (seed {self.seed}): {p}" for p in problems]
                break
            rep.survived += 1
        return rep

    def cycle(self, cycle: int, rnd: random.Random) -> tuple[list[str], Verdict | None]:
        journal = self.work / f"journal-{cycle}.jsonl"
        journal.unlink(missing_ok=True)
        wseed = rnd.randrange(1 << 32)
        writer = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.reliability", "writer", str(self.root),
             str(journal), str(wseed), f"c{cycle}"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rnd.uniform(*self.kill_after))
        os.kill(self.pid(), signal.SIGKILL)
        try:
            _, err = writer.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            writer.kill()
            _, err = writer.communicate()
            self.reap()
            return [f"the writer hung after the daemon was killed: {err.decode()[-2000:]}"], None
        self.reap()
        if writer.returncode != 0:
            return [f"writer (seed {wseed}) failed before the kill:\n{err.decode()[-3000:]}"], None
        power = self.power_loss_every and cycle % self.power_loss_every == 1
        if power:
            # As if the machine had stopped too: the next open takes the store back to
            # the daemon's last sync; everything journalled as fsynced must be there.
            rec = read_synced_meta(self.store)
            assert rec is not None, "the daemon never synced"
            write_synced_meta(self.store, dataclasses.replace(rec, boot="a boot before"))
        fsck = self.annofs("--store", str(self.store), "fsck")
        if fsck.returncode != 0:
            return [f"annofs fsck after the kill:\n{fsck.stdout}{fsck.stderr}"], None
        self.start()
        seen = observe(self.root)
        verdict = verify(self.base, journal, seen)
        self.base = seen
        self.log(f"cycle {cycle}{' (power loss)' if power else ''}: {verdict.synced} synced "
                 f"changes, {verdict.paths} paths, {verdict.later} newer than synced, "
                 f"{len(verdict.problems)} problem(s)")
        return verdict.problems, verdict


# -- the figure ---------------------------------------------------------------------------


@figure("crash", "kill -9 of the daemon under a fsyncing writer: cycles survived")
def crash(ctx: Context) -> FigureResult:
    """ANNOFS_CRASH_CYCLES (default 50, 5 with --quick) kills; every one must be survived."""
    from benchmarks.mount import code, code_revision, daemon, new_store

    cycles = int(os.environ.get("ANNOFS_CRASH_CYCLES", "5" if ctx.quick else "50"))
    seed = int(os.environ.get("ANNOFS_CRASH_SEED", "1"))
    store = new_store(ctx.work / "crash-store")
    d = daemon(ctx, store, "mnt-crash")
    cwd = code(ctx.work).cwd

    def annofs(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "annofs.cli.main", *args],
                              capture_output=True, text=True, check=False, cwd=cwd)

    journals = ctx.work / "crash-journals"
    journals.mkdir()
    loop = CrashLoop(store, d.mountpoint, journals, d.start, lambda: d.pid, d.kill, annofs,
                     seed, ctx.log)
    d.start()
    try:
        rep = loop.run(cycles)
        d.stop()
    finally:
        d.kill()  # only if something failed: stop() already unmounted
    fsck = annofs("--store", str(store), "fsck")
    rows = [
        Row("kill -9 cycles survived (fsynced data intact, fsck clean, mounts again)",
            f"{rep.survived} of {rep.cycles}", f"{cycles} cycles", rep.survived / cycles,
            ">= 1.00"),
        Row("fsynced changes checked after the kills", f"{rep.synced}", "", None),
        Row("final annofs fsck", "clean" if fsck.returncode == 0 else "FAILED", "",
            1.0 if fsck.returncode == 0 else 0.0, ">= 1.00"),
    ]
    notes = (
        f"{cycles} cycles (seed {seed}; ANNOFS_CRASH_SEED, ANNOFS_CRASH_CYCLES): a writer "
        "process creates (in 1-4 writes), appends, overwrites, edits a 6 MiB file in place, "
        "truncates, replaces by write-fsync-rename, moves and removes files on the mount, "
        "journalling on the host what it is about to do and, after the fsync (of the file, "
        "and of the directory for a name change), what is durable. The daemon is killed "
        "with SIGKILL 0.3-2 s into the cycle (every other cycle also as a machine crash: "
        "the store is taken back to the daemon's last sync, as after a reboot); `annofs "
        "fsck` must pass offline; after a "
        "remount every path must hold the state of its last fsynced change or of a later "
        f"one (never older, never torn, never unknown). {rep.later} paths were seen newer "
        "than their last fsync (unsynced changes that had been committed by a close). "
        "tests/t4_reliability_crash.py also kills `annofs import` and `annofs gc` (offline "
        f"and in the daemon). Code: {code_revision()}."
        + (f" Problems: {' / '.join(rep.problems[:3])}" if rep.problems else ""))
    return FigureResult(rows, notes)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "writer":
        sys.exit(writer_main(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]),
                             sys.argv[5]))
    print("usage: python -m benchmarks.reliability writer ROOT JOURNAL SEED TAG",
          file=sys.stderr)
    sys.exit(2)
