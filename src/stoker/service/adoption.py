"""A restarted ``stoker serve`` takes over the jobs whose VMs survived the old process.

Service VMs are detached (:mod:`stoker.vmadopt`): when the old process ends
without stopping them (``kill -9``, a crash, an OOM kill), their commands run
on, blocked only on output nobody reads, and their agents journal that output.
On start, before anything else is recovered, :func:`adopt_jobs` looks at this
host's jobs that were running a command: for each whose job row has a resume
point and whose VM is still there, it adopts the VM and checks, in one
transaction, that the job is still this host's (another host sweeps a job only
once its lease has expired; the VM ends itself before that, see
:attr:`ServiceConfig.orphan_seconds`) and renews the lease.  Those jobs carry on where they were
(:func:`stoker.service.command.resume_command`); every other job of the old
process is recovered as before (queued again, or ended).

Sessions (jobs of several steps) are not taken over: they are recovered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from stoker.backends.base import Backend
from stoker.service.config import ServiceConfig
from stoker.service.db import Database
from stoker.service.jobs import JobState
from stoker.service.models import Job, VMRecord, utcnow
from stoker.vm import VM
from stoker.vmadopt import Adoptable, adopt_vm

log = logging.getLogger(__name__)


@dataclass
class Adopted:
    """A job this process took over, with its VM."""

    job: Job
    pool: str
    vm: VM
    #: Where its command's stored output ends (see :meth:`LogWriter.resume_from`).
    point: dict[str, Any]


async def adopt_jobs(
    db: Database, config: ServiceConfig, backend: Backend, host: str
) -> list[Adopted]:
    """Take over this host's running commands whose VMs survived; never raises for one job."""

    def candidates(session: Session) -> list[tuple[Job, VMRecord]]:
        rows = session.execute(
            select(Job, VMRecord)
            .join(VMRecord, VMRecord.job_id == Job.id)
            .where(
                Job.host == host,
                Job.state == JobState.RUNNING.value,
                Job.resume.is_not(None),
                Job.session_idle_s.is_(None),
                VMRecord.host == host,
                VMRecord.workdir.is_not(None),
            )
        ).all()
        for job, record in rows:
            session.expunge(job)
            session.expunge(record)
        return [(job, record) for job, record in rows]

    adopted: list[Adopted] = []
    for job, record in await db.run(candidates):
        pool = config.pools.get(job.pool or "")
        point = job.resume
        if pool is None or point is None or record.workdir is None:
            continue
        try:
            vm = await adopt_vm(
                Adoptable(
                    name=record.name,
                    workdir=Path(record.workdir),
                    cpus=pool.cpus,
                    memory_mb=pool.memory,
                    disk_mb=pool.disk,
                    image=pool.image_name,
                    offset=int(point["offset"]),
                    channels=(int(point["channel"]),),
                ),
                backend=backend,
                dirs=config.dirs,
                job=job.id,
            )
        except Exception as exc:
            log.warning(
                "job %s: its VM %s cannot be taken over (%s); recovering the job",
                job.id,
                record.name,
                exc,
                extra={"job": job.id, "host": host},
            )
            continue
        if await _still_ours(db, config, host, job.id):
            adopted.append(Adopted(job, job.pool or "", vm, point))
        else:
            await vm.destroy()
    return adopted


async def _still_ours(db: Database, config: ServiceConfig, host: str, job_id: str) -> bool:
    """Whether ``job_id`` is still this host's running job; if so, renew its lease."""
    now = utcnow()

    def check(session: Session) -> bool:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.host != host or job.state != JobState.RUNNING.value:
            return False
        if job.cancel_requested:
            return False  # recovered as cancelled, its VM destroyed
        job.lease_until = now + timedelta(seconds=config.lease_seconds)
        return True

    return await db.run(check)
