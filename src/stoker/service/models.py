"""The service's durable state: SQLAlchemy 2 declarative models.

The schema itself is created by the Alembic migrations in
:mod:`stoker.service.migrations` (``tests/service/test_db.py`` checks that they
and these models agree).  Only :func:`stoker.service.jobs.transition` writes
``Job.state``.

Timestamps are timezone-aware UTC in Python and naive UTC in the database
(:class:`UTCDateTime`), so SQLite and PostgreSQL store and compare them alike.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime, stored without a zone."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; use datetime.now(UTC)")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    """Now, timezone-aware UTC (the only clock the database sees)."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of every service table."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime}


class Job(Base):
    """One submitted job and where it is in its life (see :mod:`stoker.service.jobs`)."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    submitter: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    pool: Mapped[str | None] = mapped_column(String(64))
    image: Mapped[str] = mapped_column(String(128))
    cpus: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    disk_mb: Mapped[int] = mapped_column(Integer)
    timeout_s: Mapped[float] = mapped_column(Float)
    argv: Mapped[list[str]] = mapped_column(JSON)
    #: Values of the keys in ``secret_keys`` are never returned or logged.
    env: Mapped[dict[str, str]] = mapped_column(JSON)
    secret_keys: Mapped[list[str]] = mapped_column(JSON)
    artifacts: Mapped[list[str]] = mapped_column(JSON)
    labels: Mapped[list[str]] = mapped_column(JSON)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    #: ``upload``, ``git`` or ``none``.
    source_kind: Mapped[str] = mapped_column(String(8))
    #: The stored upload's directory, or the git URL and ref (``URL#REF``).
    source_ref: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    signal: Mapped[int | None] = mapped_column(Integer)
    #: How its command ended (:data:`stoker.outcomes.Cause`), once it ended.
    cause: Mapped[str | None] = mapped_column(String(16))
    #: Why the job is where it is (set on every transition that has a reason).
    reason: Mapped[str | None] = mapped_column(Text)
    host: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column()
    vm_name: Mapped[str | None] = mapped_column(String(64))
    #: How the VM was obtained: ``warm`` (from a pool) or ``cold`` (booted for it).
    vm_kind: Mapped[str | None] = mapped_column(String(8))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column()
    #: When it last entered ``queued`` / ``running`` and when it ended.
    queued_at: Mapped[datetime] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    log_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    log_truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Number of events recorded (the seq of the last :class:`JobEvent`).
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    #: The network policy of the job's VM (:meth:`stoker.net.policy.NetworkPolicy.summary`):
    #: the pool's when it names one, then the one in force once the VM runs.
    network: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: The guest's connections through its egress proxy (counts and the most
    #: frequent refusals), set when an attempt ends; None without an egress proxy.
    network_summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: The guest account the command runs as (None: root) and its working directory
    #: (None: the job's source directory).
    user: Mapped[str | None] = mapped_column(String(64))
    workdir: Mapped[str | None] = mapped_column(Text)
    #: Infrastructure retries it asked for (None: the service's ``retry_limit``).
    retries: Mapped[int | None] = mapped_column(Integer)
    #: A session job (:mod:`stoker.service.sessions`) holds its VM for steps sent
    #: later, ending after this long without one; None: an ordinary job.
    session_idle_s: Mapped[float | None] = mapped_column(Float)
    #: The session's client said it has no more steps.
    session_closed: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Where a restarted service takes over the running command of a detached VM:
    #: its agent channel, start time, the journal offset its stored output reaches
    #: and the masking's held-back tails (:meth:`LogWriter.resume_from`).
    resume: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    __table_args__ = (
        # The scheduler's scan: queued jobs by submitter in priority and FIFO order.
        Index("ix_jobs_queue", "state", "submitter", "priority", "created_at"),
        # The sweeper's scan: claimed jobs whose lease ran out.
        Index("ix_jobs_lease", "state", "lease_until"),
        Index("ix_jobs_host", "host", "state"),
        # GET /v1/jobs, newest first, by each filter (stoker.service.joblist).
        Index("ix_jobs_created_id", "created_at", "id"),
        Index("ix_jobs_state_created", "state", "created_at", "id"),
        Index("ix_jobs_pool_created", "pool", "created_at", "id"),
        Index("ix_jobs_submitter_created", "submitter", "created_at", "id"),
        # GET /v1/stats: jobs finished lately, grouped by state and cause (covering).
        Index("ix_jobs_finished", "finished_at", "state", "cause"),
    )


class JobEvent(Base):
    """One state transition of a job, timestamped (never updated or deleted)."""

    __tablename__ = "job_events"

    job_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column()
    reason: Mapped[str | None] = mapped_column(Text)
    host: Mapped[str | None] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer, default=0)


class JobStep(Base):
    """One command sent to a session job's VM, and how it ended."""

    __tablename__ = "job_steps"

    job_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    #: 1, 2, ... in the order the client sent them (and they run).
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    argv: Mapped[list[str]] = mapped_column(JSON)
    env: Mapped[dict[str, str]] = mapped_column(JSON)
    secret_keys: Mapped[list[str]] = mapped_column(JSON)
    stdin: Mapped[bytes | None] = mapped_column(LargeBinary)
    cwd: Mapped[str | None] = mapped_column(Text)
    user: Mapped[str | None] = mapped_column(String(64))
    timeout_s: Mapped[float | None] = mapped_column(Float)
    #: ``queued``, ``running`` or ``done``.
    state: Mapped[str] = mapped_column(String(16))
    exit_code: Mapped[int | None] = mapped_column(Integer)
    signal: Mapped[int | None] = mapped_column(Integer)
    #: Why it ended without an exit status (timed out, the VM failed, ...).
    reason: Mapped[str | None] = mapped_column(Text)
    #: Its output is the job's stdout/stderr chunks with ``log_from < seq <= log_to``.
    log_from: Mapped[int | None] = mapped_column(Integer)
    log_to: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class LogChunk(Base):
    """A piece of a job's output, in order (``seq``) across all its attempts."""

    __tablename__ = "log_chunks"

    job_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: ``stdout``, ``stderr`` or ``system`` (what stoker itself reports).
    stream: Mapped[str] = mapped_column(String(8))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    at: Mapped[datetime] = mapped_column()


class Artifact(Base):
    """A file the job produced, copied out of its VM."""

    __tablename__ = "artifacts"

    job_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    #: Path relative to the job's artifact directory.
    name: Mapped[str] = mapped_column(String(4096), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)


class Host(Base):
    """A ``stoker serve`` process sharing this database, and its capacity."""

    __tablename__ = "hosts"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    cpus: Mapped[int] = mapped_column(Integer)
    memory_mb: Mapped[int] = mapped_column(Integer)
    overcommit: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime] = mapped_column()
    version: Mapped[str] = mapped_column(String(32))
    #: ``running``, ``stopping`` or ``stopped`` (a killed host stays ``running`` but goes silent).
    status: Mapped[str] = mapped_column(String(16), default="running")
    #: Random per process life: tells a restarted host from its previous life.
    incarnation: Mapped[str] = mapped_column(String(32))


class VMRecord(Base):
    """A VM a host runs (warm and idle, or serving a job)."""

    __tablename__ = "vms"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(64), index=True)
    job_id: Mapped[str | None] = mapped_column(String(32))
    pool: Mapped[str] = mapped_column(String(64))
    #: ``booting``, ``idle``, ``busy`` or ``stopping``.
    state: Mapped[str] = mapped_column(String(16))
    pid: Mapped[int | None] = mapped_column(Integer)
    workdir: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column()


class VMFailure(Base):
    """A VM that broke (boot failure, VMM crash, kernel panic), newest kept per host."""

    __tablename__ = "vm_failures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vm_name: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(64))
    pool: Mapped[str] = mapped_column(String(64))
    #: The job it served (None: a warm VM).
    job_id: Mapped[str | None] = mapped_column(String(32))
    failed_at: Mapped[datetime] = mapped_column()
    #: The error's first line.
    reason: Mapped[str] = mapped_column(Text)
    #: The last lines of its serial console, bounded, the job's secrets masked.
    console: Mapped[str] = mapped_column(Text)

    __table_args__ = (
        # The API's list (newest first) and the per-host pruning.
        Index("ix_vm_failures_failed", "failed_at"),
        Index("ix_vm_failures_host", "host", "failed_at"),
    )
