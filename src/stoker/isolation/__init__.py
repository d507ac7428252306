"""Host-side isolation of VMMs: a cgroup v2 per VM with limits, and an unprivileged VMM user.

:class:`Isolation` is what a :class:`~stoker.vm.VM` is told (``stoker run``'s
``--cgroups``, the service's ``[host]`` and pool settings); :func:`enter_cgroup`
gives one VM its cgroup on the VM's exit stack.  The pieces:

* :mod:`stoker.isolation.limits`: the limits of a VM and the cgroup files they
  become (pure, golden-tested);
* :mod:`stoker.isolation.cgroups`: detection, the parent cgroup, one VM's cgroup;
* :mod:`stoker.isolation.vmmuser`: QEMU as a user of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

from stoker.backends.base import HostPlacement, MachineSpec
from stoker.errors import InfrastructureError, UsageError
from stoker.isolation.cgroups import CgroupSupport, VMCgroup, prepare_parent, probe
from stoker.isolation.limits import LimitPolicy, describe, limits_for
from stoker.isolation.vmmuser import RunAs, prepare_files

log = logging.getLogger(__name__)

#: ``auto``: a cgroup per VM when the host allows, else one note; ``required``:
#: fail unless every VM gets its memory, pids and cpu limits; ``off``: none.
CgroupMode = Literal["auto", "required", "off"]
MODE_ENV = "STOKER_CGROUPS"
PARENT_ENV = "STOKER_CGROUP_PARENT"


def check_mode(value: str, *, what: str = MODE_ENV) -> CgroupMode:
    """``value`` as a :data:`CgroupMode`, or a :class:`UsageError` naming ``what``."""
    for mode in get_args(CgroupMode):
        if value == mode:
            return mode  # type: ignore[no-any-return]
    raise UsageError(f"{what} must be auto, required or off, not {value!r}")


@dataclass(frozen=True)
class Isolation:
    """How a VM is isolated on the host (beyond the VMM's own sandbox)."""

    cgroups: CgroupMode = "auto"
    #: Where VM cgroups go (absolute, or relative to the cgroup2 mount); None:
    #: under this process's own cgroup (see :mod:`stoker.isolation.cgroups`).
    parent: Path | None = None
    policy: LimitPolicy = field(default_factory=LimitPolicy)
    #: Run the VMM as this user (None: as this process's user).
    run_as: RunAs | None = None

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, cgroups: str | None = None
    ) -> Isolation:
        """``stoker run``'s isolation: ``STOKER_CGROUPS`` and ``STOKER_CGROUP_PARENT``."""
        env = os.environ if environ is None else environ
        mode = check_mode(cgroups if cgroups is not None else env.get(MODE_ENV, "auto"))
        parent = env.get(PARENT_ENV) or None
        return cls(cgroups=mode, parent=Path(parent) if parent else None)


_noted: set[str] = set()
_note_lock = threading.Lock()


def _note_once(message: str, on_warning: Callable[[str], None] | None) -> None:
    with _note_lock:
        if message in _noted:
            return
        _noted.add(message)
    if on_warning is not None:
        on_warning(message)
    else:
        log.warning("%s", message)


def host_memory_mb() -> int:
    """This host's RAM in MiB (0 when unknown)."""
    try:
        return (os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) >> 20
    except (ValueError, OSError):
        return 0


def check_host(
    isolation: Isolation, on_warning: Callable[[str], None] | None = None
) -> CgroupSupport | None:
    """What VM cgroups this host gives (None: turned off); raises where ``required`` fails.

    ``auto`` notes once per process what is missing.  The service calls this
    at start, so that the operator hears of it before the first VM.
    """
    if isolation.cgroups == "off":
        return None
    support = probe(parent=isolation.parent)
    problem = _problem(support)
    if problem:
        if isolation.cgroups == "required":
            missing = "/".join(support.missing) if support.usable else "cgroup"
            raise InfrastructureError(
                f"host limits are required (cgroups = required), but this host gives VMs "
                f"no {missing} limits: {support.reason}",
                hint=support.fix or None,
            )
        fix = f" ({support.fix})" if support.fix else ""
        _note_once(f"host limits: {problem}{fix}", on_warning)
    return support


async def enter_cgroup(
    isolation: Isolation,
    stack: AsyncExitStack,
    *,
    name: str,
    cpus: int,
    memory_mb: int,
    accel: str,
    on_warning: Callable[[str], None] | None = None,
) -> VMCgroup | None:
    """Give VM ``name`` its cgroup (removed by ``stack``), or None where the host cannot.

    ``auto`` notes once per process what is missing; ``required`` raises
    :class:`InfrastructureError` instead.
    """
    support = check_host(isolation, on_warning)
    if support is None or not support.usable:
        return None
    limits = limits_for(
        isolation.policy,
        cpus=cpus,
        memory_mb=memory_mb,
        accel=accel,
        host_memory_mb=host_memory_mb(),
    )
    try:
        parent = prepare_parent(support)
        cgroup = VMCgroup(parent, name, limits, support.controllers)
        await stack.enter_async_context(cgroup)
    except InfrastructureError as exc:
        if isolation.cgroups == "required":
            raise
        _note_once(f"host limits: VMs get no cgroup: {exc}", on_warning)
        return None
    log.debug("VM %s in cgroup %s: %s", name, cgroup.path, describe(limits, support.controllers))
    return cgroup


async def place_vmm(
    isolation: Isolation,
    stack: AsyncExitStack,
    spec: MachineSpec,
    workdir: Path,
    *,
    on_warning: Callable[[str], None] | None = None,
) -> tuple[VMCgroup | None, MachineSpec]:
    """The VM's cgroup (on ``stack``) and ``spec`` with its :class:`HostPlacement`.

    With a VMM user, the work directory's files are arranged for it first
    (:func:`stoker.isolation.vmmuser.prepare_files`).
    """
    cgroup = await enter_cgroup(
        isolation,
        stack,
        name=spec.name,
        cpus=spec.cpus,
        memory_mb=spec.memory_mb,
        accel=spec.accel,
        on_warning=on_warning,
    )
    if isolation.run_as is not None:
        await asyncio.to_thread(prepare_files, spec, workdir, isolation.run_as)
    placement = HostPlacement(
        cgroup=None if cgroup is None else cgroup.path, run_as=isolation.run_as
    )
    return cgroup, replace(spec, host=placement)


def _problem(support: CgroupSupport) -> str:
    if not support.usable:
        return f"VMs get no cgroup: {support.reason}"
    if support.missing:
        return f"VMs get a cgroup each but no {'/'.join(support.missing)} limits: {support.reason}"
    return ""


__all__ = [
    "CgroupMode",
    "Isolation",
    "LimitPolicy",
    "RunAs",
    "VMCgroup",
    "check_mode",
    "enter_cgroup",
    "probe",
]
