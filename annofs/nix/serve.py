"""`annofs nix serve`: what the store offers a Nix client as a binary cache.

This module decides, in plain synchronous code (the HTTP side, dashboard/binary_cache.py,
runs it in worker threads), what a request gets:

- **Which paths.** An entry directly under the destination directory (`/nix/store` in
  the store's namespace by default) whose name is a store path's base name
  (`<32 nix base32>-<name>`): a directory, a regular file or a symlink, as a NAR's top
  node may be. It is offered only if the policy would let a process read every file
  and symlink of it: each is judged as the mount judges an open (`content_verdict`, in
  one read snapshot with the walk). Anything refused is not there at all (the caller
  answers 404), and is recorded once per tree version in the events log. A tree
  holding a FIFO, socket or device node (which no NAR can hold) is not there either.
- **NarHash, NarSize.** Computed by dumping the tree (the same bytes `nix-store
  --dump` gives) and cached in memory, keyed by the tree's *content listing*: BLAKE3
  over each entry's relative path, kind, execute bit and version id (a file; ids are
  never reused, and a version's bytes never change) or target (a symlink). Walking the
  listing reads only metadata, so a request for an unchanged path costs a walk, never
  a re-read of its bytes; any change makes a new key. Not in LMDB: `nix serve` only
  reads the store (beside a mount's daemon, which owns writes).
- **References.** From a `built` statement's fingerprint when annofs holds one for this
  NAR (what the cache signed, and what Nix recorded). Otherwise the NAR is scanned as
  Nix scans a build's output: every 32-character window of nix base32 characters is a
  candidate hash part, and those naming a store path present under the destination
  (the path itself included) are its references. Candidates are kept with the cached
  hash (at most MAX_CANDIDATES; past that, only those present at scan time), so a
  reference added later is found without re-reading the tree.
- **Sig lines.** The cache signatures annofs recorded for the path (`built` statements
  from `nix fetch`) whose fingerprint is exactly the one served (same NarHash, NarSize
  and references) and whose signature verifies; then a fresh signature by each
  `--key` over that fingerprint (annofs as a signing cache, as `secret-key-files`).
- **NARs.** At `nar/<hash part>-<NarHash nix32>.nar` (and `.nar.zst`): the URL names
  the NAR hash it was offered under, so a tree that changed between the narinfo and
  the NAR request is a 404, never another NAR under a stale hash. The NAR is dumped
  from the same read snapshot its checks ran in.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import blake3
import lmdb

from annofs.errors import AnnofsError, UsageError
from annofs.nix.narinfo import HASH_CHARS, HASH_PART_LEN, check_base_name, fingerprint
from annofs.store.records import Attrs, Version
from annofs.transfer import nixbase32 as base32
from annofs.transfer.nar import NarHash, dump_volume_in
from annofs.trust.annotations import AnnotationStore
from annofs.trust.gate import TrustGate
from annofs.trust.keys import SecretKey
from annofs.trust.policy import Default, Mode, Policy
from annofs.trust.statement import NARINFO_CLAIM
from annofs.trust.symlink import content_verdict, symlink_content
from annofs.trust.verdict import Verdict
from annofs.volume import Volume

log = logging.getLogger("annofs.nix.serve")

STORE_DIR = "/nix/store"
# Hash-like windows kept per NAR before only present paths are: bounds the cache (at
# most _CACHED_TREES * 256 windows) whatever a tree holds (base32 noise, say).
MAX_CANDIDATES = 256
_CACHED_TREES = 4096  # NAR hashes remembered (about 200 bytes each, plus candidates)
_CACHED_DIGESTS = 100_000  # digests of versions the store has not recorded yet
# Each byte as 1 if it is a nix base32 character, else 0; a hash part is a run of 32.
_MARKS = bytes(1 if chr(b) in HASH_CHARS else 0 for b in range(256))
_RUN = b"\1" * HASH_PART_LEN
_FINGERPRINT = re.compile(r"1;([^;]+);sha256:([0-9a-z]{52});([0-9]+);(.*)")


@dataclass(frozen=True)
class Offer:
    """A store path as served: everything its narinfo says."""

    base: str  # <hash>-<name>
    nar: NarHash
    references: tuple[str, ...]  # base names, sorted
    sigs: tuple[str, ...]  # `NAME:BASE64`, recorded cache signatures first

    @property
    def store_path(self) -> str:
        """`/nix/store/<hash>-<name>`."""
        return f"{STORE_DIR}/{self.base}"

    @property
    def nar_name(self) -> str:
        """The NAR's file name without its extension (see the module docstring)."""
        return f"{self.base[:HASH_PART_LEN]}-{base32.encode(self.nar.sha256)}"

    def fingerprint(self) -> str:
        """What a Sig signs."""
        return fingerprint(self.store_path, self.nar.sha256, self.nar.size,
                           [f"{STORE_DIR}/{r}" for r in self.references])

    def narinfo(self, compression: str) -> str:
        """The narinfo text, with the NAR at `nar/...` compressed by `compression`
        ("none" or "zstd"). FileHash and FileSize only where known: uncompressed."""
        ext = ".nar" if compression == "none" else ".nar.zst"
        lines = [f"StorePath: {self.store_path}", f"URL: nar/{self.nar_name}{ext}",
                 f"Compression: {compression}"]
        if compression == "none":
            lines += [f"FileHash: {self.nar}", f"FileSize: {self.nar.size}"]
        lines += [f"NarHash: {self.nar}", f"NarSize: {self.nar.size}",
                  f"References: {' '.join(self.references)}"]
        lines += [f"Sig: {s}" for s in self.sigs]
        return "".join(ln + "\n" for ln in lines)


@dataclass(frozen=True)
class _Scanned:
    """What dumping a tree once taught: its NAR hash, and the hash-like windows in it."""

    nar: NarHash
    candidates: frozenset[str]
    filtered: bool  # too many windows: only those present at scan time were kept


@dataclass(frozen=True)
class _Walked:
    """A store path's tree in one snapshot: its key, and its files' verdicts."""

    key: bytes
    refused: tuple[tuple[str, Verdict], ...]  # (path, verdict) of each refused file
    first_digest: bytes | None  # of the first file or symlink: finds `built` statements
    odd: bool  # holds a FIFO, socket or device node, which no NAR can: not offered


class RefScanner:
    """Nix's reference scan over NAR chunks: every window of HASH_PART_LEN nix base32
    characters, across chunk boundaries. Past MAX_CANDIDATES distinct windows (a file
    of random base32 text), only those `present()` names are kept."""

    def __init__(self, present: Callable[[], frozenset[str]] = frozenset) -> None:
        self.found: set[str] = set()
        self.filtered = False
        self._present_fn = present
        self._present: frozenset[str] = frozenset()
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        """Scan the next chunk."""
        data = self._tail + chunk
        # Runs of base32 characters found with bytes.find over a translated copy: a
        # regular expression ran at 26 MB/s over binaries, this at memory speed.
        marks = data.translate(_MARKS)
        at = marks.find(_RUN)
        while at >= 0:
            end = marks.find(b"\0", at)
            if end < 0:
                end = len(marks)
            run = data[at:end]
            for i in range(len(run) - HASH_PART_LEN + 1):
                self._add(run[i:i + HASH_PART_LEN].decode("ascii"))
            at = marks.find(_RUN, end)
        # A window may straddle the boundary: keep the last HASH_PART_LEN - 1 bytes (a
        # window wholly inside them was seen already; seeing it again is harmless).
        self._tail = data[-(HASH_PART_LEN - 1):]

    def _add(self, window: str) -> None:
        if self.filtered:
            if window in self._present:
                self.found.add(window)
            return
        self.found.add(window)
        if len(self.found) > MAX_CANDIDATES:
            self.filtered = True
            self._present = self._present_fn()
            self.found = {w for w in self.found if w in self._present}


class ServedStore:
    """The store as a binary cache: thread-safe, synchronous (call from worker threads)."""

    def __init__(self, vol: Volume, policy: Policy, keys: Sequence[SecretKey] = (), *,
                 dest: Sequence[bytes] = (b"nix", b"store"),
                 on_refused: Callable[[str, Verdict], None] | None = None) -> None:
        """`on_refused(path, verdict)` is told each refused file of a path not offered
        (once per tree version), e.g. to record it in the events log."""
        if keys:
            check_signing_policy(policy, dest)
        self.vol = vol
        self.policy = policy
        self.keys = tuple(keys)
        self.dest = tuple(dest)
        self.annotations = AnnotationStore(vol.store)
        self._gate = TrustGate(vol, policy, self.annotations)
        self._gate_lock = threading.Lock()  # the verdict caches are not thread-safe
        self._on_refused = on_refused
        self._scanned: OrderedDict[bytes, _Scanned] = OrderedDict()
        self._lock = threading.Lock()
        self._computing: dict[bytes, threading.Lock] = {}
        self._digests: OrderedDict[int, bytes] = OrderedDict()  # deferred digests
        self._logged: set[tuple[str, bytes]] = set()
        self.hashes_computed = 0  # NAR hashes computed (not from the cache): for tests

    def set_policy(self, policy: Policy) -> None:
        """Judge by a reloaded policy from the next request on (UsageError, and the
        old one stays, if it no longer guards what --key signs)."""
        if self.keys:
            check_signing_policy(policy, self.dest)
        with self._gate_lock:
            self.policy = policy
            self._gate.set_policy(policy)
        self._logged.clear()

    # -- finding and judging a path ----------------------------------------------------

    def _find(self, txn: lmdb.Transaction, hash_part: str) -> tuple[str, Attrs] | None:
        """The entry under dest whose name starts with `hash_part-`."""
        ns = self.vol.namespace
        try:
            d = ns.resolve(txn, list(self.dest))
        except AnnofsError:
            return None
        if not d.is_dir:
            return None
        # Entries are in byte order: the first after the bare hash is the candidate.
        for name, a in ns.listdir(txn, int(d.target), after=hash_part.encode()):
            text = name.decode("ascii", "replace")
            if not text.startswith(hash_part + "-"):
                return None
            try:
                check_base_name(text)
            except Exception:  # narinfo._Bad: not a store path name, nothing to serve
                return None
            return text, a
        return None

    def _present(self, txn: lmdb.Transaction) -> dict[str, str]:
        """Hash part -> base name of every store path under dest (a listing: only for
        a NAR with too many hash-like windows to keep)."""
        ns = self.vol.namespace
        try:
            d = ns.resolve(txn, list(self.dest))
        except AnnofsError:
            return {}
        out = {}
        if d.is_dir:
            for name, _a in ns.listdir(txn, int(d.target)):
                text = name.decode("ascii", "replace")
                if len(text) > HASH_PART_LEN and text[HASH_PART_LEN] == "-":
                    out[text[:HASH_PART_LEN]] = text
        return out

    def _walk(self, txn: lmdb.Transaction, base: str, top: Attrs) -> _Walked:
        """Key the tree by its content listing and judge every file and symlink."""
        ns = self.vol.namespace
        key = blake3.blake3()
        refused: list[tuple[str, Verdict]] = []
        first: bytes | None = None
        odd = False
        path0 = (*self.dest, base.encode())
        stack: list[tuple[tuple[bytes, ...], Attrs]] = [(path0, top)]
        while stack:
            path, a = stack.pop()
            rel = b"/".join(path[len(path0):])
            if a.is_dir:
                key.update(b"d" + _lp(rel))
                children = list(ns.listdir(txn, int(a.target)))
                stack.extend(((*path, n), c) for n, c in reversed(children))
                continue
            if a.is_symlink:
                assert isinstance(a.target, bytes)
                key.update(b"l" + _lp(rel) + _lp(a.target))
                content = symlink_content(a.target)
            elif a.is_reg:
                key.update(b"f" + _lp(rel) + (b"x" if a.mode & stat.S_IXUSR else b"-")
                           + int(a.target).to_bytes(8, "little"))
                content = self._version(txn, int(a.target))
            else:
                odd = True  # a FIFO, socket or device: no NAR can hold it
                continue
            if first is None:
                first = content.digest
            with self._gate_lock:
                verdict = content_verdict(self._gate, path, content, txn)
            if not verdict.allowed:
                refused.append(("/" + b"/".join(path).decode("utf-8", "backslashreplace"),
                                verdict))
        return _Walked(key.digest(), tuple(refused), first, odd)

    def _version(self, txn: lmdb.Transaction, vid: int) -> Version:
        """A file's version with its digest. One not recorded yet (the mount defers
        it after an edit) is computed here and remembered by version id (a version
        never changes), never written: this process only reads the store."""
        v = self.vol.versions.get(txn, vid)
        if v.digest is not None:
            return v
        digest = self._digests.get(vid)
        if digest is None:
            digest = self.vol.versions.compute_digest(txn, v)
            with self._lock:
                self._digests[vid] = digest
                while len(self._digests) > _CACHED_DIGESTS:
                    self._digests.popitem(last=False)
        return replace(v, digest=digest)

    def _record_refusal(self, base: str, walked: _Walked) -> None:
        if (base, walked.key) in self._logged:
            return
        if len(self._logged) >= _CACHED_TREES:
            self._logged.clear()  # bounded: at worst a refusal is said again
        self._logged.add((base, walked.key))
        path, verdict = walked.refused[0]
        more = len(walked.refused) - 1
        log.warning("nix serve: not offering %s/%s: %s is refused: %s%s", STORE_DIR, base,
                    path, verdict.reason, f" (and {more} more)" if more else "")
        if self._on_refused is not None:
            for p, v in walked.refused:
                self._on_refused(p, v)

    # -- the NAR hash ------------------------------------------------------------------

    def _scan(self, txn: lmdb.Transaction, key: bytes, where: tuple[bytes, ...]) -> _Scanned:
        """The cached scan of the tree with `key`, computed (once, whoever asks) if new."""
        with self._lock:
            hit = self._scanned.get(key)
            if hit is not None:
                self._scanned.move_to_end(key)
                return hit
            busy = self._computing.setdefault(key, threading.Lock())
        with busy:
            with self._lock:
                hit = self._scanned.get(key)
            if hit is not None:
                return hit
            try:
                got = self._dump_and_scan(txn, where)
            finally:
                with self._lock:
                    self._computing.pop(key, None)
            with self._lock:
                self.hashes_computed += 1
                self._scanned[key] = got
                while len(self._scanned) > _CACHED_TREES:
                    self._scanned.popitem(last=False)
            return got

    def _dump_and_scan(self, txn: lmdb.Transaction, where: tuple[bytes, ...]) -> _Scanned:
        scanner = RefScanner(lambda: frozenset(self._present(txn)))
        h = hashlib.sha256()
        size = 0
        for chunk in dump_volume_in(self.vol, txn, where):
            h.update(chunk)
            size += len(chunk)
            scanner.feed(chunk)
        return _Scanned(NarHash(h.digest(), size), frozenset(scanner.found), scanner.filtered)

    # -- what a request gets -----------------------------------------------------------

    def offer_in(self, txn: lmdb.Transaction, hash_part: str) -> Offer | None:
        """The offer for `hash_part` in the snapshot `txn`; None if absent or refused."""
        found = self._find(txn, hash_part)
        if found is None:
            return None
        base, top = found
        walked = self._walk(txn, base, top)
        if walked.odd:
            return None
        if walked.refused:
            self._record_refusal(base, walked)
            return None
        where = (*self.dest, base.encode())
        scanned = self._scan(txn, walked.key, where)
        built = self._built(txn, base, walked.first_digest, scanned.nar)
        if built:
            refs = built[0][0]
            sigs = [s for r, s in built if r == refs]
        else:
            # Each candidate looked up by its hash part: no listing of a big store.
            found = (self._find(txn, h) for h in scanned.candidates)
            refs = tuple(sorted(f[0] for f in found if f is not None))
            sigs = []
        offer = Offer(base, scanned.nar, refs, ())
        message = offer.fingerprint().encode()
        for k in self.keys:
            sigs.append(f"{k.name}:{base64.b64encode(k.sign(message)).decode()}")
        return replace(offer, sigs=tuple(dict.fromkeys(sigs)))

    def offer(self, hash_part: str) -> Offer | None:
        """`offer_in` a fresh snapshot."""
        with self.vol.store.read() as txn:
            return self.offer_in(txn, hash_part)

    def _built(self, txn: lmdb.Transaction, base: str, digest: bytes | None,
               nar: NarHash) -> list[tuple[tuple[str, ...], str]]:
        """(references, `NAME:BASE64`) of each recorded cache signature over this NAR
        (found by `digest`, any file's: such a statement covers every file of the tree)."""
        if digest is None:
            return []
        out = []
        path = f"{STORE_DIR}/{base}"
        for ss in self.annotations.covering(txn, digest):
            st = ss.statement
            if st.fingerprint is None or st.claim != NARINFO_CLAIM:
                continue
            m = _FINGERPRINT.fullmatch(st.fingerprint)
            if m is None or m.group(1) != path or int(m.group(3)) != nar.size \
                    or m.group(2) != base32.encode(nar.sha256):
                continue
            if not ss.signature_valid:
                continue
            refs = tuple(sorted(r.rsplit("/", 1)[1] for r in m.group(4).split(",") if r))
            out.append((refs, f"{st.signer}:{base64.b64encode(ss.envelope.sig).decode()}"))
        return out

    def nar(self, hash_part: str, nar_hash32: str) -> tuple[Offer, Iterator[bytes]] | None:
        """The offer and NAR of the path offered under `nar_hash32`, as chunks from one
        snapshot, or None (absent, refused, or the tree is no longer that NAR). The
        iterator holds a read transaction until it is exhausted or closed."""
        txn = self.vol.store.env.begin(buffers=False)
        try:
            offer = self.offer_in(txn, hash_part)
            if offer is None or base32.encode(offer.nar.sha256) != nar_hash32:
                txn.abort()
                return None
        except BaseException:
            txn.abort()
            raise
        return offer, _owning(txn, dump_volume_in(self.vol, txn,
                                                  (*self.dest, offer.base.encode())))


def check_signing_policy(policy: Policy, dest: Sequence[bytes]) -> None:
    """UsageError unless the policy enforces signatures on what is under `dest`.

    With `--key`, annofs signs every path it offers: under a policy that lets unsigned
    content be read there, anything anyone can write under `dest` (a user of a mount
    with --allow-other, a build) would go out with annofs's signature, which is what
    a key must never vouch for. So the key is refused, not the path.
    """
    shown = "/" + "/".join(p.decode("utf-8", "backslashreplace") for p in dest)
    if policy.mode is not Mode.ENFORCE:
        raise UsageError(f"--key signs every path served, but the policy's mode is "
                         f"{policy.mode.value!r}: it must be 'enforce'")
    rule = policy.rule_at([*dest, b"x" * HASH_PART_LEN + b"-x", b"x"])
    needed = rule.signers if rule is not None else (
        1 if policy.default is Default.REQUIRE else 0)
    if needed < 1:
        raise UsageError(f"--key signs every path served, but the policy lets unsigned "
                         f"content under {shown} be read: add a rule there that needs "
                         f"signers (or serve without --key)")


def _owning(txn: lmdb.Transaction, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """`chunks`, then the transaction is ended (also when the consumer closes early)."""
    try:
        yield from chunks
    finally:
        txn.abort()


def _lp(b: bytes) -> bytes:
    """Length-prefixed, so concatenations cannot be ambiguous."""
    return len(b).to_bytes(4, "little") + b
