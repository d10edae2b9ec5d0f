"""`annofs cp`: O(1) copies of files and trees."""

from __future__ import annotations

import click

from annofs.cli.context import open_volume, store_path
from annofs.cli.paths import parse_store_path
from annofs.store.lock import store_lock


@click.command("cp")
@click.argument("src")
@click.argument("dst")
@click.pass_context
def cp_cmd(ctx: click.Context, src: str, dst: str) -> None:
    """Copy SRC to DST (into DST if it is a directory) in O(1), copy-on-write."""
    src_parts, dst_parts = parse_store_path(src), parse_store_path(dst)
    with store_lock(store_path(ctx), exclusive=False, what="cp"), open_volume(ctx) as vol:
        with vol.store.write() as txn:
            made = vol.namespace.copy(txn, src_parts, dst_parts)
        vol.store.sync()
    click.echo(f"copied {src} -> /{b'/'.join(made).decode(errors='replace')}")
