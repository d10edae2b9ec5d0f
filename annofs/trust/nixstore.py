"""The store-aware part of the gate: paths under /nix/store judged as Nix decides.

A policy with `nix-database = ".../nix/var/nix/db/db.sqlite"` makes the gate ask Nix's
database about every name `/nix/store/<name>/...` (the first component is the *store
path*; the volume's /nix/store is Nix's store directory, e.g. a chroot store
`local?root=R` with R/nix/store the mount's /nix/store, bind-mounted or mounted there):

- A store path Nix has not registered as valid is **in flight**: Nix (root) or a builder
  is still writing it, and reads it back before anything could have signed it (the
  restored tree of `--add-fixed`, a `.drv` it instantiates, a build output under
  `X.drv.chroot/nix/store/...`, `.lock` files, temporary directories). Its files are
  readable by root and by the uid owning the file (its writer), by nobody else, unless
  the gate's own verdict allows them anyway (annofs statements cover the content, or the
  rule needs no signers). A path nobody ever registers (a hostile user's
  `/nix/store/<hash>-evil`) stays in flight: others never read it.
- A **registered** store path is judged, for root too, on evidence annofs checks itself:
  (a) `ValidPaths.sigs` over Nix's fingerprint by trusted, unrevoked keys (each counts as
  a signer with claim `built`), only while the content in the mount has the registered
  NarHash (the NAR of the tree, hashed here and cached per store path and registration,
  re-hashed when a file of it is read at another version than the one hashed);
  (b) `ValidPaths.ca` (`fixed:r:sha256:`, `fixed:sha256:`, `text:sha256:`, `.drv` files
  included): self-certifying when the store path's hash computed from the CA and the
  references equals its name and the content hashes to the CA's hash; it satisfies a
  rule whose `claims` list `content-addressed` (only then: anyone can make a valid CA path
  of any content, so it proves the name, not the trust);
  (c) annofs's own statements (`built` from `nix fetch`, `source`, ...), as everywhere.
  Signers of (a) and (c) are counted together, by distinct key.
- `/nix/store/.links/<hash>` (hard links made by `--optimise`) is not a store path: a file
  with another name is judged under that name only; one with only `.links` names is in
  flight (root's: Nix made it, `--gc` deletes it).

The database is read read-only (`mode=ro`), one short autocommit SELECT at a time (never
a write lock; a busy database is retried briefly, then the path counts as unregistered:
in flight, root and its writer only). Registrations are cached per store path until the
database's files change (their size and mtime, one stat each per lookup).

This module does not decide: it adds evidence to the verdict the gate made
(`NixStore.adjust`); it never refuses what that verdict allows.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import lmdb

from annofs.errors import AnnofsError, NotFoundError
from annofs.store.records import Version
from annofs.transfer import nixbase32 as base32
from annofs.trust.keys import verify_signature
from annofs.trust.policy import Mode, Policy, Rule
from annofs.trust.verdict import Verdict
from annofs.volume import Volume

STORE = (b"nix", b"store")
STORE_DIR = "/nix/store"
LINKS = b".links"
BUILT = "built"
CONTENT_ADDRESSED = "content-addressed"
BUSY_TRIES = 5  # a busy database: tries, 20 ms apart, before giving up for this lookup
_MAX_CACHED = 65536
MAX_TREE_ENTRIES = 1 << 20  # files remembered across store paths' checks (~100 MB at most)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who opens: the caller's uid, and the uid owning the file (its writer)."""

    uid: int
    owner: int


STRANGER = Caller(-1, -2)  # a caller that is neither root nor any file's owner


@dataclass(frozen=True)
class Registration:
    """One row of Nix's ValidPaths, with its references (full store paths)."""

    id: int
    path: str
    nar_hash: bytes  # raw sha256
    nar_size: int
    sigs: tuple[str, ...]
    ca: str | None
    references: tuple[str, ...]

    def fingerprint(self) -> str:
        """What a Nix signature signs: `1;PATH;sha256:NIX32;SIZE;REF,REF`."""
        return (f"1;{self.path};sha256:{base32.encode(self.nar_hash)};{self.nar_size};"
                f"{','.join(sorted(self.references))}")


class NeedsThread(Exception):
    """Judging needs work the caller asked not to wait for (`may_hash=False`: on the
    event loop): the NAR hash of a store path not hashed yet (CPU and I/O over the whole
    tree), or a busy database's retries (sleeps)."""


class NixDatabaseError(AnnofsError):
    """Nix's database could not be read."""


class NixDatabase:
    """Nix's db.sqlite, read-only, with registrations cached until its files change."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one sqlite connection, asked from several threads
        self._stamp: tuple[int, ...] | None = None
        self._cache: dict[str, Registration | None] = {}

    def stamp(self) -> tuple[int, ...]:
        """The database's state as its files show it: (size, mtime) of db and its WAL."""
        out: list[int] = []
        for suffix in ("", "-wal"):
            try:
                st = os.stat(self.path + suffix)
            except FileNotFoundError:
                out += [-1, -1]
            else:
                out += [st.st_size, st.st_mtime_ns]
        return tuple(out)

    def lookup(self, store_path: str, *, wait: bool = True) -> Registration | None:
        """The registration of `store_path` (`/nix/store/<name>`), None if not valid.
        `wait=False`: a busy database raises NeedsThread instead of being retried."""
        stamp = self.stamp()
        with self._lock:
            if stamp != self._stamp:
                self._cache.clear()
                self._stamp = stamp
            elif store_path in self._cache:
                return self._cache[store_path]
            # No database yet: Nix has registered nothing.
            reg = None if stamp[0] < 0 else self._query(store_path, wait)
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            self._cache[store_path] = reg
            return reg

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            uri = "file:" + _uri_path(self.path) + "?mode=ro"
            # timeout: sqlite's own busy handler; autocommit: no transaction is left open.
            self._conn = sqlite3.connect(uri, uri=True, timeout=0.05,
                                         check_same_thread=False, isolation_level=None)
        return self._conn

    def _query(self, store_path: str, wait: bool = True) -> Registration | None:
        last: Exception | None = None
        for attempt in range(BUSY_TRIES):
            try:
                conn = self._connect()
                row = conn.execute("SELECT id, hash, narSize, sigs, ca FROM ValidPaths "
                                   "WHERE path = ?", (store_path,)).fetchone()
                if row is None:
                    return None
                refs = tuple(r[0] for r in conn.execute(
                    "SELECT v.path FROM Refs r JOIN ValidPaths v ON r.reference = v.id "
                    "WHERE r.referrer = ?", (row[0],)))
            except sqlite3.DatabaseError as e:  # busy, locked, or not readable
                last = e
                self.close()
                text = str(e).lower()
                if "locked" not in text and "busy" not in text:
                    break  # not a passing state: retrying would only slow every open
                if not wait:
                    raise NeedsThread(store_path) from None
                time.sleep(0.02 * (attempt + 1))
                continue
            rid, hash_text, nar_size, sigs, ca = row
            return Registration(int(rid), store_path, _parse_hash(hash_text),
                                int(nar_size or 0), tuple((sigs or "").split()), ca or None,
                                refs)
        raise NixDatabaseError(f"{self.path}: cannot read Nix's database: {last}")

    def close(self) -> None:
        """Close the connection (reopened on the next lookup)."""
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


def _uri_path(path: str) -> str:
    from urllib.parse import quote
    return quote(path, safe="/")


def _parse_hash(text: str) -> bytes:
    """ValidPaths.hash: `sha256:` + hex (as Nix writes it) or nix base32."""
    algo, _, body = (text or "").partition(":")
    if algo != "sha256":
        return b""
    try:
        if len(body) == 64:
            return bytes.fromhex(body)
        return base32.decode(body, 32)
    except (ValueError, AnnofsError):
        return b""


# -- content addresses -----------------------------------------------------------------


def _compress(digest: bytes, size: int = 20) -> bytes:
    out = bytearray(size)
    for i, b in enumerate(digest):
        out[i % size] ^= b
    return bytes(out)


def make_store_path(kind: str, digest_hex: str, name: str) -> str:
    """Nix's makeStorePath: `/nix/store/<nix32 of the folded sha256>-<name>`."""
    s = f"{kind}:sha256:{digest_hex}:{STORE_DIR}:{name}"
    h = _compress(hashlib.sha256(s.encode()).digest())
    return f"{STORE_DIR}/{base32.encode(h)}-{name}"


@dataclass(frozen=True)
class ContentAddress:
    """A parsed `ValidPaths.ca`."""

    method: str  # "text", "flat" or "recursive"
    digest: bytes  # sha256

    def store_path(self, name: str, references: Sequence[str], self_path: str) -> str | None:
        """The store path this CA and these references make (None: not computable)."""
        others = sorted(r for r in references if r != self_path)
        has_self = self_path in references
        if self.method == "text":
            if has_self:
                return None
            kind = ":".join(["text", *others])
            return make_store_path(kind, self.digest.hex(), name)
        if self.method == "recursive":
            kind = ":".join(["source", *others, *(["self"] if has_self else [])])
            return make_store_path(kind, self.digest.hex(), name)
        if references:
            return None  # a flat fixed output has no references
        inner = hashlib.sha256(f"fixed:out:sha256:{self.digest.hex()}:".encode()).hexdigest()
        return make_store_path("output:out", inner, name)


def parse_ca(text: str) -> ContentAddress | None:
    """`text:sha256:H`, `fixed:r:sha256:H`, `fixed:sha256:H` (H: nix base32 or hex);
    None for anything else (other hash types are not checked here)."""
    if text.startswith("text:"):
        method, rest = "text", text[5:]
    elif text.startswith("fixed:r:"):
        method, rest = "recursive", text[8:]
    elif text.startswith("fixed:"):
        method, rest = "flat", text[6:]
    else:
        return None
    digest = _parse_hash(rest)
    return ContentAddress(method, digest) if len(digest) == 32 else None


# -- evidence of one registered store path ---------------------------------------------


@dataclass
class TreeCheck:
    """The NAR of a store path in the mount, hashed at one snapshot: what each file was
    (version id, or symlink target) when it was, and what it hashed to."""

    manifest: dict[tuple[bytes, ...], object]
    sha256: bytes
    size: int
    flat_sha256: bytes | None  # a single regular file's own sha256 (text and flat CAs)


def _manifest(vol: Volume, txn: lmdb.Transaction, top: tuple[bytes, ...]
              ) -> dict[tuple[bytes, ...], object]:
    out: dict[tuple[bytes, ...], object] = {}

    def walk(a: object, rel: tuple[bytes, ...]) -> None:
        if a.is_reg:  # type: ignore[attr-defined]
            out[rel] = ("f", int(a.target), bool(a.mode & stat.S_IXUSR))  # type: ignore
        elif a.is_symlink:  # type: ignore[attr-defined]
            out[rel] = ("l", a.target)  # type: ignore[attr-defined]
        elif a.is_dir:  # type: ignore[attr-defined]
            out[rel] = ("d",)
            for name, child in vol.namespace.listdir(txn, int(a.target)):  # type: ignore
                walk(child, (*rel, name))
        else:
            out[rel] = ("?",)

    walk(vol.namespace.resolve(txn, list(top)), ())
    return out


def check_tree(vol: Volume, txn: lmdb.Transaction, top: tuple[bytes, ...],
               manifest: dict[tuple[bytes, ...], object] | None = None) -> TreeCheck:
    """Hash the store path `top` (its names) as it is in the snapshot `txn`; `manifest`:
    its files, if walked already in that snapshot."""
    from annofs.transfer.nar import dump_volume_in, nar_hash  # the NAR writer: only here

    if manifest is None:
        manifest = _manifest(vol, txn, top)
    h = nar_hash(dump_volume_in(vol, txn, top))
    flat = None
    entry = manifest.get(())
    if isinstance(entry, tuple) and entry[0] == "f":
        v = vol.versions.get(txn, entry[1])
        s = hashlib.sha256()
        for chunk in vol.versions.iter_bytes(txn, v):
            s.update(chunk)
        flat = s.digest()
    return TreeCheck(manifest, h.sha256, h.size, flat)


def _changed(before: dict[tuple[bytes, ...], object], after: dict[tuple[bytes, ...], object],
             top: str) -> str:
    names = sorted(set(before) | set(after))
    diff = [n for n in names if before.get(n) != after.get(n)]
    shown = [top + "".join("/" + p.decode("utf-8", "backslashreplace") for p in n)
             + (" added" if n not in before else " removed" if n not in after
                else " changed") for n in diff[:3]]
    more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
    return ", ".join(shown) + more


def check_sigs(policy: Policy, rule: Rule | None, reg: Registration) -> tuple[
        dict[bytes, str], list[str]]:
    """The trusted keys whose `ValidPaths.sigs` entry verifies over the fingerprint
    (claim `built`), and notes on those that do not count."""
    counted: dict[bytes, str] = {}
    notes: list[str] = []
    fp = reg.fingerprint().encode()
    by_name: dict[str, list[bytes]] = {}
    for key, names in policy.trusted.items():
        if policy.nix_keys is not None and key not in policy.nix_keys:
            continue
        for n in names:
            by_name.setdefault(n, []).append(key)
    for sig in reg.sigs:
        name, _, b64 = sig.partition(":")
        try:
            raw = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            notes.append(f"signature by {name}: not base64")
            continue
        keys = [k for k in by_name.get(name, ()) if verify_signature(k, fp, raw)]
        if not by_name.get(name):
            notes.append(f"signature by untrusted key {name}")
            continue
        if not keys:
            notes.append(f"signature by {name} does not verify over the fingerprint")
            continue
        key = keys[0]
        if key in policy.revoked:
            notes.append(f"signature by {name}: key revoked")
            continue
        if rule is not None and rule.claims is not None and BUILT not in rule.claims:
            notes.append(f"signature by {name}: claim 'built' not accepted here")
            continue
        if rule is not None and rule.keys is not None and key not in rule.keys:
            notes.append(f"signature by {name}: not one of this rule's keys")
            continue
        if rule is not None and (rule.user_presence or rule.user_verification):
            notes.append(f"signature by {name}: a Nix key has no FIDO token")
            continue
        counted.setdefault(key, policy.trusted[key][0])
    return counted, notes


class NixStore:
    """Nix's registrations of the volume's /nix/store, and the evidence they carry."""

    def __init__(self, vol: Volume, database: str) -> None:
        self.vol = vol
        self.db = NixDatabase(database)
        self._lock = threading.Lock()
        # store path name -> (registration id, last check, last check that matched)
        self._trees: dict[bytes, tuple[int, TreeCheck, TreeCheck | None]] = {}
        self._entries = 0  # manifest entries held by _trees
        # (registration id, policy generation, rule index) -> signers and notes
        self._sigs: dict[tuple[int, object, int], tuple[dict[bytes, str], list[str]]] = {}

    @staticmethod
    def covers(path: Sequence[bytes]) -> bool:
        """Whether `path` names something inside a store path (or .links)."""
        return len(path) > 2 and path[0] == STORE[0] and path[1] == STORE[1]

    def adjust(self, txn: lmdb.Transaction | None, policy: Policy, rule: Rule | None,
               path: Sequence[bytes], content: Version | object, verdict: Verdict,
               caller: Caller, *, may_hash: bool = True) -> Verdict:
        """`verdict` (the gate's, for `content` at `path`) with the Nix store's evidence:
        allowed as it was, or allowed on what Nix registered, or in flight for its
        writers. Unchanged outside the store and for what the gate already allows.
        `may_hash=False`: raise NeedsThread rather than hash a store path's NAR or wait
        for a busy database."""
        if verdict.satisfied or not self.covers(path) or policy.mode is Mode.OFF:
            return verdict
        view = build_view(path)
        name = bytes(view[2])
        if name == LINKS:
            return self._in_flight(policy, verdict, caller, "/nix/store/.links (a hard link "
                                   "--optimise made, not a store path)")
        text = name.decode("utf-8", "surrogateescape")
        store_path = f"{STORE_DIR}/{text}"
        try:
            reg = self.db.lookup(store_path, wait=may_hash)
        except NixDatabaseError as e:
            return self._in_flight(policy, verdict, caller, f"{store_path} ({e})")
        if reg is None:
            return self._in_flight(policy, verdict, caller,
                                   f"{store_path} is not registered by Nix")
        if view is path:
            return self._registered(txn, policy, rule, view, content, verdict, reg, may_hash)
        # Under a build's chroot: the store path it stands for if the file is that path's
        # (an input); else the build's own (a `--check` rebuilding a registered output, or
        # a path not in the mount), in flight for its writers like the chroot itself.
        try:
            judged: Verdict | None = self._registered(txn, policy, rule, view, content,
                                                      verdict, reg, may_hash)
        except NotFoundError:
            judged = None
        if judged is not None and judged.allowed:
            return judged
        flight = self._in_flight(policy, verdict, caller,
                                 f"{STORE_DIR}/{text_name(bytes(path[2]))} (a build's chroot)")
        return flight if flight.allowed or judged is None else judged

    def writer_in_flight(self, path: Sequence[bytes], caller: Caller) -> bool:
        """Whether `caller` opens `path` as a writer of a store path in flight (root, or
        the file's owner, of a path Nix has not registered, `.links` included): its
        verdict then does not depend on the content. Cheap and never waits: a database
        that is busy or cannot be read (Nix creating it, as the first of several
        processes does) leaves paths in flight, as `adjust` does."""
        if not self.covers(path) or not (caller.uid == 0 or caller.uid == caller.owner):
            return False
        path = build_view(path)
        name = bytes(path[2])
        if name == LINKS:
            return True
        try:
            return self.db.lookup(f"{STORE_DIR}/{text_name(name)}", wait=False) is None
        except (NeedsThread, NixDatabaseError):
            return True

    # -- in flight ---------------------------------------------------------------------

    def _in_flight(self, policy: Policy, verdict: Verdict, caller: Caller,
                   what: str) -> Verdict:
        writer = caller.uid == 0 or caller.uid == caller.owner
        if writer:
            who = "root" if caller.uid == 0 else f"uid {caller.uid}, its owner"
            reason = f"{verdict.rule}: in flight: {what}; readable by its writer ({who})"
            return dataclasses.replace(verdict, allowed=True, satisfied=True, missing="",
                                       reason=reason)
        missing = (f"in flight: {what}; only root and its owner (uid {caller.owner}) may "
                   f"read it until Nix registers it")
        return _refused(policy, verdict, missing)

    # -- registered --------------------------------------------------------------------

    def _registered(self, txn: lmdb.Transaction | None, policy: Policy, rule: Rule | None,
                    path: Sequence[bytes], content: object, verdict: Verdict,
                    reg: Registration, may_hash: bool) -> Verdict:
        top = tuple(bytes(p) for p in path[:3])
        rel = tuple(bytes(p) for p in path[3:])
        tree, before = self._tree(txn, top, rel, content, reg, may_hash)
        top_text = reg.path
        content_note = ""
        mine = _entry_of(content)
        have = tree.manifest.get(rel)
        stranger = mine is not None and (have is None or not _same(have, mine))
        if stranger:
            # Not the file the tree holds at that place (a copy under a build's chroot
            # named like a store path, or a file replaced since): nothing vouches for it.
            content_note = (f"{top_text}{_show_rel(rel)}: this file is not the one "
                            f"{top_text} holds there")
        elif (tree.sha256, tree.size) != (reg.nar_hash, reg.nar_size):
            changed = _changed(before.manifest, tree.manifest, top_text) if before else ""
            content_note = ("NarHash differs from the content: "
                            + (changed if changed else
                               f"registered sha256:{base32.encode(reg.nar_hash)} "
                               f"({reg.nar_size} bytes), the mount's NAR is "
                               f"sha256:{base32.encode(tree.sha256)} ({tree.size} bytes)"))
        counted: dict[bytes, str] = {}
        notes: list[str] = []
        if reg.sigs:
            key = (reg.id, policy.cache_generation(time.time()),
                   -1 if rule is None else rule.index)
            with self._lock:
                got = self._sigs.get(key)
            if got is None:
                got = check_sigs(policy, rule, reg)
                with self._lock:
                    if len(self._sigs) >= _MAX_CACHED:
                        self._sigs.clear()
                    self._sigs[key] = got
            counted, notes = dict(got[0]), list(got[1])
            if content_note and counted:
                notes.append(f"signatures by {', '.join(sorted(counted.values()))} do not "
                             f"count: {content_note}")
                counted = {}
        elif not reg.ca:
            notes.append("no signatures in Nix's database")
        ca_ok, ca_note = False, ""
        if reg.ca and stranger:
            ca_note = content_note
        elif reg.ca:
            ca_ok, ca_note = self._check_ca(reg, tree, text_name(top[2]))
            if ca_ok and rule is not None and rule.claims is not None \
                    and CONTENT_ADDRESSED not in rule.claims:
                ca_ok, ca_note = False, "content-addressed, but claim 'content-addressed' " \
                    "not accepted here"
            elif ca_ok and rule is not None and rule.claims is None:
                ca_ok, ca_note = False, ("content-addressed, but this rule does not list "
                                         "'content-addressed' in its claims")
        # Signers from annofs statements (the gate's verdict) and Nix signatures, by name
        # (the policy's first name for a key: both sides show keys so).
        names = set(verdict.signers) | set(counted.values())
        needed = verdict.needed
        malicious = bool(verdict.malicious)
        met = (len(names) >= needed or ca_ok) and not malicious
        signers = tuple(sorted(names))
        evidence = [f"{reg.path} registered by Nix"]
        if counted:
            evidence.append(f"signed by {', '.join(sorted(counted.values()))} in Nix's "
                            f"database")
        if ca_ok:
            evidence.append(f"content-addressed ({reg.ca}) and the content matches")
        if met:
            reason = f"{verdict.rule}: " + "; ".join(evidence) + (
                f" ({len(names)} of {needed} signers)" if not ca_ok else "")
            return dataclasses.replace(verdict, allowed=True, satisfied=True, missing="",
                                       signers=signers, reason=reason)
        why = [*notes, *([ca_note] if ca_note else [])]
        if content_note and not any(content_note in n for n in why):
            why.append(content_note)
        if malicious:
            lacking = verdict.missing
        else:
            lacking = (f"needs {needed} distinct trusted signer{'s' if needed != 1 else ''}"
                       f", has {len(names)}"
                       + (f" ({', '.join(signers)})" if signers else ""))
            if rule is not None and rule.claims is not None:
                lacking += f"; accepted claims: {', '.join(sorted(rule.claims))}"
        missing = (f"registered by Nix ({reg.path}); {lacking}"
                   + (f"; not counted: {'; '.join(why)}" if why else ""))
        return _refused(policy, dataclasses.replace(verdict, signers=signers), missing)

    def _tree(self, txn: lmdb.Transaction | None, top: tuple[bytes, ...],
              rel: tuple[bytes, ...], content: object, reg: Registration,
              may_hash: bool = True) -> tuple[TreeCheck, TreeCheck | None]:
        """The check of store path `top` current for the file read (`rel`, `content`):
        the cached one if that file is still what was hashed, else a new one."""
        mine = _entry_of(content)
        with self._lock:
            cached = self._trees.get(top[2])
        if cached is not None and cached[0] == reg.id:
            _rid, last, good = cached
            have = last.manifest.get(rel)
            if have is not None and (mine is None or _same(have, mine)):
                return last, good
        else:
            good = None
        if not may_hash:
            raise NeedsThread(reg.path)
        if txn is None:
            with self.vol.store.read() as own:
                tree = self._check(own, top, cached, reg)
        else:
            tree = self._check(txn, top, cached, reg)
        if cached is not None and tree is cached[1]:
            return tree, good  # nothing changed since: the file read is not the tree's
        matched = (tree.sha256, tree.size) == (reg.nar_hash, reg.nar_size)
        with self._lock:
            old = self._trees.pop(top[2], None)
            if old is not None:
                self._entries -= len(old[1].manifest) + len(old[2].manifest if old[2] else ())
            kept = (reg.id, tree, tree if matched else good)
            self._trees[top[2]] = kept
            self._entries += len(tree.manifest) + len(kept[2].manifest if kept[2] else ())
            # Bounded by entries, not paths: one store path can hold 100k files. The
            # oldest checks go first; losing one costs a re-hash, never a wrong answer.
            while self._entries > MAX_TREE_ENTRIES and len(self._trees) > 1:
                name = next(iter(self._trees))
                _rid, t, g = self._trees.pop(name)
                self._entries -= len(t.manifest) + len(g.manifest if g else ())
        return tree, good

    def _check(self, txn: lmdb.Transaction, top: tuple[bytes, ...],
               cached: tuple[int, TreeCheck, TreeCheck | None] | None,
               reg: Registration) -> TreeCheck:
        """A new check of `top`, or the cached one if the tree's files are the versions
        it hashed (a metadata walk: reading a file that is not the tree's, e.g. under a
        build chroot's name, again and again costs no NAR hash each time)."""
        manifest = _manifest(self.vol, txn, top)
        if cached is not None and cached[0] == reg.id and manifest == cached[1].manifest:
            return cached[1]
        return check_tree(self.vol, txn, top, manifest)

    def _check_ca(self, reg: Registration, tree: TreeCheck, name: str) -> tuple[bool, str]:
        ca = parse_ca(reg.ca or "")
        if ca is None:
            return False, f"content address {reg.ca!r} not checked by annofs"
        base = name.split("-", 1)
        if len(base) != 2:
            return False, f"{reg.path}: not a store path name"
        expected = ca.store_path(base[1], reg.references, reg.path)
        if expected != reg.path:
            return False, (f"content address {reg.ca} with its references makes "
                           f"{expected}, not {reg.path}")
        if ca.method == "recursive":
            got = tree.sha256
        else:
            if tree.flat_sha256 is None:
                return False, f"{reg.path}: content address {reg.ca} needs a regular file"
            got = tree.flat_sha256
        if got != ca.digest:
            return False, (f"content differs from its address {reg.ca}: the mount's is "
                           f"sha256:{base32.encode(got)}")
        return True, ""


def build_view(path: Sequence[bytes]) -> Sequence[bytes]:
    """The store path a name stands for: `/nix/store/X.drv.chroot/nix/store/<p>/...` is
    how a build (sandboxed in the chroot) sees `/nix/store/<p>/...` (Nix hard-links
    single-file inputs there, and writes outputs there first); other names are as given.
    The file must then be the one the store path holds (`_registered` checks), or be in
    flight as that store path."""
    if (len(path) > 5 and bytes(path[2]).endswith(b".drv.chroot")
            and path[3] == STORE[0] and path[4] == STORE[1]):
        return (STORE[0], STORE[1], *path[5:])
    return path


def _show_rel(rel: tuple[bytes, ...]) -> str:
    return "".join("/" + p.decode("utf-8", "backslashreplace") for p in rel)


def text_name(name: bytes) -> str:
    """A store path name as text (undecodable bytes kept as surrogates)."""
    return name.decode("utf-8", "surrogateescape")


def _entry_of(content: object) -> object | None:
    if isinstance(content, Version):
        return ("f", content.id)
    target = getattr(content, "target", None)
    if isinstance(target, bytes):
        return ("l", target)
    return None


def _same(have: object, mine: object) -> bool:
    assert isinstance(have, tuple) and isinstance(mine, tuple)
    return have[:2] == mine[:2]


def _refused(policy: Policy, verdict: Verdict, missing: str) -> Verdict:
    allowed = policy.mode is not Mode.ENFORCE
    reason = f"{verdict.rule}: {missing}"
    if policy.mode is Mode.WARN:
        reason = f"would be refused (mode warn): {reason}"
    return dataclasses.replace(verdict, allowed=allowed, satisfied=False, missing=missing,
                               reason=reason)


def store_names(paths: Sequence[Sequence[bytes]]) -> Iterator[Sequence[bytes]]:
    """The names to judge of a file known by `paths`: `.links` names only when the file
    has no other (an optimised file is judged under its store path's name)."""
    others = [p for p in paths if not (NixStore.covers(p) and bytes(p[2]) == LINKS)]
    return iter(others or paths)
