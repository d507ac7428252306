"""``stoker github check|runners``: the GitHub Actions integration of ``stoker serve``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from stoker.cli import _fail, _safe, err
from stoker.cli.jobs import _DEFAULT_SERVICE_URL, _api_token, _run_client, _TokenFile, _Url
from stoker.errors import StokerError

github_app: typer.Typer = typer.Typer(
    help="GitHub Actions runners managed by `stoker serve` (its github configuration).",
    no_args_is_help=True,
)

_STYLE = {"ok": "green", "warning": "yellow", "error": "red"}


@github_app.command(
    "check",
    help="Check the github configuration against GitHub before running it: credentials, "
    "permissions, targets, runner groups, the pools' images, runner versions and network. "
    "Exits 1 when anything is an error.",
)
def github_check(
    config: Annotated[Path, typer.Option("--config", help="The service's TOML configuration.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    from stoker.ci.github.check import run_check
    from stoker.service.config import load_config

    try:
        service_config = load_config(config)
        findings = _run_client(run_check(service_config))
    except StokerError as exc:
        raise _fail(exc) from None
    if json_out:
        typer.echo(json.dumps([f.__dict__ for f in findings], indent=2))
    else:
        for f in findings:
            err.print(f"[{_STYLE[f.level]}]{f.level:>7}[/]  {_safe(f.subject)}: {_safe(f.message)}")
    if any(f.level == "error" for f in findings):
        raise typer.Exit(1)


@github_app.command("runners", help="List the runners the service manages and their states.")
def github_runners(
    url: _Url = _DEFAULT_SERVICE_URL,
    token_file: _TokenFile = None,
    all_: Annotated[bool, typer.Option("--all", help="Include destroyed runners.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    from stoker.service.client import ApiClient

    async def main() -> Any:
        async with ApiClient(url, _api_token(token_file)) as client:
            return await client.get_json(f"/v1/github/runners?all={str(all_).lower()}")

    runners = _run_client(main())
    if json_out:
        typer.echo(json.dumps(runners, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for col in ("name", "pool", "state", "target", "job", "github job", "updated"):
        table.add_column(col, no_wrap=True)
    table.add_column("reason", overflow="ellipsis")
    for r in runners:
        table.add_row(
            _safe(r["name"]),
            _safe(r["pool"]),
            _safe(r["state"]),
            _safe(r["target"]),
            _safe(r.get("job_id") or ""),
            str(r.get("github_job_id") or ""),
            _safe(str(r.get("updated_at", ""))[:19]),
            _safe(r.get("reason") or ""),
        )
    Console().print(table)
