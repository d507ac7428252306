"""Demand: which workflow jobs are waiting for a runner of which pool.

Every source reports *sightings* (what GitHub said about one job at one
moment) to :class:`Demand`, which records them idempotently: a job is keyed by
GitHub's id and its status only moves forward (queued < in_progress <
completed), so a duplicated, redelivered, delayed or reordered sighting
changes nothing.  Sources:

* webhooks (push): ``workflow_job`` deliveries, see :mod:`.webhook`;
* :class:`ApiSweep` (pull): the configured repositories' queued runs, on start
  and periodically (finds what was queued while stoker was down or what a
  dropped webhook never told), and a re-check of each job still queued after
  ``recheck_after`` (``GET .../actions/jobs/{id}``);
* later, GitHub's runner scale-set message queue: another :class:`DemandSource`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Literal, Protocol

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from stoker.ci.github.config import GitHubConfig
from stoker.ci.github.models import GitHubJob, GitHubRunner, JobStatus, RunnerState
from stoker.service.db import Database
from stoker.service.models import utcnow

if TYPE_CHECKING:
    from stoker.ci.github.client import GitHubClient, WorkflowJob
    from stoker.ci.github.webhook import WorkflowJobEvent

log = logging.getLogger("stoker.github")

Source = Literal["webhook", "sweep", "recheck"]
Recorded = Literal["new", "advanced", "unchanged", "ignored"]
#: Latencies kept for the metrics between two passes at most.
MAX_LATENCIES = 10_000
#: Jobs re-checked with GitHub per pass at most.
MAX_RECHECKS = 20
#: Repositories swept besides the configured ones: those with jobs seen this recently.
SWEEP_SEEN_WITHIN = timedelta(days=1)


@dataclass(frozen=True)
class Sighting:
    """What GitHub said about one workflow job at one moment."""

    id: int
    repository: str
    run_id: int
    labels: tuple[str, ...]
    status: JobStatus
    conclusion: str | None
    runner_name: str | None
    created_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    source: Source

    @classmethod
    def of_webhook(cls, event: WorkflowJobEvent) -> Sighting | None:
        """The sighting in a ``workflow_job`` delivery (None: a status we do not know)."""
        job = event.workflow_job
        status = JobStatus.parse(job.status)
        if status is None:
            return None
        return cls(
            id=job.id,
            repository=event.repository.full_name,
            run_id=job.run_id,
            labels=tuple(job.labels),
            status=status,
            conclusion=job.conclusion,
            runner_name=job.runner_name,
            created_at=job.created_at,
            started_at=job.started_at,
            completed_at=job.completed_at,
            source="webhook",
        )

    @classmethod
    def of_api(cls, repository: str, job: WorkflowJob, source: Source) -> Sighting | None:
        """The sighting in a REST API answer (None: a status we do not know)."""
        status = JobStatus.parse(job.status)
        if status is None:
            return None
        return cls(
            id=job.id,
            repository=repository,
            run_id=job.run_id,
            labels=tuple(job.labels),
            status=status,
            conclusion=job.conclusion,
            runner_name=job.runner_name,
            created_at=job.created_at,
            started_at=job.started_at,
            completed_at=job.completed_at,
            source=source,
        )


def record(
    session: Session,
    sighting: Sighting,
    pool: str,
    now: datetime,
    started: list[float] | None = None,
) -> Recorded:
    """Store ``sighting`` for ``pool`` in ``session``: insert, advance, or leave alone.

    When a job stoker saw queued is first seen started, the seconds between the
    two are appended to ``started`` (the job-start latency metric).
    """
    row = session.get(GitHubJob, sighting.id, with_for_update=True)
    if row is None:
        session.add(
            GitHubJob(
                id=sighting.id,
                repository=sighting.repository,
                run_id=sighting.run_id,
                labels=list(sighting.labels),
                status=int(sighting.status),
                conclusion=sighting.conclusion,
                pool=pool,
                runner_name=sighting.runner_name,
                source=sighting.source,
                created_at=sighting.created_at,
                seen_at=now,
                updated_at=now,
                started_at=now if sighting.status >= JobStatus.IN_PROGRESS else None,
                completed_at=now if sighting.status is JobStatus.COMPLETED else None,
                checked_at=now if sighting.source != "webhook" else None,
            )
        )
        return "new"
    if sighting.source != "webhook":
        row.checked_at = now
    if sighting.status <= row.status:
        # Old news (a redelivery, a delayed or reordered delivery, a duplicate).
        if row.runner_name is None and sighting.runner_name and sighting.status == row.status:
            row.runner_name = sighting.runner_name
        return "unchanged"
    row.status = int(sighting.status)
    row.updated_at = now
    row.conclusion = sighting.conclusion or row.conclusion
    row.runner_name = sighting.runner_name or row.runner_name
    if sighting.status >= JobStatus.IN_PROGRESS and row.started_at is None:
        row.started_at = now
        if started is not None:
            started.append(max(0.0, (now - row.seen_at).total_seconds()))
    if sighting.status is JobStatus.COMPLETED:
        row.completed_at = now
    return "advanced"


class DemandSource(Protocol):
    """A pull source of sightings (the API sweep; later the scale-set message queue)."""

    name: str

    async def poll(self, now: datetime) -> list[Sighting]:
        """What the source knows now (may call GitHub)."""
        ...


class Demand:
    """Records sightings from every source for the pools that serve them."""

    def __init__(self, config: GitHubConfig, db: Database) -> None:
        self.config = config
        self.db = db
        #: Counts of what recording did, by source and outcome (for metrics and tests).
        self.counts: dict[tuple[str, str], int] = {}
        self.last_webhook_at: datetime | None = None
        #: Queued -> started latencies not yet taken by the metrics (bounded).
        self._start_latencies: list[float] = []

    def route(self, sighting: Sighting) -> str | None:
        """The pool serving ``sighting`` (None: no target covers its repository or no
        pool has its labels: not ours)."""
        if self.config.target_for(sighting.repository) is None:
            return None
        return self.config.pool_for(sighting.labels)

    async def observe(self, sightings: Iterable[Sighting]) -> list[Recorded]:
        """Record ``sightings`` (one transaction); returns what happened to each."""
        items = [(s, self.route(s)) for s in sightings]
        now = utcnow()

        latencies: list[float] = []

        def write(session: Session) -> list[Recorded]:
            latencies.clear()  # a retried transaction starts over
            return [
                "ignored" if pool is None else record(session, s, pool, now, latencies)
                for s, pool in items
            ]

        try:
            results = await self.db.run(write)
        except IntegrityError:
            # Two deliveries of one new job raced to insert it: the row exists now.
            results = await self.db.run(write)
        self._start_latencies = (self._start_latencies + latencies)[-MAX_LATENCIES:]
        for (s, _), outcome in zip(items, results, strict=True):
            key = (s.source, outcome)
            self.counts[key] = self.counts.get(key, 0) + 1
            if s.source == "webhook":
                self.last_webhook_at = now
            if outcome in ("new", "advanced"):
                log.info(
                    "github job %d (%s): %s via %s",
                    s.id,
                    s.repository,
                    s.status.label,
                    s.source,
                    extra={"github_job": s.id},
                )
        return results

    def take_start_latencies(self) -> list[float]:
        """The queued -> started latencies recorded since the last call."""
        taken, self._start_latencies = self._start_latencies, []
        return taken

    async def queued(self) -> dict[str, int]:
        """Queued jobs per pool (what GitHub still waits to give a runner)."""

        def read(session: Session) -> dict[str, int]:
            rows = session.execute(
                select(GitHubJob.pool).where(GitHubJob.status == int(JobStatus.QUEUED))
            ).scalars()
            counts: dict[str, int] = {}
            for pool in rows:
                counts[pool] = counts.get(pool, 0) + 1
            return counts

        return await self.db.run(read)


class ApiSweep:
    """Asks GitHub what webhooks may not have told: queued runs, and stale queued jobs."""

    name = "sweep"

    def __init__(self, config: GitHubConfig, db: Database, client: GitHubClient) -> None:
        self.config = config
        self.db = db
        self.client = client

    async def repositories(self, now: datetime) -> list[str]:
        """The configured repositories and those with jobs seen recently (organisation targets)."""
        names = {t.repository for t in self.config.targets if t.repository is not None}
        since = now - SWEEP_SEEN_WITHIN

        def read(session: Session) -> list[str]:
            return list(
                session.execute(
                    select(GitHubJob.repository).where(GitHubJob.seen_at >= since).distinct()
                ).scalars()
            )

        names.update(await self.db.run(read))
        return sorted(names)

    async def known_runs(self, now: datetime) -> frozenset[int]:
        """Workflow runs whose jobs are recorded (the sweep does not ask about them again;
        the re-check of stale queued jobs covers their changes)."""
        since = now - SWEEP_SEEN_WITHIN

        def read(session: Session) -> frozenset[int]:
            return frozenset(
                session.execute(
                    select(GitHubJob.run_id).where(GitHubJob.seen_at >= since).distinct()
                ).scalars()
            )

        return await self.db.run(read, write=False)

    async def poll(self, now: datetime) -> list[Sighting]:
        """Every queued job of the swept repositories (runs already recorded skipped)."""
        found: list[Sighting] = []
        known = await self.known_runs(now)
        for repository in await self.repositories(now):
            for job in await self.client.queued_jobs(repository, known_runs=known):
                sighting = Sighting.of_api(repository, job, "sweep")
                if sighting is not None:
                    found.append(sighting)
        return found

    async def recheck(self, now: datetime) -> list[Sighting]:
        """Ask GitHub about jobs that look stuck: queued longer than ``recheck_after``
        (and not asked about since) while a runner of their pool sits idle.

        A job waiting for capacity is not asked about: no runner of ours could
        have started it, so the answer could only be "queued" (or cancelled,
        which the idle runner it will get reveals).  That keeps a long queue
        from costing a call per job per period.
        """
        stale = now - timedelta(seconds=self.config.recheck_after)

        def read(session: Session) -> list[tuple[int, str]]:
            idle_pools = select(GitHubRunner.pool).where(
                GitHubRunner.state == RunnerState.IDLE.value
            )
            rows = session.execute(
                select(GitHubJob.id, GitHubJob.repository)
                .where(
                    GitHubJob.status == int(JobStatus.QUEUED),
                    GitHubJob.seen_at <= stale,
                    (GitHubJob.checked_at.is_(None)) | (GitHubJob.checked_at <= stale),
                    GitHubJob.pool.in_(idle_pools),
                )
                .order_by(GitHubJob.seen_at)
                .limit(MAX_RECHECKS)
            )
            return [(r[0], r[1]) for r in rows]

        found: list[Sighting] = []
        for job_id, repository in await self.db.run(read):
            job = await self.client.get_job(repository, job_id)
            if job is None:
                # GitHub no longer knows it (deleted run): nothing will ever pick it up.
                found.append(_gone(job_id, repository))
                continue
            sighting = Sighting.of_api(repository, job, "recheck")
            if sighting is not None:
                found.append(sighting)
        return found


def _gone(job_id: int, repository: str) -> Sighting:
    return Sighting(
        id=job_id,
        repository=repository,
        run_id=0,
        labels=(),
        status=JobStatus.COMPLETED,
        conclusion="not_found",
        runner_name=None,
        created_at=None,
        started_at=None,
        completed_at=None,
        source="recheck",
    )
