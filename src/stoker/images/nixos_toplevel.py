"""NixOS configurations built as they are, and what a system ``toplevel`` must hold.

:mod:`stoker.images.nixos` extends a configuration made by nixpkgs'
``lib.nixosSystem`` with ``stoker-agent.nix`` (``extendModules``).  A
configuration without ``extendModules`` (not made by the module system, such as
the stand-in system closures of the tests, which have no nixpkgs to build a
real one) is built as it is: ``nix build`` of
``nixosConfigurations.NAME.config.system.build.toplevel``.  Its stage-2 ``init``
must then start the agent itself, as the module's unit would.

Either way the toplevel has a NixOS system's layout, read by
:meth:`Toplevel.read`: ``init`` (stage 2), ``kernel``, ``initrd`` and
``kernel-params``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stoker.errors import LaunchError, ProvisionError, UsageError
from stoker.images.nixcmd import (
    NIX_BUILD_TIMEOUT,
    NIX_FEATURES,
    NIX_QUERY_TIMEOUT,
    nix_user_error,
    run_nix,
)

#: What a toplevel must have: stage-2 init, kernel image, initrd.
TOPLEVEL_ENTRIES = ("init", "kernel", "initrd", "kernel-params")


def configuration_attr(name: str) -> str:
    """``nixosConfigurations."NAME"`` (a JSON string is a valid Nix attribute name)."""
    return f"nixosConfigurations.{json.dumps(name)}"


def extensible_argv(flake_url: str, name: str, *, features: Sequence[str]) -> list[str]:
    """``nix eval``: whether the configuration has ``extendModules`` (made by nixpkgs)."""
    target = f"{flake_url}#{configuration_attr(name)}"
    return ["nix", *features, "eval", "--json", target, "--apply", "c: c ? extendModules"]


def toplevel_build_argv(
    flake_url: str, name: str, *, features: Sequence[str], out_link: Path
) -> list[str]:
    """``nix build`` of the configuration's ``system.build.toplevel``, as it is."""
    target = f"{flake_url}#{configuration_attr(name)}.config.system.build.toplevel"
    # fmt: off
    return [
        "nix", *features,
        "build",
        "--print-build-logs",
        "--out-link", str(out_link),
        target,
    ]
    # fmt: on


@dataclass(frozen=True)
class Toplevel:
    """A built NixOS system (a store path) and the entries stoker boots it with."""

    path: str
    #: Stage 2: ``TOPLEVEL/init``.
    init: str
    #: Where ``TOPLEVEL/kernel`` and ``TOPLEVEL/initrd`` lead (files in the store).
    kernel: str
    initrd: str
    #: The text of ``TOPLEVEL/kernel-params`` (``boot.kernelParams``).
    kernel_params: str

    @classmethod
    def read(cls, path: str) -> Toplevel:
        """Read the toplevel at ``path``; :class:`UsageError` names what is missing."""
        root = Path(path)
        missing = [
            entry
            for entry in TOPLEVEL_ENTRIES
            if not (root / entry).exists() and not (root / entry).is_symlink()
        ]
        if missing:
            raise UsageError(
                f"{path} is not a NixOS system: it has no {', '.join(missing)}",
                hint="a nixos: base names a nixosConfiguration whose "
                "config.system.build.toplevel is a NixOS system",
            )
        try:
            params = (root / "kernel-params").read_text()
        except OSError as exc:
            raise ProvisionError(f"cannot read {path}/kernel-params: {exc}") from None
        return cls(
            path=path,
            init=f"{path}/init",
            kernel=str((root / "kernel").resolve()),
            initrd=str((root / "initrd").resolve()),
            kernel_params=params.strip(),
        )


def is_extensible(output: str) -> bool:
    """The answer of :func:`extensible_argv` (``true``/``false``)."""
    try:
        value = json.loads(output)
    except json.JSONDecodeError as exc:
        raise ProvisionError(f"nix eval printed invalid JSON: {exc}") from None
    if not isinstance(value, bool):
        raise ProvisionError(f"nix eval printed {value!r}, expected true or false")
    return value


def manifest_boot(top: Toplevel, *, params: Sequence[str]) -> Mapping[str, object]:
    """The manifest's ``boot`` record of a toplevel booted through stoker's initramfs."""
    return {
        "kind": "nixos",
        "toplevel": top.path,
        "init": top.init,
        "kernel": top.kernel,
        "initrd": top.initrd,
        "params": list(params),
        "stage1": "stoker",
    }


def build_as_is(
    flake_url: str, name: str, *, environ: Mapping[str, str], workdir: Path, log: Path
) -> tuple[Toplevel, list[str]]:
    """Build the configuration's toplevel as it is; returns it and its closure.

    The out-link in ``workdir`` keeps the closure alive while it is packed.
    A failed build raises :class:`UsageError` with Nix's message.
    """
    # Imported here: nixos.py imports this module.
    from stoker.images.nixos import NIX_STORE, check_store_path, closure_argv, parse_closure

    out_link = workdir / "toplevel"
    argv = toplevel_build_argv(flake_url, name, features=NIX_FEATURES, out_link=out_link)
    try:
        run_nix(argv, environ=environ, log=log, timeout=NIX_BUILD_TIMEOUT)
    except LaunchError as exc:
        raise nix_user_error(f"building {configuration_attr(name)} of {flake_url}", exc) from None
    path = check_store_path(str(out_link.readlink()), NIX_STORE, what="toplevel")
    top = Toplevel.read(path)
    closure = parse_closure(
        run_nix(closure_argv([path]), environ=environ, log=log, timeout=NIX_QUERY_TIMEOUT)
    )
    for what, file in (("kernel", top.kernel), ("initrd", top.initrd)):
        if not any(file == p or file.startswith(p + "/") for p in closure):
            raise UsageError(f"the system's {what} ({file}) is not in its closure")
    return top, closure
