"""`annofs log`, `cat`, `diff`: a file's versions along the edit graph."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import click

from annofs.cli.context import open_volume, store_path
from annofs.cli.paths import VersionedPath, resolve_target, split_version
from annofs.content.history import ancestry
from annofs.content.versions import TooLargeToHashError
from annofs.errors import UsageError
from annofs.explain.diff import render_diff
from annofs.store.records import Version
from annofs.volume import Volume


def _file_version(vol: Volume, vp: VersionedPath) -> Version:
    """The version a PATH[@VERSION] names; the version must be in the file's history."""
    with vol.store.read() as txn:
        a = vol.namespace.resolve(txn, vp.parts)
        if not a.is_reg:
            raise UsageError(f"{vp.text}: not a regular file")
        current = int(a.target)
        if vp.version is None:
            return vol.versions.get(txn, current)
        for v in ancestry(txn, vol.versions, current):
            if v.id == vp.version:
                return v
    raise UsageError(f"{vp.text}: version {vp.version} is not in this file's history "
                     f"(see annofs log)")


def _target(ctx: click.Context, text: str) -> tuple[Path, VersionedPath]:
    """PATH[@VERSION] as (store, path in it): a host path inside a mount, or a store path.

    These commands only read, and LMDB serves readers in other processes beside the
    daemon, so a mounted store is read directly (what the mount has flushed).
    """
    path, version = split_version(text)
    t = resolve_target(path, store_path(ctx))
    return t.store, VersionedPath(text, t.parts, version)


def _when(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@click.command("log")
@click.argument("path")
@click.pass_context
def log_cmd(ctx: click.Context, path: str) -> None:
    """The file's versions along the edit graph, newest first."""
    store, vp = _target(ctx, path)
    with open_volume(ctx, store=store) as vol:
        head = _file_version(vol, vp)
        with vol.store.read() as txn:
            chain = ancestry(txn, vol.versions, head.id)
        for v in chain:
            try:
                v = vol.versions.ensure_digest(v)
                digest = f"blake3:{v.digest.hex()}" if v.digest is not None else ""
            except TooLargeToHashError:
                digest = "(sparse: too large to hash, unsignable)"
            edit = ""
            if v.edit is not None:
                edit = (f"  edit: fragments {v.edit.start}..{v.edit.start + v.edit.removed} "
                        f"-> {v.edit.added} new")
            click.echo(f"{v.id:>8}  {_when(v.created_ns)}  {v.size:>12}  {digest}{edit}")


@click.command("cat")
@click.argument("path")
@click.pass_context
def cat_cmd(ctx: click.Context, path: str) -> None:
    """Write a file's bytes (PATH@VERSION: an old version's) to standard output."""
    store, vp = _target(ctx, path)
    out = sys.stdout.buffer
    with open_volume(ctx, store=store) as vol:
        v = _file_version(vol, vp)
        with vol.store.read() as txn:
            for frag in vol.versions.iter_bytes(txn, v):
                out.write(frag)
    out.flush()


DIFF_LIMIT = 1 << 30


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.pass_context
def diff_cmd(ctx: click.Context, a: str, b: str) -> None:
    """The difference between two versions, each PATH[@VERSION]."""
    (store_a, va), (store_b, vb) = _target(ctx, a), _target(ctx, b)
    if store_a != store_b:
        raise UsageError(f"{a} and {b}: not in the same store")
    with open_volume(ctx, store=store_a) as vol:
        ver_a, ver_b = _file_version(vol, va), _file_version(vol, vb)
        for arg, ver in ((a, ver_a), (b, ver_b)):
            if ver.size > DIFF_LIMIT:
                # Read whole to be compared: a sparse petabyte would never fit.
                raise UsageError(f"{arg}: {ver.size} bytes, too large to diff "
                                 f"(at most {DIFF_LIMIT} bytes)")
        with vol.store.read() as txn:
            data_a = vol.versions.read(txn, ver_a, 0, ver_a.size)
            data_b = vol.versions.read(txn, ver_b, 0, ver_b.size)
    name_a = "/" + b"/".join(va.parts).decode(errors="replace") + f"@{ver_a.id}"
    name_b = "/" + b"/".join(vb.parts).decode(errors="replace") + f"@{ver_b.id}"
    click.echo(render_diff(data_a, data_b, name_a, name_b), nl=False)
