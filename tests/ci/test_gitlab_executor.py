"""The GitLab custom executor driver against `stoker serve` on the fake backend (no VMs).

Service mode runs in-process against a service served on 127.0.0.1; the
private-service mode runs the CLI as gitlab-runner would (separate processes
per stage).  The fake backend runs "guest" commands on this host, so every
guest path used here is under the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from stoker.ci.gitlab.executor import (
    MARK_ENV,
    ExecutorOptions,
    JobEnv,
    SessionState,
    SystemFailure,
    cleanup,
    config_output,
    known_stage,
    prepare,
    run,
)
from stoker.errors import UsageError
from stoker.service.client import ApiClient
from stoker.service.config import ServiceConfig
from stoker.service.daemon import listen_socket, serve

TOKEN = "stk_gitlab_executor_0123456789"
BASE_ENV = {
    "BUILD_FAILURE_EXIT_CODE": "17",
    "SYSTEM_FAILURE_EXIT_CODE": "29",
    "CUSTOM_ENV_CI_JOB_ID": "4242",
    "CUSTOM_ENV_CI_SERVER_URL": "http://127.0.0.1:9",
    "CUSTOM_ENV_CI_PROJECT_PATH": "acme/app",
    "CUSTOM_ENV_CI_JOB_TIMEOUT": "3600",
}


@pytest.fixture
def job(tmp_path: Path) -> JobEnv:
    return JobEnv.from_environ({**BASE_ENV, "BUILD_EXIT_CODE_FILE": str(tmp_path / "exit")})


@pytest.fixture
async def service_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    monkeypatch.setenv("STOKER_ALLOW_FAKE_BACKEND", "1")
    config = ServiceConfig.model_validate(
        {
            "state_dir": str(tmp_path / "svc"),
            "backend": "fake",
            "host": {"name": "h1", "cpus": 4, "memory_mb": 4096},
            "poll_seconds": 0.2,
            "shutdown_grace_seconds": 5,
            "pools": {"gl": {"cpus": 1, "memory": 256, "max": 1}},
            "tokens": [
                {
                    "name": "gitlab",
                    "sha256": hashlib.sha256(TOKEN.encode()).hexdigest(),
                    "scopes": ["submit", "read"],
                }
            ],
        },
        context={"base_dir": tmp_path},
    )
    stop = asyncio.Event()
    ready: list[str] = []
    server = asyncio.create_task(
        serve(config, stop=stop, sock=listen_socket("127.0.0.1", 0), on_ready=ready.append)
    )
    try:
        while not ready:
            assert not server.done(), server.exception()
            await asyncio.sleep(0.01)
        yield ready[0]
    finally:
        stop.set()
        await asyncio.wait_for(server, timeout=30)


@pytest.fixture
def options(tmp_path: Path, service_url: str) -> ExecutorOptions:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    return ExecutorOptions(
        state_dir=tmp_path / "state",
        service_url=service_url,
        token_file=token_file,
        pool="gl",
        builds_dir=str(tmp_path / "guest" / "builds"),
        cache_dir=str(tmp_path / "guest" / "cache"),
        prepare_timeout=20,
    )


def script(tmp_path: Path, text: str, name: str = "script") -> Path:
    path = tmp_path / name
    path.write_text("#!/usr/bin/env bash\nset -eo pipefail\n" + text)
    return path


async def jobs_of(options: ExecutorOptions) -> list[dict[str, Any]]:
    assert options.service_url is not None
    async with ApiClient(options.service_url, TOKEN) as api:
        return await api.jobs(limit=100)


# --- what gitlab-runner hands over --------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"BUILD_FAILURE_EXIT_CODE": None}, "BUILD_FAILURE_EXIT_CODE is not set"),
        ({"SYSTEM_FAILURE_EXIT_CODE": "x"}, "SYSTEM_FAILURE_EXIT_CODE must be an exit status"),
        ({"CUSTOM_ENV_CI_JOB_ID": "1; rm -rf /"}, "CUSTOM_ENV_CI_JOB_ID must be"),
        ({"CUSTOM_ENV_CI_SERVER_URL": "gitlab"}, "CUSTOM_ENV_CI_SERVER_URL must be"),
    ],
)
def test_the_environment_is_checked(change: dict[str, str | None], words: str) -> None:
    env = {**BASE_ENV, **change}
    with pytest.raises(UsageError, match=words):
        JobEnv.from_environ({k: v for k, v in env.items() if v is not None})


def test_job_identity_and_config_output(job: JobEnv, tmp_path: Path) -> None:
    other = JobEnv.from_environ({**BASE_ENV, "CUSTOM_ENV_CI_SERVER_URL": "https://gl.example"})
    assert job.key != other.key and len(job.key) == 24
    assert job.server_endpoint() == "127.0.0.1:9" and other.server_endpoint() == "gl.example:443"
    assert job.timeout == 3600 and job.build_failure == 17 and job.system_failure == 29
    opts = ExecutorOptions(state_dir=tmp_path, builds_dir="/b", cache_dir="/c", image="img")
    out = config_output(opts, job)
    assert out["builds_dir"] == "/b" and out["cache_dir"] == "/c" and out["shell"] == "bash"
    assert out["builds_dir_is_shared"] is False
    assert out["driver"]["name"] == "stoker (image img)" and out["driver"]["version"]
    json.dumps(out)
    with pytest.raises(UsageError, match="--service needs --token-file"):
        ExecutorOptions(state_dir=tmp_path, service_url="http://127.0.0.1:1")
    with pytest.raises(UsageError, match="--builds-dir must be an absolute guest path"):
        ExecutorOptions(state_dir=tmp_path, builds_dir="builds")


def test_stage_names() -> None:
    for stage in ("prepare_script", "get_sources", "step_script", "step_release", "after_script"):
        assert known_stage(stage)
    for stage in ("", "bogus", "step_", "step_../x", "build_script;ls"):
        assert not known_stage(stage)


# --- a job's life against a stoker serve pool ----------------------------------------------------


async def test_prepare_run_cleanup_in_a_pool_vm(
    options: ExecutorOptions, job: JobEnv, tmp_path: Path
) -> None:
    said: list[str] = []
    state = await prepare(options, job, said.append)
    assert state.job_id is not None and state.mode == "service"
    path = SessionState.path(options, job)
    assert path.stat().st_mode & 0o777 == 0o600
    assert Path(options.builds_dir).is_dir() and Path(options.cache_dir).is_dir()
    assert any("Got cold VM" in line for line in said), said
    out, err = io.BytesIO(), io.BytesIO()
    before = set(Path("/tmp").glob("stoker-stage.*"))  # the fake backend's "guest" is here
    ok = script(tmp_path, 'echo "building $0"; echo warn >&2; read -r line || echo "stdin empty"\n')
    assert await run(options, job, ok, "build_script", out, err) == 0
    assert out.getvalue().startswith(b"building /tmp/stoker-stage.") and err.getvalue() == b"warn\n"
    assert b"stdin empty" in out.getvalue()
    bad = script(tmp_path, "echo failing; exit 7\n", "bad")
    assert await run(options, job, bad, "step_script", io.BytesIO(), io.BytesIO()) == 17
    assert job.exit_code_file is not None and job.exit_code_file.read_text() == "7\n"
    # the stages ran in one VM, one after the other, and left no script behind
    (sessions,) = await jobs_of(options)
    assert sessions["id"] == state.job_id and sessions["state"] == "running"
    assert set(Path("/tmp").glob("stoker-stage.*")) == before
    with pytest.raises(UsageError, match="unknown stage 'bogus'"):
        await run(options, job, ok, "bogus", io.BytesIO(), io.BytesIO())
    with pytest.raises(UsageError, match="does not exist"):
        await run(options, job, tmp_path / "missing", "build_script", io.BytesIO(), io.BytesIO())
    await cleanup(options, job, said.append)
    assert not path.exists()
    (ended,) = await jobs_of(options)
    assert ended["state"] == "succeeded" and ended["reason"] == "session closed by its client"
    # cleanup again, and run after cleanup: nothing to do / a system failure
    await cleanup(options, job, said.append)
    with pytest.raises(SystemFailure, match="prepare did not run"):
        await run(options, job, ok, "build_script", io.BytesIO(), io.BytesIO())


async def test_cleanup_finds_a_session_whose_prepare_died(
    options: ExecutorOptions, job: JobEnv
) -> None:
    # prepare submitted, then died before it wrote its state file
    assert options.service_url is not None
    async with ApiClient(options.service_url, TOKEN) as api:
        orphan = await api.submit({"session": {"idle_timeout": 600}, "env": {MARK_ENV: job.key}})
        unrelated = await api.submit({"session": {"idle_timeout": 600}})
        for _ in range(200):
            if (await api.get(orphan["id"]))["state"] == "running":
                break
            await asyncio.sleep(0.05)
        await cleanup(options, job, lambda _: None)
        assert (await api.get(orphan["id"]))["state"] in ("succeeded", "cancelled")
        assert (await api.get(unrelated["id"]))["state"] not in ("succeeded", "cancelled")
        await api.cancel(unrelated["id"])


async def test_a_prepare_without_a_vm_in_time_leaves_nothing(
    options: ExecutorOptions, job: JobEnv
) -> None:
    assert options.service_url is not None
    async with ApiClient(options.service_url, TOKEN) as api:
        # the pool's only VM is busy
        blocker = await api.submit({"command": ["sleep", "30"]})
        with pytest.raises(SystemFailure, match="no VM within the prepare timeout of 1s"):
            await prepare(replace(options, prepare_timeout=1), job, lambda _: None)
        assert not SessionState.path(options, job).exists()
        states = {j["id"]: j["state"] for j in await api.jobs(limit=10)}
        assert [s for i, s in states.items() if i != blocker["id"]] == ["cancelled"]
        await api.cancel(blocker["id"])
    # a pool that does not exist: the service's refusal, as a system failure
    with pytest.raises(SystemFailure, match=r"refused the job: .*nope"):
        await prepare(replace(options, pool="nope"), job, lambda _: None)


async def test_a_stage_interrupted_by_gitlab_runner_ends_the_vm(
    options: ExecutorOptions, job: JobEnv, tmp_path: Path
) -> None:
    state = await prepare(options, job, lambda _: None)
    before = set(Path("/tmp").glob("stoker-stage.*"))
    slow = script(tmp_path, "echo started; sleep 60\n")
    stage = asyncio.ensure_future(
        run(options, job, slow, "build_script", io.BytesIO(), io.BytesIO())
    )
    await asyncio.sleep(1.0)
    stage.cancel()  # what SIGTERM does (run_stage)
    with pytest.raises(asyncio.CancelledError):
        await stage
    (session,) = await jobs_of(options)
    assert session["id"] == state.job_id
    for _ in range(100):
        if (await jobs_of(options))[0]["state"] == "cancelled":
            break
        await asyncio.sleep(0.05)
    assert (await jobs_of(options))[0]["state"] == "cancelled"
    await cleanup(options, job, lambda _: None)
    assert not SessionState.path(options, job).exists()
    # the killed stage's script file (a real VM's /tmp dies with it; this "guest" is the host)
    for left in set(Path("/tmp").glob("stoker-stage.*")) - before:
        left.unlink()


# --- the CLI as gitlab-runner runs it, with a private service per job ------------------------


@pytest.fixture
def cli_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {
        **os.environ,
        **BASE_ENV,
        "BUILD_EXIT_CODE_FILE": str(tmp_path / "exit"),
        "STOKER_ALLOW_FAKE_BACKEND": "1",
        "STOKER_GITLAB_LOCAL_BACKEND": "fake",
    }
    yield env
    # whatever a test did, no private service outlives it
    leftover = subprocess.run(
        ["pgrep", "-f", f"stoker.ci.gitlab.local_service {tmp_path}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    for pid in leftover:
        with_pid = int(pid)
        os.kill(with_pid, 9)
    assert not leftover, "a private service was left running"


def stoker(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "stoker.cli",
        "gitlab-executor",
        "--state-dir",
        str(tmp_path / "state"),
        "--builds-dir",
        str(tmp_path / "guest" / "builds"),
        "--cache-dir",
        str(tmp_path / "guest" / "cache"),
        "--memory",
        "256M",
        "--cpus",
        "1",
        *args,
    ]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_the_cli_with_a_private_service(tmp_path: Path, cli_env: dict[str, str]) -> None:
    config = stoker(tmp_path, cli_env, "config")
    assert config.returncode == 0, config.stderr
    assert json.loads(config.stdout)["driver"]["name"] == "stoker (image gitlab-runner)"
    prepared = stoker(tmp_path, cli_env, "prepare")
    assert prepared.returncode == 0, prepared.stderr
    assert "Starting a private stoker service" in prepared.stdout
    state = json.loads(next((tmp_path / "state").glob("*.json")).read_text())
    assert state["mode"] == "local" and state["pid"] > 0
    ok = script(tmp_path, "echo from the vm\n")
    ran = stoker(tmp_path, cli_env, "run", str(ok), "get_sources")
    assert (ran.returncode, ran.stdout) == (0, "from the vm\n"), ran.stderr
    bad = script(tmp_path, "exit 3\n", "bad")
    failed = stoker(tmp_path, cli_env, "run", str(bad), "step_script")
    assert failed.returncode == 17 and (tmp_path / "exit").read_text() == "3\n"
    unknown = stoker(tmp_path, cli_env, "run", str(ok), "no_such_stage")
    assert unknown.returncode == 29 and "unknown stage 'no_such_stage'" in unknown.stderr
    missing = stoker(tmp_path, cli_env, "run", str(tmp_path / "gone"), "build_script")
    assert missing.returncode == 29 and "does not exist" in missing.stderr
    cleaned = stoker(tmp_path, cli_env, "cleanup")
    assert cleaned.returncode == 0, cleaned.stderr
    assert not (tmp_path / "state").exists()  # the last cleanup removes the empty directory
    # the private service is gone with its VM
    deadline = time.monotonic() + 10
    while Path(f"/proc/{state['pid']}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{state['pid']}").exists()


def test_the_cli_outside_gitlab_runner(tmp_path: Path, cli_env: dict[str, str]) -> None:
    env = {k: v for k, v in cli_env.items() if k != "BUILD_FAILURE_EXIT_CODE"}
    done = stoker(tmp_path, env, "prepare")
    assert done.returncode == 1 and "BUILD_FAILURE_EXIT_CODE is not set" in done.stderr
    bad = stoker(tmp_path, cli_env, "--builds-dir", "rel", "config")
    assert bad.returncode == 1 and "--builds-dir must be an absolute guest path" in bad.stderr


def test_cleanup_after_the_private_service_died(tmp_path: Path, cli_env: dict[str, str]) -> None:
    # Its VM died with it: cleanup has nothing left to end and says so, instead of
    # failing the job's cleanup on an API that is gone.
    prepared = stoker(tmp_path, cli_env, "prepare")
    assert prepared.returncode == 0, prepared.stderr
    state = json.loads(next((tmp_path / "state").glob("*.json")).read_text())
    os.kill(state["pid"], signal.SIGKILL)
    cleaned = stoker(tmp_path, cli_env, "cleanup")
    assert cleaned.returncode == 0, cleaned.stderr
    assert "the private service is stopped, and the VM with it" in cleaned.stdout
    assert not list((tmp_path / "state").glob("*.json"))
