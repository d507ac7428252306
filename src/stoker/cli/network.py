"""``stoker network presets|check``: the guest network policy's allowlist presets and entries."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from stoker.cli import _fail
from stoker.errors import StokerError

network_app: typer.Typer = typer.Typer(
    help="Guest network policies: presets, entry checks.", no_args_is_help=True
)


@network_app.command("presets", help="List the allowlist presets (--allow @NAME) and their hosts.")
def network_presets(
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    from stoker.net.policy import load_presets

    presets = load_presets()
    if json_out:
        data = {
            name: {"description": p.description, "docs": p.docs, "allow": list(p.entries)}
            for name, p in sorted(presets.items())
        }
        typer.echo(json.dumps(data, indent=2))
        return
    for name, preset in sorted(presets.items()):
        typer.echo(f"@{name}: {preset.description}\n  source: {preset.docs}")
        for entry in preset.entries:
            typer.echo(f"    {entry}")


@network_app.command(
    "check", help="Parse allowlist entries (as for --allow) and print what each one allows."
)
def network_check(
    entries: Annotated[
        list[str], typer.Argument(help="Entries: HOST[:PORT], IP\\[/BITS][:PORT], @NAME.")
    ],
) -> None:
    from stoker.net.policy import parse_entry

    try:
        for text in entries:
            for entry in parse_entry(text):
                typer.echo(f"{text}: {entry}")
    except StokerError as exc:
        raise _fail(exc) from None
