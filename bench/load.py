"""Load benchmark: one ``stoker serve`` host, 200 concurrent submissions, 50 live log followers.

The VMs are stand-ins: the service runs the **fake backend** (the real guest
agent in threads of the server, commands on this host), because 200 real VMs
cannot run on a 2-core machine under TCG.  Everything else is the product: a
``stoker serve`` process on 127.0.0.1, its REST API over HTTP, its database
(SQLite, and PostgreSQL with ``--pg``), its scheduler and log store.

The scenario (``tests/service/load_scenario.py``, whose small version is
``tests/service/test_service_load.py``):

* *idle*: 4 clients poll ``GET /v1/jobs/{id}`` (one finished job) while
  nothing runs;
* *load*: ``--jobs`` submissions sent at once (each job prints ``--lines``
  numbered lines, ``--pause`` s apart), a live follower (``?follow=1``,
  server-sent events) for each of the first ``--followers`` jobs, and the same
  4 pollers until every job has ended.

Printed (a markdown table): ``GET /v1/jobs/{id}`` p50/p99 idle and under load
and their ratio (same run), submissions accepted per second, the time until
every job ended, the server's resident memory before / peak / after, and
whether every job ended once with its whole output and every follower saw
every line and the end.  Results are also written to
``<cache>/bench/load.json``.

Usage: ``python bench/load.py [--jobs 200] [--followers 50] [--pg [URL]]``
(``--pg`` alone uses ``$STOKER_TEST_PG_URL``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "service"))

from load_scenario import run_load  # noqa: E402
from serve_process import ServeProcess  # noqa: E402

from conftest import reset_postgres  # noqa: E402
from stoker.paths import Dirs  # noqa: E402


async def one_database(args: argparse.Namespace, url: str) -> dict[str, Any]:
    """The scenario against a fresh server on ``url`` ("": SQLite in its state directory)."""
    if url:
        url = url.replace("postgresql://", "postgresql+psycopg://", 1)
        reset_postgres(url)
    with tempfile.TemporaryDirectory(prefix="stoker-load-") as tmp:
        server = ServeProcess(
            Path(tmp), pool_max=args.pool_max, cpus=args.pool_max, database_url=url
        )
        with server:
            result = await run_load(
                server,
                jobs=args.jobs,
                followers=args.followers,
                lines=args.lines,
                pause=args.pause,
                idle_gets=args.idle_gets,
            )
    summary = result.summary()
    summary["database"] = "postgresql" if url else "sqlite"
    summary["problem_list"] = result.problems()[:20]
    summary["jobs_ok"] = sum(
        1
        for job in result.final.values()
        if job["state"] == "succeeded"
        and not any(p.startswith(f"job {job['id']}") for p in summary["problem_list"])
    )
    summary["followers_ok"] = len(result.followers) - sum(
        1 for p in summary["problem_list"] if p.startswith("follower")
    )
    return summary


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        f"\nfake backend (VMs are stand-ins: the agent in threads, commands on this host; "
        f"200 real VMs cannot run on this 2-core TCG machine); pool of {args.pool_max} "
        f"'VMs', jobs of {args.lines} lines {args.pause} s apart\n"
    )
    print(
        "| database | jobs / followers | GET /v1/jobs/{id} idle p50 / p99 | under load p50 / p99 "
        "| p99 load/idle | submissions/s | all ended after | server RSS before / peak / after "
        "| jobs ok | followers complete |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["get_load_p99_ms"] / r["get_idle_p99_ms"]
        print(
            f"| {r['database']} | {r['jobs']} / {r['followers']} "
            f"| {r['get_idle_p50_ms']:.1f} / {r['get_idle_p99_ms']:.1f} ms "
            f"| {r['get_load_p50_ms']:.1f} / {r['get_load_p99_ms']:.1f} ms "
            f"| {ratio:.1f}x | {r['submit_per_s']:.0f} | {r['drain_seconds']:.1f} s "
            f"| {r['rss_before_mib']:.0f} / {r['rss_peak_mib']:.0f} / {r['rss_after_mib']:.0f} MiB "
            f"| {r['jobs_ok']}/{r['jobs']} | {r['followers_ok']}/{r['followers']} |"
        )
    for r in rows:
        for problem in r["problem_list"]:
            print(f"  {r['database']}: {problem}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--followers", type=int, default=50)
    parser.add_argument("--lines", type=int, default=20)
    parser.add_argument("--pause", type=float, default=0.05)
    parser.add_argument("--pool-max", type=int, default=16)
    parser.add_argument("--idle-gets", type=int, default=400)
    parser.add_argument(
        "--pg",
        nargs="?",
        const=os.environ.get("STOKER_TEST_PG_URL", ""),
        default=None,
        help="also on PostgreSQL at this URL (default: $STOKER_TEST_PG_URL)",
    )
    args = parser.parse_args()
    if args.pg == "":
        parser.error("--pg without a URL needs STOKER_TEST_PG_URL")
    rows = []
    for url in ["", *([args.pg] if args.pg else [])]:
        print(f"{'postgresql' if url else 'sqlite'}: {args.jobs} jobs...", flush=True)
        rows.append(await one_database(args, url))
    print_table(rows, args)
    out = Dirs.from_env().cache / "bench" / "load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2, default=str))
    print(f"\nwritten to {out}")
    if any(r["problems"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main())
