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
@click.option("--dashboard-allow-remote", "--allow-remote", "allow_remote", is_flag=True,
              help="Allow a --listen address that other machines can reach (the same "
                   "option as mount's; --allow-remote is kept as another name).")
@click.pass_context
def dashboard_cmd(ctx: click.Context, store_opt: Path | None, listen: str,
                  policy_file: Path | None, allow_remote: bool) -> None:
    """Serve the read-only dashboard for the store: coverage by signatures, files and
    their histories, the events log. Live opens need `annofs mount --dashboard`.
    Open the URL it prints (it carries the access token; also in STORE/dashboard.url,
    readable by the store's owner only). Runs until interrupted (Ctrl-C)."""
    from annofs.dashboard.server import (
        URL_FILE,
        access_url,
        bind,
        bound_address,
        new_token,
        parse_listen,
        remote_warning,
        remove_url_file,
        serve_store,
        write_url_file,
    )
    from annofs.trust.policy import load_policy

    store = store_opt or store_path(ctx)
    if not (store / "db" / "data.mdb").exists():
        raise StoreError(f"{store}: no annofs store here (run annofs init)")
    addr = parse_listen(listen, allow_remote=allow_remote)
    if policy_file is None and os.environ.get(POLICY_ENV):
        policy_file = Path(os.environ[POLICY_ENV])
    policy = load_policy(policy_file, store) if policy_file is not None else None
    sock = bind(addr)
    if not addr.loopback:
        click.echo(remote_warning(addr), err=True)
    state = read_state(store)
    if state is not None:
        click.echo(f"note: {store} is mounted at {state['mountpoint']}; this page shows no "
                   f"live opens (mount with --dashboard for those)", err=True)
    token = new_token()
    url = access_url(bound_address(sock), token)  # the real port, if 0 was asked for
    try:
        url_file = write_url_file(store, url)
    except OSError as e:
        sock.close()
        raise StoreError(f"{store / URL_FILE}: cannot write the dashboard's URL "
                         f"({e.strerror or e})") from None
    click.echo(f"dashboard: {url} (also in {url_file}; Ctrl-C to stop)", err=True)
    try:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how it is meant to stop
            serve_store(store, sock, token, policy)
    finally:
        remove_url_file(store, url)
