"""The job service: ``stoker serve``, ``stoker job ...`` (its clients) and ``stoker token ...``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from stoker.cli import (
    EXIT_CANCELLED,
    EXIT_INFRA,
    EXIT_TIMEOUT,
    _fail,
    _Interrupted,
    _read_secret,
    _run_async,
    _safe,
    app,
    err,
    parse_env,
)
from stoker.errors import StokerError, UsageError

T = TypeVar("T")

job_app: typer.Typer = typer.Typer(
    help="Submit jobs to a `stoker serve` service, follow them, fetch their artifacts.",
    no_args_is_help=True,
)
token_app: typer.Typer = typer.Typer(help="API tokens for `stoker serve`.", no_args_is_help=True)

_Url = Annotated[
    str,
    typer.Option("--url", envvar="STOKER_URL", help="The service's base URL."),
]
_TokenFile = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help="File holding the API token ('-': standard input); default: $STOKER_TOKEN.",
    ),
]
#: Where `stoker serve` listens by default ([listen] in its configuration).
_DEFAULT_SERVICE_URL = "http://127.0.0.1:8765"


def _api_token(token_file: Path | None) -> str:
    """The API token from --token-file or $STOKER_TOKEN (never from the command line)."""
    if token_file is not None:
        token = _read_secret(token_file, "API token").strip()
    else:
        token = os.environ.get("STOKER_TOKEN", "").strip()
    if not token:
        raise UsageError(
            "no API token: give --token-file FILE or set STOKER_TOKEN",
            hint="`stoker token new NAME` makes one; its hash goes in the service's config",
        )
    if any(c.isspace() or ord(c) < 32 for c in token):
        raise UsageError("the API token contains whitespace or control characters")
    return token


def _run_client(coro: Coroutine[Any, Any, T]) -> T:
    """Run a client coroutine; errors and signals become exit statuses."""
    try:
        return _run_async(coro)
    except _Interrupted as exc:
        raise typer.Exit(128 + exc.signum) from None
    except StokerError as exc:
        raise _fail(exc) from None


def _job_exit_status(job: dict[str, Any]) -> int:
    """The exit status `--follow` ends with: like `stoker run` (cancelled: 130)."""
    state, code, sig = job.get("state"), job.get("exit_code"), job.get("signal")
    if state == "succeeded":
        return 0
    if state == "failed":
        if isinstance(code, int) and 0 < code < 256:
            return code
        return 128 + sig if isinstance(sig, int) and sig > 0 else 1
    if state == "timed_out":
        return EXIT_TIMEOUT
    if state == "cancelled":
        return EXIT_CANCELLED
    return EXIT_INFRA


def _write_chunk(stream: str, data: bytes) -> None:
    if stream == "stdout":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    elif stream == "stderr":
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()
    else:  # stoker's own messages about the job
        for line in data.decode("utf-8", "replace").splitlines():
            err.print(f"[dim]{_safe(line)}[/]")


def _report_end(job: dict[str, Any]) -> int:
    status = _job_exit_status(job)
    state = str(job.get("state"))
    reason = job.get("reason")
    colour = "green" if status == 0 else "red"
    text = f"stoker: job {_safe(job.get('id'))} {_safe(state)}"
    if reason:
        text += f" ({_safe(reason)})"
    err.print(f"[{colour}]{text}[/]")
    if job.get("log_truncated"):
        err.print("[yellow]stoker: warning:[/] the job wrote more output than the service keeps")
    return status


async def _follow_job(client: Any, job_id: str) -> int:
    from stoker.service.client import LogEnd

    try:
        async for item in client.follow(job_id):
            if isinstance(item, LogEnd):
                return _report_end(item.job)
            _write_chunk(item.stream, item.data)
    except asyncio.CancelledError:
        err.print(
            f"stoker: stopped following job {_safe(job_id)}; it keeps running "
            f"(`stoker job cancel {_safe(job_id)}` stops it)"
        )
        raise
    raise StokerError(f"the log stream of job {job_id} ended without the job's end")


@job_app.command(
    "submit",
    help="Upload SRC and queue CMD (after --) to run on it in a fresh microVM. Prints the "
    "job id; with --follow streams its output and exits with its status, like `stoker run`.",
)
def job_submit(
    src: Annotated[Path, typer.Argument(help="Project directory to upload.")],
    command: Annotated[list[str], typer.Argument(help="Command to run (after --).")],
    url: _Url = _DEFAULT_SERVICE_URL,
    token_file: _TokenFile = None,
    image: Annotated[str | None, typer.Option(help="Image to run (picks a pool).")] = None,
    pool: Annotated[str | None, typer.Option(help="Pool to run in.")] = None,
    cpus: Annotated[int | None, typer.Option(help="Virtual CPUs needed at least.")] = None,
    memory: Annotated[str | None, typer.Option(help="Memory needed at least, e.g. 2G.")] = None,
    disk: Annotated[str | None, typer.Option(help="Disk needed at least, e.g. 8G.")] = None,
    timeout: Annotated[
        str | None, typer.Option(help="Kill the command after this long (default: the pool's).")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="K=V (or K to pass the host's value).")
    ] = None,
    secret: Annotated[
        list[str] | None,
        typer.Option(
            "--secret",
            help="K=V, or K to pass the host's value: an environment variable whose value "
            "the service never shows.",
        ),
    ] = None,
    artifacts: Annotated[
        list[str] | None,
        typer.Option("--artifacts", "-a", help="Glob (relative to SRC) to keep as an artifact."),
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="A label the pool must have.")
    ] = None,
    priority: Annotated[int | None, typer.Option(help="Higher runs first.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream the output; exit with the job's status.")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the job as JSON.")] = False,
) -> None:
    from stoker.service.client import ApiClient, pack_source, temporary_directory

    try:
        token = _api_token(token_file)
        spec: dict[str, Any] = {"command": list(command)}
        for key, value in (
            ("image", image),
            ("pool", pool),
            ("cpus", cpus),
            ("memory", memory),
            ("disk", disk),
            ("timeout", timeout),
            ("priority", priority),
        ):
            if value is not None:
                spec[key] = value
        spec["env"] = parse_env(env or [])
        spec["secrets"] = parse_env(secret or [])
        spec["artifacts"] = list(artifacts or [])
        spec["labels"] = list(label or [])
    except StokerError as exc:
        raise _fail(exc) from None

    async def main() -> int:
        async with ApiClient(url, token) as client:
            with temporary_directory() as tmp:
                source = await asyncio.to_thread(pack_source, src, Path(tmp))
                job = await client.submit(spec, source)
            if not follow:
                typer.echo(json.dumps(job, indent=2) if json_out else job["id"])
                return 0
            err.print(f"stoker: job {_safe(job['id'])} queued (pool {_safe(job.get('pool'))})")
            return await _follow_job(client, str(job["id"]))

    raise typer.Exit(_run_client(main()))


@job_app.command("ls", help="List jobs, newest first.")
def job_ls(
    url: _Url = _DEFAULT_SERVICE_URL,
    token_file: _TokenFile = None,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    pool: Annotated[str | None, typer.Option(help="Only jobs of this pool.")] = None,
    label: Annotated[str | None, typer.Option(help="Only jobs with this label.")] = None,
    submitter: Annotated[str | None, typer.Option(help="Only jobs of this submitter.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    from stoker.service.client import ApiClient

    async def main() -> list[dict[str, Any]]:
        async with ApiClient(url, _api_token(token_file)) as client:
            return await client.jobs(
                state=state, pool=pool, label=label, submitter=submitter, limit=limit
            )

    jobs = _run_client(main())
    if json_out:
        typer.echo(json.dumps(jobs, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for col in ("id", "state", "exit", "submitter", "pool", "created"):
        table.add_column(col, no_wrap=True)
    table.add_column("command", no_wrap=True, overflow="ellipsis")
    for job in jobs:
        code = job.get("exit_code")
        command = " ".join(job.get("command") or [])
        table.add_row(
            _safe(job["id"]),
            _safe(job["state"]),
            "" if code is None else str(code),
            _safe(job["submitter"]),
            _safe(job.get("pool") or ""),
            _safe(str(job.get("created_at", ""))[:19]),
            _safe(command if len(command) <= 40 else command[:39] + "\u2026"),
        )
    Console().print(table)


@job_app.command("show", help="Print a job (with its state transitions) as JSON.")
def job_show(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    url: _Url = _DEFAULT_SERVICE_URL,
    token_file: _TokenFile = None,
) -> None:
    from stoker.service.client import ApiClient

    async def main() -> dict[str, Any]:
        async with ApiClient(url, _api_token(token_file)) as client:
            return await client.get(job_id)

    typer.echo(json.dumps(_run_client(main()), indent=2))


@job_app.command(
    "logs",
    help="Print a job's output (stdout to stdout, stderr to stderr). With --follow, stream "
    "it until the job ends and exit with the job's status.",
)
def job_logs(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    url: _Url = _DEFAULT_SERVICE_URL,
    token_file: _TokenFile = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until it ends.")] = False,
) -> None:
    from stoker.service.client import ApiClient, decode_chunk

    async def main() -> int:
        async with ApiClient(url, _api_token(token_file)) as client:
            if follow:
                return await _follow_job(client, job_id)
            after = 0
            while True:
                page = await client.logs(job_id, after=after)
                for chunk in page["chunks"]:
                    _write_chunk(str(chunk["stream"]), decode_chunk(chunk))
                if page["complete"] or not page["chunks"]:
                    break
                after = int(page["next_after"])
            if page.get("truncated"):
                err.print("[yellow]stoker: warning:[/] the job wrote more than the service keeps")
            return 0

    raise typer.Exit(_run_client(main()))


@job_app.command("cancel", help="Cancel a queued or running job.")
def job_cancel(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    url: _Url = _DEFAULT_SERVICE_URL,
    token_file: _TokenFile = None,
) -> None:
    from stoker.service.client import ApiClient

    async def main() -> dict[str, Any]:
        async with ApiClient(url, _api_token(token_file)) as client:
            return await client.cancel(job_id)

    job = _run_client(main())
    if job.get("state") == "cancelled":
        typer.echo(f"job {job['id']} cancelled")
    else:
        typer.echo(f"job {job['id']}: cancel requested (it is {job.get('state')}; its VM stops)")


@job_app.command("artifacts", help="Download a job's artifacts into --out.")
def job_artifacts(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    url: _Url = _DEFAULT_SERVICE_URL,
    token_file: _TokenFile = None,
    out: Annotated[Path, typer.Option(help="Where the artifacts go.")] = Path("stoker-out"),
) -> None:
    from stoker.service.client import ApiClient

    async def main() -> list[tuple[dict[str, Any], Path]]:
        async with ApiClient(url, _api_token(token_file)) as client:
            listed = await client.artifacts(job_id)
            return [
                (item, await client.download(job_id, item["name"], out, sha256=item["sha256"]))
                for item in listed
            ]

    done = _run_client(main())
    for item, path in done:
        typer.echo(f"{path} ({item['size']} bytes)")
    if not done:
        err.print(f"stoker: job {_safe(job_id)} has no artifacts")


@app.command(
    help="Run the job service: REST API, scheduler and VM supervisor, until SIGTERM or "
    "SIGINT (then running jobs get shutdown_grace_seconds; a second signal stops at once).",
)
def serve(
    config: Annotated[Path, typer.Option("--config", help="The service's TOML configuration.")],
    log_format: Annotated[str, typer.Option(help="text or json (one object per line).")] = "text",
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    from stoker.service.config import load_config
    from stoker.service.daemon import configure_logging

    try:
        if log_format not in ("text", "json"):
            raise UsageError(f"--log-format must be text or json, not {log_format!r}")
        if log_level.lower() not in ("debug", "info", "warning", "error"):
            raise UsageError(
                f"--log-level must be debug, info, warning or error, not {log_level!r}"
            )
        configure_logging(log_format, log_level)  # type: ignore[arg-type]
        service_config = load_config(config)
        asyncio.run(_serve_until_signalled(service_config))
    except _Interrupted as exc:
        err.print(f"stoker: stopped at once by a second signal ({exc.signum})")
        raise typer.Exit(128 + exc.signum) from None
    except StokerError as exc:
        raise _fail(exc) from None


async def _serve_until_signalled(config: Any) -> None:
    from stoker.service import early_signals
    from stoker.service.daemon import serve as serve_api

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int, when: str = "") -> None:
        received.append(signum)
        if stop.is_set():
            task.cancel()
            return
        err.print(
            f"stoker: signal {signum}{when}: stopping; running jobs get up to "
            f"{config.shutdown_grace_seconds:g}s"
        )
        stop.set()

    for signum in early_signals.STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    for early in early_signals.received()[:1]:
        on_signal(early, " during start-up")
    try:
        await serve_api(
            config, stop=stop, on_ready=lambda url: err.print(f"stoker: serving on {url}")
        )
    except asyncio.CancelledError:
        if len(received) > 1:
            raise _Interrupted(received[-1]) from None
        raise


@token_app.command(
    "new",
    help="Make an API token. Prints the token once on stdout and, on stderr, the [\\[tokens]] "
    "entry (with only its SHA-256) for the service's configuration.",
)
def token_new(
    name: Annotated[str, typer.Argument(help="Who holds it (the jobs' submitter name).")],
    scopes: Annotated[
        str, typer.Option(help="Comma-separated: submit, read, admin (admin implies all).")
    ] = "submit,read",
) -> None:
    from stoker.service.auth import config_snippet, new_token, parse_scopes

    try:
        token = new_token()
        snippet = config_snippet(name, parse_scopes(scopes), token)
    except ValueError as exc:
        raise _fail(UsageError(str(exc))) from None
    typer.echo(token)
    sys.stderr.write(
        "# Add to the service's configuration; the token is shown only this once:\n" + snippet
    )


@token_app.command("hash", help="Print the SHA-256 of a token read from standard input.")
def token_hash() -> None:
    from stoker.service.auth import hash_token

    token = sys.stdin.read().strip()
    if not token:
        raise _fail(UsageError("no token on standard input"))
    typer.echo(hash_token(token))
