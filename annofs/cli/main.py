"""The `annofs` entry point: the command group and the one place errors become exit codes."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from annofs.cli.context import default_store
from annofs.cli.copy_cmds import cp_cmd
from annofs.cli.dashboard_cmds import dashboard_cmd
from annofs.cli.events_cmds import events_cmd
from annofs.cli.history_cmds import cat_cmd, diff_cmd, log_cmd
from annofs.cli.maintenance_cmds import fsck_cmd, gc_cmd
from annofs.cli.mount_cmds import mount_cmd, umount_cmd
from annofs.cli.nar_cmds import nar_group
from annofs.cli.nix_cmds import nix_group
from annofs.cli.tree_cmds import export_cmd, import_cmd, init_cmd
from annofs.cli.trust_cmds import (
    attest_group,
    key_group,
    label_cmd,
    policy_group,
    sign_cmd,
    verify_cmd,
)
from annofs.cli.why_cmds import why_cmd
from annofs.errors import AnnofsError


@click.group()
@click.option("--store", "store", type=click.Path(path_type=Path), default=None,
              help="The store directory (default: $ANNOFS_STORE, else $XDG_DATA_HOME/annofs).")
@click.version_option(package_name="annofs")
@click.pass_context
def cli(ctx: click.Context, store: Path | None) -> None:
    """annofs: a filesystem that binds signatures to content and refuses unsigned reads."""
    ctx.obj = {"store": store or default_store()}


for command in (init_cmd, import_cmd, export_cmd, log_cmd, cat_cmd, diff_cmd, mount_cmd,
                umount_cmd, fsck_cmd, gc_cmd, cp_cmd, events_cmd, key_group, sign_cmd,
                label_cmd, attest_group, verify_cmd, policy_group, why_cmd,
                dashboard_cmd, nix_group, nar_group):
    cli.add_command(command)


def main() -> None:
    """Run a command; domain errors become one line on stderr and their exit status."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("annofs: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        # One line, as for every other bad input; --help has the long form.
        click.echo(f"annofs: {e.format_message()}", err=True)
        sys.exit(2)
    except AnnofsError as e:
        click.echo(f"annofs: {e}", err=True)
        sys.exit(e.exit_status)
    except OSError as e:
        name = e.filename if e.filename is not None else ""
        click.echo(f"annofs: {name}: {e.strerror}" if name else f"annofs: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
