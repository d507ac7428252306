"""``stoker kernel build|fetch``: build the stoker-microvm kernel or fetch Debian's cloud kernel."""

from __future__ import annotations

from typing import Annotated

import typer

from stoker.cli import _fail, _progress, err
from stoker.errors import StokerError

kernel_app: typer.Typer = typer.Typer(help="Fetch or build the guest kernel.", no_args_is_help=True)


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
