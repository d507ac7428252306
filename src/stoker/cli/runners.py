"""``stoker runner github|gitlab``: one CI job, a GitHub or GitLab runner, in a fresh microVM."""

from __future__ import annotations

import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer

from stoker.cli import (
    _fail,
    _Interrupted,
    _progress,
    _read_secret,
    _run_async,
    _setup_logging,
    _warning,
    _writer,
    err,
)
from stoker.errors import StokerError, UsageError
from stoker.units import parse_duration

runner_app: typer.Typer = typer.Typer(
    help="Run one CI job: a GitHub or GitLab runner in a fresh microVM.", no_args_is_help=True
)


def _exit_with_runner(job: Coroutine[Any, Any, Any]) -> None:
    """Run a runner job; exit with the runner's status (or 125/2/128+N like `run`)."""
    try:
        result = _run_async(job)
    except _Interrupted as exc:
        err.print(f"stoker: interrupted by signal {exc.signum}; the VM was destroyed")
        raise typer.Exit(128 + exc.signum) from None
    except StokerError as exc:
        raise _fail(exc) from None
    raise typer.Exit(result.returncode)


@runner_app.command("github", help="Start a just-in-time Actions runner for one job.")
def runner_github(
    jitconfig_file: Annotated[
        Path,
        typer.Option(
            "--jitconfig-file",
            help="File holding GitHub's encoded_jit_config ('-': standard input).",
        ),
    ],
    image: Annotated[str, typer.Option(help="A github-runner image.")] = "github-runner",
    timeout: Annotated[str | None, typer.Option(help="Kill the runner after this long.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    from stoker.ci import github
    from stoker.vm import VM

    _setup_logging(verbose)

    async def main() -> Any:
        jitconfig = github.check_jitconfig(_read_secret(jitconfig_file, "JIT configuration"))
        async with VM(image, on_progress=_progress, on_warning=_warning) as vm:
            return await github.run_jit_runner(
                vm,
                jitconfig,
                stdout=_writer(sys.stdout.buffer),
                stderr=_writer(sys.stderr.buffer),
                timeout=parse_duration(timeout) if timeout else None,
            )

    _exit_with_runner(main())


@runner_app.command(
    "gitlab",
    help="UNSAFE: gitlab-runner run-single for one job, with the runner token INSIDE the VM "
    "(the job can read it and take its project's other jobs). Prefer `stoker gitlab-executor`. "
    "Instance runners' tokens are refused.",
)
def runner_gitlab(
    url: Annotated[str, typer.Option(help="The GitLab instance, e.g. https://gitlab.com.")],
    token_file: Annotated[
        Path,
        typer.Option("--token-file", help="File holding the runner token ('-': standard input)."),
    ],
    access_token_file: Annotated[
        Path,
        typer.Option(
            "--access-token-file",
            help="File with an access token (read_api) to check the runner is not instance-wide.",
        ),
    ],
    unsafe: Annotated[
        bool,
        typer.Option(
            "--unsafe-token-in-vm",
            help="Acknowledge that the job can read the runner token.",
        ),
    ] = False,
    image: Annotated[str, typer.Option(help="A gitlab-runner image.")] = "gitlab-runner",
    wait_timeout: Annotated[int, typer.Option(help="Seconds to wait for a job.")] = 600,
    timeout: Annotated[str | None, typer.Option(help="Kill the runner after this long.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    from stoker.ci import gitlab
    from stoker.ci.gitlab.run_single import check_runner_scope
    from stoker.vm import VM

    _setup_logging(verbose)

    async def main() -> Any:
        if not unsafe:
            raise UsageError(
                "this mode puts the runner token inside the VM, where the job can read it; "
                "pass --unsafe-token-in-vm to accept that",
                hint="`stoker gitlab-executor` keeps the token on the host (see the README)",
            )
        token = gitlab.check_token(_read_secret(token_file, "runner token"))
        access = gitlab.check_token(_read_secret(access_token_file, "access token"))
        gitlab.run_single_argv(url, builds_dir="/", wait_timeout=wait_timeout)  # validate early
        kind = await check_runner_scope(url, token, access)
        _warning(f"the {kind} runner's token goes into the VM: its job can read it")
        async with VM(image, on_progress=_progress, on_warning=_warning) as vm:
            return await gitlab.run_single_job(
                vm,
                url,
                token,
                wait_timeout=wait_timeout,
                stdout=_writer(sys.stdout.buffer),
                stderr=_writer(sys.stderr.buffer),
                timeout=parse_duration(timeout) if timeout else None,
            )

    _exit_with_runner(main())
