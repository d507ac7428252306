"""``stoker run`` (a command on a copy of a project in a fresh microVM) and ``stoker doctor``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from stoker.cli import (
    EXIT_INFRA,
    _fail,
    _Interrupted,
    _run_async,
    _safe,
    _setup_logging,
    _writer,
    app,
    err,
    finish,
    parse_env,
    say,
)
from stoker.errors import StokerError, UsageError
from stoker.units import parse_duration

if TYPE_CHECKING:
    from stoker.net.policy import NetworkPolicy


RUN_HELP = "Copy SRC into a fresh microVM, run CMD there, stream its output, exit with its status."


@app.command(help=RUN_HELP)
def run(
    src: Annotated[Path, typer.Argument(help="Project directory to copy into the VM.")],
    command: Annotated[list[str], typer.Argument(help="Command to run (after --).")],
    image: Annotated[
        str,
        typer.Option(
            help="Image to boot: a name from `stoker image ls`, or nix:FLAKE#ATTR / "
            "nixos:FLAKE#NAME (built first if needed, named nix-ATTR / nixos-NAME)."
        ),
    ] = "default",
    cpus: Annotated[
        int | None, typer.Option(help="Virtual CPUs \\[default: the image's, else 2].")
    ] = None,
    memory: Annotated[
        str | None, typer.Option(help="Guest memory, e.g. 2G \\[default: the image's, else 1G].")
    ] = None,
    disk: Annotated[
        str | None,
        typer.Option(help="Size of the writable layer, e.g. 8G \\[default: the image's, else 4G]."),
    ] = None,
    timeout: Annotated[
        str | None, typer.Option(help="Kill the command after this long (30s, 10m, 1h).")
    ] = None,
    pids_limit: Annotated[
        int | None,
        typer.Option(
            help="Most processes the command may have in the guest; a command that keeps "
            "hitting it (a fork bomb) is killed \\[default: the image's, else 1 per MiB "
            "of guest memory, at least 512].",
        ),
    ] = None,
    memory_limit: Annotated[
        str | None,
        typer.Option(
            help="Most memory the command may use in the guest, e.g. 512M; beyond it the "
            "guest's OOM killer ends it \\[default: the image's, else the guest's memory "
            "minus 128 MiB for the agent].",
        ),
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="K=V (or K to pass the host's value).")
    ] = None,
    artifacts: Annotated[
        list[str] | None,
        typer.Option("--artifacts", "-a", help="Glob (relative to SRC) to copy back."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Where artifacts go.")] = Path("stoker-out"),
    accel: Annotated[str, typer.Option(help="auto, kvm or tcg.")] = "auto",
    snapshot: Annotated[
        str,
        typer.Option(
            envvar="STOKER_SNAPSHOT",
            help="auto: restore from a matching snapshot, else boot and make one in the "
            "background for the next run; reuse: restore if one exists, never make one; "
            "create: make it first if needed; never: always boot.",
        ),
    ] = "auto",
    vmm: Annotated[
        str, typer.Option(help="The VMM: qemu, firecracker or cloud-hypervisor.")
    ] = "qemu",
    network: Annotated[
        str | None,
        typer.Option(
            help="none (no network), egress (only --allow destinations, through a "
            "host-side proxy) or nat (unfiltered; unsafe for untrusted code) "
            "\\[default: the image's, else none].",
        ),
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            help="Allowed destination for --network egress: HOST[:PORT] (globs within a "
            "label: *.example.com), IP\\[/BITS][:PORT], or a preset @NAME "
            "(see `stoker network presets`). Implies --network egress.",
        ),
    ] = None,
    cgroups: Annotated[
        str,
        typer.Option(
            envvar="STOKER_CGROUPS",
            help="Host-side limits of the VM's QEMU (a cgroup v2 with memory.max, pids.max, "
            "cpu.weight): auto (when this host allows, else a note), required (fail "
            "without them) or off. `stoker doctor` shows what this host gives.",
        ),
    ] = "auto",
    stdin: Annotated[
        bool, typer.Option("--stdin", help="Forward stoker's standard input to the command.")
    ] = False,
    json_summary: Annotated[
        bool,
        typer.Option(
            "--json", help="Print a JSON summary on stdout (command output goes to stderr)."
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    from stoker.isolation import check_mode
    from stoker.run import RunRequest, run_job

    _setup_logging(verbose)
    try:
        if accel not in ("auto", "kvm", "tcg"):
            raise UsageError(f"--accel must be auto, kvm or tcg, not {accel!r}")
        image = _flake_image(image)
        req = RunRequest(
            src=src,
            argv=tuple(command),
            image=image,
            cpus=cpus,
            memory=memory,
            disk=disk,
            timeout=parse_duration(timeout) if timeout else None,
            env=parse_env(env or []),
            artifacts=tuple(artifacts or ()),
            out=out,
            accel=accel,  # type: ignore[arg-type]
            snapshot=_snapshot_mode(snapshot),
            vmm=vmm,
            network=_network_policy(network, allow or []),
            pids_limit=pids_limit,
            memory_limit=memory_limit,
            cgroups=check_mode(cgroups, what="--cgroups"),
        )
        out_stream = sys.stderr.buffer if json_summary else sys.stdout.buffer
        startup = _seconds_since_process_start()
        summary = _run_async(
            run_job(
                req,
                stdout=_writer(out_stream),
                stderr=_writer(sys.stderr.buffer),
                stdin=_read_stdin() if stdin else None,
                on_progress=lambda msg: say("stoker:", msg, style="dim"),
                on_warning=lambda msg: say("stoker: warning:", msg, style="yellow"),
            )
        )
    except _Interrupted as exc:
        err.print(f"stoker: interrupted by signal {exc.signum}; the VM was destroyed")
        raise typer.Exit(128 + exc.signum) from None
    except StokerError as exc:
        raise _fail(exc) from None
    if startup is not None:
        # Interpreter start, imports and argument parsing: what the VM waited for.
        summary.timings["startup"] = round(startup, 3)
    if summary.missing_snapshot is not None and req.snapshot == "auto":
        from stoker.paths import Dirs
        from stoker.snapshots import spawn_maker

        pid = spawn_maker(req.image, summary.missing_snapshot, Dirs.from_env(), vmm=req.vmm)
        summary.snapshot_maker_pid = pid
        if pid is not None:
            err.print("[dim]stoker: making a snapshot in the background: later runs restore[/]")
    if summary.message is not None:
        # Why it ended, in one line: an OOM kill, a fork bomb, a full disk, a timeout, a panic.
        err.print(f"[red]stoker: {_safe(summary.message)}[/]")
    _report_denied(summary.denied_connections(), summary.network)
    if json_summary:
        sys.stdout.write(json.dumps(summary.as_dict(), indent=2) + "\n")
    elif summary.artifacts or summary.missing_artifacts:
        err.print(
            f"stoker: {len(summary.artifacts)} artifact path(s) copied to {summary.artifact_dir}"
        )
        for pattern in summary.missing_artifacts:
            err.print(
                f"[yellow]stoker: warning:[/] artifact pattern {_safe(repr(pattern))} "
                "matched nothing"
            )
    raise finish(summary.returncode if summary.returncode is not None else EXIT_INFRA)


#: `stoker run` alone: what :func:`stoker.cli.main` invokes for it.  Typer builds
#: this one command in ~3 ms; the whole command tree takes ~22 ms of every start.
run_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
run_app.command(help=RUN_HELP)(run)


def _network_policy(mode: str | None, allow: list[str]) -> NetworkPolicy | None:
    """The policy the flags ask for; None: none given, the image decides."""
    if mode is None and not allow:
        return None
    from stoker.net.policy import NetworkPolicy

    return NetworkPolicy.from_options(mode=mode, allow=allow)


def _report_denied(denied: list[str], network: dict[str, Any]) -> None:
    """Say which connections the policy denied: a build failing for it must show why."""
    if not denied:
        return
    count = network.get("connections", {}).get("denied", len(denied))
    err.print(f"[yellow]stoker: the network policy denied {count} connection(s):[/]")
    for line in denied:
        err.print(f"  {_safe(line)}")
    err.print(
        "[dim]stoker: allow a destination with --allow HOST[:PORT] (or the image's [network])[/]"
    )


async def _read_stdin() -> AsyncIterator[bytes]:
    """Our stdin, chunk by chunk, read in a thread (it may be a terminal or a pipe)."""
    fd = sys.stdin.fileno()
    while chunk := await asyncio.to_thread(os.read, fd, 65536):
        yield chunk


def _seconds_since_process_start() -> float | None:
    """How long ago this process started (10 ms resolution), from the kernel's record."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _snapshot_mode(value: str) -> Any:
    if value not in ("auto", "reuse", "create", "never"):
        raise UsageError(f"--snapshot must be auto, reuse, create or never, not {value!r}")
    return value


@app.command(help="Show what this host offers and whether `stoker run` can work here.")
def doctor(
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    from stoker.doctor import run_checks

    report = run_checks()
    if json_out:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        from rich.console import Console
        from rich.table import Table

        console = Console()
        table = Table(title="stoker doctor", show_lines=False)
        table.add_column("check")
        table.add_column("status")
        table.add_column("details")
        for check in report.checks:
            status = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
            table.add_row(check.name, status[check.status], check.detail)
        console.print(table)
        for check in report.checks:
            if check.status != "ok" and check.fix:
                colour = "red" if check.status == "fail" else "yellow"
                console.print(f"[{colour}]{check.name}[/]: {check.fix}")
    raise typer.Exit(0 if report.ok else 1)


def _flake_image(image: str) -> str:
    """``image`` itself, or for a ``nix:``/``nixos:`` base the name of its image (built now)."""
    from stoker.images.nix import ensure_flake_image, is_flake_base

    if not is_flake_base(image):
        return image
    from stoker.paths import Dirs

    return ensure_flake_image(
        image,
        dirs=Dirs.from_env(),
        cwd=Path.cwd(),
        progress=lambda msg: say("stoker:", msg, style="dim"),
    )
