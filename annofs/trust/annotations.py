"""Statements stored as annotations bound to content, and the indexes that find them.

Three named databases:

- `statements`: statement id -> the envelope's fields and a summary (msgpack, layout
  first, as every record of the store). The id is BLAKE3 over the PAE and the signature,
  a content address: importing the same envelope twice stores it once.
- `signed_digests`: content digest + statement id -> the subject names with that digest.
  The verdict for a file looks up its digest here, so a statement follows its content
  through renames and copies (they keep the digest) and never follows a name.
- `signed_fragments`: fragment hash + signed digest -> b"". Which signed contents hold a
  fragment: finding a signed original by shared content, and keeping its fragments.
  Filled when a statement is made from (or matched to) content in the store; a statement
  imported before its content is valid on its own and simply has no fragments indexed.

Every change to the statements bumps a generation counter in `meta` in the same
transaction: verdict caches key on it, so a new signature or label takes effect at the
next open.

A statement read back from the store is parsed again from its envelope, and its id
recomputed: the store is not trusted to say what was signed. Parsed statements are
kept in a small LRU (weighted by subject count) so a statement over 40,000 files is
parsed and its signature checked once per process, not once per file.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lmdb
import msgpack

from annofs.errors import AnnofsError, CorruptionError, NotFoundError, UsageError
from annofs.store import Store
from annofs.store.keys import HASH_SIZE, from_u64, u64
from annofs.store.records import HOLE
from annofs.trust.statement import Envelope, SignedStatement, open_envelope

_LAYOUT = 1
GENERATION_KEY = "trust:generation"
_GENERATION_KEY_BYTES = GENERATION_KEY.encode()
ID_SIZE = 32


@dataclass(frozen=True)
class StatementSummary:
    """What `annofs log` and listings show without parsing the whole envelope."""

    id: bytes
    time: int
    claim: str
    label: str | None
    signer: str
    public_key: bytes
    subjects: int


def encode_statement(ss: SignedStatement) -> bytes:
    """The `statements` record: envelope fields, then the summary."""
    env, st = ss.envelope, ss.statement
    return msgpack.packb([_LAYOUT, env.payload_type, env.payload, env.keyid, env.sig,
                          [st.time, st.claim, st.label, st.signer, st.public_key,
                           len(st.subjects)]], use_bin_type=True)


def _unpack(sid: bytes, raw: bytes | memoryview) -> list[Any]:
    what = f"statement {sid.hex()[:16]}"
    try:
        rec = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise CorruptionError(f"{what}: record does not decode ({e})") from e
    if (not isinstance(rec, list) or len(rec) != 6 or rec[0] != _LAYOUT
            or not isinstance(rec[5], list) or len(rec[5]) != 6):
        raise CorruptionError(f"{what}: record has an unknown layout")
    return rec


def decode_statement(sid: bytes, raw: bytes | memoryview) -> SignedStatement:
    """Parse a `statements` record back into a signed statement, checking its id."""
    what = f"statement {sid.hex()[:16]}"
    _, ptype, payload, keyid, sig, _summary = _unpack(sid, raw)
    if not (isinstance(ptype, str) and isinstance(payload, bytes) and isinstance(keyid, str)
            and isinstance(sig, bytes)):
        raise CorruptionError(f"{what}: bad envelope fields")
    try:
        ss = open_envelope(Envelope(ptype, payload, keyid, sig), what)
    except UsageError as e:
        raise CorruptionError(str(e)) from None
    if ss.id != sid:
        raise CorruptionError(f"{what}: stored under an id that is not its own")
    return ss


def decode_summary(sid: bytes, raw: bytes | memoryview) -> StatementSummary:
    """The summary part of a `statements` record."""
    when, claim, label, signer, pub, n = _unpack(sid, raw)[5]
    if not (type(when) is int and isinstance(claim, str) and (label is None or
            isinstance(label, str)) and isinstance(signer, str) and isinstance(pub, bytes)
            and type(n) is int):
        raise CorruptionError(f"statement {sid.hex()[:16]}: bad summary")
    return StatementSummary(sid, when, claim, label, signer, pub, n)


class _ParsedCache:
    """An LRU of parsed statements, bounded by the total number of their subjects.

    Locked: the mount may ask for verdicts from worker threads (digests of large files
    are computed off the event loop) while its main thread asks too.
    """

    def __init__(self, max_subjects: int) -> None:
        self._max = self.capacity = max_subjects
        self._weight = 0
        self._items: OrderedDict[bytes, SignedStatement] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sid: bytes) -> SignedStatement | None:
        with self._lock:
            ss = self._items.get(sid)
            if ss is not None:
                self._items.move_to_end(sid)
            return ss

    def drop(self, sid: bytes) -> None:
        with self._lock:
            old = self._items.pop(sid, None)
            if old is not None:
                self._weight -= len(old.statement.subjects)

    def put(self, ss: SignedStatement) -> None:
        with self._lock:
            if ss.id in self._items:
                return
            self._items[ss.id] = ss
            self._weight += len(ss.statement.subjects)
            while self._weight > self._max and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._weight -= len(old.statement.subjects)


class AnnotationStore:
    """Statements and their indexes, inside caller-owned transactions."""

    def __init__(self, store: Store, *, cache_subjects: int = 500_000) -> None:
        self._store = store
        self._statements = store.db["statements"]
        self._digests = store.db["signed_digests"]
        self._fragments = store.db["signed_fragments"]
        self._meta = store.db["meta"]
        self._parsed = _ParsedCache(cache_subjects)

    # -- the generation ---------------------------------------------------------------

    def generation(self, txn: lmdb.Transaction) -> int:
        """Bumped by every change to the statements (0 for a store that never had one)."""
        # Read straight from `meta` (as Store.get_meta would): every judged open asks.
        raw = txn.get(_GENERATION_KEY_BYTES, db=self._meta)
        return from_u64(raw) if raw is not None else 0

    def _bump(self, txn: lmdb.Transaction) -> None:
        self._store.put_meta(txn, GENERATION_KEY, u64(self.generation(txn) + 1))

    # -- adding and removing ------------------------------------------------------------

    def add(self, txn: lmdb.Transaction, ss: SignedStatement) -> bool:
        """Store a validly signed statement and index its digests; False if already stored.

        Whether the signer is trusted is not asked here: that is the policy's, at the
        time of each verdict. A statement whose signature does not verify is refused.
        """
        if not ss.signature_valid:
            raise UsageError(f"statement by {ss.statement.signer!r}: the signature does not "
                             f"verify; not stored")
        if not txn.put(ss.id, encode_statement(ss), db=self._statements, overwrite=False):
            return False
        names: dict[bytes, list[str]] = {}
        for s in ss.statement.subjects:
            names.setdefault(s.digest, []).append(s.name)
        for digest, ns in names.items():
            txn.put(digest + ss.id, "\0".join(ns).encode("utf-8"), db=self._digests)
        self._bump(txn)
        self._parsed.put(ss)
        return True

    def remove(self, txn: lmdb.Transaction, sid: bytes) -> bool:
        """Delete a statement and its digest index entries; False if it was not stored.

        Fragment index entries of digests no statement signs any more are left; every
        lookup through them checks that the digest is still signed.
        """
        raw = txn.get(sid, db=self._statements)
        if raw is None:
            return False
        ss = decode_statement(sid, raw)
        for digest in ss.digests:
            txn.delete(digest + sid, db=self._digests)
        txn.delete(sid, db=self._statements)
        self._bump(txn)
        self._parsed.drop(sid)
        return True

    def index_fragments(self, txn: lmdb.Transaction, digest: bytes, hashes: bytes) -> int:
        """Record that the signed content `digest` consists of these fragments.

        `hashes` is a version's concatenated fragment hashes. Returns how many entries
        were new.
        """
        new = 0
        for i in range(0, len(hashes), HASH_SIZE):
            if hashes[i:i + HASH_SIZE] == HOLE:
                continue  # a hole is no fragment: zeros shared by every sparse file
            if txn.put(hashes[i:i + HASH_SIZE] + digest, b"", db=self._fragments,
                       overwrite=False):
                new += 1
        return new

    # -- looking up ---------------------------------------------------------------------

    def get(self, txn: lmdb.Transaction, sid: bytes) -> SignedStatement:
        """A stored statement, parsed from its envelope (cached)."""
        ss = self._parsed.get(sid)
        if ss is not None:
            return ss
        raw = txn.get(sid, db=self._statements)
        if raw is None:
            raise NotFoundError(f"statement {sid.hex()[:16]}: no such statement")
        ss = decode_statement(sid, raw)
        self._parsed.put(ss)
        return ss

    def summary(self, txn: lmdb.Transaction, sid: bytes) -> StatementSummary:
        """A stored statement's summary, without parsing its payload."""
        raw = txn.get(sid, db=self._statements)
        if raw is None:
            raise NotFoundError(f"statement {sid.hex()[:16]}: no such statement")
        return decode_summary(sid, raw)

    def ids_for_digest(self, txn: lmdb.Transaction, digest: bytes) -> list[bytes]:
        """Ids of the statements whose subjects include `digest`."""
        # Every judged open of content not judged before asks: a bare cursor walk (no
        # iterator, no context manager) is a third cheaper.
        out: list[bytes] = []
        cur = txn.cursor(db=self._digests)
        try:
            if cur.set_range(digest):
                key = cur.key()
                while key[:HASH_SIZE] == digest:
                    out.append(bytes(key[HASH_SIZE:]))
                    if not cur.next():
                        break
                    key = cur.key()
        finally:
            cur.close()
        return out

    def covering(self, txn: lmdb.Transaction, digest: bytes) -> list[SignedStatement]:
        """The statements covering `digest`, in id order (what a verdict needs).

        An index entry whose statement does not in fact list the digest (a damaged
        store) is skipped: only what was signed counts.
        """
        found = []
        for sid in self.ids_for_digest(txn, digest):
            ss = self.get(txn, sid)
            if digest in ss.digests:
                found.append(ss)
        return found

    def for_digest(self, txn: lmdb.Transaction, digest: bytes) -> list[SignedStatement]:
        """The statements covering `digest`, oldest first (see `covering`)."""
        found = self.covering(txn, digest)
        found.sort(key=lambda ss: (ss.statement.time, ss.id))
        return found

    def is_signed(self, txn: lmdb.Transaction, digest: bytes) -> bool:
        """Whether any statement covers `digest`."""
        with txn.cursor(db=self._digests) as cur:
            return cur.set_range(digest) and cur.key()[:HASH_SIZE] == digest

    def names_for(self, txn: lmdb.Transaction, digest: bytes, sid: bytes) -> list[str]:
        """The subject names under which statement `sid` signed `digest`."""
        raw = txn.get(digest + sid, db=self._digests)
        return bytes(raw).decode("utf-8", "replace").split("\0") if raw is not None else []

    def prewarm(self, txn: lmdb.Transaction, seconds: float) -> int:
        """Parse stored statements into the cache ahead of need, newest first, for at most
        `seconds` and as many subjects as the cache holds; how many were parsed.

        A statement over a large tree takes a while to parse (~0.3 s for 50,000
        subjects): a mount does it before it serves, so the first open under a rule does
        not stall on it.
        """
        deadline = time.monotonic() + seconds
        summaries = []
        for sid in self.iter_ids(txn):
            try:
                summaries.append(self.summary(txn, sid))
            except AnnofsError:
                continue  # a damaged statement: its verdicts say so when asked
        summaries.sort(key=lambda s: s.time, reverse=True)
        parsed, weight = 0, 0
        for summary in summaries:
            weight += summary.subjects
            if weight > self._parsed.capacity or time.monotonic() > deadline:
                break
            try:
                self.get(txn, summary.id)
            except AnnofsError:
                continue  # a damaged statement: its verdicts say so when asked
            parsed += 1
        return parsed

    def iter_ids(self, txn: lmdb.Transaction) -> Iterator[bytes]:
        """Every stored statement id (in id order)."""
        with txn.cursor(db=self._statements) as cur:
            for key in cur.iternext(values=False):
                yield bytes(key)

    def all(self, txn: lmdb.Transaction) -> list[SignedStatement]:
        """Every stored statement, oldest first."""
        found = [self.get(txn, sid) for sid in self.iter_ids(txn)]
        found.sort(key=lambda ss: (ss.statement.time, ss.id))
        return found

    def count(self, txn: lmdb.Transaction) -> int:
        """How many statements are stored."""
        return txn.stat(self._statements)["entries"]

    def signed_digests_with_fragment(self, txn: lmdb.Transaction, h: bytes) -> list[bytes]:
        """Signed contents that contain fragment `h` (for finding an original by content)."""
        out: list[bytes] = []
        with txn.cursor(db=self._fragments) as cur:
            if not cur.set_range(h):
                return out
            for key in cur.iternext(values=False):
                if key[:HASH_SIZE] != h:
                    break
                digest = bytes(key[HASH_SIZE:])
                if self.is_signed(txn, digest):
                    out.append(digest)
        return out

    def is_signed_fragment(self, txn: lmdb.Transaction, h: bytes) -> bool:
        """Whether fragment `h` belongs to some signed content (gc keeps it)."""
        return bool(self.signed_digests_with_fragment(txn, h))


def export_lines(statements: list[SignedStatement]) -> Iterator[str]:
    """JSON lines (one DSSE envelope each) for `attest export`."""
    for ss in statements:
        yield ss.envelope.to_json()
