"""`annofs fsck --repair`: make the store's bookkeeping match what is stored.

Rewrites every count from the data (fragment refcounts, directory refcounts and
subdirectory counts, link name counts), drops directory nodes and links nothing reaches,
re-parents versions whose parent is gone, and corrects recorded digests. Never removes
anything reachable: a corrupt fragment or a missing version is reported, not "fixed".
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import lmdb

from annofs.content.versions import EMPTY_VERSION, compute_edit, own_counts
from annofs.errors import CorruptionError
from annofs.store.keys import from_u64, u64
from annofs.store.records import (
    DirHeader,
    Edit,
    decode_attrs,
    decode_dir,
    decode_link,
    decode_version,
    encode_dir,
    encode_link,
    encode_version,
)
from annofs.volume import Volume


def repair_store(vol: Volume) -> list[str]:
    """Fix what can be fixed in one write transaction; returns what was changed."""
    db = vol.store.db
    fixed: list[str] = []
    with vol.store.write() as txn:
        _repair_versions(vol, txn, fixed)
        reachable_dirs, link_names = _reachable(vol, txn)
        for k, _raw in list(txn.cursor(db=db["dirs"])):
            dir_id = from_u64(k)
            if dir_id not in reachable_dirs:
                for key in [bytes(k2) for k2, _ in _entries_of(txn, db["entries"], dir_id)]:
                    txn.delete(key, db=db["entries"])
                txn.delete(bytes(k), db=db["dirs"])
                fixed.append(f"directory {dir_id}: unreachable, dropped")
        for dir_id, (refs, nsub) in reachable_dirs.items():
            raw = txn.get(u64(dir_id), db=db["dirs"])
            want = DirHeader(refs, nsub)
            try:
                have = decode_dir(dir_id, raw) if raw is not None else None
            except CorruptionError:
                have = None
            if have != want:
                txn.put(u64(dir_id), encode_dir(want), db=db["dirs"])
                fixed.append(f"directory {dir_id}: header {have} -> {want}")
        for k, raw in list(txn.cursor(db=db["links"])):
            lid = from_u64(k)
            link = decode_link(lid, raw)
            n = link_names.get(lid, 0)
            if n == 0:
                txn.delete(bytes(k), db=db["links"])
                fixed.append(f"link {lid}: no names, dropped")
            elif link.nlink != n:
                txn.put(bytes(k), encode_link(dataclasses.replace(link, nlink=n)), db=db["links"])
                fixed.append(f"link {lid}: nlink {link.nlink} -> {n}")
        _repair_fragment_refs(vol, txn, fixed)
        for counter, n, last in vol.store.damaged_counters(txn):
            vol.store.put_meta(txn, f"next:{counter}", u64(last + 1))
            fixed.append(f"counter next:{counter}: {n} -> {last + 1}")
    vol.store.sync()
    return fixed


def _entries_of(txn: lmdb.Transaction, entries_db: object, dir_id: int) -> list:
    prefix = u64(dir_id)
    out = []
    with txn.cursor(db=entries_db) as cur:
        if cur.set_range(prefix):
            for key, raw in cur:
                if bytes(key[:8]) != prefix:
                    break
                out.append((bytes(key), raw))
    return out


def _reachable(vol: Volume, txn: lmdb.Transaction) -> tuple[dict[int, tuple[int, int]],
                                                           Counter[int]]:
    """dir id -> (references, subdirectories) for every node reachable from a root."""
    db = vol.store.db
    refs: Counter[int] = Counter()
    link_names: Counter[int] = Counter()
    todo = []
    for key, raw in txn.cursor(db=db["meta"]):
        name = bytes(key)
        if name == b"root" or name.startswith(b"staging:"):
            a = decode_attrs(raw, name.decode())
            refs[int(a.target)] += 1
            todo.append(int(a.target))
    seen: dict[int, tuple[int, int]] = {}
    while todo:
        dir_id = todo.pop()
        if dir_id in seen:
            continue
        nsub = 0
        for _key, raw in _entries_of(txn, db["entries"], dir_id):
            a = decode_attrs(raw, f"entry of directory {dir_id}")
            if a.link:
                link_names[a.link] += 1
            elif a.is_dir:
                nsub += 1
                refs[int(a.target)] += 1
                todo.append(int(a.target))
        seen[dir_id] = (0, nsub)
    return {d: (refs[d], nsub) for d, (_r, nsub) in seen.items()}, link_names


def _repair_versions(vol: Volume, txn: lmdb.Transaction, fixed: list[str]) -> None:
    db = vol.store.db["versions"]
    ids = {from_u64(k) for k in txn.cursor(db=db).iternext(values=False)}
    for vid in sorted(ids):
        v = decode_version(vid, txn.get(u64(vid), db=db))
        nv = v
        if vid != EMPTY_VERSION and v.parent not in ids:
            nv = dataclasses.replace(nv, parent=EMPTY_VERSION, edit=Edit(0, 0, v.count))
            fixed.append(f"version {vid}: parent {v.parent} missing, re-parented to the root")
        elif vid != EMPTY_VERSION:
            parent = decode_version(v.parent, txn.get(u64(v.parent), db=db))
            want = compute_edit(parent, v.hashes, v.lengths)
            if v.edit != want:
                nv = dataclasses.replace(nv, edit=want)
                fixed.append(f"version {vid}: edit recomputed against its parent")
        if v.digest is not None:
            try:
                digest = vol.versions.compute_digest(txn, v)
            except CorruptionError:
                digest = v.digest  # a damaged fragment is reported by fsck, not papered over
            if digest != v.digest:
                nv = dataclasses.replace(nv, digest=digest)
                fixed.append(f"version {vid}: digest corrected")
        if nv is not v:
            txn.put(u64(vid), encode_version(nv), db=db)


def _repair_fragment_refs(vol: Volume, txn: lmdb.Transaction, fixed: list[str]) -> None:
    db = vol.store.db
    occurrences: Counter[bytes] = Counter()
    for k, raw in txn.cursor(db=db["versions"]):
        occurrences.update(own_counts(decode_version(from_u64(k), raw)))
    frags = vol.fragments
    for h, have in list(frags.refcounts(txn)):
        if h not in occurrences:
            frags.set_refcount(txn, h, 0)
            fixed.append(f"fragment {h.hex()}: refcount {have} without a user, removed")
    for h, n in occurrences.items():
        have = frags.refcount(txn, h)
        if have != n and frags.set_refcount(txn, h, n):  # a fragment not stored has none
            fixed.append(f"fragment {h.hex()}: refcount {have} -> {n}")

