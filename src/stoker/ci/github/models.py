"""The GitHub integration's durable state, in the service's database.

Two tables, written only by :mod:`.demand` and :mod:`.reconcile`:

* :class:`GitHubJob`: one workflow job GitHub has queued for labels a pool
  serves, keyed by GitHub's ``workflow_job.id``; its ``status`` only moves
  forward (queued < in_progress < completed), so duplicated, redelivered and
  out-of-order deliveries change nothing;
* :class:`GitHubRunner`: one just-in-time runner, written *before* anything is
  created on GitHub or in a VM, so a crash at any point leaves a record that
  the next reconcile pass finishes or cleans up.

They live on the service's declarative base so one Alembic history
(``stoker.service.migrations``, revision 0004) creates them.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from stoker.service.models import Base


class JobStatus(enum.IntEnum):
    """A workflow job's status as GitHub reports it, in the only order it may change."""

    QUEUED = 1
    IN_PROGRESS = 2
    COMPLETED = 3

    @classmethod
    def parse(cls, value: str) -> JobStatus | None:
        """GitHub's status string (``waiting``/``pending`` count as queued); None if unknown."""
        return {
            "queued": cls.QUEUED,
            "waiting": cls.QUEUED,
            "pending": cls.QUEUED,
            "requested": cls.QUEUED,
            "in_progress": cls.IN_PROGRESS,
            "completed": cls.COMPLETED,
        }.get(value)

    @property
    def label(self) -> str:
        """GitHub's name of the status."""
        return self.name.lower()


class RunnerState(enum.StrEnum):
    """Where a runner is in its life; each state but ``destroyed`` has a deadline."""

    #: The record exists; nothing on GitHub or in a VM yet.
    INTENT = "intent"
    #: GitHub registered it (a JIT configuration exists); no job submitted yet.
    REGISTERED = "registered"
    #: Its service job is queued or booting a VM.
    BOOTING = "booting"
    #: The runner process runs in its VM, waiting for GitHub to give it a job.
    IDLE = "idle"
    #: GitHub gave it a job.
    BUSY = "busy"
    #: Its service job ended (the VM is destroyed with it); GitHub may still list it.
    FINISHED = "finished"
    #: Deleted on GitHub (or GitHub had already forgotten it).
    DEREGISTERED = "deregistered"
    #: Nothing of it is left anywhere.
    DESTROYED = "destroyed"

    @property
    def live(self) -> bool:
        """Whether the runner may still take a job."""
        return self in (
            RunnerState.INTENT,
            RunnerState.REGISTERED,
            RunnerState.BOOTING,
            RunnerState.IDLE,
        )


class GitHubJob(Base):
    """A workflow job that a pool serves, as last heard from GitHub."""

    __tablename__ = "github_jobs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    repository: Mapped[str] = mapped_column(String(200))
    run_id: Mapped[int] = mapped_column(BigInteger)
    labels: Mapped[list[str]] = mapped_column(JSON)
    #: :class:`JobStatus` as its integer (forward-only comparisons in SQL).
    status: Mapped[int] = mapped_column()
    conclusion: Mapped[str | None] = mapped_column(String(32))
    #: The pool whose labels cover the job's.
    pool: Mapped[str] = mapped_column(String(64))
    runner_name: Mapped[str | None] = mapped_column(String(200))
    #: What told us first: ``webhook``, ``sweep`` or ``recheck``.
    source: Mapped[str] = mapped_column(String(16))
    #: GitHub's times (when known) and ours.
    created_at: Mapped[datetime | None] = mapped_column()
    seen_at: Mapped[datetime] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    completed_at: Mapped[datetime | None] = mapped_column()
    #: When the reconcile loop last asked GitHub about it.
    checked_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (Index("ix_github_jobs_status", "status", "pool"),)


class GitHubRunner(Base):
    """One just-in-time runner stoker made (or is making) for a pool."""

    __tablename__ = "github_runners"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    pool: Mapped[str] = mapped_column(String(64))
    #: The target it is registered on (``owner/repo``, organisation or enterprise) and its kind.
    target: Mapped[str] = mapped_column(String(200))
    target_kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    #: GitHub's id of the runner (once registered).
    runner_id: Mapped[int | None] = mapped_column(BigInteger)
    #: The service job running it (once submitted).
    job_id: Mapped[str | None] = mapped_column(String(32))
    #: The workflow job GitHub gave it (learned from webhooks or the API).
    github_job_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column()
    #: Past this, the reconcile loop moves the runner towards ``destroyed``.
    deadline: Mapped[datetime | None] = mapped_column()
    online_at: Mapped[datetime | None] = mapped_column()
    reason: Mapped[str | None] = mapped_column(Text)
    #: State transitions with their times (bounded), for ``stoker github runners``.
    history: Mapped[list[Any]] = mapped_column(JSON)

    __table_args__ = (Index("ix_github_runners_state", "state", "pool"),)


class IntegrationLease(Base):
    """Which host runs an integration's loop (several hosts share one database)."""

    __tablename__ = "integration_leases"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(100))
    until: Mapped[datetime] = mapped_column()
