"""GitLab end to end on the fake backend: FakeGitLab (a fake), stoker serve, the stand-in manager.

``stoker serve`` with a ``[gitlab]`` table registers a runner at start and
writes its gitlab-runner entry; the stand-in manager (standing in for
gitlab-runner) reads that entry, takes jobs from FakeGitLab and drives
``stoker gitlab-executor`` exactly as the entry says; each job's stages run in
one session job of the pool.  Everything listens on 127.0.0.1; the fake
backend runs the "guest" on this host, so guest paths are in the test's
directory.  The same scenario with real VMs is ``tests/test_gitlab_vm.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stoker.ci.gitlab.fake_gitlab import FakeGitLab
from stoker.ci.gitlab.runner_config import load
from stoker.ci.gitlab.stand_in import RunnerSettings, StandInManager
from stoker.service.client import ApiClient
from stoker.service.config import ServiceConfig
from stoker.service.daemon import listen_socket, serve

PAT = "glpat-service-test-0123456789"
SERVICE_TOKEN = "stk_gitlab_executor_service_test"
STOKER = str(Path(sys.executable).with_name("stoker"))


def bare_repo(tmp_path: Path) -> tuple[Path, str]:
    """A bare repository with one commit (served by the fake over dumb HTTP)."""
    work = tmp_path / "src"
    work.mkdir()
    (work / "README").write_text("hello from the repository\n")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # fmt: skip
    for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "."],
                 ["git", "commit", "-q", "-m", "one"]):  # fmt: skip
        subprocess.run(argv, cwd=work, env=env, check=True)
    sha = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=work, env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    bare = tmp_path / "app.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], env=env, check=True)
    subprocess.run(["git", "update-server-info"], cwd=bare, env=env, check=True)
    return bare, sha


@pytest.fixture
async def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[dict[str, Any]]:
    monkeypatch.setenv("STOKER_ALLOW_FAKE_BACKEND", "1")
    bare, sha = bare_repo(tmp_path)
    (tmp_path / "pat").write_text(PAT)
    (tmp_path / "svc-token").write_text(SERVICE_TOKEN)
    sock = listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    with FakeGitLab() as gl:
        gl.add_token(PAT, {"create_runner", "manage_runner"})
        gl.add_project(42, "acme/app", repo_dir=bare)
        config = ServiceConfig.model_validate(
            {
                "state_dir": str(tmp_path / "state"),
                "backend": "fake",
                "host": {"name": "h1", "cpus": 4, "memory_mb": 4096},
                "poll_seconds": 0.2,
                "shutdown_grace_seconds": 5,
                "pools": {"gl": {"cpus": 1, "memory": 256, "max": 2, "min_idle": 1}},
                "tokens": [
                    {
                        "name": "gitlab",
                        "sha256": hashlib.sha256(SERVICE_TOKEN.encode()).hexdigest(),
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
                    "builds_dir": str(tmp_path / "guest" / "builds"),
                    "cache_dir": str(tmp_path / "guest" / "cache"),
                    "pools": {
                        "gl": {"runner_type": "project_type", "project_id": 42, "tags": ["vm"]}
                    },
                },
            },
            context={"base_dir": tmp_path},
        )
        stop = asyncio.Event()
        ready: list[str] = []
        server = asyncio.create_task(serve(config, stop=stop, sock=sock, on_ready=ready.append))
        try:
            runner_config = tmp_path / "gitlab-runner" / "config.toml"
            for _ in range(300):
                assert not server.done(), server.exception()
                if ready and runner_config.exists():
                    break
                await asyncio.sleep(0.05)
            entry = load(runner_config).get("stoker-gl")
            assert entry is not None
            yield {"gl": gl, "url": ready[0], "entry": entry, "sha": sha, "tmp": tmp_path}
        finally:
            stop.set()
            await asyncio.wait_for(server, timeout=30)


def manager(world: dict[str, Any]) -> StandInManager:
    settings = RunnerSettings.from_config_toml(
        world["tmp"] / "gitlab-runner" / "config.toml", "stoker-gl"
    )
    return StandInManager(world["gl"].url, world["entry"]["token"], settings)


async def sessions(url: str) -> list[dict[str, Any]]:
    async with ApiClient(url, SERVICE_TOKEN) as api:
        return await api.jobs(limit=100)


async def test_jobs_run_through_the_executor_in_pool_vms(world: dict[str, Any]) -> None:
    gl: FakeGitLab = world["gl"]
    (runner,) = gl.runners().values()
    assert runner.type == "project_type" and runner.tags == ["vm"]
    assert runner.description.startswith("stoker gl (")
    ok = gl.queue_job(
        42,
        ["cat README", "echo token=$CI_JOB_TOKEN", 'test -z "$CI_SERVER_TOKEN"'],
        tags=["vm"],
        sha=world["sha"],
        after_script=["echo after"],
    )
    bad = gl.queue_job(42, ["echo failing", "exit 5"], tags=["vm"], sha=world["sha"])
    work = world["tmp"] / "manager"
    work.mkdir()
    with manager(world) as m:
        first = await asyncio.to_thread(m.run_once, work, timeout=30)
        second = await asyncio.to_thread(m.run_once, work, timeout=30)
    assert first is not None and first.state == "success", first
    assert second is not None and second.state == "failed" and second.exit_code == 5, second
    jobs = gl.jobs()
    assert jobs[ok].state == "success" and jobs[bad].state == "failed"
    assert jobs[bad].exit_code == 5 and jobs[bad].failure_reason == "script_failure"
    trace = jobs[ok].trace.decode()
    assert "Using Custom executor with driver stoker (pool gl)" in trace
    assert "Got warm VM" in trace  # min_idle = 1: the pool's warm VM
    assert "hello from the repository" in trace  # cloned from the fake with the job token
    assert "after" in trace and "[MASKED]" in trace  # the job token is masked
    assert "Waiting for a VM" in trace
    # each GitLab job was one session job, ended by cleanup; no VM left busy
    done = [j for j in await sessions(world["url"]) if j["session_idle_timeout"] is not None]
    assert len(done) == 2 and all(j["state"] == "succeeded" for j in done), done
    # the executor's per-job state is gone too
    states = Path(os.environ["STOKER_RUNTIME_DIR"]) / "gitlab-executor"
    assert not states.exists() or not list(states.iterdir())


@pytest.mark.skipif(
    shutil.which("gitlab-runner") is None,
    reason="no gitlab-runner on PATH (it cannot be installed here): the stand-in covers it",
)
async def test_the_same_jobs_with_a_real_gitlab_runner(world: dict[str, Any]) -> None:
    """Where gitlab-runner exists, it drives the driver from the entry stoker wrote."""
    gl: FakeGitLab = world["gl"]
    ok = gl.queue_job(42, ["cat README"], tags=["vm"], sha=world["sha"])
    bad = gl.queue_job(42, ["exit 5"], tags=["vm"], sha=world["sha"])
    config = world["tmp"] / "gitlab-runner" / "config.toml"
    manager = await asyncio.create_subprocess_exec(
        "gitlab-runner", "run", "--config", str(config),
        "--working-directory", str(world["tmp"] / "manager-real"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(1200):
            jobs = gl.jobs()
            if jobs[ok].state in ("success", "failed") and jobs[bad].state in ("success", "failed"):
                break
            await asyncio.sleep(0.1)
    finally:
        manager.terminate()
        await manager.wait()
    jobs = gl.jobs()
    assert jobs[ok].state == "success", jobs[ok].trace.decode(errors="replace")
    assert jobs[bad].state == "failed" and jobs[bad].exit_code == 5


async def test_the_integration_view_shows_the_registered_runner(world: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    async with httpx.AsyncClient(base_url=world["url"], headers=headers) as client:
        for _ in range(100):  # the pass ends just after it wrote gitlab-runner's file
            [view] = (await client.get("/v1/integrations")).json()
            if view["last_pass_at"] is not None:
                break
            await asyncio.sleep(0.05)
    assert (view["name"], view["targets"]) == ("gitlab", [f"{world['gl'].url} pool:gl"])
    assert view["runners"] == {"registered": 1} and view["leader"] is True
    assert view["last_error"] is None and view["last_correction"] is None
    assert view["last_webhook_at"] is None and view["rate_limit_remaining"] is None
