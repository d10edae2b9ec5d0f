"""What every command shares: finding the store, opening it, progress display."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from annofs.errors import UsageError

# The store's layers (LMDB, the volume, the registry) are imported by the functions that
# use them: every command imports this module (main does, for default_store), and those
# imports were two thirds of the start-up of the commands that never open a store.
if TYPE_CHECKING:
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
    from annofs.daemon.registry import read_state

    state = read_state(store)
    if state is not None:
        raise UsageError(f"{store}: mounted at {state['mountpoint']}; "
                         f"use paths inside the mount")


@contextmanager
def open_volume(ctx: click.Context, *, create: bool = False,
                store: Path | None = None) -> Iterator[Volume]:
    """Open the invocation's store (or `store`) for the length of a command."""
    from annofs.volume import Volume

    vol = Volume.open(store or store_path(ctx), create=create)
    try:
        yield vol
    finally:
        vol.close()


def compact_after(store: Path, *, locked: bool = False) -> None:
    """At the end of a command that wrote offline: give LMDB's free pages back if the store
    is ours alone (store.compact). The command's work is done and committed, so a failure
    here (a full disk) is a warning, not an error: the store stays as it was."""
    import lmdb

    from annofs.store.compact import compact_store

    try:
        compact_store(store, locked=locked)
    except (OSError, lmdb.Error, ValueError) as e:
        click.echo(f"annofs: warning: {store}: compacting the LMDB file failed, the store "
                   f"is unchanged: {e}", err=True)


class Progress:
    """A progress bar on a terminal; silent otherwise.

    Without a total it counts bytes, with items (files, ...) and their rate beside it.
    With a total (`total=`, `set_total`, or a `phase`) it counts items against it, which
    gives a percentage and the time left, with the bytes beside it; `set_total(n,
    in_bytes=True)` counts bytes against a total of bytes instead.
    """

    def __init__(self, what: str, *, unit: str = "files", total: int | None = None,
                 force: bool = False) -> None:
        """A bar on stderr if it is a terminal, or always with `force` (--progress)."""
        self._show = force or sys.stderr.isatty()
        self._what, self._unit = what, unit
        self._bar = None
        self._by_items = False
        self._started = time.monotonic()
        self.files = 0
        self.bytes = 0
        self._open(what, total)

    @property
    def shown(self) -> bool:
        """Whether a bar is drawn at all (worth working out a total for)."""
        return self._show

    def _open(self, desc: str, total: int | None, in_bytes: bool = False) -> None:
        if not self._show:
            return
        # Imported here: tqdm is a fifth of a command's start-up, and most runs show none.
        from tqdm import tqdm

        self._by_items = total is not None and not in_bytes
        if self._by_items:
            self._bar = tqdm(desc=desc, total=total, unit=f" {self._unit}", file=sys.stderr,
                             leave=False, mininterval=0.25)
        else:
            self._bar = tqdm(desc=desc, total=total, unit="B", unit_scale=True,
                             unit_divisor=1024, file=sys.stderr, leave=False,
                             mininterval=0.25)

    def grow(self, nbytes: int) -> None:
        """More bytes are known to come (a walk found them): the byte total grows, and
        with it a percentage and time left, exact once the walk is done."""
        if self._bar is not None and not self._by_items:
            self._bar.total = (self._bar.total or 0) + nbytes

    def set_total(self, total: int, *, in_bytes: bool = False) -> None:
        """The total is known now (items, or bytes): count against it from here on."""
        self.phase(None, total, in_bytes=in_bytes)

    def phase(self, what: str | None, total: int | None, unit: str | None = None, *,
              in_bytes: bool = False) -> None:
        """A new stage of the work (its own bar, counted from zero)."""
        self.close()
        self._unit = unit or self._unit
        self.files = self.bytes = 0
        self._started = time.monotonic()
        self._open(f"{self._what}: {what}" if what else self._what, total, in_bytes)

    def __call__(self, files: int, nbytes: int) -> None:
        self.files += files
        self.bytes += nbytes
        if self._bar is None:
            return
        if self._by_items:
            self._bar.update(files)
            if self.bytes:
                self._bar.set_postfix_str(_size(self.bytes), refresh=False)
        else:
            self._bar.update(nbytes)
            rate = self.files / max(time.monotonic() - self._started, 1e-9)
            self._bar.set_postfix_str(f"{self.files} {self._unit}, {rate:.0f} {self._unit}/s",
                                      refresh=False)

    def close(self) -> None:
        """Draw the final counts, then remove the bar."""
        if self._bar is not None:
            self._bar.refresh()
            self._bar.close()
            self._bar = None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
