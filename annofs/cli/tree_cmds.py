"""`annofs init`, `import`, `export`."""

from __future__ import annotations

import time
from pathlib import Path

import click

from annofs.cli.context import Progress, open_volume, store_path
from annofs.cli.paths import parse_store_path
from annofs.store.lock import store_lock
from annofs.transfer.export_tree import TreeExporter
from annofs.transfer.import_tree import TreeImporter


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
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("dest")
@click.pass_context
def import_cmd(ctx: click.Context, git: bool, excludes: tuple[str, ...], src: Path,
               dest: str) -> None:
    """Copy the host directory SRC into the store at DEST; unchanged files are not read."""
    dest_parts = parse_store_path(dest)
    started = time.monotonic()
    progress = Progress("import")
    try:
        with store_lock(store_path(ctx), exclusive=False, what="import"), \
                open_volume(ctx) as vol:
            stats = TreeImporter(vol, excludes=excludes, git=git, progress=progress).run(
                src, dest_parts)
    finally:
        progress.close()
    took = time.monotonic() - started
    click.echo(
        f"imported {src} -> {dest}: {stats.files} files ({stats.files_read} read, "
        f"{stats.files_reused} unchanged), {stats.dirs} directories, {stats.symlinks} symlinks, "
        f"{stats.removed} removed; {stats.bytes_read} bytes read, {stats.new_bytes} new bytes "
        f"stored; {took:.2f} s")
    for rel in stats.skipped:
        click.echo(f"skipped {rel}: sockets cannot be stored", err=True)


@click.command("export")
@click.argument("src")
@click.argument("dest", type=click.Path(path_type=Path))
@click.pass_context
def export_cmd(ctx: click.Context, src: str, dest: Path) -> None:
    """Copy the store path SRC out to the new host path DEST."""
    src_parts = parse_store_path(src)
    progress = Progress("export")
    try:
        with open_volume(ctx) as vol:
            stats = TreeExporter(vol, progress=progress).run(src_parts, dest)
    finally:
        progress.close()
    click.echo(f"exported {src} -> {dest}: {stats.files} files, {stats.dirs} directories, "
               f"{stats.symlinks} symlinks, {stats.bytes} bytes")
