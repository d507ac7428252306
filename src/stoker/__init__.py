"""stoker: build and test untrusted code in throw-away microVMs.

The importable API::

    import stoker

    async with stoker.VM(image="default", cpus=2, memory="1G") as vm:
        await vm.put("./project", "/work")
        result = await vm.exec(["make", "test"], cwd="/work")
        await vm.get("dist/*", "./out", cwd="/work")
"""

from typing import TYPE_CHECKING

from stoker._lazy import lazy_exports
from stoker.errors import (
    BootError,
    CommandTimeout,
    GuestPanic,
    GuestProtocolError,
    InfrastructureError,
    JobFailed,
    StokerError,
    UsageError,
    VMError,
    VMMCrashed,
)

if TYPE_CHECKING:
    from stoker.protocol.common import ExecResult
    from stoker.vm import VM, VMState


# The VM machinery (pydantic, qemu.qmp) is imported on first use, so that
# ``import stoker.errors`` stays cheap for tools that only need the errors.
__getattr__ = lazy_exports(__name__, {"VM": "vm", "VMState": "vm", "ExecResult": "protocol.common"})


__version__ = "0.1.0"

__all__ = [
    "VM",
    "BootError",
    "CommandTimeout",
    "ExecResult",
    "GuestPanic",
    "GuestProtocolError",
    "InfrastructureError",
    "JobFailed",
    "StokerError",
    "UsageError",
    "VMError",
    "VMMCrashed",
    "VMState",
]
