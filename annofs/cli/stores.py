"""Which store a command's PATH arguments name, and how it is reached while mounted.

A PATH is a host path inside a live mount, or a path in the --store's namespace
(`paths.resolve_target`). While a store is mounted, a command given paths in the mount:

- first asks the daemon to store what open handles have written (`commit`), so the
  command reads, signs or exports what a process reading the mount would see;
- reads the store directly beside the daemon (LMDB serves readers in other processes);
- writes statements beside the daemon too, as an import fills its staging tree: every
  verdict cache (the mount's, the dashboard's) is keyed on the statements' generation,
  which the same write transaction bumps, so the next open in the mount judges by them;
- judges by the mount's policy when it needs one and none is given.

Writing to a mounted store through --store paths stays refused (`require_unmounted`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click

from annofs.cli.context import open_volume, require_unmounted, store_path
from annofs.cli.paths import Target, resolve_target
from annofs.daemon import client
from annofs.daemon.registry import MountInfo
from annofs.errors import UsageError
from annofs.store.lock import store_lock
from annofs.volume import Volume


@dataclass(frozen=True)
class StoreArgs:
    """PATH arguments that all lie in one store: the store, its mount (if they were given
    through one), and each argument's path in the store's namespace."""

    store: Path
    mount: MountInfo | None
    parts: list[list[bytes]]


def group_targets(ctx: click.Context, texts: Sequence[str]) -> list[StoreArgs]:
    """The arguments grouped by store (and by mount), in order of first appearance."""
    groups: dict[tuple[Path, bool], StoreArgs] = {}
    for text in texts:
        t = resolve_target(text, store_path(ctx))
        key = (t.store, t.mount is not None)
        if key not in groups:
            groups[key] = StoreArgs(t.store, t.mount, [])
        groups[key].parts.append(t.parts)
    return list(groups.values())


def one_store(ctx: click.Context, texts: Sequence[str]) -> StoreArgs:
    """The arguments' one store; UsageError if they name several (one statement, one store)."""
    if not texts:
        raise UsageError("no PATH given")
    groups = group_targets(ctx, texts)
    if len(groups) > 1:
        raise UsageError(f"{' and '.join(texts)}: not all in the same store or mount")
    return groups[0]


def settle(target: Target | StoreArgs) -> None:
    """A mounted store: have the daemon store what open handles wrote (see the docstring)."""
    if target.mount is not None:
        client.request(target.store, "commit")


@contextmanager
def reading(ctx: click.Context, target: Target | StoreArgs) -> Iterator[Volume]:
    """The volume the arguments are in, open for reading (mounted: beside the daemon)."""
    settle(target)
    with open_volume(ctx, store=target.store) as vol:
        yield vol


@contextmanager
def writing(ctx: click.Context, target: Target | StoreArgs, what: str) -> Iterator[Volume]:
    """The volume the arguments are in, open for adding statements, synced at the end.

    Offline, a mounted store is refused (its paths are to be given through the mount).
    """
    if target.mount is None:
        require_unmounted(target.store)
    settle(target)
    with store_lock(target.store, exclusive=False, what=what), \
            open_volume(ctx, store=target.store) as vol:
        yield vol
        vol.store.sync()


def mounted_store(ctx: click.Context) -> StoreArgs:
    """The invocation's store, through its daemon if it is mounted (for `attest import`,
    which names a file, not a path in the store)."""
    from annofs.daemon.registry import lookup, read_state

    store = store_path(ctx)
    state = read_state(store)
    if state is None:
        return StoreArgs(store, None, [])
    info = lookup(Path(os.path.abspath(state["mountpoint"])))
    if info is None:
        raise UsageError(f"{store}: its daemon (pid {state['pid']}) is not serving "
                         f"{state['mountpoint']}")
    return StoreArgs(store, info, [])


def mount_policy(target: Target | StoreArgs) -> Path | None:
    """The policy file of the mount the arguments were given through, if it has one."""
    if target.mount is None:
        return None
    got = client.request(target.store, "policy-file")["file"]
    return Path(got) if got else None
