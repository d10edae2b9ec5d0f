"""`annofs fsck`, `annofs gc` and `annofs upgrade`."""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from annofs.cli.context import (
    Progress,
    compact_after,
    open_volume,
    require_unmounted,
    store_path,
)
from annofs.daemon.registry import read_state
from annofs.maintenance.fsck import FsckReport, check_store, phase_totals
from annofs.maintenance.gc import GcReport, collect
from annofs.maintenance.repair import repair_store
from annofs.maintenance.retention import retention_from
from annofs.maintenance.upgrade import upgrade_store
from annofs.store.env import FORMAT_VERSION
from annofs.store.lock import store_lock


@click.command("fsck")
@click.option("--repair", is_flag=True,
              help="Rewrite counts from the data and drop what nothing reaches (never "
                   "reachable data); then check again.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object: the counts, the problems, what gc would free.")
@click.pass_context
def fsck_cmd(ctx: click.Context, repair: bool, as_json: bool) -> None:
    """Check every fragment hash, reference and count; exit 1 if anything is wrong.

    Also says how much space `annofs gc` would give back (not a problem: exit 0).
    """
    progress = Progress("fsck", unit="fragments")
    try:
        if repair:
            require_unmounted(store_path(ctx))
            with store_lock(store_path(ctx), exclusive=True, what="fsck --repair"), \
                    open_volume(ctx) as vol:
                for line in repair_store(vol):
                    click.echo(f"repaired: {line}", err=as_json)
        with open_volume(ctx) as vol:
            totals = phase_totals(vol)
            units = {"fragments": "fragments", "digests": "versions"}
            phase = [""]

            def step(name: str, items: int, nbytes: int) -> None:
                if name != phase[0]:
                    phase[0] = name
                    progress.phase(name, totals[name], units[name])
                progress(items, nbytes)

            rep = check_store(vol, progress=step)
    finally:
        progress.close()
    if as_json:
        click.echo(json.dumps(fsck_json(rep)))
    else:
        for p in rep.problems:
            click.echo(p)
        click.echo(f"checked {rep.fragments} fragments ({rep.fragment_bytes} bytes), "
                   f"{rep.versions} versions, {rep.directories} directories, "
                   f"{rep.entries} entries: "
                   + ("ok" if rep.ok else f"{len(rep.problems)} problem(s)"), err=not rep.ok)
        r = rep.reclaimable
        if r.any:
            staging = (f", {r.staging_trees} staging tree{'s' if r.staging_trees != 1 else ''}"
                       f" of interrupted imports" if r.staging_trees else "")
            packs = f", {r.pack_bytes} bytes of pack files" if r.pack_bytes else ""
            click.echo(f"reclaimable: {r.bytes} bytes in {r.fragments} fragments, "
                       f"{r.versions} versions nothing refers to{staging}{packs}; "
                       f"'annofs gc' frees them")
    if not rep.ok:
        sys.exit(1)


def fsck_json(rep: FsckReport) -> dict[str, object]:
    """`fsck --json`: {"ok", "problems", "fragments", "fragment_bytes", "versions",
    "directories", "entries", "reclaimable": {"versions", "fragments", "bytes",
    "staging_trees", "pack_bytes"}}."""
    return {"ok": rep.ok, "problems": rep.problems, "fragments": rep.fragments,
            "fragment_bytes": rep.fragment_bytes, "versions": rep.versions,
            "directories": rep.directories, "entries": rep.entries,
            "reclaimable": dataclasses.asdict(rep.reclaimable)}


@click.command("gc")
@click.option("--prune-history", is_flag=True,
              help="Also drop old versions no name refers to (annofs log shows less); "
                   "the same as --keep-last 1.")
@click.option("--keep-last", "keep_last", type=int, default=None, metavar="N",
              help="Keep the N newest versions of each file's history (N >= 1, the "
                   "current one included); drop older ones.")
@click.option("--keep-within", "keep_within", default=None, metavar="DURATION",
              help="Keep the versions of each file's history made less than DURATION ago "
                   "(30m, 12h, 7d, 2w, 1d12h); with --keep-last, keep what either keeps.")
@click.option("--json", "as_json", is_flag=True,
              help='One JSON object: {"versions_freed", "fragments_freed", "bytes_freed", '
                   '"staging_dropped", "versions_kept", "packs_compacted"}.')
@click.pass_context
def gc_cmd(ctx: click.Context, prune_history: bool, keep_last: int | None,
           keep_within: str | None, as_json: bool) -> None:
    """Free versions and fragments nothing references (never signed originals).

    History (the versions `annofs log` shows) is kept unless --prune-history, --keep-last
    or --keep-within say otherwise; named versions, versions open files hold and signed
    originals are always kept.
    """
    # Checked before anything is opened: a bad value changes nothing.
    retention = retention_from(keep_last, keep_within)
    store = store_path(ctx)
    if read_state(store) is not None:
        # Mounted: the daemon knows which versions open handles hold.
        from annofs.daemon.client import request

        args: dict[str, object] = {"prune_history": prune_history}
        if keep_last is not None:
            args["keep_last"] = keep_last
        if keep_within is not None:
            args["keep_within"] = keep_within
        rep = GcReport(**request(store, "gc", **args))
    else:
        progress = Progress("gc", unit="versions")
        try:
            with store_lock(store, exclusive=True, what="gc"):
                with open_volume(ctx) as vol:
                    rep = collect(vol, prune_history=prune_history, retention=retention,
                                  progress=progress, on_total=progress.set_total)
                compact_after(store, locked=True)
        finally:
            progress.close()
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(rep)))
        return
    click.echo(f"freed {rep.versions_freed} versions, {rep.fragments_freed} fragments, "
               f"{rep.bytes_freed} bytes; kept {rep.versions_kept} versions"
               + (f"; dropped {rep.staging_dropped} unfinished imports"
                  if rep.staging_dropped else "")
               + (f"; compacted {rep.packs_compacted} packs" if rep.packs_compacted else ""))


@click.command("upgrade")
@click.pass_context
def upgrade_cmd(ctx: click.Context) -> None:
    """Convert a store of an older format to this annofs's format (nothing is lost; an
    interrupted run goes on where it stopped)."""
    store = store_path(ctx)
    require_unmounted(store)
    progress = Progress("upgrade", unit="fragments")
    try:
        with store_lock(store, exclusive=True, what="upgrade"):
            rep = upgrade_store(store, progress=progress, on_total=progress.set_total)
            compact_after(store, locked=True)  # format 3 leaves its fragment pages free
    finally:
        progress.close()
    if rep.from_format == FORMAT_VERSION:
        click.echo(f"{store}: already format {FORMAT_VERSION}")
    else:
        click.echo(f"{store}: format {rep.from_format} -> {FORMAT_VERSION}: moved "
                   f"{rep.fragments_moved} fragments ({rep.bytes_moved} bytes) into packs, "
                   f"{rep.records_merged} refcounts into the fragment index")
