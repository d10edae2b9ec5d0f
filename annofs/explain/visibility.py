"""What an explanation may show to whoever asks (issue 15, point 4).

An explanation quotes two contents: the signed original's lines and the refused file's
own (the diff). Through the mount anybody who can reach a file may ask
(`user.annofs.why`), so `for_caller` filters an `Explanation` for one caller. The
invariant: **an explanation never shows content its caller could not open.**

- The caller is a uid, its primary gid and its supplementary groups (read from
  /proc/PID/status of the asking process; the primary gid alone if that fails or the
  process is no longer the caller's). Root and the mount's owner (who can read the store
  itself) see everything.
- A candidate original is shown only if the caller could open it: it is found at a
  current path (its subject names, tried under each directory above the refused file)
  holding that very content, with search permission on every directory along the path
  and read permission on the file, judged from the stored modes and owners as the
  kernel's `default_permissions` would. A candidate not found at any current path (an
  old version, or content that only exists under names we did not try) is withheld:
  the safe side, since nobody's permission to read it can be shown.
- A withheld candidate keeps only what says that a signed original exists and who
  signed it: how it was found, each signer (a trusted name, or the untrusted key) with
  trusted/claim/label, and whether it counts here. Gone: its digest (a digest of a
  short secret can be confirmed by guessing), size, version, shared bytes, subject
  names (they are paths), statement ids and times.
- The diff quotes both sides: it is kept only if the original is shown and the caller
  may read the refused file itself at its path.
"""

from __future__ import annotations

import dataclasses
import stat
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import lmdb

from annofs.errors import AnnofsError
from annofs.explain.original import Candidate, Signature, version_ids_for_digest
from annofs.explain.report import Explanation, cap_text, explain
from annofs.store.records import Attrs, Version
from annofs.trust.gate import TrustGate
from annofs.trust.verdict import Verdict
from annofs.volume import Volume

WITHHELD_DIFF = "not shown: you may not read both files"
WALK_ENTRIES = 50_000  # entries looked at to find where a candidate is now
_READ, _SEARCH = 4, 1


@dataclass(frozen=True)
class Caller:
    """Who asks for an explanation."""

    uid: int
    gid: int
    groups: frozenset[int] = frozenset()
    sees_all: bool = False  # root, or the mount's owner

    def may(self, a: Attrs, bit: int) -> bool:
        """Whether permission `bit` (4 read, 1 search) of `a` is granted to this caller:
        the owner's bits for the owner, else the group's for a member, else the others'
        (exclusive classes, as the kernel checks them; no ACLs in annofs)."""
        if self.sees_all:
            return True
        mode = a.mode
        if a.uid == self.uid:
            return bool(mode >> 6 & bit)
        if a.gid == self.gid or a.gid in self.groups:
            return bool(mode >> 3 & bit)
        return bool(mode & bit)


def process_groups(pid: int, uid: int) -> frozenset[int]:
    """The supplementary groups of process `pid`, if its filesystem uid is `uid`.

    Empty when the process is gone or is not (any more) the caller: a reused pid must
    not lend another process's groups.
    """
    if pid <= 0:
        return frozenset()
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return frozenset()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    try:
        fsuid = int(fields["Uid"].split()[3])
        groups = frozenset(int(g) for g in fields.get("Groups", "").split())
    except (KeyError, IndexError, ValueError):
        return frozenset()
    return groups if fsuid == uid else frozenset()


def caller_of(uid: int, gid: int, pid: int, owner_uid: int) -> Caller:
    """The caller of a FUSE request (its context's uid, gid and pid)."""
    if uid in (0, owner_uid):
        return Caller(uid, gid, frozenset(), sees_all=True)
    return Caller(uid, gid, process_groups(pid, uid))


def readable_at(vol: Volume, txn: lmdb.Transaction, path: Sequence[bytes],
                caller: Caller) -> Attrs | None:
    """The file at `path` if `caller` could open it for reading there, else None."""
    ns = vol.namespace
    a = ns.root(txn)
    for name in path:
        if not a.is_dir or not caller.may(a, _SEARCH):
            return None
        child = ns.get(txn, int(a.target), name)
        if child is None:
            return None
        a = child
    if not stat.S_ISREG(a.mode) or not caller.may(a, _READ):
        return None
    return a


def _places(path: Sequence[bytes], c: Candidate) -> Iterator[tuple[bytes, ...]]:
    """Where the candidate may be now: each subject name under each directory above the
    refused file (the same guess a signed tree's layout suggests), nearest first."""
    seen: set[tuple[bytes, ...]] = set()
    for s in c.signatures:
        for name in s.names:
            comps = tuple(p.encode("utf-8", "surrogateescape") for p in name.split("/"))
            if any(p in (b"", b".", b"..") for p in comps):
                continue
            for k in range(len(path) - 1, -1, -1):
                place = (*path[:k], *comps)
                if place not in seen:
                    seen.add(place)
                    yield place


def visible_candidates(vol: Volume, txn: lmdb.Transaction, path: Sequence[bytes],
                       cands: Sequence[Candidate], caller: Caller) -> list[bool]:
    """For each candidate, whether `caller` could open its content at some current path.

    First the places its subject names suggest, then one breadth-first walk of the
    directories the caller may search, for all candidates still unseen (at most
    WALK_ENTRIES entries: beyond that, not found, so withheld), looking for a readable
    file holding one of the versions with that content.
    """
    if caller.sees_all:
        return [True] * len(cands)
    found = [False] * len(cands)
    wanted: dict[int, int] = {}  # version id -> candidate index, for the walk
    for i, c in enumerate(cands):
        ids = set(version_ids_for_digest(vol, txn, c.digest))
        if c.version is not None:
            ids.add(c.version.id)
        for place in _places(path, c):
            try:
                a = readable_at(vol, txn, place, caller)
            except AnnofsError:
                continue  # damaged or vanished: not evidence of permission
            if a is not None and int(a.target) in ids:
                found[i] = True
                break
        else:
            wanted.update((vid, i) for vid in ids)
    if wanted:
        for i in _walk_finds(vol, txn, wanted, caller):
            found[i] = True
    return found


def _walk_finds(vol: Volume, txn: lmdb.Transaction, wanted: dict[int, int],
                caller: Caller) -> set[int]:
    """Indexes (`wanted`'s values) of the versions found readable by the walk."""
    ns = vol.namespace
    root = ns.root(txn)
    out: set[int] = set()
    if not caller.may(root, _SEARCH):
        return out
    queue = deque([int(root.target)])
    seen = 0
    todo = set(wanted.values())
    try:
        while queue and out != todo:
            for _name, a, _link in ns.iter_entries(txn, queue.popleft()):
                seen += 1
                if seen > WALK_ENTRIES:
                    return out
                if a.is_dir:
                    if caller.may(a, _SEARCH):
                        queue.append(int(a.target))
                elif a.is_reg and int(a.target) in wanted and caller.may(a, _READ):
                    out.add(wanted[int(a.target)])
    except AnnofsError:
        return out  # what was found stays found; the rest stays withheld
    return out


def withheld(c: Candidate) -> Candidate:
    """`c` reduced to: a signed original exists, found this way, signed by these."""
    sigs = tuple(Signature(b"", s.signer, s.trusted, s.claim, s.label, 0, ())
                 for s in c.signatures)
    return dataclasses.replace(c, digest=b"", version=None, shared_bytes=0,
                               shared_fragments=0, signatures=sigs, withheld=True)


def for_caller(e: Explanation, vol: Volume, path: Sequence[bytes],
               caller: Caller) -> Explanation:
    """`e` (of the file at store path `path`) as `caller` may see it."""
    if caller.sees_all or not e.searched:
        return e
    with vol.store.read() as txn:
        own = readable_at(vol, txn, path, caller) is not None
        shown = visible_candidates(vol, txn, path, e.candidates, caller)
    cands = [c if ok else withheld(c) for c, ok in zip(e.candidates, shown, strict=True)]
    out = dataclasses.replace(e, candidates=cands)
    if e.candidates and not (own and shown[0]):
        out.diff, out.ranges = "", []
        if e.diff_kind:
            out.diff_kind = WITHHELD_DIFF
    return out


def why_xattr(gate: TrustGate, path: Sequence[bytes], version: Version,
              verdict: Verdict | None, caller: Caller) -> bytes:
    """The value of `user.annofs.why` for `caller`: the explanation as that caller may
    see it, at most XATTR_LIMIT bytes. CPU work: call it off the event loop."""
    e = explain(gate.volume, gate.annotations, gate.policy, path, version, verdict)
    return cap_text(for_caller(e, gate.volume, path, caller).to_text())
