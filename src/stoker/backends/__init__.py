"""VMM backends behind one interface (:class:`~stoker.backends.base.Backend`).

* ``qemu``: QEMU's ``microvm`` machine (KVM or TCG), the default;
* ``firecracker``: Firecracker over its API socket, optionally jailed (KVM only);
* ``cloud-hypervisor``: Cloud Hypervisor over its REST API (KVM only).
"""

from __future__ import annotations

from stoker.backends.base import Backend
from stoker.errors import UsageError

#: What ``--vmm`` accepts.
VMMS: tuple[str, ...] = ("qemu", "firecracker", "cloud-hypervisor")


def get_backend(name: str) -> Backend:
    """A backend by its ``--vmm`` name; raises :class:`UsageError` for anything else."""
    if name == "qemu":
        from stoker.backends.qemu import QemuBackend

        return QemuBackend()
    if name == "firecracker":
        from stoker.backends.firecracker import FirecrackerBackend

        return FirecrackerBackend()
    if name == "cloud-hypervisor":
        from stoker.backends.cloud_hypervisor import CloudHypervisorBackend

        return CloudHypervisorBackend()
    raise UsageError(f"unknown VMM {name!r}", hint=f"use one of {', '.join(VMMS)}")
