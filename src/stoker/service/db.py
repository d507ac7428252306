"""The database: engines, transactions run off the event loop, migrations, the claim.

SQLite (the default) runs in WAL mode with a busy timeout and foreign keys;
every write transaction starts with ``BEGIN IMMEDIATE``, so two processes on
one file serialise their writes up front instead of failing half-way when
they both upgrade a read lock.  PostgreSQL is reached with psycopg 3; claims
lock the rows they take with ``SELECT ... FOR UPDATE SKIP LOCKED`` under a
transaction-scoped advisory lock, so hosts never take the same job and never
overshoot a submitter's concurrency limit together.

The event loop never blocks on the database: :meth:`Database.run` runs a
function of a :class:`~sqlalchemy.orm.Session` in a worker thread (one for
SQLite: it has one writer anyway), inside one transaction, retried when the
database reports a transient conflict.

Outages (PostgreSQL restarted or unreachable, SQLite's disk full) are
:class:`DatabaseUnavailable` and :class:`DatabaseFull`; :class:`DatabaseHealth`
counts them and logs one line when the database goes away and one when it is
back.  While it is unreachable, calls fail at once without a connection attempt
until the next probe (backoff up to :data:`MAX_PROBE_INTERVAL`), so a hundred
jobs do not hammer a server that is starting.  Callers choose how long to wait
for it (:meth:`Database.run`'s ``patience``): the REST API not at all (503/507),
a job's own transitions up to :data:`JOB_PATIENCE`, the loops skip a round.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Engine, create_engine, delete, event, func, select, update
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from stoker.errors import InfrastructureError
from stoker.service.jobs import ACTIVE, JobState, recover, transition
from stoker.service.jobviews import JobView
from stoker.service.models import Host, Job, LogChunk, VMRecord, utcnow
from stoker.service.scheduler import Candidate

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Key of the advisory lock PostgreSQL claims and migrations take (any constant would do).
CLAIM_LOCK = 0x53544F4B  # "STOK"
MIGRATION_LOCK = 0x53544F4D
#: How many times a transaction is retried after a transient conflict.
RETRIES = 8
#: Candidates one claim looks at, at most.
MAX_CANDIDATES = 2000
SQLITE_BUSY_MS = 30_000
#: Seconds a job's own database writes (transitions, output, result) wait through an outage.
JOB_PATIENCE = 900.0
#: While the database is unreachable, one call tries it at least this often.
MAX_PROBE_INTERVAL = 2.0
#: A full disk counts as freed once writes have worked this long: small ones that fit in
#: free pages succeed on a full disk too, and must not make the health flap.
DISK_FULL_QUIET = 3.0
#: How long one PostgreSQL connection attempt may take (seconds).
PG_CONNECT_TIMEOUT = 5


class DatabaseError(InfrastructureError):
    """The database could not be reached or refused a transaction for good."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached (refused, connection lost, server shutting down)."""


class DatabaseFull(DatabaseError):
    """The database's disk is full: nothing can be written until space is freed (HTTP 507)."""


def _failure_kind(exc: DBAPIError) -> type[DatabaseError] | None:
    """:class:`DatabaseFull`, :class:`DatabaseUnavailable`, or None (a real error)."""
    orig = exc.orig
    code = str(getattr(orig, "sqlstate", None) or "")
    text = str(orig).lower()
    if code == "53100" or "database or disk is full" in text or "no space left" in text:
        return DatabaseFull
    if exc.connection_invalidated or code.startswith("08") or code in ("57P01", "57P02", "57P03"):
        return DatabaseUnavailable
    # psycopg: connecting failed or the connection broke (no SQLSTATE from a server).
    # SQLite: "unable to open database file", "disk I/O error" (not "locked", "busy").
    broken = isinstance(exc, OperationalError | InterfaceError) and not code
    if broken and "locked" not in text and "busy" not in text:
        return DatabaseUnavailable
    return None


class DatabaseHealth:
    """Whether the database works, as the calls of one :class:`Database` found it.

    Thread-safe (calls run in worker threads).  Logs one line when the
    database becomes unreachable (or its disk full) and one when it works
    again, with how long it did not.
    """

    def __init__(self, url: str) -> None:
        self._where = _redact(url)
        self._lock = threading.Lock()
        #: "unreachable", "disk full" or None.
        self.problem: str | None = None
        self.last_error: str | None = None
        #: Failed calls, by kind ("unreachable", "disk_full").
        self.errors: dict[str, int] = {"unreachable": 0, "disk_full": 0}
        self.outages = 0
        self._since = time.monotonic()
        self._next_probe = 0.0
        self._backoff = 0.1
        #: Since when writes have worked on a disk that was full (None: not since the last failure).
        self._writable_since: float | None = None

    @property
    def up(self) -> bool:
        return self.problem is None

    def down_for(self) -> float:
        """Seconds since the current problem began (0 when there is none)."""
        return 0.0 if self.up else time.monotonic() - self._since

    def working_for(self) -> float:
        """Seconds this database has worked without a failed call (0 while it does not)."""
        return time.monotonic() - self._since if self.up else 0.0

    def describe(self) -> str | None:
        """The problem in one line (None: none)."""
        if self.problem is None:
            return None
        return f"database {self.problem} for {self.down_for():.0f}s: {self.last_error}"

    def retry_in(self) -> float:
        """Seconds until the next attempt is worth making."""
        with self._lock:
            return max(0.05, self._next_probe - time.monotonic()) if self.problem else 0.0

    def may_try(self) -> bool:
        """Whether a call should reach the database now (False: fail it at once)."""
        with self._lock:
            if self.problem != "unreachable":
                return True
            now = time.monotonic()
            if now < self._next_probe:
                return False
            # This call is the probe; the others keep failing fast until it returns.
            self._next_probe = now + self._backoff
            return True

    def failed(self, kind: type[DatabaseError], error: str) -> None:
        problem = "disk full" if kind is DatabaseFull else "unreachable"
        with self._lock:
            self.errors[problem.replace(" ", "_")] += 1
            self.last_error = error
            self._writable_since = None
            if self.problem == problem:
                self._backoff = min(self._backoff * 2, MAX_PROBE_INTERVAL)
                self._next_probe = time.monotonic() + self._backoff
                return
            first = self.problem is None
            self.problem = problem
            self._backoff = 0.1
            self._next_probe = time.monotonic() + self._backoff
            if first:
                self._since = time.monotonic()
                self.outages += 1
        log.error(
            "database %s (%s): %s; retrying with backoff, running jobs go on",
            problem,
            self._where,
            error,
        )

    def succeeded(self, *, write: bool) -> None:
        if self.problem is None or (self.problem == "disk full" and not write):
            return  # reads work on a full disk: only a write shows there is room again
        with self._lock:
            if self.problem is None:
                return
            now = time.monotonic()
            if self.problem == "disk full":
                self._writable_since = self._writable_since or now
                if now - self._writable_since < DISK_FULL_QUIET:
                    return
            problem, self.problem = self.problem, None
            down = time.monotonic() - self._since
            self._since = time.monotonic()
        what = "reachable" if problem == "unreachable" else "writable"
        log.warning("database %s again after %.1fs (%s)", what, down, self._where)


def _redact(url: str) -> str:
    """``url`` without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "the database"


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with stoker's connection settings (see the module docstring)."""
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": SQLITE_BUSY_MS / 1000, "check_same_thread": False}
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # pool_pre_ping: a connection the server dropped (restart) is replaced on checkout;
    # keepalives: a server that vanished from the network is noticed, not waited for.
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=8,
        max_overflow=8,
        connect_args={
            "connect_timeout": PG_CONNECT_TIMEOUT,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        },
    )


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite would defer it).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL + NORMAL: a commit survives a crash of this process (not of the machine's power).
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _sqlite_begin(connection: Any) -> None:
    write = connection.get_execution_options().get("stoker_write", True)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _transient(exc: DBAPIError) -> bool:
    """A conflict worth retrying: SQLite busy, PostgreSQL serialisation failure or deadlock."""
    orig = exc.orig
    code = getattr(orig, "sqlstate", None)
    if code in ("40001", "40P01"):
        return True
    text = str(orig).lower()
    return "database is locked" in text or "database is busy" in text


class Database:
    """An engine plus a worker thread pool that runs transactions for the event loop."""

    def __init__(self, url: str, *, threads: int | None = None) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.is_sqlite = url.startswith("sqlite")
        self.is_postgres = url.startswith("postgresql")
        self._executor = ThreadPoolExecutor(
            max_workers=threads or (1 if self.is_sqlite else 4), thread_name_prefix="stoker-db"
        )
        self.health = DatabaseHealth(url)
        self._stop_waiting = False

    @contextlib.contextmanager
    def session(self, *, write: bool = True) -> Iterator[Session]:
        """A session in one transaction, committed when the block ends without error."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            if self.is_sqlite:
                # Before the first statement: the "begin" event reads it (BEGIN IMMEDIATE or not).
                session.connection(execution_options={"stoker_write": write})
            yield session

    def call(self, fn: Callable[[Session], T], *, write: bool = True) -> T:
        """Run ``fn(session)`` in one transaction (blocking); retry transient conflicts.

        Raises :class:`DatabaseUnavailable` or :class:`DatabaseFull` (at once
        while a known outage lasts, see :class:`DatabaseHealth`).
        """
        if not self.health.may_try():
            raise DatabaseUnavailable(self.health.describe() or "database unreachable")
        for attempt in range(RETRIES):
            try:
                with self.session(write=write) as session:
                    result = fn(session)
                self.health.succeeded(write=write)
                return result
            except DBAPIError as exc:
                kind = _failure_kind(exc)
                if kind is not None and not (exc.connection_invalidated and attempt == 0):
                    # (A pooled connection the server dropped gets one immediate retry.)
                    error = " ".join(str(exc.orig).split())
                    self.health.failed(kind, error)
                    what = "disk is full" if kind is DatabaseFull else "is unreachable"
                    raise kind(f"the database {what}: {error}") from exc
                if attempt + 1 == RETRIES or not (_transient(exc) or exc.connection_invalidated):
                    raise
                delay = min(0.02 * 2**attempt, 1.0)
                log.debug("transient database error (retrying in %.2fs): %s", delay, exc.orig)
                time.sleep(delay)
        raise AssertionError("unreachable")

    async def run(
        self, fn: Callable[[Session], T], *, write: bool = True, patience: float = 0.0
    ) -> T:
        """:meth:`call` in the database thread, awaited from the event loop.

        ``patience``: seconds to keep retrying (with the health's backoff)
        while the database is unreachable or full; 0 fails at once.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        while True:
            try:
                return await loop.run_in_executor(
                    self._executor, functools.partial(self.call, fn, write=write)
                )
            except (DatabaseUnavailable, DatabaseFull):
                left = deadline - loop.time()
                if left <= 0 or self._stop_waiting:
                    raise
                await asyncio.sleep(min(left, max(self.health.retry_in(), 0.25)))

    def steady_for(self, seconds: float) -> bool:
        """Whether every call of the last ``seconds`` worked (see the sweep's rule)."""
        return self.health.working_for() >= seconds

    def stop_waiting(self) -> None:
        """Make callers waiting through an outage give up (the service is stopping)."""
        self._stop_waiting = True

    def close(self) -> None:
        """Wait for running transactions, then close every connection (idempotent)."""
        self._executor.shutdown(wait=True)
        self.engine.dispose()


# --- migrations ---------------------------------------------------------------------------------


def alembic_config(url: str) -> Any:
    """Alembic's configuration for ``url``, without an ``alembic.ini``."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    # configparser interpolation: a literal '%' in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (``stoker serve`` does this on start).

    Safe when several hosts start at once: SQLite serialises the migration
    with ``BEGIN IMMEDIATE``, PostgreSQL with an advisory lock (its DDL is
    transactional, so a host that waited finds the tables in place).
    """
    from alembic import command

    cfg = alembic_config(url)
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.execute(select(func.pg_advisory_xact_lock(MIGRATION_LOCK)))
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at (None: not initialised)."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


# --- the claim ----------------------------------------------------------------------------------

Chooser = Callable[[Sequence[Candidate], dict[str, int]], Sequence[str]]


def claim_jobs(
    session: Session,
    *,
    host: str,
    pools: Collection[str],
    choose: Chooser,
    lease_seconds: float,
    per_queue: int = 16,
    now: datetime | None = None,
    exclude: Collection[str] = (),
) -> list[Job]:
    """Claim the queued jobs ``choose`` picks; they become ``assigned`` to ``host``.

    ``choose`` (the scheduler's pure policy) sees the first ``per_queue``
    queued jobs of every (submitter, pool) queue in priority and FIFO order,
    and the number of jobs every submitter has running anywhere.  On
    PostgreSQL the candidates are locked with ``FOR UPDATE SKIP LOCKED`` (a
    job another transaction holds is simply not a candidate this time) and the
    whole claim runs under an advisory lock, so concurrent claims from several
    hosts cannot both use a submitter's last free slot.  ``exclude``: jobs this
    host is still winding down (another host requeued them): not claimed here.
    """
    at = now or utcnow()
    if not pools:
        return []
    postgres = session.get_bind().dialect.name == "postgresql"
    if postgres:
        session.execute(select(func.pg_advisory_xact_lock(CLAIM_LOCK)))
    queued: list[ColumnElement[bool]] = [
        Job.state == JobState.QUEUED.value,
        Job.pool.in_(list(pools)),
    ]
    if exclude:
        queued.append(Job.id.not_in(list(exclude)))
    rank = (
        func.row_number()
        .over(
            partition_by=(Job.submitter, Job.pool),
            order_by=(Job.priority.desc(), Job.created_at, Job.id),
        )
        .label("rank")
    )
    # Only the columns placement needs: loading whole rows for every candidate is
    # what would make a pass over a long queue slow.
    columns = (
        Job.id,
        Job.submitter,
        Job.pool,
        Job.priority,
        Job.created_at,
        Job.cpus,
        Job.memory_mb,
    )
    heads = select(*columns, rank).where(*queued).subquery()
    first = select(*(heads.c[c.key] for c in columns)).where(heads.c.rank <= per_queue)
    first = first.order_by(heads.c.rank).limit(MAX_CANDIDATES)
    if postgres:
        # FOR UPDATE cannot go with a window function: rank, then lock what is still queued.
        ids = [row[0] for row in session.execute(first)]
        if not ids:
            return []
        locked = (
            select(*columns)
            .where(Job.id.in_(ids), Job.state == JobState.QUEUED.value)
            .with_for_update(skip_locked=True, of=Job)
        )
        rows = session.execute(locked).all()
    else:
        rows = session.execute(first).all()
    if not rows:
        return []
    candidates = {
        row.id: Candidate(
            id=row.id,
            submitter=row.submitter,
            pool=row.pool or "",
            priority=row.priority,
            created_at=row.created_at,
            cpus=row.cpus,
            memory_mb=row.memory_mb,
        )
        for row in rows
    }
    counts = session.execute(
        select(Job.submitter, func.count())
        .where(Job.state.in_([s.value for s in ACTIVE]))
        .group_by(Job.submitter)
    )
    running = {submitter: n for submitter, n in counts}
    chosen = [i for i in choose(list(candidates.values()), running) if i in candidates]
    if not chosen:
        return []
    jobs = {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(chosen)))}
    claimed = []
    for job_id in chosen:
        job = jobs[job_id]
        transition(session, job, JobState.ASSIGNED, host=host, now=at)
        job.lease_until = at + timedelta(seconds=lease_seconds)
        claimed.append(job)
    return claimed


def expired_jobs(session: Session, *, now: datetime, limit: int = 100) -> list[Job]:
    """Claimed jobs whose lease ran out (their host stopped heartbeating), locked."""
    query = (
        select(Job)
        .where(Job.state.in_([s.value for s in ACTIVE]), Job.lease_until < now)
        .order_by(Job.lease_until)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return list(session.scalars(query))


def recover_expired(
    session: Session,
    *,
    host: str,
    now: datetime,
    local: Collection[str],
    lease_seconds: float,
    retry_limit: int,
) -> list[tuple[JobView, str, JobState]]:
    """Recover jobs whose host stopped heartbeating (but ``local``: ``host`` runs them),
    drop the VM records of silent hosts; return (job, from state, to state) of each."""
    changes = []
    for job in expired_jobs(session, now=now):
        if job.id in local:
            continue
        source, lost_host = job.state, job.host
        why = f"host {lost_host} stopped heartbeating (lease expired)"
        target = recover(session, job, why, retry_limit, now)
        changes.append((JobView.of(job), source, target))
    stale_before = now - timedelta(seconds=lease_seconds)
    silent = select(Host.name).where(Host.heartbeat_at < stale_before, Host.name != host)
    session.execute(delete(VMRecord).where(VMRecord.host.in_(silent)))
    return changes


def renew_leases(
    session: Session,
    *,
    host: str,
    job_ids: Collection[str],
    until: datetime,
    attempts: Mapping[str, int] | None = None,
) -> set[str]:
    """Extend ``host``'s leases on ``job_ids``; return the ids it still holds.

    With ``attempts`` (job id -> the attempt this host runs), a job requeued
    and claimed again since (its attempt moved on) is not held any more, even
    by the same host: the attempt is the fencing token of a claim.
    """
    if not job_ids:
        return set()
    rows = session.execute(
        select(Job.id, Job.attempt).where(
            Job.id.in_(list(job_ids)),
            Job.host == host,
            Job.state.in_([s.value for s in ACTIVE]),
        )
    )
    held = {i for i, attempt in rows if attempts is None or attempts.get(i) == attempt}
    if held:
        session.execute(update(Job).where(Job.id.in_(list(held))).values(lease_until=until))
    return held


def heartbeat(session: Session, *, host: str, incarnation: str, now: datetime) -> bool:
    """Record that ``host`` is alive; False when another process took its name over."""
    row = session.get(Host, host)
    if row is None or row.incarnation != incarnation:
        return False
    row.heartbeat_at = now
    return True


def log_end(session: Session, job_id: str) -> tuple[int, int, bool]:
    """Where a job's stored output ends: its last chunk's seq, output bytes, truncated."""
    job = session.get(Job, job_id)
    last = session.scalar(select(func.max(LogChunk.seq)).where(LogChunk.job_id == job_id))
    if job is None:
        raise LookupError(job_id)
    return last or 0, job.log_bytes, job.log_truncated


def recover_orphans(
    session: Session, *, host: str, why: str, retry_limit: int, keep: Sequence[str] = ()
) -> list[tuple[JobView, str, JobState]]:
    """Recover the active jobs of ``host`` but ``keep`` (see :func:`jobs.recover`);
    return (job, from state, to state) of each."""
    now = utcnow()
    orphans = session.scalars(
        select(Job)
        .where(
            Job.host == host,
            Job.state.in_([s.value for s in ACTIVE]),
            Job.id.not_in(list(keep)),
        )
        .with_for_update()
    ).all()
    changes = []
    for job in orphans:
        source = job.state
        target = recover(session, job, why, retry_limit, now)
        changes.append((JobView.of(job), source, target))
    return changes


def forget_vms(session: Session, *, host: str, keep: Sequence[str] = ()) -> int:
    """Delete the VM records of ``host`` but ``keep`` (its VMs are gone); return how many."""
    result = session.execute(
        delete(VMRecord).where(VMRecord.host == host, VMRecord.name.not_in(list(keep)))
    )
    return int(getattr(result, "rowcount", 0) or 0)


def register_host(
    session: Session,
    *,
    name: str,
    capacity: tuple[int, int, float],
    version: str,
    incarnation: str,
    now: datetime,
) -> Host:
    """Record that ``name`` (re)started now with ``capacity`` (cpus, MiB, overcommit)."""
    row = session.get(Host, name, with_for_update=True)
    if row is None:
        row = Host(name=name, started_at=now)
        session.add(row)
    row.cpus, row.memory_mb, row.overcommit = capacity
    row.started_at = now
    row.heartbeat_at = now
    row.version = version
    row.status = "running"
    row.incarnation = incarnation
    return row


def cancel_requests(session: Session, *, job_ids: Collection[str]) -> set[str]:
    """Which of ``job_ids`` someone asked to cancel."""
    if not job_ids:
        return set()
    query = select(Job.id).where(Job.id.in_(list(job_ids)), Job.cancel_requested.is_(True))
    return set(session.scalars(query))


def existing_job_ids(session: Session, *, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` have a job row."""
    found: set[str] = set()
    for i in range(0, len(ids), 500):
        found.update(session.scalars(select(Job.id).where(Job.id.in_(ids[i : i + 500]))))
    return found


def queue_depth(session: Session) -> dict[str, int]:
    """Queued jobs by pool (``""``: jobs without one)."""
    rows = session.execute(
        select(Job.pool, func.count()).where(Job.state == JobState.QUEUED.value).group_by(Job.pool)
    )
    return {pool or "": n for pool, n in rows}
