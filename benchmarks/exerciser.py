"""A random-operation exerciser: the same seeded operations on two directory trees, one
the filesystem under test and one the native disk (the oracle), compared op by op; and
figure `exerciser`, how many operations a real mount took without a mismatch.

tests/t4_fuse_exerciser.py runs it in CI (10k operations; ANNOFS_FULL=1: 100k).

Operations are plain data (`Op`), generated from a seed without looking at either tree,
so a failing sequence replays exactly and can be shrunk by dropping operations. Paths
come from a small pool of names (depth 1-3), so operations often meet what earlier ones
made: renames over existing files, links to directories, writes through symlinks.

Every operation's outcome (its result, or its errno) must be equal on both sides; every
`check_every` operations, and after every remount, the whole trees are compared: type,
mode, nlink, size, content, user xattrs, symlink targets. Not compared: inode numbers
(annofs may renumber an inode the kernel forgot), atime and ctime, directory sizes,
and mtimes other than those set explicitly (utime's outcome compares them exactly).

Open descriptors live in a few numbered slots, one descriptor per side: writes and reads
through them, and unlinks or renames of what they hold, test open-file semantics.
Before a remount every slot is closed (a remount ends the daemon's handles).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import random
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from benchmarks.registry import Context, FigureResult, Row, figure

DIRS = ("a", "b", "c")
LEAVES = ("f", "g", "h", "i")
XATTR_NAMES = ("user.x", "user.y", "user.long.name.z")
SLOTS = 4
# Far offsets for writes and truncates (sparse files, holes of up to 15 TiB: ext4's limit,
# the oracle's, is 16 TiB). A file past BIG_FILE is compared by windows, not read whole.
FAR = (1 << 30, 1 << 40, 15 << 40)
BIG_FILE = 8 << 20
_WINDOW = 1 << 20
# Shared bytes that slices are cut from, so files share fragments (dedup, refcounts).
_POOL = random.Random(1234).randbytes(1 << 20)


@dataclass(frozen=True)
class Op:
    """One operation: its kind and arguments (paths relative to the tree's root)."""

    kind: str
    args: tuple[Any, ...]

    def __str__(self) -> str:
        shown = [f"<{len(a)} bytes>" if isinstance(a, bytes) and len(a) > 24 else repr(a)
                 for a in self.args]
        return f"{self.kind}({', '.join(shown)})"


def data_of(spec: tuple[int, int, int]) -> bytes:
    """Bytes from a compact spec (kind, seed, length): random, or a slice of the pool."""
    kind, seed, n = spec
    if kind == 0:
        return random.Random(seed).randbytes(n)
    start = seed % (len(_POOL) - n) if n < len(_POOL) else 0
    return _POOL[start:start + n]


class Generator:
    """Seeded operations, independent of the trees' state."""

    # kind -> weight
    WEIGHTS: ClassVar[dict[str, int]] = {
        "create": 8, "create_excl": 2, "write": 10, "append": 4, "truncate": 4,
        "rename": 8, "unlink": 5, "mkdir": 4, "rmdir": 2, "symlink": 3, "link": 4,
        "chmod": 2, "utime": 2, "setxattr": 3, "removexattr": 2, "read": 8,
        "readdir": 4, "stat": 4, "readlink": 1, "fsync": 2, "open": 5, "close": 4,
        "fd_write": 5, "fd_read": 4, "fd_stat": 2, "fd_truncate": 1, "fd_fsync": 1,
        "exchange": 2, "noreplace": 1, "chown": 1, "fd_fallocate": 2,
    }

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.opened: set[int] = set()
        self.made: list[str] = []
        self.kinds = list(self.WEIGHTS)
        self.weights = list(self.WEIGHTS.values())

    def path(self) -> str:
        depth = self.rng.choices((0, 1, 2), (4, 4, 2))[0]
        # Now and then a leaf takes a directory's name: files meet directories.
        leaf = self.rng.choice(DIRS if self.rng.random() < 0.1 else LEAVES)
        return "/".join([*(self.rng.choice(DIRS) for _ in range(depth)), leaf])

    def some_file(self) -> str:
        """Mostly a path this generator created before (it may be gone by now)."""
        if self.made and self.rng.random() < 0.75:
            return self.rng.choice(self.made)
        return self.path()

    def new_file(self) -> str:
        p = self.path()
        self.made.append(p)
        if len(self.made) > 24:
            self.made.pop(0)
        return p

    def dir_path(self) -> str:
        depth = self.rng.choices((1, 2, 3), (4, 4, 2))[0]
        return "/".join(self.rng.choice(DIRS) for _ in range(depth))

    def slot(self, opening: bool = False) -> int:
        """A slot; operations on descriptors mostly pick one opened since its last close."""
        if opening or not self.opened or self.rng.random() < 0.05:
            s = self.rng.randrange(SLOTS)
        else:
            s = self.rng.choice(sorted(self.opened))
        if opening:
            self.opened.add(s)
        return s

    def size(self) -> int:
        r = self.rng.random()
        if r < 0.1:
            return 0
        if r < 0.7:
            return self.rng.randrange(1, 5000)
        if r < 0.95:
            return self.rng.randrange(5000, 70_000)
        return self.rng.randrange(70_000, 400_000)

    def data(self) -> tuple[int, int, int]:
        return (self.rng.randrange(2), self.rng.randrange(1 << 30), self.size())

    def offset(self) -> int:
        r = self.rng.random()
        if r < 0.5:
            return self.rng.randrange(0, 8192)
        if r < 0.9:
            return self.rng.randrange(0, 200_000)
        if r < 0.97:
            return self.rng.randrange(200_000, 3_000_000)  # far past the end: a hole
        # A huge hole (a GiB to 15 TiB): must cost nothing, and read as zeros.
        return self.rng.choice(FAR) + self.rng.randrange(0, 100_000)

    def op(self) -> Op:
        kind = self.rng.choices(self.kinds, self.weights)[0]
        r = self.rng
        if kind in ("create", "create_excl"):
            return Op(kind, (self.new_file(), self.data()))
        if kind == "append":
            return Op(kind, (self.some_file(), self.data()))
        if kind == "write":
            return Op(kind, (self.some_file(), self.offset(), self.data()))
        if kind == "truncate":
            return Op(kind, (self.some_file(), self.offset()))
        if kind in ("rename", "link", "exchange", "noreplace"):
            src = self.dir_path() if kind != "link" and r.random() < 0.2 else self.some_file()
            dst = r.choice([self.new_file(), self.some_file(), self.dir_path()])
            return Op(kind, (src, dst))
        if kind == "symlink":
            # Relative targets without "..": resolving one never leaves the tree.
            target = r.choice([self.path(), r.choice(LEAVES), "missing", "a/missing"])
            return Op(kind, (target, self.new_file()))
        if kind == "chmod":
            return Op(kind, (self.some_file(), r.choice([0o644, 0o600, 0o755, 0o000, 0o4755,
                                                    0o2775, 0o1777, r.randrange(0o7777)])))
        if kind == "chown":
            ids = (0, 65534, 1234, -1)
            return Op(kind, (self.some_file(), r.choice(ids), r.choice(ids)))
        if kind == "utime":
            return Op(kind, (self.some_file(), r.randrange(0, 2**33) * 10**9 + r.randrange(10**9)))
        if kind == "setxattr":
            return Op(kind, (self.some_file(), r.choice(XATTR_NAMES),
                             r.randbytes(r.choice([0, 1, 17, 200]))))
        if kind == "removexattr":
            return Op(kind, (self.some_file(), r.choice(XATTR_NAMES)))
        if kind == "open":
            return Op(kind, (self.slot(opening=True), self.some_file(),
                             r.choice(["r", "rw", "rw", "rwc", "append", "trunc"])))
        if kind == "close":
            s = self.slot()
            self.opened.discard(s)
            return Op(kind, (s,))
        if kind in ("fd_read", "fd_stat", "fd_fsync"):
            return Op(kind, (self.slot(),))
        if kind == "fd_write":
            return Op(kind, (self.slot(), self.offset(), self.data()))
        if kind == "fd_truncate":
            return Op(kind, (self.slot(), self.offset()))
        if kind == "fd_fallocate":
            return Op(kind, (self.slot(), r.choice(FALLOC_MODES), self.offset(),
                             r.randrange(1, 300_000)))
        if kind in ("mkdir", "rmdir", "readdir"):
            return Op(kind, (self.dir_path() if r.random() < 0.8 else self.path(),))
        return Op(kind, (self.some_file(),))  # unlink, read, stat, readlink, fsync

    def ops(self, n: int) -> list[Op]:
        return [self.op() for _ in range(n)]


Outcome = tuple[str, Any]

_OPEN_FLAGS = {"r": os.O_RDONLY, "rw": os.O_RDWR, "rwc": os.O_RDWR | os.O_CREAT,
               "append": os.O_WRONLY | os.O_APPEND, "trunc": os.O_RDWR | os.O_TRUNC}
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
# mode 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE, ZERO_RANGE|KEEP_SIZE, and PUNCH_HOLE
# alone (EOPNOTSUPP everywhere): the modes annofs does, as ext4 does them.
FALLOC_MODES = (0, 0x01, 0x03, 0x10, 0x11, 0x02)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); OSError with the kernel's errno."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def renameat2(old: str, new: str, flags: int) -> None:
    """rename(2) with flags; OSError with the kernel's errno."""
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old, None, new)


def content_view(fd: int) -> Any:
    """A file's content as compared: its bytes, or for a big (sparse) file its size and
    the hashes of windows where the generator writes (the start, each FAR offset, the
    end): reading a 15 TiB file whole is no test of anything but patience."""
    size = os.fstat(fd).st_size
    if size <= BIG_FILE:
        return os.pread(fd, size + 10, 0)
    starts = sorted({0, *(b for b in FAR if b < size), max(0, size - _WINDOW)})
    return ("big", size, tuple(
        (s, hashlib.sha256(os.pread(fd, 2 * _WINDOW if s else _WINDOW, s)).hexdigest())
        for s in starts))


def _stat_view(st: os.stat_result) -> tuple[Any, ...]:
    """What is compared of a stat: no inode number, no times but mtime for non-dirs."""
    size = None if stat.S_ISDIR(st.st_mode) else st.st_size
    return (stat.filemode(st.st_mode), st.st_mode, st.st_nlink, size, st.st_uid, st.st_gid)


class Side:
    """One tree the operations run on, and its open descriptors."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fds: list[int | None] = [None] * SLOTS

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def close_all(self) -> None:
        for i, fd in enumerate(self.fds):
            if fd is not None:
                os.close(fd)
                self.fds[i] = None

    def _fd(self, slot: int) -> int:
        fd = self.fds[slot]
        if fd is None:
            raise _NoSlot
        return fd

    def apply(self, op: Op) -> Outcome:
        """Run one operation; ("ok", result) or ("errno", name)."""
        try:
            return ("ok", self._run(op))
        except _NoSlot:
            return ("skip", None)
        except OSError as e:
            return ("errno", errno.errorcode.get(e.errno, str(e.errno)))

    def _write_file(self, rel: str, flags: int, data: bytes, off: int | None = None) -> int:
        fd = os.open(self.p(rel), flags, 0o644)
        try:
            n = os.pwrite(fd, data, off) if off is not None else os.write(fd, data)
        finally:
            os.close(fd)
        return n

    def _run(self, op: Op) -> Any:
        k, a = op.kind, op.args
        if k == "create":
            return self._write_file(a[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, data_of(a[1]))
        if k == "create_excl":
            return self._write_file(a[0], os.O_WRONLY | os.O_CREAT | os.O_EXCL, data_of(a[1]))
        if k == "append":
            return self._write_file(a[0], os.O_WRONLY | os.O_APPEND, data_of(a[1]))
        if k == "write":
            return self._write_file(a[0], os.O_WRONLY, data_of(a[2]), a[1])
        if k == "truncate":
            os.truncate(self.p(a[0]), a[1])
            return os.stat(self.p(a[0])).st_size
        if k == "rename":
            os.rename(self.p(a[0]), self.p(a[1]))
            return None
        if k in ("exchange", "noreplace"):
            renameat2(self.p(a[0]), self.p(a[1]),
                      RENAME_EXCHANGE if k == "exchange" else RENAME_NOREPLACE)
            return None
        if k == "link":
            os.link(self.p(a[0]), self.p(a[1]), follow_symlinks=False)
            return os.lstat(self.p(a[1])).st_nlink
        if k == "symlink":
            os.symlink(a[0], self.p(a[1]))
            return None
        if k == "unlink":
            os.unlink(self.p(a[0]))
            return None
        if k == "mkdir":
            os.mkdir(self.p(a[0]), 0o755)
            return _stat_view(os.lstat(self.p(a[0])))
        if k == "rmdir":
            os.rmdir(self.p(a[0]))
            return None
        if k == "chmod":
            os.chmod(self.p(a[0]), a[1])
            return _stat_view(os.stat(self.p(a[0])))
        if k == "chown":
            os.chown(self.p(a[0]), a[1], a[2], follow_symlinks=False)
            return _stat_view(os.lstat(self.p(a[0])))
        if k == "utime":
            os.utime(self.p(a[0]), ns=(a[1], a[1]), follow_symlinks=False)
            return os.lstat(self.p(a[0])).st_mtime_ns
        if k == "setxattr":
            os.setxattr(self.p(a[0]), a[1], a[2])
            return os.getxattr(self.p(a[0]), a[1])
        if k == "removexattr":
            os.removexattr(self.p(a[0]), a[1])
            return sorted(os.listxattr(self.p(a[0])))
        if k == "read":
            with open(self.p(a[0]), "rb") as f:
                return content_view(f.fileno())
        if k == "readdir":
            return sorted(os.listdir(self.p(a[0])))
        if k == "stat":
            return _stat_view(os.lstat(self.p(a[0])))
        if k == "readlink":
            return os.readlink(self.p(a[0]))
        if k == "fsync":
            fd = os.open(self.p(a[0]), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return None
        if k == "open":
            slot, rel, mode = a
            fd = os.open(self.p(rel), _OPEN_FLAGS[mode], 0o644)
            if self.fds[slot] is not None:
                os.close(self.fds[slot])
            self.fds[slot] = fd
            return None
        if k == "close":
            fd = self._fd(a[0])
            self.fds[a[0]] = None
            os.close(fd)
            return None
        if k == "fd_write":
            return os.pwrite(self._fd(a[0]), data_of(a[2]), a[1])
        if k == "fd_read":
            return content_view(self._fd(a[0]))
        if k == "fd_stat":
            return _stat_view(os.fstat(self._fd(a[0])))
        if k == "fd_truncate":
            os.ftruncate(self._fd(a[0]), a[1])
            return os.fstat(self._fd(a[0])).st_size
        if k == "fd_fsync":
            os.fsync(self._fd(a[0]))
            return None
        if k == "fd_fallocate":
            fallocate(self._fd(a[0]), a[1], a[2], a[3])
            return os.fstat(self._fd(a[0])).st_size
        raise ValueError(f"unknown operation {k}")


class _NoSlot(Exception):
    """The slot an fd operation names holds no descriptor: the op is skipped."""


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
        return {n: os.getxattr(path, n, follow_symlinks=False)
                for n in sorted(names) if n.startswith("user.")}
    except OSError as e:
        return {"<xattrs>": errno.errorcode[e.errno].encode()}


def tree_view(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything compared of a tree, by relative path."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            try:
                st = os.lstat(full)
            except OSError as e:  # a directory without search permission
                out[rel] = (errno.errorcode.get(e.errno, str(e.errno)),)
                continue
            if stat.S_ISLNK(st.st_mode):
                body: Any = os.readlink(full)
                xattrs: dict[str, bytes] = {}  # user xattrs on symlinks: EPERM everywhere
            elif stat.S_ISREG(st.st_mode):
                try:
                    with open(full, "rb") as f:
                        body = content_view(f.fileno())
                except OSError as e:  # e.g. mode 000, for an ordinary user
                    body = errno.errorcode.get(e.errno, str(e.errno))
                xattrs = _xattrs(full)
            else:
                body, xattrs = None, _xattrs(full)
            out[rel] = (*_stat_view(st), body, xattrs)
    return out


def diff_trees(a: dict[str, tuple[Any, ...]], b: dict[str, tuple[Any, ...]]) -> list[str]:
    """Human-readable differences between two tree views (a: under test, b: oracle)."""
    lines = []
    for rel in sorted(set(a) | set(b)):
        if rel not in a:
            lines.append(f"{rel}: missing under test")
        elif rel not in b:
            lines.append(f"{rel}: only under test")
        elif len(a[rel]) != len(b[rel]):
            lines.append(f"{rel}: {a[rel][:2]} under test, {b[rel][:2]} on disk")
        elif a[rel] != b[rel]:
            fields = ("filemode", "mode", "nlink", "size", "uid", "gid", "body", "xattrs")
            for name, x, y in zip(fields, a[rel], b[rel], strict=True):
                if x != y:
                    if isinstance(x, bytes) and isinstance(y, bytes):
                        at = next((i for i, (p, q) in enumerate(zip(x, y, strict=False))
                                   if p != q), min(len(x), len(y)))
                        x, y = f"{len(x)} bytes", f"{len(y)} bytes, first difference at {at}"
                    lines.append(f"{rel}: {name} {x!r} under test, {y!r} on disk")
    return lines


class Mismatch(AssertionError):
    """The filesystem under test disagreed with the oracle."""

    def __init__(self, seed: int | None, index: int, op: Op | None, detail: str) -> None:
        self.seed, self.index, self.op, self.detail = seed, index, op, detail
        where = f"seed {seed}, " if seed is not None else ""
        super().__init__(f"{where}op #{index} {op}: {detail}")


@dataclass
class Run:
    """Counts of one run."""

    ops: int = 0
    skipped: int = 0
    errors: int = 0  # operations that failed the same way on both sides
    tree_checks: int = 0
    remounts: int = 0
    seconds: float = 0.0
    kinds: dict[str, int] = field(default_factory=dict)
    errnos: dict[str, int] = field(default_factory=dict)  # how the shared failures failed


class Exerciser:
    """Applies operations to a tree under test and an oracle tree, comparing as it goes.

    `remount(closed)` is called every `remount_every` operations (if given) after every
    descriptor is closed; it must make the tree under test reappear at the same path.
    """

    def __init__(self, test_root: Path, oracle_root: Path, *, seed: int | None = None,
                 check_every: int = 250, remount_every: int = 0,
                 remount: Callable[[], None] | None = None) -> None:
        self.test = Side(test_root)
        self.oracle = Side(oracle_root)
        self.seed = seed
        self.check_every = check_every
        self.remount_every = remount_every
        self.remount = remount
        self.run_stats = Run()

    def check_trees(self, index: int, op: Op | None = None) -> None:
        self.run_stats.tree_checks += 1
        lines = diff_trees(tree_view(self.test.root), tree_view(self.oracle.root))
        if lines:
            raise Mismatch(self.seed, index, op, "trees differ:\n  " + "\n  ".join(lines[:20]))

    def step(self, index: int, op: Op) -> None:
        got = self.test.apply(op)
        want = self.oracle.apply(op)
        st = self.run_stats
        st.ops += 1
        st.kinds[op.kind] = st.kinds.get(op.kind, 0) + 1
        if want[0] == "skip":
            st.skipped += 1
        elif want[0] == "errno":
            st.errors += 1
            st.errnos[want[1]] = st.errnos.get(want[1], 0) + 1
        if got != want:
            def short(o: Outcome) -> str:
                v = o[1]
                if isinstance(v, bytes) and len(v) > 40:
                    return f"{o[0]}: {len(v)} bytes (blake2b {hashlib.blake2b(v).hexdigest()[:12]})"
                return f"{o[0]}: {v!r}"
            raise Mismatch(self.seed, index, op,
                           f"under test {short(got)}, on disk {short(want)}")

    def do_remount(self, index: int) -> None:
        assert self.remount is not None
        self.test.close_all()
        self.oracle.close_all()
        self.remount()
        self.run_stats.remounts += 1
        self.check_trees(index)

    def run(self, ops: Sequence[Op] | Iterable[Op]) -> Run:
        """Apply every operation; raises Mismatch at the first disagreement."""
        t0 = time.monotonic()
        i = -1
        try:
            for i, op in enumerate(ops):
                self.step(i, op)
                if self.check_every and (i + 1) % self.check_every == 0:
                    self.check_trees(i, op)
                if self.remount_every and self.remount and (i + 1) % self.remount_every == 0:
                    self.do_remount(i)
            self.test.close_all()
            self.oracle.close_all()
            self.check_trees(i)
        finally:
            self.test.close_all()
            self.oracle.close_all()
            self.run_stats.seconds = time.monotonic() - t0
        return self.run_stats


def shrink(ops: list[Op], fails: Callable[[list[Op]], bool], budget_s: float = 60.0) -> list[Op]:
    """A shorter sequence that still fails (delta debugging: drop chunks while it fails).

    `fails(ops)` replays a candidate on fresh trees. Stops when nothing more can be
    dropped or the time budget is spent.
    """
    deadline = time.monotonic() + budget_s
    chunk = max(1, len(ops) // 2)
    while chunk >= 1 and time.monotonic() < deadline:
        i, dropped = 0, False
        while i < len(ops) and time.monotonic() < deadline:
            candidate = ops[:i] + ops[i + chunk:]
            if candidate and fails(candidate):
                ops, dropped = candidate, True
            else:
                i += chunk
        if not dropped:
            chunk //= 2
    return ops


# -- figure ------------------------------------------------------------------------------


@figure("exerciser", "random operations on a real mount, compared with the native disk")
def exerciser_figure(ctx: Context) -> FigureResult:
    from benchmarks.mount import daemon, new_store
    ops_count = 5_000 if ctx.quick else 100_000
    seed = 1
    store = new_store(ctx.work / "exerciser-store")
    d = daemon(ctx, store, "exerciser-mnt")
    oracle = ctx.work / "exerciser-oracle"
    oracle.mkdir()
    d.start()
    try:
        (d.mountpoint / "x").mkdir()

        def remount() -> None:
            d.stop()
            d.start()

        ex = Exerciser(d.mountpoint / "x", oracle, seed=seed, remount_every=5000,
                       remount=remount)
        run = ex.run(Generator(seed).ops(ops_count))
        problems = d.log_problems()
    finally:
        d.stop()
    if problems:
        raise RuntimeError(f"the daemon logged: {problems[:3]}")
    ctx.log(f"exerciser: {run.ops} operations, {run.remounts} remounts, {run.seconds:.0f} s")
    rows = [Row("operations exercised, no mismatch",
                f"{run.ops} ops, {run.remounts} remounts, {run.tree_checks} tree checks",
                "", None),
            Row("exerciser throughput", f"{run.ops / run.seconds:.0f} ops/s "
                f"({run.errors} failed alike)", "", None)]
    notes = (f"benchmarks/exerciser.py, seed {seed}: {run.ops} seeded random operations "
             "(create, write at offsets incl. far past the end and at 1 GiB, 1 TiB and "
             "15 TiB, append, truncate incl. to those sizes, fallocate in every mode annofs "
             "does, rename "
             "incl. over existing names, across directories, RENAME_EXCHANGE and "
             "RENAME_NOREPLACE, unlink incl. open files, mkdir/rmdir, symlink, hard link, "
             "chmod, chown, utime, user xattrs, read, readdir, "
             "stat, fsync, and writes/reads/truncates through descriptors held open) on a "
             "real annofs mount and on the native disk, every outcome (result or errno) "
             "compared, the whole trees (mode, nlink, size, owner, content, xattrs, symlink "
             f"targets) compared every 250 operations and after each of {run.remounts} "
             "remounts. Not compared: inode numbers, atime/ctime, directory sizes. Any "
             "mismatch fails the figure. CI runs 10k operations as root and 3.3k as an "
             "ordinary user (tests/t4_fuse_exerciser.py); ANNOFS_FULL=1 runs 100k and 33k.")
    return FigureResult(rows, notes)
