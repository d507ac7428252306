"""Resolving what a VM boots: kernel, initramfs (with the agent inside), root image.

All three are cached; on a warm cache this takes milliseconds.  On a cold cache
the kernel is fetched with ``apt-get download`` and the default image is built
with ``mmdebstrap`` (minutes), reporting progress through ``progress``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from stoker.agent.bundle import agent_files
from stoker.errors import ProvisionError, UsageError
from stoker.images.base import Image
from stoker.images.store import ImageStore
from stoker.kernel import GUEST_MODULES, Kernel, build_initramfs, provision_kernel
from stoker.kernel.build import KERNEL_NAME as MICROVM
from stoker.kernel.build import (
    BuiltKernel,
    build_microvm_kernel,
    cached_microvm_kernel,
    entry_name,
    load_entry,
)
from stoker.kernel.modules import NIC_MODULES, PCI_MODULES
from stoker.kernel.vmlinux import pvh_kernel
from stoker.paths import Dirs

DEFAULT_IMAGE = "default"
#: The spec's ``kernel = "auto"``: the microVM kernel once built, else Debian's.
AUTO = "auto"
#: Overrides what ``kernel = "auto"`` boots (``debian-cloud`` or ``stoker-microvm``).
AUTO_KERNEL_ENV = "STOKER_AUTO_KERNEL"


@dataclass(frozen=True)
class BootArtifacts:
    """Everything a backend needs from the cache to boot one image."""

    kernel: Kernel
    initrd: Path
    image: Image


def resolve_artifacts(
    dirs: Dirs,
    image: str = DEFAULT_IMAGE,
    *,
    progress: Callable[[str], None] | None = None,
    agent: Mapping[str, bytes] | None = None,
) -> BootArtifacts:
    """Find (or build, for the embedded default) the kernel, initramfs and image.

    ``agent`` replaces the guest agent's files (see :func:`stoker.agent.bundle.agent_files`);
    the tests use it to boot deliberately misbehaving agents.
    """
    store = ImageStore(dirs)
    found = store.get(image)
    if found is None:
        if image != DEFAULT_IMAGE:
            from stoker.images.catalog import shipped_specs

            known = sorted(store.pointers())
            shipped = sorted(set(shipped_specs()) - {DEFAULT_IMAGE})
            build = (
                f"build it with `stoker image build {image}`"
                if image in shipped
                else "build one with `stoker image build SPEC`"
            )
            raise UsageError(
                f"no image called {image!r} has been built",
                hint=f"{build}; built images: {', '.join(known) or 'none'}",
            )
        # The builders (and the spec parser) load only when there is something to build.
        from stoker.images.builder import default_builder

        if progress:
            progress("building the default image (first run only; takes a few minutes)")
        found = store.ensure(default_builder(dirs, progress=progress), progress=progress)
    modules: tuple[str, ...] = GUEST_MODULES
    kind = _check_kernel(found)
    built = auto_microvm_kernel(dirs) if kind == AUTO else None
    if kind == MICROVM or built is not None:
        # Everything built in: the initramfs only mounts and starts the agent.
        # The vmlinux boots through PVH (QEMU) and as-is on Firecracker.
        built = built or _microvm_kernel(dirs, found, progress)
        kernel = built.as_kernel(boot="vmlinux")
        modules = ()
    else:
        kernel = provision_kernel(dirs, progress=progress)
        # Its vmlinux through the PVH entry: no real-mode setup and no
        # decompression, which under TCG is about a tenth of a cold boot.
        kernel = replace(kernel, vmlinuz=pvh_kernel(kernel.vmlinuz))
    initramfs = build_initramfs(
        dirs,
        kernel,
        agent_files=agent_files() if agent is None else agent,
        modules=modules,
        pci_modules=() if not modules else PCI_MODULES,
        nic_modules=() if not modules else NIC_MODULES,
        agent_bytecode=True,
    )
    return BootArtifacts(kernel=kernel, initrd=initramfs.path, image=found)


def nixos_boot(image: Image) -> tuple[str | None, tuple[str, ...]]:
    """``(stage-2 init, kernel parameters)`` of a NixOS image; ``(None, ())`` for others.

    A NixOS image (``boot.kind = "nixos"``) is its system's store.  It boots
    on stoker's kernel with stoker's initramfs as stage 1, which mounts the
    image on ``/nix/store`` and the scratch disk as the root, then runs the
    system's ``init`` (``stoker.init=``); the system's ``kernel-params`` and
    microvm.nix ``kernelParams`` follow stoker's parameters.  The system's own
    kernel and initrd are recorded in the manifest but not booted: its stage 1
    knows nothing of stoker's disks.  Raises :class:`ProvisionError` for a
    manifest that does not say what to run.
    """
    boot = image.manifest.get("boot")
    if not isinstance(boot, dict) or boot.get("kind") != "nixos":
        return None, ()
    init, params = boot.get("init"), boot.get("params", [])
    if (
        not isinstance(init, str)
        or not init.startswith("/nix/store/")
        or not isinstance(params, list)
        or not all(isinstance(p, str) and p for p in params)
        # One word each: a space would let a value smuggle in other parameters.
        or any(c.isspace() or c == "\0" for word in (init, *params) for c in word)
    ):
        raise ProvisionError(
            f"image {image.name!r} is a NixOS image without a usable boot.init",
            hint="rebuild it with this version of stoker",
        )
    return init, tuple(params)


def _check_kernel(image: Image) -> str:
    """The kind of kernel ``image`` is made for; refuses those this runtime cannot boot."""
    if nixos_boot(image)[0] is not None:
        # stoker's kernel and initramfs are its stage 1 (see nixos_boot).
        return "debian-cloud"
    kernel = image.manifest.get("kernel")
    kind = kernel.get("kind") if isinstance(kernel, dict) else None
    if kind in (None, "debian-cloud"):
        return "debian-cloud"
    if kind in (MICROVM, AUTO):
        return str(kind)
    raise ProvisionError(
        f"image {image.name!r} is made for a kernel file ({kind!r}); "
        "this runtime boots the Debian cloud kernel and stoker-microvm",
        hint='rebuild the image with kernel = "debian-cloud" or "stoker-microvm"',
    )


def auto_microvm_kernel(dirs: Dirs) -> BuiltKernel | None:
    """The microVM kernel an image with ``kernel = "auto"`` boots, None: Debian's.

    The one ``stoker kernel build`` last built, if any (never builds: a file
    read).  ``STOKER_AUTO_KERNEL=debian-cloud`` or ``=stoker-microvm`` decides
    instead; the latter builds the kernel if it is missing.
    """
    choice = os.environ.get(AUTO_KERNEL_ENV, "")
    if choice == "debian-cloud":
        return None
    if choice == MICROVM:
        return build_microvm_kernel(dirs)
    if choice:
        raise UsageError(
            f"{AUTO_KERNEL_ENV}={choice!r} is not a kernel",
            hint=f"set it to debian-cloud or {MICROVM}, or unset it",
        )
    return cached_microvm_kernel(dirs)


def _microvm_kernel(
    dirs: Dirs, image: Image, progress: Callable[[str], None] | None
) -> BuiltKernel:
    """The build the image was made for while it is cached, else the current one."""
    ref = image.manifest.get("kernel")
    name, _, digest = str(ref.get("digest", "") if isinstance(ref, dict) else "").partition("=")
    if name == MICROVM and digest:
        exact = load_entry(dirs.kernels / entry_name(digest))
        if exact is not None:
            return exact
    return build_microvm_kernel(dirs, progress=progress)
