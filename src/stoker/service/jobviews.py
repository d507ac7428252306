"""What callers of the job service get back: views of jobs, their events, logs, artifacts.

Split from :mod:`stoker.service.jobs` (the state machine and submissions).
Every view is frozen and built from the database rows; secret values are
never part of one: :class:`JobView` carries the *names* of a job's secret
variables only.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from stoker.service.config import _redact_url
from stoker.service.jobs import JobState, git_ref_of
from stoker.service.models import Job, JobEvent


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class EventView(_View):
    """One transition of a job."""

    seq: int
    from_state: JobState | None
    to_state: JobState
    at: datetime
    reason: str | None
    host: str | None
    attempt: int

    @classmethod
    def of(cls, event: JobEvent) -> EventView:
        return cls(
            seq=event.seq,
            from_state=JobState(event.from_state) if event.from_state else None,
            to_state=JobState(event.to_state),
            at=event.at,
            reason=event.reason,
            host=event.host,
            attempt=event.attempt,
        )


class SourceView(_View):
    """Where the job's files come from (git URLs without credentials)."""

    kind: Literal["upload", "git", "none"]
    url: str | None = None
    ref: str | None = None


class NetworkView(_View):
    """The network policy of a job's VM (see :class:`stoker.net.policy.NetworkPolicy`)."""

    #: ``none`` (no network), ``egress`` (through an allowlisting proxy) or ``nat``.
    mode: str
    #: Allowlist entries as configured (``egress``), presets as ``@name``.
    allow: tuple[str, ...] = ()
    #: The egress proxy's limits (:class:`stoker.net.policy.Limits`).
    limits: dict[str, int | float | None] = Field(default_factory=dict)


class ConnectionCounts(_View):
    """What a job's guest did through its egress proxy."""

    allowed: int = 0
    denied: int = 0
    errors: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class NetworkSummaryView(_View):
    """A job's connections, counted when its (last) attempt ended."""

    connections: ConnectionCounts = ConnectionCounts()
    #: The most frequent refusals and errors, e.g. ``evil.example:443: not in allowlist (3x)``.
    denied: tuple[str, ...] = ()


class JobView(_View):
    """A job as the API returns it: secret values left out."""

    id: str
    submitter: str
    state: JobState
    pool: str | None
    image: str
    cpus: int
    memory_mb: int
    disk_mb: int
    timeout_s: float
    command: tuple[str, ...]
    #: Non-secret variables only.
    env: dict[str, str]
    #: Names of the secret variables (their values are never returned).
    secret_keys: tuple[str, ...]
    artifacts: tuple[str, ...]
    labels: tuple[str, ...]
    priority: int
    source: SourceView
    #: The guest account the command runs as (None: root).
    user: str | None = None
    #: The command's working directory (None: the job's source directory).
    workdir: str | None = None
    #: Infrastructure retries it asked for (None: the service's retry_limit).
    retries: int | None = None
    #: A session job: it ends after this many seconds without a step (None: not a session).
    session_idle_timeout: float | None = None
    #: The session's client closed it (no more steps).
    session_closed: bool = False
    attempt: int
    exit_code: int | None
    signal: int | None
    reason: str | None
    #: How the command ended, once the job did (:mod:`stoker.outcomes`: exit, signal,
    #: spawn_error, oom, pids_limit, disk_full, output_limit, timeout, kernel_panic,
    #: vmm_crash); None: it never ran (or a service before causes were recorded).
    cause: str | None = None
    host: str | None
    vm_name: str | None
    vm_kind: str | None
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    log_bytes: int
    log_truncated: bool
    #: The network policy of the job's VM: its pool's, then the one in force once it runs
    #: (None: not known yet, the image decides).
    network: NetworkView | None = None
    #: Its connections (egress mode), once an attempt ended.
    network_summary: NetworkSummaryView | None = None
    #: Every transition (filled in by ``Service.get``; empty in listings).
    events: tuple[EventView, ...] = ()

    @classmethod
    def of(cls, job: Job, events: Iterable[JobEvent] = ()) -> JobView:
        secret = set(job.secret_keys)
        if job.source_kind == "git" and job.source_ref:
            git = git_ref_of(job)
            source = SourceView(kind="git", url=_redact_url(git.url), ref=git.ref)
        else:
            source = SourceView(kind="upload" if job.source_kind == "upload" else "none")
        return cls(
            id=job.id,
            submitter=job.submitter,
            state=JobState(job.state),
            pool=job.pool,
            image=job.image,
            cpus=job.cpus,
            memory_mb=job.memory_mb,
            disk_mb=job.disk_mb,
            timeout_s=job.timeout_s,
            command=tuple(job.argv),
            env={k: v for k, v in job.env.items() if k not in secret},
            secret_keys=tuple(job.secret_keys),
            artifacts=tuple(job.artifacts),
            labels=tuple(job.labels),
            priority=job.priority,
            source=source,
            user=job.user,
            workdir=job.workdir,
            retries=job.retries,
            session_idle_timeout=job.session_idle_s,
            session_closed=bool(job.session_closed),
            attempt=job.attempt,
            exit_code=job.exit_code,
            signal=job.signal,
            cause=job.cause,
            reason=job.reason,
            host=job.host,
            vm_name=job.vm_name,
            vm_kind=job.vm_kind,
            cancel_requested=job.cancel_requested,
            created_at=job.created_at,
            updated_at=job.updated_at,
            queued_at=job.queued_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            log_bytes=job.log_bytes,
            log_truncated=job.log_truncated,
            network=_network_view(job.network),
            network_summary=_network_summary_view(job.network_summary),
            events=tuple(EventView.of(e) for e in events),
        )


def _network_view(data: dict[str, Any] | None) -> NetworkView | None:
    if not isinstance(data, dict) or not isinstance(data.get("mode"), str):
        return None
    try:
        return NetworkView.model_validate(data)
    except ValueError:  # written by another version: show what is certain
        return NetworkView(mode=data["mode"])


def _network_summary_view(data: dict[str, Any] | None) -> NetworkSummaryView | None:
    if not isinstance(data, dict):
        return None
    try:
        return NetworkSummaryView.model_validate(data)
    except ValueError:
        return NetworkSummaryView()


class LogChunkView(_View):
    """A piece of a job's output."""

    seq: int
    stream: Literal["stdout", "stderr", "system"]
    data: bytes
    at: datetime

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


class ArtifactView(_View):
    """A file a job produced."""

    name: str
    size: int
    sha256: str


class JobFilter(BaseModel):
    """What ``Service.list`` selects (all given conditions must hold)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state: JobState | None = None
    pool: str | None = None
    label: str | None = None
    submitter: str | None = None
    limit: int = Field(default=100, ge=1, le=1000)
    #: Jobs created before this one (the ``id`` of the last job of the previous page).
    before: str | None = None
