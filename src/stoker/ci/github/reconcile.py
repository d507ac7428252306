"""Supply: just-in-time runners for the queued jobs, and nothing left behind.

One pass of :class:`Reconciler` is level-triggered: it looks at what is (the
runner records, the service jobs running them, the queued workflow jobs, and
on periodic passes GitHub's runner list) and moves everything one step
towards what should be.  Passes run on a timer and after each webhook; a pass
interrupted by a crash is finished by the next one, because every runner has
a record written before anything is created:

    intent -> registered -> booting -> idle -> busy -> finished -> deregistered -> destroyed

* **intent**: the record exists; ``generate-jitconfig`` comes next.  A crash
  here leaves at most a registered runner on GitHub, found by its controller
  label and deleted by garbage collection.
* **registered**: GitHub has the runner; its service job comes next.  The JIT
  configuration is never stored by this module (it goes into the service
  job's secret environment only), so a crash here abandons the runner.
* **booting / idle / busy**: the service job (a VM from the pool, the runner
  as the image's ``runner`` user, the configuration as
  ``ACTIONS_RUNNER_INPUT_JITCONFIG``) is queued or booting, the runner is
  listening, GitHub gave it a job.  Each has a deadline (``boot_timeout``,
  ``idle_timeout``, ``job_timeout``); past it the service job is cancelled.
* **finished**: the service job ended, so its VM is destroyed; the runner is
  deleted on GitHub (404: already gone; 422: still running a job: retried).

Garbage collection runs both ways on periodic passes: GitHub runners with this
service's controller label and no live record are deleted, and service jobs
submitted by the integration with no live runner record are cancelled.
Runners wanted per pool and target = queued jobs there + the pool's
``min_idle`` runners, less the live runners not yet busy, capped by the pool's
``max`` on every live host and by ``max_create_per_pass``.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from stoker.ci.github.config import GitHubConfig, Target
from stoker.ci.github.models import GitHubJob, GitHubRunner, JobStatus, RunnerState
from stoker.errors import StokerError
from stoker.service.jobs import JobRequest, JobState
from stoker.service.models import Host, Job, utcnow

if TYPE_CHECKING:
    from stoker.ci.github.client import GitHubClient
    from stoker.service.service import Service

log = logging.getLogger("stoker.github")

#: The submitter name of runner jobs (give it a [submitters.overrides.github] policy).
SUBMITTER = "github"
#: The environment variable actions/runner reads its JIT configuration from (then unsets).
JITCONFIG_ENV = "ACTIONS_RUNNER_INPUT_JITCONFIG"
#: How the reason of a runner whose deadline passed begins.
EXPIRED = "expired: "
#: Destroyed runners and completed jobs are kept this long (``stoker github runners --all``).
KEEP_HISTORY = timedelta(days=7)
#: History entries kept per runner.
MAX_HISTORY = 20
#: A host whose heartbeat is older than this is not counted for the pools' capacity.
HOST_ALIVE = timedelta(minutes=2)
LIVE = (RunnerState.INTENT, RunnerState.REGISTERED, RunnerState.BOOTING, RunnerState.IDLE)
ACTIVE = (*LIVE, RunnerState.BUSY)
TERMINAL_JOB = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.ERRORED, JobState.CANCELLED}
)


@dataclass
class PassReport:
    """What one reconcile pass did (counts; for logs, metrics and tests)."""

    created: int = 0
    online: int = 0
    busy: int = 0
    finished: int = 0
    deregistered: int = 0
    deferred: int = 0
    expired: int = 0
    gc_runners: int = 0
    gc_jobs: int = 0
    #: Seconds from each runner's record to its runner process running (this pass's).
    online_seconds: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def corrections(self) -> int:
        """What the pass had to repair rather than just advance."""
        return self.expired + self.gc_runners + self.gc_jobs


def _move(
    runner: GitHubRunner,
    state: RunnerState,
    now: datetime,
    reason: str | None = None,
    deadline: datetime | None = None,
) -> None:
    runner.state = state.value
    runner.updated_at = now
    runner.deadline = deadline
    if reason is not None:
        runner.reason = reason[:2000]
    entry = {"state": state.value, "at": now.isoformat(), **({"reason": reason} if reason else {})}
    runner.history = [*runner.history[-(MAX_HISTORY - 1) :], entry]


class Reconciler:
    """Runs reconcile passes for one :class:`GitHubConfig` against one service."""

    def __init__(
        self,
        config: GitHubConfig,
        service: Service,
        client: GitHubClient,
        *,
        controller_label: str,
        runner_user: str = "runner",
        runner_dir: str = "/opt/actions-runner",
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config
        self.service = service
        self.client = client
        self.controller_label = controller_label
        self.runner_user = runner_user
        self.runner_dir = runner_dir.rstrip("/") or "/"
        self.clock = clock
        self._group_ids: dict[str, int] = {}

    # ------------------------------------------------------------------ a pass

    async def run_pass(self, *, collect: bool) -> PassReport:
        """One pass; ``collect`` adds garbage collection against GitHub's runner list."""
        report = PassReport()
        await self._follow_jobs(report)
        await self._expire(report)
        await self._deregister(report)
        await self._supply(report)
        if collect:
            await self._collect(report)
        return report

    # ------------------------------------------------------------------ following service jobs

    async def _follow_jobs(self, report: PassReport) -> None:
        """Runner states from their service jobs (and, for busy, from GitHub's jobs)."""
        now = self.clock()
        cfg = self.config

        def follow(session: Session) -> None:
            runners = session.scalars(
                select(GitHubRunner).where(GitHubRunner.state.in_([s.value for s in ACTIVE]))
            ).all()
            job_ids = [r.job_id for r in runners if r.job_id]
            states = (
                {
                    j.id: (JobState(j.state), j.reason)
                    for j in session.scalars(select(Job).where(Job.id.in_(job_ids)))
                }
                if job_ids
                else {}
            )
            names = [r.name for r in runners]
            taken = (
                {
                    row.runner_name: row
                    for row in session.scalars(
                        select(GitHubJob).where(
                            GitHubJob.runner_name.in_(names),
                            GitHubJob.status >= int(JobStatus.IN_PROGRESS),
                        )
                    )
                }
                if names
                else {}
            )
            for runner in runners:
                state = RunnerState(runner.state)
                job_state, reason = states.get(runner.job_id or "", (None, None))
                if state is RunnerState.BOOTING and job_state is JobState.RUNNING:
                    runner.online_at = now
                    report.online_seconds.append(
                        max(0.0, (now - runner.created_at).total_seconds())
                    )
                    _move(
                        runner,
                        RunnerState.IDLE,
                        now,
                        deadline=now + timedelta(seconds=cfg.idle_timeout),
                    )
                    report.online += 1
                    state = RunnerState.IDLE
                gh_job = taken.get(runner.name)
                if gh_job is not None and runner.github_job_id is None:
                    runner.github_job_id = gh_job.id
                    if state in (RunnerState.BOOTING, RunnerState.IDLE):
                        _move(
                            runner,
                            RunnerState.BUSY,
                            now,
                            f"runs {gh_job.repository} job {gh_job.id}",
                            deadline=now + timedelta(seconds=cfg.job_timeout),
                        )
                        report.busy += 1
                if job_state in TERMINAL_JOB:
                    why = f"its job {runner.job_id} ended {job_state}"
                    if runner.reason and runner.reason.startswith(EXPIRED):
                        why, reason = runner.reason, why
                    _move(runner, RunnerState.FINISHED, now, f"{why}: {reason}" if reason else why)
                    report.finished += 1

        await self.service.db.run(follow)

    # ------------------------------------------------------------------ deadlines

    async def _expire(self, report: PassReport) -> None:
        """Runners past their deadline: cancel their job, or give them up."""
        now = self.clock()

        def expired(session: Session) -> list[tuple[str, str | None]]:
            runners = session.scalars(
                select(GitHubRunner).where(
                    GitHubRunner.state.in_([s.value for s in ACTIVE]),
                    GitHubRunner.deadline.is_not(None),
                    GitHubRunner.deadline < now,
                )
            ).all()
            cancel: list[tuple[str, str | None]] = []
            for runner in runners:
                state = RunnerState(runner.state)
                why = {
                    RunnerState.INTENT: "never registered (stoker stopped while registering)",
                    RunnerState.REGISTERED: "registered but never started",
                    RunnerState.BOOTING: "did not come online within boot_timeout",
                    RunnerState.IDLE: "got no job within idle_timeout",
                    RunnerState.BUSY: "ran its job longer than job_timeout",
                }[state]
                report.expired += 1
                if runner.job_id is None:
                    _move(runner, RunnerState.FINISHED, now, why)
                    report.finished += 1
                else:
                    runner.reason = f"{EXPIRED}{why}"
                    # Checked again next pass; the job's end moves it to finished.
                    runner.deadline = now + timedelta(seconds=60)
                    cancel.append((runner.name, runner.job_id))
            return cancel

        for name, job_id in await self.service.db.run(expired):
            assert job_id is not None
            log.warning("github runner %s: past its deadline; cancelling job %s", name, job_id)
            # It may have ended meanwhile: the next pass sees that.
            with contextlib.suppress(StokerError):
                await self.service.cancel(job_id)

    # ------------------------------------------------------------------ deregistration

    async def _deregister(self, report: PassReport) -> None:
        """Delete finished runners on GitHub; forget them once nothing is left."""
        now = self.clock()

        def finished(session: Session) -> list[tuple[str, str, str, int | None]]:
            rows = session.scalars(
                select(GitHubRunner).where(
                    GitHubRunner.state.in_(
                        [RunnerState.FINISHED.value, RunnerState.DEREGISTERED.value]
                    )
                )
            ).all()
            return [(r.name, r.state, r.target, r.runner_id) for r in rows]

        for name, state, target_name, runner_id in await self.service.db.run(finished):
            outcome = "gone"
            if state == RunnerState.FINISHED.value and runner_id is not None:
                target = self._target(target_name)
                try:
                    outcome = (
                        await self.client.delete_runner(target, runner_id)
                        if target is not None
                        else "gone"
                    )
                except StokerError as exc:
                    report.errors.append(f"deleting runner {name}: {exc}")
                    continue
            if outcome == "busy":
                report.deferred += 1
                continue

            def advance(session: Session, name: str = name) -> None:
                runner = session.get(GitHubRunner, name, with_for_update=True)
                if runner is None:
                    return
                if runner.state == RunnerState.FINISHED.value:
                    _move(runner, RunnerState.DEREGISTERED, now)
                    report.deregistered += 1
                job = session.get(Job, runner.job_id) if runner.job_id else None
                if job is None or JobState(job.state) in TERMINAL_JOB:
                    # The service destroys a job's VM before the job ends: nothing is left.
                    _move(runner, RunnerState.DESTROYED, now)

            await self.service.db.run(advance)

    # ------------------------------------------------------------------ supply

    async def _supply(self, report: PassReport) -> None:
        """Create the runners the queued jobs (and min_idle) want."""
        now = self.clock()
        cfg = self.config

        def count(
            session: Session,
        ) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int], dict[str, int], int]:
            queued: dict[tuple[str, str], int] = {}
            for pool, repository in session.execute(
                select(GitHubJob.pool, GitHubJob.repository).where(
                    GitHubJob.status == int(JobStatus.QUEUED)
                )
            ):
                target = cfg.target_for(repository)
                if target is not None and pool in cfg.pools:
                    key = (pool, target.name)
                    queued[key] = queued.get(key, 0) + 1
            waiting: dict[tuple[str, str], int] = {}
            active: dict[str, int] = {}
            for pool, target_name, state in session.execute(
                select(GitHubRunner.pool, GitHubRunner.target, GitHubRunner.state).where(
                    GitHubRunner.state.in_([s.value for s in ACTIVE])
                )
            ):
                active[pool] = active.get(pool, 0) + 1
                if state != RunnerState.BUSY.value:
                    waiting[(pool, target_name)] = waiting.get((pool, target_name), 0) + 1
            hosts = len(
                session.scalars(
                    select(Host.name).where(
                        Host.status == "running", Host.heartbeat_at >= now - HOST_ALIVE
                    )
                ).all()
            )
            return queued, waiting, active, max(hosts, 1)

        queued, waiting, active, hosts = await self.service.db.run(count, write=False)
        wanted: dict[tuple[str, str], int] = dict(queued)
        for pool, labels in cfg.pools.items():
            if labels.min_idle:
                key = (pool, cfg.targets[0].name)
                wanted[key] = wanted.get(key, 0) + labels.min_idle
        for (pool, target_name), want in sorted(wanted.items()):
            pool_config = self.service.config.pools.get(pool)
            target = self._target(target_name)
            if pool_config is None or target is None:
                continue
            room = pool_config.max * hosts - active.get(pool, 0)
            need = min(want - waiting.get((pool, target_name), 0), room, cfg.max_create_per_pass)
            for _ in range(max(0, need)):
                if not await self._create(pool, target, report):
                    break
                active[pool] = active.get(pool, 0) + 1

    async def _create(self, pool: str, target: Target, report: PassReport) -> bool:
        """One runner, record first; False when GitHub or the service refused."""
        now = self.clock()
        cfg = self.config
        # GitHub allows 64 characters; the VM's and the record's share the random part.
        name = f"stoker-{pool[:40]}-{uuid.uuid4().hex[:12]}"
        record = GitHubRunner(
            name=name,
            pool=pool,
            target=target.name,
            target_kind=target.kind,
            state=RunnerState.INTENT.value,
            created_at=now,
            updated_at=now,
            deadline=now + timedelta(seconds=cfg.boot_timeout),
            history=[{"state": RunnerState.INTENT.value, "at": now.isoformat()}],
        )
        await self.service.db.run(lambda s: s.add(record))
        labels = [*cfg.pools[pool].labels, self.controller_label, f"stoker-pool-{pool}"[:100]]
        try:
            group = await self._group_id(target)
            jit = await self.client.generate_jitconfig(
                target, name=name, labels=labels, runner_group_id=group
            )
        except StokerError as exc:
            await self._give_up(name, f"registering on GitHub failed: {exc}")
            report.errors.append(f"registering {name}: {exc}")
            return False
        await self._update(name, RunnerState.REGISTERED, runner_id=jit.runner.id)
        request = JobRequest(
            command=(f"{self.runner_dir}/run.sh",),
            pool=pool,
            secrets={JITCONFIG_ENV: jit.encoded_jit_config},
            env={"STOKER_GITHUB_RUNNER": name},
            user=self.runner_user,
            workdir=self.runner_dir,
            # A JIT configuration registers once: a second attempt could never connect.
            retries=0,
        )
        try:
            view = await self.service.submit(request, SUBMITTER)
        except StokerError as exc:
            await self._give_up(name, f"submitting its job failed: {exc}")
            report.errors.append(f"submitting {name}: {exc}")
            return False
        await self._update(name, RunnerState.BOOTING, job_id=view.id)
        report.created += 1
        log.info(
            "github runner %s for pool %s on %s: job %s",
            name,
            pool,
            target.name,
            view.id,
            extra={"job": view.id, "pool": pool},
        )
        return True

    async def _update(self, name: str, state: RunnerState, **values: Any) -> None:
        now = self.clock()

        def write(session: Session) -> None:
            runner = session.get(GitHubRunner, name, with_for_update=True)
            if runner is None:
                return
            deadline = runner.deadline
            for key, value in values.items():
                setattr(runner, key, value)
            _move(runner, state, now, deadline=deadline)

        await self.service.db.run(write)

    async def _give_up(self, name: str, why: str) -> None:
        now = self.clock()

        def write(session: Session) -> None:
            runner = session.get(GitHubRunner, name, with_for_update=True)
            if runner is not None:
                _move(runner, RunnerState.FINISHED, now, why)

        await self.service.db.run(write)

    # ------------------------------------------------------------------ garbage collection

    async def _collect(self, report: PassReport) -> None:
        """GitHub runners with our label and no live record; runner jobs with no runner."""

        def read(session: Session) -> dict[str, str]:
            return {
                r.name: r.state
                for r in session.scalars(
                    select(GitHubRunner).where(GitHubRunner.state != RunnerState.DESTROYED.value)
                )
            }

        live = await self.service.db.run(read, write=False)
        label = self.controller_label.lower()
        for target in self.config.targets:
            try:
                runners = await self.client.list_runners(target)
            except StokerError as exc:
                report.errors.append(f"listing runners of {target.name}: {exc}")
                continue
            for runner in runners:
                if label not in {x.lower() for x in runner.labels}:
                    continue  # not ours: never touched
                state = live.get(runner.name)
                if state is not None and RunnerState(state) in ACTIVE:
                    continue
                if state in (RunnerState.FINISHED.value, RunnerState.DEREGISTERED.value):
                    continue  # _deregister handles it
                try:
                    outcome = await self.client.delete_runner(target, runner.id)
                except StokerError as exc:
                    report.errors.append(f"deleting orphan runner {runner.name}: {exc}")
                    continue
                if outcome != "busy":
                    report.gc_runners += 1
                    log.warning("github: deleted orphan runner %s on %s", runner.name, target.name)

        await self.service.db.run(self._prune)

        def orphan_jobs(session: Session) -> list[str]:
            owned = {
                r.job_id
                for r in session.scalars(
                    select(GitHubRunner).where(GitHubRunner.state.in_([s.value for s in ACTIVE]))
                )
                if r.job_id
            }
            jobs = session.scalars(
                select(Job.id).where(
                    Job.submitter == SUBMITTER,
                    Job.state.in_([s.value for s in JobState if not s.terminal]),
                    Job.cancel_requested.is_(False),
                )
            ).all()
            return [j for j in jobs if j not in owned]

        for job_id in await self.service.db.run(orphan_jobs, write=False):
            try:
                await self.service.cancel(job_id)
                report.gc_jobs += 1
                log.warning("github: cancelled runner job %s: no live runner record", job_id)
            except StokerError:
                pass

    def _prune(self, session: Session) -> None:
        """Forget destroyed runners and completed jobs after :data:`KEEP_HISTORY`."""
        before = self.clock() - KEEP_HISTORY
        session.execute(
            delete(GitHubRunner).where(
                GitHubRunner.state == RunnerState.DESTROYED.value, GitHubRunner.updated_at < before
            )
        )
        session.execute(
            delete(GitHubJob).where(
                GitHubJob.status == int(JobStatus.COMPLETED), GitHubJob.updated_at < before
            )
        )

    # ------------------------------------------------------------------ helpers

    def _target(self, name: str) -> Target | None:
        for target in self.config.targets:
            if target.name == name:
                return target
        return None

    async def _group_id(self, target: Target) -> int:
        if target.kind == "repository":
            return 1
        if target.name not in self._group_ids:
            self._group_ids[target.name] = await self.client.runner_group_id(
                target, target.runner_group
            )
        return self._group_ids[target.name]
