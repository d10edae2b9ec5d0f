"""One LMDB environment per store, its named databases, and the store's format marker."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb

from annofs.errors import CorruptionError, StoreError
from annofs.store.keys import from_u64, u64

FORMAT_VERSION = 3  # 3: refcounts count edits (own_counts); 2: raw fragment values

# Virtual address space only: LMDB grows the file as it is used.
MAP_SIZE = 1 << 40

DB_NAMES = (
    "meta",  # format version, counters, root directory
    "fragments",  # blake3 -> codec byte + payload
    "fragrefs",  # blake3 -> u64 occurrences in stored versions' edits (own_counts)
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

# The id-keyed database each counter allocates keys of.
COUNTER_TABLES = {"version": "versions", "dir": "dirs", "link": "links"}


class Store:
    """An open store: the LMDB environment and handles to its named databases.

    Commits do not fsync (measured: 150-250 us per synchronous commit here, against
    6 us); callers that promise durability (`fsync`, unmount, the end of a command)
    call `sync()`. A killed process loses nothing committed; a machine crash can lose
    what was committed since the last `sync()`.
    """

    def __init__(self, path: Path, env: lmdb.Environment) -> None:
        self.path = path
        self.env = env
        self.db = {name: env.open_db(name.encode()) for name in DB_NAMES}
        self.on_abort: list[Callable[[], None]] = []

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
        try:
            with self.env.begin(write=True) as txn:
                yield txn
        except BaseException:
            for callback in self.on_abort:
                callback()
            raise

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
        """Flush committed transactions to disk."""
        self.env.sync(True)

    def close(self) -> None:
        """Sync and close the environment."""
        self.env.sync(True)
        self.env.close()


def _open_env(path: Path, *, readonly: bool = False) -> lmdb.Environment:
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


def open_store(path: Path, *, create: bool = False) -> Store:
    """Open the store at `path`; with `create`, make it first (idempotent).

    Raises StoreError naming the path if it is missing, not a store, or of another format.
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
    try:
        env = _open_env(path)
    except lmdb.Error as e:
        raise StoreError(f"{path}: cannot open the store: {e}") from e
    store = Store(path, env)
    # A read transaction: opening a store (a reader beside a running daemon, say) must not
    # queue behind the writer lock.
    with store.read() as txn:
        fmt = store.get_meta(txn, "format")
    if fmt is None:
        if not create:
            env.close()
            raise StoreError(f"{path}: the store was never initialised (run annofs init)")
        with store.write() as txn:
            if store.get_meta(txn, "format") is None:
                store.put_meta(txn, "format", str(FORMAT_VERSION).encode())
    elif fmt != str(FORMAT_VERSION).encode():
        env.close()
        raise StoreError(
                f"{path}: store format {fmt.decode(errors='replace')} is not supported "
                f"(this annofs reads format {FORMAT_VERSION})"
            )
    if create:
        store.sync()
    return store
