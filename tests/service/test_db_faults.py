"""Database faults: PostgreSQL restarted or gone for a while mid-run, SQLite on a full disk.

One or two services (hosts ``host-a`` and ``host-b``, fake backend) share a
PostgreSQL cluster of the test's own (:class:`pgcluster.PgCluster`), which
the test restarts or stops for ``STOKER_TEST_PG_OUTAGE`` seconds (default 5;
the issue's one-minute case is ``STOKER_TEST_PG_OUTAGE=60``) while jobs run
on each.  Every job must end once, with its whole output, without a second
attempt; every service must say the database went away and came back, and
work again by itself.  A host cut off alone (a partition) gives its jobs up to
the others cleanly.  SQLite's file on a full tmpfs: 507, no corruption, and
everything works again once there is room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sqlite3
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pgcluster import CuttableProxy, PgCluster, pg_bindir
from sqlalchemy import update

from stoker.service.apiutil import from_stoker
from stoker.service.config import ServiceConfig
from stoker.service.db import (
    MAX_PROBE_INTERVAL,
    DatabaseError,
    DatabaseFull,
    DatabaseHealth,
    DatabaseUnavailable,
)
from stoker.service.fake_backend import FakeBackend
from stoker.service.jobs import JobRequest, JobState
from stoker.service.jobviews import JobView
from stoker.service.logs import LogWriter
from stoker.service.metrics import Metrics
from stoker.service.models import Job
from stoker.service.service import Service

ConfigFactory = Callable[..., ServiceConfig]

#: Seconds PostgreSQL stays down in the "unreachable" case.
OUTAGE = float(os.environ.get("STOKER_TEST_PG_OUTAGE", "5"))
#: Jobs per host.
JOBS_PER_HOST = 3
TICK = 0.5


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds (test observation only; generous deadlines)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        await asyncio.sleep(0.1)


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL cluster of this test's own, which it may stop and restart."""
    bindir = pg_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb)")
    with PgCluster(bindir) as cluster:
        yield cluster


def ticker(seconds: float) -> JobRequest:
    """A job printing ``tick N`` every TICK seconds for ``seconds``: output during the fault."""
    n = int(seconds / TICK)
    script = f'i=0; while [ $i -lt {n} ]; do echo "tick $i"; i=$((i+1)); sleep {TICK}; done'
    return JobRequest(command=("sh", "-c", script))


async def stdout_of(service: Service, job_id: str) -> str:
    return "".join(c.text for c in await service.logs(job_id) if c.stream == "stdout")


async def until_printing(service: Service, job_id: str) -> None:
    """Wait until a :func:`ticker` job's output is in the database."""

    async def printing() -> bool:
        return "tick 1" in await stdout_of(service, job_id)

    await until(printing, 60, "the job printing")


async def system_of(service: Service, job_id: str) -> str:
    return "".join(c.text for c in await service.logs(job_id) if c.stream == "system")


class Hosts:
    """Services (hosts) with their own state directories on one database."""

    def __init__(self, make_config: ConfigFactory, tmp_path: Path, url: str) -> None:
        self.services: list[Service] = []
        self.metrics: list[Metrics] = []
        self._make = make_config
        self._tmp = tmp_path
        self._url = url

    async def start(
        self,
        names: tuple[str, ...] = ("host-a", "host-b"),
        urls: dict[str, str] | None = None,
    ) -> list[Service]:
        started = []
        for name in names:
            config = self._make(
                database_url=(urls or {}).get(name, self._url),
                state_dir=str(self._tmp / name),
                # Room for JOBS_PER_HOST one-vCPU jobs each: both hosts run some.
                host={"name": name, "cpus": JOBS_PER_HOST},
                lease_seconds=2.0,
                heartbeat_seconds=0.5,
            )
            metrics = Metrics()
            service = Service(config, backend=FakeBackend(), observer=metrics)
            await service.start()
            self.services.append(service)
            self.metrics.append(metrics)
            started.append(service)
        return started

    async def stop(self) -> None:
        for service in reversed(self.services):
            await service.stop(grace=5)


@pytest.fixture
async def hosts(make_config: ConfigFactory, tmp_path: Path, pg_cluster: PgCluster) -> Any:
    hosts = Hosts(make_config, tmp_path, pg_cluster.url)
    try:
        yield hosts
    finally:
        await hosts.stop()


def _only_once(text: str, n: int) -> list[str]:
    """What is wrong with ``text`` as the output of :func:`ticker` with ``n`` ticks."""
    ticks = re.findall(r"tick (\d+)", text)
    expected = [str(i) for i in range(n)]
    return [] if ticks == expected else [f"ticks {ticks} (expected 0..{n - 1} once each)"]


@pytest.mark.parametrize(
    ("fault", "n_hosts"), [("restart", 2), ("outage", 1), ("outage", 2)], ids=str
)
async def test_postgres_fault_mid_run(
    fault: str,
    n_hosts: int,
    hosts: Hosts,
    pg_cluster: PgCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="stoker")
    started = await hosts.start(names=("host-a", "host-b")[:n_hosts])
    a, b = started[0], started[-1]
    outage = OUTAGE if fault == "outage" else 0.0
    duration = outage + 8.0
    jobs: list[JobView] = []
    for i in range(n_hosts * JOBS_PER_HOST):
        # A submitter each: the default policy runs at most 4 jobs of one submitter at once.
        jobs.append(await (a, b)[i % 2].submit(ticker(duration), f"ci{i}"))

    async def all_running() -> bool:
        views = [await a.get(j.id) for j in jobs]
        return all(v.state is JobState.RUNNING for v in views)

    await until(all_running, 60, "every job running")
    ran_on = {(await a.get(j.id)).host for j in jobs}

    async def follow(service: Service, job_id: str) -> str:
        return "".join([c.text async for c in service.follow_logs(job_id) if c.stream == "stdout"])

    # A live follower on each host stays through the fault and misses nothing.
    followers = [asyncio.create_task(follow(s, j.id)) for s, j in ((a, jobs[0]), (b, jobs[-1]))]
    seen_down: dict[str, bool] = {}
    if fault == "restart":
        await asyncio.to_thread(pg_cluster.restart)
    else:
        await asyncio.to_thread(pg_cluster.stop)
        try:
            # While it is gone: submissions fail with a clear infrastructure error, health says so.
            with pytest.raises(DatabaseError, match="database"):
                await a.submit(ticker(1), "ci")
            for service in started:
                health = await service.health()
                seen_down[service.config.host.name] = (
                    health.status == "degraded" and not health.database
                )
            await asyncio.sleep(outage)
        finally:
            await asyncio.to_thread(pg_cluster.start)

    async def all_ended() -> bool:
        try:
            views = [await a.get(j.id) for j in jobs]
        except DatabaseError:
            return False
        return all(v.state.terminal for v in views)

    await until(all_ended, duration + 120, "every job ended")
    problems = []
    for job in jobs:
        view = await a.get(job.id)
        if view.state is not JobState.SUCCEEDED or view.attempt != 0:
            problems.append(f"{job.id}: {view.state} attempt {view.attempt} ({view.reason})")
        states = [e.to_state.value for e in view.events]
        if states != ["queued", "assigned", "booting", "running", "succeeded"]:
            problems.append(f"{job.id}: went through {states}")
        wrong = _only_once(await stdout_of(a, job.id), int(duration / TICK))
        problems.extend(f"{job.id}: {w}" for w in wrong)
    for follower in followers:
        problems.extend(_only_once(await asyncio.wait_for(follower, 60), int(duration / TICK)))
    assert not problems, "\n".join(problems)
    names = {s.config.host.name for s in started}
    assert ran_on == names
    if seen_down:
        assert seen_down == dict.fromkeys(names, True)

    # Both hosts said what happened, once each way, and recovered by themselves.
    messages = [r.getMessage() for r in caplog.records]
    for service, metrics in zip(started, hosts.metrics, strict=True):
        assert (await service.health()).status == "ok"
        text = metrics.render().decode()
        assert "stoker_db_up 1.0" in text
        errors = re.search(r'^stoker_db_errors_total\{kind="unreachable"\} (\S+)$', text, re.M)
        assert errors is not None and float(errors.group(1)) >= 1
    assert any("database unreachable" in m for m in messages), messages
    back = [m for m in messages if "database reachable again after" in m]
    assert back, messages
    after = await b.submit(ticker(1), "ci")
    done = await b.wait(after.id, timeout=60)
    assert done.state is JobState.SUCCEEDED


# ------------------------------------------------------------------ SQLite on a full disk


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted on a directory of this test (unmounted at the end)."""
    mount = tmp_path / "small-fs"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount)], check=True)
            raise AssertionError(f"{mount} was still in use at the end of the test")


def fill(directory: Path) -> Path:
    """Write a file into ``directory`` until its file system is full; return it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096, 512, 1):  # unbuffered: the last partial block too
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


async def test_sqlite_on_a_full_disk(
    small_fs: Path, make_config: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="stoker")
    db_path = small_fs / "stoker.db"
    metrics = Metrics()
    backend = FakeBackend()
    service = Service(
        make_config(database_url=f"sqlite:///{db_path}"), backend=backend, observer=metrics
    )
    await service.start()
    try:
        running = await service.submit(ticker(6.0), "ci")

        await until_printing(service, running.id)
        filler = await asyncio.to_thread(fill, small_fs)
        # Submissions fail with an error naming the cause (the API answers 507).  A few may
        # still fit in pages SQLite has free (its WAL is reused): those must run later.
        accepted = []
        for _ in range(200):
            try:
                accepted.append(await service.submit(ticker(0.5), "ci"))
            except DatabaseFull as exc:
                refused = exc
                break
        else:
            raise AssertionError("200 submissions fitted on a full disk")
        assert "disk is full" in str(refused)
        error = from_stoker(refused)
        assert error.status == 507 and error.headers == {"Retry-After": "5"}
        health = await service.health()
        assert health.status == "degraded" and "disk full" in (health.detail or "")
        assert "stoker_db_up 0.0" in metrics.render().decode()

        # The job's command ends meanwhile (its VM is gone); its result waits for room.
        async def vm_gone() -> bool:
            return not backend.live

        await until(vm_gone, 60, "the job's command ending")
        assert (await service.get(running.id)).state is JobState.RUNNING
        filler.unlink()
        done = await service.wait(running.id, timeout=120)
        assert done.state is JobState.SUCCEEDED and done.attempt == 0, done.reason
        assert not _only_once(await stdout_of(service, running.id), int(6.0 / TICK))
        # Working again without a restart.
        after = await service.submit(ticker(0.5), "ci")
        for job in [*accepted, after]:
            assert (await service.wait(job.id, timeout=60)).state is JobState.SUCCEEDED

        async def healthy() -> bool:
            return (await service.health()).status == "ok"

        await until(healthy, 30, "health ok again")
        assert "stoker_db_up 1.0" in metrics.render().decode()
    finally:
        await service.stop(grace=5)
    messages = [r.getMessage() for r in caplog.records]
    assert any("database disk full" in m for m in messages), messages
    assert any("database writable again after" in m for m in messages), messages
    with contextlib.closing(sqlite3.connect(db_path)) as check:
        assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    messages = [m for m in messages if m.startswith("database ")]
    assert len(messages) <= 4, f"the health flapped: {messages}"


async def test_a_partitioned_host_gives_its_jobs_up_cleanly(
    make_config: ConfigFactory,
    tmp_path: Path,
    pg_cluster: PgCluster,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only host-a loses the database: host-b takes its jobs over after the lease, and
    host-a stops its copies when it is back and writes nothing more for them."""
    caplog.set_level(logging.INFO, logger="stoker")
    proxy = CuttableProxy(pg_cluster.port)
    await proxy.mend()
    hosts = Hosts(make_config, tmp_path, pg_cluster.url)
    try:
        (a,) = await hosts.start(names=("host-a",), urls={"host-a": proxy.url(pg_cluster)})
        duration = 15.0
        jobs = [await a.submit(ticker(duration), f"ci{i}") for i in range(2)]

        async def running_on(service: Service, host: str, attempt: int) -> bool:
            views = [await service.get(j.id) for j in jobs]
            return all(
                v.state is JobState.RUNNING and v.host == host and v.attempt == attempt
                for v in views
            )

        await until(lambda: running_on(a, "host-a", 0), 60, "the jobs running on host-a")
        (b,) = await hosts.start(names=("host-b",))
        await proxy.cut()
        try:
            await until(lambda: running_on(b, "host-b", 1), 60, "host-b running the jobs")
        finally:
            await proxy.mend()

        async def ended() -> bool:
            return all([(await b.get(j.id)).state.terminal for j in jobs])

        await until(ended, duration + 60, "every job ended")
        for job in jobs:
            view = await b.get(job.id)
            assert view.state is JobState.SUCCEEDED and view.attempt == 1, view.reason
            assert view.host == "host-b"
            requeued = [e for e in view.events if e.to_state is JobState.QUEUED]
            assert len(requeued) == 2 and "host-a stopped heartbeating" in (
                requeued[1].reason or ""
            )
            # Nothing host-a wrote after losing the job: attempt 2's output is whole and alone.
            chunks = await b.logs(job.id)
            start = next(
                i for i, c in enumerate(chunks) if c.stream == "system" and "attempt 2" in c.text
            )
            second = "".join(c.text for c in chunks[start:] if c.stream == "stdout")
            assert not _only_once(second, int(duration / TICK))

        async def a_stopped_them() -> bool:
            return a.supervisor is not None and not a.supervisor.jobs

        await until(a_stopped_them, 30, "host-a dropping its copies")
        messages = [r.getMessage() for r in caplog.records]
        for job in jobs:
            assert any(f"job {job.id}: stopped without a result" in m for m in messages)
        assert (await a.health()).status == "ok"
    finally:
        await hosts.stop()
        await proxy.close()


# ------------------------------------------------------------------ the pieces


def test_health_says_once_when_the_database_goes_and_comes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="stoker.service.db")
    health = DatabaseHealth("postgresql+psycopg://stoker:s3cret@db.invalid/stoker")
    assert health.up and health.may_try() and health.describe() is None
    for _ in range(5):
        health.failed(DatabaseUnavailable, "connection refused")
    assert not health.up and health.errors == {"unreachable": 5, "disk_full": 0}
    assert "database unreachable for" in (health.describe() or "")
    # Between probes, calls fail without trying; the backoff is bounded.
    assert 0 < health.retry_in() <= MAX_PROBE_INTERVAL
    assert not health.may_try()
    health.succeeded(write=False)
    assert health.up and health.outages == 1 and health.working_for() >= 0
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("database unreachable (postgresql+psycopg://stoker:***@")
    assert "s3cret" not in " ".join(lines)
    assert lines[1].startswith("database reachable again after")


async def test_a_full_disk_counts_as_freed_after_writes_worked_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("stoker.service.db.DISK_FULL_QUIET", 0.3)
    health = DatabaseHealth("sqlite:///x.db")
    health.failed(DatabaseFull, "database or disk is full")
    assert health.may_try()  # reads still work: no fast failure
    health.succeeded(write=False)
    health.succeeded(write=True)
    assert health.problem == "disk full"  # one small write fitting in free pages proves nothing
    health.failed(DatabaseFull, "database or disk is full")

    async def freed() -> bool:
        health.succeeded(write=True)
        return health.up

    await until(freed, 10, "the disk counted as freed")
    assert health.outages == 1 and health.errors["disk_full"] == 2


async def test_output_waits_through_an_outage_bounded_and_says_what_it_dropped(
    pg_cluster: PgCluster, make_config: ConfigFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("stoker.service.logs.LOG_BUFFER_MAX", 64 << 10)
    service = Service(make_config(database_url=pg_cluster.url))
    await service.open()
    try:
        job = await service.submit(ticker(1), "ci")
        db = service.db
        flushed: list[str] = []
        writer = LogWriter(
            db, job.id, limit=1 << 30, secrets=(), on_flush=flushed.append, owner=None
        )
        writer.begin(0, 0, False)
        await writer.write("stdout", b"before\n")
        await writer.flush()
        await asyncio.to_thread(pg_cluster.stop)
        try:
            line = b"x" * 1023 + b"\n"
            for _ in range(100):  # 100 KiB: 64 KiB wait, the rest is dropped
                await writer.write("stdout", line)
            with pytest.raises(DatabaseUnavailable):
                await writer.flush()
        finally:
            await asyncio.to_thread(pg_cluster.start)
        await writer.flush(patience=60)
        await writer.close()
        await db.run(lambda s: writer.store_rest(s, s.get(Job, job.id)), patience=60)
        out = await stdout_of(service, job.id)
        assert out.startswith("before\n") and len(out) == len("before\n") + (64 << 10)
        note = await system_of(service, job.id)
        assert f"{(100 - 64) << 10} bytes of output were dropped" in note
    finally:
        await service.stop()


async def test_a_claim_moved_on_is_fenced_even_on_the_same_host(
    make_config: ConfigFactory,
) -> None:
    """Requeued and claimed again by this same host: the old attempt stops and writes nothing."""
    backend = FakeBackend()
    service = Service(make_config(), backend=backend)
    await service.start()
    try:
        job = await service.submit(ticker(4), "ci")

        await until_printing(service, job.id)
        service.db.call(
            lambda s: s.execute(
                update(Job)
                .where(Job.id == job.id)
                .values(attempt=Job.attempt + 1, state=JobState.ASSIGNED.value)
            )
        )

        async def stopped() -> bool:
            return service.supervisor is not None and not service.supervisor.jobs

        await until(stopped, 30, "the old attempt stopped")
        before = await service.logs(job.id)
        # Its lease is no one's now: this host sweeps the job and runs it again (attempt 3);
        # nothing of the old attempt lands after what was there when it stopped.
        done = await service.wait(job.id, timeout=90)
        assert done.state is JobState.SUCCEEDED and done.attempt == 2
        after = await service.logs(job.id)
        assert after[: len(before)] == before
        assert "attempt 3 on test-host" in after[len(before)].text
        assert not _only_once(
            "".join(c.text for c in after[len(before) :] if c.stream == "stdout"), int(4 / TICK)
        )
        assert not backend.live
    finally:
        await service.stop(grace=5)
