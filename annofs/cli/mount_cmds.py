"""`annofs mount` and `annofs umount`."""

from __future__ import annotations

from pathlib import Path

import click

from annofs.cli.context import compact_after, store_path


@click.command("mount")
@click.option("--foreground", is_flag=True, help="Stay in the foreground, log to stderr.")
@click.option("--allow-other", is_flag=True, help="Let other users use the mount.")
@click.option("--policy", type=click.Path(path_type=Path), default=None,
              help="The trust policy (TOML) to enforce at open(); outside the mount.")
@click.option("--dashboard", "dashboard", metavar="HOST:PORT", default=None,
              help="Serve the dashboard (a read-only web page) here, e.g. 127.0.0.1:8080; "
                   "open the URL it prints (with its access token).")
@click.option("--dashboard-allow-remote", is_flag=True,
              help="Allow a --dashboard address that other machines can reach.")
@click.argument("mountpoint", type=click.Path(path_type=Path))
@click.pass_context
def mount_cmd(ctx: click.Context, foreground: bool, allow_other: bool, policy: Path | None,
              dashboard: str | None, dashboard_allow_remote: bool, mountpoint: Path) -> None:
    """Serve the store at MOUNTPOINT; returns once the mount works (unless --foreground)."""
    from annofs.daemon.mount import MountOptions, mount  # pyfuse3 and trio: only here
    from annofs.dashboard.server import URL_FILE, parse_listen, remote_warning

    addr = None
    if dashboard is not None:
        addr = parse_listen(dashboard, allow_remote=dashboard_allow_remote)
        if not addr.loopback:
            click.echo(remote_warning(addr), err=True)
    store = store_path(ctx)
    mount(MountOptions(store, mountpoint, foreground, allow_other, policy, addr))
    if addr is not None and not foreground:
        # The daemon wrote it before reporting ready: the real port, and the access token.
        url_file = store / URL_FILE
        click.echo(f"dashboard: {url_file.read_text().strip()} (also in {url_file})")


@click.command("umount")
@click.argument("mountpoint", type=click.Path(path_type=Path))
def umount_cmd(mountpoint: Path) -> None:
    """Unmount cleanly: everything written is flushed before this returns."""
    from annofs.daemon.umount import umount

    said, store = umount(mountpoint)
    if said is not None:
        click.echo(f"annofs: {said}", err=True)
    if store is not None:
        # The daemon could not: it had the store open. Skipped if a command or a new
        # mount has it already.
        compact_after(store)
