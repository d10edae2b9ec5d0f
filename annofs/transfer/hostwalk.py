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


def git_tracked(src: Path) -> set[str]:
    """Relative paths git tracks under `src`, as flakes take them: one `git` call in all."""
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "ls-files", "-z", "--cached", "--full-name", "."],
            check=True, capture_output=True,
        )
        top = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--show-prefix"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    except FileNotFoundError as e:
        raise UsageError("--git: the git command is not installed") from e
    except subprocess.CalledProcessError as e:
        msg = e.stderr.decode(errors="replace").strip().splitlines()
        raise UsageError(f"{src}: not a git work tree ({msg[-1] if msg else 'git failed'})") from e
    tracked = set()
    for raw in out.stdout.split(b"\0"):
        if not raw:
            continue
        name = os.fsdecode(raw)
        if top and name.startswith(top):
            name = name[len(top):]
        tracked.add(name)
    return tracked


def git_dirs(tracked: set[str]) -> set[str]:
    """Every directory that holds a tracked path (relative, '' for the top)."""
    dirs = {""}
    for rel in tracked:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return dirs
