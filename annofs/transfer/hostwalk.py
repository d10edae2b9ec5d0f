"""Listing a host tree to import: every file, or only what git tracks, minus excludes."""

from __future__ import annotations

import fnmatch
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from annofs.errors import UsageError


def is_excluded(rel: str, patterns: Sequence[str]) -> bool:
    """Whether a relative path matches an --exclude glob (whole path or its base name)."""
    base = rel.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(base, p) for p in patterns)


def git_listing(src: Path) -> tuple[bytes, bytes]:
    """What git tracks under `src`, as flakes take it: `git ls-files -z` (one `git` call
    for the whole tree) and the work tree's prefix of `src`."""
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "ls-files", "-z", "--cached", "--full-name", "."],
            check=True, capture_output=True,
        )
        top = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--show-prefix"],
            check=True, capture_output=True,
        ).stdout.strip()
    except FileNotFoundError as e:
        raise UsageError("--git: the git command is not installed") from e
    except subprocess.CalledProcessError as e:
        msg = e.stderr.decode(errors="replace").strip().splitlines()
        raise UsageError(f"{src}: not a git work tree ({msg[-1] if msg else 'git failed'})") from e
    return out.stdout, top


def tracked_paths(listing: bytes, prefix: bytes) -> set[bytes]:
    """The relative paths (as bytes, the host's names) of a git_listing."""
    names = listing.split(b"\0")
    if prefix:
        names = [n[len(prefix):] if n.startswith(prefix) else n for n in names]
    tracked = set(names)
    tracked.discard(b"")
    return tracked


def git_dirs(tracked: set[bytes]) -> set[bytes]:
    """Every directory that holds a tracked path (relative, b'' for the top)."""
    dirs = {b""}
    for rel in tracked:
        # Up from the file's directory, until one already known: each directory's
        # ancestors were added with it (a join per level of every path was 0.2 s on
        # linux-6.1, a tenth of a --git re-import).
        i = rel.rfind(b"/")
        while i > 0:
            parent = rel[:i]
            if parent in dirs:
                break
            dirs.add(parent)
            i = rel.rfind(b"/", 0, i)
    return dirs


class HostFilter:
    """Which host entries an import takes: not --exclude'd, and with --git only what git
    tracks (and the directories holding it)."""

    def __init__(self, excludes: Sequence[str], tracked: set[bytes] | None) -> None:
        self.excludes = list(excludes)
        self.tracked = tracked
        self.tracked_dirs = git_dirs(tracked) if tracked is not None else set()

    def wanted(self, rel: bytes, is_dir: bool) -> bool:
        """Whether the entry at `rel` (relative to the imported directory) is taken."""
        if self.excludes and is_excluded(os.fsdecode(rel), self.excludes):
            return False
        if self.tracked is None:
            return True
        return rel in (self.tracked_dirs if is_dir else self.tracked)
