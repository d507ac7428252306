"""Job statistics for the dashboard (``GET /v1/stats``), counted by the database.

Every number is one aggregate query (``GROUP BY``), never rows loaded and
counted here: a busy service has a hundred thousand jobs.  Jobs finished in
the window are found through ``ix_jobs_finished`` (``finished_at, state,
cause``), which also covers the grouping, so the table itself is not read.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from stoker.outcomes import CAUSES
from stoker.service.jobs import ACTIVE, TERMINAL, JobState
from stoker.service.models import Job

#: The window's bounds in seconds (a minute to a week) and its default (an hour).
MIN_WINDOW: Final = 60
MAX_WINDOW: Final = 7 * 24 * 3600
DEFAULT_WINDOW: Final = 3600


class StatsView(BaseModel):
    """Jobs finished lately by final state and cause, and the work now queued and running."""

    model_config = ConfigDict(frozen=True)

    window_s: int = Field(description="The window, in seconds, ending now.")
    since: datetime = Field(description="Its start: jobs finished since then are counted.")
    finished: dict[str, int] = Field(
        description="Jobs finished in the window by final state (every final state, 0 too): "
        "succeeded, failed, errored, cancelled, timed_out."
    )
    by_cause: dict[str, int] = Field(
        description="The same jobs by how their command ended (every cause, 0 too; jobs "
        "whose command never ran have none and are not counted here)."
    )
    queued: dict[str, int] = Field(
        description="Jobs waiting now, by pool (pools with none left out)."
    )
    running: dict[str, int] = Field(
        description="Jobs a host holds now (assigned, booting or running), by pool."
    )
    total_jobs: int = Field(description="Every job the database keeps.")


def finished_query(since: datetime, until: datetime) -> Select[str, str | None, int]:
    """Jobs finished between ``since`` and ``until``, counted by final state and cause."""
    # Bounded on both sides: SQLite without ANALYZE (stoker never runs it) takes a
    # one-sided range for a quarter of the table and would rather walk an index in state
    # order, reading every job, than this covering index (see tests/service/test_joblist.py).
    return (
        select(Job.state, Job.cause, func.count())
        .where(Job.finished_at.between(since, until))
        .group_by(Job.state, Job.cause)
    )


def read_stats(session: Session, *, window_s: int, now: datetime) -> StatsView:
    """The statistics over the ``window_s`` seconds before ``now``."""
    since = now - timedelta(seconds=window_s)
    finished = dict.fromkeys(sorted(s.value for s in TERMINAL), 0)
    by_cause: dict[str, int] = dict.fromkeys(CAUSES, 0)
    rows = session.execute(finished_query(since, now))
    for state, cause, n in rows:
        if state in finished:
            finished[state] += n
        if cause is not None:
            by_cause[cause] = by_cause.get(cause, 0) + n
    active = [s.value for s in ACTIVE]
    by_pool = session.execute(
        select(Job.state, Job.pool, func.count())
        .where(Job.state.in_([JobState.QUEUED.value, *active]))
        .group_by(Job.state, Job.pool)
    )
    queued: dict[str, int] = {}
    running: dict[str, int] = {}
    for state, pool, n in by_pool:
        counts = queued if state == JobState.QUEUED.value else running
        counts[pool or ""] = counts.get(pool or "", 0) + n
    total = session.scalar(select(func.count()).select_from(Job)) or 0
    return StatsView(
        window_s=window_s,
        since=since,
        finished=finished,
        by_cause=by_cause,
        queued=queued,
        running=running,
        total_jobs=total,
    )
