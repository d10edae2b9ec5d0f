"""`annofs why`: why a file is refused, and how it differs from its signed original.

PATH is a host path inside a live mount (the store is read directly beside the daemon,
after it has stored what open handles wrote; the mount's policy decides unless --policy
is given), or a path in the --store's namespace. Directories are explained file by file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from annofs.cli.stores import group_targets, reading
from annofs.cli.trust_cmds import POLICY_ENV, given_policy
from annofs.errors import UsageError


@click.command("why")
@click.option("--policy", "policy_file", type=click.Path(path_type=Path), default=None,
              help=f"The policy file (default: the mount's for paths in a mount, else "
                   f"${POLICY_ENV}).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file, per line.")
@click.option("--diff-lines", type=click.IntRange(min=1), default=400, show_default=True,
              help="Cut a text diff after this many lines (with a note).")
@click.argument("paths", nargs=-1)
@click.pass_context
def why_cmd(ctx: click.Context, policy_file: Path | None, as_json: bool, diff_lines: int,
            paths: tuple[str, ...]) -> None:
    """Explain the verdict for each file: the rule, the signed original, the difference.

    Exit 1 if any file is refused.
    """
    from annofs.explain.report import explain
    from annofs.trust.annotations import AnnotationStore
    from annofs.trust.signing import collect_files

    if not paths:
        raise UsageError("no PATH given")
    refused = 0
    first = True
    for target in group_targets(ctx, paths):
        policy = given_policy(policy_file, target)
        with reading(ctx, target) as vol:
            ann = AnnotationStore(vol.store)
            for f in collect_files(vol, target.parts):
                e = explain(vol, ann, policy, f.path, f.version, diff_lines=diff_lines)
                refused += not e.verdict.allowed
                if as_json:
                    click.echo(json.dumps(e.to_json()))
                else:
                    if not first:
                        click.echo()
                    click.echo(e.to_text(), nl=False)
                first = False
    sys.stdout.flush()
    if refused:
        sys.exit(1)
