"""The VM supervisor: runs the jobs this host claims, keeps warm pools, heals.

One asyncio task tree (no process per VM)::

    Supervisor._run  (TaskGroup)
    ├── schedule loop    claim jobs (scheduler.plan + db.claim_jobs), dispatch, refill pools
    ├── heartbeat loop   renew leases and Host.heartbeat_at, notice remote cancels,
    │                    sweep jobs of silent hosts, drop dead idle VMs, publish gauges
    ├── warm boot tasks  one per VM booting for a pool
    └── job tasks        one per claimed job: VM (warm or cold) -> source in -> command,
                         output into bounded LogChunks -> artifacts out -> VM destroyed

A job task never raises: every outcome becomes a transition.  Failures of the
user's command or input end the job (``failed``, ``timed_out``); failures of
the infrastructure (the VMM crashed, the boot failed, the agent channel broke)
send it back to the queue until ``retry_limit``, then ``errored``.  Stopping a
job (cancel, lease lost, shutdown) is an event raced against its work, never a
swallowed cancellation.  Every transition commits before the side effect it
announces; a job whose host vanished is recovered by whichever host sweeps
first, and by this host itself on restart (:meth:`Supervisor.start`).

Capacity: every VM that exists or is being started holds its vCPUs and memory
in this host's ledger, from the moment it is planned until it is destroyed;
:mod:`stoker.service.scheduler` only plans within what the ledger has free.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import gzip
import hashlib
import logging
import os
import secrets
import shutil
import signal
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, cast

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from stoker.archive import ExtractLimits, ExtractReport, safe_extract
from stoker.backends.base import Backend
from stoker.errors import (
    BootError,
    CommandTimeout,
    GuestPanic,
    GuestProtocolError,
    InfrastructureError,
    OutputLimitExceeded,
    StokerError,
    UnsafeArchive,
    UsageError,
    VMMCrashed,
)
from stoker.procs import DIE_WITH_PARENT
from stoker.service.config import PoolConfig, ServiceConfig, _redact_url
from stoker.service.db import (
    Database,
    claim_jobs,
    expired_jobs,
    forget_vms,
    heartbeat,
    renew_leases,
)
from stoker.service.fake_backend import FakeBackend, FakeVM
from stoker.service.jobs import (
    ACTIVE,
    MIN_SECRET_LEN,
    TERMINAL,
    JobState,
    JobView,
    git_ref_of,
    job_env,
    redact,
    secret_values,
    transition,
)
from stoker.service.models import Artifact, Host, Job, LogChunk, VMRecord, utcnow
from stoker.service.scheduler import (
    Assignment,
    Candidate,
    Capacity,
    Plan,
    PoolState,
    plan,
    replenish,
)
from stoker.vm import OWNER_FILE, VM, VMState, sweep_stale_workdirs

if TYPE_CHECKING:
    from stoker.service.service import Observer

log = logging.getLogger(__name__)

#: Where a job's files are in the guest, and the command's working directory.
GUEST_DIR = "/work/src"
#: Log output is stored in chunks of at most this size ...
LOG_CHUNK = 64 << 10
#: ... written at least this often while a command runs ...
LOG_FLUSH_SECONDS = 0.25
#: ... and as soon as this much is waiting (the guest waits for the database then).
LOG_FLUSH_BYTES = 256 << 10
#: Scheduling passes are at least this far apart (a pass claims for every free slot).
MIN_PASS_INTERVAL = 0.02
#: A pool whose warm boots fail waits up to this long before trying again.
MAX_WARM_BACKOFF = 60.0
#: Upload and job directories this old with no job row are leftovers of a crash.
ORPHAN_AGE = 3600.0

StopReason = Literal["cancel", "shutdown", "lease_lost"]
FailureKind = Literal[
    "boot", "vmm_crash", "guest_panic", "guest", "infrastructure", "internal", "host_lost"
]


class LeaseLost(Exception):
    """This host no longer holds the job (another host recovered it); stop, write nothing."""


class CancelRequested(Exception):
    """The job was cancelled (seen in the database, possibly from another host)."""


class JobInputError(StokerError):
    """The job's own input is unusable (a git ref that does not exist): the job fails."""


# --- notifications for log followers --------------------------------------------------------------


class Notifier:
    """Wakes coroutines waiting for news about a key (a job id)."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def event(self, key: str) -> asyncio.Event:
        """The event the next :meth:`notify` of ``key`` sets (take it before looking)."""
        return self._events.setdefault(key, asyncio.Event())

    def notify(self, key: str) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()


# --- logs -----------------------------------------------------------------------------------------


class SecretMasker:
    """Replaces secret values in a byte stream by ``***``, also across chunk boundaries.

    A chunk's tail that could be the start of a secret is held back until the
    next chunk (or :meth:`finish`) shows whether it is.
    """

    def __init__(self, values: Iterable[str]) -> None:
        self._secrets = sorted(
            {v.encode() for v in values if len(v) >= MIN_SECRET_LEN}, key=len, reverse=True
        )
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        if not self._secrets:
            return data
        buf = self._pending + data
        for secret in self._secrets:
            buf = buf.replace(secret, b"***")
        hold = self._prefix_len(buf)
        self._pending = buf[len(buf) - hold :] if hold else b""
        return buf[: len(buf) - hold]

    def _prefix_len(self, buf: bytes) -> int:
        """Length of the longest tail of ``buf`` that starts some secret."""
        best = 0
        for secret in self._secrets:
            for k in range(min(len(secret) - 1, len(buf)), best, -1):
                if buf.endswith(secret[:k]):
                    best = k
                    break
        return best

    def finish(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest


class LogWriter:
    """A job's output on its way into :class:`~stoker.service.models.LogChunk` rows.

    Bounded: once the job's stored output reaches ``limit`` bytes (over all
    its attempts) the rest is dropped and the job is marked ``log_truncated``;
    lines stoker itself adds (stream ``system``) are not counted.  Nothing is
    written before :meth:`begin` (the job is this host's from then on); what
    is left at the end goes into the job's final transaction
    (:meth:`store_rest`), so followers see the last output and the end together.
    """

    def __init__(
        self,
        db: Database,
        job_id: str,
        *,
        limit: int,
        secrets: Iterable[str],
        on_flush: Callable[[str], None],
    ) -> None:
        self._db = db
        self._job_id = job_id
        self._limit = limit
        secret_list = list(secrets)
        self._maskers = {s: SecretMasker(secret_list) for s in ("stdout", "stderr")}
        self._pending: list[tuple[str, bytearray]] = []
        self._pending_bytes = 0
        #: Sequence number of the last stored chunk (None: not known yet).
        self._seq: int | None = None
        #: Output bytes accepted so far (stored or pending), over all attempts.
        self._accepted = 0
        self._truncated = False
        self._lock = asyncio.Lock()
        self._on_flush = on_flush
        self._ticker: asyncio.Task[None] | None = None

    @property
    def job_id(self) -> str:
        return self._job_id

    def begin(self, seq: int, stored: int, truncated: bool) -> None:
        """Continue after what earlier attempts stored; start flushing periodically."""
        self._seq = seq
        self._accepted += stored
        self._truncated = self._truncated or truncated
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(LOG_FLUSH_SECONDS)
            try:
                await self.flush()
            except Exception as exc:
                # Kept pending; the next tick (or the command's next output) tries again.
                log.warning("storing output of job %s failed: %s", self._job_id, exc)

    def _append(self, stream: str, data: bytes) -> None:
        if not data:
            return
        if self._pending and self._pending[-1][0] == stream:
            self._pending[-1][1].extend(data)
        else:
            self._pending.append((stream, bytearray(data)))
        self._pending_bytes += len(data)

    def _accept(self, stream: str, data: bytes) -> None:
        if self._truncated or not data:
            return
        room = self._limit - self._accepted
        if len(data) > room:
            data = data[:room]
            self._truncated = True
        self._accepted += len(data)
        self._append(stream, data)
        if self._truncated:
            notice = f"[stoker] output limit of {self._limit} bytes reached; the rest is dropped\n"
            self._append("system", notice.encode())

    async def write(self, stream: Literal["stdout", "stderr"], data: bytes) -> None:
        """Store ``data`` (secrets masked); waits for the database when a lot is pending."""
        self._accept(stream, self._maskers[stream].feed(data))
        if self._pending_bytes >= LOG_FLUSH_BYTES:
            await self.flush()

    async def system(self, text: str) -> None:
        """A line from stoker itself (``[stoker] ...``)."""
        self._append("system", f"[stoker] {text}\n".encode())
        if self._pending_bytes >= LOG_FLUSH_BYTES:
            await self.flush()

    def _rows(
        self, pending: list[tuple[str, bytearray]], first_seq: int
    ) -> tuple[list[LogChunk], int, int]:
        """Chunks for ``pending``, numbered from ``first_seq``; their last seq; output bytes."""
        at = utcnow()
        rows = []
        seq = first_seq - 1
        for stream, data in pending:
            for i in range(0, len(data), LOG_CHUNK):
                seq += 1
                rows.append(
                    LogChunk(
                        job_id=self._job_id,
                        seq=seq,
                        stream=stream,
                        data=bytes(data[i : i + LOG_CHUNK]),
                        at=at,
                    )
                )
        output = sum(len(d) for s, d in pending if s != "system")
        return rows, seq, output

    async def flush(self) -> None:
        """Write what is pending as one transaction (nothing before :meth:`begin`)."""
        async with self._lock:
            if not self._pending or self._seq is None:
                return
            # Output that arrives while this is written waits for the next flush.
            pending, self._pending = self._pending, []
            size, self._pending_bytes = self._pending_bytes, 0
            rows, last, output = self._rows(pending, self._seq + 1)
            truncated = self._truncated

            def store(session: Session) -> None:
                session.add_all(rows)
                job = session.get(Job, self._job_id)
                if job is not None:
                    job.log_bytes += output
                    job.log_truncated = job.log_truncated or truncated

            write = asyncio.get_running_loop().create_task(self._db.run(store))
            try:
                await asyncio.shield(write)
            finally:
                if not write.done():
                    # Cancelled while the database thread writes: that write still lands.
                    await asyncio.wait({write})
                if not write.cancelled() and write.exception() is None:
                    self._seq = last
                else:
                    self._pending = pending + self._pending
                    self._pending_bytes += size
        self._on_flush(self._job_id)

    async def close(self) -> None:
        """Stop the periodic flush; what the maskers held back joins the pending output."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        for stream, masker in self._maskers.items():
            self._accept(stream, masker.finish())

    def store_rest(self, session: Session, job: Job) -> None:
        """Add what is still pending to ``session`` (the job's final transaction)."""
        if not self._pending:
            return
        first = self._seq
        if first is None:
            first = (
                session.scalar(
                    select(func.max(LogChunk.seq)).where(LogChunk.job_id == self._job_id)
                )
                or 0
            )
        rows, _, output = self._rows(self._pending, first + 1)
        session.add_all(rows)
        job.log_bytes += output
        job.log_truncated = job.log_truncated or self._truncated


# --- job files ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobFiles:
    """A job's directory in the storage directory: its source and its artifacts."""

    root: Path

    @classmethod
    def of(cls, jobs_dir: Path, job_id: str) -> JobFiles:
        return cls(jobs_dir / job_id)

    @property
    def source(self) -> Path:
        return self.root / "source"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def reset_artifacts(self) -> None:
        """Start an attempt with an empty artifact directory."""
        shutil.rmtree(self.artifacts, ignore_errors=True)
        self.artifacts.mkdir(parents=True)


def unpack_upload(archive: Path | IO[bytes], dest: Path, *, max_bytes: int) -> ExtractReport:
    """Extract an uploaded tar (optionally gzip-compressed) into the new directory ``dest``.

    ``archive`` is a file or a seekable stream.  The tar is checked by
    :func:`stoker.archive.safe_extract` (nothing may land outside ``dest``; at
    most ``max_bytes`` of file content).  Raises :class:`UsageError` for an
    archive that is not acceptable, and leaves no ``dest`` behind then.
    """
    dest.mkdir(parents=True)
    try:
        with contextlib.ExitStack() as stack:
            raw = stack.enter_context(archive.open("rb")) if isinstance(archive, Path) else archive
            raw.seek(0)
            compressed = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            stream = cast(IO[bytes], gzip.GzipFile(fileobj=raw)) if compressed else raw
            return safe_extract(cast(Any, stream), dest, ExtractLimits(max_bytes=max_bytes))
    except OutputLimitExceeded as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise UsageError(f"the source archive unpacks to too much: {exc}") from None
    except (UnsafeArchive, gzip.BadGzipFile, EOFError, OSError, zlib.error) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise UsageError(f"the source archive is not acceptable: {exc}") from None
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _tree_size(root: Path) -> int:
    total = 0
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                total += path.lstat().st_size
    return total


async def fetch_git(
    url: str,
    ref: str,
    dest: Path,
    *,
    timeout: float,
    max_bytes: int,
    protocols: Iterable[str],
) -> None:
    """Shallow-fetch ``ref`` of ``url`` and check it out into ``dest`` (host side).

    git runs without the user's or the system's configuration, without
    prompts, and only over ``protocols``.  Raises :class:`JobInputError` when
    the repository or ref cannot be fetched or the checkout exceeds
    ``max_bytes``.
    """
    tmp = dest.with_name(f"{dest.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir(parents=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp),
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_ALLOW_PROTOCOL": ":".join(protocols),
        "GIT_LFS_SKIP_SMUDGE": "1",
    }
    file_allowed = "always" if "file" in protocols else "never"
    steps = [
        ("init", ["git", "init", "-q", str(tmp)]),
        (
            "fetch",
            [
                "git",
                "-C",
                str(tmp),
                "-c",
                f"protocol.file.allow={file_allowed}",
                "fetch",
                "-q",
                "--depth",
                "1",
                "--no-tags",
                "--",
                url,
                ref,
            ],
        ),
        ("checkout", ["git", "-C", str(tmp), "checkout", "-q", "--detach", "FETCH_HEAD"]),
    ]
    try:
        async with asyncio.timeout(timeout):
            for what, argv in steps:
                await _run_git(what, argv, env, url)
        size = await asyncio.to_thread(_tree_size, tmp)
        if size > max_bytes:
            raise JobInputError(
                f"the git checkout holds {size} bytes, more than the limit of {max_bytes}"
            )
        tmp.rename(dest)
    except TimeoutError:
        raise JobInputError(f"fetching {_redact_url(url)} took longer than {timeout:g}s") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _run_git(what: str, argv: list[str], env: dict[str, str], url: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=DIE_WITH_PARENT,
    )
    try:
        out, _ = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        text = out.decode(errors="replace").strip().splitlines()
        raise JobInputError(f"git {what} of {_redact_url(url)} failed: {(text or ['?'])[-1][:500]}")


@dataclass(frozen=True)
class ArtifactFile:
    """An artifact as stored on the host."""

    name: str
    size: int
    sha256: str
    path: str


def _hash_artifacts(root: Path, names: Iterable[str]) -> list[ArtifactFile]:
    found = []
    seen: set[str] = set()
    for name in names:
        # Overlapping patterns ("out/**" matches a directory and its files) make
        # the guest's tar carry a file twice: one artifact per path.
        name = os.path.normpath(name)
        if name in seen:
            continue
        seen.add(name)
        path = root / name
        try:
            st = path.lstat()
        except OSError:
            continue
        if not path.is_file() or path.is_symlink():
            continue
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        found.append(ArtifactFile(name, st.st_size, digest.hexdigest(), str(path)))
    return found


# --- runs and pools -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended.  ``state`` None: infrastructure failure (retry or errored)."""

    state: JobState | None
    reason: str
    exit_code: int | None = None
    signal: int | None = None
    failure: FailureKind | None = None
    #: False: an infrastructure failure that another attempt would not fix.
    retry: bool = True
    #: Another host recovered the job: write nothing.
    lost: bool = False
    artifacts: tuple[ArtifactFile, ...] = ()


@dataclass(eq=False)
class JobRun:
    """A job this host is running."""

    job: Job
    pool: str
    vm: VM | None = None
    evicted: list[VM] = field(default_factory=list)
    #: vCPUs and MiB the evicted VMs hold in the ledger until they are destroyed.
    evicted_capacity: tuple[float, float] = (0.0, 0.0)
    task: asyncio.Task[None] | None = None
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    stop_reason: StopReason | None = None

    def stop(self, reason: StopReason) -> None:
        """Ask the run to stop (the first reason wins)."""
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stop_event.set()


@dataclass(eq=False)
class WarmPool:
    """One pool's VMs on this host."""

    name: str
    config: PoolConfig
    idle: deque[VM] = field(default_factory=deque)
    warming: int = 0
    busy: int = 0
    failures: int = 0
    retry_at: float = 0.0

    @property
    def total(self) -> int:
        return len(self.idle) + self.warming + self.busy

    def state(self, *, warm_allowed: bool = True) -> PoolState:
        return PoolState(
            cpus=self.config.cpus,
            memory_mb=self.config.memory,
            max=self.config.max,
            min_idle=self.config.min_idle if warm_allowed else 0,
            idle=len(self.idle),
            warming=self.warming,
            total=self.total,
        )


#: VM.start() sweeps stale work directories in a worker thread while creating its own;
#: a sweep could read another VM's owner file half-written and remove that VM's
#: directory.  Serialising creation within this process closes that window.
_WORKDIR_LOCK = threading.Lock()


class ServiceVM(VM):
    """A :class:`~stoker.vm.VM` whose work directory is made under a process-wide lock."""

    def _make_workdir(self) -> Path:
        with _WORKDIR_LOCK:
            return super()._make_workdir()


class _Kind(enum.Enum):
    WARM = "warm"
    COLD = "cold"


def _classify(exc: BaseException) -> FailureKind:
    if isinstance(exc, BootError):
        return "boot"
    if isinstance(exc, VMMCrashed):
        return "vmm_crash"
    if isinstance(exc, GuestPanic):
        return "guest_panic"
    if isinstance(exc, GuestProtocolError):
        return "guest"
    return "infrastructure"


def _headline(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# --- the supervisor -------------------------------------------------------------------------------


class Supervisor:
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
        self.budget = Capacity(config.host.cpu_budget, config.host.memory_budget_mb)
        self.used = Capacity(0, 0)
        self.pools = {name: WarmPool(name, cfg) for name, cfg in config.pools.items()}
        self.jobs: dict[str, JobRun] = {}
        self.stopping = False
        #: Another process heartbeats under this host name: claim nothing more.
        self.displaced = False
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._main: asyncio.Task[None] | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._warm_tasks: set[asyncio.Task[None]] = set()
        self._stray: set[asyncio.Task[None]] = set()
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
        for task in list(self._warm_tasks):
            task.cancel()
        for pool in self.pools.values():
            while pool.idle:
                self._discard(pool.idle.popleft(), pool)
        tasks = [r.task for r in self.jobs.values() if r.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:
                self._log.warning(
                    "%d jobs still running after %.0fs: failing them", len(pending), grace
                )
            for run in list(self.jobs.values()):
                run.stop("shutdown")
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

        The previous process's VMs died with it (QEMU runs with a parent-death
        signal), so its claimed jobs go back to the queue (or to ``errored``
        at the retry limit, ``cancelled`` if cancelling); its VM records are
        dropped; stale VM work directories are removed, and any VMM still
        running from this service's runtime directory for a dead owner is killed.
        """
        now = utcnow()
        why = f"stoker serve on {self.host} restarted; the job's VM ended with the old process"

        def fix(session: Session) -> list[tuple[JobView, str, JobState]]:
            row = session.get(Host, self.host, with_for_update=True)
            config = self.config.host
            if row is None:
                row = Host(name=self.host, started_at=now)
                session.add(row)
            row.cpus = config.cpus
            row.memory_mb = config.memory_mb
            row.overcommit = config.overcommit
            row.started_at = now
            row.heartbeat_at = now
            row.version = self.version
            row.status = "running"
            row.incarnation = self.incarnation
            orphans = session.scalars(
                select(Job)
                .where(Job.host == self.host, Job.state.in_([s.value for s in ACTIVE]))
                .with_for_update()
            ).all()
            changes = []
            for job in orphans:
                source = job.state
                target = self._recover(session, job, why, now)
                changes.append((JobView.of(job), source, target))
            forget_vms(session, host=self.host)
            return changes

        changes = await self.db.run(fix)
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
        await asyncio.to_thread(self._sweep_orphan_files)

    def _recover(self, session: Session, job: Job, why: str, now: datetime) -> JobState:
        """Requeue a job whose host lost it, or end it (cancelling, or out of retries)."""
        if job.cancel_requested:
            target, reason = JobState.CANCELLED, f"cancelled ({why})"
        elif job.attempt < self.config.retry_limit:
            target, reason = JobState.QUEUED, why
        else:
            target = JobState.ERRORED
            reason = f"{why}; gave up after {job.attempt + 1} attempts"
        transition(session, job, target, reason=reason, now=now)
        return target

    def _sweep_orphan_files(self) -> None:
        """Remove uploads and job directories a crash left without a job row."""
        jobs_dir = self.config.jobs_dir
        if not jobs_dir.is_dir():
            return
        cutoff = time.time() - ORPHAN_AGE
        incoming = jobs_dir / ".incoming"
        candidates = [p for p in incoming.iterdir()] if incoming.is_dir() else []
        directories = [p for p in jobs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        known: set[str] = set()
        if directories:
            names = [p.name for p in directories]

            def existing(session: Session) -> set[str]:
                found: set[str] = set()
                for i in range(0, len(names), 500):
                    found.update(
                        session.scalars(select(Job.id).where(Job.id.in_(names[i : i + 500])))
                    )
                return found

            known = self.db.call(existing, write=False)
        for path in candidates + [p for p in directories if p.name not in known]:
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------ capacity

    def _reserve(self, cpus: float, memory_mb: float) -> None:
        self.used = self.used.plus(cpus, memory_mb)
        if not self.budget.fits(self.used.cpus, self.used.memory_mb):
            # The scheduler plans within the free capacity; this is a bug if it happens.
            self._log.error("capacity overcommitted: %s of %s", self.used, self.budget)
        self._observe("capacity", self.used.cpus, self.used.memory_mb)

    def _release(self, cpus: float, memory_mb: float) -> None:
        self.used = self.used.minus(cpus, memory_mb)
        self._observe("capacity", self.used.cpus, self.used.memory_mb)

    def free(self) -> Capacity:
        """What the ledger has not handed out."""
        return Capacity(
            self.budget.cpus - self.used.cpus, self.budget.memory_mb - self.used.memory_mb
        )

    def pool_states(self) -> dict[str, PoolState]:
        """Placement's view of every pool (pools backing off after failed boots want none)."""
        now = time.monotonic()
        return {
            name: pool.state(warm_allowed=pool.retry_at <= now) for name, pool in self.pools.items()
        }

    # ------------------------------------------------------------------ scheduling

    def _limit_of(self, submitter: str) -> int:
        return self.config.submitters.policy(submitter).max_concurrent

    async def _schedule_loop(self) -> None:
        while not self.stopping:
            self._wake.clear()
            started = time.monotonic()
            try:
                await self.schedule_once()
            except Exception:
                self._log.exception("scheduling pass failed")
                await asyncio.sleep(1.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.poll_seconds):
                    await self._wake.wait()
            # Wake-ups that come in quick succession (jobs ending) share one pass.
            await asyncio.sleep(max(0.0, MIN_PASS_INTERVAL - (time.monotonic() - started)))

    def _can_place_any(self, states: Mapping[str, PoolState], free: Capacity) -> bool:
        idle_room = {
            name: Capacity(p.idle * p.cpus, p.idle * p.memory_mb) for name, p in states.items()
        }
        for name, p in states.items():
            if p.idle > 0:
                return True
            if p.total >= p.max:
                continue
            room = free
            for other, extra in idle_room.items():
                if other != name:
                    room = room.plus(extra.cpus, extra.memory_mb)
            if room.fits(p.cpus, p.memory_mb):
                return True
        return False

    async def schedule_once(self) -> list[str]:
        """One pass: claim what fits, start it, refill warm pools; return the claimed ids."""
        if self.stopping or self.displaced:
            return []
        self._drop_dead_idle()
        states = self.pool_states()
        free = self.free()
        decided: list[Plan] = []
        claimed: list[Job] = []
        if self._can_place_any(states, free):

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
                    per_queue=_slots(states, free),
                )
            )
        decision = decided[0] if decided else None
        if claimed and decision is not None:
            by_id = {a.job_id: a for a in decision.assignments}
            for job in claimed:
                self._observe_transition(JobView.of(job), JobState.QUEUED, JobState.ASSIGNED)
                self._dispatch(job, by_id[job.id])
        self._refill(hold=decision.waiting_for_capacity if decision else False)
        self._publish_vms()
        return [job.id for job in claimed]

    def _dispatch(self, job: Job, assignment: Assignment) -> None:
        assert self._tg is not None and job.pool is not None
        pool = self.pools[job.pool]
        run = JobRun(job=job, pool=pool.name)
        if assignment.warm:
            run.vm = self._take_idle(pool)
        if run.vm is None:
            freed_cpus = freed_memory = 0.0
            for donor in assignment.evict:
                victim = self._take_idle(self.pools[donor])
                if victim is not None:
                    freed_cpus += self.pools[donor].config.cpus
                    freed_memory += self.pools[donor].config.memory
                    run.evicted.append(victim)
            # The victims keep their capacity until they are destroyed (the host
            # holds them until then): the job takes now only what they do not
            # cover, and the rest in _settle_evicted.
            run.evicted_capacity = (freed_cpus, freed_memory)
            self._reserve(
                max(0.0, pool.config.cpus - freed_cpus),
                max(0.0, pool.config.memory - freed_memory),
            )
        pool.busy += 1
        self.jobs[job.id] = run
        run.task = self._tg.create_task(self._run_job(run), name=f"stoker-job-{job.id}")

    def _take_idle(self, pool: WarmPool) -> VM | None:
        """An idle VM of ``pool`` that is still alive (dead ones are discarded)."""
        while pool.idle:
            vm = pool.idle.popleft()
            if vm.state is VMState.READY and vm.vmm_pid is not None:
                return vm
            self._log.warning("idle VM %s of pool %s died; discarding it", vm.name, pool.name)
            self._discard(vm, pool)
        return None

    def _discard(self, vm: VM, pool: WarmPool) -> None:
        """Destroy a VM that is no longer in ``pool``'s idle list, releasing its capacity."""
        self._spawn(self._destroy(vm, release=(pool.config.cpus, pool.config.memory)))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a clean-up in the task group (or, while it shuts down, beside it)."""
        try:
            if self._tg is not None:
                self._tg.create_task(coro)
                return
        except RuntimeError:
            pass
        task = asyncio.get_running_loop().create_task(coro)
        self._stray.add(task)
        task.add_done_callback(self._stray.discard)

    async def _destroy(self, vm: VM, *, release: tuple[float, float] | None = None) -> None:
        """Destroy ``vm``; then (never before: the host holds it until it is gone)
        give its capacity back to the ledger."""
        try:
            await vm.destroy()
        except Exception as exc:
            self._log.error("destroying VM %s failed: %s", vm.name, exc)
        finally:
            if release is not None:
                self._release(*release)
                self._wake.set()
        await self._forget_vm(vm.name)

    async def _forget_vm(self, name: str) -> None:
        try:
            await self.db.run(lambda s: s.execute(delete(VMRecord).where(VMRecord.name == name)))
        except Exception as exc:
            self._log.warning("removing the record of VM %s failed: %s", name, exc)

    def _drop_dead_idle(self) -> None:
        for pool in self.pools.values():
            alive = deque(
                v for v in pool.idle if v.state is VMState.READY and v.vmm_pid is not None
            )
            if len(alive) != len(pool.idle):
                for vm in pool.idle:
                    if vm not in alive:
                        self._log.warning("idle VM %s of pool %s died", vm.name, pool.name)
                        self._discard(vm, pool)
                pool.idle = alive

    # ------------------------------------------------------------------ warm pools

    def _refill(self, *, hold: bool) -> None:
        if self.stopping or self._tg is None:
            return
        for name, count in replenish(self.pool_states(), self.free(), hold=hold).items():
            pool = self.pools[name]
            for _ in range(count):
                self._reserve(pool.config.cpus, pool.config.memory)
                pool.warming += 1
                task = self._tg.create_task(self._warm_one(pool), name=f"stoker-warm-{name}")
                self._warm_tasks.add(task)
                task.add_done_callback(self._warm_tasks.discard)

    def _new_vm(self, pool: WarmPool, *, seed: Path | None) -> VM:
        cfg = pool.config
        cls = FakeVM if isinstance(self.backend, FakeBackend) else ServiceVM
        return cls(
            cfg.image,
            cpus=cfg.cpus,
            memory=cfg.memory,
            disk=cfg.disk,
            accel=self.config.host.accel,
            backend=self.backend,
            dirs=self.dirs,
            seed=(seed, GUEST_DIR) if seed is not None else None,
            snapshot=cfg.snapshot,
            network=cfg.network,
        )

    async def _warm_one(self, pool: WarmPool) -> None:
        vm = self._new_vm(pool, seed=None)
        ready = False
        try:
            await self._record_vm(VMRecord(name=vm.name, pool=pool.name, state="booting"))
            t0 = time.monotonic()
            await vm.start()
            seconds = time.monotonic() - t0
            await self._record_vm(
                VMRecord(
                    name=vm.name,
                    pool=pool.name,
                    state="idle",
                    pid=vm.vmm_pid,
                    workdir=str(vm.workdir),
                )
            )
            ready = True
            self._observe("boot", "warm", seconds)
            self._log.info(
                "warm VM %s of pool %s ready in %.2fs%s",
                vm.name,
                pool.name,
                seconds,
                " (restored)" if vm.restored_from is not None else "",
                extra={"vm": vm.name, "pool": pool.name, "host": self.host},
            )
        except Exception as exc:
            pool.failures += 1
            delay = min(MAX_WARM_BACKOFF, 2.0**pool.failures)
            pool.retry_at = time.monotonic() + delay
            self._log.error(
                "warm boot for pool %s failed (retrying in %.0fs): %s", pool.name, delay, exc
            )
            self._observe("infrastructure_failure", "boot")
        finally:
            pool.warming -= 1
            if ready and not self.stopping:
                pool.failures = 0
                pool.idle.append(vm)
                self._wake.set()
            else:
                self._spawn(self._destroy(vm, release=(pool.config.cpus, pool.config.memory)))
            self._publish_vms()

    async def _record_vm(self, record: VMRecord) -> None:
        record.host = self.host
        record.created_at = utcnow()
        try:
            await self.db.run(lambda s: s.merge(record))
        except Exception as exc:
            self._log.warning("recording VM %s failed: %s", record.name, exc)

    # ------------------------------------------------------------------ running a job

    async def _run_job(self, run: JobRun) -> None:
        writer = LogWriter(
            self.db,
            run.job.id,
            limit=self.config.limits.max_log_bytes,
            secrets=secret_values(run.job),
            on_flush=self.notifier.notify,
        )
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
                outcome = self._stop_outcome(run.stop_reason or "shutdown")
        except Exception as exc:
            outcome = self._internal(exc)
        finally:
            await asyncio.shield(self._finish(run, writer, outcome))

    def _internal(self, exc: BaseException) -> Outcome:
        self._log.error("internal error running a job", exc_info=exc)
        return Outcome(None, f"internal error: {type(exc).__name__}: {exc}", failure="internal")

    def _stop_outcome(self, reason: StopReason) -> Outcome:
        if reason == "cancel":
            return Outcome(JobState.CANCELLED, "cancelled on request")
        if reason == "lease_lost":
            return Outcome(None, "this host lost the job's lease", lost=True)
        return Outcome(
            JobState.ERRORED,
            f"stoker serve on {self.host} shut down before the job finished",
            failure="infrastructure",
        )

    async def _execute(self, run: JobRun, writer: LogWriter) -> Outcome:
        """One attempt of a job: VM, source in, command, artifacts out (never raises)."""
        job = run.job
        pool = self.pools[run.pool]
        secrets_ = secret_values(job)
        phase = "preparing the job"
        try:
            for victim in run.evicted:
                await self._destroy(victim)
            run.evicted.clear()
            self._settle_evicted(run)
            files = JobFiles.of(self.config.jobs_dir, job.id)
            kind = _Kind.WARM if run.vm is not None else _Kind.COLD
            # A git source is fetched after the job is booting; anything else is ready now.
            source = self._ready_source(job, files)
            if run.vm is None and source is not None:
                run.vm = self._new_vm(pool, seed=source)
            run.job, log_state = await self._transition(
                run,
                JobState.BOOTING,
                fields={"vm_kind": kind.value, "vm_name": run.vm.name if run.vm else None},
                record=self._vm_record(run.vm, pool, job.id, "busy" if run.vm else "booting"),
                log_state=True,
            )
            assert log_state is not None
            writer.begin(*log_state)
            if job.artifacts:
                await asyncio.to_thread(files.reset_artifacts)
            if source is None:
                phase = "fetching the git source"
                source = await self._fetch_source(job, files)
                run.vm = self._new_vm(pool, seed=source)
                await self._record_vm(
                    VMRecord(name=run.vm.name, pool=pool.name, job_id=job.id, state="booting")
                )
            vm = run.vm
            assert vm is not None
            await writer.system(
                f"attempt {job.attempt + 1} on {self.host}: {kind.value} VM {vm.name} "
                f"(pool {pool.name}: {pool.config.cpus} vCPUs, {pool.config.memory} MiB)"
            )
            t0 = time.monotonic()
            if kind is _Kind.COLD:
                phase = "booting the VM"
                await vm.start()
                self._observe("boot", "cold", time.monotonic() - t0)
            else:
                phase = "copying the source in"
                await vm.put(source, GUEST_DIR)
            run.job, _ = await self._transition(
                run,
                JobState.RUNNING,
                fields={"vm_name": vm.name},
                record=self._vm_record(vm, pool, job.id, "busy"),
            )
            phase = "running the command"
            result = None
            try:
                result = await vm.exec(
                    list(job.argv),
                    env=job_env(job),
                    cwd=GUEST_DIR,
                    stdout=functools.partial(writer.write, "stdout"),
                    stderr=functools.partial(writer.write, "stderr"),
                    capture=False,
                    timeout=job.timeout_s,
                )
            except CommandTimeout:
                await writer.system(f"the command timed out after {job.timeout_s:g}s; killed it")
            artifacts: list[ArtifactFile] = []
            if job.artifacts:
                phase = "copying artifacts out"
                report, missing = await vm.get(
                    job.artifacts,
                    files.artifacts,
                    cwd=GUEST_DIR,
                    limits=ExtractLimits(max_bytes=self.config.limits.max_artifact_bytes),
                )
                artifacts = await asyncio.to_thread(_hash_artifacts, files.artifacts, report.files)
                if missing:
                    await writer.system(f"no files matched: {', '.join(missing)}")
            return self._judge(job, result, artifacts)
        except LeaseLost:
            return Outcome(None, "this host lost the job's lease", lost=True)
        except CancelRequested:
            return Outcome(JobState.CANCELLED, "cancelled on request")
        except JobInputError as exc:
            reason = redact(str(exc), secrets_)
            await self._say(writer, reason)
            return Outcome(JobState.FAILED, reason)
        except GuestProtocolError as exc:
            if phase in ("running the command", "copying artifacts out"):
                # The guest is the job's own code: it broke the protocol, the job fails.
                reason = redact(f"{phase}: the guest misbehaved: {_headline(exc)}", secrets_)
                await self._say(writer, reason)
                return Outcome(JobState.FAILED, reason)
            return await self._infra(writer, phase, exc, secrets_)
        except UsageError as exc:
            # A problem of this host's setup (an image that is not built): retrying will not help.
            reason = redact(f"{phase}: {_headline(exc)}", secrets_)
            await self._say(writer, reason + (f" ({exc.hint})" if exc.hint else ""))
            return Outcome(None, reason, failure="infrastructure", retry=False)
        except InfrastructureError as exc:
            return await self._infra(writer, phase, exc, secrets_)

    def _vm_record(self, vm: VM | None, pool: WarmPool, job_id: str, state: str) -> VMRecord | None:
        if vm is None:
            return None
        return VMRecord(
            name=vm.name,
            pool=pool.name,
            job_id=job_id,
            state=state,
            pid=vm.vmm_pid,
            workdir=str(vm.workdir) if vm.workdir else None,
        )

    async def _infra(
        self, writer: LogWriter, phase: str, exc: BaseException, secrets_: list[str]
    ) -> Outcome:
        reason = redact(f"{phase}: {_headline(exc)}", secrets_)
        self._log.warning(
            "infrastructure failure (%s): %s",
            phase,
            reason,
            extra={"job": writer.job_id, "host": self.host},
        )
        await self._say(writer, redact(f"{phase}: {exc}", secrets_))
        return Outcome(None, reason, failure=_classify(exc))

    async def _say(self, writer: LogWriter, text: str) -> None:
        with contextlib.suppress(Exception):
            await writer.system(text)

    def _judge(self, job: Job, result: Any, artifacts: list[ArtifactFile]) -> Outcome:
        kept = tuple(artifacts)
        if result is None:
            return Outcome(
                JobState.TIMED_OUT, f"timed out after {job.timeout_s:g}s", artifacts=kept
            )
        if result.spawn_error:
            reason = redact(f"cannot start the command: {result.spawn_error}", secret_values(job))
            return Outcome(JobState.FAILED, reason, exit_code=127, artifacts=kept)
        if result.exit_code == 0:
            return Outcome(JobState.SUCCEEDED, "exit status 0", exit_code=0, artifacts=kept)
        if result.exit_code is not None:
            return Outcome(
                JobState.FAILED,
                f"exit status {result.exit_code}",
                exit_code=result.exit_code,
                artifacts=kept,
            )
        try:
            name = f" ({signal.Signals(result.signal).name})"
        except ValueError:
            name = ""
        return Outcome(
            JobState.FAILED,
            f"killed by signal {result.signal}{name}",
            signal=result.signal,
            artifacts=kept,
        )

    def _ready_source(self, job: Job, files: JobFiles) -> Path | None:
        """The host directory copied to the guest, if it needs no fetching (None: git)."""
        if job.source_kind == "upload":
            if not files.source.is_dir():
                # Not the job's fault: this host does not see the shared storage directory.
                raise InfrastructureError(
                    f"the uploaded source of job {job.id} is missing from {files.source}",
                    hint="every host needs the same storage_dir",
                )
            return files.source
        if job.source_kind == "git":
            return files.source if files.source.is_dir() else None
        return self._empty

    async def _fetch_source(self, job: Job, files: JobFiles) -> Path:
        git = git_ref_of(job)
        await fetch_git(
            git.url,
            git.ref,
            files.source,
            timeout=self.config.git.timeout,
            max_bytes=self.config.limits.max_source_bytes,
            protocols=self.config.git.allow_protocols,
        )
        return files.source

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
        lease = timedelta(seconds=self.config.lease_seconds)
        if record is not None:
            record.host = self.host
            record.created_at = now

        def move(session: Session) -> tuple[str, Job, tuple[int, int, bool] | None]:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.host != self.host or JobState(job.state) not in ACTIVE:
                raise LeaseLost(job_id)
            if job.cancel_requested and to is not JobState.CANCELLED:
                raise CancelRequested(job_id)
            source = job.state
            transition(session, job, to, reason=reason, host=self.host, now=now)
            for key, value in (fields or {}).items():
                setattr(job, key, value)
            if to in ACTIVE:
                job.lease_until = now + lease
            if record is not None:
                session.merge(record)
            logs = None
            if log_state:
                last = session.scalar(
                    select(func.max(LogChunk.seq)).where(LogChunk.job_id == job_id)
                )
                logs = (last or 0, job.log_bytes, job.log_truncated)
            return source, job, logs

        source, job, logs = await self.db.run(move)
        self._observe_transition(JobView.of(job), source, to)
        self.notifier.notify(job_id)
        return job, logs

    def _settle_evicted(self, run: JobRun) -> None:
        """The evicted VMs are gone: their capacity becomes the job's (idempotent)."""
        cpus, memory = run.evicted_capacity
        if not cpus and not memory:
            return
        run.evicted_capacity = (0.0, 0.0)
        pool = self.pools[run.pool]
        self._release(cpus, memory)
        self._reserve(min(pool.config.cpus, cpus), min(pool.config.memory, memory))
        self._wake.set()

    async def _finish(self, run: JobRun, writer: LogWriter, outcome: Outcome | None) -> None:
        """Destroy the VM, then record the outcome with the last output; never raises."""
        job = run.job
        pool = self.pools[run.pool]
        try:
            if run.vm is not None:
                await run.vm.destroy()
            for victim in run.evicted:
                await victim.destroy()
        except Exception as exc:
            self._log.error("destroying the VM of job %s failed: %s", job.id, exc)
        finally:
            self._settle_evicted(run)
            self._release(pool.config.cpus, pool.config.memory)
            pool.busy -= 1
        try:
            if outcome is not None and not outcome.lost and outcome.state is None:
                await self._say(writer, f"infrastructure failure: {outcome.reason}")
            await writer.close()
            if outcome is None or outcome.lost:
                # Another host may own the job now: its log and state are not ours to write.
                self._log.warning("job %s: stopped without a result (%s)", job.id, run.stop_reason)
                if run.vm is not None:
                    await self._forget_vm(run.vm.name)
            else:
                await self._record_outcome(run, outcome, writer)
        except Exception as exc:
            # The lease runs out and a sweeper (maybe ours) recovers the job.
            self._log.error("recording the outcome of job %s failed: %s", job.id, exc)
        finally:
            self.jobs.pop(job.id, None)
            self.notifier.notify(job.id)
            self._publish_vms()
            self._wake.set()

    async def _record_outcome(self, run: JobRun, outcome: Outcome, writer: LogWriter) -> None:
        now = utcnow()
        job_id = run.job.id
        vm_name = run.vm.name if run.vm is not None else None
        retry_limit = self.config.retry_limit
        if outcome.failure is not None:
            self._observe("infrastructure_failure", outcome.failure)

        def record(session: Session) -> tuple[str, Job, JobState] | None:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.host != self.host or JobState(job.state) not in ACTIVE:
                return None
            source = job.state
            target = outcome.state
            reason = outcome.reason
            if target is None:
                if job.cancel_requested:
                    target, reason = JobState.CANCELLED, f"cancelled ({reason})"
                elif outcome.retry and job.attempt < retry_limit:
                    target = JobState.QUEUED
                else:
                    target = JobState.ERRORED
                    if outcome.retry:
                        reason = f"{reason}; gave up after {job.attempt + 1} attempts"
            elif job.cancel_requested and target is not JobState.CANCELLED:
                # Cancelled while it was finishing: the cancel wins, the result is kept.
                reason = f"cancelled on request (it had {target}: {reason})"
                target = JobState.CANCELLED
            writer.store_rest(session, job)
            transition(session, job, target, reason=reason, host=self.host, now=now)
            if target in TERMINAL:
                job.exit_code = outcome.exit_code
                job.signal = outcome.signal
                session.execute(delete(Artifact).where(Artifact.job_id == job_id))
                session.add_all(
                    Artifact(job_id=job_id, name=a.name, size=a.size, sha256=a.sha256, path=a.path)
                    for a in outcome.artifacts
                )
            if vm_name is not None:
                session.execute(delete(VMRecord).where(VMRecord.name == vm_name))
            return source, job, target

        done = await self.db.run(record)
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

    # ------------------------------------------------------------------ heartbeat and sweeping

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            try:
                await self.heartbeat_once()
            except Exception:
                self._log.exception("heartbeat failed")

    async def heartbeat_once(self) -> None:
        """Renew leases, notice cancels and take-overs, recover other hosts' lost jobs."""
        now = utcnow()
        local = list(self.jobs)
        until = now + timedelta(seconds=self.config.lease_seconds)

        def beat(session: Session) -> tuple[bool, set[str], set[str]]:
            alive = heartbeat(session, host=self.host, incarnation=self.incarnation, now=now)
            held = renew_leases(session, host=self.host, job_ids=local, until=until)
            cancels: set[str] = set()
            if local:
                cancels = set(
                    session.scalars(
                        select(Job.id).where(Job.id.in_(local), Job.cancel_requested.is_(True))
                    )
                )
            return alive, held, cancels

        alive, held, cancels = await self.db.run(beat)
        if not alive and not self.displaced:
            self.displaced = True
            self._log.error(
                "another stoker serve now runs as host %r: this one claims no more jobs",
                self.host,
            )
        for job_id in local:
            run = self.jobs.get(job_id)
            if run is None:
                continue
            if job_id not in held:
                run.stop("lease_lost")
            elif job_id in cancels:
                run.stop("cancel")
        await self.sweep(now)
        self._drop_dead_idle()
        await self._publish_queue_depth()
        self._publish_vms()

    async def sweep(self, now: datetime | None = None) -> int:
        """Recover jobs whose host stopped heartbeating; return how many."""
        at = now or utcnow()
        local = set(self.jobs)
        stale_before = at - timedelta(seconds=self.config.lease_seconds)

        def recover(session: Session) -> list[tuple[JobView, str, JobState]]:
            changes = []
            for job in expired_jobs(session, now=at):
                if job.id in local:
                    continue  # ours and running: the heartbeat just renewed it
                source, lost_host = job.state, job.host
                why = f"host {lost_host} stopped heartbeating (lease expired)"
                target = self._recover(session, job, why, at)
                changes.append((JobView.of(job), source, target))
            silent = select(Host.name).where(
                Host.heartbeat_at < stale_before, Host.name != self.host
            )
            session.execute(delete(VMRecord).where(VMRecord.host.in_(silent)))
            return changes

        changes = await self.db.run(recover)
        for view, source, target in changes:
            self._log.warning(
                "job %s: %s -> %s (%s)",
                view.id,
                source,
                target,
                view.reason,
                extra={"job": view.id, "state": target.value, "host": self.host},
            )
            self._observe_transition(view, source, target)
            self._observe("infrastructure_failure", "host_lost")
        if changes:
            self._wake.set()
        return len(changes)

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
        counts = {"booting": 0, "idle": 0, "busy": 0}
        for pool in self.pools.values():
            counts["idle"] += len(pool.idle)
            counts["booting"] += pool.warming
        for run in self.jobs.values():
            if run.vm is not None and run.vm.state is VMState.READY:
                counts["busy"] += 1
            else:
                counts["booting"] += 1
        return counts

    def _publish_vms(self) -> None:
        self._observe("vm_state_counts", self.vm_counts())

    async def _publish_queue_depth(self) -> None:
        def count(session: Session) -> dict[str, int]:
            rows = session.execute(
                select(Job.pool, func.count())
                .where(Job.state == JobState.QUEUED.value)
                .group_by(Job.pool)
            )
            return {pool or "": n for pool, n in rows}

        depth = await self.db.run(count, write=False)
        for name in self.pools:
            self._observe("queue_depth", name, depth.get(name, 0))


def _slots(states: Mapping[str, PoolState], free: Capacity) -> int:
    """About how many jobs one pass can start (how deep to look into each queue)."""
    idle = sum(p.idle for p in states.values())
    new = max(
        (
            min(p.max - p.total, int(min(free.cpus / p.cpus, free.memory_mb / p.memory_mb)))
            for p in states.values()
        ),
        default=0,
    )
    return min(16, max(1, idle + new))


def kill_stray_vmms(runtime: Path) -> list[int]:
    """SIGKILL VMMs working in ``runtime`` whose owning stoker process is gone.

    A VMM's working directory is its VM's work directory (see
    :class:`stoker.backends.qemu.QemuBackend`), which records its owner.
    VMMs of a live owner (another stoker using the same directory) are left
    alone.
    """
    killed: list[int] = []
    if not runtime.is_dir():
        return killed
    root = runtime.resolve()
    for proc in Path("/proc").iterdir():
        entry = proc.name
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            cwd = (proc / "cwd").readlink()
        except OSError:
            continue
        if b"qemu-system" not in cmdline or not cwd.is_relative_to(root):
            continue
        owner = _owner_alive(cwd / OWNER_FILE)
        if owner:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(entry), signal.SIGKILL)
            killed.append(int(entry))
    return killed


def _owner_alive(owner_file: Path) -> bool:
    try:
        recorded = owner_file.read_text().strip()
    except OSError:
        return False
    pid = recorded.split(":", 1)[0]
    if not pid.isdigit():
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return f"{pid}:{stat.rsplit(')', 1)[1].split()[19]}" == recorded
