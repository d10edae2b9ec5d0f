"""`annofs fsck` and `annofs gc`."""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from annofs.cli.context import Progress, open_volume, require_unmounted, store_path
from annofs.daemon.registry import read_state
from annofs.maintenance.fsck import check_store
from annofs.maintenance.gc import GcReport, collect
from annofs.maintenance.repair import repair_store
from annofs.printable import one_line
from annofs.store.lock import store_lock


@click.command("fsck")
@click.option("--repair", is_flag=True,
              help="Rewrite counts from the data and drop what nothing reaches (never "
                   "reachable data); then check again.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: the counts, the problems, what gc would free.")
@click.pass_context
def fsck_cmd(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Check every fragment hash, reference and count; exit 1 if anything is wrong."""
    progress = Progress("fsck")
    try:
        if repair:
            require_unmounted(store_path(ctx))
            with store_lock(store_path(ctx), exclusive=True, what="fsck --repair"), \
                    open_volume(ctx) as vol:
                for line in repair_store(vol):
                    click.echo(one_line(f"repaired: {line}"))
        with open_volume(ctx) as vol:
            rep = check_store(vol, progress=progress)
    finally:
        progress.close()
    if as_json:
        click.echo(json.dumps({
            "ok": rep.ok, "problems": rep.problems, "fragments": rep.fragments,
            "fragment_bytes": rep.fragment_bytes, "versions": rep.versions,
            "directories": rep.directories, "entries": rep.entries,
            "reclaimable": {"versions": rep.reclaimable_versions,
                            "fragments": rep.reclaimable_fragments,
                            "bytes": rep.reclaimable_bytes,
                            "unfinished_imports": rep.unfinished_imports}}, sort_keys=True))
        sys.exit(0 if rep.ok else 1)
    for p in rep.problems:
        click.echo(one_line(p))  # a name in a problem must not forge another
    click.echo(f"checked {rep.fragments} fragments ({rep.fragment_bytes} bytes), "
               f"{rep.versions} versions, {rep.directories} directories, {rep.entries} entries: "
               + ("ok" if rep.ok else f"{len(rep.problems)} problem(s)"), err=not rep.ok)
    if rep.reclaimable:
        # Not a problem (exit 0): what an interrupted import or removed files left behind.
        unfinished = (f", {rep.unfinished_imports} unfinished import(s)"
                      if rep.unfinished_imports else "")
        click.echo(f"reclaimable: {rep.reclaimable_versions} versions, "
                   f"{rep.reclaimable_fragments} fragments ({rep.reclaimable_bytes} bytes)"
                   f"{unfinished}; `annofs gc` frees them")
    if not rep.ok:
        sys.exit(1)


@click.command("gc")
@click.option("--prune-history", is_flag=True,
              help="Also drop old versions no name refers to (annofs log shows less).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: what was freed.")
@click.pass_context
def gc_cmd(ctx: click.Context, prune_history: bool, as_json: bool) -> None:
    """Free versions and fragments nothing references (never signed originals)."""
    store = store_path(ctx)
    if read_state(store) is not None:
        # Mounted: the daemon knows which versions open handles hold.
        from annofs.daemon.client import request

        rep = GcReport(**request(store, "gc", prune_history=prune_history))
    else:
        progress = Progress("gc")
        try:
            with store_lock(store, exclusive=True, what="gc"), open_volume(ctx) as vol:
                rep = collect(vol, prune_history=prune_history, progress=progress)
        finally:
            progress.close()
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(rep), sort_keys=True))
        return
    click.echo(f"freed {rep.versions_freed} versions, {rep.fragments_freed} fragments, "
               f"{rep.bytes_freed} bytes; kept {rep.versions_kept} versions"
               + (f"; dropped {rep.staging_dropped} unfinished imports"
                  if rep.staging_dropped else ""))
