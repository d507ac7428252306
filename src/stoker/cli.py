"""The ``stoker`` command line.  The only place that turns errors into exit statuses.

Exit statuses of ``stoker run``: the command's own status (128+N when it was
killed by signal N), 124 when it timed out, 125 when stoker or the VM failed
(infrastructure), 2 for bad usage, 130/143 when stoker itself was interrupted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stoker.errors import InfrastructureError, StokerError, UsageError
from stoker.units import parse_duration

if TYPE_CHECKING:
    from stoker.images import ImageStore
    from stoker.net.policy import NetworkPolicy

EXIT_TIMEOUT = 124
EXIT_INFRA = 125
EXIT_USAGE = 2

T = TypeVar("T")

app = typer.Typer(
    name="stoker",
    help="Build and test untrusted code in throw-away microVMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
image_app = typer.Typer(help="Build and list root filesystem images.", no_args_is_help=True)
kernel_app = typer.Typer(help="Fetch or build the guest kernel.", no_args_is_help=True)
runner_app = typer.Typer(
    help="Run one CI job: a GitHub or GitLab runner in a fresh microVM.", no_args_is_help=True
)
app.add_typer(image_app, name="image")
app.add_typer(kernel_app, name="kernel")
app.add_typer(runner_app, name="runner")

err = Console(stderr=True, highlight=False, soft_wrap=True)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _safe(text: object) -> str:
    """Text for the terminal: no control characters, no rich markup.

    Error messages carry guest console output and agent messages; a hostile
    guest must not be able to send escape sequences to the user's terminal or
    break (or fake) our output with markup.
    """
    return escape(_CONTROL.sub("\ufffd", str(text)))


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


@app.command(
    help="Copy SRC into a fresh microVM, run CMD there, stream its output, exit with its status.",
)
def run(
    src: Annotated[Path, typer.Argument(help="Project directory to copy into the VM.")],
    command: Annotated[list[str], typer.Argument(help="Command to run (after --).")],
    image: Annotated[
        str, typer.Option(help="Image to boot: a name from `stoker image ls`.")
    ] = "default",
    cpus: Annotated[
        int | None, typer.Option(help="Virtual CPUs [default: the image's, else 2].")
    ] = None,
    memory: Annotated[
        str | None, typer.Option(help="Guest memory, e.g. 2G [default: the image's, else 1G].")
    ] = None,
    disk: Annotated[
        str | None,
        typer.Option(help="Size of the writable layer, e.g. 8G [default: the image's, else 4G]."),
    ] = None,
    timeout: Annotated[
        str | None, typer.Option(help="Kill the command after this long (30s, 10m, 1h).")
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
            help="auto: restore from a matching snapshot if one exists; create: make it "
            "first if needed; never: always boot.",
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
            "[default: the image's, else none].",
        ),
    ] = None,
    allow: Annotated[
        list[str] | None,
        typer.Option(
            "--allow",
            help="Allowed destination for --network egress: HOST[:PORT] (globs within a "
            "label: *.example.com), IP[/BITS][:PORT], or a preset @NAME "
            "(see `stoker network presets`). Implies --network egress.",
        ),
    ] = None,
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
    from stoker.run import RunRequest, run_job

    _setup_logging(verbose)
    try:
        if accel not in ("auto", "kvm", "tcg"):
            raise UsageError(f"--accel must be auto, kvm or tcg, not {accel!r}")
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
        )
        out_stream = sys.stderr.buffer if json_summary else sys.stdout.buffer
        summary = _run_async(
            run_job(
                req,
                stdout=_writer(out_stream),
                stderr=_writer(sys.stderr.buffer),
                stdin=_read_stdin() if stdin else None,
                on_progress=lambda msg: err.print(f"[dim]stoker: {_safe(msg)}[/]"),
                on_warning=lambda msg: err.print(f"[yellow]stoker: warning:[/] {_safe(msg)}"),
            )
        )
    except _Interrupted as exc:
        err.print(f"stoker: interrupted by signal {exc.signum}; the VM was destroyed")
        raise typer.Exit(128 + exc.signum) from None
    except StokerError as exc:
        raise _fail(exc) from None
    if summary.timed_out:
        err.print(f"[red]stoker: command timed out after {timeout} and was killed[/]")
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
    raise typer.Exit(summary.returncode if summary.returncode is not None else EXIT_INFRA)


def _network_policy(mode: str | None, allow: list[str]) -> NetworkPolicy | None:
    """The policy the flags ask for; None: none given, the image decides."""
    from stoker.net.policy import NetworkPolicy

    if mode is None and not allow:
        return None
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


def _writer(stream: Any) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return write


@app.command(help="Show what this host offers and whether `stoker run` can work here.")
def doctor(
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    from stoker.doctor import run_checks

    report = run_checks()
    if json_out:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
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
            if check.status == "fail" and check.fix:
                console.print(f"[red]{check.name}[/]: {check.fix}")
    raise typer.Exit(0 if report.ok else 1)


class _BuildProgress:
    """Rich progress for image builds: a spinner with the current step, a bar per download."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        )
        self._step = self._progress.add_task("starting", total=None)
        self._downloads: dict[str, Any] = {}

    def __enter__(self) -> _BuildProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def say(self, message: str) -> None:
        self._progress.console.print(f"[dim]stoker: {_safe(message)}[/]")
        self._progress.update(self._step, description=_safe(message))

    def download(self, name: str, done: int, total: int | None) -> None:
        task = self._downloads.get(name)
        if task is None:
            task = self._progress.add_task(f"artifact {_safe(name)}", total=total)
            self._downloads[name] = task
        self._progress.update(task, completed=done, total=total)


@image_app.command(
    "build",
    help="Build images from a spec file, or a shipped spec by name (default, python, "
    "github-runner, gitlab-runner). Already-built specs return at once.",
)
def image_build(
    spec: Annotated[
        str, typer.Argument(help="A spec file (.toml) or the name of a shipped spec.")
    ] = "default",
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Build only these images of a multi-image spec file."),
    ] = None,
    artifact: Annotated[
        list[str] | None,
        typer.Option(
            "--artifact",
            help="NAME=PATH: take artifact NAME from a local file (its SHA-256 is still checked).",
        ),
    ] = None,
) -> None:
    from stoker.images import ImageStore, builder_for
    from stoker.images.catalog import load_specs
    from stoker.images.fetch import parse_overrides
    from stoker.paths import Dirs

    dirs = Dirs.from_env()
    try:
        specs = load_specs(spec)
        overrides = parse_overrides(artifact or [])
        wanted = list(only or specs)
        unknown = [name for name in wanted if name not in specs]
        if unknown:
            raise UsageError(
                f"--only {unknown[0]}: {spec} has no image of that name",
                hint=f"its images: {', '.join(specs)}",
            )
        all_artifacts = {a.name for name in wanted for a in specs[name].artifacts}
        stray = sorted(set(overrides) - all_artifacts)
        if stray:
            raise UsageError(
                f"--artifact {stray[0]}: no image being built has an artifact of that name",
                hint=f"artifacts: {', '.join(sorted(all_artifacts)) or 'none'}",
            )
        store = ImageStore(dirs)
        with _BuildProgress() as progress:
            for name in wanted:
                image_spec = specs[name]
                builder = builder_for(
                    image_spec,
                    dirs=dirs,
                    overrides={
                        k: v
                        for k, v in overrides.items()
                        if k in {a.name for a in image_spec.artifacts}
                    },
                    progress=progress.say,
                    download_progress=progress.download,
                )
                img = store.ensure(builder, progress=progress.say)
                size = img.rootfs.stat().st_size
                typer.echo(f"{img.name} {img.digest[:12]} {img.rootfs} ({size / 1e6:.1f} MB)")
    except StokerError as exc:
        raise _fail(exc) from None


def _image_store() -> ImageStore:
    from stoker.images import ImageStore
    from stoker.paths import Dirs

    return ImageStore(Dirs.from_env())


@image_app.command("ls", help="List the images in the store; <none>: no name points at it.")
def image_ls(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead.")] = False,
) -> None:
    store = _image_store()
    pointers = store.pointers()
    rows: list[dict[str, object]] = []
    for img in store.list():
        named = pointers.get(img.name) == img.digest
        rows.append(
            {
                "name": img.name if named else None,
                "digest": img.digest,
                "size": img.rootfs.stat().st_size,
                "built_at": img.manifest.get("built_at"),
                "path": str(img.rootfs),
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table()
    for col in ("name", "digest", "size", "built_at"):
        table.add_column(col)
    for row in rows:
        size = row["size"]
        assert isinstance(size, int)
        table.add_row(
            str(row["name"] or "<none>"),
            str(row["digest"])[:12],
            f"{size / 1e6:.1f} MB",
            str(row["built_at"] or "?"),
        )
    Console().print(table)


@image_app.command("inspect", help="Print an image's manifest as JSON (by name or digest).")
def image_inspect(name: Annotated[str, typer.Argument(help="A name, digest or prefix.")]) -> None:
    try:
        img = _image_store().inspect(name)
    except StokerError as exc:
        raise _fail(exc) from None
    document = {**img.manifest, "path": str(img.rootfs), "size": img.rootfs.stat().st_size}
    typer.echo(json.dumps(document, indent=2, sort_keys=True))


@image_app.command("rm", help="Remove an image's name; `stoker image gc` frees the data.")
def image_rm(name: Annotated[str, typer.Argument()]) -> None:
    store = _image_store()
    try:
        digest = store.pointers().get(name)
        removed = store.remove(name)
    except StokerError as exc:
        raise _fail(exc) from None
    for path in removed:
        typer.echo(f"removed {path}")
    if digest is not None and digest not in store.pointers().values():
        err.print(f"stoker: image {digest[:12]} is now unnamed; `stoker image gc` deletes it")


@image_app.command("gc", help="Delete store entries no name points to, and stale builds.")
def image_gc(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would go.")] = False,
) -> None:
    try:
        report = _image_store().gc(dry_run=dry_run)
    except StokerError as exc:
        raise _fail(exc) from None
    verb = "would free" if dry_run else "freed"
    typer.echo(f"{verb} {report.freed_bytes / 1e6:.1f} MB")
    for digest in report.removed_digests:
        typer.echo(f"{'would remove' if dry_run else 'removed'} {digest}")
    for path in report.removed_tmp:
        typer.echo(f"{'would remove' if dry_run else 'removed'} {path}")
    for digest in report.busy_digests:
        err.print(f"stoker: kept {digest[:12]}: a build holds its lock")


def _snapshot_mode(value: str) -> Any:
    if value not in ("auto", "create", "never"):
        raise UsageError(f"--snapshot must be auto, create or never, not {value!r}")
    return value


snapshot_app = typer.Typer(
    help="Snapshots: start VMs from a saved template instead of booting.", no_args_is_help=True
)
app.add_typer(snapshot_app, name="snapshot")


@snapshot_app.command("create", help="Boot a template VM for an image and VM shape, save it.")
def snapshot_create(
    image: Annotated[str, typer.Option(help="Image to boot.")] = "default",
    cpus: Annotated[int | None, typer.Option(help="Virtual CPUs [default: the image's].")] = None,
    memory: Annotated[str | None, typer.Option(help="Guest memory [default: the image's].")] = None,
    disk: Annotated[str | None, typer.Option(help="Writable layer [default: the image's].")] = None,
    accel: Annotated[str, typer.Option(help="auto, kvm or tcg.")] = "auto",
) -> None:
    from stoker.vm import VM

    async def main() -> Any:
        if accel not in ("auto", "kvm", "tcg"):
            raise UsageError(f"--accel must be auto, kvm or tcg, not {accel!r}")
        vm = VM(
            image,
            cpus=cpus,
            memory=memory,
            disk=disk,
            accel=accel,  # type: ignore[arg-type]
            snapshot="create",
            on_progress=_progress,
            on_warning=_warning,
        )
        async with vm:
            assert vm.restored_from is not None
            return vm.restored_from, vm.timings.agent_ready

    try:
        snap, restore = _run_async(main())
    except _Interrupted as exc:
        raise typer.Exit(128 + exc.signum) from None
    except StokerError as exc:
        raise _fail(exc) from None
    typer.echo(
        f"{snap.path.name[:12]} {snap.key.image_digest[:12]} {snap.key.cpus}cpu "
        f"{snap.key.memory_mb}M {snap.key.disk_mb}M {snap.key.accel} "
        f"({snap.size_bytes / 1e6:.0f} MB on disk; a clone was ready in {restore:.2f}s)"
    )


@snapshot_app.command("ls", help="List snapshots.")
def snapshot_ls(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    from stoker.paths import Dirs
    from stoker.snapshots import SnapshotStore

    snaps = SnapshotStore(Dirs.from_env()).list()
    if as_json:
        rows = [{"id": s.path.name, "path": str(s.path), **s.meta} for s in snaps]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table()
    for col in ("id", "image", "shape", "accel", "backend", "on disk", "created"):
        table.add_column(col)
    for s in snaps:
        k = s.key
        table.add_row(
            s.path.name[:12],
            k.image_digest[:12],
            f"{k.cpus} cpu, {k.memory_mb}M, disk {k.disk_mb}M",
            k.accel,
            f"{k.backend} {k.backend_version}",
            f"{s.size_bytes / 1e6:.0f} MB",
            str(s.meta.get("created_at", "?")),
        )
    Console().print(table)


@snapshot_app.command("rm", help="Remove a snapshot by id (prefix), or all with --all.")
def snapshot_rm(
    snapshot_id: Annotated[
        str | None, typer.Argument(help="An id from `stoker snapshot ls`.")
    ] = None,
    remove_all: Annotated[bool, typer.Option("--all", help="Remove every snapshot.")] = False,
) -> None:
    from stoker.paths import Dirs
    from stoker.snapshots import SnapshotStore

    try:
        if (snapshot_id is None) == (not remove_all):
            raise UsageError("give a snapshot id or --all (not both)")
        removed = SnapshotStore(Dirs.from_env()).remove(snapshot_id or "")
    except StokerError as exc:
        raise _fail(exc) from None
    for path in removed:
        typer.echo(f"removed {path}")


def _read_secret(path: Path, what: str) -> str:
    """A secret from a file, or from standard input for ``-`` (never from the command line)."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the {what} from {path}: {exc}") from None
    return text


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


@runner_app.command("gitlab", help="Run gitlab-runner run-single for exactly one job.")
def runner_gitlab(
    url: Annotated[str, typer.Option(help="The GitLab instance, e.g. https://gitlab.com.")],
    token_file: Annotated[
        Path,
        typer.Option("--token-file", help="File holding the runner token ('-': standard input)."),
    ],
    image: Annotated[str, typer.Option(help="A gitlab-runner image.")] = "gitlab-runner",
    wait_timeout: Annotated[int, typer.Option(help="Seconds to wait for a job.")] = 600,
    timeout: Annotated[str | None, typer.Option(help="Kill the runner after this long.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    from stoker.ci import gitlab
    from stoker.vm import VM

    _setup_logging(verbose)

    async def main() -> Any:
        token = gitlab.check_token(_read_secret(token_file, "runner token"))
        gitlab.run_single_argv(url, builds_dir="/", wait_timeout=wait_timeout)  # validate early
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


def _progress(msg: str) -> None:
    err.print(f"[dim]stoker: {_safe(msg)}[/]")


def _warning(msg: str) -> None:
    err.print(f"[yellow]stoker: warning:[/] {_safe(msg)}")


@kernel_app.command(
    "build",
    help="Build the stoker-microvm kernel from Debian's linux-source (5-10 minutes, cached).",
)
def kernel_build(
    refresh: Annotated[
        bool, typer.Option(help="Resolve linux-source again; rebuild if it changed.")
    ] = False,
    jobs: Annotated[
        int | None,
        typer.Option("--jobs", "-j", min=1, help="Parallel compile jobs (default: all CPUs)."),
    ] = None,
) -> None:
    from stoker.kernel.build import build_microvm_kernel
    from stoker.paths import Dirs

    try:
        kernel = build_microvm_kernel(
            Dirs.from_env(), refresh=refresh, jobs=jobs, progress=_progress
        )
    except KeyboardInterrupt:
        err.print("stoker: interrupted; the build was stopped and will be cleaned up")
        raise typer.Exit(130) from None
    except StokerError as exc:
        raise _fail(exc) from None
    typer.echo(f"{kernel.release} {kernel.bzimage} {kernel.vmlinux}")


@kernel_app.command("fetch", help="Download and unpack Debian's cloud kernel into the cache.")
def kernel_fetch(
    refresh: Annotated[bool, typer.Option(help="Look for a newer kernel package.")] = False,
) -> None:
    from stoker.kernel import provision_kernel
    from stoker.paths import Dirs

    try:
        kernel = provision_kernel(
            Dirs.from_env(),
            refresh=refresh,
            progress=lambda msg: err.print(f"[dim]stoker: {msg}[/]"),
        )
    except StokerError as exc:
        raise _fail(exc) from None
    typer.echo(f"{kernel.package} {kernel.version} {kernel.vmlinuz}")


# --- the job service: `stoker serve`, `stoker job ...`, `stoker token ...` -----------------------

job_app = typer.Typer(
    help="Submit jobs to a `stoker serve` service, follow them, fetch their artifacts.",
    no_args_is_help=True,
)
token_app = typer.Typer(help="API tokens for `stoker serve`.", no_args_is_help=True)
app.add_typer(job_app, name="job")
app.add_typer(token_app, name="token")

#: Exit status of `stoker job submit --follow` / `job logs --follow` for a cancelled job.
EXIT_CANCELLED = 130

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
    from stoker.service.service import configure_logging

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
    from stoker.service.api import serve as serve_api

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        if stop.is_set():
            task.cancel()
            return
        err.print(
            f"stoker: signal {signum}: stopping; running jobs get up to "
            f"{config.shutdown_grace_seconds:g}s"
        )
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
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
    help="Make an API token. Prints the token once on stdout and, on stderr, the [[tokens]] "
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


network_app = typer.Typer(
    help="Guest network policies: presets, entry checks.", no_args_is_help=True
)
app.add_typer(network_app, name="network")


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
        list[str], typer.Argument(help="Entries: HOST[:PORT], IP[/BITS][:PORT], @NAME.")
    ],
) -> None:
    from stoker.net.policy import parse_entry

    try:
        for text in entries:
            for entry in parse_entry(text):
                typer.echo(f"{text}: {entry}")
    except StokerError as exc:
        raise _fail(exc) from None


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except InfrastructureError as exc:  # pragma: no cover - commands catch their own
        _fail(exc)
        sys.exit(EXIT_INFRA)


if __name__ == "__main__":
    main()
