"""Job list benchmark: ``GET /v1/jobs``'s query with 100,000 jobs, each filter, first and deep page.

Inserts the jobs straight through the service's models into a fresh SQLite
database migrated to head (and PostgreSQL when ``--pg``/``$STOKER_TEST_PG_URL``
is given: its ``public`` schema is dropped first, so give a throw-away one),
then times :func:`stoker.service.joblist.list_query` as ``Service.list`` runs
it: the first page (100 jobs) and a deep page (``before`` = a matching job
80% of the way down), p50 and p95 over repeated runs, and prints the plan's
access path (which index, or a scan).

The jobs: 30 days of history, 20 submitters, 3 pools; 2% queued, 1% running,
the rest finished (70% succeeded); every job has the label ``linux``, 1% also
``gpu`` (a rare label: its filter reads every row newer than its page).

Usage: ``python bench/joblist.py [--jobs N] [--runs N] [--pg URL]``
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "service"))
from job_rows import job_row

from stoker.service.db import Database, upgrade
from stoker.service.joblist import explain, list_query
from stoker.service.jobs import JobState
from stoker.service.jobviews import JobFilter
from stoker.service.models import Job

POOLS = ("tiny", "medium", "large")
SUBMITTERS = tuple(f"user{i:02d}" for i in range(20))
#: (name, filter fields)
CASES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("none", {}),
    ("state=queued", {"state": JobState.QUEUED}),
    ("state=succeeded", {"state": JobState.SUCCEEDED}),
    ("pool=medium", {"pool": "medium"}),
    ("submitter=user07", {"submitter": "user07"}),
    ("label=linux", {"label": "linux"}),
    ("label=gpu (1%)", {"label": "gpu"}),
    ("pool+state", {"pool": "large", "state": JobState.FAILED}),
)
PAGE = 100


def job_rows(n: int, seed: int = 1) -> list[dict[str, Any]]:
    """``n`` jobs over the last 30 days (see the module docstring)."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    finals = ["succeeded"] * 70 + ["failed"] * 15 + ["errored", "cancelled", "timed_out"] * 4
    rows = []
    for i in range(n):
        created = now - timedelta(seconds=30 * 86400 * (n - i) / n)
        roll = rng.random()
        state = "queued" if roll < 0.02 else "running" if roll < 0.03 else rng.choice(finals)
        rows.append(
            job_row(
                f"{i:08x}{rng.getrandbits(96):024x}",
                submitter=rng.choice(SUBMITTERS),
                state=state,
                pool=rng.choice(POOLS),
                labels=["linux", "gpu"] if rng.random() < 0.01 else ["linux"],
                created=created,
                runtime=timedelta(seconds=60),
            )
        )
    return rows


def fill(db: Database, n: int) -> None:
    rows = job_rows(n)
    for i in range(0, n, 5000):
        db.call(lambda s, batch=rows[i : i + 5000]: s.execute(insert(Job), batch))
    if not db.is_sqlite:
        # (PostgreSQL's autovacuum would analyze it soon; stoker never runs SQLite's ANALYZE,
        # so its plans here are the ones a service gets.)
        db.call(lambda s: s.execute(text("ANALYZE jobs")))


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def access_path(plan: list[str]) -> str:
    """The plan's table access, shortened: ``SEARCH jobs USING INDEX ix_... (state=?)``."""
    steps = [p for p in plan if "jobs" in p or "Index" in p or "Scan" in p]
    return "; ".join(p.strip().split("  (cost")[0] for p in steps[:2]) or "; ".join(plan)


def measure(db: Database, fields: dict[str, Any], runs: int) -> dict[str, Any]:
    def ids(session: Any, f: JobFilter) -> list[str]:
        return [job.id for job in session.scalars(list_query(session, f))]

    full = db.call(
        lambda s: [j.id for j in s.scalars(list_query(s, JobFilter(**fields)).limit(None))],
        write=False,
    )
    anchor = full[int(len(full) * 0.8)] if full else None
    result: dict[str, Any] = {"matches": len(full)}
    for page, before in (("first", None), ("deep", anchor)):
        f = JobFilter(limit=PAGE, before=before, **fields)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            got = db.call(lambda s, f=f: ids(s, f), write=False)
            times.append((time.perf_counter() - t0) * 1000)
        assert len(got) == min(PAGE, len(full) - (full.index(before) + 1 if before else 0))
        plan = db.call(lambda s, f=f: explain(s, list_query(s, f)), write=False)
        result[page] = {
            "p50_ms": statistics.median(times),
            "p95_ms": percentile(times, 95),
            "plan": access_path(plan),
        }
    return result


def bench(url: str, n: int, runs: int) -> None:
    upgrade(url)
    db = Database(url)
    try:
        t0 = time.perf_counter()
        fill(db, n)
        print(f"\n{db.engine.dialect.name}: {n} jobs inserted in {time.perf_counter() - t0:.1f}s\n")
        print(
            "| filter | matches | first page p50 / p95 ms | deep page p50 / p95 ms "
            "| plan (first page) | plan (deep page) |"
        )
        print("|---|---:|---:|---:|---|---|")
        for name, fields in CASES:
            r = measure(db, fields, runs)
            first, deep = r["first"], r["deep"]
            print(
                f"| {name} | {r['matches']} | {first['p50_ms']:.2f} / {first['p95_ms']:.2f} "
                f"| {deep['p50_ms']:.2f} / {deep['p95_ms']:.2f} "
                f"| {first['plan']} | {deep['plan']} |",
                flush=True,
            )
    finally:
        db.close()


def reset_postgres(url: str) -> None:
    db = Database(url)
    try:
        db.call(lambda s: s.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public")))
    finally:
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--pg", default=os.environ.get("STOKER_TEST_PG_URL"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stoker-joblist-") as tmp:
        bench(f"sqlite:///{Path(tmp) / 'jobs.db'}", args.jobs, args.runs)
    if args.pg:
        pg = args.pg.replace("postgresql://", "postgresql+psycopg://", 1)
        reset_postgres(pg)
        bench(pg, args.jobs, args.runs)


if __name__ == "__main__":
    main()
