"""`annofs cp`: O(1) copies of files and trees, mounted or not."""

from __future__ import annotations

import click

from annofs.cli.context import open_volume, require_unmounted, store_path
from annofs.cli.paths import resolve_target
from annofs.daemon import client
from annofs.errors import UsageError
from annofs.printable import one_line


@click.command("cp")
@click.argument("src")
@click.argument("dst")
@click.pass_context
def cp_cmd(ctx: click.Context, src: str, dst: str) -> None:
    """Copy SRC to DST (into DST if it is a directory) in O(1), copy-on-write.

    Paths inside a mounted annofs go through its daemon (the copy shows at once);
    otherwise they are paths in the --store's namespace.
    """
    s, d = resolve_target(src, store_path(ctx)), resolve_target(dst, store_path(ctx))
    if (s.mount is None) != (d.mount is None) or s.store != d.store:
        raise UsageError(f"{src} and {dst}: must both be in the same annofs store or mount")
    if s.mount is not None:
        made = client.request(s.store, "cp", src=[p.decode("utf-8", "surrogateescape")
                                                   for p in s.parts],
                               dst=[p.decode("utf-8", "surrogateescape") for p in d.parts])
        click.echo(one_line(f"copied {src} -> {s.mount.mountpoint}/{'/'.join(made['path'])}"))
        return
    # Imported here: annofs.store brings LMDB, which a copy inside a mount never needs.
    from annofs.store.lock import store_lock

    require_unmounted(s.store)
    with store_lock(s.store, exclusive=False, what="cp"), open_volume(ctx) as vol:
        with vol.store.write() as txn:
            made_parts = vol.namespace.copy(txn, s.parts, d.parts)
        vol.store.sync()
    click.echo(one_line(f"copied {src} -> /{b'/'.join(made_parts).decode(errors='replace')}"))
