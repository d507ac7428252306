"""The query of ``GET /v1/jobs``: filters, newest first, paged with ``before``.

Every filter but the label is an index range scan in ``created_at`` order
(``ix_jobs_created_id``, ``ix_jobs_state_created``, ``ix_jobs_pool_created``,
``ix_jobs_submitter_created``: each ends with ``created_at, id``, the page's
order), so a page costs its length however many jobs there are, and a deep
page (``before`` far down) starts where the anchor is instead of counting up
to it.  Paging uses ``created_at <= anchor AND (created_at < anchor OR id <
anchor's id)``: the first conjunct bounds the range, which an ``OR`` alone
would not.

Labels are a JSON list in the job's row, which no index can search: a label
filter walks the ``created_at`` index (newest first) and reads each job's
row until the page is full, so its cost is the number of jobs newer than the
page's last match: cheap for a common label, a scan for a rare one (see
``bench/joblist.py``).  Combined with another filter it walks that filter's
index instead.  PostgreSQL, which keeps statistics, may walk the ``created_at``
index for a filter most jobs match (a page fills after a few rows), and for a
label filter may scan the table and keep the newest 100 (tens of ms at 100,000).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, Text, cast, select
from sqlalchemy.orm import Session

from stoker.service.jobs import NotFound
from stoker.service.jobviews import JobFilter
from stoker.service.models import Job


def list_query(session: Session, f: JobFilter) -> Select[Job]:
    """The jobs matching ``f``, newest first (raises :class:`NotFound` for an unknown
    ``before``)."""
    query = select(Job)
    if f.state is not None:
        query = query.where(Job.state == f.state.value)
    if f.pool is not None:
        query = query.where(Job.pool == f.pool)
    if f.submitter is not None:
        query = query.where(Job.submitter == f.submitter)
    if f.label is not None:
        # Labels are names without quotes, so the quoted name matches exactly.
        query = query.where(cast(Job.labels, Text).contains(f'"{f.label}"', autoescape=True))
    if f.before is not None:
        anchor = session.get(Job, f.before)
        if anchor is None:
            raise NotFound(f"no job {f.before!r}")
        query = query.where(
            Job.created_at <= anchor.created_at,
            (Job.created_at < anchor.created_at) | (Job.id < anchor.id),
        )
    return query.order_by(Job.created_at.desc(), Job.id.desc()).limit(f.limit)


def explain(session: Session, query: Select[Any]) -> list[str]:
    """The database's plan for ``query``, one line a step: SQLite's ``EXPLAIN QUERY PLAN``
    details, PostgreSQL's ``EXPLAIN`` (for the tests and ``bench/joblist.py``)."""
    compiled = query.compile(session.get_bind())
    params = {name: _plain(value) for name, value in compiled.construct_params().items()}
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        values = tuple(params[name] for name in compiled.positiontup or ())
        rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}", values)
        return [str(row[3]) for row in rows]
    return [str(row[0]) for row in connection.exec_driver_sql(f"EXPLAIN {compiled}", params)]


def _plain(value: Any) -> Any:
    """A bind value as the column type would store it (naive UTC for timestamps)."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC).replace(tzinfo=None)
    return value
