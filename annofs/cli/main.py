"""The `annofs` entry point: the command group and the one place errors become exit codes."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from annofs.cli.context import default_store
from annofs.errors import AnnofsError, NotBuiltError
from annofs.printable import one_line

# Each command's module is imported when the command runs (or --help lists them all):
# importing every command module was a fifth of a command's start-up, paid by each one
# (a re-import of a large tree, where start-up is a quarter of the time, among them).
COMMANDS = {
    "init": "tree_cmds:init_cmd", "import": "tree_cmds:import_cmd",
    "export": "tree_cmds:export_cmd", "log": "history_cmds:log_cmd",
    "cat": "history_cmds:cat_cmd", "diff": "history_cmds:diff_cmd",
    "mount": "mount_cmds:mount_cmd", "umount": "mount_cmds:umount_cmd",
    "fsck": "maintenance_cmds:fsck_cmd", "gc": "maintenance_cmds:gc_cmd",
    "upgrade": "maintenance_cmds:upgrade_cmd",
    "cp": "copy_cmds:cp_cmd", "events": "events_cmds:events_cmd",
    "key": "trust_cmds:key_group", "sign": "trust_cmds:sign_cmd",
    "label": "trust_cmds:label_cmd", "attest": "trust_cmds:attest_group",
    "verify": "trust_cmds:verify_cmd", "policy": "trust_cmds:policy_group",
    "why": "why_cmds:why_cmd", "dashboard": "dashboard_cmds:dashboard_cmd",
    "nix": "nix_cmds:nix_group", "nar": "nar_cmds:nar_group",
    "bundle": "bundle_cmds:bundle_group",
}
# The first paragraph of each command's help, which `annofs --help` shortens to one line:
# listing them from the commands themselves imported every command module, and so most of
# annofs (half of `annofs --help`). tests/t1_cli_summaries.py holds them to the commands.
SUMMARIES = {
    "init": "Create a store (idempotent).",
    "import": "Copy the host directory SRC into the store at DEST; unchanged files are not "
              "read.",
    "export": "Copy SRC (a path in a mount, or in the --store) out to the new host path DEST.",
    "log": "The file's versions along the edit graph, newest first, with who signed each.",
    "cat": "Write a file's bytes (PATH@VERSION: an old version's) to standard output.",
    "diff": "The difference between two versions, each PATH[@VERSION].",
    "mount": "Serve the store at MOUNTPOINT; returns once the mount works (unless "
             "--foreground).",
    "umount": "Unmount cleanly: everything written is flushed before this returns.",
    "fsck": "Check every fragment hash, reference and count; exit 1 if anything is wrong.",
    "gc": "Free versions and fragments nothing references (never signed originals).",
    "upgrade": "Convert a store of an older format to this annofs's format (nothing is lost; "
               "an interrupted run goes on where it stopped).",
    "cp": "Copy SRC to DST (into DST if it is a directory) in O(1), copy-on-write.",
    "events": "Show recent refusals and warnings (with their reasons), oldest first.",
    "key": "Signing keys, in Nix's format.",
    "sign": "Sign the current content of files, or of every file under a tree, as one "
            "statement.",
    "label": "Sign an annotation other than approval (e.g. malicious) over files or trees.",
    "attest": "Statements as in-toto/DSSE JSON lines, to share (e.g. in a git repository).",
    "verify": "The verdict for each file and symlink (or each under a tree); exit 1 if any is "
              "refused.",
    "policy": "Trust policies.",
    "why": "Explain the verdict for each file: the rule, the signed original, the difference.",
    "dashboard": "Serve the read-only dashboard for the store: coverage by signatures, files "
                 "and their histories, the events log.",
    "nix": "Nix binary caches: verified import, and signing as a rebuilder.",
    "nar": "Nix archives (NAR): byte-identical to nix-store --dump, restored strictly.",
    "bundle": "Trust bundles: keys, revocations and labels as a signed, versioned TUF "
              "repository.",
}


class LazyGroup(click.Group):
    """A command group whose commands are imported by name when needed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command's name, sorted."""
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command `cmd_name`, its module imported now; None if there is none."""
        where = COMMANDS.get(cmd_name)
        if where is None:
            return None
        module, attr = where.split(":")
        command = getattr(importlib.import_module(f"annofs.cli.{module}"), attr)
        assert isinstance(command, click.Command) and command.name == cmd_name
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The Commands section of --help, from SUMMARIES: the same lines, shortened the
        same way (by click, to the terminal's width), without importing any command."""
        listing = click.Group(commands=[click.Command(name, help=SUMMARIES[name])
                                        for name in self.list_commands(ctx)])
        listing.format_commands(ctx, formatter)


@click.group(cls=LazyGroup)
@click.option("--store", "store", type=click.Path(path_type=Path), default=None,
              help="The store directory (default: $ANNOFS_STORE, else $XDG_DATA_HOME/annofs).")
@click.version_option(package_name="annofs")
@click.pass_context
def cli(ctx: click.Context, store: Path | None) -> None:
    """annofs: a filesystem that binds signatures to content and refuses unsigned reads."""
    ctx.obj = {"store": store or default_store()}


def main() -> None:
    """Run a command; domain errors become one line on stderr and their exit status."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("annofs: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        # One line, as for every other bad input; --help has the long form.
        click.echo(f"annofs: {one_line(e.format_message())}", err=True)
        sys.exit(2)
    except AnnofsError as e:
        click.echo(f"annofs: {one_line(str(e))}", err=True)  # names in it: one line
        sys.exit(e.exit_status)
    except OSError as e:
        name = e.filename if e.filename is not None else ""
        click.echo(one_line(f"annofs: {name}: {e.strerror}" if name else f"annofs: {e}"),
                   err=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except NotBuiltError as e:  # raised while a command's module is imported
        click.echo(f"annofs: {one_line(str(e))}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
