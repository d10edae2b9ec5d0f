"""What the dashboard shows about the store: signature coverage per directory, and files.

Computed from the store directly (the namespace, versions, and the statements indexed by
digest), never through the mount, so looking cannot change what is judged. All functions
here block (LMDB reads, parsing statements): the dashboard calls them in a worker thread,
one at a time (`Dashboard.run`), which is what makes the caches below safe without locks.

A file is *signed* when some approval statement (not a label) with a valid signature
covers its digest, *labelled* when some label statement does; the policy, if there is
one, adds the verdict each file would get at open(). A file whose digest was not
computed yet (written through the mount, not hashed since) is *pending*: it counts as
unsigned, since nothing can be signed without its digest, and is not hashed here.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lmdb

from annofs.content.history import ancestry
from annofs.errors import UsageError
from annofs.namespace.tree import split_path
from annofs.store.records import Attrs, Version
from annofs.trust.annotations import AnnotationStore
from annofs.trust.gate import TrustGate
from annofs.trust.policy import statement_signer
from annofs.trust.statement import format_digest
from annofs.volume import Volume

# Past this many files directly in one directory, the listing stops (the counts do not).
MAX_LISTED = 2000
# Versions shown for one file, newest first.
MAX_VERSIONS = 200


def _when(ns_or_s: int, *, ns: bool) -> str:
    seconds = ns_or_s / 1e9 if ns else ns_or_s
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class Signature:
    """One statement over a content, as the dashboard shows it (no key material)."""

    statement: str  # id, hex
    signer: str  # the policy's name for the key if it trusts it, else the statement's
    trusted: bool | None  # None: no policy to ask
    claim: str
    label: str | None
    time: int
    names: tuple[str, ...]  # the subject names this content was signed under

    def to_json(self) -> dict[str, Any]:
        """For the page."""
        return {"statement": self.statement, "signer": self.signer, "trusted": self.trusted,
                "claim": self.claim, "label": self.label, "time": self.time,
                "when": _when(self.time, ns=False), "names": list(self.names)}


class Coverage:
    """What a tally needs of a content's statements: which keys signed it with which
    claims, which labels it has. Interned by the reader (compared by identity), so the
    40,000 files of a tree signed by one statement share one."""

    __slots__ = ("claims", "keys", "labels")

    def __init__(self, keys: frozenset[str], claims: frozenset[str],
                 labels: frozenset[str]) -> None:
        self.keys, self.claims, self.labels = keys, claims, labels


class DigestInfo:
    """The valid statements covering one content."""

    __slots__ = ("approvals", "coverage", "labels", "signatures")

    def __init__(self, signatures: tuple[Signature, ...], coverage: Coverage) -> None:
        self.signatures = signatures
        self.approvals = tuple(s for s in signatures if s.label is None)
        self.labels = tuple(s for s in signatures if s.label is not None)
        self.coverage = coverage


_NOTHING = Coverage(frozenset(), frozenset(), frozenset())
_NO_SIGNATURES = DigestInfo((), _NOTHING)


@dataclass
class Tally:
    """Counts over the regular files of a tree.

    Per file only three counters move; which keys, claims and labels cover how many
    files is worked out at the end from how many files each DigestInfo covers (a tree
    signed by one statement has a handful of those, whatever its size).
    """

    files: int = 0
    pending: int = 0
    refused: int = 0  # would be refused at open() under the policy (0 without one)
    by_coverage: Counter[Coverage] = field(default_factory=Counter)

    def add(self, info: DigestInfo, pending: bool, status: str) -> None:
        """Count one file."""
        self.files += 1
        self.pending += pending
        self.refused += status == "refused"
        self.by_coverage[info.coverage] += 1

    def merge(self, other: Tally) -> None:
        """Add another tree's counts."""
        self.files += other.files
        self.pending += other.pending
        self.refused += other.refused
        self.by_coverage.update(other.by_coverage)

    def to_json(self) -> dict[str, Any]:
        """For the page (counters as [name, count] pairs, most first)."""
        signed = labelled = 0
        keys: Counter[str] = Counter()
        claims: Counter[str] = Counter()
        labels: Counter[str] = Counter()
        for cov, n in self.by_coverage.items():
            if cov.keys:
                signed += n
                for k in cov.keys:
                    keys[k] += n
                for c in cov.claims:
                    claims[c] += n
            if cov.labels:
                labelled += n
                for lb in cov.labels:
                    labels[lb] += n
        return {"files": self.files, "signed": signed, "unsigned": self.files - signed,
                "labelled": labelled, "pending": self.pending, "refused": self.refused,
                "keys": keys.most_common(), "claims": claims.most_common(),
                "labels": labels.most_common()}


@dataclass(frozen=True)
class FileStatus:
    """One regular file: its current content and what covers it."""

    path: str
    version: int
    size: int
    digest: bytes | None
    info: DigestInfo
    status: str  # the verdict's status ("allowed", "refused", "warn", "off"), "" without
    reason: str

    def to_json(self) -> dict[str, Any]:
        """For the page."""
        return {"path": self.path, "name": self.path.rsplit("/", 1)[-1],
                "version": self.version, "size": self.size,
                "digest": format_digest(self.digest) if self.digest else None,
                "signed": bool(self.info.approvals), "labelled": bool(self.info.labels),
                "signers": sorted({s.signer for s in self.info.approvals}),
                "claims": sorted({s.claim for s in self.info.approvals}),
                "labels": sorted({f"{s.label} by {s.signer}" for s in self.info.labels}),
                "status": self.status, "reason": self.reason}


def parse_store_path(text: str) -> list[bytes]:
    """A store path from the page (`/src/proj`), as names; UsageError if malformed."""
    if not text.startswith("/"):
        raise UsageError(f"{text!r}: a store path starts with /")
    return split_path(text)


class CoverageReader:
    """Coverage, files and histories of one volume, with caches kept across requests.

    Caches: version id -> digest (a version never changes once its digest is known), and
    digest -> statements (dropped whenever the statement generation changes: a new
    signature anywhere may cover any content).
    """

    def __init__(self, vol: Volume, annotations: AnnotationStore,
                 gate: TrustGate | None = None) -> None:
        self.vol = vol
        self.annotations = annotations
        self.gate = gate
        self._digests: dict[int, bytes] = {}
        self._infos: dict[bytes, DigestInfo] = {}
        # (digest, rule index) -> (status, reason): as the gate's cache, without
        # decoding the version to ask it.
        self._verdicts: dict[tuple[bytes, int], tuple[str, str]] = {}
        self._coverages: dict[tuple[frozenset[str], ...], Coverage] = {}
        self._generation = -1
        self._policy_generation = -1

    # -- per content --------------------------------------------------------------------

    def _begin(self, txn: lmdb.Transaction) -> None:
        gen = self.annotations.generation(txn)
        pgen = self.gate.policy.generation if self.gate is not None else 0
        if gen != self._generation or pgen != self._policy_generation:
            self._infos.clear()
            self._verdicts.clear()
            self._coverages.clear()
            self._generation, self._policy_generation = gen, pgen
        if len(self._digests) > 1_000_000:
            self._digests.clear()

    def digest_info(self, txn: lmdb.Transaction, digest: bytes) -> DigestInfo:
        """The valid statements covering `digest` (cached)."""
        info = self._infos.get(digest)
        if info is not None:
            return info
        policy = self.gate.policy if self.gate is not None else None
        sigs = []
        for ss in self.annotations.covering(txn, digest):
            if not ss.signature_valid:
                continue
            st = ss.statement
            trusted = None if policy is None else (policy.is_trusted(st.public_key)
                                                   and policy.trusts_key_of(st))
            name = statement_signer(policy, ss)  # trusted, or the key
            # The index, not ss.names_of: that scans every subject of a tree statement.
            names = self.annotations.names_for(txn, digest, ss.id)
            sigs.append(Signature(ss.id.hex(), name, trusted, st.claim, st.label, st.time,
                                  tuple(names)))
        sigs.sort(key=lambda s: (s.time, s.statement))
        if not sigs:
            self._infos[digest] = _NO_SIGNATURES
            return _NO_SIGNATURES
        key = (frozenset(s.signer for s in sigs if s.label is None),
               frozenset(s.claim for s in sigs if s.label is None),
               frozenset(s.label for s in sigs if s.label is not None))
        cov = self._coverages.get(key)
        if cov is None:
            cov = self._coverages[key] = Coverage(*key)
        info = DigestInfo(tuple(sigs), cov)
        self._infos[digest] = info
        return info

    def _judge(self, txn: lmdb.Transaction, parts: Sequence[bytes],
               vid: int) -> tuple[bytes | None, DigestInfo, str, str]:
        """(digest, statements, verdict status, reason) of version `vid` at `parts`."""
        digest = self._digests.get(vid)
        version = None
        if digest is None:
            version = self.vol.versions.get(txn, vid)
            digest = version.digest
            if digest is None:
                return None, _NO_SIGNATURES, "", ""
            self._digests[vid] = digest
        info = self.digest_info(txn, digest)
        if self.gate is None:
            return digest, info, "", ""
        rule = self.gate.policy.rule_at(parts)
        key = (digest, rule.index if rule is not None else -1)
        hit = self._verdicts.get(key)
        if hit is None:
            if version is None:
                version = self.vol.versions.get(txn, vid)
            v = self.gate.verdict(parts, version, txn)
            hit = self._verdicts[key] = (v.status, v.reason)
        return digest, info, hit[0], hit[1]

    def file_status(self, txn: lmdb.Transaction, parts: Sequence[bytes],
                    a: Attrs) -> FileStatus:
        """The status of the regular file with attributes `a` at `parts`."""
        vid = int(a.target)
        digest, info, status, reason = self._judge(txn, parts, vid)
        return FileStatus(show_path(parts), vid, a.size, digest, info, status, reason)

    # -- a directory --------------------------------------------------------------------

    def coverage(self, path: Sequence[bytes]) -> dict[str, Any]:
        """Counts for the tree at `path`, for each subdirectory's tree, and the files
        directly in it (at most MAX_LISTED)."""
        parts = tuple(path)
        ns = self.vol.namespace
        with self.vol.store.read() as txn:
            self._begin(txn)
            top = ns.resolve(txn, parts)
            if not top.is_dir:
                raise UsageError(f"{show_path(parts)}: not a directory")
            total = Tally()
            dirs: list[dict[str, Any]] = []
            files: list[dict[str, Any]] = []
            others = 0
            for name, child, _link in ns.iter_entries(txn, int(top.target)):
                p = (*parts, name)
                if child.is_dir:
                    t = self._tree_tally(txn, p, int(child.target))
                    total.merge(t)
                    dirs.append({"name": name.decode("utf-8", "backslashreplace"),
                                 "path": show_path(p), **t.to_json()})
                elif child.is_reg:
                    f = self.file_status(txn, p, child)
                    total.add(f.info, f.digest is None, f.status)
                    if len(files) < MAX_LISTED:
                        files.append(f.to_json())
                else:
                    others += 1
        return {"path": show_path(parts), "total": total.to_json(), "dirs": dirs,
                "files": files, "unlisted": total.files - sum(d["files"] for d in dirs)
                - len(files), "others": others,
                "policy": self.gate is not None}

    def _tree_tally(self, txn: lmdb.Transaction, parts: tuple[bytes, ...],
                    dir_id: int) -> Tally:
        ns = self.vol.namespace
        t = Tally()
        stack = [(parts, dir_id)]
        while stack:
            dparts, did = stack.pop()
            for name, child, _link in ns.iter_entries(txn, did):
                if child.is_reg:
                    digest, info, status, _ = self._judge(txn, (*dparts, name),
                                                          int(child.target))
                    t.add(info, digest is None, status)
                elif child.is_dir:
                    stack.append(((*dparts, name), int(child.target)))
        return t

    # -- a file -------------------------------------------------------------------------

    def file(self, path: Sequence[bytes]) -> dict[str, Any]:
        """A file's current content, its versions along the edit graph (newest first),
        and the statements over each."""
        parts = tuple(path)
        with self.vol.store.read() as txn:
            self._begin(txn)
            a = self.vol.namespace.resolve(txn, parts)
            if not a.is_reg:
                raise UsageError(f"{show_path(parts)}: not a regular file")
            cur = self.file_status(txn, parts, a)
            chain = ancestry(txn, self.vol.versions, int(a.target))
            versions = []
            for v in chain[:MAX_VERSIONS]:
                info = self.digest_info(txn, v.digest) if v.digest else _NO_SIGNATURES
                versions.append({
                    "id": v.id, "parent": v.parent if v.id != v.parent else None,
                    "size": v.size, "when": _when(v.created_ns, ns=True),
                    "digest": format_digest(v.digest) if v.digest else None,
                    "fragments": v.count,
                    "edit": _edit_json(v), "root": v is chain[-1],
                    "signatures": [s.to_json() for s in info.signatures]})
        out = cur.to_json()
        out["signatures"] = [s.to_json() for s in cur.info.signatures]
        out["versions"] = versions
        out["more_versions"] = max(0, len(chain) - MAX_VERSIONS)
        return out


def _edit_json(v: Version) -> dict[str, int] | None:
    e = v.edit
    return None if e is None else {"start": e.start, "removed": e.removed, "added": e.added}


def show_path(parts: Sequence[bytes]) -> str:
    """A store path for the page: JSON text, so undecodable bytes are shown escaped."""
    return (b"/" + b"/".join(parts)).decode("utf-8", "backslashreplace")
