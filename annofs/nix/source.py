"""`annofs nix add-source`: a tree held in annofs as the Nix store path Nix would make of it.

Nix adds a flake's `path:` input, `builtins.path` and `nix-store --add` of a directory as
a content-addressed path: `/nix/store/<h>-<name>` (name `source` for flake inputs) with
`h` from the recursive SHA-256 NAR hash (Nix's `makeFixedOutputPath`: the fingerprint
`source:sha256:<hex>:/nix/store:<name>`, SHA-256 folded to 20 bytes, Nix base32). Here
the tree is not copied byte by byte: the store path is an O(1) copy-on-write copy of
the directory (Namespace.copy), and only the NAR hash costs a read of the tree.

The NAR hash is cached per tree version. A tree's key is a BLAKE3 over its listing
(names, kinds, executable bits, file version ids, symlink targets), read from metadata
alone: a version id names one immutable content, so equal keys mean equal NARs. An
unchanged tree costs that metadata walk, no content read; the cache is a small file
in the store directory, so offline and mounted runs share it. What the cache cannot do
is rehash only the changed path after a one-file change: a NAR hash is SHA-256 over one
byte stream, and SHA-256 does not compose from the hashes of parts, so every byte after
the change (and, without a saved midstate, before it) is hashed again. See
SECURITY.md's notes on this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3
import lmdb

from annofs.errors import NotFoundError, UsageError
from annofs.nix.narinfo import format_sha256
from annofs.nix.register import STORE_DIR, Registration
from annofs.store.records import Attrs
from annofs.transfer import nixbase32 as base32
from annofs.transfer.nar import Listings, NarHash, hash_volume_in, show_path
from annofs.volume import Volume

CACHE_FILE = "nar-hash-cache.json"
_CACHE_ENTRIES = 4096  # trees remembered; the oldest go first
# Directory entries the key's walk keeps for the dump that follows a cache miss (about
# 300 bytes each, some 60 MB at most, held on a cache hit too until the key is known): a
# tree bigger than this lists the rest of its directories again.
_KEPT_ENTRIES = 200_000


def make_source_path(nar_sha256: bytes, name: str = "source",
                     store_dir: str = STORE_DIR) -> str:
    """The store path Nix gives a tree added recursively by SHA-256 with no references
    (`nix-store --add`, `builtins.path`, a flake's path: input)."""
    text = f"source:sha256:{nar_sha256.hex()}:{store_dir}:{name}"
    full = hashlib.sha256(text.encode()).digest()
    folded = bytearray(20)
    for i, b in enumerate(full):  # Nix's compressHash: XOR-fold to 20 bytes
        folded[i % 20] ^= b
    return f"{store_dir}/{base32.encode(bytes(folded))}-{name}"


def _lp(b: bytes) -> bytes:
    return len(b).to_bytes(8, "little") + b


def tree_key(vol: Volume, txn: lmdb.Transaction, top: Attrs,
             listings: Listings | None = None) -> bytes:
    """A key equal for two trees exactly when their NARs are: metadata only. Fills
    `listings` with the directories read (up to _KEPT_ENTRIES entries in all), for a
    dump of the same snapshot to use."""
    ns = vol.namespace
    key = blake3.blake3()
    stack: list[tuple[bytes, Attrs]] = [(b"", top)]
    kept = 0
    while stack:
        rel, a = stack.pop()
        if a.is_dir:
            key.update(b"d" + _lp(rel))
            children = list(ns.listdir(txn, int(a.target)))
            if listings is not None and kept + len(children) <= _KEPT_ENTRIES:
                listings[int(a.target)] = children
                kept += len(children)
            stack.extend((rel + b"/" + n, c) for n, c in reversed(children))
        elif a.is_symlink:
            assert isinstance(a.target, bytes)
            key.update(b"l" + _lp(rel) + _lp(a.target))
        elif a.is_reg:
            key.update(b"f" + _lp(rel) + (b"x" if a.mode & stat.S_IXUSR else b"-")
                       + int(a.target).to_bytes(8, "little"))
        else:
            where = rel.decode("utf-8", "backslashreplace") or "/"
            raise UsageError(f"{where}: a FIFO, socket or device cannot be put in a NAR")
    return key.digest()


class NarHashCache:
    """Tree key -> NAR hash and size, in a JSON file of the store directory."""

    def __init__(self, store_dir: Path) -> None:
        self.path = store_dir / CACHE_FILE
        self._entries: dict[str, list] = {}
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict):
                self._entries = {k: v for k, v in data.items()
                                 if isinstance(v, list) and len(v) == 2}
        except (OSError, ValueError):
            pass  # no cache, or a damaged one: it is only a cache

    def get(self, key: bytes) -> NarHash | None:
        """The cached NAR hash of the tree with `key`."""
        hit = self._entries.get(key.hex())
        if hit is None:
            return None
        try:
            return NarHash(bytes.fromhex(hit[0]), int(hit[1]))
        except (TypeError, ValueError):
            return None

    def put(self, key: bytes, h: NarHash) -> None:
        """Remember (and write the file atomically: other commands may read it)."""
        self._entries.pop(key.hex(), None)
        self._entries[key.hex()] = [h.sha256.hex(), h.size]
        while len(self._entries) > _CACHE_ENTRIES:
            self._entries.pop(next(iter(self._entries)))
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".nar-hash-cache-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._entries, f)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise


@dataclass(frozen=True)
class HashedTree:
    """A tree's NAR hash, the key it was cached under, and whether the cache had it."""

    nar: NarHash
    key: bytes
    cached: bool


def hash_tree(vol: Volume, txn: lmdb.Transaction, path: Sequence[bytes],
              cache: NarHashCache) -> HashedTree:
    """The NAR hash of the tree at `path` in one snapshot, from the cache if unchanged."""
    top = vol.namespace.resolve(txn, list(path))
    listings: Listings = {}
    key = tree_key(vol, txn, top, listings)
    hit = cache.get(key)
    if hit is not None:
        return HashedTree(hit, key, True)
    got = hash_volume_in(vol, txn, path, listings)
    cache.put(key, got)
    return HashedTree(got, key, False)


@dataclass(frozen=True)
class AddedSource:
    """What `add-source` made."""

    store_path: str  # /nix/store/<hash>-source
    dest: tuple[bytes, ...]  # where it is in the volume
    nar: NarHash
    cached: bool  # the NAR hash came from the cache
    already: bool  # the store path was there with this content

    def registration(self) -> Registration:
        """What Nix's database should record: as Nix's own addToStore of the tree, with
        its content address (recursive SHA-256, no references)."""
        nar = format_sha256(self.nar.sha256)
        return Registration(self.store_path, nar, self.nar.size, ca=f"fixed:r:{nar}")

    def to_json(self) -> dict[str, object]:
        """For the command's output (names as text)."""
        return {"store_path": self.store_path, "nar_hash": format_sha256(self.nar.sha256),
                "nar_size": self.nar.size, "cached": self.cached, "already": self.already,
                "dest": [p.decode("utf-8", "surrogateescape") for p in self.dest]}


def check_source_name(name: str) -> None:
    """A store path name Nix accepts (its checkName): what a user can mistype."""
    ok = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?=")
    if not name or len(name) > 211 or name.startswith(".") or not set(name) <= ok:
        raise UsageError(f"{name!r}: not a Nix store path name (letters, digits, +-._?=, "
                         f"not starting with '.', at most 211 characters)")


def existing(vol: Volume, txn: lmdb.Transaction, src: Sequence[bytes],
             dest: Sequence[bytes], want: NarHash, cache: NarHashCache) -> bool:
    """Whether `dest` holds a tree with NAR hash `want`, that of `src` (False if nothing
    is there); UsageError if something else is."""
    try:
        there = vol.namespace.resolve(txn, list(dest))
    except NotFoundError:
        return False
    if there.is_dir and not there.link and \
            there.target == vol.namespace.resolve(txn, list(src)).target:
        return True  # one shared directory node (an earlier add-source): the same tree
    if hash_tree(vol, txn, dest, cache).nar != want:
        raise UsageError(f"{show_path(dest)}: already exists with other content")
    return True


def add_source(vol: Volume, src: Sequence[bytes], dest_dir: Sequence[bytes],
               name: str = "source") -> AddedSource:
    """Offline: hash the tree at `src` and copy it, O(1), to `dest_dir/<hash>-<name>`,
    in the snapshot that was hashed (one write transaction)."""
    check_source_name(name)
    cache = NarHashCache(vol.store.path)
    with vol.store.write() as txn:
        if not vol.namespace.resolve(txn, list(src)).is_dir:
            raise UsageError(f"{show_path(src)}: not a directory")
        hashed = hash_tree(vol, txn, src, cache)
        store_path = make_source_path(hashed.nar.sha256, name)
        dest = (*dest_dir, store_path.rsplit("/", 1)[1].encode())
        if existing(vol, txn, src, dest, hashed.nar, cache):
            return AddedSource(store_path, dest, hashed.nar, hashed.cached, True)
        vol.namespace.make_dirs(txn, list(dest_dir), os.getuid(), os.getgid())
        vol.namespace.copy(txn, list(src), list(dest))
    return AddedSource(store_path, dest, hashed.nar, hashed.cached, False)
