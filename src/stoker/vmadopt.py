"""Taking over a running VM that an earlier ``stoker serve`` process started.

A service VM is *detached* (:attr:`stoker.vm.VM.detached`): its VMM outlives
the process, listens on sockets in the VM's work directory
(:mod:`stoker.backends.detached`), and its agent journals what it sends until
the service has stored it (:meth:`stoker.protocol.client.AgentClient.enable_journal`).
After a restart, :func:`adopt_vm` rebuilds a :class:`~stoker.vm.VM` around it:
the VMM watched through a pidfd, the console and monitor reconnected, the agent
channel resumed from the journal offset the old process stored, and the
network (an egress proxy lives in the service process) started again.
:meth:`VM.follow` then follows the command the old process had started.

A friend module of :mod:`stoker.vm`: it sets up the same private state that
:meth:`VM.start` would, from what is on disk instead of from a boot.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stoker import vmfiles
from stoker.backends.base import Backend
from stoker.errors import InfrastructureError
from stoker.isolation.cgroups import VMCgroup
from stoker.lifecycle import VMState
from stoker.paths import Dirs
from stoker.protocol.common import ChannelLimits
from stoker.vm import VM

if TYPE_CHECKING:
    from stoker.net.policy import NetworkPolicy
    from stoker.net.proxy import ConnectionRecord

#: How long the agent may take to answer a resume (it may be busy writing output).
RESUME_TIMEOUT = 60.0


@dataclass(frozen=True)
class Adoptable:
    """What the old process recorded about a VM it left running."""

    name: str
    workdir: Path
    cpus: int
    memory_mb: int
    disk_mb: int
    image: str
    #: The journal offset the old process stored everything before.
    offset: int
    #: Operations it had running in the guest (an exec's channel).
    channels: tuple[int, ...] = ()


async def adopt_vm(
    found: Adoptable,
    *,
    backend: Backend,
    dirs: Dirs,
    limits: ChannelLimits | None = None,
    network: NetworkPolicy | None = None,
    job: str | None = None,
    on_connection: Callable[[ConnectionRecord], None] | None = None,
) -> VM:
    """A :class:`VM` in state READY around ``found``'s running VMM.

    Raises :class:`InfrastructureError` if the VMM is gone or the agent
    cannot resume; whatever was reached is torn down then (the VMM killed,
    the work directory removed), so the caller only has to retry the job.
    """
    adopt = getattr(backend, "adopt", None)
    vm = VM(
        found.image,
        cpus=found.cpus,
        memory=found.memory_mb,
        disk=found.disk_mb,
        backend=backend,
        dirs=dirs,
        limits=limits,
        network=network,
        job=job,
        on_connection=on_connection,
        detached=True,
    )
    vm.name = vm.hostname = found.name
    vm.workdir = found.workdir
    vm.state = VMState.BOOTING
    # Removed with the VM, as a VM that booted removes its own.
    vm._stack.callback(shutil.rmtree, found.workdir)
    try:
        # Ours now: sweeps of VMs whose owner died must leave it alone.
        vmfiles.claim_workdir(found.workdir)
        if adopt is None:
            raise InfrastructureError(f"the {backend.name} backend cannot take over a VM")
        vm._vmm = await adopt(found.name, found.workdir, vm._stack)
        assert vm._vmm is not None
        if vm._vmm.pid is not None:
            # Its cgroup is ours now too: removed (after the VMM) when the VM goes.
            vm.cgroup = VMCgroup.of_process(vm._vmm.pid, found.name)
            if vm.cgroup is not None:
                vm._stack.push_async_callback(vm.cgroup.aclose)
        vm._vmm_exit = asyncio.get_running_loop().create_task(vm._vmm.wait())
        vm._stack.push_async_callback(vm._cancel_exit_watch)
        from stoker.protocol.client import AgentClient

        reader, writer = await vm._guarded(vm._vmm.transport.connect(RESUME_TIMEOUT))
        vm._client = await vm._guarded(
            AgentClient.resume(
                reader,
                writer,
                found.offset,
                channels=found.channels,
                limits=vm.limits,
                name=found.name,
                timeout=RESUME_TIMEOUT,
            )
        )
        vm._stack.push_async_callback(vm._client.aclose)
        await vm._start_network()
        vm.state = VMState.READY
    except BaseException:
        await vm.destroy()
        raise
    return vm
