"""The fleet's hosts and VMs as the API shows them, read from the database.

``GET /v1/hosts`` and ``GET /v1/vms`` of any host show every host: a VM's
shape is its job's when it serves one (a job may ask for less than its pool's
VMs), else its pool's; a host's capacity in use is the sum over its live VMs
(booting, idle or busy).  Pools are configuration, not rows: a VM of a pool
this host does not configure has no known shape and counts as zero (hosts
sharing a database are expected to share their pools).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from stoker.service.config import PoolConfig
from stoker.service.models import Host, Job, VMRecord

#: VM states that hold capacity (a ``stopping`` VM is on its way out).
LIVE_STATES: frozenset[str] = frozenset({"booting", "idle", "busy"})


class VMView(BaseModel):
    """A VM some host runs, and its shape."""

    model_config = ConfigDict(frozen=True)

    name: str
    host: str
    pool: str
    state: str = Field(description="booting, idle, busy or stopping.")
    job_id: str | None
    pid: int | None
    created_at: datetime
    cpus: int = Field(description="vCPUs: its job's when it serves one, else its pool's.")
    memory_mb: int = Field(description="Memory (MiB): its job's or its pool's.")
    disk_mb: int = Field(description="Scratch disk (MiB): its job's or its pool's.")


class HostView(BaseModel):
    """A ``stoker serve`` process sharing the database, its capacity and what is in use."""

    model_config = ConfigDict(frozen=True)

    name: str
    cpus: int
    memory_mb: int
    overcommit: float
    status: str
    alive: bool
    heartbeat_at: datetime | None
    started_at: datetime
    version: str
    cpu_budget: float = Field(description="vCPUs it may hand out: cpus times overcommit.")
    memory_budget_mb: float = Field(description="MiB it may hand out: memory_mb times overcommit.")
    used_cpus: float = Field(description="vCPUs of its live VMs (booting, idle, busy).")
    used_memory_mb: float = Field(description="MiB of its live VMs (booting, idle, busy).")


class _Shape(NamedTuple):
    cpus: int
    memory_mb: int
    disk_mb: int


def merge_vm_record(session: Session, record: VMRecord) -> None:
    """Write ``record`` over the VM's row, if any, keeping its ``created_at``.

    A VM's row is rewritten as its state moves on (booting, idle, busy); the
    age the API shows counts from the first.
    """
    known = session.get(VMRecord, record.name)
    if known is not None:
        record.created_at = known.created_at
    session.merge(record)


def read_vms(session: Session, pools: Mapping[str, PoolConfig]) -> list[VMView]:
    """Every VM record by host and name, with its shape (one query: VMs outer-join jobs)."""
    rows = session.execute(
        select(VMRecord, Job.cpus, Job.memory_mb, Job.disk_mb)
        .outerjoin(Job, Job.id == VMRecord.job_id)
        .order_by(VMRecord.host, VMRecord.name)
    )
    out = []
    for vm, cpus, memory_mb, disk_mb in rows:
        if cpus is not None:
            shape = _Shape(cpus, memory_mb, disk_mb)
        elif (pool := pools.get(vm.pool)) is not None:
            shape = _Shape(pool.cpus, pool.memory, pool.disk)
        else:
            shape = _Shape(0, 0, 0)
        out.append(
            VMView(
                name=vm.name,
                host=vm.host,
                pool=vm.pool,
                state=vm.state,
                job_id=vm.job_id,
                pid=vm.pid,
                created_at=vm.created_at,
                cpus=shape.cpus,
                memory_mb=shape.memory_mb,
                disk_mb=shape.disk_mb,
            )
        )
    return out


def read_hosts(
    session: Session, pools: Mapping[str, PoolConfig], *, now: datetime, lease: timedelta
) -> list[HostView]:
    """Every host that ever served this database; ``alive``: heartbeat within ``lease``."""
    used: dict[str, tuple[float, float]] = {}
    for vm in read_vms(session, pools):
        if vm.state in LIVE_STATES:
            cpus, memory = used.get(vm.host, (0.0, 0.0))
            used[vm.host] = (cpus + vm.cpus, memory + vm.memory_mb)
    out = []
    for h in session.scalars(select(Host).order_by(Host.name)):
        cpus, memory = used.get(h.name, (0.0, 0.0))
        out.append(
            HostView(
                name=h.name,
                cpus=h.cpus,
                memory_mb=h.memory_mb,
                overcommit=h.overcommit,
                status=h.status,
                alive=h.status == "running"
                and h.heartbeat_at is not None
                and now - h.heartbeat_at < lease,
                heartbeat_at=h.heartbeat_at,
                started_at=h.started_at,
                version=h.version,
                cpu_budget=h.cpus * h.overcommit,
                memory_budget_mb=h.memory_mb * h.overcommit,
                used_cpus=cpus,
                used_memory_mb=memory,
            )
        )
    return out
