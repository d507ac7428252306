"""``stoker gitlab register|unregister``: the GitLab runners of ``stoker serve``'s pools.

(``stoker gitlab-executor`` is :mod:`stoker.ci.gitlab.cli`.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from stoker.ci.gitlab.cli import executor_app
from stoker.cli import _safe, err
from stoker.errors import StokerError, UsageError

__all__ = ["executor_app", "gitlab_app"]


# --- stoker gitlab register|unregister ------------------------------------------------------------

gitlab_app: typer.Typer = typer.Typer(
    help="GitLab runners for the pools of `stoker serve` (its gitlab configuration).",
    no_args_is_help=True,
)

_ConfigFile = Annotated[
    Path, typer.Option("--config", help="The service's TOML configuration (stoker.toml).")
]


def _registration(config: Path, action: str) -> None:
    from stoker.ci.gitlab.client import GitLabClient
    from stoker.ci.gitlab.integration import read_token, registrar_for
    from stoker.ci.gitlab.register import register, unregister
    from stoker.cli import _fail, _run_async
    from stoker.service.config import load_config

    def say(text: str) -> None:
        err.print(f"stoker: {_safe(text)}")

    async def main() -> Any:
        service_config = load_config(config)
        gitlab = service_config.gitlab
        if gitlab is None:
            raise UsageError(f"{config} has no [gitlab] table")
        registrar = registrar_for(service_config)
        token = read_token(gitlab.token_file, "GitLab access token")
        async with GitLabClient(gitlab.url, token) as client:
            if action == "register":
                return await register(registrar, client, say)
            return await unregister(registrar, client, say)

    try:
        report = _run_async(main())
    except StokerError as exc:
        raise _fail(exc) from None
    summary = {
        "created": report.created,
        "replaced": report.replaced,
        "kept": report.kept,
        "deleted": report.deleted,
        "config_written": report.config_written,
    }
    print(json.dumps(summary))


@gitlab_app.command(
    "register",
    help="Create a GitLab runner for every pool in gitlab.pools (verifying existing ones) "
    "and write their entries into gitlab-runner's config.toml. Running it twice changes nothing.",
)
def gitlab_register(config: _ConfigFile) -> None:
    _registration(config, "register")


@gitlab_app.command(
    "unregister",
    help="Delete every GitLab runner this configuration registered and their config.toml entries.",
)
def gitlab_unregister(config: _ConfigFile) -> None:
    _registration(config, "unregister")
