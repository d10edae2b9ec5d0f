"""Helpers for the bundle tests."""

from __future__ import annotations

from pathlib import Path


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file (bytes) and symlink (target) under `root`: to show nothing changed."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name == ".lock":
            continue
        if p.is_symlink():
            out[str(p.relative_to(root))] = str(p.readlink()).encode()
        elif p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    return out
