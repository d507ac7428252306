"""Pools whose image is a Nix flake: ``[pools.NAME] image = "nixos:FLAKE#NAME"``.

A pool's ``image`` is either the name of a built image or a ``nix:``/
``nixos:`` base, validated as an image spec's ``base`` is
(:func:`check_pool_image`; a relative flake path is taken from the
configuration file's directory and stored absolute).  The pool's VMs boot the
image :func:`~stoker.images.nix.ensure_flake_image` builds for that base, under
:func:`~stoker.images.nix.flake_image_name` (``nixos-NAME``), the name
:attr:`PoolConfig.image_name <stoker.service.config.PoolConfig.image_name>`
gives without building.

:func:`build_pool_images` builds (or finds in the image store) every such image
when the service starts, before any VM is booted: ``nix build`` may take a
minute, so it runs in a worker thread, and a failure stops the start with
Nix's message, naming the pools, as a :class:`~stoker.errors.UsageError`.

The pool's shape (``cpus``, ``memory``, ``disk``) always has a value (the
pool's defaults when unset), so a microvm.nix configuration's
``microvm.vcpu``/``mem`` do not change a pool's VMs: the pool's own shape wins.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pydantic

from stoker.errors import StokerError, UsageError
from stoker.images.nix import ensure_flake_image, flake_image_name, is_flake_base
from stoker.images.spec import ImageName, ImageSpec

if TYPE_CHECKING:
    from stoker.service.config import ServiceConfig

log = logging.getLogger(__name__)

_IMAGE_NAME: pydantic.TypeAdapter[str] = pydantic.TypeAdapter(ImageName)


def check_pool_image(value: str, context: object) -> str:
    """A pool's ``image``: an image name as given, or a flake base made absolute.

    ``context`` is the validation context (its ``base_dir``: the configuration
    file's directory).  Raises :class:`ValueError` with the spec's own message.
    """
    if is_flake_base(value):
        try:
            spec = ImageSpec.model_validate(
                {"name": flake_image_name(value), "base": value}, context=context
            )
        except pydantic.ValidationError as exc:
            raise ValueError(_messages(exc)) from None
        return spec.base
    try:
        return _IMAGE_NAME.validate_python(value)
    except pydantic.ValidationError as exc:
        raise ValueError(
            f'{_messages(exc)}; or a flake base: "nix:FLAKEREF#ATTR" or "nixos:FLAKEREF#NAME"'
        ) from None


def _messages(exc: pydantic.ValidationError) -> str:
    """The messages of ``exc``'s errors, without pydantic's "Value error, " prefix."""
    return "; ".join(str(e.get("ctx", {}).get("error", e["msg"])) for e in exc.errors())


def flake_pools(config: ServiceConfig) -> dict[str, list[str]]:
    """Each flake base of ``config``'s pools, with the pools that name it."""
    bases: dict[str, list[str]] = {}
    for name, pool in config.pools.items():
        if pool.image_base is not None:
            bases.setdefault(pool.image_base, []).append(name)
    return bases


def _pool_list(names: list[str]) -> str:
    return ("pool " if len(names) == 1 else "pools ") + ", ".join(repr(n) for n in names)


async def build_pool_images(
    config: ServiceConfig, *, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Build (or find built) the image of every flake base of ``config``'s pools.

    Returns base -> image name.  One base is built once, however many pools
    name it.  A failure raises :class:`UsageError` naming the pools and the
    base, with the builder's message (Nix's output for a failed evaluation or
    build).
    """
    built: dict[str, str] = {}
    for base, pools in flake_pools(config).items():
        where = f"{_pool_list(pools)}: image {base!r}"
        log.info("%s: building (or finding) the image", where)

        def progress(message: str, where: str = where) -> None:
            log.info("%s: %s", where, message)

        try:
            # The base is absolute already (check_pool_image), so the directory a
            # relative flake would be taken from does not matter.
            built[base] = await asyncio.to_thread(
                ensure_flake_image,
                base,
                dirs=config.dirs,
                cwd=Path("/"),
                environ=environ,
                progress=progress,
            )
        except StokerError as exc:
            # ProvisionError and LaunchError too: a broken build stops the start
            # with its message, not a traceback.
            raise UsageError(f"{where}: {exc}", hint=exc.hint) from None
        log.info("%s: image %s ready", where, built[base])
    return built
