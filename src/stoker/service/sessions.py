"""Session jobs: a VM held for one client, which sends it commands one at a time.

A session is a job submitted with ``session`` instead of a ``command``
(:class:`~stoker.service.jobs.SessionOptions`).  It is scheduled like any job
(warm pools, capacity, fairness, metrics); once its VM runs, the host that
owns it runs the session's **steps** in the order the client sent them
(``POST /v1/jobs/{id}/steps``), each with its own command, standard input,
environment, account, directory and timeout, and records how each ended.  The
client follows a step's output with ``GET /v1/jobs/{id}/steps/{seq}?follow=1``.
The session ends when its client closes it (``succeeded``), after
``idle_timeout`` without a step or at the job's timeout (``timed_out``), on
cancel, or when its VM fails (``errored``: a session is never retried, since
its client holds state about the VM it had).

Everything goes through the database (steps are rows, their output is the
job's log), so a client may talk to any host sharing it.  What clients send
is checked like a job request: bounded standard input, environment and queue
of steps, absolute working directories, known accounts only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from stoker.accounts import guest_user
from stoker.errors import CommandTimeout, ProvisionError, StokerError, UsageError
from stoker.fields import Name, Seconds
from stoker.images.spec import EnvName, EnvValue, Items
from stoker.service.db import JOB_PATIENCE, Database
from stoker.service.jobs import (
    Conflict,
    Forbidden,
    JobState,
    NotFound,
    TooLarge,
    _check_argv_item,
    _check_workdir,
)
from stoker.service.jobviews import LogChunkView
from stoker.service.logs import LogWriter, Notifier
from stoker.service.models import Job, JobStep, LogChunk, utcnow
from stoker.service.runs import Outcome
from stoker.vm import VM

#: Largest standard input of one step (a CI stage's script is a few hundred KiB at most).
MAX_STDIN_BYTES: Final = 4 << 20
#: Steps waiting to run at once, per session.
MAX_QUEUED_STEPS: Final = 16
#: Steps in one session's life.
MAX_STEPS: Final = 10_000
#: Chunks read per query while following a step.
_PAGE: Final = 500

#: ``stopping``: a later step asked to interrupt it (``interrupt``); it ends as ``done``.
StepState = Literal["queued", "running", "stopping", "done"]


def steps_key(job_id: str) -> str:
    """The :class:`Notifier` key a session's host waits on for new steps and for close."""
    return f"{job_id}/steps"


class StepRequest(BaseModel):
    """A command for a session's VM (the body of ``POST /v1/jobs/{id}/steps``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    command: Annotated[Items[Annotated[str, AfterValidator(_check_argv_item)]], Field(min_length=1)]
    #: Standard input, base64-encoded (at most 4 MiB decoded); none: empty.
    stdin: str | None = Field(default=None, max_length=(MAX_STDIN_BYTES // 3 + 1) * 4)
    env: dict[EnvName, EnvValue] = Field(default_factory=dict)
    #: Variables whose values are masked in the output and never returned.
    secrets: dict[EnvName, EnvValue] = Field(default_factory=dict)
    #: Working directory in the guest (default: the job's workdir, else /).
    cwd: Annotated[str, AfterValidator(_check_workdir)] | None = None
    #: An account of the image (default: the job's ``user``, else root).
    user: Name | None = None
    #: Kill the command after this long (default and maximum: what is left of the job's timeout).
    timeout: Seconds | None = None
    #: Stop the step still running and skip the queued ones before this one runs.  For a
    #: client that runs one step at a time: a step still running when it sends the next
    #: belongs to a process of it that died (killed mid-step), and would hold the VM.
    interrupt: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> StepRequest:
        both = sorted(set(self.env) & set(self.secrets))
        if both:
            raise ValueError(f"{', '.join(both)} given both in env and in secrets")
        self.stdin_bytes()
        return self

    def stdin_bytes(self) -> bytes:
        """The decoded standard input (``ValueError`` if it is not base64 or too big)."""
        if self.stdin is None:
            return b""
        try:
            data = base64.b64decode(self.stdin, validate=True)
        except binascii.Error:
            raise ValueError("stdin is not valid base64") from None
        if len(data) > MAX_STDIN_BYTES:
            raise ValueError(f"stdin has {len(data)} bytes, more than {MAX_STDIN_BYTES}")
        return data


class StepView(BaseModel):
    """A step as the API returns it (secret values left out)."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    seq: int = Field(description="1, 2, ... in the order the steps were sent.")
    state: StepState
    command: tuple[str, ...]
    secret_keys: tuple[str, ...]
    cwd: str | None
    user: str | None
    timeout_s: float | None
    exit_code: int | None = Field(description="The command's exit status (None: see reason).")
    signal: int | None
    reason: str | None = Field(description="Why it ended without an exit status.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, step: JobStep, job: Job) -> StepView:
        """The view of ``step``; a step the session will never run is shown as ``done``."""
        state: StepState = step.state  # type: ignore[assignment]
        reason = step.reason
        if state != "done" and JobState(job.state).terminal:
            # The session ended (closed, cancelled, its VM or host failed) before it finished.
            state, reason = "done", f"the session ended ({job.state}: {job.reason}) first"
        return cls(
            job_id=step.job_id,
            seq=step.seq,
            state=state,
            command=tuple(step.argv),
            secret_keys=tuple(step.secret_keys),
            cwd=step.cwd,
            user=step.user,
            timeout_s=step.timeout_s,
            exit_code=step.exit_code,
            signal=step.signal,
            reason=reason,
            created_at=step.created_at,
            started_at=step.started_at,
            finished_at=step.finished_at,
        )


# --- what the API does (any host) -------------------------------------------------------------


def _session_job(session: Session, job_id: str, *, lock: bool = False) -> Job:
    query = select(Job).where(Job.id == job_id)
    job = session.scalar(query.with_for_update() if lock else query)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    if job.session_idle_s is None:
        raise UsageError(f"job {job_id} is not a session (it was submitted with a command)")
    return job


def _check_owner(job: Job, principal: str, admin: bool) -> None:
    if job.submitter != principal and not admin:
        raise Forbidden(
            f"job {job.id} was submitted by {job.submitter!r}; "
            "only its submitter or an admin may use its session"
        )


def add_step(
    session: Session, job_id: str, request: StepRequest, principal: str, admin: bool
) -> StepView:
    """Queue ``request`` as the session's next step (inside a write transaction)."""
    job = _session_job(session, job_id, lock=True)
    _check_owner(job, principal, admin)
    if JobState(job.state).terminal:
        raise Conflict(f"the session has ended ({job.state}: {job.reason})")
    if job.session_closed or job.cancel_requested:
        raise Conflict("the session is closing; it takes no more steps")
    if request.interrupt:
        _interrupt_steps(session, job_id)
    env_bytes = sum(len(k) + len(v) for k, v in {**request.env, **request.secrets}.items())
    if env_bytes > 256 << 10:
        raise TooLarge(f"the step's environment takes {env_bytes} bytes, more than 262144")
    last, waiting = session.execute(
        select(
            func.coalesce(func.max(JobStep.seq), 0),
            func.count().filter(JobStep.state == "queued"),
        ).where(JobStep.job_id == job_id)
    ).one()
    if waiting >= MAX_QUEUED_STEPS:
        raise Conflict(f"{waiting} steps are waiting already (at most {MAX_QUEUED_STEPS})")
    if last >= MAX_STEPS:
        raise Conflict(f"the session has run {last} steps, the most one session may")
    remaining = job.timeout_s
    if request.timeout is not None and request.timeout > remaining:
        raise UsageError(
            f"the step's timeout {request.timeout:g}s is above the job's {remaining:g}s"
        )
    step = JobStep(
        job_id=job_id,
        seq=int(last) + 1,
        argv=list(request.command),
        env={**request.env, **request.secrets},
        secret_keys=sorted(request.secrets),
        stdin=request.stdin_bytes() or None,
        cwd=request.cwd,
        user=request.user,
        timeout_s=request.timeout,
        state="queued",
        created_at=utcnow(),
    )
    session.add(step)
    session.flush()
    return StepView.of(step, job)


def _interrupt_steps(session: Session, job_id: str) -> None:
    """Stop the running step and skip the queued ones (for a step sent with ``interrupt``)."""
    earlier = session.scalars(
        select(JobStep).where(JobStep.job_id == job_id, JobStep.state.in_(("queued", "running")))
    ).all()
    for step in earlier:
        if step.state == "running":
            step.state = "stopping"
        else:
            step.state, step.reason = "done", "skipped: a later step interrupted it"
            step.finished_at = utcnow()


def read_step(session: Session, job_id: str, seq: int) -> StepView:
    """One step of a session."""
    job = _session_job(session, job_id)
    step = session.get(JobStep, (job_id, seq))
    if step is None:
        raise NotFound(f"job {job_id} has no step {seq}")
    return StepView.of(step, job)


def close_session(session: Session, job_id: str, principal: str, admin: bool) -> bool:
    """Mark the session closed (its host ends it once the steps sent are done).

    False when it had ended already (closing twice is fine).
    """
    job = _session_job(session, job_id, lock=True)
    _check_owner(job, principal, admin)
    if JobState(job.state).terminal:
        return False
    job.session_closed = True
    return True


def check_owner(session: Session, job_id: str, principal: str, admin: bool) -> None:
    """Raise unless ``principal`` may use the session ``job_id``."""
    _check_owner(_session_job(session, job_id), principal, admin)


def _follow_page(
    session: Session, job_id: str, seq: int, after: int
) -> tuple[StepView, list[LogChunkView]]:
    job = _session_job(session, job_id)
    step = session.get(JobStep, (job_id, seq))
    if step is None:
        raise NotFound(f"job {job_id} has no step {seq}")
    view = StepView.of(step, job)
    if step.log_from is None:
        return view, []
    start = max(after, step.log_from)
    query = (
        select(LogChunk)
        .where(
            LogChunk.job_id == job_id,
            LogChunk.seq > start,
            LogChunk.stream.in_(("stdout", "stderr")),
        )
        .order_by(LogChunk.seq)
        .limit(_PAGE)
    )
    if step.log_to is not None:
        query = query.where(LogChunk.seq <= step.log_to)
    chunks = [
        LogChunkView(seq=c.seq, stream=c.stream, data=c.data, at=c.at)  # type: ignore[arg-type]
        for c in session.scalars(query)
    ]
    return view, chunks


async def follow_step(
    db: Database, notifier: Notifier, job_id: str, seq: int, *, after: int = 0, poll: float
) -> AsyncIterator[LogChunkView | StepView]:
    """The step's output chunks (after log seq ``after``), then the step once it is done."""
    while True:
        event = notifier.event(job_id)
        view, chunks = await db.run(
            functools.partial(_follow_page, job_id=job_id, seq=seq, after=after), write=False
        )
        for chunk in chunks:
            yield chunk
            after = chunk.seq
        if len(chunks) == _PAGE:
            continue
        if view.state == "done":
            yield view
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(poll):
                await event.wait()


# --- what the host running the session does ------------------------------------------------------


def _next(session: Session, job_id: str) -> tuple[JobStep | None, bool, bool]:
    """The next queued step (detached), whether the session is closed, whether cancelled."""
    job = session.get(Job, job_id)
    if job is None:
        return None, True, True
    step = session.scalar(
        select(JobStep)
        .where(JobStep.job_id == job_id, JobStep.state == "queued")
        .order_by(JobStep.seq)
        .limit(1)
    )
    if step is not None:
        session.expunge(step)
    return step, bool(job.session_closed), bool(job.cancel_requested)


def _step_state(session: Session, job_id: str, seq: int) -> str | None:
    step = session.get(JobStep, (job_id, seq))
    return None if step is None else step.state


def _update_step(session: Session, job_id: str, seq: int, **fields: Any) -> None:
    step = session.get(JobStep, (job_id, seq))
    if step is not None:
        for name, value in fields.items():
            setattr(step, name, value)


class SessionRunner:
    """Runs one session job's steps in its VM until the session ends (on its host)."""

    def __init__(
        self,
        *,
        db: Database,
        notifier: Notifier,
        job: Job,
        vm: VM,
        writer: LogWriter,
        poll: float,
        default_cwd: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._notifier = notifier
        self._job = job
        self._vm = vm
        self._writer = writer
        self._poll = poll
        self._default_cwd = default_cwd
        self._clock = clock

    async def run(self) -> Outcome:
        """Steps until the client closes the session, it idles or runs out of time.

        Failures of the VM or of the guest agent propagate (the caller
        classifies them like any job's); the step running then is recorded
        first, so its client learns what happened.
        """
        job = self._job
        idle = job.session_idle_s or 0.0
        started = last_step = self._clock()
        await self._writer.system(
            f"session open: waiting for steps (closes after {idle:g}s without one)"
        )
        while True:
            event = self._notifier.event(steps_key(job.id))
            step, closed, _ = await self._db.run(
                functools.partial(_next, job_id=job.id), write=False, patience=JOB_PATIENCE
            )
            now = self._clock()
            if step is not None:
                left = job.timeout_s - (now - started)
                await self._run_step(step, left)
                last_step = self._clock()
                continue
            if closed:
                return Outcome(JobState.SUCCEEDED, "session closed by its client")
            if now - started >= job.timeout_s:
                reason = f"the session reached its timeout of {job.timeout_s:g}s"
                await self._writer.system(reason)
                return Outcome(JobState.TIMED_OUT, reason)
            if now - last_step >= idle:
                reason = f"no step for {idle:g}s: the session was closed"
                await self._writer.system(reason)
                return Outcome(JobState.TIMED_OUT, reason)
            wait = min(self._poll, idle - (now - last_step), job.timeout_s - (now - started))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(wait, 0.01)):
                    await event.wait()

    async def _run_step(self, step: JobStep, left: float) -> None:
        job, writer = self._job, self._writer
        secrets = [step.env[k] for k in step.secret_keys if k in step.env]
        start = await writer.checkpoint(add_secrets=secrets)
        await self._db.run(
            functools.partial(
                _update_step,
                job_id=job.id,
                seq=step.seq,
                state="running",
                log_from=start,
                started_at=utcnow(),
            ),
            patience=JOB_PATIENCE,
        )
        timeout = max(min(step.timeout_s or left, left), 0.001)
        fields: dict[str, Any] = {}
        try:
            fields = await self._until_done(asyncio.create_task(self._exec(step, timeout)), step)
        except StokerError as exc:
            fields = {"reason": f"the VM failed: {exc}"}
            raise
        except asyncio.CancelledError:
            fields = {"reason": "the session was stopped (cancelled, or its host stopping)"}
            raise
        finally:
            end = await asyncio.shield(writer.checkpoint())
            await asyncio.shield(
                self._db.run(
                    functools.partial(
                        _update_step,
                        job_id=job.id,
                        seq=step.seq,
                        state="done",
                        log_to=end,
                        finished_at=utcnow(),
                        **fields,
                    ),
                    patience=JOB_PATIENCE,
                )
            )
            self._notifier.notify(job.id)

    async def _until_done(
        self, task: asyncio.Task[dict[str, Any]], step: JobStep
    ) -> dict[str, Any]:
        """``task``'s result, unless a later step interrupts it first (it is killed then)."""
        key = steps_key(self._job.id)
        try:
            while True:
                waiter = asyncio.ensure_future(self._notifier.event(key).wait())
                try:
                    await asyncio.wait(
                        {task, waiter}, timeout=self._poll, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waiter.cancel()
                if task.done():
                    return task.result()
                state = await self._db.run(
                    functools.partial(_step_state, job_id=self._job.id, seq=step.seq),
                    write=False,
                    patience=JOB_PATIENCE,
                )
                if state == "stopping":
                    await _stop(task)
                    await self._writer.system(f"step {step.seq} interrupted by a later step")
                    return {"reason": "interrupted by a later step (its client had gone)"}
        except asyncio.CancelledError:
            await _stop(task)
            raise

    async def _exec(self, step: JobStep, timeout: float) -> dict[str, Any]:
        job, vm, writer = self._job, self._vm, self._writer
        env = {**job.env, **step.env}
        uid = gid = None
        user = step.user or job.user
        if user is not None:
            try:
                account = await guest_user(vm, user)
            except ProvisionError as exc:
                return {"reason": str(exc)}
            env = {"HOME": account.home, "USER": account.name, "LOGNAME": account.name, **env}
            uid, gid = account.uid, account.gid
        try:
            result = await vm.exec(
                list(step.argv),
                env=env,
                cwd=step.cwd or job.workdir or self._default_cwd,
                uid=uid,
                gid=gid,
                stdin=step.stdin or b"",
                stdout=functools.partial(writer.write, "stdout"),
                stderr=functools.partial(writer.write, "stderr"),
                capture=False,
                timeout=timeout,
            )
        except CommandTimeout:
            return {"reason": f"timed out after {timeout:g}s; killed"}
        return {"exit_code": result.exit_code, "signal": result.signal}


async def _stop(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` (a command in the guest: cancelling kills it there) and wait for it."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, StokerError):
        await task
