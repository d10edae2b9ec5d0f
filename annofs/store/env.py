"""One LMDB environment per store, its named databases, and the store's format marker.

Durability across a machine crash. Commits do not fsync (LMDB's MDB_NOSYNC: measured
150-250 us per synchronous commit here, against 6 us). LMDB's own warning applies: after
a power loss, any subset of the pages written since the last sync may be on disk, and a
meta page that reached the disk before the pages it points to leaves a tree that LMDB
cannot read (simulated: 20 crash images out of 20 were unreadable, some aborting the
process inside LMDB). So every sync also saves the two meta pages of the state it made
durable (`db/synced-meta`, with the boot id), and the process keeps a read transaction
on that state until its next sync, so LMDB never reuses (overwrites) its pages. Opening a
store after the machine rebooted (another boot id) with other meta pages on disk writes
the saved ones back: the store is exactly as it was at the last sync. A process that was
merely killed lost nothing: the page cache holds all it committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import lmdb

from annofs.errors import CorruptionError, StoreError
from annofs.store.keys import from_u64, u64
from annofs.store.packs import fsync_packs, names_to_sync

# 5: a fragment's refcount in its index record (no `fragrefs`);
# 4: fragments compressed in pack files, LMDB keeps their index (store.packs);
# 3: refcounts count edits (own_counts), fragment bytes as LMDB values; 2: raw values
FORMAT_VERSION = 5
# Formats `annofs upgrade` converts from (every other command refuses them).
UPGRADABLE = (3, 4)

# Virtual address space only: LMDB grows the file as it is used.
MAP_SIZE = 1 << 40

DB_NAMES = (
    "meta",  # format version, counters, root directory
    "fragments",  # format 3 only: blake3 -> the fragment's bytes (annofs upgrade empties it)
    "fragindex",  # blake3 -> pack, offset, lengths, codec, refcount (content.fragments)
    "packs",  # pack id -> state, end, live bytes, hash (store.packs)
    "fragrefs",  # format 4 only: blake3 -> refcount (annofs upgrade empties it)
    "versions",  # version id -> version record (edit-graph node)
    "dirs",  # dir id -> directory header (refcount, subdirectory count)
    "entries",  # dir id + name -> entry record
    "links",  # link id -> hard-linked file record
    "importcache",  # store path of an imported file -> host stat it was read at
    "statements",  # statement id (blake3 of PAE + sig) -> envelope fields + summary
    "signed_digests",  # content digest + statement id -> subject names (NUL-separated)
    "signed_fragments",  # fragment hash + signed content digest -> b""
    "version_digests",  # content digest + version id -> b"" (may be stale: check on use)
)

log = logging.getLogger("annofs.store")

# A process that writes makes its commits durable at least this often, in a background
# thread (the daemon has its own loop: it sets `Store.sync_interval = None`).
SYNC_INTERVAL = 1.0

# The id-keyed database each counter allocates keys of.
COUNTER_TABLES = {"version": "versions", "dir": "dirs", "link": "links", "pack": "packs"}


# Stores this process has open, by path: store.compact must not swap the file under one
# (LMDB's file locks keep other processes out, never this one).
_OPEN_HERE: Counter[Path] = Counter()
_OPEN_LOCK = threading.Lock()


def open_in_this_process(path: Path) -> bool:
    """Whether this process has a Store of `path` open."""
    with _OPEN_LOCK:
        return _OPEN_HERE[Path(path).resolve()] > 0


class Store:
    """An open store: the LMDB environment and handles to its named databases.

    Commits do not fsync (measured: 150-250 us per synchronous commit here, against
    6 us); callers that promise durability (`fsync`, unmount, the end of a command)
    call `sync()`, and a process that writes syncs at least every `sync_interval`. A
    killed process loses nothing committed; a machine crash comes back to the state of
    the last `sync()` (module docstring).
    """

    def __init__(self, path: Path, env: lmdb.Environment) -> None:
        self.path = path
        self.env = env
        self.db = {name: env.open_db(name.encode()) for name in DB_NAMES}
        self.on_abort: list[Callable[[], None]] = []
        self.on_close: list[Callable[[], None]] = []  # after the last sync (packs let go)
        # After each sync, with how many of this process's commits it made durable.
        self.after_sync: list[Callable[[int], None]] = []
        self.sync_interval: float | None = SYNC_INTERVAL
        self._pin: lmdb.Transaction | None = None  # on the last synced state
        self._sync_lock = threading.Lock()
        self._commits = 0  # write transactions committed, and how many the last sync saw
        self._synced = 0
        self._syncer: threading.Thread | None = None
        self._stop = threading.Event()
        self._writer: int | None = None  # the thread inside write(), if any
        self._key: Path | None = path.resolve()
        with _OPEN_LOCK:
            _OPEN_HERE[self._key] += 1

    @contextlib.contextmanager
    def read(self) -> Iterator[lmdb.Transaction]:
        """A read-only snapshot transaction."""
        with self.env.begin(buffers=False) as txn:
            yield txn

    @contextlib.contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """A write transaction: committed on normal exit, aborted on exception.

        On abort the `on_abort` callbacks run: state cached above the store while the
        transaction ran (a directory id made by copy-on-write, say) never existed.
        """
        if self._pin is None:
            self._arm()
        try:
            with self.env.begin(write=True) as txn:
                self._writer = threading.get_ident()
                try:
                    yield txn
                finally:
                    self._writer = None
        except BaseException:
            for callback in self.on_abort:
                callback()
            raise
        self._commits += 1

    def _arm(self) -> None:
        """Before the first change: a durable state to come back to (its pages kept), and
        a thread that syncs every `sync_interval` while there are commits to sync (in the
        background: a command's own work never waits for the disk)."""
        self.sync()
        if self.sync_interval is not None and self._syncer is None:
            self._syncer = threading.Thread(target=self._sync_every, args=(self.sync_interval,),
                                            name="annofs-sync", daemon=True)
            self._syncer.start()

    def _sync_every(self, interval: float) -> None:
        failing = False
        while not self._stop.wait(interval):
            if self.sync_interval is None:
                return  # turned off
            if self._commits != self._synced or self.pin_behind():
                try:
                    self.sync()
                except (lmdb.Error, OSError) as e:
                    # A full disk, say: say it once, and keep trying (it may pass).
                    if not failing:
                        log.error("%s: periodic sync failed: %s", self.path, e)
                    failing = True
                else:
                    failing = False

    @property
    def commits(self) -> int:
        """Write transactions this process committed so far."""
        return self._commits

    def pin_behind(self) -> bool:
        """Whether other processes committed since this one's last sync. Its pin then keeps
        every page they free from reuse, and the file grows by all of them (an idle daemon
        during an import into its mount): a writer syncs again to move the pin on."""
        pin = self._pin
        if pin is None:
            return False
        try:
            return pin.id() != self.env.info()["last_txnid"]
        except lmdb.Error:  # replaced (and ended) by a sync in another thread meanwhile
            return False

    def next_id(self, txn: lmdb.Transaction, counter: str) -> int:
        """Allocate the next id of a counter inside a write transaction.

        A counter is a bare number: a flipped bit that lowers it would hand out an id in
        use, and the new record would silently replace another file's. So the id is
        checked to be free (CorruptionError if not: nothing is written).
        """
        key = b"next:" + counter.encode()
        raw = txn.get(key, db=self.db["meta"])
        n = from_u64(raw) if raw is not None else 1
        table = COUNTER_TABLES.get(counter)
        if table is not None and txn.get(u64(n), db=self.db[table]) is not None:
            raise CorruptionError(f"counter next:{counter} is {n}, but {counter} {n} exists "
                                  f"(the counter is damaged; annofs fsck --repair resets it)")
        txn.put(key, u64(n + 1), db=self.db["meta"])
        return n

    def damaged_counters(self, txn: lmdb.Transaction) -> list[tuple[str, int, int]]:
        """(counter, its next id, the highest id in use) of each counter that would hand
        out an id already in use (fsck reports them, repair moves them past it)."""
        out = []
        for counter, table in COUNTER_TABLES.items():
            raw = txn.get(b"next:" + counter.encode(), db=self.db["meta"])
            # next_id starts an absent counter at 1; a damaged length hands out nothing
            n = 1 if raw is None else from_u64(raw) if len(raw) == 8 else 0
            with txn.cursor(db=self.db[table]) as cur:
                last = from_u64(cur.key()) if cur.last() else -1
            if last >= n:
                out.append((counter, n, last))
        return out

    def get_meta(self, txn: lmdb.Transaction, key: str) -> bytes | None:
        """A raw metadata value."""
        raw = txn.get(key.encode(), db=self.db["meta"])
        return bytes(raw) if raw is not None else None

    def put_meta(self, txn: lmdb.Transaction, key: str, value: bytes) -> None:
        """Set a raw metadata value."""
        txn.put(key.encode(), value, db=self.db["meta"])

    def sync(self) -> None:
        """Flush committed transactions to disk; the state they make is the one a machine
        crash comes back to (see the module docstring). Thread-safe."""
        if self._writer == threading.get_ident():
            # LMDB's writer lock is not recursive: this thread would wait for itself.
            raise RuntimeError("Store.sync() inside a write transaction")
        with self._sync_lock:
            # Under the writer lock no commit falls between reading the meta pages and
            # pinning the state they describe.
            w = self.env.begin(write=True)
            try:
                metas = _read_metas(self.path, self.env.stat()["psize"])
                pin = self.env.begin()
                commits = self._commits
                last = read_synced_meta(self.path)
                to_sync = names_to_sync(w, self.db["packs"],
                                        meta_txnid(last.metas) if last is not None else 0)
            finally:
                w.abort()
            try:
                # Pack bytes first: the index in the state made durable points into them.
                fsync_packs(self.path, to_sync)
                self.env.sync(True)
                _save_metas(self.path, metas)
            except BaseException:
                pin.abort()  # not durable: the old pin still guards the saved state
                raise
            old, self._pin = self._pin, pin
            if old is not None:
                old.abort()
            self._synced = commits
            for callback in self.after_sync:
                callback(commits)

    def close(self) -> None:
        """Sync (if this process wrote) and close the environment."""
        if self._syncer is not None:
            self._stop.set()
            self._syncer.join()
            self._syncer = None
        if self._pin is not None:
            self.sync()
            self._pin.abort()
            self._pin = None
        else:
            self.env.sync(True)
        for callback in self.on_close:
            callback()
        self.env.close()
        with _OPEN_LOCK:
            if self._key is not None:
                _OPEN_HERE[self._key] -= 1
                self._key = None


def open_env(path: Path, *, readonly: bool = False) -> lmdb.Environment:
    """The store's LMDB environment with the options every opener uses (no Store around
    it: Store and store.compact use it)."""
    return lmdb.open(
        str(path / "db"),
        map_size=MAP_SIZE,
        max_dbs=32,
        sync=False,
        metasync=False,
        # Readahead on: a fragment spans up to 16 contiguous overflow pages, and without it
        # every 4 KiB fault was a synchronous disk read (measured through the mount: cold
        # 1 GiB read 36 -> 317-356 MB/s, cold tar of linux-6.1 75.5 -> 42.6 s).
        readahead=True,
        max_readers=256,
        readonly=readonly,
        lock=True,
    )


def open_env_readonly(path: Path) -> lmdb.Environment:
    """The LMDB environment of the store at `path`, read-only, for a helper process that
    only reads beside the one that has the store open (no Store: no sync, no repair)."""
    return open_env(path, readonly=True)


def open_store(path: Path, *, create: bool = False, upgrading: bool = False) -> Store:
    """Open the store at `path`; with `create`, make it first (idempotent).

    Raises StoreError naming the path if it is missing, not a store, or of another format
    (one `annofs upgrade` converts is opened only with `upgrading`, by that command).
    """
    path = Path(path)
    marker = path / "db" / "data.mdb"
    if not marker.exists():
        if not create:
            raise StoreError(f"{path}: no annofs store here (run 'annofs --store {path} init')")
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path}: exists and is not a directory")
        (path / "db").mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    if marker.exists():
        try:
            recover_after_reboot(path)
        except OSError as e:  # a read-only or full filesystem, a store not ours
            raise StoreError(f"{path}: cannot open the store: {e.strerror}") from e
    try:
        env = open_env(path)
        env.reader_check()  # read slots of killed processes would keep pages from reuse
    except lmdb.Error as e:
        raise StoreError(f"{path}: cannot open the store: {e}") from e
    try:
        store = Store(path, env)
        # A read transaction: opening a store (a reader beside a running daemon, say) must
        # not queue behind the writer lock.
        with store.read() as txn:
            fmt = store.get_meta(txn, "format")
    except lmdb.Error as e:
        env.close()
        raise CorruptionError(f"{path}: the store's LMDB database is damaged: {e}") from e
    if fmt is None:
        if not create:
            env.close()
            raise StoreError(f"{path}: the store was never initialised (run annofs init)")
        with store.write() as txn:
            if store.get_meta(txn, "format") is None:
                store.put_meta(txn, "format", str(FORMAT_VERSION).encode())
    elif upgrading and fmt in {str(f).encode() for f in UPGRADABLE}:
        pass
    elif fmt in {str(f).encode() for f in UPGRADABLE}:
        env.close()
        raise StoreError(f"{path}: store format {fmt.decode()} must be converted first: run "
                         f"'annofs --store {path} upgrade' (this annofs reads format "
                         f"{FORMAT_VERSION})")
    elif fmt != str(FORMAT_VERSION).encode():
        env.close()
        raise StoreError(
                f"{path}: store format {fmt.decode(errors='replace')} is not supported "
                f"(this annofs reads format {FORMAT_VERSION})"
            )
    if create:
        store.sync()
    return store


# -- the synced state, for a machine crash ---------------------------------------------------

SYNCED_META = "synced-meta"
_MAGIC = b"ANNOFSM1"
_HEAD = struct.Struct(">8sQI40s")  # magic, sequence number, page size, boot id


def boot_id() -> str:
    """This boot of the machine (Linux); a change means the page cache was lost."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _read_metas(path: Path, psize: int) -> bytes:
    with open(path / "db" / "data.mdb", "rb") as f:
        return os.pread(f.fileno(), 2 * psize, 0)


@dataclass(frozen=True)
class SyncedMeta:
    """The two LMDB meta pages of the last synced state, and the boot that wrote them."""

    seq: int
    boot: str
    metas: bytes


def read_synced_meta(path: Path) -> SyncedMeta | None:
    """The newest intact record in `db/synced-meta` (two slots, written alternately)."""
    try:
        raw = (path / "db" / SYNCED_META).read_bytes()
    except FileNotFoundError:
        return None
    best: SyncedMeta | None = None
    pos = raw.find(_MAGIC)
    while pos >= 0 and pos + _HEAD.size <= len(raw):  # either slot may be unwritten or torn
        _, seq, psize, boot = _HEAD.unpack_from(raw, pos)
        end = pos + _HEAD.size + 2 * psize
        if end + 32 <= len(raw) and blake3.blake3(raw[pos:end]).digest() == raw[end:end + 32] \
                and (best is None or seq > best.seq):
            best = SyncedMeta(seq, boot.rstrip(b"\0").decode(), raw[pos + _HEAD.size:end])
        pos = raw.find(_MAGIC, pos + 1)
    return best


def write_synced_meta(path: Path, rec: SyncedMeta) -> None:
    """Write `rec` into its slot (by sequence number) and flush it."""
    psize = len(rec.metas) // 2
    body = _HEAD.pack(_MAGIC, rec.seq, psize, rec.boot.encode()) + rec.metas
    slot = body + blake3.blake3(body).digest()
    fd = os.open(path / "db" / SYNCED_META, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, slot, (rec.seq % 2) * len(slot))
        os.fdatasync(fd)
    finally:
        os.close(fd)


TXNID_FIELD = struct.Struct("=Q")
TXNID_AT = 144  # in an LMDB meta page: page header (16), then MDB_meta up to mm_txnid


def meta_txnid(metas: bytes) -> int:
    """The newest transaction id of the two meta pages."""
    psize = len(metas) // 2
    return max(TXNID_FIELD.unpack_from(metas, i * psize + TXNID_AT)[0] for i in (0, 1))


def _save_metas(path: Path, metas: bytes) -> None:
    """Record a synced state, unless a newer one is recorded (several processes sync).

    Why never an older one: the newest record's state is protected by its writer's pin,
    and any live writer's pin is no newer than it (an older pin keeps LMDB from reusing
    pages freed after it, so it protects every newer state too)."""
    fd = os.open(path / "db" / SYNCED_META, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        last = read_synced_meta(path)
        if last is not None and len(last.metas) == len(metas) and \
                meta_txnid(last.metas) > meta_txnid(metas):
            return
        write_synced_meta(path, SyncedMeta(last.seq + 1 if last else 1, boot_id(), metas))
    finally:
        os.close(fd)


def recover_after_reboot(path: Path) -> bool:
    """After a machine crash, put back the meta pages of the last synced state (whose
    pages nothing overwrote); True if it did. Under an exclusive lock, and marks the
    record as of this boot, so it happens once and never under a process that opened
    the store since."""
    fd = os.open(path / "db" / SYNCED_META, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        rec = read_synced_meta(path)
        now = boot_id()
        if rec is None or rec.boot == now:
            return False
        data = path / "db" / "data.mdb"
        restored = False
        with open(data, "r+b") as f:
            if os.pread(f.fileno(), len(rec.metas), 0) != rec.metas:
                os.pwrite(f.fileno(), rec.metas, 0)
                os.fsync(f.fileno())
                restored = True
        write_synced_meta(path, SyncedMeta(rec.seq + 1, now, rec.metas))
        if restored:
            log.warning("%s: the machine stopped after the last sync; the store is back at "
                        "that sync (changes after it were never fsynced)", path)
        return restored
    finally:
        os.close(fd)
