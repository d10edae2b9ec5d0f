"""Reading PATH and PATH@VERSION arguments."""

from __future__ import annotations

from dataclasses import dataclass

from annofs.errors import UsageError
from annofs.namespace.tree import split_path


@dataclass(frozen=True)
class VersionedPath:
    """A store path, optionally pinned to one version of the file."""

    text: str
    parts: list[bytes]
    version: int | None


def parse_store_path(text: str) -> list[bytes]:
    """A path inside the store's namespace: absolute, no '..'."""
    if not text.startswith("/"):
        raise UsageError(f"{text}: store paths start with '/' (e.g. /src/foo)")
    return split_path(text)


def parse_versioned(text: str) -> VersionedPath:
    """PATH or PATH@VERSION; a name containing '@' stays a name unless digits follow."""
    path, sep, ver = text.rpartition("@")
    if sep and ver.isdigit():
        return VersionedPath(text, parse_store_path(path), int(ver))
    return VersionedPath(text, parse_store_path(text), None)
