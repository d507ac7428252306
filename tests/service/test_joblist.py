"""The job list's and the statistics' queries are index range scans (SQLite's plans).

Structural, not timed: ``EXPLAIN QUERY PLAN`` of ``GET /v1/jobs``'s query for
every filter, first page and deep page (``before``), must reach the jobs
through an index in the page's order, never scan the table or sort it.
``bench/joblist.py`` has the numbers at 100,000 jobs.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from job_rows import job_row
from sqlalchemy import insert

from stoker.service.db import Database, upgrade
from stoker.service.joblist import explain, list_query
from stoker.service.jobs import JobState
from stoker.service.jobviews import JobFilter
from stoker.service.models import Job
from stoker.service.stats import finished_query, read_stats

N = 2000
CASES: dict[str, dict[str, Any]] = {
    "none": {},
    "state": {"state": JobState.QUEUED},
    "pool": {"pool": "medium"},
    "submitter": {"submitter": "user3"},
    "label": {"label": "gpu"},
    "pool and state": {"pool": "medium", "state": JobState.SUCCEEDED},
}


def row(i: int, now: datetime) -> dict[str, Any]:
    state = ("queued", "running", "succeeded", "failed")[i % 4]
    return job_row(
        f"{i:032x}",
        submitter=f"user{i % 7}",
        state=state,
        pool=("small", "medium", "large")[i % 3],
        labels=["linux", "gpu"] if i % 50 == 0 else ["linux"],
        created=now - timedelta(minutes=N - i),
    )


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path_factory.mktemp('joblist') / 'jobs.db'}"
    upgrade(url)
    database = Database(url)
    now = datetime.now(UTC)
    database.call(lambda s: s.execute(insert(Job), [row(i, now) for i in range(N)]))
    yield database
    database.close()


def uses_an_index(plan: list[str]) -> bool:
    reads = [step for step in plan if " jobs" in step]
    return bool(reads) and all(
        "USING INDEX" in step or "USING COVERING INDEX" in step for step in reads
    )


@pytest.mark.parametrize("deep", [False, True], ids=["first page", "deep page"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_filter_is_an_index_scan_in_page_order(db: Database, case: str, deep: bool) -> None:
    fields = CASES[case]
    before = f"{N // 5:032x}" if deep else None  # far down: 80% of the jobs are newer
    f = JobFilter(limit=50, before=before, **fields)
    plan = db.call(lambda s: explain(s, list_query(s, f)), write=False)
    assert uses_an_index(plan), plan
    assert not any("TEMP B-TREE" in step for step in plan), plan  # no sort: index order
    if deep:
        assert any("created_at<" in step for step in plan), plan  # starts at the anchor
    # The page itself: the newest matches older than the anchor, newest first.
    got = db.call(lambda s: [j.id for j in s.scalars(list_query(s, f))], write=False)
    expect = [
        f"{i:032x}"
        for i in reversed(range(N // 5 if deep else N))
        if all(row(i, datetime.now(UTC))[k] == v for k, v in fields.items() if k != "label")
        and ("label" not in fields or i % 50 == 0)
    ][:50]
    assert got == expect


def test_stats_read_the_finished_index_only(db: Database) -> None:
    now = datetime.now(UTC)
    query = finished_query(now - timedelta(hours=1), now)
    plan = db.call(lambda s: explain(s, query), write=False)
    assert any("COVERING INDEX ix_jobs_finished" in step for step in plan), plan
    stats = db.call(lambda s: read_stats(s, window_s=3600, now=datetime.now(UTC)), write=False)
    # One job a minute, half of them finished (30 s after they were created).
    assert stats.finished["succeeded"] + stats.finished["failed"] in (30, 31)
    assert stats.finished["errored"] == 0 and stats.by_cause["exit"] in (30, 31)
    assert stats.queued == {"small": 167, "medium": 167, "large": 166}
    assert sum(stats.running.values()) == N // 4 and stats.total_jobs == N
