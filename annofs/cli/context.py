"""What every command shares: finding the store, opening it, progress display."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    """A progress bar on a terminal (files and bytes, or counted stages); silent otherwise."""

    def __init__(self, what: str, *, force: bool = False) -> None:
        """A bar on stderr if it is a terminal, or always with `force` (--progress)."""
        self._what = what
        self._show = force or sys.stderr.isatty()
        self._bar = None
        self._started = time.monotonic()
        self._unit = "files"
        if self._show:
            self._bar = self._new_bar(what, None, bytes_bar=True)
        self.files = 0

    @staticmethod
    def _new_bar(desc: str, total: int | None, *, bytes_bar: bool, unit: str = "it") -> Any:
        # Imported here: tqdm is a fifth of a command's start-up, and most runs show none.
        from tqdm import tqdm

        if bytes_bar:
            return tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                        file=sys.stderr, leave=False, mininterval=0.25)
        # A counted stage: tqdm shows the percentage and the time left from the total.
        return tqdm(desc=desc, total=total, unit=f" {unit}", file=sys.stderr, leave=False,
                    mininterval=0.25)

    def stage(self, desc: str, total: int | None, unit: str) -> None:
        """Start a counted stage (`total` items of `unit`, if known cheaply): the bar
        then shows a percentage and the time left instead of files and bytes."""
        self.close()
        self._unit = unit
        self.files = 0
        self._started = time.monotonic()
        if self._show:
            self._bar = self._new_bar(f"{self._what}: {desc}", total, bytes_bar=False,
                                      unit=unit)

    def __call__(self, files: int, nbytes: int) -> None:
        self.files += files
        if self._bar is None:
            return
        if self._bar.total is not None or self._unit != "files":
            self._bar.update(files)
            return
        self._bar.update(nbytes)
        rate = self.files / max(time.monotonic() - self._started, 1e-9)
        self._bar.set_postfix_str(f"{self.files} files, {rate:.0f} files/s", refresh=False)

    def close(self) -> None:
        """Draw the final counts, then remove the bar."""
        if self._bar is not None:
            self._bar.refresh()
            self._bar.close()
            self._bar = None
