"""`annofs nix sign`: annofs as an independent rebuilder of a binary cache's paths.

For a store path present in the filesystem (at DEST/<hash>-<name>, `/nix/store` by
default) and described by `<hash>.narinfo` in a cache directory: dump the tree to a NAR,
hash it, and only if the hash and size equal the narinfo's NarHash and NarSize, add a
`Sig` line by the given key over the narinfo's fingerprint (Nix's key format: the
secret-key file `nix-store --generate-binary-cache-key` or `annofs key generate` writes).
Whoever trusts that key then counts it as one more builder that got the same NAR.

The narinfo is rewritten atomically (a new file renamed over the old, same mode), every
line as it was, the new `Sig` after the existing ones. Signing again with the same key
changes nothing (ed25519 signatures are deterministic).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from annofs.errors import RefusedError
from annofs.nix.cache import DirectoryCache
from annofs.nix.fetch import DEFAULT_DEST, read_narinfo
from annofs.nix.narinfo import sign_narinfo, store_path_arg
from annofs.transfer.nar import dump_volume, nar_hash
from annofs.trust.keys import SecretKey
from annofs.volume import Volume


@dataclass(frozen=True)
class Signed:
    """What signing one path did."""

    store_path: str
    narinfo: Path
    added: bool  # False: this key's signature was there already


def sign_path(vol: Volume, cache: Path, path: str, key: SecretKey, *,
              dest: Sequence[bytes] = DEFAULT_DEST) -> Signed:
    """Check the tree against its narinfo and add `key`'s Sig (see the module docstring)."""
    hash_part = store_path_arg(path)
    info = read_narinfo(DirectoryCache(cache), hash_part)
    if info is None:
        raise RefusedError(f"{path}: no {hash_part}.narinfo in {cache}")
    if path.startswith("/") and info.store_path.full != path.rstrip("/"):
        raise RefusedError(f"{info.source}: describes {info.store_path}, not {path}")
    where = (*dest, info.store_path.base.encode())
    got = nar_hash(dump_volume(vol, where))
    shown = "/" + b"/".join(where).decode("utf-8", "backslashreplace")
    if (got.sha256, got.size) != (info.nar_hash, info.nar_size):
        raise RefusedError(f"{shown}: its NAR is {got} ({got.size} bytes), the narinfo says "
                           f"{info.nar_hash_text} ({info.nar_size} bytes); not signing")
    sig = sign_narinfo(info, key)
    narinfo_file = Path(info.source)
    if any(s.text == sig.text for s in info.sigs):
        return Signed(info.store_path.full, narinfo_file, False)
    _replace(narinfo_file, info.with_sig(sig).encode("utf-8"))
    return Signed(info.store_path.full, narinfo_file, True)


def _replace(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, keeping its mode."""
    mode = path.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
