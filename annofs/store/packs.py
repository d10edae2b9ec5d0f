"""Pack files: fragments' stored bytes, appended to files of tens of MiB under <store>/packs.

Each process that writes appends to a pack of its own (an exclusive `flock` on it says
whose it is; the kernel drops it however the process ends). A pack being written is
`open-<id>.pack`; once full it is *sealed*: fsynced, hashed (BLAKE3 of the whole file),
made read-only and renamed `<hash>.pack`, never to change again (so a later step can keep
sealed packs in an object store, with LMDB as the local index). The `packs` database
keeps, per pack id, its state, the end of its indexed bytes, its live bytes and its hash.

A record in a pack is a header (the fragment's hash, its codec, its stored length) and
the stored bytes; the index (content.fragments) points at the stored bytes. The header
makes a pack readable on its own (a check, a rebuild) without the index.

Crash safety. LMDB commits are not durable until `Store.sync()` (store.env), which first
fsyncs every unsealed pack, every pack sealed since the last synced state, and the
directory (`names_to_sync`, `fsync_packs`), so the state a machine crash comes back to
never points past bytes on the disk, nor names a file whose rename did not reach it.
Sealing does not fsync (that would make a writer wait for 32 MiB to reach the disk): the
next sync does, before the seal itself is durable. A writer killed mid-append leaves bytes
past its pack's recorded end; the next writer that takes the abandoned pack over cuts
them off (`PackWriter.adopt`). Every name change (create, seal) happens inside a write
transaction, so a process holding the writer lock sees files and records agree, except
for leftovers of a process killed between the two (`leftover_files`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import struct
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3
import lmdb

from annofs.errors import CorruptionError, StoreError

PACKS_DIR = "packs"
# A pack is sealed once it holds this much: large enough that a store of 100 GB has a few
# thousand files, small enough that compacting one is quick.
PACK_TARGET = 32 << 20

# A doomed pack was compacted: nothing points into it from the transaction that doomed it
# on (`since`); its file goes once no reader and no synced state is older
# (content.fragments.drop_doomed).
OPEN, SEALED, DOOMED = 0, 1, 2
# state, end, live bytes, hash (zeros until sealed), the transaction that sealed or doomed it
_REC = struct.Struct(">BQQ32sQ")
HEADER = struct.Struct(">32sBI")  # a record: fragment hash, codec, stored length
_ID = struct.Struct(">Q")  # the same key as every id-keyed database (store.keys.u64)

# The most buffers one pwritev takes (Linux's UIO_MAXIOV).
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

# Open file descriptors cached for reads; beyond this the least recently used are closed
# (a store of many packs must not run out of descriptors).
MAX_FDS = 256


def pack_key(pack: int) -> bytes:
    """The `packs` database key of a pack id."""
    return _ID.pack(pack)


@dataclass(frozen=True)
class PackRecord:
    """A pack as the index knows it."""

    id: int
    state: int
    end: int  # bytes [0, end) of the file are what the index may point into
    live: int  # bytes of records the index points at (headers included)
    hash: bytes  # BLAKE3 of the sealed file; zeros while open
    since: int = 0  # the transaction that sealed or doomed it

    @property
    def name(self) -> str:
        """The pack's file name in <store>/packs."""
        return open_name(self.id) if self.state == OPEN else f"{self.hash.hex()}.pack"

    def encode(self) -> bytes:
        return _REC.pack(self.state, self.end, self.live, self.hash, self.since)


_OPEN_NAME = re.compile(r"open-([0-9a-f]{8,16})\.pack")


def open_name(pack: int) -> str:
    """The file name of a pack being written."""
    return f"open-{pack:08x}.pack"


def decode_pack(key: bytes, raw: bytes) -> PackRecord:
    """A `packs` record; CorruptionError naming the pack if it does not decode."""
    pack = _ID.unpack(bytes(key))[0]
    if len(raw) != _REC.size:
        raise CorruptionError(f"pack {pack}: record of {len(raw)} bytes, not {_REC.size}")
    state, end, live, h, since = _REC.unpack(bytes(raw))
    if state not in (OPEN, SEALED, DOOMED):
        raise CorruptionError(f"pack {pack}: unknown state {state}")
    return PackRecord(pack, state, end, live, h, since)


def get_pack(txn: lmdb.Transaction, db: object, pack: int) -> PackRecord | None:
    """The record of a pack id, or None."""
    raw = txn.get(pack_key(pack), db=db)
    return decode_pack(pack_key(pack), raw) if raw is not None else None


def all_packs(txn: lmdb.Transaction, db: object) -> Iterator[PackRecord]:
    """Every pack record, by id."""
    with txn.cursor(db=db) as cur:
        for k, raw in cur:
            yield decode_pack(k, raw)


def packs_dir(store_path: Path) -> Path:
    """Where a store's packs are."""
    return Path(store_path) / PACKS_DIR


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a created or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def names_to_sync(txn: lmdb.Transaction, db: object, synced_txnid: int) -> list[str]:
    """File names of the packs whose bytes a sync of the state of `txn` must make durable:
    those being written, and those sealed after `synced_txnid` (the newest synced state:
    the sync that saved it covered the seals before it)."""
    return [rec.name for rec in all_packs(txn, db)
            if rec.state == OPEN or (rec.state == SEALED and rec.since > synced_txnid)]


def fsync_packs(store_path: Path, names: list[str]) -> None:
    """Fsync the named packs and the packs directory: Store.sync does it, with the unsealed
    packs of the state it is making durable, before LMDB's own flush (a sealed pack was
    fsynced when it was sealed)."""
    d = packs_dir(store_path)
    if not d.is_dir():
        return
    for name in names:
        try:
            fd = os.open(d / name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # sealed meanwhile (and fsynced then)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
    fsync_dir(d)


def leftover_files(store_path: Path, txn: lmdb.Transaction, db: object,
                   synced_txnid: int) -> list[Path]:
    """Files in the packs directory that no pack record names and that may go: a sealed
    copy whose seal never committed, a pack whose creation was interrupted, the old name
    of a sealed pack once its seal is durable (`synced_txnid`: the newest synced state;
    before that, a machine crash would come back to the record naming it). Only
    meaningful in a write transaction (no writer can be between a rename and its commit)."""
    d = packs_dir(store_path)
    if not d.is_dir():
        return []
    recs = {rec.id: rec for rec in all_packs(txn, db)}
    known = {rec.name for rec in recs.values()}
    out = []
    for p in d.iterdir():
        if p.name in known:
            continue
        m = _OPEN_NAME.fullmatch(p.name)
        rec = recs.get(int(m.group(1), 16)) if m else None
        if rec is not None and rec.since > synced_txnid:
            continue
        out.append(p)
    return sorted(out)


def oldest_reader(env: lmdb.Environment) -> int | None:
    """The oldest snapshot (transaction id) any process's read transaction holds, or None:
    LMDB's reader table, shared by every process that has the environment open."""
    oldest = None
    for line in env.readers().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 3 and fields[2].isdigit():
            txnid = int(fields[2])
            oldest = txnid if oldest is None else min(oldest, txnid)
    return oldest


def read_records(fd: int, end: int) -> Iterator[tuple[int, bytes, int, bytes]]:
    """(offset of the stored bytes, hash, codec, stored bytes) of each record of a pack up
    to `end`, from its headers alone; CorruptionError where a header does not fit."""
    pos = 0
    data = b""
    base = 0  # file offset of data[0]
    while pos < end:
        if pos + HEADER.size > base + len(data):
            data = os.pread(fd, max(8 << 20, HEADER.size), pos)
            base = pos
        if pos + HEADER.size > min(end, base + len(data)):
            raise CorruptionError(f"a record header at {pos} runs past the pack's end")
        h, codec, n = HEADER.unpack_from(data, pos - base)
        at = pos + HEADER.size
        if at + n > end:
            raise CorruptionError(f"a record at {pos} runs past the pack's end")
        if at + n > base + len(data):
            data = os.pread(fd, max(8 << 20, HEADER.size + n), pos)
            base = pos
        yield at, h, codec, data[at - base:at - base + n]
        pos = at + n


class _Fd:
    """A cached descriptor, closed only when evicted and no read is using it."""

    __slots__ = ("evicted", "fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.evicted = False


class NotCached(Exception):
    """Bytes asked for with `nowait` are not all in the page cache: reading them would
    wait for the disk."""


def _pread_cached(fd: int, length: int, offset: int) -> bytes | bytearray:
    """pread from the page cache only (RWF_NOWAIT): NotCached where it would block, and
    for a short read too (cached in part, past the end, or stopped at a cached page that
    marks where the kernel's next readahead starts, which RWF_NOWAIT does not start: a
    blocking read tells which; ~1 in 200 sequential 1 MiB reads of cached packs here).
    Where the filesystem cannot say (tmpfs answers EOPNOTSUPP; it is all memory anyway),
    a plain pread."""
    buf = bytearray(length)
    try:
        n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        raise NotCached from None
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        return os.pread(fd, length, offset)  # the caller checks the length
    if n != length:
        raise NotCached
    return buf


class PackFiles:
    """Reads of stored bytes: pread on a descriptor per pack, kept open (no open or mmap
    per read), safe from several threads."""

    def __init__(self, store_path: Path, env: lmdb.Environment, db: object) -> None:
        self._dir = packs_dir(store_path)
        self._env = env
        self._db = db
        self._fds: dict[int, _Fd] = {}  # insertion order is recency order
        self._lock = threading.Lock()

    def pread(self, txn: lmdb.Transaction, pack: int, offset: int, length: int, *,
              nowait: bool = False) -> bytes | bytearray:
        """`length` bytes at `offset` of a pack: CorruptionError if the pack is missing or
        shorter than the index says. With `nowait`, only from the page cache: NotCached
        if any of them would have to come from the disk (preadv2's RWF_NOWAIT)."""
        entry = self._acquire(txn, pack)
        try:
            data = (_pread_cached(entry.fd, length, offset) if nowait else
                    os.pread(entry.fd, length, offset))
        finally:
            self._release(entry)
        if len(data) != length:
            raise CorruptionError(f"pack {pack}: {length} bytes at {offset} are past its end")
        return data

    def _acquire(self, txn: lmdb.Transaction, pack: int) -> _Fd:
        with self._lock:
            entry = self._fds.get(pack)
            if entry is not None:
                entry.users += 1
                self._fds[pack] = self._fds.pop(pack)  # most recently used
                return entry
        fd = self._open(txn, pack)
        with self._lock:
            entry = self._fds.get(pack)
            if entry is None:
                entry = self._fds[pack] = _Fd(fd)
                while len(self._fds) > MAX_FDS:
                    old_pack = next(iter(self._fds))
                    self._evict(old_pack)
            else:
                os.close(fd)  # another thread opened it first
            entry.users += 1
            return entry

    def _release(self, entry: _Fd) -> None:
        with self._lock:
            entry.users -= 1
            if entry.evicted and entry.users == 0:
                os.close(entry.fd)

    def _evict(self, pack: int) -> None:
        entry = self._fds.pop(pack)
        entry.evicted = True
        if entry.users == 0:
            os.close(entry.fd)

    def forget(self, pack: int) -> None:
        """Close a pack's descriptor (it is being deleted)."""
        with self._lock:
            if pack in self._fds:
                self._evict(pack)

    def _open(self, txn: lmdb.Transaction, pack: int) -> int:
        # The caller's snapshot names the pack as it was; a writer may have sealed
        # (renamed) it since, so a missing file is looked up again in the newest state.
        rec = get_pack(txn, self._db, pack)
        for attempt in range(3):
            if rec is None:
                break
            try:
                fd = os.open(self._dir / rec.name, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                if attempt == 2:
                    break
            else:
                # A pack is mostly read front to back (a file's fragments were appended in
                # order): a larger readahead window for cold sequential reads.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                return fd
            with self._env.begin() as fresh:
                rec = get_pack(fresh, self._db, pack)
        raise CorruptionError(f"pack {pack}: " + (f"file {rec.name} missing" if rec
                                                  else "not in the store"))

    def close(self) -> None:
        """Close every cached descriptor."""
        with self._lock:
            for pack in list(self._fds):
                self._evict(pack)


class PackWriter:
    """This process's pack being written: appends, and seals it when full.

    Callers serialise appends (content.fragments holds a lock around append + commit).
    """

    def __init__(self, store_path: Path, db: object) -> None:
        self._dir = packs_dir(store_path)
        self._db = db
        self.rec: PackRecord | None = None
        self._fd: int | None = None
        # BLAKE3 of the pack's bytes [0, _hashed) as this writer appended them, so sealing
        # need not read the whole pack back; None when it does (an adopted pack, or an
        # append whose transaction never committed).
        self._hash: blake3.blake3 | None = None
        self._hashed = 0

    def ensure(self, txn: lmdb.Transaction, next_id: int) -> PackRecord:
        """The pack to append to (in a write transaction): ours, an abandoned one taken
        over, or a new one with id `next_id` (the caller allocated it)."""
        if self.rec is not None:
            return self.rec
        self._dir.mkdir(mode=0o700, exist_ok=True)
        for rec in all_packs(txn, self._db):
            if rec.state == OPEN and rec.end < PACK_TARGET and self._adopt(rec):
                return rec
        rec = PackRecord(next_id, OPEN, 0, 0, bytes(32))
        fd = os.open(self._dir / rec.name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        txn.put(pack_key(rec.id), rec.encode(), db=self._db)
        self.rec, self._fd = rec, fd
        self._hash, self._hashed = blake3.blake3(), 0
        return rec

    def _adopt(self, rec: PackRecord) -> bool:
        """Take over an open pack whose writer is gone: cut off bytes past its indexed end
        (an append its writer never committed)."""
        path = self._dir / rec.name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        except PermissionError:
            # Sealed (read-only) by a transaction a machine crash undid: open again.
            os.chmod(path, 0o600)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False  # a live writer's
            raise
        if os.fstat(fd).st_size > rec.end:
            os.ftruncate(fd, rec.end)
        self.rec, self._fd = rec, fd
        self._hash = None  # its first bytes are not ours: hashed from the file at the seal
        return True

    @property
    def needs_pack(self) -> bool:
        """Whether the next append must first get a pack (in a write transaction)."""
        return self.rec is None

    def append(self, parts: Sequence[bytes | memoryview]) -> int:
        """Write the parts, one after another, at the pack's end (not yet recorded);
        returns their offset. Written straight from the callers' buffers (pwritev: no
        joined copy), and hashed for the seal as they go."""
        assert self.rec is not None and self._fd is not None
        pos = self.rec.end
        views = [v for v in map(memoryview, parts) if v.nbytes]
        at, i = pos, 0
        while i < len(views):
            n = os.pwritev(self._fd, views[i:i + _IOV_MAX], at)
            at += n
            while n:  # skip what was written; a short write resumes mid-part
                if n >= views[i].nbytes:
                    n -= views[i].nbytes
                    i += 1
                else:
                    views[i] = views[i][n:]
                    n = 0
        if self._hash is not None and self._hashed == pos:
            for p in parts:
                self._hash.update(p)
            self._hashed = at
        else:
            self._hash = None  # bytes past a failed append were overwritten
        return pos

    def record(self, txn: lmdb.Transaction, end: int, live_delta: int) -> None:
        """Record the pack's new end and live bytes in the transaction that indexes them.
        Live bytes are read from the transaction: gc may have freed some meanwhile."""
        assert self.rec is not None
        cur = get_pack(txn, self._db, self.rec.id) or self.rec
        self.rec = PackRecord(self.rec.id, OPEN, end, cur.live + live_delta, bytes(32))
        txn.put(pack_key(self.rec.id), self.rec.encode(), db=self._db)

    @property
    def full(self) -> bool:
        """Whether the pack reached its target size (seal it)."""
        # Near the target: what is left would not hold an average record.
        return self.rec is not None and self.rec.end >= PACK_TARGET - (64 << 10)

    def seal(self, txn: lmdb.Transaction) -> PackRecord:
        """In a write transaction: make the pack durable and immutable under its hash."""
        assert self.rec is not None and self._fd is not None
        fd, rec = self._fd, self.rec
        cur = get_pack(txn, self._db, rec.id) or rec
        os.ftruncate(fd, rec.end)  # nothing past the indexed end belongs to it
        digest = self._hash.digest() if self._hash is not None and \
            self._hashed == rec.end else _hash_fd(fd, rec.end)
        sealed = PackRecord(rec.id, SEALED, rec.end, cur.live, digest, txn.id())
        old, new = self._dir / rec.name, self._dir / sealed.name
        os.fchmod(fd, 0o400)
        if new.exists():
            if any(r.name == sealed.name for r in all_packs(txn, self._db)):
                raise StoreError(f"{new}: another pack has the same bytes")
            os.unlink(new)  # a seal that never committed
        os.link(old, new)  # durable with the next sync, before the seal is
        txn.put(pack_key(rec.id), sealed.encode(), db=self._db)
        self.rec, self._fd, self._hash = None, None, None
        os.close(fd)
        return sealed

    def unlink_open_name(self, sealed: PackRecord) -> None:
        """Once the seal is durable (synced): drop the pack's old name. Not sooner: a
        machine crash comes back to the last synced state, whose record names it."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._dir / open_name(sealed.id))

    def close(self) -> None:
        """Let the pack go (another writer may take it over)."""
        if self._fd is not None:
            os.close(self._fd)
        self.rec, self._fd, self._hash = None, None, None


def _hash_fd(fd: int, size: int) -> bytes:
    h = blake3.blake3()
    pos = 0
    while pos < size:
        chunk = os.pread(fd, min(8 << 20, size - pos), pos)
        if not chunk:
            raise CorruptionError("a pack being sealed is shorter than its recorded end")
        h.update(chunk)
        pos += len(chunk)
    return h.digest()
