"""The database layer: migrations agree with the models; claims on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session

import stoker.ci.github.models  # noqa: F401  (the GitHub tables share the service's metadata)
from stoker.service.config import ServiceConfig
from stoker.service.db import Database, claim_jobs, current_revision, make_engine, upgrade
from stoker.service.jobs import ACTIVE, JobRequest, JobState, new_job, resolve
from stoker.service.models import Base, Job, JobEvent
from stoker.service.scheduler import Candidate

ConfigFactory = Callable[..., ServiceConfig]
#: The newest migration.
HEAD = "0009"


def _check_schema(url: str) -> None:
    upgrade(url)
    upgrade(url)  # idempotent
    assert current_revision(url) == HEAD
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
            assert diff == [], f"migrations and models disagree: {diff}"
            tables = set(inspect(conn).get_table_names())
            assert {"jobs", "job_events", "log_chunks", "artifacts", "hosts", "vms"} <= tables
    finally:
        engine.dispose()


def test_sqlite_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/stoker.db"
    _check_schema(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    engine.dispose()


def test_postgres_schema(pg_url: str) -> None:
    _check_schema(pg_url)


def _job_columns(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {c["name"] for c in inspect(conn).get_columns("jobs")}
    finally:
        engine.dispose()


def test_network_columns_migrate_both_ways(tmp_path: Path) -> None:
    from alembic import command

    from stoker.service.db import alembic_config

    url = f"sqlite:///{tmp_path}/stoker.db"
    upgrade(url, "0001")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO jobs (id, submitter, state, image, cpus, memory_mb, disk_mb, timeout_s,"
            " argv, env, secret_keys, artifacts, labels, priority, source_kind, attempt,"
            " cancel_requested, created_at, updated_at, queued_at, log_bytes, log_truncated,"
            " event_seq) VALUES ('j1', 'a', 'queued', 'debian', 1, 256, 1024, 60, '[]', '{}',"
            " '[]', '[]', '[]', 0, 'none', 0, 0, '2030-01-01', '2030-01-01', '2030-01-01', 0, 0, 1)"
        )
    engine.dispose()
    assert not {"network", "network_summary"} & _job_columns(url)
    upgrade(url)
    assert current_revision(url) == HEAD
    assert {
        "network",
        "network_summary",
        "session_idle_s",
        "session_closed",
        "resume",
        "cause",
    } <= (_job_columns(url))
    db = Database(url)
    try:
        job = db.call(lambda s: s.get(Job, "j1"), write=False)
        assert job is not None and job.network is None and job.network_summary is None
    finally:
        db.close()
    command.downgrade(alembic_config(url), "0001")
    assert not {"network", "network_summary", "session_idle_s", "resume"} & _job_columns(url)


def _queue(db: Database, make_config: ConfigFactory, per_submitter: dict[str, int]) -> None:
    config = make_config()
    t0 = datetime(2030, 1, 1, tzinfo=UTC)

    def add(session: Session) -> None:
        for submitter, n in per_submitter.items():
            for i in range(n):
                request = JobRequest(command=("true",), pool="small")
                job, event = new_job(
                    request,
                    resolve(request, config, submitter),
                    submitter=submitter,
                    job_id=f"{submitter}{i:05d}",
                    source_kind="none",
                    source_ref=None,
                    now=t0 + timedelta(milliseconds=i),
                )
                session.add_all([job, event])

    db.call(add)


def _take(limit: int, per_call: int) -> object:
    def choose(candidates: Sequence[Candidate], running: dict[str, int]) -> list[str]:
        taken: list[str] = []
        counts = dict(running)
        for c in sorted(candidates, key=lambda c: (c.created_at, c.id)):
            if len(taken) < per_call and counts.get(c.submitter, 0) < limit:
                counts[c.submitter] = counts.get(c.submitter, 0) + 1
                taken.append(c.id)
        return taken

    return choose


def test_claim_on_sqlite(tmp_path: Path, make_config: ConfigFactory) -> None:
    url = f"sqlite:///{tmp_path}/stoker.db"
    upgrade(url)
    db = Database(url)
    _queue(db, make_config, {"a": 30, "b": 2})
    seen: list[tuple[list[str], dict[str, int]]] = []

    def choose(candidates: Sequence[Candidate], running: dict[str, int]) -> list[str]:
        seen.append(([c.id for c in candidates], running))
        return [c.id for c in candidates if c.submitter == "b"] + ["a00000"]

    claimed = db.call(
        lambda s: claim_jobs(s, host="h", pools=["small"], choose=choose, lease_seconds=10)
    )
    assert sorted(j.id for j in claimed) == ["a00000", "b00000", "b00001"]
    assert all(j.state == "assigned" and j.host == "h" and j.lease_until for j in claimed)
    ids, running = seen[0]
    # The head of each (submitter, pool) queue only (16 deep by default), in order.
    firsts = [i for i in ids if i.startswith("a")]
    assert firsts == sorted(firsts) and len(firsts) == 16 and len(ids) == 18 and running == {}
    db.call(lambda s: claim_jobs(s, host="h", pools=["small"], choose=choose, lease_seconds=10))
    assert seen[1][1] == {"a": 1, "b": 2}
    events = db.call(lambda s: s.scalars(select(JobEvent).where(JobEvent.job_id == "b00000")).all())
    assert [e.to_state for e in events] == ["queued", "assigned"] and events[1].host == "h"
    db.close()


def test_concurrent_claims_on_postgres(pg_url: str, make_config: ConfigFactory) -> None:
    """Four 'hosts' claim at once: no job is taken twice, no submitter goes over its limit."""
    upgrade(pg_url)
    setup = Database(pg_url)
    _queue(setup, make_config, {"a": 200, "b": 200, "c": 200})
    limit = 40
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def host(name: str) -> None:
        db = Database(pg_url, threads=1)
        try:
            for _ in range(20):
                jobs = db.call(
                    lambda s: claim_jobs(
                        s, host=name, pools=["small"], choose=_take(limit, 5), lease_seconds=30
                    )
                )
                with lock:
                    claimed.extend((j.id, name) for j in jobs)
        except BaseException as exc:
            errors.append(exc)
        finally:
            db.close()

    threads = [threading.Thread(target=host, args=(f"h{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    ids = [i for i, _ in claimed]
    assert len(ids) == len(set(ids)), "a job was claimed twice"
    per_submitter = Counter(i[0] for i in ids)
    assert per_submitter == {"a": limit, "b": limit, "c": limit}
    active = setup.call(
        lambda s: s.scalar(select(func.count()).where(Job.state.in_([s.value for s in ACTIVE])))
    )
    assert active == 3 * limit
    assert setup.call(lambda s: s.scalar(select(func.count()).where(Job.state == "queued"))) == (
        600 - 3 * limit
    )
    setup.close()


def test_claim_skips_rows_locked_elsewhere(pg_url: str, make_config: ConfigFactory) -> None:
    upgrade(pg_url)
    db = Database(pg_url)
    _queue(db, make_config, {"a": 3})
    engine = make_engine(pg_url)
    with Session(engine) as other, other.begin():
        # Someone (a cancel, say) holds the oldest job.
        other.execute(select(Job).where(Job.id == "a00000").with_for_update())
        jobs = db.call(
            lambda s: claim_jobs(
                s, host="h", pools=["small"], choose=_take(10, 10), lease_seconds=5
            )
        )
        assert sorted(j.id for j in jobs) == ["a00001", "a00002"]
    engine.dispose()
    assert JobState(db.call(lambda s: s.get(Job, "a00000")).state) is JobState.QUEUED  # type: ignore[union-attr]
    db.close()


@pytest.mark.parametrize("write", [True, False])
def test_sqlite_transactions_begin_as_asked(tmp_path: Path, write: bool) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    upgrade(url)
    db = Database(url)
    statements: list[str] = []
    from sqlalchemy import event

    event.listen(db.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    db.call(lambda s: s.execute(select(1)).scalar(), write=write)
    assert statements[0] == ("BEGIN IMMEDIATE" if write else "BEGIN")
    db.close()
