"""What every command shares: finding the store, opening it, progress display."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from annofs.daemon.registry import read_state
from annofs.errors import UsageError
from annofs.volume import Volume


def default_store() -> Path:
    """--store, else $ANNOFS_STORE, else $XDG_DATA_HOME/annofs."""
    env = os.environ.get("ANNOFS_STORE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "annofs"


def store_path(ctx: click.Context) -> Path:
    """The store this invocation works on."""
    return ctx.find_root().obj["store"]


def require_unmounted(store: Path) -> None:
    """Writing to a store behind its daemon's back would leave the mount's caches stale."""
    state = read_state(store)
    if state is not None:
        raise UsageError(f"{store}: mounted at {state['mountpoint']}; "
                         f"use paths inside the mount")


@contextmanager
def open_volume(ctx: click.Context, *, create: bool = False,
                store: Path | None = None) -> Iterator[Volume]:
    """Open the invocation's store (or `store`) for the length of a command."""
    vol = Volume.open(store or store_path(ctx), create=create)
    try:
        yield vol
    finally:
        vol.close()


class Progress:
    """A progress bar on a terminal (files and bytes); silent otherwise."""

    def __init__(self, what: str, *, force: bool = False) -> None:
        """A bar on stderr if it is a terminal, or always with `force` (--progress)."""
        self._bar = None
        self._started = time.monotonic()
        if force or sys.stderr.isatty():
            # Imported here: tqdm is a fifth of a command's start-up, and most runs show none.
            from tqdm import tqdm

            self._bar = tqdm(desc=what, unit="B", unit_scale=True, unit_divisor=1024,
                             file=sys.stderr, leave=False, mininterval=0.25)
        self.files = 0

    def __call__(self, files: int, nbytes: int) -> None:
        self.files += files
        if self._bar is not None:
            self._bar.update(nbytes)
            rate = self.files / max(time.monotonic() - self._started, 1e-9)
            self._bar.set_postfix_str(f"{self.files} files, {rate:.0f} files/s", refresh=False)

    def close(self) -> None:
        """Draw the final counts, then remove the bar."""
        if self._bar is not None:
            self._bar.refresh()
            self._bar.close()
