"""`annofs nar dump`, `nar restore`, `nar hash`: Nix archives out of and into annofs.

PATH and DEST are host paths inside a live mount or paths in the --store's namespace, as
for every command; with `--host`, a plain host path (to compare with Nix, or to unpack
an archive strictly). Dumping and hashing only read, so a mounted store is read directly
beside its daemon (LMDB serves readers in other processes), from one snapshot, after the
daemon has stored what open handles wrote. A restore
into a mount is made by the daemon, so the new tree shows in the mount at once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import click

from annofs.cli.context import Progress, open_volume, require_unmounted, store_path
from annofs.cli.paths import resolve_target
from annofs.cli.stores import reading
from annofs.daemon import client
from annofs.errors import NotFoundError, UsageError
from annofs.store.lock import store_lock


@click.group("nar")
def nar_group() -> None:
    """Nix archives (NAR): byte-identical to nix-store --dump, restored strictly."""


@contextlib.contextmanager
def _dump_of(ctx: click.Context, path: str, host: bool) -> Iterator[Iterator[bytes]]:
    """The NAR chunks of PATH (a mount or store path, or with `host` a host path)."""
    from annofs.transfer.nar import dump_host, dump_volume  # lazy: other commands skip it

    if host:
        if not os.path.lexists(path):
            raise UsageError(f"{path}: no such file or directory")
        yield dump_host(Path(path))
        return
    t = resolve_target(path, store_path(ctx))
    with reading(ctx, t) as vol:
        try:
            with vol.store.read() as txn:
                vol.namespace.resolve(txn, t.parts)
        except NotFoundError:
            hint = " (a host directory? use --host)" if t.mount is None and \
                os.path.lexists(path) else ""
            raise UsageError(f"{path}: no such file or directory in the store{hint}") from None
        yield dump_volume(vol, t.parts)


@nar_group.command("dump")
@click.option("--host", is_flag=True, help="PATH is a host path outside annofs.")
@click.argument("path")
@click.pass_context
def dump_cmd(ctx: click.Context, host: bool, path: str) -> None:
    """Write the NAR of PATH to stdout, as nix-store --dump does."""
    if sys.stdout.isatty():
        raise UsageError("stdout is a terminal: redirect the NAR to a file or a pipe")
    out = sys.stdout.buffer
    with _dump_of(ctx, path, host) as chunks:
        try:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
        except BrokenPipeError:
            # The reader went away (`| head`): stop quietly, as other tools do.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(1)


@nar_group.command("hash")
@click.option("--host", is_flag=True, help="PATH is a host path outside annofs.")
@click.argument("paths", nargs=-1, required=True)
@click.pass_context
def hash_cmd(ctx: click.Context, host: bool, paths: tuple[str, ...]) -> None:
    """Print sha256:<nix base32> of each PATH's NAR (nix-hash --type sha256 --base32)."""
    from annofs.transfer.nar import nar_hash  # lazy: other commands skip it

    for path in paths:
        with _dump_of(ctx, path, host) as chunks:
            click.echo(str(nar_hash(chunks)))


@contextlib.contextmanager
def _open_nar(file: str) -> Iterator[tuple[BinaryIO, str]]:
    """The archive FILE (`-`: stdin) and its name for messages."""
    if file == "-":
        if sys.stdin.isatty():
            raise UsageError("stdin is a terminal: give the NAR as a file or through a pipe")
        yield sys.stdin.buffer, "stdin"
        return
    try:
        f = open(file, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise UsageError(f"{file}: {e.strerror}") from None
    with f:
        yield f, file


@nar_group.command("restore")
@click.option("--host", is_flag=True, help="DEST is a new host path outside annofs.")
@click.argument("file")
@click.argument("dest")
@click.pass_context
def restore_cmd(ctx: click.Context, host: bool, file: str, dest: str) -> None:
    """Unpack the NAR FILE (`-`: stdin) at the new path DEST, all or nothing.

    Stricter than nix-store --restore: names must be valid and sorted, with no '..',
    '/', duplicates, bad padding or trailing bytes; any fault adds nothing.
    """
    from annofs.transfer.nar import (  # lazy: other commands skip it
        restore_nar_host,
        restore_nar_into,
        show_path,
    )

    if host:
        with _open_nar(file) as (stream, name):
            h = restore_nar_host(stream, Path(dest), source=name)
        click.echo(f"restored {name} -> {dest}: {h} ({h.size} bytes)")
        return
    t = resolve_target(dest, store_path(ctx))
    if t.mount is not None:
        _restore_mounted(file, t.store, t.parts, dest)
        return
    require_unmounted(t.store)
    progress = Progress("nar restore")
    try:
        with _open_nar(file) as (stream, name), \
                store_lock(t.store, exclusive=False, what="nar restore"), \
                open_volume(ctx, store=t.store) as vol:
            tree = restore_nar_into(vol, stream, t.parts, source=name, progress=progress)
    finally:
        progress.close()
    click.echo(f"restored {name} -> {show_path(t.parts)}: {len(tree.files)} files, "
               f"{tree.directories} directories, {tree.symlinks} symlinks; "
               f"{tree.nar} ({tree.nar.size} bytes)")


def _restore_mounted(file: str, store: Path, parts: list[bytes], dest: str) -> None:
    """Have the daemon restore (it reads FILE itself; stdin is spooled to a file first)."""
    with contextlib.ExitStack() as stack:
        if file == "-":
            if sys.stdin.isatty():
                raise UsageError("stdin is a terminal: give the NAR as a file or through a "
                                 "pipe")
            spool = stack.enter_context(tempfile.NamedTemporaryFile(prefix="annofs-nar-"))
            shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
            spool.flush()
            path, name = spool.name, "stdin"
        else:
            if not os.path.isfile(file):
                raise UsageError(f"{file}: no such file")
            path, name = os.path.abspath(file), file
        got = client.request(store, "nar-restore", file=path, source=name,
                             dest=[p.decode("utf-8", "surrogateescape") for p in parts])
    click.echo(f"restored {name} -> {dest}: {got['files']} files, {got['directories']} "
               f"directories, {got['symlinks']} symlinks; {got['nar_hash']} "
               f"({got['nar_size']} bytes)")
