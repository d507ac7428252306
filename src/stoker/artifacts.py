"""Resolving what a VM boots: kernel, initramfs (with the agent inside), root image.

All three are cached; on a warm cache this takes milliseconds.  On a cold cache
the kernel is fetched with ``apt-get download`` and the default image is built
with ``mmdebstrap`` (minutes), reporting progress through ``progress``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from stoker.agent.bundle import agent_files
from stoker.errors import ProvisionError, UsageError
from stoker.images.base import Image
from stoker.images.store import ImageStore
from stoker.kernel import GUEST_MODULES, Kernel, build_initramfs, provision_kernel
from stoker.kernel.build import KERNEL_NAME as MICROVM
from stoker.kernel.build import BuiltKernel, build_microvm_kernel, entry_name, load_entry
from stoker.kernel.modules import NIC_MODULES, PCI_MODULES
from stoker.paths import Dirs

DEFAULT_IMAGE = "default"


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
    if _check_kernel(found) == MICROVM:
        # Everything built in: the initramfs only mounts and starts the agent.
        # The vmlinux boots through PVH (QEMU) and as-is on Firecracker.
        kernel = _microvm_kernel(dirs, found, progress).as_kernel(boot="vmlinux")
        modules = ()
    else:
        kernel = provision_kernel(dirs, progress=progress)
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


def _check_kernel(image: Image) -> str:
    """The kind of kernel ``image`` is made for; refuses those this runtime cannot boot."""
    boot = image.manifest.get("boot")
    if isinstance(boot, dict) and boot.get("kind") == "nixos":
        raise ProvisionError(
            f"image {image.name!r} is a NixOS image: it boots its own kernel and initrd "
            "with systemd, which this runtime cannot start yet",
            hint="see the README's NixOS section; use a debian: or oci: base meanwhile",
        )
    kernel = image.manifest.get("kernel")
    kind = kernel.get("kind") if isinstance(kernel, dict) else None
    if kind in (None, "debian-cloud"):
        return "debian-cloud"
    if kind == MICROVM:
        return MICROVM
    raise ProvisionError(
        f"image {image.name!r} is made for a kernel file ({kind!r}); "
        "this runtime boots the Debian cloud kernel and stoker-microvm",
        hint='rebuild the image with kernel = "debian-cloud" or "stoker-microvm"',
    )


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
