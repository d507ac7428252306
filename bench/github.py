"""GitHub Actions runner manager: latency and API cost against FakeGitHub (a fake).

1. **Real VMs** (QEMU, this machine's accelerator): a workflow job queued on
   the fake GitHub -> webhook -> runner VM -> the stand-in runner takes the
   job.  Median time from queueing to the job starting, from a warm pool
   (``min_idle = 1``: a VM at agent-ready, the runner registered when the job
   arrives) and cold (a VM booted for the job).  Same run, same image.
2. **500 queued jobs** with the fake VM backend (the real agent, no VM): time
   until every job has been given a runner and has started, and the GitHub API
   calls spent (total and per job).

Runs itself inside a fresh network namespace with only loopback
(``bench/netns.py``), like the tests.  Everything listens on loopback (the
fake on 127.0.0.2, which the pool's egress policy allows; the service on
127.0.0.1).  The runner image is the
shipped ``github-runner`` spec with the stand-in ``run.sh`` pinned as its
runner (the official runner cannot be downloaded here).  Prints a table.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "service"))
os.environ.setdefault("STOKER_ALLOW_FAKE_BACKEND", "1")

import netns  # noqa: E402
from github_harness import (  # noqa: E402
    APP_ID,
    INSTALLATION,
    LABELS,
    OWNER,
    REPO,
    SECRET,
    app_key,
    fake_backend,
    github_table,
    make_socket,
    serving,
    stand_in_dir,
)

from stoker.ci.github.fake_github import FakeGitHub  # noqa: E402
from stoker.ci.github.stand_in import build_tarball  # noqa: E402
from stoker.images.catalog import SPECS_DIR  # noqa: E402
from stoker.paths import Dirs  # noqa: E402
from stoker.service.config import ServiceConfig  # noqa: E402

IMAGE = "bench-gh-standin"
RUNS = 3
BURST = 500


def build_image(work: Path) -> None:
    tarball = work / "stand-in.tar.gz"
    sha = build_tarball(tarball)
    assert sha == hashlib.sha256(tarball.read_bytes()).hexdigest()
    text = re.sub(
        r'(?m)^name = ".*"$',
        f'name = "{IMAGE}"',
        (SPECS_DIR / "github-runner.toml").read_text(),
        count=1,
    )
    spec = work / "spec.toml"
    spec.write_text(text)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "stoker.cli",
            "image",
            "build",
            str(spec),
            "--pin",
            f"actions-runner=2.999.0:{sha}",
            "--artifact",
            f"actions-runner={tarball}",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def config(work: Path, github: FakeGitHub, *, fake: bool, min_idle: int = 0) -> ServiceConfig:
    port = github.url.rsplit(":", 1)[1]
    pools: dict[str, Any] = {
        "gh": {
            "image": "default" if fake else IMAGE,
            "cpus": 1,
            "memory": 256 if fake else 768,
            "disk": "2G",
            "max": 16 if fake else 2,
            "min_idle": min_idle,
            "snapshot": "never",
            # The fake backend's "guest" is this host: its stand-in reaches the fake directly.
            "network": (
                {"mode": "none"} if fake else {"mode": "egress", "allow": [f"127.0.0.2:{port}"]}
            ),
        }
    }
    data: dict[str, Any] = {
        "state_dir": str(work / "state"),
        "backend": "fake" if fake else "qemu",
        "host": {"name": "bench", "cpus": 64 if fake else 2, "memory_mb": 65536 if fake else 8192},
        "heartbeat_seconds": 1,
        "lease_seconds": 5,
        "poll_seconds": 0.2,
        "pools": pools,
        "submitters": {"overrides": {"github": {"max_concurrent": 1000}}},
        "github": github_table(
            work,
            github.url,
            reconcile_seconds=5.0,
            recheck_after=120.0,
            **({"runner_user": "root"} if fake else {}),
        ),
    }
    if not fake:
        data["cache_dir"] = str(Dirs.from_env().cache)
    return ServiceConfig.model_validate(data, context={"base_dir": work})


def fake_github(public: bytes, port: int) -> FakeGitHub:
    return FakeGitHub(
        app_id=APP_ID,
        public_key_pem=public,
        webhook_url=f"http://127.0.0.1:{port}/v1/github/webhook",
        webhook_secret=SECRET,
        host="127.0.0.2",
    )


async def wait_for(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step timed out")
        await asyncio.sleep(0.02)


async def vm_latency(work: Path, public: bytes, *, warm: bool) -> list[float]:
    """Queue -> job started, ``RUNS`` times, warm or cold."""
    sock = make_socket()
    times = []
    with fake_github(public, sock.getsockname()[1]) as github:
        github.install(OWNER, INSTALLATION)
        github.add_repo(REPO)
        cfg = config(work, github, fake=False, min_idle=1 if warm else 0)
        async with serving(cfg, sock) as running:
            for _ in range(RUNS):
                if warm:
                    await wait_for(lambda: _idle_vms(running) >= 1, 300)
                start = time.monotonic()
                job = github.queue_job(REPO, LABELS, run=["true"])
                await wait_for(lambda j=job: github.jobs[j].status != "queued", 300)
                times.append(time.monotonic() - start)
                await wait_for(lambda j=job: github.jobs[j].status == "completed", 300)
                await wait_for(lambda: not github.runners, 300)
    sock.close()
    return times


def _idle_vms(running: Any) -> int:
    sup = running.service.supervisor
    return 0 if sup is None else len(sup.fleet.pools["gh"].idle)


async def burst(work: Path, public: bytes) -> dict[str, float]:
    sock = make_socket()
    runner_dir = stand_in_dir(work)
    with fake_github(public, sock.getsockname()[1]) as github:
        github.install(OWNER, INSTALLATION)
        github.add_repo(REPO)
        cfg = config(work, github, fake=True)
        async with serving(cfg, sock, backend=fake_backend(runner_dir)) as running:
            await asyncio.sleep(1)
            before = len(github.api_calls())
            start = time.monotonic()
            jobs = [github.queue_job(REPO, LABELS, run=["true"]) for _ in range(BURST)]
            await wait_for(lambda: all(j.status != "queued" for j in github.jobs.values()), 1800)
            all_started = time.monotonic() - start
            await wait_for(lambda: all(j.status == "completed" for j in github.jobs.values()), 1800)
            await wait_for(lambda: not github.runners, 600)
            done = time.monotonic() - start
            calls = len(github.api_calls()) - before
            assert running.integration.passes > 0
    sock.close()
    return {"started": all_started, "done": done, "calls": calls, "jobs": len(jobs)}


def prepare() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print("building the stand-in runner image ...", file=sys.stderr)
        build_image(Path(tmp))


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _, public = app_key(work)
        print("real VMs: cold ...", file=sys.stderr)
        (work / "cold").mkdir()
        app_key(work / "cold")
        cold = await vm_latency(work / "cold", _public(work / "cold"), warm=False)
        print("real VMs: warm ...", file=sys.stderr)
        (work / "warm").mkdir()
        app_key(work / "warm")
        warm = await vm_latency(work / "warm", _public(work / "warm"), warm=True)
        print(f"{BURST} jobs on the fake backend ...", file=sys.stderr)
        (work / "burst").mkdir()
        app_key(work / "burst")
        big = await burst(work / "burst", _public(work / "burst"))
        del public
    cold_m, warm_m = statistics.median(cold), statistics.median(warm)
    print(f"GitHub runner manager against FakeGitHub; medians of {RUNS}; {os.cpu_count()} CPUs")
    print()
    print("| measurement | value |")
    print("|---|---|")
    print(f"| queued -> job started, cold VM (real, TCG) | {cold_m:.2f} s |")
    print(f"| queued -> job started, warm pool (real, TCG) | {warm_m:.2f} s |")
    print(f"| warm / cold | {warm_m / cold_m:.2f} |")
    print(f"| {BURST} queued jobs: all started (fake backend) | {big['started']:.1f} s |")
    print(f"| {BURST} queued jobs: all done and runners deleted | {big['done']:.1f} s |")
    print(f"| GitHub API calls for {BURST} jobs | {big['calls']:.0f} |")
    print(f"| API calls per job | {big['calls'] / big['jobs']:.2f} |")
    print()
    print("cold:", " ".join(f"{t:.2f}" for t in cold), " warm:", " ".join(f"{t:.2f}" for t in warm))


def _public(directory: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key((directory / "app.pem").read_bytes(), None)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


if __name__ == "__main__":
    netns.enter(prepare)
    asyncio.run(main())
