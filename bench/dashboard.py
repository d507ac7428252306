"""Dashboard benchmark: the jobs page in headless Chromium with 1,000 and 100,000 jobs.

For each job count: a fresh SQLite database migrated to head and filled
with ``bench/joblist.py``'s jobs (30 days, 20 submitters, 3 pools, 1% with
the rare label ``gpu``), a real ``stoker serve`` on it (fake VM backend; the
seeded pools are not configured, so nothing runs), and Debian's chromium
signed in with a read token.  Each case sets the page's address (a filter,
or a page far down) and times until its table is on screen; the same cases
run against both databases in the same run, so the last column is the cost
of 100x more jobs.  The overview is timed the same way.

Usage: ``python bench/dashboard.py [--runs N]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "service"))
sys.path.insert(0, str(HERE))

from dashboard_browser import chromium  # noqa: E402
from joblist import fill  # noqa: E402
from serve_process import ServeProcess  # noqa: E402
from sqlalchemy import select  # noqa: E402

from stoker.service.db import Database, upgrade  # noqa: E402
from stoker.service.models import Job  # noqa: E402

SIZES = (1_000, 100_000)
#: (name, the page's address after ``#/``): the deep page is filled in per database.
CASES: tuple[tuple[str, str], ...] = (
    ("overview", ""),
    ("jobs, no filter", "jobs"),
    ("state=succeeded", "jobs?state=succeeded"),
    ("pool=medium", "jobs?pool=medium"),
    ("submitter=user07", "jobs?submitter=user07"),
    ("label=gpu (1%)", "jobs?label=gpu"),
    ("page 80% down", "jobs?trail={deep}"),
)
#: The view is on screen: the jobs table (or the overview's pools) with its rows.
READY = """(overview) => overview
    ? document.querySelector('#pools tbody tr') !== null
    : document.querySelector('#jobs tbody tr') !== null
      && document.querySelector('[aria-busy="false"]') !== null"""


def seeded(root: Path, n: int) -> tuple[str, str]:
    """A database URL with ``n`` jobs, and the id of the job 80% of the way down the list."""
    url = f"sqlite:///{root / 'jobs.db'}"
    upgrade(url)
    db = Database(url)
    try:
        fill(db, n)
        newest_first = select(Job.id).order_by(Job.created_at.desc(), Job.id.desc())
        ids = db.call(lambda s: list(s.scalars(newest_first)), write=False)
    finally:
        db.close()
    return url, ids[int(len(ids) * 0.8)]


def time_cases(url: str, deep: str, runs: int) -> dict[str, float]:
    """Median milliseconds from setting the address to the view on screen, per case."""
    with (
        tempfile.TemporaryDirectory(prefix="stoker-dashboard-") as tmp,
        ServeProcess(Path(tmp), database_url=url) as serve,
        chromium() as launched,
    ):
        browser: Any = launched
        page = browser.new_page()
        page.goto(f"{serve.url}/ui/login")
        page.get_by_label("API token").fill(serve.tokens["viewer"])
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_function(READY, arg=True)
        medians = {}
        for name, address in CASES:
            target = "#/" + address.format(deep=deep)
            times = []
            for _ in range(runs):
                page.evaluate("() => { location.hash = '#/vms'; }")
                page.wait_for_selector("#vms")
                started = time.perf_counter()
                page.evaluate("(hash) => { location.hash = hash; }", target)
                page.wait_for_function(READY, arg=address == "", polling="raf")
                times.append((time.perf_counter() - started) * 1000)
            medians[name] = statistics.median(times)
        return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    results: dict[int, dict[str, float]] = {}
    for n in SIZES:
        with tempfile.TemporaryDirectory(prefix="stoker-dashboard-db-") as tmp:
            t0 = time.perf_counter()
            url, deep = seeded(Path(tmp), n)
            print(f"{n} jobs inserted in {time.perf_counter() - t0:.1f} s", flush=True)
            results[n] = time_cases(url, deep, args.runs)
    small, large = SIZES
    print(f"\nmedian of {args.runs}, ms from setting the address to the view on screen\n")
    print(f"| view | {small:,} jobs | {large:,} jobs | ratio |")
    print("|---|---:|---:|---:|")
    for name, _ in CASES:
        a, b = results[small][name], results[large][name]
        print(f"| {name} | {a:.0f} | {b:.0f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
