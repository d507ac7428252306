"""Demand: sightings of workflow jobs are recorded idempotently, forward-only (SQLite)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from stoker.ci.github.config import GitHubConfig
from stoker.ci.github.demand import Demand, Sighting
from stoker.ci.github.models import GitHubJob, JobStatus
from stoker.service.db import Database, upgrade


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path}/stoker.db"
    upgrade(url)
    database = Database(url)
    yield database
    database.close()


@pytest.fixture
def demand(db: Database) -> Demand:
    config = GitHubConfig.model_validate(
        {
            "token_file": "/dev/null",
            "targets": [{"repository": "acme/app"}, {"organization": "acme-org"}],
            "pools": {
                "linux": {"labels": ["self-hosted", "linux"]},
                "big": {"labels": ["self-hosted", "linux", "big"]},
            },
        }
    )
    return Demand(config, db)


def sight(
    job_id: int = 1,
    status: JobStatus = JobStatus.QUEUED,
    *,
    repository: str = "acme/app",
    labels: tuple[str, ...] = ("self-hosted", "linux"),
    runner: str | None = None,
    source: str = "webhook",
) -> Sighting:
    return Sighting(
        id=job_id,
        repository=repository,
        run_id=100,
        labels=labels,
        status=status,
        conclusion="success" if status is JobStatus.COMPLETED else None,
        runner_name=runner,
        created_at=datetime(2026, 12, 5, tzinfo=UTC),
        started_at=None,
        completed_at=None,
        source=source,  # type: ignore[arg-type]
    )


async def rows(db: Database) -> list[tuple[int, int, str, str | None]]:
    return await db.run(
        lambda s: [
            (r.id, r.status, r.pool, r.runner_name)
            for r in s.scalars(select(GitHubJob).order_by(GitHubJob.id))
        ],
        write=False,
    )


async def test_a_queued_job_is_recorded_for_the_pool_that_serves_it(
    demand: Demand, db: Database
) -> None:
    assert await demand.observe([sight(1), sight(2, labels=("self-hosted", "big", "linux"))]) == [
        "new",
        "new",
    ]
    assert await rows(db) == [(1, 1, "linux", None), (2, 1, "big", None)]
    assert await demand.queued() == {"linux": 1, "big": 1}


async def test_jobs_no_pool_or_target_serves_are_ignored(demand: Demand, db: Database) -> None:
    results = await demand.observe(
        [sight(1, labels=("ubuntu-latest",)), sight(2, repository="other/repo")]
    )
    assert results == ["ignored", "ignored"]
    assert await rows(db) == []


async def test_duplicates_change_nothing(demand: Demand, db: Database) -> None:
    await demand.observe([sight(1)])
    assert await demand.observe([sight(1), sight(1, source="sweep")]) == [
        "unchanged",
        "unchanged",
    ]
    assert await rows(db) == [(1, 1, "linux", None)]


@pytest.mark.parametrize(
    "order",
    list(itertools.permutations([JobStatus.QUEUED, JobStatus.IN_PROGRESS, JobStatus.COMPLETED])),
)
async def test_every_delivery_order_ends_completed(
    demand: Demand, db: Database, order: tuple[JobStatus, ...]
) -> None:
    for status in order:
        runner = "stoker-linux-1" if status >= JobStatus.IN_PROGRESS else None
        await demand.observe([sight(1, status, runner=runner)])
    ((_, status, _, runner),) = await rows(db)
    assert status == JobStatus.COMPLETED
    assert runner == "stoker-linux-1"
    assert await demand.queued() == {}


async def test_status_never_moves_backwards(demand: Demand, db: Database) -> None:
    await demand.observe([sight(1, JobStatus.IN_PROGRESS, runner="r")])
    assert await demand.observe([sight(1, JobStatus.QUEUED)]) == ["unchanged"]
    assert await demand.observe([sight(1, JobStatus.COMPLETED, runner="r")]) == ["advanced"]
    assert await demand.observe([sight(1, JobStatus.IN_PROGRESS)]) == ["unchanged"]
    assert (await rows(db))[0][1] == JobStatus.COMPLETED


def test_githubs_status_names_map_to_the_order() -> None:
    assert JobStatus.parse("waiting") is JobStatus.QUEUED
    assert JobStatus.parse("in_progress") is JobStatus.IN_PROGRESS
    assert JobStatus.parse("completed") is JobStatus.COMPLETED
    assert JobStatus.parse("bogus") is None
