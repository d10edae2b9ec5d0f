"""Signatures and content addresses of registered paths, written into Nix's database.

`nix-store --load-db` (nix/register.py) cannot record `ValidPaths.sigs` or `.ca`, so
a path `nix fetch` registers would be trusted through Nix's database by nothing. This
module writes them afterwards with sqlite3, into the database Nix documents (schema 10,
Nix 2.x: `ValidPaths(id, path, hash, registrationTime, deriver, narSize, ultimate,
sigs, ca)`), as Nix's own `LocalStore::addSignatures` does: `sigs` is a space-separated
set of `name:base64` (Nix keeps a sorted std::set), NULL when empty; `ca` is the
rendered content address (`fixed:r:sha256:<nix32>`, `text:sha256:<nix32>`), the same
text a narinfo's `CA:` carries.

Locking, as Nix does it. Every Nix process holds `nix/var/nix/db/big-lock` shared (flock)
while it has the store open; only a schema upgrade takes it exclusively. So this takes
it shared too (an upgrade cannot run under our write), and writes in one short
`BEGIN IMMEDIATE` transaction (the write lock at once: a deferred read that upgrades to
a write gets SQLITE_BUSY in WAL mode without waiting) with a busy timeout, holding no
lock across anything slow: the transaction reads and updates a few rows.

`check` is the preflight: the database exists, has the schema this module knows, and its
write lock can be had within the timeout. `nix fetch` runs it before adding or
registering anything, so these errors change nothing.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from annofs.errors import AnnofsError, RefusedError, UsageError
from annofs.transfer import nixbase32 as base32

if TYPE_CHECKING:
    from annofs.nix.register import Registration

SCHEMA = 10  # Nix's nixSchemaVersion since 2.4 (10 added `ca`; 8 added `sigs`)
_COLUMNS = frozenset({"id", "path", "hash", "narSize", "sigs", "ca"})
TIMEOUT_ENV = "ANNOFS_NIX_DB_TIMEOUT"
DEFAULT_TIMEOUT = 10.0  # seconds another writer may hold the database before we give up


def db_dir(root: Path) -> Path:
    """R/nix/var/nix/db: where Nix keeps the database of the Nix root R."""
    return Path(root) / "nix" / "var" / "nix" / "db"


def timeout() -> float:
    """The busy timeout: $ANNOFS_NIX_DB_TIMEOUT seconds, else DEFAULT_TIMEOUT."""
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise UsageError(f"${TIMEOUT_ENV}={text!r}: expected seconds, more than 0, at "
                         f"most 3600")
    return value


@contextmanager
def _big_lock(directory: Path, wait: float, outcome: str) -> Iterator[None]:
    """Nix's big-lock, shared, as every Nix process holds it (an exclusive holder is a
    schema upgrade: waited for, up to `wait` seconds)."""
    path = directory / "big-lock"
    # Nix creates it (0600) when it opens the store; so do we, beside an existing db.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise UsageError(f"{path}: held exclusively (a Nix schema upgrade?) "
                                     f"for more than {wait:g} s; {outcome}") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the flock


def _database(root: Path) -> Path:
    db = db_dir(root) / "db.sqlite"
    if not db.is_file():
        raise UsageError(f"{db}: no Nix database there (any 'nix-store --store "
                         f"local?root={root}' command makes it)")
    return db


def _schema(db: Path, conn: sqlite3.Connection) -> None:
    """Refuse a database whose schema this module does not know: Nix's schema file, and
    the ValidPaths columns it writes."""
    schema_file = db.parent / "schema"
    try:
        text = schema_file.read_text().strip()
    except FileNotFoundError:
        text = "none"
    cols = {row[1] for row in conn.execute("PRAGMA table_info(ValidPaths)")}
    if text != str(SCHEMA) or not cols >= _COLUMNS:
        lacking = ", ".join(sorted(_COLUMNS - cols)) or "none"
        raise UsageError(f"{db}: unknown Nix database schema (version {text}, missing "
                         f"columns: {lacking}; annofs writes schema {SCHEMA})")


def _locked(e: sqlite3.Error) -> bool:
    text = str(e).lower()
    return "locked" in text or "busy" in text


NOTHING = "nothing registered"
# What a failure after --load-db leaves (module docstring of nix/register.py).
HALF = "the paths are valid without their signatures: run the command again to record them"


@contextmanager
def _write(root: Path, outcome: str = NOTHING) -> Iterator[tuple[Path, sqlite3.Connection]]:
    """One write transaction on R's database, under the shared big-lock; committed if
    the body returns, rolled back if it raises. One-line errors (exit 2) for a database
    missing, of an unknown schema, or locked past the timeout, ending with `outcome`
    (what the failure leaves)."""
    db = _database(root)
    wait = timeout()
    with _big_lock(db.parent, wait, outcome):
        # mode=rw: never create a database Nix has not made.
        conn = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=wait,
                               isolation_level=None)
        try:
            try:
                _schema(db, conn)
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                if _locked(e):
                    raise UsageError(f"{db}: locked by another process for more than "
                                     f"{wait:g} s; {outcome}") from None
                raise UsageError(f"{db}: cannot open Nix's database: {e}; {outcome}") from None
            try:
                yield db, conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                conn.execute("ROLLBACK")
                raise UsageError(f"{db}: could not commit: {e}; {outcome}") from None
        finally:
            conn.close()


def check(root: Path, regs: Sequence[Registration] = ()) -> None:
    """The preflight: R's database exists, its schema is known, its write lock can be
    had (taken and given back at once): UsageError (exit 2) otherwise; and each of
    `regs` Nix already holds is registered as given (RefusedError, exit 1, otherwise:
    its signatures could never be recorded)."""
    with _write(root) as (db, conn):
        for r in regs:
            row = _row(conn, r.path)
            if row is not None:
                _same_or_refuse(db, conn, r, row)


@dataclass(frozen=True)
class Recorded:
    """What `record` added to one path's row."""

    path: str
    sigs: tuple[str, ...]  # key names of the signatures added
    ca: str | None  # the content address set, if it was not set


def _sha256(text: str) -> bytes | None:
    """`sha256:` + hex (as Nix writes ValidPaths.hash) or nix base32 (as a narinfo)."""
    algo, _, body = (text or "").partition(":")
    try:
        if algo == "sha256" and len(body) == 64:
            return bytes.fromhex(body)
        if algo == "sha256" and len(body) == 52:
            return base32.decode(body, 32)
    except (ValueError, AnnofsError):
        pass
    return None


def _same_hash(db_text: str, ours: str) -> bool:
    got = _sha256(db_text)
    return got is not None and got == _sha256(ours)


def _row(conn: sqlite3.Connection, path: str) -> tuple[Any, ...] | None:
    return conn.execute("SELECT id, hash, narSize, sigs, ca FROM ValidPaths WHERE path = ?",
                        (path,)).fetchone()


def _same_or_refuse(db: Path, conn: sqlite3.Connection, r: Registration,
                    row: tuple[Any, ...]) -> None:
    """RefusedError unless the row registers what `r` does (NarHash, NarSize,
    references): signatures over `r`'s fingerprint mean nothing on another."""
    rid, hash_text, nar_size = row[0], row[1], row[2]
    refs = {p for (p,) in conn.execute(
        "SELECT v.path FROM Refs f JOIN ValidPaths v ON f.reference = v.id "
        "WHERE f.referrer = ?", (rid,))}
    if not _same_hash(hash_text, r.nar_hash) or nar_size != r.nar_size \
            or refs != set(r.references):
        raise RefusedError(f"{db}: {r.path} is registered there with another NarHash, "
                           f"NarSize or references than annofs has; nothing recorded")


def record(root: Path, regs: Sequence[Registration]) -> list[Recorded]:
    """Merge each registration's `sigs` into its ValidPaths row (no duplicates) and set
    its `ca` if the row has none, in one transaction; what changed, per path.

    A row must describe what was registered (NarHash, NarSize, references): signatures
    over that fingerprint mean nothing on another. If one does not, or a path is not
    valid, RefusedError and nothing is written."""
    want = [r for r in regs if r.sigs or r.ca]
    if not want:
        return []
    out: list[Recorded] = []
    with _write(root, HALF) as (db, conn):
        for r in want:
            row = _row(conn, r.path)
            if row is None:
                raise RefusedError(f"{db}: {r.path} is not valid there; {HALF}")
            _same_or_refuse(db, conn, r, row)
            rid, _hash, _size, sigs_text, ca = row
            have = (sigs_text or "").split()
            added = [s for s in dict.fromkeys(r.sigs) if s not in have]
            new_ca = r.ca if r.ca and not ca else None
            if not added and new_ca is None:
                continue
            merged = sorted({*have, *added})  # Nix's std::set: sorted, no duplicates
            conn.execute("UPDATE ValidPaths SET sigs = ?, ca = ? WHERE id = ?",
                         (" ".join(merged) or None, ca or new_ca, rid))
            out.append(Recorded(r.path, tuple(s.partition(":")[0] for s in added), new_ca))
    return out
