"""What the annofs command imports before a command runs: `annofs --help` lists the
commands from main.SUMMARIES (the same lines the commands give), and neither the entry
module nor --help imports the store's layers or any command's module. And what the mount
daemon imports before it is ready: not what only a refusal's explanation or a control
request needs; `annofs umount` none of pyfuse3, trio or the daemon's layers."""

from __future__ import annotations

import importlib
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from annofs.cli.main import COMMANDS, SUMMARIES, cli

# Imported by a command that opens a store; never by the entry point or --help.
HEAVY = ("lmdb", "annofs.volume", "annofs.store", "annofs.daemon.registry", "annofs.trust")


def _command(name: str) -> click.Command:
    module, attr = COMMANDS[name].split(":")
    return getattr(importlib.import_module(f"annofs.cli.{module}"), attr)


def test_summaries_name_every_command() -> None:
    assert sorted(SUMMARIES) == sorted(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_summary_gives_the_commands_own_line(name: str) -> None:
    command = _command(name)
    # A short_help, hidden or deprecated command would list differently from its summary.
    assert (command.short_help, command.hidden, command.deprecated) == (None, False, False)
    stub = click.Command(name, help=SUMMARIES[name])
    for limit in range(2, 200):
        assert stub.get_short_help_str(limit) == command.get_short_help_str(limit), limit


def test_help_lists_the_commands() -> None:
    out = CliRunner().invoke(cli, ["--help"], terminal_width=80).output
    listed = out.split("Commands:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in listed] == sorted(COMMANDS)
    assert "  init       Create a store (idempotent).\n" in out


def _imported(code: str) -> set[str]:
    """The modules a fresh interpreter has after running `code`."""
    code += "\nimport sys\nprint('\\n'.join(sys.modules))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    return set(done.stdout.split())


@pytest.mark.parametrize("argv", [[], ["--help"]])
def test_entry_point_imports_no_layer(argv: list[str]) -> None:
    code = ("from annofs.cli.main import cli\n"
            f"if {argv!r}:\n"
            f"    try: cli.main({argv!r}, standalone_mode=False)\n"
            "    except SystemExit: pass\n")
    modules = _imported(code)
    assert ("Commands:" in modules) == bool(argv)  # --help ran, and printed the list
    loaded = sorted(m for m in modules
                    if m.split(".")[0] == "lmdb" or m.startswith(HEAVY)
                    or (m.startswith("annofs.cli.") and m.endswith("_cmds")))
    assert loaded == []


def test_daemon_imports_what_serving_needs() -> None:
    modules = _imported("import annofs.daemon.mount")
    assert {"pyfuse3", "trio", "annofs.trust.gate", "annofs.fs.operations"} <= modules
    later = ("annofs.explain.report", "annofs.explain.diff", "annofs.maintenance",
             "annofs.transfer.import_tree")
    assert sorted(m for m in modules if m.startswith(later)) == []


def test_umount_imports_no_daemon() -> None:
    modules = _imported("import annofs.cli.mount_cmds, annofs.daemon.umount")
    assert sorted(m for m in modules
                  if m.split(".")[0] in ("pyfuse3", "trio", "lmdb")
                  or m in ("annofs.daemon.mount", "annofs.fs", "annofs.trust")) == []
