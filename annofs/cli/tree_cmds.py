"""`annofs init`, `import`, `export`."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from annofs.cli.context import (
    Progress,
    compact_after,
    open_volume,
    require_unmounted,
    store_path,
)
from annofs.cli.paths import resolve_target
from annofs.cli.stores import reading
from annofs.daemon import client
from annofs.errors import UsageError
from annofs.store.lock import import_lease, store_lock

if TYPE_CHECKING:
    from annofs.transfer.import_tree import ImportStats
    from annofs.trust.git_signed import SignedHead


@click.command("init")
@click.pass_context
def init_cmd(ctx: click.Context) -> None:
    """Create a store (idempotent)."""
    with open_volume(ctx, create=True):
        pass
    click.echo(f"store ready at {store_path(ctx)}")


@click.command("import")
@click.option("--git", "git", is_flag=True, help="Only the files git tracks, as flakes do.")
@click.option("--exclude", "excludes", multiple=True, metavar="GLOB",
              help="Skip paths matching GLOB (relative path or base name); repeatable.")
@click.option("--progress", "show_progress", is_flag=True,
              help="Show the progress bar even when stderr is not a terminal.")
@click.option("--json", "as_json", is_flag=True,
              help="The summary as one JSON object (see the README for its fields).")
@click.option("--verify-signatures", "verify_signatures", is_flag=True,
              help="With --git: HEAD must be a signed tag or commit (gpg.format = ssh) by a "
                   "key of the policy's trusted-ssh-signers, the work tree clean; records "
                   "a 'source' statement over every imported file.")
@click.option("--policy", "policy_file", type=click.Path(path_type=Path), default=None,
              help="The policy whose trusted-ssh-signers --verify-signatures checks "
                   "(default: $ANNOFS_POLICY).")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dest")
@click.pass_context
def import_cmd(ctx: click.Context, git: bool, excludes: tuple[str, ...], show_progress: bool,
               as_json: bool, verify_signatures: bool, policy_file: Path | None, src: Path,
               dest: str) -> None:
    """Copy the host directory SRC into the store at DEST; unchanged files are not read.

    DEST is a path inside a mounted annofs (the mount shows the import at once), or a path
    in the --store's namespace.
    """
    from annofs.transfer.import_tree import TreeImporter  # lazy: other commands skip it

    head = None
    if verify_signatures:
        head = _signed_head(git, excludes, policy_file, src)
    target = resolve_target(dest, store_path(ctx))
    if target.mount is None:
        require_unmounted(target.store)
    started = time.monotonic()
    progress = Progress("import", force=show_progress)
    try:
        # The lease keeps a gc (offline: the store lock; under a mount: the daemon) from
        # taking the fragments and staging tree not referenced yet for garbage.
        with store_lock(target.store, exclusive=False, what="import"), \
                import_lease(target.store), open_volume(ctx, store=target.store) as vol:
            importer = TreeImporter(vol, excludes=excludes, git=git, progress=progress,
                                    to_read=progress.grow if progress.shown else None)
            stats = importer.run(src, target.parts, staging=(
                DaemonStaging(target.store) if target.mount is not None else None))
        if target.mount is None:
            compact_after(target.store)  # the lock let go: only if no other writer came
    finally:
        progress.close()
    took = time.monotonic() - started
    if head is not None:
        _record_source(ctx, src, dest, head)
    if as_json:
        click.echo(json.dumps(import_json(str(src), dest, stats, took)))
    else:
        _import_summary(src, dest, stats, took)
    if stats.scan_helper_died:  # the import is whole; only slower than it should be
        click.echo("annofs: warning: the scan helper process ended early; this import "
                   "scanned the rest itself", err=True)


def _signed_head(git: bool, excludes: tuple[str, ...], policy_file: Path | None,
                 src: Path) -> SignedHead:
    """--verify-signatures: check the work tree and HEAD's signature before importing."""
    from annofs.cli.trust_cmds import given_policy
    from annofs.trust.git_signed import signed_head

    if not git:
        raise UsageError("--verify-signatures needs --git (the signed commit's files are the "
                         "tracked ones)")
    if excludes:
        raise UsageError("--verify-signatures imports the whole signed commit: no --exclude")
    return signed_head(src, given_policy(policy_file))


def _record_source(ctx: click.Context, src: Path, dest: str, head: SignedHead) -> None:
    """After the import: the tree must still be that commit's; record the statement."""
    from annofs.cli.stores import one_store, writing
    from annofs.trust.git_signed import check_clean, record_source

    if check_clean(src) != head.source.commit:
        raise UsageError(f"{src}: HEAD moved during the import; no statement recorded")
    target = one_store(ctx, (dest,))
    with writing(ctx, target, "import --verify-signatures") as vol:
        ss, n = record_source(vol, target.parts[0], head)
    click.echo(f"{head.describe()}: source statement over {n} file"
               f"{'s' if n != 1 else ''}, {ss.id.hex()[:16]}", err=True)


def import_json(src: str, dest: str, stats: ImportStats, took: float) -> dict[str, object]:
    """`import --json`: {"src", "dest", "files", "files_read", "files_unchanged", "dirs",
    "symlinks", "hard_links", "removed", "bytes_read", "new_bytes", "seconds"}."""
    return {"src": src, "dest": dest, "files": stats.files, "files_read": stats.files_read,
            "files_unchanged": stats.files_reused, "dirs": stats.dirs,
            "symlinks": stats.symlinks, "hard_links": stats.hard_links,
            "removed": stats.removed, "bytes_read": stats.bytes_read,
            "new_bytes": stats.new_bytes, "seconds": round(took, 3)}


def _import_summary(src: Path, dest: str, stats: ImportStats, took: float) -> None:
    click.echo(
        f"imported {src} -> {dest}: {stats.files} files ({stats.files_read} read, "
        f"{stats.files_reused} unchanged), {stats.dirs} directories, {stats.symlinks} symlinks, "
        f"{stats.removed} removed; {stats.bytes_read} bytes read, {stats.new_bytes} new bytes "
        f"stored; {took:.2f} s ({stats.bytes_read / max(took, 1e-9) / 1e6:.0f} MB/s)")


class DaemonStaging:
    """An import into a mounted store: the daemon makes the staging tree and swaps it in
    (its caches must learn of the swap); this process fills it, beside the daemon."""

    def __init__(self, store: Path) -> None:
        self.store = store

    def begin(self, dest: Sequence[bytes]) -> str:
        """See import_tree.Staging."""
        got = client.request(self.store, "import-begin", dest=_names(dest), gid=os.getgid())
        return str(got["root"])

    def finish(self, root: str, dest: Sequence[bytes]) -> None:
        """See import_tree.Staging."""
        client.request(self.store, "import-finish", root=root, dest=_names(dest),
                       gid=os.getgid())


def _names(parts: Sequence[bytes]) -> list[str]:
    return [p.decode("utf-8", "surrogateescape") for p in parts]


@click.command("export")
@click.argument("src")
@click.argument("dest", type=click.Path(path_type=Path))
@click.pass_context
def export_cmd(ctx: click.Context, src: str, dest: Path) -> None:
    """Copy SRC (a path in a mount, or in the --store) out to the new host path DEST."""
    from annofs.transfer.export_tree import TreeExporter  # lazy: other commands skip it

    target = resolve_target(src, store_path(ctx))
    progress = Progress("export")
    try:
        with reading(ctx, target) as vol:
            exporter = TreeExporter(vol, progress=progress)
            if progress.shown:
                progress.set_total(exporter.size_of(target.parts)[1], in_bytes=True)
            stats = exporter.run(target.parts, dest)
    finally:
        progress.close()
    click.echo(f"exported {src} -> {dest}: {stats.files} files, {stats.dirs} directories, "
               f"{stats.symlinks} symlinks, {stats.bytes} bytes")
