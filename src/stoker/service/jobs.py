"""Jobs: what may be submitted and the state machine (what callers get back: :mod:`.jobviews`).

::

    queued -> assigned -> booting -> running -> succeeded | failed | timed_out
       |         |           |          |
       |         +-----------+----------+--> queued     (infrastructure retry or lost host)
       |         +-----------+----------+--> errored    (infrastructure failed retry_limit times)
       +---------+-----------+----------+--> cancelled
                             +-------------> failed     (the job's own input, e.g. a git ref)

Going back to ``queued`` counts an attempt (``attempt + 1``).

``failed`` is the user's command (or input) failing and is never retried;
``errored`` is stoker's side failing for good.  :func:`transition` is the only
writer of ``Job.state``: it checks the edge, timestamps it and appends a
:class:`~stoker.service.models.JobEvent` in the caller's transaction, which
commits before the side effect the transition announces.

Secrets: the values of ``JobRequest.secrets`` are stored with the job (the VM
needs them) but no view, log line or error message ever contains them.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from collections.abc import Iterable
from datetime import datetime
from pathlib import PurePosixPath
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, model_validator
from sqlalchemy.orm import Session

from stoker.errors import UsageError
from stoker.fields import Name, Seconds
from stoker.images.spec import DiskMB, EnvName, EnvValue, ImageName, Items, MemoryMB
from stoker.service.config import PoolConfig, ServiceConfig, _redact_url
from stoker.service.models import Job, JobEvent, utcnow


class JobState(enum.StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    ASSIGNED = "assigned"
    BOOTING = "booting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ERRORED = "errored"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def active(self) -> bool:
        """Claimed by a host (it holds a lease on the job)."""
        return self in ACTIVE


ACTIVE = frozenset({JobState.ASSIGNED, JobState.BOOTING, JobState.RUNNING})
TERMINAL = frozenset(
    {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.ERRORED,
        JobState.CANCELLED,
        JobState.TIMED_OUT,
    }
)
_EDGES: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.ASSIGNED, JobState.CANCELLED}),
    JobState.ASSIGNED: frozenset(
        {JobState.BOOTING, JobState.QUEUED, JobState.ERRORED, JobState.CANCELLED}
    ),
    JobState.BOOTING: frozenset(
        {
            JobState.RUNNING,
            JobState.QUEUED,
            JobState.ERRORED,
            JobState.CANCELLED,
            JobState.FAILED,
        }
    ),
    JobState.RUNNING: frozenset(
        {
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.TIMED_OUT,
            JobState.QUEUED,
            JobState.ERRORED,
            JobState.CANCELLED,
        }
    ),
}


# --- errors the facade raises (the REST API maps them to status codes) ---------------------------


class NotFound(UsageError):
    """No such job, artifact or log (HTTP 404)."""


class Conflict(UsageError):
    """The request contradicts the job's state, e.g. cancelling a finished job (HTTP 409)."""


class InvalidTransition(Conflict):
    """A state change the state machine does not allow."""


class Forbidden(UsageError):
    """The caller's token may not do this to this job (someone else's)."""


class TooLarge(UsageError):
    """An upload or a field is bigger than the configured limit (HTTP 413)."""


class QuotaExceeded(UsageError):
    """The submitter has too many jobs queued already (HTTP 429)."""


def can_transition(source: JobState, target: JobState) -> bool:
    """Whether the state machine has the edge ``source -> target``."""
    return target in _EDGES.get(source, frozenset())


def transition(
    session: Session,
    job: Job,
    to: JobState,
    *,
    reason: str | None = None,
    host: str | None = None,
    now: datetime | None = None,
) -> JobEvent:
    """Move ``job`` to ``to`` in ``session``'s transaction and record the event.

    Raises :class:`InvalidTransition` for an edge the state machine does not
    have.  Going back to ``queued`` counts an attempt and forgets the host;
    entering a terminal state ends the lease.
    """
    source = JobState(job.state)
    if not can_transition(source, to):
        raise InvalidTransition(f"job {job.id} cannot go from {source} to {to}")
    at = now or utcnow()
    job.state = to.value
    job.updated_at = at
    if reason is not None:
        job.reason = reason
    if to is JobState.QUEUED:
        job.attempt += 1
        job.host = None
        job.lease_until = None
        job.vm_name = None
        job.vm_kind = None
        job.queued_at = at
    elif to is JobState.ASSIGNED:
        job.host = host
    elif to is JobState.RUNNING:
        job.started_at = at
    if to in TERMINAL:
        job.finished_at = at
        job.lease_until = None
    job.event_seq += 1
    event = JobEvent(
        job_id=job.id,
        seq=job.event_seq,
        from_state=source.value,
        to_state=to.value,
        at=at,
        reason=reason,
        host=host or job.host,
        attempt=job.attempt,
    )
    session.add(event)
    return event


# --- submissions --------------------------------------------------------------------------------

_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/@+-]{0,254}")
MAX_ARGV_BYTES = 128 << 10
MAX_ARTIFACT_PATTERNS = 100
MAX_LABELS = 32


def _check_argv_item(value: str) -> str:
    if "\0" in value:
        raise ValueError("command arguments cannot contain NUL characters")
    return value


def _check_workdir(value: str) -> str:
    path = PurePosixPath(value)
    if "\0" in value or not path.is_absolute() or ".." in path.parts or len(value) > 4096:
        raise ValueError(f"workdir {value!r} must be an absolute guest path without '..'")
    return value


def _check_pattern(value: str) -> str:
    path = PurePosixPath(value)
    if not value or "\0" in value or path.is_absolute() or ".." in path.parts:
        raise ValueError(
            f"artifact pattern {value!r} must be relative to the job's directory and stay inside it"
        )
    return value


def _check_ref(value: str) -> str:
    # No leading '-' (it would be read as an option) and nothing a shell or git would expand.
    if not _REF_RE.fullmatch(value) or ".." in value:
        raise ValueError(f"expected a branch, tag or commit, got {value!r}")
    return value


def _check_git_url(value: str) -> str:
    parts = urlsplit(value)
    if not parts.scheme or any(c.isspace() or ord(c) < 32 for c in value) or len(value) > 2048:
        raise ValueError(f"expected a URL like https://host/repo.git, got {_redact_url(value)!r}")
    return value


class GitSource(BaseModel):
    """A git repository the host fetches (shallow) before the job runs."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    url: Annotated[str, AfterValidator(_check_git_url)]
    ref: Annotated[str, AfterValidator(_check_ref)] = "HEAD"

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    def redacted(self) -> str:
        """``url#ref`` without credentials."""
        return f"{_redact_url(self.url)}#{self.ref}"


class SessionOptions(BaseModel):
    """A session job: its VM waits for steps (``POST /v1/jobs/{id}/steps``) instead of a command."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    #: The session ends (``timed_out``) after this long without a step.
    idle_timeout: Seconds = 600.0


#: What :meth:`JobRequest._consistent` checks, as JSON Schema (for the API's document):
#: a command whose program is not empty, or a session (no command, no artifacts, no retries).
_COMMAND_OR_SESSION: Final[list[JsonValue]] = [
    {
        "required": ["command"],
        "properties": {
            "command": {"minItems": 1, "prefixItems": [{"minLength": 1}]},
            "session": {"type": "null"},
        },
    },
    {
        "required": ["session"],
        "properties": {
            "session": {"type": "object"},
            "command": {"maxItems": 0},
            "artifacts": {"maxItems": 0},
            "retries": {"enum": [0, None]},
        },
    },
]


class JobRequest(BaseModel):
    """What a submitter asks for (the ``spec`` of ``POST /v1/jobs``).

    Either ``pool`` or ``image`` picks the pool (with neither: the only pool,
    or the one called ``default``); ``cpus``, ``memory`` and ``disk`` are
    minimums the pool's VM shape must meet; ``timeout`` defaults to the pool's.
    Exactly one of ``command`` and ``session`` is given.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, json_schema_extra={"oneOf": _COMMAND_OR_SESSION}
    )

    command: Items[Annotated[str, AfterValidator(_check_argv_item)]] = ()
    #: Hold the VM for commands sent one at a time (see :mod:`stoker.service.sessions`);
    #: a session is never retried (its client would not know).
    session: SessionOptions | None = None
    image: ImageName | None = None
    pool: Name | None = None
    cpus: int | None = Field(default=None, ge=1, le=64)
    memory: MemoryMB | None = None
    disk: DiskMB | None = None
    timeout: Seconds | None = None
    env: dict[EnvName, EnvValue] = Field(default_factory=dict)
    #: Environment variables whose values are never shown (tokens, passwords).
    secrets: dict[EnvName, EnvValue] = Field(default_factory=dict)
    artifacts: Annotated[
        Items[Annotated[str, AfterValidator(_check_pattern)]],
        Field(max_length=MAX_ARTIFACT_PATTERNS),
    ] = ()
    labels: Annotated[Items[Name], Field(max_length=MAX_LABELS)] = ()
    priority: int | None = Field(default=None, ge=-1000, le=1000)
    git: GitSource | None = None
    #: Run the command as this account of the image (its uid, gid and home);
    #: default root.
    user: Name | None = None
    #: The command's working directory in the guest (default: the job's source, /work/src).
    workdir: Annotated[str, AfterValidator(_check_workdir)] | None = None
    #: Infrastructure retries of this job, at most the service's ``retry_limit``
    #: (0: never run twice, e.g. a CI runner whose registration is single-use).
    retries: int | None = Field(default=None, ge=0, le=100)

    @model_validator(mode="after")
    def _consistent(self) -> JobRequest:
        if self.session is not None:
            if self.command:
                raise ValueError("give either a command or a session, not both")
            if self.artifacts:
                raise ValueError("a session has no artifacts (its steps can print what they make)")
            if self.retries:
                raise ValueError("a session is never retried (retries must be 0)")
        elif not self.command:
            raise ValueError("the command is empty (give a command, or a session)")
        elif not self.command[0]:
            raise ValueError("the command's first word (the program) is empty")
        if sum(len(a.encode()) for a in self.command) > MAX_ARGV_BYTES:
            raise ValueError(f"the command is longer than {MAX_ARGV_BYTES} bytes")
        both = sorted(set(self.env) & set(self.secrets))
        if both:
            raise ValueError(f"{', '.join(both)} given both in env and in secrets")
        return self


class ResolvedJob(BaseModel):
    """A request checked against the configuration: what will be stored."""

    model_config = ConfigDict(frozen=True)

    pool: str
    image: str
    cpus: int
    memory_mb: int
    disk_mb: int
    timeout_s: float
    priority: int
    #: The pool's network policy (its summary); None: the image's, known once the VM runs.
    network: dict[str, Any] | None = None


def resolve(request: JobRequest, config: ServiceConfig, submitter: str) -> ResolvedJob:
    """Pick the pool for ``request`` and check it against the limits (pure).

    Raises :class:`UsageError` for unknown pools or images, resources above
    every eligible pool's shape, a timeout above the pool's, a priority above
    the submitter's, and :class:`TooLarge` for an oversized environment.
    """
    name = _pick_pool(request, config)
    pool = config.pools[name]
    policy = config.submitters.policy(submitter)
    priority = policy.priority if request.priority is None else request.priority
    if priority > policy.priority:
        raise UsageError(
            f"priority {priority} is above what {submitter!r} may ask for ({policy.priority})"
        )
    timeout = pool.timeout if request.timeout is None else request.timeout
    if timeout > pool.timeout:
        raise UsageError(
            f"timeout {timeout:g}s is above pool {name!r}'s maximum of {pool.timeout:g}s"
        )
    env_bytes = len(json.dumps({**request.env, **request.secrets}).encode())
    if env_bytes > config.limits.max_env_bytes:
        raise TooLarge(
            f"the environment takes {env_bytes} bytes, more than the limit of "
            f"{config.limits.max_env_bytes}"
        )
    if request.git is not None and request.git.scheme not in config.git.allow_protocols:
        raise UsageError(
            f"git URLs with scheme {request.git.scheme!r} are not allowed here "
            f"(allowed: {', '.join(config.git.allow_protocols)})"
        )
    return ResolvedJob(
        pool=name,
        image=pool.image_name,
        cpus=pool.cpus,
        memory_mb=pool.memory,
        disk_mb=pool.disk,
        timeout_s=timeout,
        priority=priority,
        network=pool.network.summary() if pool.network is not None else None,
    )


def _shortfall(request: JobRequest, pool: PoolConfig) -> str | None:
    """What ``pool``'s VMs lack for ``request`` (None: they fit)."""
    missing = []
    if request.cpus is not None and request.cpus > pool.cpus:
        missing.append(f"{request.cpus} vCPUs (pool has {pool.cpus})")
    if request.memory is not None and request.memory > pool.memory:
        missing.append(f"{request.memory} MiB memory (pool has {pool.memory})")
    if request.disk is not None and request.disk > pool.disk:
        missing.append(f"{request.disk} MiB disk (pool has {pool.disk})")
    absent = sorted(set(request.labels) - set(pool.labels))
    if absent:
        missing.append(f"labels {', '.join(absent)}")
    return "; ".join(missing) or None


def _pick_pool(request: JobRequest, config: ServiceConfig) -> str:
    if request.pool is not None:
        pool = config.pools.get(request.pool)
        if pool is None:
            raise UsageError(
                f"unknown pool {request.pool!r}",
                hint=f"pools: {', '.join(sorted(config.pools))}",
            )
        if request.image is not None and request.image != pool.image_name:
            raise UsageError(
                f"pool {request.pool!r} runs image {pool.image_name!r}, not {request.image!r}"
            )
        lack = _shortfall(request, pool)
        if lack:
            raise UsageError(f"pool {request.pool!r} cannot give this job {lack}")
        return request.pool
    if request.image is None:
        if len(config.pools) == 1:
            names = list(config.pools)
        elif "default" in config.pools:
            names = ["default"]
        else:
            raise UsageError(
                "name an image or a pool", hint=f"pools: {', '.join(sorted(config.pools))}"
            )
    else:
        names = config.pools_for(request.image)
        if not names:
            images = sorted({p.image_name for p in config.pools.values()})
            raise UsageError(
                f"unknown image {request.image!r}", hint=f"images served: {', '.join(images)}"
            )
    fitting = [n for n in names if _shortfall(request, config.pools[n]) is None]
    if not fitting:
        reasons = "; ".join(f"{n}: lacks {_shortfall(request, config.pools[n])}" for n in names)
        raise UsageError(f"no pool can run this job ({reasons})")
    # The smallest VM that fits leaves the most room for others.
    return min(fitting, key=lambda n: (config.pools[n].cpus, config.pools[n].memory, n))


def new_job_id() -> str:
    """A fresh job id (uuid4, hex)."""
    return uuid.uuid4().hex


def new_job(
    request: JobRequest,
    resolved: ResolvedJob,
    *,
    submitter: str,
    job_id: str,
    source_kind: Literal["upload", "git", "none"],
    source_ref: str | None,
    now: datetime | None = None,
) -> tuple[Job, JobEvent]:
    """The rows of a new queued job (added to no session yet)."""
    at = now or utcnow()
    job = Job(
        id=job_id,
        submitter=submitter,
        state=JobState.QUEUED.value,
        pool=resolved.pool,
        image=resolved.image,
        cpus=resolved.cpus,
        memory_mb=resolved.memory_mb,
        disk_mb=resolved.disk_mb,
        timeout_s=resolved.timeout_s,
        argv=list(request.command),
        env={**request.env, **request.secrets},
        secret_keys=sorted(request.secrets),
        artifacts=list(request.artifacts),
        labels=list(request.labels),
        priority=resolved.priority,
        source_kind=source_kind,
        source_ref=source_ref,
        attempt=0,
        cancel_requested=False,
        created_at=at,
        updated_at=at,
        queued_at=at,
        log_bytes=0,
        log_truncated=False,
        event_seq=1,
        network=resolved.network,
        user=request.user,
        workdir=request.workdir,
        retries=0 if request.session is not None else request.retries,
        session_idle_s=request.session.idle_timeout if request.session is not None else None,
        session_closed=False,
    )
    event = JobEvent(
        job_id=job_id,
        seq=1,
        from_state=None,
        to_state=JobState.QUEUED.value,
        at=at,
        reason="submitted",
        host=None,
        attempt=0,
    )
    return job, event


def git_ref_of(job: Job) -> GitSource:
    """The git source stored in ``job.source_ref`` (``URL#REF``)."""
    assert job.source_ref is not None
    url, _, ref = job.source_ref.rpartition("#")
    return GitSource(url=url, ref=ref)


def redact(text: str, secret_values: Iterable[str]) -> str:
    """``text`` with every secret value replaced by ``***`` (for error messages)."""
    for value in sorted(set(secret_values), key=len, reverse=True):
        if len(value) >= MIN_SECRET_LEN:
            text = text.replace(value, "***")
    return text


#: Shorter secret values are not masked in logs: masking "1" would garble everything.
MIN_SECRET_LEN = 4


def secret_values(job: Job) -> list[str]:
    """The secret environment values of ``job`` (to mask them)."""
    return [job.env[k] for k in job.secret_keys if k in job.env]


def job_env(job: Job) -> dict[str, str]:
    """The command's environment: the job's variables plus what stoker tells every job."""
    return {
        **job.env,
        "STOKER_JOB_ID": job.id,
        "STOKER_JOB_ATTEMPT": str(job.attempt),
        "CI": "true",
    }


def retry_limit_of(job: Job, retry_limit: int) -> int:
    """How many infrastructure retries ``job`` gets: the service's, or fewer if it asked."""
    return retry_limit if job.retries is None else min(retry_limit, job.retries)


def recover(session: Session, job: Job, why: str, retry_limit: int, now: datetime) -> JobState:
    """Requeue a job whose host lost it, or end it (cancelling, or out of retries)."""
    retry_limit = retry_limit_of(job, retry_limit)
    if job.cancel_requested:
        target, reason = JobState.CANCELLED, f"cancelled ({why})"
    elif job.attempt < retry_limit:
        target, reason = JobState.QUEUED, why
    else:
        target = JobState.ERRORED
        reason = f"{why}; gave up after {job.attempt + 1} attempts"
    transition(session, job, target, reason=reason, now=now)
    return target
