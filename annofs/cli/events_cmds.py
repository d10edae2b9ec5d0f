"""`annofs events`: recent opens the policy refused or warned about."""

from __future__ import annotations

import textwrap

import click

from annofs.cli.context import store_path
from annofs.daemon.events import Event, follow_events, format_event, read_events
from annofs.errors import StoreError


@click.command("events")
@click.option("--follow", "-f", is_flag=True, help="Keep printing events as they happen.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--why", "with_why", is_flag=True,
              help="Print each refusal's explanation (original, signers, diff) under it.")
@click.option("-n", "count", type=click.IntRange(min=0), default=50, show_default=True,
              help="How many recent events to show first.")
@click.pass_context
def events_cmd(ctx: click.Context, follow: bool, as_json: bool, with_why: bool,
               count: int) -> None:
    """Show recent refusals and warnings (with their reasons), oldest first."""
    store = store_path(ctx)
    if not (store / "db" / "data.mdb").exists():
        raise StoreError(f"{store}: no annofs store here (run annofs init)")
    def show(e: Event) -> str:
        if as_json:
            return e.to_json()
        if with_why and e.explanation:
            return format_event(e) + "\n" + textwrap.indent(e.explanation.rstrip("\n"), "    ")
        return format_event(e)

    for e in read_events(store)[-count:] if count else []:
        click.echo(show(e))
    if follow:
        for e in follow_events(store):
            click.echo(show(e))
