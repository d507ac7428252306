"""Restarting ``stoker serve`` with jobs mid-run: every job finishes, none runs again.

One ``stoker serve`` host (real microVMs, SQLite) runs 5 jobs at once; each
prints its attempt number, 120 numbered lines half a second apart (a minute), then
``finished``.  Once every job is past its fourth line the daemon is restarted,
two ways in the same run:

* ``kill -9``: the process dies; its VMs run on (detached) and the new process
  takes them over on start;
* ``systemctl restart`` with ``on_stop = "hand-over"``: SIGTERM, the process
  stores what it has and leaves the VMs to the next one.

For each way it prints how many jobs finished in their first attempt with
their whole output (no line lost, none twice), the time from the restart to
the first new line of output of each job (median, max), and the total.

Usage: ``python bench/restart.py [--jobs N]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "service"))

from chaos_harness import Daemon  # noqa: E402

from stoker.service.config import load_config  # noqa: E402
from stoker.service.jobs import JobRequest, JobState  # noqa: E402
from stoker.service.service import Service  # noqa: E402

LINES = 120
COMMAND = (
    'echo "attempt=$STOKER_JOB_ATTEMPT"; i=0; '
    f'while [ $i -lt {LINES} ]; do echo "line $i"; i=$((i+1)); sleep 0.5; done; echo finished'
)
EXPECTED = "attempt=0\n" + "".join(f"line {i}\n" for i in range(LINES)) + "finished\n"


def _config(path: Path, state: Path, jobs: int, on_stop: str) -> None:
    path.write_text(
        f'state_dir = "{state}"\nruntime_dir = "{state / "run"}"\n'
        "heartbeat_seconds = 1\nlease_seconds = 30\npoll_seconds = 0.3\n"
        f'on_stop = "{on_stop}"\n'
        f"[submitters]\nmax_concurrent = {jobs}\n"
        f'[host]\nname = "restart-bench"\ncpus = {jobs}\nmemory_mb = {jobs * 384 + 256}\n'
        'accel = "tcg"\n'
        f'[pools.default]\ncpus = 1\nmemory = 384\ndisk = 1024\nmax = {jobs}\nsnapshot = "never"\n'
    )


async def _stdout(client: Service, job_id: str) -> str:
    return "".join(c.text for c in await client.logs(job_id) if c.stream == "stdout")


async def scenario(workdir: Path, jobs: int, how: str) -> dict[str, object]:
    config = workdir / f"{how}.toml"
    _config(config, workdir / how, jobs, "hand-over" if how == "hand-over" else "drain")
    daemon = Daemon(config, workdir / f"{how}.log")
    client = Service(load_config(config))
    await client.open()
    try:
        daemon.start()
        ids = [
            (await client.submit(JobRequest(command=("sh", "-c", COMMAND)), "bench")).id
            for _ in range(jobs)
        ]
        deadline = time.monotonic() + 600
        while True:
            outs = [await _stdout(client, i) for i in ids]
            if all("line 3\n" in o for o in outs):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{how}: the jobs never got going\n{daemon.tail()}")
            await asyncio.sleep(0.3)
        before = {i: len(o) for i, o in zip(ids, outs, strict=True)}
        t0 = time.monotonic()
        if how == "kill -9":
            daemon.kill9()
        elif daemon.stop() != 0:
            raise SystemExit(f"{how}: the daemon failed to stop\n{daemon.tail()}")
        down = time.monotonic() - t0
        daemon.start()
        first_new: dict[str, float] = {}
        while len(first_new) < len(ids) and time.monotonic() - t0 < 600:
            for i in ids:
                if i not in first_new and len(await _stdout(client, i)) > before[i]:
                    first_new[i] = time.monotonic() - t0
            await asyncio.sleep(0.1)
        views = [await client.wait(i, timeout=600) for i in ids]
        whole = 0
        for view in views:
            if view.state is JobState.SUCCEEDED and view.attempt == 0:
                whole += await _stdout(client, view.id) == EXPECTED
        gaps = sorted(first_new.values()) or [float("nan")]
        return {
            "how": how,
            "jobs": jobs,
            "whole": whole,
            "attempts": sum(v.attempt + 1 for v in views),
            "down": down,
            "median": statistics.median(gaps),
            "max": gaps[-1],
        }
    finally:
        if daemon.proc is not None:
            daemon.stop()
        await client.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="stoker-restart-") as tmp:
        for how in ("kill -9", "hand-over"):
            rows.append(asyncio.run(scenario(Path(tmp), args.jobs, how)))
    print(f"restart of stoker serve with {args.jobs} jobs mid-run (real VMs, TCG)")
    print(
        f"{'restart':<10} {'jobs whole, 1st attempt':>24} {'attempts':>9} "
        f"{'stop took':>10} {'output again after (median / max)':>34}"
    )
    for r in rows:
        print(
            f"{r['how']:<10} {str(r['whole']) + ' / ' + str(r['jobs']):>24} {r['attempts']:>9} "
            f"{r['down']:>9.2f}s {r['median']:>18.2f}s / {r['max']:.2f}s"
        )


if __name__ == "__main__":
    main()
