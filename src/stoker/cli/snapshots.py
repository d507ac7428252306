"""``stoker snapshot ...``: create, list and remove snapshots (VMs from a template, not a boot)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from stoker.cli import _fail, _Interrupted, _progress, _run_async, _warning
from stoker.errors import StokerError, UsageError

snapshot_app: typer.Typer = typer.Typer(
    help="Snapshots: start VMs from a saved template instead of booting.", no_args_is_help=True
)


@snapshot_app.command("create", help="Boot a template VM for an image and VM shape, save it.")
def snapshot_create(
    image: Annotated[str, typer.Option(help="Image to boot.")] = "default",
    cpus: Annotated[int | None, typer.Option(help="Virtual CPUs \\[default: the image's].")] = None,
    memory: Annotated[
        str | None, typer.Option(help="Guest memory \\[default: the image's].")
    ] = None,
    disk: Annotated[
        str | None, typer.Option(help="Writable layer \\[default: the image's].")
    ] = None,
    accel: Annotated[str, typer.Option(help="auto, kvm or tcg.")] = "auto",
    vmm: Annotated[str, typer.Option(help="The VMM (snapshots: qemu).")] = "qemu",
    expect: Annotated[
        str | None,
        typer.Option(
            hidden=True,
            help="The key digest `stoker run` found missing: do nothing when it exists "
            "or another maker is at work on it.",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")] = False,
) -> None:
    from stoker.backends import get_backend
    from stoker.paths import Dirs
    from stoker.snapshots import SnapshotStore
    from stoker.vm import VM

    store = SnapshotStore(Dirs.from_env())
    claim = None
    if expect is not None:
        if not expect.isalnum() or len(expect) > 128:
            raise _fail(UsageError(f"--expect must be a key digest, not {expect!r}"))
        claim = store.claim_maker(expect)
        if claim is None:
            return  # made already, or being made

    async def main() -> Any:
        if accel not in ("auto", "kvm", "tcg"):
            raise UsageError(f"--accel must be auto, kvm or tcg, not {accel!r}")
        vm = VM(
            image,
            cpus=cpus,
            memory=memory,
            disk=disk,
            accel=accel,  # type: ignore[arg-type]
            backend=get_backend(vmm),
            snapshot="create",
            on_progress=None if quiet else _progress,
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
    finally:
        store.release_maker(claim)
    evicted = store.gc()
    typer.echo(
        f"{snap.path.name[:12]} {snap.key.image_digest[:12]} {snap.key.cpus}cpu "
        f"{snap.key.memory_mb}M {snap.key.disk_mb}M {snap.key.accel} "
        f"({snap.size_bytes / 1e6:.0f} MB on disk; a clone was ready in {restore:.2f}s)"
    )
    for old in evicted:
        typer.echo(f"evicted {old.path.name[:12]} (least recently used)")


@snapshot_app.command(
    "gc",
    help="Evict least recently used snapshots beyond STOKER_SNAPSHOT_MAX_COUNT (16) "
    "and STOKER_SNAPSHOT_MAX_BYTES (20 GiB).",
)
def snapshot_gc(
    max_count: Annotated[int | None, typer.Option(min=0, help="Keep at most this many.")] = None,
    max_bytes: Annotated[
        str | None, typer.Option(help="Keep at most this much on disk (e.g. 10G).")
    ] = None,
) -> None:
    from stoker.paths import Dirs
    from stoker.snapshots import SnapshotStore
    from stoker.units import parse_size_mb

    try:
        limit = None if max_bytes is None else parse_size_mb(max_bytes, what="--max-bytes") << 20
        evicted = SnapshotStore(Dirs.from_env()).gc(max_count=max_count, max_bytes=limit)
    except StokerError as exc:
        raise _fail(exc) from None
    for old in evicted:
        typer.echo(f"evicted {old.path}")
    if not evicted:
        typer.echo("nothing to evict")


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
    from rich.console import Console
    from rich.table import Table

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
