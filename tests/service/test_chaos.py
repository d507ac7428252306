"""Chaos: two ``stoker serve`` daemons on one PostgreSQL, SIGKILLed at random moments.

The scheduler's side of the chaos the README's reliability table reports
(``bench/chaos.py`` runs the same with real microVMs): 100 jobs, at least 10
SIGKILLs of either daemon, each restarted after a random pause.  Every job
must end exactly once, as ``succeeded``; no attempt may run twice; nothing may
be left behind.  The fake VM backend (named so: its "VMs" are the real agent
on this host) keeps this to about a minute.
"""

from __future__ import annotations

from pathlib import Path

from chaos_harness import ChaosPlan, run_chaos


async def test_a_hundred_jobs_through_ten_kills(
    tmp_path: Path, pg_url: str, allow_fake: None
) -> None:
    plan = ChaosPlan(
        jobs=100,
        kills=10,
        hosts=2,
        backend="fake",
        job_seconds=(0.2, 1.5),
        kill_gap=(0.5, 2.5),
        restart_gap=(0.0, 6.0),
        lease_seconds=3.0,
        seed=13,
    )
    report = await run_chaos(plan, tmp_path, pg_url)
    print(report.table())
    assert report.problems == []
    assert report.states == {"succeeded": 100}
    assert len(report.kills) == 10
    assert report.duplicate_attempts == 0 and report.lost == 0
    # The kills hit jobs mid-run: some attempts were rerun (the point of the test).
    assert report.reruns > 0
