"""`annofs nix fetch` and `annofs nix sign`: Nix binary caches.

`nix fetch` writes to the filesystem: with the store mounted (or --dest inside a mount)
it asks the mount's daemon to do it, so the new paths show in the mount at once;
otherwise it works on the --store directly. The policy whose trusted keys check the
narinfo signatures is --policy, else $ANNOFS_POLICY, else (mounted) the mount's own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from annofs.cli.context import Progress, open_volume, require_unmounted, store_path
from annofs.cli.paths import parse_store_path, resolve_target
from annofs.cli.trust_cmds import POLICY_ENV
from annofs.daemon.registry import read_state
from annofs.errors import UsageError
from annofs.store.lock import store_lock

if TYPE_CHECKING:
    from annofs.nix.register import Registration
    from annofs.nix.source import AddedSource


@click.group("nix")
def nix_group() -> None:
    """Nix binary caches: verified import, and signing as a rebuilder."""


def _policy_file(given: Path | None) -> Path | None:
    if given is not None:
        return given
    env = os.environ.get(POLICY_ENV)
    return Path(env) if env else None


def _report(f: dict[str, Any], out_prefix: str) -> None:
    path = out_prefix + "/".join(f["dest"])
    n = f["files"]
    if f["already"]:
        what = (f"already present, NAR matches; {f['statements']} new signature"
                f"{'s' if f['statements'] != 1 else ''} recorded")
    else:
        what = f"{n} file{'s' if n != 1 else ''}, {f['nar_size']} NAR bytes"
    click.echo(f"fetched {f['store_path']} -> {path}: {what}; signed by "
               f"{', '.join(f['signers'])}")
    for note in f["notes"]:
        click.echo(f"note: {note}", err=True)


@nix_group.command("fetch")
@click.option("--cache", "caches", multiple=True, required=True, metavar="DIR|URL",
              help="A binary cache: a directory (as 'nix copy --to file://DIR' writes), "
                   "a file:// or an http(s):// URL; repeatable: agreeing caches add "
                   "their signatures.")
@click.option("--dest", default=None, metavar="PATH",
              help="Where store paths go (default /nix/store in the filesystem; a mount "
                   "at R/nix/store: its root).")
@click.option("--recursive", is_flag=True, help="Also fetch every path it references.")
@click.option("--policy", "policy_file", type=click.Path(path_type=Path), default=None,
              help=f"The policy whose trusted keys count (default: ${POLICY_ENV}, or the "
                   f"mount's).")
@click.option("--nix-root", "nix_root", type=click.Path(path_type=Path), default=None,
              metavar="R", help="Register the paths in the Nix database of root R (Nix's "
                                "'--store local?root=R'; '/' for the system's). Default: R "
                                "when --dest is R/nix/store in a mount and R/nix/var/nix/db "
                                "exists.")
@click.argument("paths", nargs=-1)
@click.pass_context
def nix_fetch_cmd(ctx: click.Context, caches: tuple[str, ...], dest: str | None,
                  recursive: bool, policy_file: Path | None, nix_root: Path | None,
                  paths: tuple[str, ...]) -> None:
    """Import STOREPATHs from binary caches, verifying signatures and NarHash first.

    A STOREPATH is /nix/store/<hash>-<name>, <hash>-<name> or <hash>. Nothing is added
    unless a trusted key signed the narinfo and the NAR matches NarHash and NarSize.
    Paths get Nix's canonical metadata, and are registered as valid in a Nix database
    (--nix-root), references first, with the signatures that verified and a CA that
    holds (ValidPaths.sigs, .ca; busy timeout $ANNOFS_NIX_DB_TIMEOUT, 10 s).
    """
    from annofs.nix.cache import DirectoryCache
    from annofs.nix.fetch import DEFAULT_DEST, cache_args, fetch
    from annofs.nix.narinfo import store_path_arg

    if not paths:
        raise UsageError("no STOREPATH given")
    for p in paths:
        store_path_arg(p)  # a typo is exit 2 before anything is read
    cache_list = cache_args(caches)
    policy_path = _policy_file(policy_file)
    store = store_path(ctx)
    if dest is not None:
        target = resolve_target(dest, store)
        store, dest_parts, mount = target.store, list(target.parts), target.mount
    else:
        dest_parts, mount = list(DEFAULT_DEST), None
    state = read_state(store)
    if mount is not None or state is not None:
        from annofs.daemon.client import request

        if mount is None and dest is not None:
            raise UsageError(f"{store}: mounted at {state['mountpoint']}; give --dest as a "
                             f"path inside the mount")
        if dest is None:
            dest_parts = _default_dest(Path(state["mountpoint"]))
        mp = mount.mountpoint if mount is not None else Path(state["mountpoint"])
        host_dest = mp.joinpath(*(p.decode("utf-8", "surrogateescape") for p in dest_parts))
        root = _nix_root(nix_root, host_dest)
        _preflight(root)
        result = request(store, "nix-fetch", caches=[
                             str(c.path) if isinstance(c, DirectoryCache) else c.where
                             for c in cache_list],
                         paths=list(paths), recursive=recursive,
                         dest=[p.decode("utf-8", "surrogateescape") for p in dest_parts],
                         policy=str(policy_path.resolve()) if policy_path else None)
        for f in result["fetched"]:
            _report(f, f"{mp}/")
        _register(root, _fetched_registrations(result["fetched"]))
        return
    from annofs.trust.policy import load_policy

    if policy_path is None:
        raise UsageError(f"no policy: give --policy FILE or set ${POLICY_ENV} (its trusted "
                         f"keys decide which cache signatures count)")
    policy = load_policy(policy_path, store)
    root = _nix_root(nix_root, None)
    _preflight(root)
    progress = Progress("nix fetch")
    try:
        with store_lock(store, exclusive=False, what="nix fetch"), \
                open_volume(ctx, store=store) as vol:
            done = fetch(vol, policy, cache_list, paths, dest=dest_parts, recursive=recursive,
                         progress=progress)
            vol.store.sync()
    finally:
        progress.close()
    for f in done:
        _report(f.to_json(), "/")
    _register(root, [f.registration() for f in done])


def _default_dest(mountpoint: Path) -> list[bytes]:
    """Where store paths go in a mount by default: its root when the mount is itself a
    store directory R/nix/store (a chroot store's), else its /nix/store."""
    from annofs.nix.fetch import DEFAULT_DEST
    from annofs.nix.register import nix_root_of

    return [] if nix_root_of(mountpoint) is not None else list(DEFAULT_DEST)


def _fetched_registrations(fetched: list[dict[str, Any]]) -> list[Registration]:
    from annofs.nix.fetch import Fetched

    return [Fetched.from_json(f).registration() for f in fetched]


def _nix_root(nix_root: Path | None, host_dest: Path | None) -> Path | None:
    """The Nix root whose database registers the paths: `nix_root`, else R when the paths
    go to R/nix/store on the host and R is a Nix root (has its database directory)."""
    from annofs.nix.nixdb import db_dir
    from annofs.nix.register import nix_root_of

    root = nix_root
    if root is None and host_dest is not None:
        root = nix_root_of(host_dest)
        if root is not None and not db_dir(root).is_dir():
            root = None  # not a Nix root: a tree that merely looks like one
    return None if root is None else Path(os.path.abspath(root))


def _preflight(root: Path | None) -> None:
    """Before anything is added: Nix's database there exists, has a known schema and
    is not locked past the timeout (exit 2 otherwise, nothing changed)."""
    from annofs.nix import nixdb

    if root is not None:
        nixdb.check(root)


def _register(root: Path | None, regs: list[Registration]) -> None:
    """Register `regs` in the Nix database of `root` (none: nothing to do)."""
    from annofs.nix.register import register, store_uri

    if root is None:
        return
    for x in register(root, regs):
        extra = []
        if x.sigs:
            extra.append(f"signatures by {', '.join(x.sigs)}")
        if x.ca:
            extra.append(f"ca {x.ca}")
        what = f"; {'; '.join(extra)}" if extra else ""
        if x.new:
            click.echo(f"registered {x.path} in {store_uri(root)}{what}")
        else:
            click.echo(f"recorded in {store_uri(root)} for {x.path}{what}")


_NIX_ROOT_HELP = ("Register the path in the Nix database of root R (Nix's "
                  "'--store local?root=R'; '/' for the system's). Default: R when the "
                  "store directory is R/nix/store in a mount and R/nix/var/nix/db exists.")


@nix_group.command("add-source")
@click.option("--dest", default=None, metavar="PATH",
              help="The store directory (default /nix/store in the filesystem; a mount "
                   "at R/nix/store: its root).")
@click.option("--name", default="source", show_default=True,
              help="The store path's name (flake path: inputs are 'source').")
@click.option("--nix-root", "nix_root", type=click.Path(path_type=Path), default=None,
              metavar="R", help=_NIX_ROOT_HELP)
@click.argument("directory")
@click.pass_context
def nix_add_source_cmd(ctx: click.Context, dest: str | None, name: str,
                       nix_root: Path | None, directory: str) -> None:
    """Make DIRECTORY (a tree in annofs) the store path /nix/store/<hash>-source that
    Nix would make of it (recursive SHA-256 NAR hash), by an O(1) copy; registered in
    Nix's database. The NAR hash is cached per tree version."""
    from annofs.nix.fetch import DEFAULT_DEST
    from annofs.nix.narinfo import format_sha256
    from annofs.nix.source import add_source, check_source_name

    check_source_name(name)
    store = store_path(ctx)
    src = resolve_target(directory, store)
    if dest is not None:
        target = resolve_target(dest, store)
        if (target.mount is None) != (src.mount is None) or target.store != src.store:
            raise UsageError(f"{directory} and {dest}: must both be in the same annofs "
                             f"store or mount")
        dest_parts = list(target.parts)
    elif src.mount is not None:
        dest_parts = _default_dest(src.mount.mountpoint)
    else:
        dest_parts = list(DEFAULT_DEST)
    host_dest: Path | None = None
    if src.mount is not None:
        host_dest = src.mount.mountpoint.joinpath(
            *(p.decode("utf-8", "surrogateescape") for p in dest_parts))
    root = _nix_root(nix_root, host_dest)
    _preflight(root)
    if src.mount is not None:
        added = _add_source_mounted(src.store, src.mount.mountpoint, list(src.parts),
                                    dest_parts, name)
        shown = f"{src.mount.mountpoint}/"
    else:
        require_unmounted(src.store)
        with store_lock(src.store, exclusive=False, what="nix add-source"), \
                open_volume(ctx, store=src.store) as vol:
            added = add_source(vol, src.parts, dest_parts, name)
            vol.store.sync()
        shown = "/"
    where = shown + "/".join(p.decode("utf-8", "surrogateescape") for p in added.dest)
    how = "NAR hash cached" if added.cached else "NAR hash computed"
    what = "already present" if added.already else "copied"
    click.echo(f"{added.store_path} -> {where}: {what}; {format_sha256(added.nar.sha256)}, "
               f"{added.nar.size} NAR bytes ({how})")
    _register(root, [added.registration()])


def _add_source_mounted(store: Path, mountpoint: Path, src: list[bytes],
                        dest_dir: list[bytes], name: str) -> AddedSource:
    """Hash beside the daemon (the mount keeps answering), then ask it for the O(1)
    copy; the copy's key must be the hashed tree's (else the tree changed meanwhile:
    the copy is removed, and it is an error)."""
    import shutil

    from annofs.daemon.client import request
    from annofs.nix.source import (
        AddedSource,
        NarHashCache,
        existing,
        hash_tree,
        make_source_path,
        tree_key,
    )
    from annofs.volume import Volume

    def text(parts: list[bytes]) -> list[str]:
        return [p.decode("utf-8", "surrogateescape") for p in parts]

    request(store, "commit")  # what open handles wrote, as a reader of the mount sees it
    vol = Volume.open(store)
    try:
        cache = NarHashCache(store)
        with vol.store.read() as txn:
            if not vol.namespace.resolve(txn, src).is_dir:
                raise UsageError(f"/{'/'.join(text(src))}: not a directory")
            hashed = hash_tree(vol, txn, src, cache)
            store_path = make_source_path(hashed.nar.sha256, name)
            dest = [*dest_dir, store_path.rsplit("/", 1)[1].encode()]
            if existing(vol, txn, src, dest, hashed.nar, cache):
                return AddedSource(store_path, tuple(dest), hashed.nar, hashed.cached, True)
            hashed_at = txn.id()  # the last commit the snapshot holds
        host_dir = mountpoint.joinpath(*text(dest_dir))
        host_dir.mkdir(parents=True, exist_ok=True)
        request(store, "cp", src=text(src), dst=text(dest))
        with vol.store.read() as txn:
            # Only the copy committed since the snapshot: it is the tree that was hashed.
            # Else look (a walk of the copy's listing, no content read).
            same = txn.id() == hashed_at + 1 or \
                tree_key(vol, txn, vol.namespace.resolve(txn, dest)) == hashed.key
    finally:
        vol.close()
    if not same:
        shutil.rmtree(host_dir / text(dest)[-1])
        raise UsageError(f"/{'/'.join(text(src))}: changed while it was hashed; run again")
    return AddedSource(store_path, tuple(dest), hashed.nar, hashed.cached, False)


@nix_group.command("sign")
@click.option("--key", "key_file", required=True, type=click.Path(path_type=Path),
              metavar="SECRET", help="The secret key file (Nix format).")
@click.option("--cache", "cache", required=True, metavar="DIR",
              help="The binary cache directory holding the narinfo files.")
@click.option("--dest", default="/nix/store", show_default=True, metavar="PATH",
              help="Where the store paths are in the filesystem.")
@click.argument("paths", nargs=-1)
@click.pass_context
def nix_sign_cmd(ctx: click.Context, key_file: Path, cache: str, dest: str,
                 paths: tuple[str, ...]) -> None:
    """Add a Sig to STOREPATHs' narinfo files, after checking the tree in the filesystem
    hashes to the narinfo's NarHash: annofs as an independent rebuilder."""
    from annofs.nix.fetch import host_dir
    from annofs.nix.narinfo import store_path_arg
    from annofs.nix.sign import sign_path
    from annofs.trust.keys import load_secret_key

    if not paths:
        raise UsageError("no STOREPATH given")
    for p in paths:
        store_path_arg(p)
    key = load_secret_key(key_file)
    cache_dir = host_dir(cache)
    if not cache_dir.is_dir():
        raise UsageError(f"{cache_dir}: no such cache directory")
    target = resolve_target(dest, store_path(ctx))
    dest_parts = target.parts if target.mount is not None else parse_store_path(dest)
    with open_volume(ctx, store=target.store) as vol:
        for p in paths:
            s = sign_path(vol, cache_dir, p, key, dest=dest_parts)
            click.echo(f"signed {s.store_path} by {key.name} in {s.narinfo}"
                       + ("" if s.added else " (already signed by this key)"))


def _add_serve() -> None:
    # In a module of its own (its HTTP stack is imported only when it runs).
    from annofs.cli.nix_serve_cmd import nix_serve_cmd

    nix_group.add_command(nix_serve_cmd)


_add_serve()
