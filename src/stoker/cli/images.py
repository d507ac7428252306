"""``stoker image ...``: build, list, inspect, remove and garbage-collect root filesystem images."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Annotated, Any

import typer

from stoker.cli import _fail, _safe, err, stderr_console
from stoker.errors import StokerError, UsageError

if TYPE_CHECKING:
    from stoker.images import ImageStore
    from stoker.images.spec import ImageSpec

image_app: typer.Typer = typer.Typer(
    help="Build and list root filesystem images.", no_args_is_help=True
)


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
            console=stderr_console(),
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


def _pinned(specs: dict[str, ImageSpec], item: str) -> dict[str, ImageSpec]:
    """``specs`` with one ``--pin NAME=VERSION:SHA256`` applied to every image having NAME."""
    name, eq, rest = item.partition("=")
    version, colon, sha256 = rest.rpartition(":")
    if not eq or not colon or not name or not version:
        raise UsageError(f"--pin {item!r}: expected NAME=VERSION:SHA256")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise UsageError(f"--pin {item!r}: the SHA-256 must be 64 hex digits")
    having = [n for n, s in specs.items() if any(a.name == name for a in s.artifacts)]
    if not having:
        raise UsageError(f"--pin {name}: no image being built has an artifact of that name")
    return {n: s.pin(name, version, sha256.lower()) if n in having else s for n, s in specs.items()}


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
    pin: Annotated[
        list[str] | None,
        typer.Option(
            "--pin",
            help="NAME=VERSION:SHA256: build with another release of artifact NAME "
            "(its version swapped in the URL; the new checksum is checked).",
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
        for item in pin or []:
            specs = _pinned(specs, item)
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
    from rich.console import Console
    from rich.table import Table

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
