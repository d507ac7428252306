"""GitHub Actions end to end with real VMs, inside a network namespace of its own.

``tests/test_github_vm.py`` starts this script as ``unshare --net python3
github_scenario.py CONFIG``: the fake GitHub, ``stoker serve`` (as a real
process, QEMU under TCG) and every VM's egress proxy live in a fresh
namespace with nothing but loopback, so nothing can leave the machine.

FakeGitHub (a fake) listens on 127.0.0.2: the guests reach it through their
egress proxy (the pool allows exactly ``127.0.0.2:PORT``; 127.0.0.1 is the
guest's own loopback and in its ``no_proxy``).  The runner image is the
shipped ``github-runner`` spec with the stand-in ``run.sh`` as its runner.

Steps, each timed: a forged webhook (401); a job through a signed webhook
(VM, job done, VM destroyed, runner deleted); a dropped webhook (found by the
sweep); duplicated and reordered deliveries (no extra runner); a burst of 20
jobs with ``max = 3``; ``kill -9`` of the service mid-job, then a restart (no
orphan VM or runner, the next job runs).  Prints one JSON document.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent / "service"))

from github_harness import (
    APP_ID,
    INSTALLATION,
    LABELS,
    OWNER,
    REPO,
    SECRET,
    app_key,
    github_table,
)

from stoker.ci.github.fake_github import FakeGitHub


def wait(check: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def qemu_pids() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if b"qemu-system" in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_config(work: Path, cfg: dict[str, Any], port: int, api_url: str, fake_port: int) -> Path:
    table = github_table(work, api_url, reconcile_seconds=2.0, recheck_after=5.0)
    pools = table.pop("pools")
    targets = table.pop("targets")
    lines = [
        f'state_dir = "{work / "state"}"',
        f'cache_dir = "{cfg["cache"]}"',
        f'runtime_dir = "{work / "runtime"}"',
        "heartbeat_seconds = 1",
        "lease_seconds = 5",
        "poll_seconds = 0.3",
        "shutdown_grace_seconds = 10",
        "[listen]",
        'host = "127.0.0.1"',
        f"port = {port}",
        "[host]",
        'name = "gh-vm-test"',
        "cpus = 3",
        'memory_mb = "6G"',
        'accel = "tcg"',
        "[pools.gh]",
        f'image = "{cfg["image"]}"',
        "cpus = 1",
        'memory = "768M"',
        'disk = "2G"',
        "max = 3",
        'timeout = "15m"',
        'snapshot = "never"',
        "[pools.gh.network]",
        'mode = "egress"',
        f'allow = ["127.0.0.2:{fake_port}"]',
        "[submitters.overrides.github]",
        "max_concurrent = 10",
        "[github]",
        *[f"{k} = {json.dumps(v)}" for k, v in table.items()],
        *[f"[[github.targets]]\nrepository = {json.dumps(t['repository'])}" for t in targets],
        *[f"[github.pools.{k}]\nlabels = {json.dumps(v['labels'])}" for k, v in pools.items()],
    ]
    path = work / "stoker.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def runner_states(work: Path) -> dict[str, str]:
    import sqlite3

    with sqlite3.connect(work / "state" / "stoker.db") as db:
        return dict(db.execute("select name, state from github_runners").fetchall())


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    work = Path(cfg["work"])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    _, public = app_key(work)
    port = free_port()
    env = {**os.environ, "STOKER_CACHE_DIR": cfg["cache"]}
    results: dict[str, Any] = {}
    with FakeGitHub(
        app_id=APP_ID,
        public_key_pem=public,
        webhook_url=f"http://127.0.0.1:{port}/v1/github/webhook",
        webhook_secret=SECRET,
        host="127.0.0.2",
        lost_after=10.0,
    ) as github:
        github.install(OWNER, INSTALLATION)
        github.add_repo(REPO)
        fake_port = int(github.url.rsplit(":", 1)[1])
        config = write_config(work, cfg, port, github.url, fake_port)
        argv = [sys.executable, "-m", "stoker.cli", "serve", "--config", str(config)]
        serve = subprocess.Popen(
            argv, env=env, stdout=(work / "serve-1.log").open("wb"), stderr=subprocess.STDOUT
        )
        try:
            wait(lambda: _healthy(port), 60, "stoker serve to answer")

            # A forged delivery: 401, nothing recorded.
            body = b'{"action": "queued"}'
            forged = httpx.post(
                f"http://127.0.0.1:{port}/v1/github/webhook",
                content=body,
                headers={
                    "X-GitHub-Event": "workflow_job",
                    "X-GitHub-Delivery": "forged-1",
                    "X-Hub-Signature-256": "sha256=" + "0" * 64,
                },
            )
            results["forged_status"] = forged.status_code

            def done(jobs: list[int]) -> bool:
                snapshot = github.jobs
                return all(snapshot[j].status == "completed" for j in jobs)

            # One job through a signed webhook, timed from queueing to started.
            started = time.monotonic()
            first = github.queue_job(REPO, LABELS, run=["sh", "-c", "echo in-vm; id -un"])
            wait(lambda: github.jobs[first].status != "queued", 300, "the first job to start")
            results["first_start_seconds"] = round(time.monotonic() - started, 2)
            wait(lambda: done([first]), 300, "the first job")
            results["first_conclusion"] = github.jobs[first].conclusion
            wait(lambda: not github.runners, 120, "the first runner to be deleted")
            wait(lambda: not qemu_pids(), 60, "the first VM to be destroyed")

            # A dropped webhook: the sweep finds the job.
            github.webhooks.drop_next(1)
            dropped = github.queue_job(REPO, LABELS)
            results["dropped_seconds"] = round(wait(lambda: done([dropped]), 300, "dropped"), 2)
            results["dropped_conclusion"] = github.jobs[dropped].conclusion

            # Duplicated and reordered deliveries: one runner per job.
            github.webhooks.duplicate_next(2)
            github.webhooks.hold()
            pair = [github.queue_job(REPO, LABELS), github.queue_job(REPO, LABELS)]
            github.webhooks.release(reverse=True)
            wait(lambda: done(pair), 300, "the reordered jobs")
            wait(lambda: not github.runners, 120, "their runners to be deleted")
            results["runners_after_four_jobs"] = len(runner_states(work))

            # A burst of 20 with max = 3.
            peak = 0
            burst = [github.queue_job(REPO, LABELS, run=["true"]) for _ in range(20)]
            started = time.monotonic()
            while not done(burst):
                peak = max(peak, len(qemu_pids()))
                if time.monotonic() - started > 900:
                    raise SystemExit("the burst did not finish in 900 s")
                time.sleep(0.2)
            results["burst_seconds"] = round(time.monotonic() - started, 1)
            results["burst_peak_vms"] = peak
            results["burst_conclusions"] = sorted({github.jobs[j].conclusion or "" for j in burst})
            wait(lambda: not github.runners, 120, "the burst's runners to be deleted")
            results["api_calls_before_kill"] = len(github.api_calls())

            # kill -9 while a runner runs a job.
            stuck = github.queue_job(REPO, LABELS, run=["sleep", "600"])
            wait(lambda: github.jobs[stuck].status == "in_progress", 300, "the stuck job")
            serve.send_signal(signal.SIGKILL)
            serve.wait(timeout=30)
            results["qemu_gone_after_kill_seconds"] = round(
                wait(lambda: not qemu_pids(), 30, "QEMU to die with the daemon"), 2
            )
        finally:
            if serve.poll() is None:
                serve.kill()
                serve.wait()
        after = github.queue_job(REPO, LABELS, run=["true"])
        serve = subprocess.Popen(
            argv, env=env, stdout=(work / "serve-2.log").open("wb"), stderr=subprocess.STDOUT
        )
        try:
            wait(lambda: done([after]), 300, "the job queued while stoker was down")
            results["after_restart_conclusion"] = github.jobs[after].conclusion
            wait(lambda: not github.runners, 120, "no runner left on GitHub")
            wait(
                lambda: all(s == "destroyed" for s in runner_states(work).values()),
                60,
                "every runner record destroyed",
            )
            results["stuck_conclusion"] = github.jobs[stuck].conclusion
            results["runners_total"] = len(runner_states(work))
            results["qemu_left"] = len(qemu_pids())
        finally:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(timeout=60)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
        results["qemu_left_at_end"] = len(qemu_pids())
        results["webhook_statuses"] = sorted({d.status or 0 for d in github.webhooks.deliveries})
        results["api_calls"] = len(github.api_calls())
        results["jobs"] = len(github.jobs)
    print(json.dumps(results))


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
