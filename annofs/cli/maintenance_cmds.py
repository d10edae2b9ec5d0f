"""`annofs fsck`."""

from __future__ import annotations

import sys

import click

from annofs.cli.context import Progress, open_volume
from annofs.maintenance.fsck import check_store


@click.command("fsck")
@click.pass_context
def fsck_cmd(ctx: click.Context) -> None:
    """Check every fragment hash, reference and count; exit 1 if anything is wrong."""
    progress = Progress("fsck")
    try:
        with open_volume(ctx) as vol:
            rep = check_store(vol, progress=progress)
    finally:
        progress.close()
    for p in rep.problems:
        click.echo(p)
    click.echo(f"checked {rep.fragments} fragments ({rep.fragment_bytes} bytes), "
               f"{rep.versions} versions, {rep.directories} directories, {rep.entries} entries: "
               + ("ok" if rep.ok else f"{len(rep.problems)} problem(s)"), err=not rep.ok)
    if not rep.ok:
        sys.exit(1)
