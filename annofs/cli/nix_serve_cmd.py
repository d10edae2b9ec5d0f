"""`annofs nix serve`: the store's /nix/store as an HTTP binary cache for a real Nix.

It only reads the store: offline, or beside a mount's daemon (LMDB serves readers in
other processes; what it serves is what is committed, as `annofs log` reads). What is
offered, and with which signatures, is `annofs.nix.serve`'s; the HTTP side is
`annofs.dashboard.binary_cache`, on the dashboard's hypercorn-on-trio stack.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from annofs.cli.context import store_path
from annofs.cli.paths import parse_store_path, resolve_target
from annofs.cli.trust_cmds import POLICY_ENV
from annofs.daemon.registry import read_state
from annofs.errors import StoreError, UsageError

if TYPE_CHECKING:
    from annofs.nix.serve import ServedStore


def _policy_path(given: Path | None, store: Path) -> Path:
    """--policy, else $ANNOFS_POLICY, else the mount's own; UsageError if none."""
    if given is not None:
        return given
    env = os.environ.get(POLICY_ENV)
    if env:
        return Path(env)
    if read_state(store) is not None:
        from annofs.daemon.client import request

        got = request(store, "policy-file")["file"]
        if got:
            return Path(got)
    raise UsageError(f"no policy: give --policy FILE or set ${POLICY_ENV} (only what it "
                     f"would let a process read is served)")


@click.command("serve")
@click.option("--listen", default="127.0.0.1:8081", show_default=True, metavar="HOST:PORT",
              help="Where to serve the cache (port 0: any free port; the URL is printed).")
@click.option("--policy", "policy_file", type=click.Path(path_type=Path), default=None,
              help=f"Serve only what this policy lets a process read (default: "
                   f"${POLICY_ENV}, or the mount's).")
@click.option("--key", "key_files", multiple=True, type=click.Path(path_type=Path),
              metavar="SECRET", help="Also sign every narinfo with this secret key (Nix "
                                     "format); repeatable.")
@click.option("--dest", default="/nix/store", show_default=True, metavar="PATH",
              help="Where the store paths are in the filesystem.")
@click.option("--compression", type=click.Choice(["zstd", "none"]), default="zstd",
              show_default=True, help="How the narinfos' NARs are compressed.")
@click.option("--priority", type=click.IntRange(0, 1000), default=30, show_default=True,
              help="nix-cache-info's Priority (lower is tried first).")
@click.option("--allow-remote", is_flag=True,
              help="Allow a --listen address that other machines can reach.")
@click.pass_context
def nix_serve_cmd(ctx: click.Context, listen: str, policy_file: Path | None,
                  key_files: tuple[Path, ...], dest: str, compression: str, priority: int,
                  allow_remote: bool) -> None:
    """Serve the store paths under --dest as a Nix binary cache (narinfo, NARs), until
    interrupted. A path is offered only if the policy lets every file of it be read;
    its narinfo carries the cache signatures `nix fetch` recorded and one by each --key.
    """
    import contextlib

    import trio

    from annofs.daemon.events import Event, EventLog
    from annofs.dashboard.app import loopback_hosts
    from annofs.dashboard.binary_cache import create_cache_app
    from annofs.dashboard.server import _until_interrupted, bind, bound_address, parse_listen
    from annofs.dashboard.server import serve as serve_http
    from annofs.nix.serve import ServedStore, check_signing_policy
    from annofs.trust.keys import load_secret_key
    from annofs.trust.policy import load_policy
    from annofs.trust.verdict import Verdict
    from annofs.volume import Volume

    store = store_path(ctx)
    if not (store / "db" / "data.mdb").exists():
        raise StoreError(f"{store}: no annofs store here (run annofs init)")
    target = resolve_target(dest, store)
    store = target.store  # a --dest inside a mount names that mount's store
    dest_parts = target.parts if target.mount is not None else parse_store_path(dest)
    policy_file = _policy_path(policy_file, store)
    policy = load_policy(policy_file)
    keys = [load_secret_key(k) for k in key_files]
    if keys:
        check_signing_policy(policy, dest_parts)  # before it listens
    addr = parse_listen(listen, allow_remote=allow_remote, what="the binary cache",
                        shows="the store paths the policy approves",
                        remote_option="--allow-remote")
    sock = bind(addr, "the binary cache")
    url = bound_address(sock).url.rstrip("/")
    if not addr.loopback:
        click.echo(f"warning: the binary cache at {url} is reachable from other machines "
                   f"over plain HTTP, without a token: any of them can read every store "
                   f"path the policy approves (Nix checks their signatures)", err=True)
    events = EventLog(store)

    def refused(path: str, v: Verdict) -> None:
        events.record(Event(path=path, verdict="refused", rule=v.rule or "",
                            reason=f"nix serve: not offered: {v.reason}"))

    vol = Volume.open(store)
    try:
        served = ServedStore(vol, policy, keys, dest=dest_parts, on_refused=refused)
        app = create_cache_app(served, compression=compression, priority=priority,
                               allowed_hosts=loopback_hosts(addr.host) if addr.loopback
                               else None)
        shown = "/" + "/".join(p.decode("utf-8", "backslashreplace") for p in dest_parts)
        click.echo(f"nix serve: {url} ({shown} of {store}; Ctrl-C to stop, SIGHUP reloads "
                   f"the policy)", err=True)

        async def run() -> None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_reload_on_hup, served, policy_file)
                await serve_http(app, sock, shutdown_trigger=_until_interrupted)
                nursery.cancel_scope.cancel()

        with contextlib.suppress(KeyboardInterrupt):
            trio.run(run)
    finally:
        vol.close()


async def _reload_on_hup(served: ServedStore, policy_file: Path) -> None:
    """Re-read the policy at each SIGHUP (as a mount does); a file that does not load
    leaves the old policy in force, and says so."""
    import signal

    import trio

    from annofs.errors import AnnofsError
    from annofs.trust.policy import load_policy

    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            try:
                policy = await trio.to_thread.run_sync(load_policy, policy_file)
                served.set_policy(policy)
            except AnnofsError as e:
                click.echo(f"nix serve: the policy was not reloaded, the old one stays: {e}",
                           err=True)
                continue
            click.echo(f"nix serve: policy reloaded from {policy_file}", err=True)
