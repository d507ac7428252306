"""The ``stoker`` command line.  The only place that turns errors into exit statuses.

Exit statuses of ``stoker run``: the command's own status (128+N when it was
killed by signal N), 124 when it timed out, 125 when stoker or the VM failed
(infrastructure), 2 for bad usage, 130/143 when stoker itself was interrupted.

This package holds the root ``app``, the helpers every command shares and
``main()``; each command group lives in its own module (``run``, ``images``,
``snapshots``, ``kernel``, ``runners``, ``jobs``, ``network``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import typer

if TYPE_CHECKING:
    from rich.console import Console

from stoker.errors import InfrastructureError, StokerError, UsageError
from stoker.units import parse_duration

__all__ = ["app", "main", "parse_duration", "parse_env"]

EXIT_TIMEOUT = 124
EXIT_INFRA = 125
EXIT_USAGE = 2
#: Exit status of `stoker job submit --follow` / `job logs --follow` for a cancelled job.
EXIT_CANCELLED = 130

T = TypeVar("T")

app = typer.Typer(
    name="stoker",
    help="Build and test untrusted code in throw-away microVMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


class _StderrConsole:
    """rich's stderr Console, made on first use: importing rich is ~16 ms of every
    command's start-up, and `stoker run` prints nothing of ours on success."""

    _console: Console | None = None

    def get(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False, soft_wrap=True)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


_stderr = _StderrConsole()
#: For ``err.print(...)``.  What needs the Console itself (a context manager, a
#: ``console=`` argument) takes :func:`stderr_console` instead.
err = cast("Console", _stderr)


def stderr_console() -> Console:
    """The stderr Console itself (made now if it was not yet)."""
    return _stderr.get()


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _safe(text: object) -> str:
    """Text for the terminal: no control characters, no rich markup.

    Error messages carry guest console output and agent messages; a hostile
    guest must not be able to send escape sequences to the user's terminal or
    break (or fake) our output with markup.
    """
    from rich.markup import escape

    return escape(_CONTROL.sub("\ufffd", str(text)))


_SGR = {"dim": "2", "yellow": "33", "red": "31"}


def say(label: str, text: object = "", *, style: str = "dim") -> None:
    """One line on stderr without loading rich: ``label`` styled, then ``text``.

    For what `stoker run` prints while it starts its VM (a warning, progress):
    importing rich then would delay the VM by ~17 ms.  Styled only on a
    terminal, and not with ``NO_COLOR``; ``text`` loses its control characters
    (it may come from the guest).
    """
    body = f"{label} {_CONTROL.sub(chr(0xFFFD), str(text))}".rstrip(" ")
    if style in _SGR and sys.stderr.isatty() and not os.environ.get("NO_COLOR"):
        body = f"\x1b[{_SGR[style]}m{label}\x1b[0m" + body[len(label) :]
    sys.stderr.write(body + "\n")
    sys.stderr.flush()


def _fail(exc: StokerError) -> typer.Exit:
    kind = "error" if isinstance(exc, UsageError) else "infrastructure error"
    err.print(f"[bold red]stoker: {kind}:[/] {_safe(exc)}")
    if exc.hint:
        err.print(f"[yellow]hint:[/] {_safe(exc.hint)}")
    return typer.Exit(EXIT_USAGE if isinstance(exc, UsageError) else EXIT_INFRA)


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro``; SIGINT and SIGTERM cancel it so every VM is torn down first."""

    async def main() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        received: list[int] = []

        def on_signal(signum: int) -> None:
            received.append(signum)
            task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            return await coro
        except asyncio.CancelledError:
            if received:
                raise _Interrupted(received[0]) from None
            raise

    return asyncio.run(main())


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        # qemu.qmp logs a failed negotiation as ERROR; we report those failures ourselves.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


def parse_env(items: list[str]) -> dict[str, str]:
    """``K=V`` sets a value; a bare ``K`` passes the host's value through."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            if key not in os.environ:
                raise UsageError(f"--env {key}: not set on the host (use --env {key}=VALUE)")
            value = os.environ[key]
        env[key] = value
    return env


def _writer(stream: Any) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return write


def _progress(msg: str) -> None:
    err.print(f"[dim]stoker: {_safe(msg)}[/]")


def _warning(msg: str) -> None:
    err.print(f"[yellow]stoker: warning:[/] {_safe(msg)}")


def _read_secret(path: Path, what: str) -> str:
    """A secret from a file, or from standard input for ``-`` (never from the command line)."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the {what} from {path}: {exc}") from None
    return text


_standalone = False


def finish(code: int) -> typer.Exit:
    """End a command with exit status ``code``: raise what this returns.

    Run as the ``stoker`` program, a command that has released everything it
    held (``stoker run``, after its VM is gone) ends the process here instead:
    unwinding the interpreter (every module's objects) would add ~25 ms
    to every run.  In-process callers (tests) get the exception.
    """
    if _standalone:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        logging.shutdown()
        os._exit(code)
    return typer.Exit(code)


def main() -> None:
    """Console-script entry point."""
    global _standalone
    _standalone = True
    try:
        if sys.argv[1:2] == ["run"]:
            # The hot path builds only its own command (see run.run_app).
            run.run_app(args=sys.argv[2:], prog_name="stoker run")
        else:
            app()
    except InfrastructureError as exc:  # pragma: no cover - commands catch their own
        _fail(exc)
        sys.exit(EXIT_INFRA)


# The command groups, imported last: they register on `app` and use the helpers above.
# `run` first, so that its `run` and `doctor` lead `stoker --help` (before `serve`, in jobs).
from stoker.cli import run  # noqa: E402 (its commands register on `app`)

# isort: split
from stoker.cli import github, gitlab, images, jobs, kernel, network, runners, snapshots  # noqa: E402

app.add_typer(images.image_app, name="image")
app.add_typer(kernel.kernel_app, name="kernel")
app.add_typer(runners.runner_app, name="runner")
app.add_typer(snapshots.snapshot_app, name="snapshot")
app.add_typer(jobs.job_app, name="job")
app.add_typer(jobs.token_app, name="token")
app.add_typer(network.network_app, name="network")
app.add_typer(github.github_app, name="github")
app.add_typer(gitlab.gitlab_app, name="gitlab")
app.add_typer(gitlab.executor_app, name="gitlab-executor")
