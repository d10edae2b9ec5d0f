"""`annofs fsck`: every count the store keeps must match what is stored, every byte its hash.

Checks, in one read snapshot:
- every fragment a version refers to exists and its bytes match its hash; its refcount
  equals its occurrences in the stored versions' edits (versions.own_counts; no
  refcount without an occurrence);
- every version's parent exists and its recorded edit matches it (what it does not own
  it must share with its parent); a recorded digest matches the content;
- every directory node's refcount equals the entries and roots pointing at it, nsubdirs
  its directory entries; no entry or root points at a missing node;
- every regular file entry's (or link's) version exists;
- every link's nlink equals the entries pointing at it.

It also reports what `annofs gc` would free (maintenance.reclaim): versions and
fragments nothing keeps, and staging trees of interrupted imports. That is not a
problem (fsck still says ok), only space that a gc gives back.
"""

from __future__ import annotations

import struct
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import lmdb

from annofs.content.versions import EMPTY_VERSION, compute_edit, own_counts, stored_hashes
from annofs.errors import CorruptionError
from annofs.maintenance.gc import signed_digests
from annofs.maintenance.reclaim import (
    Reclaimable,
    doomed_versions,
    freed_fragments,
    reachable_versions,
)
from annofs.store.keys import from_u64
from annofs.store.lock import imports_running
from annofs.store.records import (
    Attrs,
    Version,
    decode_attrs,
    decode_dir,
    decode_link,
    decode_version,
)
from annofs.volume import Volume

# (phase, items done, bytes done): phases are "fragments" then "digests".
Progress = Callable[[str, int, int], None]
T = TypeVar("T")


@dataclass
class FsckReport:
    """What a check found; `problems` empty means the store is consistent."""

    problems: list[str] = field(default_factory=list)
    fragments: int = 0
    fragment_bytes: int = 0
    versions: int = 0
    directories: int = 0
    entries: int = 0
    reclaimable: Reclaimable = field(default_factory=Reclaimable)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_store(vol: Volume, *, verify_data: bool = True,
                progress: Progress | None = None) -> FsckReport:
    """Check the whole store; with `verify_data`, read and hash every fragment and digest.

    `progress(phase, items, bytes)` is called as fragments are hashed and as version
    digests are checked (the two long parts); `phase_totals` gives their sizes up front.
    """
    rep = FsckReport()
    try:
        _check(vol, rep, verify_data, progress, imports_running(vol.store.path))
    except (lmdb.Error, struct.error) as e:
        # Damage below the records: LMDB's own pages (struct.error: a key cut short).
        rep.problems.append(f"the store's LMDB database is damaged ({type(e).__name__}: "
                            f"{e}); the check stopped there")
    return rep


def phase_totals(vol: Volume) -> dict[str, int]:
    """How many items each progress phase has (LMDB keeps entry counts: no scan)."""
    with vol.store.read() as txn:
        return {"fragments": vol.fragments.count(txn),
                "digests": int(txn.stat(vol.store.db["versions"])["entries"])}


def _check(vol: Volume, rep: FsckReport, verify_data: bool,
           progress: Progress | None, importing: bool) -> None:
    db = vol.store.db
    problems = rep.problems
    with vol.store.read() as txn:
        occurrences: Counter[bytes] = Counter()
        used: set[bytes] = set()
        versions = {}
        for key, raw in txn.cursor(db=db["versions"]):
            vid = from_u64(key)
            try:
                v = decode_version(vid, raw)
            except CorruptionError as e:
                problems.append(str(e))
                continue
            versions[vid] = v
            occurrences.update(own_counts(v))
            used.update(stored_hashes(v))  # a hole stores nothing
        rep.versions = len(versions)
        for v in versions.values():
            if v.parent not in versions:
                problems.append(f"version {v.id}: parent {v.parent} missing")
            elif v.id != EMPTY_VERSION and v.edit != compute_edit(
                    versions[v.parent], v.hashes, v.lengths):
                problems.append(f"version {v.id}: its edit does not match parent {v.parent}")
        problems += _cycles(versions)

        bad_fragments: set[bytes] = set()
        orphans, orphan_bytes = 0, 0  # stored, but no version took them
        frags = vol.fragments
        for h, stored in frags.iterate(txn):
            rep.fragments += 1
            rep.fragment_bytes += stored
            if h not in occurrences:
                orphans += 1
                orphan_bytes += stored
            if verify_data and (problem := frags.verify(txn, h)) is not None:
                problems.append(problem)
                bad_fragments.add(h)
            if progress:
                progress("fragments", 1, stored)
        for h in used:
            if not frags.has(txn, h):
                problems.append(f"fragment {h.hex()}: used but not stored")
        for h, n in occurrences.items():
            refs = frags.refcount(txn, h)
            if refs != n and frags.has(txn, h):  # else: "used but not stored" above
                problems.append(f"fragment {h.hex()}: refcount {refs}, occurrences {n}")
        for h, _ in frags.refcounts(txn):
            if h not in occurrences:
                problems.append(f"fragment {h.hex()}: refcount but no occurrence")
        problems += frags.check_packs(txn)

        if verify_data:
            for v in versions.values():
                if progress:
                    progress("digests", 1, v.size if v.digest is not None else 0)
                if v.digest is None or any(
                        v.fragment_hash(i) in bad_fragments for i in range(v.count)):
                    continue
                try:
                    digest = vol.versions.compute_digest(txn, v)
                except CorruptionError:
                    continue  # reported with its fragment
                if digest != v.digest:
                    problems.append(f"version {v.id}: digest does not match its content")

        dir_refs: Counter[int] = Counter()
        link_refs: Counter[int] = Counter()
        tree_roots: list[int] = []  # the root, and staging trees of running imports
        staging = 0
        for key, raw in txn.cursor(db=db["meta"]):
            name = bytes(key)
            if name == b"root" or name.startswith(b"staging:"):
                try:
                    a = decode_attrs(raw, f"{name.decode()} directory")
                except CorruptionError as e:
                    problems.append(str(e))
                    continue
                if not a.is_dir:
                    problems.append(f"{name.decode()}: not a directory")
                dir_refs[int(a.target)] += 1
                staging += name != b"root"
                if name == b"root" or importing:
                    tree_roots.append(int(a.target))

        entries: dict[int, list[tuple[bytes, Attrs]]] = defaultdict(list)
        for key, raw in txn.cursor(db=db["entries"]):
            dir_id, name = from_u64(key[:8]), bytes(key[8:])
            rep.entries += 1
            try:
                a = decode_attrs(raw, f"entry {name!r} of directory {dir_id}")
            except CorruptionError as e:
                problems.append(str(e))
                continue
            entries[dir_id].append((name, a))
            if a.link:
                link_refs[a.link] += 1
            elif a.is_dir:
                dir_refs[int(a.target)] += 1
            elif a.is_reg and int(a.target) not in versions:
                problems.append(f"entry {name!r} in directory {dir_id}: "
                                f"version {a.target} missing")

        dirs = _decode_all(txn, db["dirs"], decode_dir, problems)
        rep.directories = len(dirs)
        for dir_id, h in dirs.items():
            if h.refcount != dir_refs[dir_id]:
                problems.append(f"directory {dir_id}: refcount {h.refcount}, "
                                f"referenced {dir_refs[dir_id]} times")
            nsub = sum(1 for _, a in entries[dir_id] if a.is_dir and not a.link)
            if h.nsubdirs != nsub:
                problems.append(f"directory {dir_id}: nsubdirs {h.nsubdirs}, has {nsub}")
        problems += [f"directory {d}: referenced but missing" for d in dir_refs if d not in dirs]
        problems += [f"directory {d}: has entries but no node" for d in entries if d not in dirs]

        links = _decode_all(txn, db["links"], decode_link, problems)
        for lid, link in links.items():
            if link.nlink != link_refs[lid]:
                problems.append(f"link {lid}: nlink {link.nlink}, {link_refs[lid]} names")
            if link.attrs.is_reg and int(link.attrs.target) not in versions:
                problems.append(f"link {lid}: version {link.attrs.target} missing")
        problems += [f"link {lid}: referenced but missing" for lid in link_refs
                     if lid not in links]
        problems += [f"counter next:{c}: {n}, but {c} {last} exists (new ids would replace "
                     f"records)" for c, n, last in vol.store.damaged_counters(txn)]

        signed = signed_digests(vol, txn)
        doomed = doomed_versions(versions, reachable_versions(tree_roots, entries, links),
                                 signed)
        freed = freed_fragments(doomed, occurrences)
        freed_bytes = sum(frags.stored_bytes(txn, h) for h in freed)
        rep.reclaimable = Reclaimable(len(doomed), len(freed) + orphans,
                                      freed_bytes + orphan_bytes,
                                      0 if importing else staging,
                                      frags.reclaimable_pack_bytes(txn))


def _cycles(versions: dict[int, Version]) -> list[str]:
    """Versions whose parent chain loops instead of reaching the empty root."""
    reaches_root = {EMPTY_VERSION}
    found = []
    for vid in versions:
        chain: list[int] = []
        on_chain: set[int] = set()
        cur = vid
        while cur not in reaches_root and cur in versions and cur not in on_chain:
            chain.append(cur)
            on_chain.add(cur)
            cur = versions[cur].parent
        if cur in on_chain:
            found.append(f"version {cur}: its ancestry is a cycle")
        elif cur in reaches_root:
            reaches_root.update(chain)
    return found


def _decode_all(txn: lmdb.Transaction, db: object, decode: Callable[[int, bytes], T],
                problems: list[str]) -> dict[int, T]:
    """Every record of an id-keyed database; one that does not decode is a problem."""
    out: dict[int, T] = {}
    for k, raw in txn.cursor(db=db):
        try:
            out[from_u64(k)] = decode(from_u64(k), raw)
        except CorruptionError as e:
            problems.append(str(e))
    return out
