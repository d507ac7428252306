"""``stoker gitlab-executor``: the custom executor driver gitlab-runner calls for each job.

gitlab-runner starts it once per stage, a dozen times per job, so it lives
outside :mod:`stoker.cli` and the ``stoker`` entry point loads only this
module for it (not the other command groups).

Exit statuses follow GitLab Runner's contract, not the rest of the CLI's:
0 for success, ``BUILD_FAILURE_EXIT_CODE`` when the job's script failed,
``SYSTEM_FAILURE_EXIT_CODE`` for anything else (bad arguments included, so
that the job says "system failure" with our message instead of a build
failure the user would chase in their own script).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from stoker.errors import StokerError, UsageError
from stoker.units import parse_duration, parse_size_mb

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _safe(text: object) -> str:
    """One message line for the job's log: no control characters (it may quote a guest)."""
    return _CONTROL.sub("\ufffd", str(text))


executor_app: typer.Typer = typer.Typer(
    help="GitLab Runner custom executor driver: every job in a fresh microVM "
    "(gitlab-runner calls this; `stoker gitlab register` writes its config.toml entry).",
    no_args_is_help=True,
)


def _options(ctx: typer.Context) -> Any:
    return ctx.obj


@executor_app.callback()
def executor_options(
    ctx: typer.Context,
    service: Annotated[
        str | None,
        typer.Option(help="A `stoker serve` URL to take VMs from (default: a VM of this host)."),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help="File with a submit token for --service.")
    ] = None,
    pool: Annotated[str | None, typer.Option(help="The --service pool to use.")] = None,
    image: Annotated[str, typer.Option(help="Without --service: the image.")] = "gitlab-runner",
    cpus: Annotated[int, typer.Option(help="Without --service: vCPUs.")] = 2,
    memory: Annotated[str, typer.Option(help="Without --service: memory.")] = "2G",
    disk: Annotated[str, typer.Option(help="Without --service: writable disk.")] = "16G",
    allow: Annotated[
        list[str] | None,
        typer.Option(help="Without --service: more HOST[:PORT] the job may reach (repeatable)."),
    ] = None,
    builds_dir: Annotated[str, typer.Option(help="Builds directory in the guest.")] = "/builds",
    cache_dir: Annotated[str, typer.Option(help="Cache directory in the guest.")] = "/cache",
    user: Annotated[str | None, typer.Option(help="Guest account that runs the stages.")] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="Where the stages of a job share state.")
    ] = None,
    prepare_timeout: Annotated[str, typer.Option(help="Longest wait for a VM.")] = "10m",
    idle_timeout: Annotated[
        str, typer.Option(help="End a job's VM after this long without a stage.")
    ] = "30m",
) -> None:
    from stoker.ci.gitlab.executor import ExecutorOptions
    from stoker.paths import Dirs

    try:
        ctx.obj = ExecutorOptions(
            state_dir=state_dir or Dirs.from_env().runtime / "gitlab-executor",
            service_url=service,
            token_file=token_file,
            pool=pool,
            image=image,
            cpus=cpus,
            memory_mb=parse_size_mb(memory, what="--memory"),
            disk_mb=parse_size_mb(disk, what="--disk"),
            allow=tuple(allow or ()),
            builds_dir=builds_dir,
            cache_dir=cache_dir,
            user=user,
            prepare_timeout=parse_duration(prepare_timeout),
            idle_timeout=parse_duration(idle_timeout),
        )
    except (StokerError, ValueError) as exc:
        _exit(None, exc)


def _job() -> Any:
    from stoker.ci.gitlab.executor import JobEnv

    try:
        return JobEnv.from_environ(os.environ)
    except StokerError as exc:
        _exit(None, exc)


def _exit(job: Any, exc: BaseException) -> None:
    """Report ``exc`` (into the job's log) and exit with the status gitlab-runner expects."""
    kind = "error" if isinstance(exc, UsageError | ValueError) else "system failure"
    print(f"stoker: {kind}: {_safe(exc)}", file=sys.stderr)
    hint = getattr(exc, "hint", None)
    if hint:
        print(f"hint: {_safe(hint)}", file=sys.stderr)
    raise typer.Exit(job.system_failure if job is not None else 1)


def _say(text: str) -> None:
    print(text, flush=True)


def _stage(job: Any, coro: Any) -> Any:
    from stoker.ci.gitlab.executor import run_stage

    try:
        return asyncio.run(run_stage(coro))
    except asyncio.CancelledError:
        _exit(job, StokerError("stopped by a signal (gitlab-runner's deadline or a cancel)"))
    except StokerError as exc:
        _exit(job, exc)


@executor_app.command("config", help="Print the job's configuration (JSON) for gitlab-runner.")
def config_stage(ctx: typer.Context) -> None:
    from stoker.ci.gitlab.executor import config_output

    job = _job()
    print(json.dumps(config_output(_options(ctx), job)))


@executor_app.command("prepare", help="Get the job's VM (waits at most --prepare-timeout).")
def prepare_stage(ctx: typer.Context) -> None:
    from stoker.ci.gitlab.executor import prepare

    job = _job()
    _stage(job, prepare(_options(ctx), job, _say))


@executor_app.command("run", help="Run a stage's script in the job's VM.")
def run_stage_command(
    ctx: typer.Context,
    script: Annotated[Path, typer.Argument(help="The script gitlab-runner wrote.")],
    stage: Annotated[str, typer.Argument(help="The stage's name (get_sources, ...).")],
) -> None:
    from stoker.ci.gitlab.executor import run

    job = _job()
    status = _stage(
        job, run(_options(ctx), job, script, stage, sys.stdout.buffer, sys.stderr.buffer)
    )
    raise typer.Exit(status)


@executor_app.command("cleanup", help="Destroy the job's VM (always safe to run).")
def cleanup_stage(ctx: typer.Context) -> None:
    from stoker.ci.gitlab.executor import cleanup

    job = _job()
    _stage(job, cleanup(_options(ctx), job, _say))
