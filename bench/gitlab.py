"""GitLab custom executor: job start and per-stage overhead, real VMs, against FakeGitLab.

``stoker serve`` runs a pool of the shipped ``gitlab-runner`` image (built as
this host allows: without the helper binary) with QEMU on this machine's
accelerator.  Measured in one run, each the median of ``RUNS``:

1. **job start**: ``stoker gitlab-executor prepare`` as gitlab-runner runs it
   (a process per stage), from a warm pool (``min_idle = 1``: a VM at
   agent-ready) and cold (a VM booted for the job);
2. **per-stage overhead**: ``stoker gitlab-executor run`` with an empty
   script (process start, the API round trips, the step in the VM), and the
   same step sent in-process through the API (what is left without the
   process start);
3. **a whole job** through the stand-in runner manager (standing in for
   gitlab-runner: config, prepare, eleven run stages with a clone from the
   fake over the VM's egress proxy, cleanup, trace upload), warm and cold.

Runs itself inside a fresh network namespace with only loopback
(``bench/netns.py``), like the tests.  FakeGitLab (a fake) listens on
127.0.0.2 (the pool's default network allows exactly GitLab's host); the
service on 127.0.0.1.  Prints a table.
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
sys.path.insert(0, str(HERE.parent / "tests"))

import netns  # noqa: E402

from gitlab_scenario import bare_repo  # noqa: E402
from stoker.ci.gitlab.fake_gitlab import FakeGitLab  # noqa: E402
from stoker.ci.gitlab.runner_config import load  # noqa: E402
from stoker.ci.gitlab.stand_in import RunnerSettings, StandInManager  # noqa: E402
from stoker.images.catalog import SPECS_DIR  # noqa: E402
from stoker.paths import Dirs  # noqa: E402
from stoker.service.client import ApiClient  # noqa: E402
from stoker.service.config import ServiceConfig  # noqa: E402
from stoker.service.daemon import listen_socket, serve  # noqa: E402

IMAGE = "bench-gitlab-job"
RUNS = 3
STAGES = 10
PAT = "glpat-bench-0123456789"
TOKEN = "stk_bench_gitlab_executor"
STOKER = str(Path(sys.executable).with_name("stoker"))


def build_image(work: Path) -> None:
    text = re.sub(
        r'(?m)^name = ".*"$',
        f'name = "{IMAGE}"',
        (SPECS_DIR / "gitlab-runner.toml").read_text(),
        count=1,
    )
    spec = work / "spec.toml"
    spec.write_text(text)
    subprocess.run(
        [sys.executable, "-m", "stoker.cli", "image", "build", str(spec)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def service_config(work: Path, gl: FakeGitLab, port: int, *, warm: bool) -> ServiceConfig:
    (work / "pat").write_text(PAT)
    (work / "svc-token").write_text(TOKEN)
    return ServiceConfig.model_validate(
        {
            "state_dir": str(work / "state"),
            "cache_dir": str(Dirs.from_env().cache),
            "poll_seconds": 0.2,
            "host": {"name": "bench", "cpus": 2, "memory_mb": 8192},
            "pools": {
                "gl": {
                    "image": IMAGE,
                    "cpus": 1,
                    "memory": 768,
                    "disk": "2G",
                    "max": 2,
                    "min_idle": 1 if warm else 0,
                    "snapshot": "never",
                }
            },
            "tokens": [
                {
                    "name": "gitlab",
                    "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                    "scopes": ["submit", "read"],
                }
            ],
            "gitlab": {
                "url": gl.url,
                "token_file": "pat",
                "runner_config": "gitlab-runner/config.toml",
                "service_url": f"http://127.0.0.1:{port}",
                "service_token_file": "svc-token",
                "stoker": STOKER,
                "pools": {"gl": {"runner_type": "project_type", "project_id": 42, "tags": ["b"]}},
            },
        },
        context={"base_dir": work},
    )


def stage_env(job_id: int) -> dict[str, str]:
    return {
        **os.environ,
        "BUILD_FAILURE_EXIT_CODE": "1",
        "SYSTEM_FAILURE_EXIT_CODE": "2",
        "CUSTOM_ENV_CI_JOB_ID": str(job_id),
        "CUSTOM_ENV_CI_SERVER_URL": "http://127.0.0.2:1",
    }


def executor(url: str, work: Path, *stage: str) -> list[str]:
    return [
        STOKER, "gitlab-executor", "--service", url, "--token-file", str(work / "svc-token"),
        "--pool", "gl", "--state-dir", str(work / "executor"), *stage,
    ]  # fmt: skip


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - start


async def idle_vms(api: ApiClient) -> int:
    pools = await api.get_json("/v1/pools")
    return int(next(p for p in pools if p["name"] == "gl")["idle"])


async def wait_idle(api: ApiClient, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while await idle_vms(api) < 1:
        if time.monotonic() > deadline:
            raise TimeoutError("no warm VM")
        await asyncio.sleep(0.1)


async def measure(work: Path, *, warm: bool) -> dict[str, Any]:
    bare, sha = bare_repo(work)
    sock = listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    out: dict[str, Any] = {"prepare": [], "stage": [], "step": [], "job": []}
    with FakeGitLab(host="127.0.0.2") as gl:
        gl.add_token(PAT, {"create_runner", "manage_runner"})
        gl.add_project(42, "acme/app", repo_dir=bare)
        config = service_config(work, gl, port, warm=warm)
        stop = asyncio.Event()
        ready: list[str] = []
        server = asyncio.create_task(serve(config, stop=stop, sock=sock, on_ready=ready.append))
        try:
            runner_file = work / "gitlab-runner" / "config.toml"
            for _ in range(2400):  # registration at start: seconds at most
                if ready and runner_file.exists():
                    break
                await asyncio.sleep(0.05)
            url = ready[0]
            empty = work / "empty.sh"
            empty.write_text("true\n")
            async with ApiClient(url, TOKEN) as api:
                for run in range(RUNS):
                    if warm:
                        await wait_idle(api)
                    env = stage_env(1000 + run)
                    out["prepare"].append(
                        await asyncio.to_thread(timed, executor(url, work, "prepare"), env)
                    )
                    for _ in range(STAGES):
                        argv = executor(url, work, "run", str(empty), "build_script")
                        out["stage"].append(await asyncio.to_thread(timed, argv, env))
                    session = next(
                        j for j in await api.jobs(state="running") if j["session_idle_timeout"]
                    )
                    for _ in range(STAGES):
                        start = time.monotonic()
                        step = await api.add_step(session["id"], ["bash", "-c", "true"])
                        async for _item in api.follow_step(session["id"], step["seq"]):
                            pass
                        out["step"].append(time.monotonic() - start)
                    await asyncio.to_thread(timed, executor(url, work, "cleanup"), env)
                entry = load(runner_file).get("stoker-gl")
                assert entry is not None
                settings = RunnerSettings.from_config_toml(runner_file, "stoker-gl")
                managed = work / "manager"
                managed.mkdir()
                with StandInManager(gl.url, str(entry["token"]), settings) as manager:
                    for _ in range(RUNS):
                        if warm:
                            await wait_idle(api)
                        gl.queue_job(42, ["cat README"], tags=["b"], sha=sha)
                        start = time.monotonic()
                        outcome = await asyncio.to_thread(manager.run_once, managed, timeout=60)
                        assert outcome is not None and outcome.state == "success", outcome
                        out["job"].append(time.monotonic() - start)
        finally:
            stop.set()
            await asyncio.wait_for(server, timeout=60)
    return out


def prepare() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print("building the gitlab-runner image ...", file=sys.stderr)
        build_image(Path(tmp))


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("cold ...", file=sys.stderr)
        (work / "cold").mkdir()
        cold = await measure(work / "cold", warm=False)
        print("warm ...", file=sys.stderr)
        (work / "warm").mkdir()
        warm = await measure(work / "warm", warm=True)

    def med(values: list[float]) -> float:
        return statistics.median(values)

    print(f"GitLab custom executor against FakeGitLab; medians; {os.cpu_count()} CPUs")
    print()
    print("| measurement | cold VM | warm pool | warm / cold |")
    print("|---|---|---|---|")
    for key, label in (
        ("prepare", f"job start: `prepare` returns (median of {RUNS})"),
        ("job", f"whole job through the stand-in manager (median of {RUNS})"),
    ):
        c, w = med(cold[key]), med(warm[key])
        print(f"| {label} | {c:.2f} s | {w:.2f} s | {w / c:.2f} |")
    stage = med(cold["stage"] + warm["stage"])
    step = med(cold["step"] + warm["step"])
    print()
    print("| per stage (empty script) | time |")
    print("|---|---|")
    print(f"| `stoker gitlab-executor run` process, as gitlab-runner calls it | {stage:.3f} s |")
    print(f"| the same step through the API, in-process | {step:.3f} s |")
    print(f"| process start and client setup (difference) | {stage - step:.3f} s |")
    print()
    print("prepare cold:", " ".join(f"{t:.2f}" for t in cold["prepare"]),
          " warm:", " ".join(f"{t:.2f}" for t in warm["prepare"]))  # fmt: skip


if __name__ == "__main__":
    netns.enter(prepare)
    asyncio.run(main())
