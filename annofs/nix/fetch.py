"""`annofs nix fetch`: store paths from Nix binary caches, verified first.

For each store path: read `<hash>.narinfo` from each `--cache` (a directory in the layout
`nix copy --to file://DIR` writes, or a `file://` or `http(s)://` URL: nix/cache.py),
check every `Sig` over the narinfo's fingerprint with the policy's trusted keys, and
refuse unless at least one signature by a trusted,
unrevoked key holds (`RefusedError`, exit 1). Then stream the NAR (decompressed on the
fly, never whole in memory) into `restore_nar_into`. It reads the whole NAR once
(spooled to a temporary file in the store directory, since a decompressor cannot seek)
and calls our `verify`, which compares its SHA-256 and size with the signed NarHash and
NarSize (and the unsigned FileHash and FileSize with the compressed file) before
anything is stored; then it builds the tree in a staging root, and our `before_swap`
records each signature as a statement in the same transaction that swaps the tree in:
a NAR that does not match adds nothing at all, and a tree never appears without its
signatures.

How a narinfo signature becomes a statement. A cache signs only the fingerprint
`1;PATH;sha256:NARHASH;NARSIZE;REFS`, not files, and not a DSSE envelope: annofs cannot
make an in-toto statement the cache key signed. So the statement (trust/statement.py,
`narinfo_statement`) carries the fingerprint itself, and its signature is the narinfo's
`Sig` bytes, verified against the fingerprint with the key's public half every time the
statement is read; the policy then treats it like any other statement (claim `built`,
distinct signers by public key). Its subjects are the digests of every regular file
and symlink of the tree (a NAR covers symlinks: their targets are signed content),
named `<hash>-<name>/<path>` as `annofs sign` of the store path would name them, so a
rule on `/nix/store/**` counts the cache keys as signers of each file and symlink.

What binds those subjects to the NarHash is the NAR they were restored from: this
module checks that binding as the tree is added, from the very bytes it restores. The
cache signature cannot vouch for it (it never covered file digests), which is why these
statements are not accepted from `attest import` (a file of them could attach a cache's
signature to any content); `annofs nix sign` re-checks the binding the other way, by
dumping the tree back to a NAR and hashing it, as `nix store verify` would.

A closure (`--recursive`) is resolved and every narinfo checked before any NAR is read;
each path is then added atomically on its own, references first (as Nix substitutes), so
a NAR found bad part-way leaves the paths before it, each complete and verified.
A path already present at its destination is not fetched again: its NAR hash is
computed from the tree, and if it equals the narinfo's, the signatures not yet recorded
are added; any other content there is a refusal.
"""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import lzma
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import lmdb

from annofs.errors import NotFoundError, RefusedError, UsageError
from annofs.nix.cache import BinaryCache, DirectoryCache, HttpCache, open_cache
from annofs.nix.narinfo import (
    HASH_PART_LEN,
    NarInfo,
    SigCheck,
    StorePath,
    check_signatures,
    distinct_signers,
    format_sha256,
    parse_narinfo,
    store_path_arg,
)
from annofs.nix.register import Registration
from annofs.transfer.nar import (
    NarError,
    NarHash,
    RestoredTree,
    SwapOn,
    dump_volume,
    nar_hash,
    restore_nar_into,
)
from annofs.trust.annotations import AnnotationStore
from annofs.trust.policy import Policy
from annofs.trust.signing import collect_files
from annofs.trust.statement import SignedStatement, Subject, narinfo_statement, symlink_digest
from annofs.volume import Volume

DEFAULT_DEST = (b"nix", b"store")
_READ = 1 << 20

Progress = Callable[[int, int], None]


# -- the NAR stream ----------------------------------------------------------------------------


def max_file_size(info: NarInfo) -> int:
    """The most bytes the NAR file of `info` may have: FileSize if the narinfo gives it,
    never more than the signed NarSize allows for any compression Nix writes (xz, bzip2,
    zstd and brotli grow incompressible data by well under 1/64, plus headers).

    FileSize and FileHash are not in the signed fingerprint: a hostile cache (or anyone
    on a plain http:// path) can claim a terabyte. Bounding by them alone let such a
    cache send endless bytes after a valid NAR: read for ever by a fetch, written to
    disk by a mount's mirror until it was full."""
    bound = info.nar_size + info.nar_size // 64 + (64 << 10)
    if info.compression == "none":
        bound = info.nar_size
    return bound if info.file_size is None else min(info.file_size, bound)


class _Hashing:
    """The compressed file as read: its SHA-256 and size, for FileHash and FileSize;
    never more than `limit` + 1 bytes (one past, so that too much is seen)."""

    def __init__(self, f: BinaryIO, limit: int) -> None:
        self._f = f
        self._left = limit + 1
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._f.read(n) if n else b""
        self.sha256.update(data)
        self.size += len(data)
        self._left -= len(data)
        return data

    def readinto(self, b: bytearray | memoryview) -> int:
        view = memoryview(b)[:self._left]
        n = self._f.readinto(view) if len(view) else 0  # type: ignore[attr-defined]
        if n:
            self.sha256.update(view[:n])
            self.size += n
            self._left -= n
        return n

    def drain(self) -> None:
        """Read what the decompressor left (e.g. padding after the last frame)."""
        while self.read(_READ):
            pass

    def readable(self) -> bool:
        return True


# What a corrupt or truncated stream raises: lzma and bz2 raise these (bz2 an OSError,
# both an EOFError when the stream stops early); zstandard its own ZstdError.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (lzma.LZMAError, EOFError, OSError)


def _decompressor(raw: _Hashing, compression: str
                  ) -> tuple[BinaryIO, tuple[type[BaseException], ...]]:
    """A reader of the decompressed stream, and the exceptions that mean it is corrupt."""
    if compression == "none":
        return raw, ()  # type: ignore[return-value]
    if compression == "xz":
        return lzma.LZMAFile(raw), _STREAM_ERRORS  # type: ignore[arg-type]
    if compression == "bzip2":
        return bz2.BZ2File(raw), _STREAM_ERRORS  # type: ignore[arg-type]
    import zstandard  # only zstd caches pay for loading it

    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                        closefd=False)
    return reader, (zstandard.ZstdError, *_STREAM_ERRORS)  # type: ignore[return-value]


class _NarStream:
    """The decompressed NAR, bounded by NarSize: a bigger stream (a decompression bomb,
    or the wrong file) stops as soon as it passes the size the narinfo signed, and a
    corrupt compressed stream is a refusal, not a crash."""

    def __init__(self, raw: _Hashing, info: NarInfo, where: str) -> None:
        self._raw = raw
        self._info = info
        self._where = where
        self._inner, self._errors = _decompressor(raw, info.compression)
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = _READ
        # One byte past NarSize is enough to know it is too long.
        n = min(n, self._info.nar_size + 1 - self.size)
        if n <= 0:
            return b""
        try:
            data = self._inner.read(n)
        except self._errors as e:
            raise RefusedError(f"{self._where}: the {self._info.compression} stream is "
                               f"corrupt ({e or type(e).__name__})") from None
        self.size += len(data)
        if self.size > self._info.nar_size:
            raise RefusedError(f"{self._where}: the NAR is larger than NarSize "
                               f"{self._info.nar_size} (the narinfo signed another NAR)")
        return data


# -- resolving narinfos ------------------------------------------------------------------------


@dataclass
class Resolved:
    """A store path's narinfos (the first, and others agreeing with it) and their worth."""

    store_path: StorePath
    sources: list[tuple[BinaryCache, NarInfo]]  # cache, narinfo; the first is primary
    checks: list[SigCheck]
    signers: dict[bytes, str]  # public key -> name, the signatures that count
    notes: list[str] = field(default_factory=list)

    @property
    def info(self) -> NarInfo:
        """The primary narinfo (the one the NAR is read through)."""
        return self.sources[0][1]


def read_narinfo(cache: BinaryCache, hash_part: str) -> NarInfo | None:
    """`<hash>.narinfo` of a cache, parsed; None if the cache has none."""
    path = f"{cache.where.rstrip('/')}/{hash_part}.narinfo"
    data = cache.narinfo(hash_part)  # at most MAX_NARINFO + 1: parse_narinfo refuses more
    if data is None:
        return None
    info = parse_narinfo(data, path)
    if info.store_path.hash_part != hash_part:
        raise RefusedError(f"{path}: describes {info.store_path}, not a path with hash "
                           f"{hash_part}")
    return info


def resolve(caches: Sequence[BinaryCache], hash_part: str, policy: Policy,
            expected: str | None = None) -> Resolved:
    """Find and check a store path's narinfos; RefusedError unless a trusted key signed it.

    Several caches may describe the path: those whose fingerprint equals the first's
    add their signatures (two builders that agree); one that disagrees is noted and
    counts for nothing.
    """
    sources: list[tuple[BinaryCache, NarInfo]] = []
    notes: list[str] = []
    for cache in caches:
        info = read_narinfo(cache, hash_part)
        if info is None:
            continue
        if expected is not None and expected not in (info.store_path.full,
                                                      info.store_path.base):
            raise RefusedError(f"{info.source}: describes {info.store_path}, not {expected}")
        if sources and info.fingerprint() != sources[0][1].fingerprint():
            notes.append(f"{info.source} disagrees ({info.nar_hash_text}, "
                         f"{info.nar_size} bytes): its signatures do not count")
            continue
        sources.append((cache, info))
    if not sources:
        where = ", ".join(c.where for c in caches)
        raise RefusedError(f"{expected or hash_part}: no {hash_part}.narinfo in {where}")
    merged: dict[str, SigCheck] = {}
    for _cache, info in sources:
        for c in check_signatures(info, policy):
            merged.setdefault(c.sig.text, c)
    checks = list(merged.values())
    signers = distinct_signers(checks)
    first = sources[0][1]
    if not signers:
        why = "; ".join(c.problem for c in checks) or "the narinfo has no Sig line"
        raise RefusedError(f"{first.store_path}: no valid signature by a trusted key ({why})")
    return Resolved(first.store_path, sources, checks, signers, notes)


def resolve_closure(caches: Sequence[BinaryCache], roots: Sequence[tuple[str, str | None]],
                    policy: Policy, recursive: bool) -> list[Resolved]:
    """Every requested path (and with `recursive` every reference, transitively),
    references before the paths that refer to them."""
    done: dict[str, Resolved] = {}
    order: list[Resolved] = []

    def visit(hash_part: str, expected: str | None, stack: set[str]) -> None:
        if hash_part in done or hash_part in stack:
            return
        r = resolve(caches, hash_part, policy, expected)
        stack.add(hash_part)
        if recursive:
            for ref in r.info.reference_paths():
                ref_hash = ref.rsplit("/", 1)[1][:HASH_PART_LEN]
                if ref_hash != hash_part:
                    visit(ref_hash, ref, stack)
        stack.discard(hash_part)
        done[hash_part] = r
        order.append(r)

    for hash_part, expected in roots:
        visit(hash_part, expected, set())
    return order


# -- adding ------------------------------------------------------------------------------------


@dataclass
class Fetched:
    """What fetching one store path did."""

    store_path: str
    dest: tuple[bytes, ...]
    files: int
    signers: list[str]
    statements: int  # new statements recorded
    already: bool  # the tree was there already (only signatures were added)
    nar_size: int
    notes: list[str]
    nar_hash: str = ""  # sha256:<nix base32>, as signed
    references: list[str] = field(default_factory=list)  # full store paths
    deriver: str | None = None  # full store path
    sigs: list[str] = field(default_factory=list)  # `name:base64` that verified, trusted
    ca: str | None = None  # the narinfo's CA, if it holds for this path and content

    def registration(self) -> Registration:
        """What Nix's database should record for this path (nix/register.py)."""
        return Registration(self.store_path, self.nar_hash, self.nar_size,
                            tuple(self.references), self.deriver, tuple(self.sigs),
                            self.ca)

    def to_json(self) -> dict[str, Any]:
        """As the daemon answers a command (names as text)."""
        d = dataclasses.asdict(self)
        d["dest"] = [p.decode("utf-8", "surrogateescape") for p in self.dest]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Fetched:
        """As `to_json` made it (the daemon's answer)."""
        return cls(**{**d, "dest": tuple(p.encode("utf-8", "surrogateescape")
                                         for p in d["dest"])})


def _nix_facts(vol: Volume, r: Resolved, dest: tuple[bytes, ...]) -> dict[str, Any]:
    info = r.info
    deriver = f"{info.store_path.store_dir}/{info.deriver}" if info.deriver else None
    # Only signatures that verified under a trusted, unrevoked key go to Nix's database.
    sigs = [c.sig.text for c in r.checks if c.counts]
    return {"nar_hash": info.nar_hash_text, "references": info.reference_paths(),
            "deriver": deriver, "sigs": sigs, "ca": _checked_ca(vol, r, dest)}


def _checked_ca(vol: Volume, r: Resolved, dest: tuple[bytes, ...]) -> str | None:
    """The narinfo's CA if it holds: the store path is the one the CA and references
    make, and the content (now at `dest`, its NAR checked against NarHash) hashes to
    it; else None. A cache's signature does not cover CA (the fingerprint lacks it):
    Nix would refuse to register a false one, and the gate would count it."""
    from annofs.trust.nixstore import parse_ca

    info = r.info
    ca = parse_ca(info.ca) if info.ca else None
    if ca is None:
        return None
    sp = info.store_path
    if ca.store_path(sp.name, info.reference_paths(), sp.full) != sp.full:
        return None
    got = info.nar_hash if ca.method == "recursive" else _file_sha256(vol, dest)
    return info.ca if got == ca.digest else None


def _file_sha256(vol: Volume, dest: tuple[bytes, ...]) -> bytes | None:
    """The SHA-256 of the regular file at `dest`; None if it is not one."""
    with vol.store.read() as txn:
        a = vol.namespace.resolve(txn, list(dest))
        if not a.is_reg:
            return None
        h = hashlib.sha256()
        for chunk in vol.versions.iter_bytes(txn, vol.versions.get(txn, int(a.target))):
            h.update(chunk)
        return h.digest()


def _subject_name(base: str, path: Sequence[bytes]) -> str:
    # As trust.signing names them: relative to the parent of the signed store path.
    return "/".join([base, *(p.decode("utf-8", "backslashreplace") for p in path)])


def _statements(r: Resolved, subjects: list[Subject]) -> list[SignedStatement]:
    fp = r.info.fingerprint()
    when = int(time.time())
    out = []
    for c in r.checks:
        if c.counts and c.key is not None:
            out.append(narinfo_statement(subjects, c.sig.key_name, c.key, fp, c.sig.sig, when))
    return out


def _record(vol: Volume, txn: lmdb.Transaction, ann: AnnotationStore, r: Resolved,
            files: list[tuple[Subject, int | None]]) -> int:
    """Record the signatures over (subject, version id) files and (subject, None)
    symlinks; how many new.

    A signature already recorded over the same subjects (an earlier fetch) is not
    recorded twice, although its statement's time would make it a new one.
    """
    if not files:
        return 0  # cannot happen for a well-formed NAR: its top node is one of these
    subjects = [s for s, _ in files]
    digests = frozenset(s.digest for s in subjects)
    have = {(ss.envelope.sig, ss.statement.fingerprint)
            for ss in ann.covering(txn, subjects[0].digest) if ss.digests == digests}
    added = 0
    for ss in _statements(r, subjects):
        if (ss.envelope.sig, ss.statement.fingerprint) in have:
            continue
        added += ann.add(txn, ss)
    if added:
        done: set[bytes] = set()
        for s, vid in files:
            if vid is not None and s.digest not in done:  # a symlink has no fragments
                done.add(s.digest)
                ann.index_fragments(txn, s.digest, vol.versions.get(txn, vid).hashes)
    return added


def _open_nar(r: Resolved) -> tuple[str, NarInfo, BinaryIO]:
    """The NAR file of the first agreeing cache that has it: (where, narinfo, stream)."""
    tried = []
    for cache, info in r.sources:
        where = f"{cache.where.rstrip('/')}/{info.url}"
        f = cache.open_nar(info.url, max_file_size(info))  # closed by the caller
        if f is not None:
            return where, info, f
        tried.append(where)
    raise RefusedError(f"{r.store_path}: the NAR is missing ({', '.join(tried)})")


def _check_nar(info: NarInfo, where: str, got_sha256: bytes, got_size: int) -> None:
    if got_size != info.nar_size:
        raise RefusedError(f"{where}: NAR size mismatch: {got_size} bytes, the narinfo "
                           f"signed NarSize {info.nar_size}")
    if got_sha256 != info.nar_hash:
        raise RefusedError(f"{where}: NAR hash mismatch: {format_sha256(got_sha256)}, the "
                           f"narinfo signed NarHash {info.nar_hash_text}")


def _check_file(info: NarInfo, where: str, raw: _Hashing) -> None:
    raw.drain()
    if raw.size > max_file_size(info):
        raise RefusedError(f"{where}: the NAR file goes on past {max_file_size(info)} bytes "
                           f"(FileSize, or what the signed NarSize {info.nar_size} allows)")
    if info.file_size is not None and raw.size != info.file_size:
        raise RefusedError(f"{where}: FileSize mismatch: {raw.size} bytes, the narinfo says "
                           f"{info.file_size}")
    if info.file_hash is not None and raw.sha256.digest() != info.file_hash:
        raise RefusedError(f"{where}: FileHash mismatch: "
                           f"{format_sha256(raw.sha256.digest())}, the narinfo says "
                           f"{format_sha256(info.file_hash)}")


def add_path(vol: Volume, r: Resolved, dest_dir: Sequence[bytes],
             progress: Progress | None = None, swap_on: SwapOn | None = None) -> Fetched:
    """Add one resolved store path at `dest_dir/<base name>` (see the module docstring)."""
    base = r.store_path.base
    dest = (*dest_dir, base.encode())
    ann = AnnotationStore(vol.store)
    signers = sorted(r.signers.values())
    if _exists(vol, dest):
        return _add_signatures(vol, ann, r, dest, signers)
    where, info, f = _open_nar(r)
    raw = _Hashing(f, max_file_size(info))
    stream = _NarStream(raw, info, where)
    counted: list[int] = []

    def verify(h: NarHash) -> None:
        # After the whole NAR was read and checked, before anything is stored.
        _check_nar(info, where, h.sha256, h.size)
        _check_file(info, where, raw)

    def before_swap(txn: lmdb.Transaction, tree: RestoredTree) -> None:
        # The tree was restored from a second read of the checked bytes: check those too.
        _check_nar(info, where, tree.nar.sha256, tree.nar.size)
        files: list[tuple[Subject, int | None]] = [
            (Subject(_subject_name(base, rf.path), rf.digest), rf.version) for rf in tree.files]
        files += [(Subject(_subject_name(base, path), symlink_digest(target), True), None)
                  for path, target in tree.links]
        counted.append(_record(vol, txn, ann, r, files))

    try:
        with f:
            tree = restore_nar_into(vol, stream, dest, source=where,  # type: ignore[arg-type]
                                    verify=verify, before_swap=before_swap,
                                    progress=progress, canonical=True, swap_on=swap_on)
    except NarError as e:
        # The signed NarHash describes a well-formed NAR: a malformed one is not it.
        raise RefusedError(f"{where}: not the NAR the narinfo signed ({e})") from None
    return Fetched(r.store_path.full, dest, len(tree.files), signers, counted[0], False,
                   info.nar_size, r.notes, **_nix_facts(vol, r, dest))


def _add_signatures(vol: Volume, ann: AnnotationStore, r: Resolved, dest: tuple[bytes, ...],
                    signers: list[str]) -> Fetched:
    """The path is there: if its NAR is the signed one, record the signatures over it."""
    where = "/" + b"/".join(dest).decode("utf-8", "backslashreplace")
    got = nar_hash(dump_volume(vol, dest))
    if (got.sha256, got.size) != (r.info.nar_hash, r.info.nar_size):
        raise RefusedError(f"{where}: already exists with other content "
                           f"({got}, {got.size} bytes; the narinfo signed "
                           f"{r.info.nar_hash_text}, {r.info.nar_size} bytes)")
    refs = collect_files(vol, [dest])
    files = [(ref.subject, None if ref.is_symlink else ref.version.id) for ref in refs]
    with vol.store.write() as txn:
        added = _record(vol, txn, ann, r, files)
    return Fetched(r.store_path.full, dest, len(files), signers, added, True,
                   r.info.nar_size, r.notes, **_nix_facts(vol, r, dest))


def _exists(vol: Volume, dest: tuple[bytes, ...]) -> bool:
    with vol.store.read() as txn:
        try:
            vol.namespace.resolve(txn, list(dest))
        except NotFoundError:
            return False
    return True


def _roots(paths: Sequence[str]) -> list[tuple[str, str | None]]:
    """(hash part, the path as given unless only a hash) for each STOREPATH argument."""
    if not paths:
        raise UsageError("no STOREPATH given")
    roots = []
    for p in paths:
        h = store_path_arg(p)
        roots.append((h, None if p == h else p.rstrip("/")))
    return roots


def fetch(vol: Volume, policy: Policy, caches: Sequence[BinaryCache | Path],
          paths: Sequence[str], *, dest: Sequence[bytes] = DEFAULT_DEST,
          recursive: bool = False, progress: Progress | None = None,
          swap_on: SwapOn | None = None) -> list[Fetched]:
    """Fetch `paths` (full store paths, base names or hash parts) from `caches` (a Path
    is a cache directory). `swap_on` runs each path's final swap (nar.restore_nar_into):
    a daemon fetching in a worker thread swaps on its event loop."""
    if not caches:
        raise UsageError("no --cache given")
    sources = [DirectoryCache(c) if isinstance(c, Path) else c for c in caches]
    order = resolve_closure(sources, _roots(paths), policy, recursive)
    return [add_path(vol, r, dest, progress, swap_on) for r in order]


def mirror_remote(caches: Sequence[BinaryCache], paths: Sequence[str], policy: Policy,
                  recursive: bool, into: Path) -> list[BinaryCache]:
    """Copy what a fetch of `paths` will read from remote caches into local directories
    under `into`: the narinfos, and the NARs of those a trusted key signed. Returns the
    caches to fetch from, remote ones replaced by their local copies (named as before).

    A mount's daemon calls this in a worker thread: the network is slow, and the event
    loop serves every process's requests. The fetch that follows, on the loop, then
    reads only local files, and checks everything again.
    """
    remote = [c for c in caches if isinstance(c, HttpCache)]
    if not remote:
        return list(caches)
    local = {id(c): DirectoryCache(into / str(i), c.where) for i, c in enumerate(remote)}
    for copy in local.values():
        (copy.path / "nar").mkdir(parents=True)
    order = resolve_closure(caches, _roots(paths), policy, recursive)
    for r in order:
        for cache, info in r.sources:
            copy = local.get(id(cache))
            if copy is None:
                continue
            data = cache.narinfo(r.store_path.hash_part)
            if data is not None:
                (copy.path / f"{r.store_path.hash_part}.narinfo").write_bytes(data)
            nar = copy.path / info.url
            if nar.exists():
                continue
            f = cache.open_nar(info.url, max_file_size(info))
            if f is None:
                continue  # missing there: the fetch says so, naming the cache
            nar.parent.mkdir(parents=True, exist_ok=True)
            # Bounded like the fetch (max_file_size: FileSize is not signed): a body
            # past it is a refusal there; here it need not be stored whole.
            limit = max_file_size(info) + 1
            with f, open(nar, "wb") as out:
                while limit > 0:
                    chunk = f.read(min(_READ, limit))
                    if not chunk:
                        break
                    out.write(chunk)
                    limit -= len(chunk)
    return [local.get(id(c), c) for c in caches]


def signers_text(names: Sequence[str]) -> str:
    """`cache-a-1, cache-b-1`."""
    return ", ".join(names)


def host_dir(text: str) -> Path:
    """A directory argument, absolute (the daemon may run in another directory)."""
    return Path(os.path.abspath(text))


def cache_args(texts: Sequence[str]) -> list[BinaryCache]:
    """The --cache arguments, each checked (a missing directory, an unknown scheme)."""
    return [open_cache(t) for t in texts]
