"""VMs that failed, with the tail of their console (``GET /v1/vms/failed``).

A VM fails when it does not boot, its VMM crashes or is killed at a host
limit, or its guest kernel panics: the :class:`~stoker.errors.VMError` family
(and :class:`~stoker.errors.JobKernelPanic`, a panic the job's command caused)
carries the console's last lines.  Each failure is one row, written where the
service catches it (warm boots in :mod:`.pools`, a job's VM in
:mod:`.supervisor`); the console is bounded to :data:`CONSOLE_TAIL_BYTES` and
the job's secrets are masked first.  Each host keeps its newest
:data:`KEPT_PER_HOST`: a crash loop cannot fill the database.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Final

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from stoker.errors import JobKernelPanic, VMError
from stoker.service.jobs import redact
from stoker.service.models import VMFailure, utcnow
from stoker.service.runs import headline

#: Bytes of console kept per failure (its end: where the failure shows).
CONSOLE_TAIL_BYTES: Final = 16 << 10
#: Failures kept per host; older ones are deleted when a new one is recorded.
KEPT_PER_HOST: Final = 100


class FailedVMView(BaseModel):
    """A VM that failed, and the last lines of its serial console."""

    model_config = ConfigDict(frozen=True)

    id: int = Field(description="Increases with every failure recorded.")
    vm_name: str
    host: str
    pool: str
    job_id: str | None = Field(description="The job it served (null: a warm VM).")
    failed_at: datetime
    reason: str = Field(description="What failed, one line.")
    console: str = Field(
        description="The end of its serial console (at most 16 KiB), the job's secrets as ***."
    )


def is_vm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means the VM itself broke (and carries its console)."""
    return isinstance(exc, VMError | JobKernelPanic)


def console_tail(console: str, secrets: Iterable[str] = ()) -> str:
    """The last :data:`CONSOLE_TAIL_BYTES` of ``console`` with ``secrets`` masked.

    Masked before cutting, so that a cut cannot leave a secret's end unmasked.
    """
    data = redact(console, secrets).encode("utf-8", "replace")[-CONSOLE_TAIL_BYTES:]
    # The guest writes the console: a NUL byte would make PostgreSQL refuse the whole row.
    return data.decode("utf-8", "ignore").replace("\0", "\ufffd")


def record_failure(
    session: Session,
    *,
    vm_name: str,
    host: str,
    pool: str,
    exc: BaseException,
    job_id: str | None = None,
    secrets: Iterable[str] = (),
    keep: int = KEPT_PER_HOST,
) -> VMFailure:
    """Record that ``vm_name`` failed with ``exc``; keep ``host``'s newest ``keep``."""
    secrets = list(secrets)
    row = VMFailure(
        vm_name=vm_name,
        host=host,
        pool=pool,
        job_id=job_id,
        failed_at=utcnow(),
        reason=redact(headline(exc), secrets).replace("\0", "\ufffd"),
        console=console_tail(getattr(exc, "console", "") or "", secrets),
    )
    session.add(row)
    session.flush()
    newest = (
        select(VMFailure.id)
        .where(VMFailure.host == host)
        .order_by(VMFailure.failed_at.desc(), VMFailure.id.desc())
        .limit(keep)
    )
    session.execute(
        delete(VMFailure).where(
            VMFailure.host == host, VMFailure.id.not_in(select(newest.subquery().c.id))
        )
    )
    return row


def read_failures(session: Session, *, limit: int) -> list[FailedVMView]:
    """The newest ``limit`` failures of every host, newest first."""
    rows = session.scalars(
        select(VMFailure).order_by(VMFailure.failed_at.desc(), VMFailure.id.desc()).limit(limit)
    )
    return [
        FailedVMView(
            id=r.id,
            vm_name=r.vm_name,
            host=r.host,
            pool=r.pool,
            job_id=r.job_id,
            failed_at=r.failed_at,
            reason=r.reason,
            console=r.console,
        )
        for r in rows
    ]
