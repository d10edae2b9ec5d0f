"""`annofs dashboard`: the dashboard over a store that is not mounted."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import click

from annofs.cli.context import store_path
from annofs.cli.why_cmds import POLICY_ENV
from annofs.daemon.registry import read_state
from annofs.errors import StoreError


@click.command("dashboard")
@click.option("--store", "store_opt", type=click.Path(path_type=Path), default=None,
              help="The store (as the global --store; either place works).")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT",
              help="Where to serve the page.")
@click.option("--policy", "policy_file", type=click.Path(path_type=Path), default=None,
              help=f"The policy to judge files by (default: ${POLICY_ENV}, else none).")
@click.option("--allow-remote", is_flag=True,
              help="Allow a --listen address that other machines can reach.")
@click.pass_context
def dashboard_cmd(ctx: click.Context, store_opt: Path | None, listen: str,
                  policy_file: Path | None, allow_remote: bool) -> None:
    """Serve the read-only dashboard for the store: coverage by signatures, files and
    their histories, the events log. Live opens need `annofs mount --dashboard`.
    Runs until interrupted (Ctrl-C)."""
    from annofs.dashboard.server import bind, parse_listen, remote_warning, serve_store
    from annofs.trust.policy import load_policy

    store = store_opt or store_path(ctx)
    if not (store / "db" / "data.mdb").exists():
        raise StoreError(f"{store}: no annofs store here (run annofs init)")
    addr = parse_listen(listen, allow_remote=allow_remote)
    if policy_file is None and os.environ.get(POLICY_ENV):
        policy_file = Path(os.environ[POLICY_ENV])
    policy = load_policy(policy_file) if policy_file is not None else None
    sock = bind(addr)
    if not addr.loopback:
        click.echo(remote_warning(addr), err=True)
    state = read_state(store)
    if state is not None:
        click.echo(f"note: {store} is mounted at {state['mountpoint']}; this page shows no "
                   f"live opens (mount with --dashboard for those)", err=True)
    click.echo(f"dashboard: {addr.url} (Ctrl-C to stop)", err=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how it is meant to stop
        serve_store(store, sock, policy)
