"""The facade the REST API and the CLI use: :class:`Service`.

::

    service = Service(load_config(path), observer=metrics)
    await service.start()            # migrate, reconcile, schedule, supervise
    job = await service.submit(JobRequest(command=("make", "test")), "ci", source=tarball)
    async for chunk in service.follow_logs(job.id):
        ...
    await service.stop()             # graceful: running jobs get shutdown_grace_seconds

:meth:`Service.open` alone (no :meth:`~Service.start`) gives a client of the
database: it can submit, list and cancel jobs that ``stoker serve`` processes
elsewhere run.

Errors: :class:`~stoker.service.jobs.NotFound` (404),
:class:`~stoker.service.jobs.Conflict` (409),
:class:`~stoker.service.jobs.TooLarge` (413),
:class:`~stoker.service.jobs.QuotaExceeded` (429), any other
:class:`~stoker.errors.UsageError` (422); pydantic's ``ValidationError`` from
building a :class:`~stoker.service.jobs.JobRequest` is the caller's (422).

Metrics go to an :class:`Observer` (``stoker.service.metrics`` implements it);
the default discards them.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import functools
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from stoker import __version__
from stoker.backends.base import Backend
from stoker.backends.qemu import QemuBackend
from stoker.errors import UsageError
from stoker.fields import NAME_RE
from stoker.net.policy import NetworkPolicy
from stoker.service.config import ServiceConfig
from stoker.service.db import JOB_PATIENCE, Database, upgrade
from stoker.service.fake_backend import FakeBackend
from stoker.service.files import JobFiles, unpack_upload
from stoker.service.fleet import HostView, VMView, read_hosts, read_vms
from stoker.service.integrations import Integration
from stoker.service.joblist import list_query
from stoker.service.jobs import (
    Conflict,
    JobRequest,
    JobState,
    NotFound,
    QuotaExceeded,
    TooLarge,
    new_job,
    new_job_id,
    resolve,
    transition,
)
from stoker.service.jobviews import ArtifactView, JobFilter, JobView, LogChunkView, NetworkView
from stoker.service.logs import Notifier
from stoker.service.metrics import Metrics
from stoker.service.models import Artifact, Job, JobEvent, LogChunk, utcnow
from stoker.service.pool_images import build_pool_images
from stoker.service.supervisor import Supervisor

log = logging.getLogger(__name__)

#: Log chunks returned per call of :meth:`Service.logs`.
LOG_PAGE = 1000


class Observer(Protocol):
    """Receives what the service does, for metrics.  Calls must be quick and not raise."""

    def job_transition(self, job: JobView, from_state: JobState | None, to_state: JobState) -> None:
        """``job`` (as it is after the change) left ``from_state`` (None: new) for ``to_state``."""

    def boot(self, kind: Literal["cold", "warm"], seconds: float) -> None:
        """A VM reached agent-ready: ``cold`` booted for a job, ``warm`` for a pool."""

    def capacity(self, used_cpus: float, used_memory_mb: float) -> None:
        """This host's VMs now hold this many vCPUs and MiB."""

    def queue_depth(self, pool: str, depth: int) -> None:
        """``depth`` jobs wait for ``pool`` (all hosts)."""

    def vm_state_counts(self, counts: Mapping[str, int]) -> None:
        """This host's VMs by state: ``booting``, ``idle``, ``busy``."""

    def infrastructure_failure(self, reason: str) -> None:
        """An attempt failed for a reason that is not the job's: ``boot``, ``vmm_crash``,
        ``guest_panic``, ``guest``, ``infrastructure``, ``internal``, ``host_lost``."""

    def connection(self, pool: str, decision: str, bytes_up: int, bytes_down: int) -> None:
        """A guest connection of a VM of ``pool`` through its egress proxy ended:
        ``decision`` is ``allowed``, ``denied`` or ``error``; bytes both ways."""


class NullObserver:
    """An :class:`Observer` that discards everything."""

    def job_transition(self, job: JobView, from_state: JobState | None, to_state: JobState) -> None:
        pass

    def boot(self, kind: Literal["cold", "warm"], seconds: float) -> None:
        pass

    def capacity(self, used_cpus: float, used_memory_mb: float) -> None:
        pass

    def queue_depth(self, pool: str, depth: int) -> None:
        pass

    def vm_state_counts(self, counts: Mapping[str, int]) -> None:
        pass

    def infrastructure_failure(self, reason: str) -> None:
        pass

    def connection(self, pool: str, decision: str, bytes_up: int, bytes_down: int) -> None:
        pass


# --- views ----------------------------------------------------------------------------------------


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class PoolView(_View):
    """A pool: its configuration, and its VMs on this host."""

    name: str
    #: The image its VMs boot (for a flake base: the name it is built under).
    image: str
    #: The ``nix:``/``nixos:`` flake base the image is built from (None: a built image).
    image_base: str | None = None
    cpus: int
    memory_mb: int
    disk_mb: int
    labels: tuple[str, ...]
    min_idle: int
    max: int
    timeout_s: float
    snapshot: str
    idle: int
    warming: int
    busy: int
    #: Jobs waiting for this pool (all hosts).
    queued: int
    #: The network policy of its VMs (None: each image's own ``[network]``).
    network: NetworkView | None = None


class HealthView(_View):
    """Whether this service works."""

    status: Literal["ok", "starting", "stopping", "stopped", "degraded"]
    host: str
    version: str
    database: bool
    #: Jobs this host runs now.
    running: int
    used_cpus: float
    used_memory_mb: float
    cpu_budget: float
    memory_budget_mb: float
    detail: str | None = None
    #: Each integration's own summary (``github``: its loop, webhooks, API budget).
    integrations: dict[str, dict[str, Any]] = {}


# --- the service ----------------------------------------------------------------------------------


class Service:
    """``stoker serve`` as an object: the REST API and the CLI call these methods."""

    def __init__(
        self,
        config: ServiceConfig,
        *,
        observer: Observer | None = None,
        backend: Backend | None = None,
        integrations: Sequence[Integration] = (),
    ) -> None:
        if isinstance(backend, FakeBackend) and config.backend != "fake":
            raise UsageError('a FakeBackend needs backend = "fake" in the configuration')
        self.config = config
        self.observer: Observer = observer or NullObserver()
        self.backend: Backend = backend or (
            FakeBackend() if config.backend == "fake" else QemuBackend()
        )
        self.notifier = Notifier()
        #: Random per process life (tells a restarted host from its previous life).
        self.incarnation = uuid.uuid4().hex
        self.status: Literal["created", "open", "starting", "ok", "stopping", "stopped"] = "created"
        self._db: Database | None = None
        self._supervisor: Supervisor | None = None
        self._lock_fd: int | None = None
        #: Started after the supervisor, stopped before it (see :mod:`.integrations`).
        self.integrations: tuple[Integration, ...] = tuple(integrations)

    # ------------------------------------------------------------------ lifecycle

    @property
    def db(self) -> Database:
        if self._db is None:
            raise UsageError("the service is not open; call open() or start() first")
        return self._db

    @property
    def supervisor(self) -> Supervisor | None:
        """This process's supervisor (None for a client opened with :meth:`open`)."""
        return self._supervisor

    async def open(self) -> None:
        """Connect to the database and migrate it (idempotent); enough to submit jobs."""
        if self._db is not None:
            return
        await asyncio.to_thread(self.config.jobs_dir.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(upgrade, self.config.database_url)
        self._db = Database(self.config.database_url)
        if isinstance(self.observer, Metrics):
            self.observer.watch_database(self._db.health)
        if self.status == "created":
            self.status = "open"

    async def start(self) -> None:
        """Open, reconcile what a previous life left behind, start scheduling and supervising."""
        if self._supervisor is not None:
            return
        self.status = "starting"
        self._lock_state_dir()
        try:
            if self.backend.host_limits:
                # Host-side limits: refused now if required and missing, else noted once.
                from stoker.isolation import check_host

                for pool in self.config.pools:
                    check_host(self.config.isolation(pool))
            # Flake images before the first VM: a pool's VMs boot what was built.
            await build_pool_images(self.config)
            await self.open()
            supervisor = Supervisor(
                self.config,
                self.db,
                backend=self.backend,
                observer=self.observer,
                notifier=self.notifier,
                incarnation=self.incarnation,
                version=__version__,
            )
            await supervisor.start()
        except BaseException:
            if self._db is not None:
                await asyncio.to_thread(self._db.close)
                self._db = None
            self._unlock_state_dir()
            self.status = "stopped"
            raise
        self._supervisor = supervisor
        try:
            for integration in self.integrations:
                await integration.start(self)
        except BaseException:
            # stop() stops every integration (stopping one never started is a no-op).
            await self.stop(grace=0)
            raise
        self.status = "ok"
        log.info(
            "stoker serve %s on host %s: %d pools, database %s",
            __version__,
            self.config.host.name,
            len(self.config.pools),
            "sqlite" if self.config.is_sqlite else "postgresql",
        )

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: claim nothing more, give running jobs ``grace`` seconds
        (default ``shutdown_grace_seconds``), fail what is left as ``errored``."""
        if self.status in ("stopping", "stopped", "created"):
            return
        self.status = "stopping"
        try:
            for integration in reversed(self.integrations):
                try:
                    await integration.stop()
                except Exception:
                    log.exception("stopping the %s integration failed", integration.name)
            if self._supervisor is not None:
                await self._supervisor.stop(
                    self.config.shutdown_grace_seconds if grace is None else grace
                )
        finally:
            if self._db is not None:
                await asyncio.to_thread(self._db.close)
                self._db = None
            self._unlock_state_dir()
            self.status = "stopped"

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _lock_state_dir(self) -> None:
        # One service per state directory: the flock proves a previous life is dead.
        state = self.config.state_dir
        state.mkdir(parents=True, exist_ok=True)
        fd = os.open(state / "serve.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                f"another stoker serve is running with state directory {state}"
            ) from None
        self._lock_fd = fd

    def _unlock_state_dir(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _wake(self) -> None:
        if self._supervisor is not None:
            self._supervisor.wake()

    # ------------------------------------------------------------------ jobs

    async def submit(
        self,
        request: JobRequest,
        submitter: str,
        *,
        source: Path | IO[bytes] | None = None,
    ) -> JobView:
        """Queue a job; ``source`` is an uploaded tar or tar.gz (a file or a seekable stream).

        Everything is checked before anything is stored: a bad request, an
        archive that would escape its directory or is too big, an unknown
        image or pool, resources above the pool's, leave no job and no files.
        """
        if not NAME_RE.fullmatch(submitter):
            raise UsageError(f"invalid submitter name {submitter!r}")
        if source is not None and request.git is not None:
            raise UsageError("give either an uploaded source or a git source, not both")
        resolved = resolve(request, self.config, submitter)
        db = self.db
        limits = self.config.limits
        job_id = new_job_id()
        files = JobFiles.of(self.config.jobs_dir, job_id)
        incoming = self.config.jobs_dir / ".incoming" / job_id
        kind: Literal["upload", "git", "none"] = "none"
        ref: str | None = None
        if source is not None:
            size = _size_of(source)
            if size > limits.max_upload_bytes:
                raise TooLarge(
                    f"the upload has {size} bytes, more than the limit of {limits.max_upload_bytes}"
                )
            await asyncio.to_thread(
                unpack_upload, source, incoming, max_bytes=limits.max_source_bytes
            )
            kind, ref = "upload", str(files.source)
        elif request.git is not None:
            kind, ref = "git", f"{request.git.url}#{request.git.ref}"
        job, event = new_job(
            request, resolved, submitter=submitter, job_id=job_id, source_kind=kind, source_ref=ref
        )

        def insert(session: Session) -> None:
            queued = session.scalar(
                select(func.count()).where(
                    Job.submitter == submitter, Job.state == JobState.QUEUED.value
                )
            )
            if (queued or 0) >= limits.max_queued_per_submitter:
                raise QuotaExceeded(
                    f"{submitter!r} has {queued} jobs queued already "
                    f"(limit {limits.max_queued_per_submitter})"
                )
            session.add(job)
            session.add(event)

        try:
            if kind == "upload":
                await asyncio.to_thread(_move_into_place, incoming, files)
            await db.run(insert)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, incoming, True)
            await asyncio.to_thread(shutil.rmtree, files.root, True)
            raise
        view = JobView.of(job, [event])
        log.info(
            "job %s queued by %s for pool %s",
            job_id,
            submitter,
            resolved.pool,
            extra={"job": job_id, "pool": resolved.pool, "state": "queued"},
        )
        with contextlib.suppress(Exception):
            self.observer.job_transition(view, None, JobState.QUEUED)
        self._wake()
        return view

    async def get(self, job_id: str) -> JobView:
        """The job with its events; :class:`NotFound` if there is none."""

        def read(session: Session) -> JobView:
            job = session.get(Job, job_id)
            if job is None:
                raise NotFound(f"no job {job_id!r}")
            events = session.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
            )
            return JobView.of(job, events)

        return await self.db.run(read, write=False)

    async def list(self, filters: JobFilter | None = None) -> builtins.list[JobView]:
        """Jobs, newest first (without their events)."""
        f = filters or JobFilter()

        def read(session: Session) -> builtins.list[JobView]:
            return [JobView.of(job) for job in session.scalars(list_query(session, f))]

        return await self.db.run(read, write=False)

    async def cancel(self, job_id: str) -> JobView:
        """Cancel a job: at once when queued, else its host stops it (409 once it ended)."""

        def cancel(session: Session) -> tuple[JobView, str | None]:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise NotFound(f"no job {job_id!r}")
            state = JobState(job.state)
            if state.terminal:
                raise Conflict(f"job {job_id} already ended ({state})")
            if state is JobState.QUEUED:
                transition(session, job, JobState.CANCELLED, reason="cancelled on request")
                return JobView.of(job), JobState.QUEUED.value
            job.cancel_requested = True
            job.updated_at = utcnow()
            return JobView.of(job), None

        view, source = await self.db.run(cancel)
        if source is not None:
            with contextlib.suppress(Exception):
                self.observer.job_transition(view, JobState(source), JobState.CANCELLED)
            self.notifier.notify(job_id)
        elif self._supervisor is not None:
            run = self._supervisor.jobs.get(job_id)
            if run is not None:
                run.stop("cancel")
        return view

    async def wait(self, job_id: str, timeout: float | None = None) -> JobView:
        """Wait until the job ends and return it (``TimeoutError`` after ``timeout``)."""
        async with asyncio.timeout(timeout):
            while True:
                event = self.notifier.event(job_id)
                view = await self.get(job_id)
                if view.state.terminal:
                    return view
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.poll_seconds):
                        await event.wait()

    # ------------------------------------------------------------------ logs and artifacts

    async def logs(
        self, job_id: str, after_seq: int = 0, limit: int = LOG_PAGE
    ) -> builtins.list[LogChunkView]:
        """Stored output chunks with ``seq > after_seq`` (at most ``limit``)."""
        chunks, _ = await self.db.run(
            functools.partial(_read_logs, job_id=job_id, after_seq=after_seq, limit=limit),
            write=False,
        )
        return chunks

    async def follow_logs(self, job_id: str, after_seq: int = 0) -> AsyncIterator[LogChunkView]:
        """Output chunks as they are stored, until the job has ended and all are delivered."""
        seq = after_seq
        while True:
            event = self.notifier.event(job_id)
            # A follower outlives a database outage: the output it missed comes after.
            chunks, state = await self.db.run(
                functools.partial(_read_logs, job_id=job_id, after_seq=seq, limit=LOG_PAGE),
                write=False,
                patience=JOB_PATIENCE,
            )
            for chunk in chunks:
                yield chunk
                seq = chunk.seq
            if len(chunks) == LOG_PAGE:
                continue
            if state.terminal:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.poll_seconds):
                    await event.wait()

    async def artifacts(self, job_id: str) -> builtins.list[ArtifactView]:
        """The files the job's last attempt copied out."""

        def read(session: Session) -> builtins.list[ArtifactView]:
            if session.get(Job, job_id) is None:
                raise NotFound(f"no job {job_id!r}")
            rows = session.scalars(
                select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)
            )
            return [ArtifactView(name=a.name, size=a.size, sha256=a.sha256) for a in rows]

        return await self.db.run(read, write=False)

    async def artifact_path(self, job_id: str, name: str) -> Path:
        """The host file of artifact ``name`` (a regular file in the job's directory)."""

        def read(session: Session) -> str | None:
            row = session.get(Artifact, (job_id, name))
            return None if row is None else row.path

        stored = await self.db.run(read, write=False)
        if stored is None:
            raise NotFound(f"job {job_id!r} has no artifact {name!r}")
        path = Path(stored)
        root = JobFiles.of(self.config.jobs_dir, job_id).artifacts
        # The guest chose these names: never serve anything but a file inside the job's directory.
        if (
            not path.is_relative_to(root)
            or path.is_symlink()
            or not path.is_file()
            or not path.resolve().is_relative_to(root.resolve())
        ):
            raise NotFound(f"artifact {name!r} of job {job_id!r} is not available on this host")
        return path

    # ------------------------------------------------------------------ pools, VMs, hosts

    async def pools(self) -> builtins.list[PoolView]:
        """Every configured pool, with this host's VMs and the queue (all hosts)."""

        def count(session: Session) -> dict[str, int]:
            rows = session.execute(
                select(Job.pool, func.count())
                .where(Job.state == JobState.QUEUED.value)
                .group_by(Job.pool)
            )
            return {pool or "": n for pool, n in rows}

        queued = await self.db.run(count, write=False)
        out = []
        for name, cfg in self.config.pools.items():
            local = self._supervisor.pools.get(name) if self._supervisor else None
            out.append(
                PoolView(
                    name=name,
                    image=cfg.image_name,
                    image_base=cfg.image_base,
                    cpus=cfg.cpus,
                    memory_mb=cfg.memory,
                    disk_mb=cfg.disk,
                    labels=cfg.labels,
                    min_idle=cfg.min_idle,
                    max=cfg.max,
                    timeout_s=cfg.timeout,
                    snapshot=cfg.snapshot,
                    idle=len(local.idle) if local else 0,
                    warming=local.warming if local else 0,
                    busy=local.busy if local else 0,
                    queued=queued.get(name, 0),
                    network=_network_view(cfg.network),
                )
            )
        return out

    async def vms(self) -> builtins.list[VMView]:
        """VMs of every host, as recorded in the database, with their shapes."""
        pools = self.config.pools
        return await self.db.run(lambda s: read_vms(s, pools), write=False)

    async def hosts(self) -> builtins.list[HostView]:
        """Every host that ever served this database, its budget and capacity in use."""
        read = functools.partial(
            read_hosts,
            pools=self.config.pools,
            now=utcnow(),
            lease=timedelta(seconds=self.config.lease_seconds),
        )
        return await self.db.run(read, write=False)

    async def health(self) -> HealthView:
        """Cheap: answers from memory plus one trivial query."""
        database = True
        detail = None
        try:
            await self.db.run(lambda s: s.execute(select(1)).scalar(), write=False)
        except Exception as exc:
            database, detail = False, f"database: {type(exc).__name__}: {exc}"
        problem = self.db.health.describe()
        if problem is not None:
            # A full disk still answers reads: it is the writes that fail.
            database, detail = False, problem
        sup = self._supervisor
        status: Any = self.status if self.status in ("starting", "stopping", "stopped") else "ok"
        if status == "ok" and (not database or (sup is not None and sup.displaced)):
            status = "degraded"
            if sup is not None and sup.displaced:
                detail = "another process runs under this host name"
        budget = self.config.host
        return HealthView(
            status=status,
            host=budget.name,
            version=__version__,
            database=database,
            running=len(sup.jobs) if sup else 0,
            used_cpus=sup.used.cpus if sup else 0.0,
            used_memory_mb=sup.used.memory_mb if sup else 0.0,
            cpu_budget=budget.cpu_budget,
            memory_budget_mb=budget.memory_budget_mb,
            detail=detail,
            integrations={i.name: i.status() for i in self.integrations},
        )


def _network_view(policy: NetworkPolicy | None) -> NetworkView | None:
    return None if policy is None else NetworkView.model_validate(policy.summary())


def _size_of(source: Path | IO[bytes]) -> int:
    if isinstance(source, Path):
        try:
            return source.stat().st_size
        except OSError as exc:
            raise UsageError(f"cannot read the upload: {exc}") from None
    position = source.tell()
    size = source.seek(0, os.SEEK_END)
    source.seek(position)
    return size


def _move_into_place(incoming: Path, files: JobFiles) -> None:
    files.root.mkdir(parents=True)
    incoming.rename(files.source)


def _read_logs(
    session: Session, job_id: str, after_seq: int, limit: int
) -> tuple[builtins.list[LogChunkView], JobState]:
    # The state is read first: output stored after it is in this same snapshot or later.
    state = session.scalar(select(Job.state).where(Job.id == job_id))
    if state is None:
        raise NotFound(f"no job {job_id!r}")
    rows = session.scalars(
        select(LogChunk)
        .where(LogChunk.job_id == job_id, LogChunk.seq > after_seq)
        .order_by(LogChunk.seq)
        .limit(limit)
    )
    chunks = [
        LogChunkView(seq=c.seq, stream=c.stream, data=c.data, at=c.at)  # type: ignore[arg-type]
        for c in rows
    ]
    return chunks, JobState(state)
