"""`annofs gc`: free what nothing references any more.

Kept: every version a name or a hard link refers to, their ancestors (the history that
`annofs log` shows; `prune_history` drops what no name refers to, a `Retention` rule
(`--keep-last N`, `--keep-within DURATION`) keeps only part of each history, and the
children of what goes are re-parented), every version whose digest a statement signs
(signed originals), and the empty root version. Everything else is deleted with its
fragment references; fragments left with none are freed, and so are fragments no version
ever took (a crashed import's) and staging trees a crash left behind; packs mostly of
freed fragments are compacted. Run with the store to itself (see store.lock).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass

import lmdb

from annofs.content.versions import EMPTY_VERSION
from annofs.maintenance.retention import Retention, retained
from annofs.store.keys import HASH_SIZE, from_u64
from annofs.store.records import (
    Version,
    decode_attrs,
    decode_link,
    decode_version,
)
from annofs.volume import Volume

Progress = Callable[[int, int], None]


@dataclass
class GcReport:
    """What gc freed."""

    versions_freed: int = 0
    fragments_freed: int = 0
    bytes_freed: int = 0
    staging_dropped: int = 0
    versions_kept: int = 0
    packs_compacted: int = 0  # rewritten without their dead bytes (content.fragments)


def signed_digests(vol: Volume, txn: lmdb.Transaction) -> set[bytes]:
    """Digests some statement signs (the trust layer's index, if the store has one)."""
    db = vol.store.db.get("signed_digests")
    if db is None:
        return set()
    with txn.cursor(db=db) as cur:
        return {bytes(k[:HASH_SIZE]) for k in cur.iternext(values=False)}


def _live_versions(vol: Volume, txn: lmdb.Transaction) -> set[int]:
    ids = set()
    with txn.cursor(db=vol.store.db["entries"]) as cur:
        for _k, raw in cur:
            a = decode_attrs(raw, "entry")
            if a.is_reg and not a.link:
                ids.add(int(a.target))
    with txn.cursor(db=vol.store.db["links"]) as cur:
        for k, raw in cur:
            link = decode_link(from_u64(k), raw)
            if link.attrs.is_reg:
                ids.add(int(link.attrs.target))
    return ids


def collect(vol: Volume, *, prune_history: bool = False, extra_roots: set[int] | None = None,
            keep_fragments: Set[bytes] = frozenset(),
            retention: Retention | None = None, now_ns: int | None = None,
            progress: Progress | None = None,
            on_total: Callable[[int], None] | None = None) -> GcReport:
    """Free unreferenced versions and fragments; returns what was freed.

    `retention` keeps only part of each file's history (see maintenance.retention), ages
    measured from `now_ns` (default: now); `prune_history` keeps none of it.

    Under a live mount, `extra_roots` are the versions open handles serve and
    `keep_fragments` the fragments of versions still being written (stored ahead of their
    version); the caller must keep new commits from interleaving (the daemon runs this on
    its event loop, where commits run too). `on_total` learns how many versions go before
    `progress` counts them.
    """
    rep = GcReport()
    ns = vol.namespace
    fragments_before = _fragment_count(vol)
    with vol.store.write() as txn:
        for root in ns.staging_roots(txn):
            ns.drop_root(txn, root)
            rep.staging_dropped += 1
    with vol.store.read() as txn:
        versions: dict[int, Version] = {
            from_u64(k): decode_version(from_u64(k), raw)
            for k, raw in txn.cursor(db=vol.store.db["versions"])}
        signed = signed_digests(vol, txn)
        live = _live_versions(vol, txn) | (extra_roots or set()) | {EMPTY_VERSION}
    keep = kept_versions(versions, live, signed, prune_history=prune_history,
                         retention=retention,
                         now_ns=time.time_ns() if now_ns is None else now_ns)
    rep.versions_kept = len(keep & versions.keys())
    doomed = [v for vid, v in versions.items() if vid not in keep]
    if on_total is not None:
        on_total(len(doomed))
    with vol.store.write() as txn:
        for v in versions.values():
            if v.id in keep and v.id != EMPTY_VERSION and v.parent not in keep:
                _reparent(vol, txn, v, versions, keep, keep_fragments)
        for v in doomed:
            rep.bytes_freed += vol.versions.delete(txn, v, keep_fragments)
            rep.versions_freed += 1
            if progress:
                progress(1, 0)
    _orphans, orphan_bytes = vol.fragments.free_unreferenced(keep_fragments)
    rep.bytes_freed += orphan_bytes
    rep.fragments_freed = fragments_before - _fragment_count(vol)
    vol.store.sync()
    # Packs mostly dead are rewritten; the old files go once the switch is synced (a
    # machine crash must not come back to an index pointing into a deleted pack).
    rep.packs_compacted, _ = vol.fragments.compact()
    if rep.packs_compacted:
        vol.store.sync()
    vol.fragments.drop_doomed()
    return rep


def kept_versions(versions: Mapping[int, Version], live: Set[int], signed: Set[bytes], *,
                  prune_history: bool, retention: Retention | None = None,
                  now_ns: int = 0) -> set[int]:
    """The versions gc keeps: `live` (what names, links and open handles refer to), every
    version whose digest a statement signs, the empty root, and, unless `prune_history`
    or an active `retention` rule, every ancestor of those; with a rule, the part of each
    history of `live` it keeps (ages from `now_ns`). One formula for gc and for fsck's
    "reclaimable"."""
    keep = set(live) | {EMPTY_VERSION}
    keep |= {vid for vid, v in versions.items() if v.digest is not None and v.digest in signed}
    if retention is not None and retention.active:
        keep |= retained(versions, live, retention, now_ns)
    elif not prune_history:
        for vid in list(keep):
            while vid in versions and versions[vid].parent not in keep:
                vid = versions[vid].parent
                keep.add(vid)
    return keep


def _fragment_count(vol: Volume) -> int:
    with vol.store.read() as txn:
        return vol.fragments.count(txn)


def _reparent(vol: Volume, txn: lmdb.Transaction, v: Version, versions: dict[int, Version],
              keep: set[int], keep_fragments: Set[bytes]) -> None:
    """Point a kept version at its nearest kept ancestor; its edit (and so the fragment
    references it holds) is recomputed before its old ancestors are deleted."""
    parent = v.parent
    while parent not in keep and parent in versions and parent != EMPTY_VERSION:
        parent = versions[parent].parent
    if parent not in keep:
        parent = EMPTY_VERSION
    base = versions.get(parent) or vol.versions.get(txn, parent)
    vol.versions.reparent(txn, v, base, keep_fragments)
