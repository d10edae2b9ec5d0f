"""Reading PATH and PATH@VERSION arguments."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from annofs.daemon.registry import MountInfo, find_mount
from annofs.errors import UsageError


@dataclass(frozen=True)
class VersionedPath:
    """A store path, optionally pinned to one version of the file."""

    text: str
    parts: list[bytes]
    version: int | None


@dataclass(frozen=True)
class Target:
    """Where a PATH argument points: a store path, and the live mount it was given through."""

    text: str
    store: Path
    parts: list[bytes]
    mount: MountInfo | None


def resolve_target(text: str, default_store: Path) -> Target:
    """A host path inside a live annofs mount, else a path in `default_store`'s namespace."""
    found = find_mount(Path(os.path.abspath(text)))
    if found is not None:
        info, parts = found
        return Target(text, info.store, parts, info)
    return Target(text, default_store, parse_store_path(text), None)


def parse_store_path(text: str) -> list[bytes]:
    """A path inside the store's namespace: absolute, no '..'."""
    if not text.startswith("/"):
        raise UsageError(f"{text}: store paths start with '/' (e.g. /src/foo)")
    # Here, not at the top: a path inside a mount needs none of the store's layers.
    from annofs.namespace.tree import split_path

    return split_path(text)


def parse_versioned(text: str) -> VersionedPath:
    """PATH or PATH@VERSION; a name containing '@' stays a name unless digits follow."""
    path, sep, ver = text.rpartition("@")
    if sep and ver.isdigit():
        return VersionedPath(text, parse_store_path(path), int(ver))
    return VersionedPath(text, parse_store_path(text), None)


def split_version(text: str) -> tuple[str, int | None]:
    """PATH@VERSION -> (PATH, VERSION); a name containing '@' stays a name unless digits follow."""
    path, sep, ver = text.rpartition("@")
    if sep and ver.isdigit():
        return path, int(ver)
    return text, None
