"""The VM supervisor: runs the jobs this host claims, keeps warm pools, heals.

One asyncio task tree (no process per VM)::

    Supervisor._run  (TaskGroup)
    ├── schedule loop    claim jobs (scheduler.plan + db.claim_jobs), dispatch, refill pools
    ├── heartbeat loop   renew leases and Host.heartbeat_at, notice remote cancels,
    │                    sweep jobs of silent hosts, drop dead idle VMs, publish gauges
    ├── warm boot tasks  one per VM booting for a pool (:class:`~stoker.service.pools.Fleet`)
    └── job tasks        one per claimed job: VM (warm or cold) -> source in -> command,
                         output into bounded LogChunks -> artifacts out -> VM destroyed
                         (its guest's connection records into the job's log and summary)

A job task never raises: every outcome becomes a transition.  Failures of the
user's command or input end the job (``failed``, ``timed_out``); failures of
the infrastructure (the VMM crashed, the boot failed, the agent channel broke)
send it back to the queue until ``retry_limit``, then ``errored``.  Stopping a
job (cancel, lease lost, shutdown) is an event raced against its work, never a
swallowed cancellation.  Every transition commits before the side effect it
announces; a job whose host vanished is recovered by whichever host sweeps
first, and by this host itself on restart (:meth:`Supervisor.start`).

Database outages (see :mod:`stoker.service.db`): the loops skip a round and
try again; a job's own writes wait up to :data:`~stoker.service.db.JOB_PATIENCE`
for the database and its output waits in memory (bounded), so running jobs go
on through a restart of PostgreSQL.  Leases after an outage follow one rule:

* an owner keeps running a job it could not renew; it stops it only when the
  database shows the job is no longer its claim (another host, or another
  attempt: the attempt number fences every write of the old claim);
* a sweeper takes a job over only when its lease expired **and** the sweeper's
  own database calls have all worked for a full lease period, so after an
  outage every live owner (heartbeat at most half a lease) renews first.

Capacity: every VM that exists or is being started holds its vCPUs and memory
in this host's ledger (:class:`~stoker.service.pools.Fleet`), from the moment
it is planned until it is destroyed; :mod:`stoker.service.scheduler` only
plans within what the ledger has free.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeGuard

from sqlalchemy import delete
from sqlalchemy.orm import Session

from stoker.backends.base import Backend
from stoker.errors import (
    GuestProtocolError,
    InfrastructureError,
    JobKernelPanic,
    UsageError,
)
from stoker.net.proxy import ConnectionRecord
from stoker.service.adoption import Adopted, adopt_jobs
from stoker.service.command import resume_command, run_command
from stoker.service.config import ServiceConfig
from stoker.service.db import (
    JOB_PATIENCE,
    Database,
    DatabaseError,
    claim_jobs,
    existing_job_ids,
    forget_vms,
    log_end,
    queue_depth,
    recover_orphans,
    register_host,
)
from stoker.service.files import (
    JobFiles,
    JobInputError,
    fetch_source,
    sweep_orphan_files,
)
from stoker.service.fleet import merge_vm_record
from stoker.service.heartbeat import Heartbeats
from stoker.service.jobs import ACTIVE, TERMINAL, JobState, redact, secret_values, transition
from stoker.service.jobviews import JobView
from stoker.service.logs import LogWriter, Notifier
from stoker.service.models import Artifact, Host, Job, VMRecord, utcnow
from stoker.service.network import JobConnections
from stoker.service.pools import GUEST_DIR, Fleet, WarmPool, kill_stray_vmms, vm_record
from stoker.service.runs import (
    CancelRequested,
    JobRun,
    LeaseLost,
    Outcome,
    VMKind,
    classify,
    headline,
    panic_outcome,
    stop_outcome,
)
from stoker.service.scheduler import (
    Assignment,
    Candidate,
    Capacity,
    Plan,
    can_place_any,
    plan,
    slots,
)
from stoker.service.sessions import SessionRunner
from stoker.vmfiles import sweep_stale_workdirs

if TYPE_CHECKING:
    from stoker.service.service import Observer

log = logging.getLogger(__name__)

#: Scheduling passes are at least this far apart (a pass claims for every free slot).
MIN_PASS_INTERVAL = 0.02


# --- the supervisor -------------------------------------------------------------------------------


class Supervisor(Heartbeats):
    """Runs this host's share of the jobs (see the module docstring)."""

    def __init__(
        self,
        config: ServiceConfig,
        db: Database,
        *,
        backend: Backend,
        observer: Observer,
        notifier: Notifier,
        incarnation: str,
        version: str,
    ) -> None:
        self.config = config
        self.db = db
        self.backend = backend
        self.observer = observer
        self.notifier = notifier
        self.incarnation = incarnation
        self.version = version
        self.host = config.host.name
        self.dirs = config.dirs
        self.fleet = Fleet(
            config,
            db,
            backend,
            observe=self._observe,
            wake=self.wake,
            changed=self._publish_vms,
            on_connection=self._on_connection,
        )
        self.jobs: dict[str, JobRun] = {}
        #: Jobs taken over on start, run once the task group exists.
        self._adopted: list[JobRun] = []
        self.stopping = False
        #: Another process heartbeats under this host name: claim nothing more.
        self.displaced = False
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._main: asyncio.Task[None] | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._empty = config.state_dir / "empty"
        self._log = log.getChild(self.host)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Reconcile with what a previous life of this host left, then start working."""
        await asyncio.to_thread(self._empty.mkdir, parents=True, exist_ok=True)
        await self.reconcile()
        started = asyncio.Event()
        self._main = asyncio.get_running_loop().create_task(
            self._run(started), name=f"stoker-supervisor-{self.host}"
        )
        await started.wait()

    async def _run(self, started: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self.fleet.tg = tg
                for run in self._adopted:
                    run.task = tg.create_task(self._run_job(run), name=f"stoker-job-{run.job.id}")
                self._adopted.clear()
                self._loops = [
                    tg.create_task(self._schedule_loop(), name="stoker-schedule"),
                    tg.create_task(self._heartbeat_loop(), name="stoker-heartbeat"),
                ]
                started.set()
                await self._stopped.wait()
                for task in self._loops:
                    task.cancel()
        finally:
            started.set()

    async def stop(self, grace: float) -> None:
        """Stop claiming, let running jobs finish for ``grace`` seconds, error the rest."""
        if self.stopping:
            if self._main is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(self._main)
            return
        self.stopping = True
        self._wake.set()
        self._log.info("stopping: %d jobs running, grace %.0fs", len(self.jobs), grace)
        self.fleet.drain()
        if self.config.on_stop == "hand-over":
            for run in self.jobs.values():
                if run.resume_ready() and run.vm is not None:
                    # Its command runs on; the next process adopts the VM.
                    run.stop_reason = "hand_over"
                    run.vm.abandon()
        tasks = [r.task for r in self.jobs.values() if r.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:
                self._log.warning(
                    "%d jobs still running after %.0fs: failing them", len(pending), grace
                )
            for run in list(self.jobs.values()):
                run.stop("shutdown")
            # Writes waiting for a database that is away give up: the next life reconciles.
            self.db.stop_waiting()
            await asyncio.wait(pending or tasks, timeout=120)
        self._stopped.set()
        if self._main is not None:
            await self._main
        now = utcnow()

        def mark(session: Session) -> None:
            row = session.get(Host, self.host)
            if row is not None and row.incarnation == self.incarnation:
                row.status = "stopped"
                row.heartbeat_at = now

        with contextlib.suppress(Exception):
            await self.db.run(mark)
        self._log.info("stopped")

    def wake(self) -> None:
        """Look for work now (a job was submitted or a slot freed up)."""
        self._wake.set()

    # ------------------------------------------------------------------ reconcile

    async def reconcile(self) -> None:
        """Make the database and this machine agree after a previous life ended.

        Jobs whose VMs survived the previous process run on (:mod:`adoption`).
        The other jobs it had claimed go back to the queue (or to ``errored``
        at the retry limit, ``cancelled`` if cancelling); its other VM records
        are dropped; stale VM work directories are removed, and any VMM still
        running from this service's runtime directory for a dead owner is killed.
        """
        taken = await adopt_jobs(self.db, self.config, self.fleet.backend, self.host)
        now = utcnow()
        why = f"stoker serve on {self.host} restarted; the job's VM ended with the old process"

        def fix(session: Session) -> list[tuple[JobView, str, JobState]]:
            config = self.config.host
            register_host(
                session,
                name=self.host,
                capacity=(config.cpus, config.memory_mb, config.overcommit),
                version=self.version,
                incarnation=self.incarnation,
                now=now,
            )
            keep = [a.job.id for a in taken]
            changes = recover_orphans(
                session, host=self.host, why=why, retry_limit=self.config.retry_limit, keep=keep
            )
            forget_vms(session, host=self.host, keep=[a.vm.name for a in taken])
            return changes

        changes = await self.db.run(fix)
        for found in taken:
            self._take_over(found)
        for view, source, target in changes:
            self._log.warning(
                "job %s: %s -> %s after a restart",
                view.id,
                source,
                target,
                extra={"job": view.id, "state": target.value, "host": self.host},
            )
            self._observe_transition(view, source, target)
        killed = await asyncio.to_thread(kill_stray_vmms, self.dirs.runtime)
        for pid in killed:
            self._log.warning("killed VMM pid %d left over from a previous run", pid)
        if self.dirs.runtime.exists():
            await asyncio.to_thread(sweep_stale_workdirs, self.dirs.runtime)
        # Uploads and job directories a crash left without a job row.
        existing = functools.partial(self.db.call, write=False)
        await asyncio.to_thread(
            sweep_orphan_files,
            self.config.jobs_dir,
            lambda ids: existing(functools.partial(existing_job_ids, ids=ids)),
        )

    def _take_over(self, found: Adopted) -> None:
        """Run a job adopted from the previous life on as this host's (see :mod:`adoption`)."""
        pool = self.pools[found.pool]
        self.fleet.reserve(pool.config.cpus, pool.config.memory)
        pool.busy += 1
        run = JobRun(found.job, found.pool, vm=found.vm, resume=found.point)
        self.jobs[found.job.id] = run
        self._adopted.append(run)
        record = vm_record(found.vm, pool, found.job.id, "busy")
        assert record is not None  # there is a VM
        self.fleet.spawn(self.fleet.record_vm(record))
        self._log.warning(
            "job %s: took over its VM %s from the previous process; the command runs on",
            found.job.id,
            found.vm.name,
            extra={"job": found.job.id, "vm": found.vm.name, "host": self.host},
        )

    # ------------------------------------------------------------------ capacity

    @property
    def pools(self) -> dict[str, WarmPool]:
        """This host's pools, by name."""
        return self.fleet.pools

    @property
    def used(self) -> Capacity:
        """What this host's VMs hold (see :class:`~stoker.service.pools.Fleet`)."""
        return self.fleet.used

    def free(self) -> Capacity:
        """What the ledger has not handed out."""
        return self.fleet.free()

    # ------------------------------------------------------------------ scheduling

    def _limit_of(self, submitter: str) -> int:
        return self.config.submitters.policy(submitter).max_concurrent

    async def _schedule_loop(self) -> None:
        while not self.stopping:
            self._wake.clear()
            started = time.monotonic()
            try:
                await self.schedule_once()
            except DatabaseError:
                # Logged once by the database's health; wait for its next probe.
                await asyncio.sleep(max(self.db.health.retry_in(), self.config.poll_seconds))
            except Exception:
                self._log.exception("scheduling pass failed")
                await asyncio.sleep(1.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.poll_seconds):
                    await self._wake.wait()
            # Wake-ups that come in quick succession (jobs ending) share one pass.
            await asyncio.sleep(max(0.0, MIN_PASS_INTERVAL - (time.monotonic() - started)))

    async def schedule_once(self) -> list[str]:
        """One pass: claim what fits, start it, refill warm pools; return the claimed ids."""
        if self.stopping or self.displaced:
            return []
        self.fleet.drop_dead_idle()
        states = self.fleet.pool_states()
        free = self.free()
        decided: list[Plan] = []
        claimed: list[Job] = []
        if can_place_any(states, free):

            def choose(candidates: Sequence[Candidate], running: dict[str, int]) -> list[str]:
                result = plan(
                    candidates,
                    running=running,
                    limit_of=self._limit_of,
                    pools=states,
                    free=free,
                )
                decided[:] = [result]
                return [a.job_id for a in result.assignments]

            claimed = await self.db.run(
                functools.partial(
                    claim_jobs,
                    host=self.host,
                    pools=list(self.pools),
                    choose=choose,
                    lease_seconds=self.config.lease_seconds,
                    per_queue=slots(states, free),
                    exclude=list(self.jobs),
                )
            )
        decision = decided[0] if decided else None
        if claimed and decision is not None:
            by_id = {a.job_id: a for a in decision.assignments}
            for job in claimed:
                self._observe_transition(JobView.of(job), JobState.QUEUED, JobState.ASSIGNED)
                self._dispatch(job, by_id[job.id])
        self.fleet.refill(hold=decision.waiting_for_capacity if decision else False)
        self._publish_vms()
        return [job.id for job in claimed]

    def _dispatch(self, job: Job, assignment: Assignment) -> None:
        assert self._tg is not None and job.pool is not None
        pool = self.pools[job.pool]
        run = JobRun(job=job, pool=pool.name)
        if assignment.warm:
            run.vm = self.fleet.take_idle(pool, job=job.id)
        if run.vm is None:
            self.fleet.make_room(run, pool, assignment.evict)
        pool.busy += 1
        self.jobs[job.id] = run
        run.task = self._tg.create_task(self._run_job(run), name=f"stoker-job-{job.id}")

    # ------------------------------------------------------------------ running a job

    async def _run_job(self, run: JobRun) -> None:
        writer = LogWriter(
            self.db,
            run.job.id,
            limit=self.config.limits.max_log_bytes,
            secrets=secret_values(run.job),
            on_flush=self.notifier.notify,
            owner=(self.host, run.job.attempt),
        )
        run.connections = JobConnections(writer, secrets=secret_values(run.job))
        outcome: Outcome | None = None
        try:
            loop = asyncio.get_running_loop()
            work = loop.create_task(self._execute(run, writer))
            stopper = loop.create_task(run.stop_event.wait())
            try:
                await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                if not work.done():
                    work.cancel()
                await asyncio.wait({work})
            if not work.cancelled():
                exc = work.exception()
                outcome = work.result() if exc is None else self._internal(exc)
            else:
                outcome = stop_outcome(run.stop_reason or "shutdown", self.host)
        except Exception as exc:
            outcome = self._internal(exc)
        finally:
            await asyncio.shield(self._finish(run, writer, outcome))

    def _internal(self, exc: BaseException) -> Outcome:
        self._log.error("internal error running a job", exc_info=exc)
        return Outcome(None, f"internal error: {type(exc).__name__}: {exc}", failure="internal")

    async def _execute(self, run: JobRun, writer: LogWriter) -> Outcome:
        """One attempt of a job: VM, source in, command, artifacts out (never raises)."""
        job = run.job
        pool = self.pools[run.pool]
        secrets_ = secret_values(job)
        phase = "preparing the job"

        def enter(name: str) -> None:
            nonlocal phase
            phase = name

        try:
            for victim in run.evicted:
                await self.fleet.destroy(victim)
            run.evicted.clear()
            self.fleet.settle_evicted(run)
            files = JobFiles.of(self.config.jobs_dir, job.id)
            if run.resume is not None and run.vm is not None:
                phase = "running the command"
                writer.begin(*await self.db.run(functools.partial(log_end, job_id=job.id)))
                await writer.system(
                    f"stoker serve on {self.host} restarted; took over VM {run.vm.name}: "
                    "the command runs on"
                )
                return await resume_command(
                    job,
                    run.vm,
                    writer,
                    files,
                    self.config.limits.max_artifact_bytes,
                    enter,
                    run.resume,
                )
            kind = VMKind.WARM if run.vm is not None else VMKind.COLD
            # A git source is fetched after the job is booting; anything else is ready now.
            source = files.ready_source(job, self._empty)
            if run.vm is None and source is not None:
                run.vm = self.fleet.new_vm(pool, seed=source, job=job.id)
            run.job, log_state = await self._transition(
                run,
                JobState.BOOTING,
                fields={"vm_kind": kind.value, "vm_name": run.vm.name if run.vm else None},
                record=vm_record(run.vm, pool, job.id, "busy" if run.vm else "booting"),
                log_state=True,
            )
            assert log_state is not None
            writer.begin(*log_state)
            if job.artifacts:
                await asyncio.to_thread(files.reset_artifacts)
            if source is None:
                phase = "fetching the git source"
                source = await fetch_source(job, files, self.config)
                run.vm = self.fleet.new_vm(pool, seed=source, job=job.id)
                await self.fleet.record_vm(
                    VMRecord(name=run.vm.name, pool=pool.name, job_id=job.id, state="booting")
                )
            vm = run.vm
            assert vm is not None
            await writer.system(
                f"attempt {job.attempt + 1} on {self.host}: {kind.value} VM {vm.name} "
                f"(pool {pool.name}: {pool.config.cpus} vCPUs, {pool.config.memory} MiB)"
            )
            t0 = time.monotonic()
            if kind is VMKind.COLD:
                phase = "booting the VM"
                await vm.start()
                self._observe("boot", "cold", time.monotonic() - t0)
                self.fleet.snapshot_later(pool, vm)
            else:
                phase = "copying the source in"
                await vm.put(source, GUEST_DIR)
            run.job, _ = await self._transition(
                run,
                JobState.RUNNING,
                fields={"vm_name": vm.name, "network": vm.network.summary()},
                record=vm_record(vm, pool, job.id, "busy"),
            )
            phase = "running the command"
            if job.session_idle_s is not None:
                return await SessionRunner(
                    db=self.db,
                    notifier=self.notifier,
                    job=job,
                    vm=vm,
                    writer=writer,
                    poll=self.config.poll_seconds,
                    default_cwd=GUEST_DIR,
                ).run()
            return await run_command(
                job,
                vm,
                writer,
                files,
                self.config.limits.max_artifact_bytes,
                enter,
            )
        except LeaseLost:
            return Outcome(None, "this host lost the job's lease", lost=True)
        except CancelRequested:
            return Outcome(JobState.CANCELLED, "cancelled on request")
        except JobInputError as exc:
            reason = redact(str(exc), secrets_)
            await self._say(writer, reason)
            return Outcome(JobState.FAILED, reason)
        except JobKernelPanic as exc:
            # The command (or a session's step) panicked the guest: its failure, no retry.
            reason = redact(headline(exc), secrets_)
            await self._say(writer, reason)
            await self._vm_failed(run, exc, secrets_)
            return panic_outcome(reason)
        except GuestProtocolError as exc:
            if phase in ("running the command", "copying artifacts out"):
                # The guest is the job's own code: it broke the protocol, the job fails.
                reason = redact(f"{phase}: the guest misbehaved: {headline(exc)}", secrets_)
                await self._say(writer, reason)
                return Outcome(JobState.FAILED, reason)
            return await self._infra(run, writer, phase, exc, secrets_)
        except UsageError as exc:
            # A problem of this host's setup (an image that is not built): retrying will not help.
            reason = redact(f"{phase}: {headline(exc)}", secrets_)
            await self._say(writer, reason + (f" ({exc.hint})" if exc.hint else ""))
            return Outcome(None, reason, failure="infrastructure", retry=False)
        except InfrastructureError as exc:
            if run.stop_reason == "hand_over":
                return Outcome(None, "handed over to the next process", lost=True)
            return await self._infra(run, writer, phase, exc, secrets_)

    async def _infra(
        self, run: JobRun, writer: LogWriter, phase: str, exc: BaseException, secrets_: list[str]
    ) -> Outcome:
        await self._vm_failed(run, exc, secrets_)
        reason = redact(f"{phase}: {headline(exc)}", secrets_)
        self._log.warning(
            "infrastructure failure (%s): %s",
            phase,
            reason,
            extra={"job": writer.job_id, "host": self.host},
        )
        await self._say(writer, redact(f"{phase}: {exc}", secrets_))
        return Outcome(None, reason, failure=classify(exc))

    async def _vm_failed(self, run: JobRun, exc: BaseException, secrets_: list[str]) -> None:
        if run.vm is not None:
            await self.fleet.vm_failed(
                run.vm.name, run.pool, exc, job_id=run.job.id, secrets=secrets_
            )

    async def _say(self, writer: LogWriter, text: str) -> None:
        with contextlib.suppress(Exception):
            await writer.system(text)

    async def _transition(
        self,
        run: JobRun,
        to: JobState,
        *,
        reason: str | None = None,
        fields: Mapping[str, object] | None = None,
        record: VMRecord | None = None,
        log_state: bool = False,
    ) -> tuple[Job, tuple[int, int, bool] | None]:
        """Move a job this host runs; raise :class:`LeaseLost` if it is not ours any more.

        With ``log_state``, also return where its stored output ends (last
        seq, output bytes, truncated) for the :class:`LogWriter`.
        """
        now = utcnow()
        job_id = run.job.id
        attempt = run.job.attempt
        lease = timedelta(seconds=self.config.lease_seconds)
        if record is not None:
            record.host = self.host
            record.created_at = now

        def move(session: Session) -> tuple[str, Job, tuple[int, int, bool] | None]:
            job = session.get(Job, job_id, with_for_update=True)
            if not self._holds(job, attempt):
                raise LeaseLost(job_id)
            if job.cancel_requested and to is not JobState.CANCELLED:
                raise CancelRequested(job_id)
            source = job.state
            if source != to.value:  # (equal: a retry after a commit whose answer was lost)
                transition(session, job, to, reason=reason, host=self.host, now=now)
            for key, value in (fields or {}).items():
                setattr(job, key, value)
            if to in ACTIVE:
                job.lease_until = now + lease
            if record is not None:
                merge_vm_record(session, record)
            return source, job, log_end(session, job_id) if log_state else None

        source, job, logs = await self.db.run(move, patience=JOB_PATIENCE)
        self._observe_transition(JobView.of(job), source, to)
        self.notifier.notify(job_id)
        return job, logs

    async def _finish(self, run: JobRun, writer: LogWriter, outcome: Outcome | None) -> None:
        """Destroy the VM, then record the outcome with the last output; never raises."""
        job = run.job
        pool = self.pools[run.pool]
        if run.stop_reason == "hand_over":
            with contextlib.suppress(Exception):  # else the resume point stored last is used
                await writer.hand_over()
            self._log.info("job %s: left running in VM %s for the next process", job.id, run.vm)
            self.jobs.pop(job.id, None)
            return
        try:
            if run.vm is not None:
                await run.vm.destroy()
            for victim in run.evicted:
                await victim.destroy()
        except Exception as exc:
            self._log.error("destroying the VM of job %s failed: %s", job.id, exc)
        finally:
            self.fleet.settle_evicted(run)
            self.fleet.release(pool.config.cpus, pool.config.memory)
            pool.busy -= 1
        try:
            # After the destruction: the proxy's last connections have ended and been counted.
            network = run.connections.finish(run.vm) if run.connections is not None else None
            if outcome is not None and not outcome.lost and outcome.state is None:
                await self._say(writer, f"infrastructure failure: {outcome.reason}")
            await writer.close()
            if outcome is None or outcome.lost:
                # Another host may own the job now: its log and state are not ours to write.
                self._log.warning("job %s: stopped without a result (%s)", job.id, run.stop_reason)
                if run.vm is not None:
                    await self.fleet.forget_vm(run.vm.name)
            else:
                await self._record_outcome(run, outcome, writer, network)
        except Exception as exc:
            # The lease runs out and a sweeper (maybe ours) recovers the job.
            self._log.error("recording the outcome of job %s failed: %s", job.id, exc)
        finally:
            self.jobs.pop(job.id, None)
            self.notifier.notify(job.id)
            self._publish_vms()
            self._wake.set()

    async def _record_outcome(
        self, run: JobRun, outcome: Outcome, writer: LogWriter, network: dict[str, Any] | None
    ) -> None:
        now = utcnow()
        job_id = run.job.id
        vm_name = run.vm.name if run.vm is not None else None
        retry_limit = self.config.retry_limit
        if outcome.failure is not None:
            self._observe("infrastructure_failure", outcome.failure)

        def record(session: Session) -> tuple[str, Job, JobState] | None:
            job = session.get(Job, job_id, with_for_update=True)
            if not self._holds(job, run.job.attempt):
                return None
            source = job.state
            target, reason = outcome.target(job, retry_limit)
            writer.store_rest(session, job)
            transition(session, job, target, reason=reason, host=self.host, now=now)
            if network is not None:
                job.network_summary = network
            if target in TERMINAL:
                job.exit_code = outcome.exit_code
                job.signal = outcome.signal
                job.cause = outcome.recorded_cause
                session.execute(delete(Artifact).where(Artifact.job_id == job_id))
                session.add_all(
                    Artifact(job_id=job_id, name=a.name, size=a.size, sha256=a.sha256, path=a.path)
                    for a in outcome.artifacts
                )
            if vm_name is not None:
                session.execute(delete(VMRecord).where(VMRecord.name == vm_name))
            return source, job, target

        done = await self.db.run(record, patience=JOB_PATIENCE)
        if done is None:
            self._log.warning(
                "job %s was taken over by another host; its result is dropped", job_id
            )
            return
        source, job, target = done
        self._log.info(
            "job %s: %s (%s)",
            job_id,
            target,
            job.reason,
            extra={"job": job_id, "state": target.value, "pool": job.pool, "host": self.host},
        )
        self._observe_transition(JobView.of(job), source, target)

    def _holds(self, job: Job | None, attempt: int) -> TypeGuard[Job]:
        """Whether ``job`` (as just read) is still this host's claim ``attempt``."""
        return (
            job is not None
            and job.host == self.host
            and job.attempt == attempt
            and JobState(job.state) in ACTIVE
        )

    def _on_connection(self, pool: str, record: ConnectionRecord) -> None:
        """A connection of a VM of ``pool`` ended (the proxy's callback: must not block)."""
        self._observe("connection", pool, record.decision, record.bytes_up, record.bytes_down)
        run = self.jobs.get(record.job) if record.job is not None else None
        if run is not None and run.connections is not None:
            run.connections.record(record)

    # ------------------------------------------------------------------ observation

    def _observe(self, method: str, *args: object) -> None:
        try:
            getattr(self.observer, method)(*args)
        except Exception:
            # Metrics must never break the service.
            self._log.exception("observer %s failed", method)

    def _observe_transition(
        self, view: JobView, source: str | JobState | None, target: JobState
    ) -> None:
        self._observe(
            "job_transition", view, JobState(source) if source is not None else None, target
        )

    def vm_counts(self) -> dict[str, int]:
        """VMs of this host by state: ``booting`` (warm or for a job), ``idle``, ``busy``."""
        return self.fleet.vm_counts(run.vm for run in self.jobs.values())

    def _publish_vms(self) -> None:
        self._observe("vm_state_counts", self.vm_counts())

    async def _publish_queue_depth(self) -> None:
        depth = await self.db.run(queue_depth, write=False)
        for name in self.pools:
            self._observe("queue_depth", name, depth.get(name, 0))
