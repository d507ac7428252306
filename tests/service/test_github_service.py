"""GitHub Actions runners managed by ``stoker serve``, against FakeGitHub (no VMs).

The service runs on the fake backend (the real guest agent, commands on this
host), its REST API on 127.0.0.1, and FakeGitHub (a fake, on 127.0.0.1)
delivers signed webhooks to it.  Each runner job runs the stand-in ``run.sh``
(the official runner cannot be downloaded here), which takes one job from the
fake, runs it, reports it and exits.  With real VMs: ``tests/test_github_vm.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from chaos_harness import kill_fake_vms
from github_harness import (
    APP_ID,
    INSTALLATION,
    LABELS,
    OWNER,
    REPO,
    SECRET,
    FakeGitHub,
    Running,
    app_key,
    fake_backend,
    github_for,
    github_table,
    make_socket,
    serving,
    stand_in_dir,
    until,
)
from sqlalchemy import select

from conftest import ConfigFactory
from stoker.ci.github.models import GitHubJob, GitHubRunner
from stoker.ci.github.webhook import signature
from stoker.service.config import ServiceConfig, TokenConfig
from stoker.service.jobs import JobState


@pytest.fixture
def keys(tmp_path: Path) -> bytes:
    return app_key(tmp_path)[1]


@pytest.fixture
def runner_dir(tmp_path: Path) -> Path:
    return stand_in_dir(tmp_path)


@pytest.fixture
def github(keys: bytes, sock: Any) -> Iterator[FakeGitHub]:
    with github_for(sock, keys) as fake:
        yield fake


def config_for(
    make_config: ConfigFactory,
    tmp_path: Path,
    github: FakeGitHub,
    *,
    max_vms: int = 3,
    **github_overrides: Any,
) -> ServiceConfig:
    return make_config(
        pools={"gh": {"cpus": 1, "memory": 256, "max": max_vms}},
        submitters={"overrides": {"github": {"max_concurrent": 100}}},
        github=github_table(tmp_path, github.url, runner_user="root", **github_overrides),
    )


async def runner_rows(running: Running) -> list[GitHubRunner]:
    return await running.service.db.run(
        lambda s: list(s.scalars(select(GitHubRunner).order_by(GitHubRunner.created_at))),
        write=False,
    )


async def all_settled(running: Running, github: FakeGitHub, jobs: list[int]) -> bool:
    """Every job completed on GitHub, every runner destroyed, none left registered."""
    done = all(github.jobs[j].status == "completed" for j in jobs)
    rows = await runner_rows(running)
    return done and all(r.state == "destroyed" for r in rows) and not github.runners


async def test_a_queued_job_gets_a_fresh_runner_which_is_then_deleted(
    make_config: ConfigFactory, tmp_path: Path, github: FakeGitHub, sock: Any, runner_dir: Path
) -> None:
    config = config_for(make_config, tmp_path, github)
    async with serving(config, sock, backend=fake_backend(runner_dir)) as running:
        job = github.queue_job(REPO, LABELS, run=["sh", "-c", "echo built by the stand-in"])
        await until(lambda: all_settled(running, github, [job]), 30, "the job to finish")
        assert github.jobs[job].conclusion == "success"
        (runner,) = await runner_rows(running)
        assert runner.pool == "gh" and runner.github_job_id == job
        assert [h["state"] for h in runner.history][:3] == ["intent", "registered", "booting"]
        assert runner.history[-1]["state"] == "destroyed"
        # The runner job is an ordinary service job: its output is the job's log.
        assert runner.job_id is not None
        view = await running.service.get(runner.job_id)
        assert view.state is JobState.SUCCEEDED and view.submitter == "github"
        assert view.user == "root" and view.retries == 0
        assert "ACTIONS_RUNNER_INPUT_JITCONFIG" in view.secret_keys
        log = "".join(c.text for c in await running.service.logs(runner.job_id))
        assert "built by the stand-in" in log and "Listening for Jobs" in log
        # Registered with the pool's labels plus stoker's two.
        calls = [c for c in github.api_calls() if "generate-jitconfig" in c[1]]
        assert calls == [("POST", f"/repos/{REPO}/actions/runners/generate-jitconfig", 201)]
        # Steady state: a job costs at most three calls (register, delete, and the
        # periodic listing amortised over jobs is not counted here).
        per_job = [c for c in github.api_calls() if c[0] != "GET"]
        assert len(per_job) <= 3, per_job


async def test_webhook_signature_and_events_are_checked(
    make_config: ConfigFactory, tmp_path: Path, github: FakeGitHub, sock: Any, runner_dir: Path
) -> None:
    config = config_for(make_config, tmp_path, github)
    async with serving(config, sock, backend=fake_backend(runner_dir)) as running:
        hook = f"{running.url}/v1/github/webhook"
        payload = {
            "action": "queued",
            "workflow_job": {"id": 99, "run_id": 1, "status": "queued", "labels": LABELS},
            "repository": {"full_name": REPO, "owner": {"login": OWNER}},
        }
        body = json.dumps(payload).encode()
        headers = {"X-GitHub-Event": "workflow_job", "X-GitHub-Delivery": "d-1"}
        async with httpx.AsyncClient() as client:
            forged = await client.post(
                hook, content=body, headers={**headers, "X-Hub-Signature-256": "sha256=" + "0" * 64}
            )
            unsigned = await client.post(hook, content=body, headers=headers)
            other = await client.post(
                hook,
                content=b"{}",
                headers={
                    "X-GitHub-Event": "push",
                    "X-GitHub-Delivery": "d-2",
                    "X-Hub-Signature-256": signature(SECRET, b"{}"),
                },
            )
            huge_body = b" " * (2 << 20)
            huge = await client.post(
                hook,
                content=huge_body,
                headers={**headers, "X-Hub-Signature-256": signature(SECRET, huge_body)},
            )
            ping = await client.post(
                hook,
                content=b"{}",
                headers={
                    "X-GitHub-Event": "ping",
                    "X-GitHub-Delivery": "d-3",
                    "X-Hub-Signature-256": signature(SECRET, b"{}"),
                },
            )
        assert (forged.status_code, unsigned.status_code) == (401, 401)
        assert (other.status_code, huge.status_code, ping.status_code) == (400, 413, 200)
        recorded = await running.service.db.run(
            lambda s: s.scalars(select(GitHubJob)).all(), write=False
        )
        assert recorded == []
        assert await runner_rows(running) == []


async def test_a_dropped_webhook_is_caught_by_asking_github(
    make_config: ConfigFactory, tmp_path: Path, github: FakeGitHub, sock: Any, runner_dir: Path
) -> None:
    config = config_for(make_config, tmp_path, github)
    async with serving(config, sock, backend=fake_backend(runner_dir)) as running:
        github.webhooks.drop_next(1)
        job = github.queue_job(REPO, LABELS)
        await until(lambda: all_settled(running, github, [job]), 30, "the sweep to find the job")
        row = await running.service.db.run(lambda s: s.get(GitHubJob, job), write=False)
        assert row is not None and row.source == "sweep"
        assert running.integration.corrections >= 1


async def test_duplicated_reordered_and_redelivered_webhooks_spawn_nothing_extra(
    make_config: ConfigFactory, tmp_path: Path, github: FakeGitHub, sock: Any, runner_dir: Path
) -> None:
    # A long reconcile period: only webhooks drive the service here.
    config = config_for(make_config, tmp_path, github, reconcile_seconds=600)
    async with serving(config, sock, backend=fake_backend(runner_dir)) as running:
        github.webhooks.duplicate_next(3)
        github.webhooks.hold()
        jobs = [github.queue_job(REPO, LABELS) for _ in range(3)]
        github.webhooks.release(reverse=True)
        await until(lambda: all_settled(running, github, jobs), 40, "three jobs to finish")
        for delivery in list(github.webhooks.deliveries)[:3]:
            github.webhooks.redeliver(delivery.delivery_id)
        await asyncio.to_thread(github.webhooks.wait_idle)
        await running.integration.run_once(full=False)
        rows = await runner_rows(running)
        assert len(rows) == 3, [r.name for r in rows]
        assert all(r.state == "destroyed" for r in rows)
        statuses = {d.status for d in github.webhooks.deliveries}
        assert statuses <= {202}, statuses


async def test_a_burst_of_twenty_jobs_with_max_three_all_finish(
    make_config: ConfigFactory, tmp_path: Path, github: FakeGitHub, sock: Any, runner_dir: Path
) -> None:
    config = config_for(make_config, tmp_path, github, max_vms=3)
    backend = fake_backend(runner_dir)
    async with serving(config, sock, backend=backend) as running:
        jobs = [github.queue_job(REPO, LABELS, run=["sleep", "0.2"]) for _ in range(20)]
        await until(lambda: all_settled(running, github, jobs), 120, "twenty jobs to finish")
        assert backend.peak_vms <= 3
        assert all(github.jobs[j].conclusion == "success" for j in jobs)
        rows = await runner_rows(running)
        # One runner per job (none wasted on duplicates), each registered once.
        assert len(rows) == 20


async def test_jobs_for_labels_no_pool_serves_are_left_alone(
    make_config: ConfigFactory, tmp_path: Path, github: FakeGitHub, sock: Any, runner_dir: Path
) -> None:
    config = config_for(make_config, tmp_path, github)
    async with serving(config, sock, backend=fake_backend(runner_dir)) as running:
        github.queue_job(REPO, ["ubuntu-latest"])
        await asyncio.to_thread(github.webhooks.wait_idle)
        await running.integration.run_once(full=True)
        assert await runner_rows(running) == []
        assert github.runners == {}


async def test_orphan_runners_with_our_label_are_deleted_and_others_kept(
    make_config: ConfigFactory, tmp_path: Path, github: FakeGitHub, sock: Any, runner_dir: Path
) -> None:
    config = config_for(make_config, tmp_path, github)
    async with serving(config, sock, backend=fake_backend(runner_dir)) as running:
        label = running.integration.controller_label(running.service)
        ours = github.add_runner(f"repos/{REPO}", "stoker-gh-orphan", [*LABELS, label])
        theirs = github.add_runner(f"repos/{REPO}", "someone-elses", LABELS)
        await until(lambda: ours not in github.runners, 15, "the orphan to be deleted")
        # The pass that deleted it counts the correction when it ends.
        await until(lambda: running.integration.corrections >= 1, 15, "the correction")
        assert theirs in github.runners
        view = await running.integration.view()
        assert view.last_correction is not None
        assert view.last_correction.kind == "orphan_runners"
        assert view.targets == [f"repository:{REPO}"] and view.leader


async def test_an_idle_runner_past_its_deadline_is_cancelled_and_deregistered(
    make_config: ConfigFactory, tmp_path: Path, github: FakeGitHub, sock: Any, runner_dir: Path
) -> None:
    config = config_for(
        make_config,
        tmp_path,
        github,
        idle_timeout=1.0,
        pools={"gh": {"labels": LABELS, "min_idle": 1}},
    )
    async with serving(config, sock, backend=fake_backend(runner_dir)) as running:

        async def expired() -> bool:
            rows = await runner_rows(running)
            return any(r.state == "destroyed" and "idle_timeout" in (r.reason or "") for r in rows)

        await until(expired, 30, "an idle runner to expire")
        rows = await runner_rows(running)
        gone = next(r for r in rows if r.state == "destroyed")
        assert gone.runner_id not in github.runners
        job = await running.service.get(gone.job_id or "")
        assert job.state is JobState.CANCELLED

        # min_idle keeps one runner waiting: a new one replaced it.
        async def replaced() -> bool:
            rows = await runner_rows(running)
            return any(r.state in ("booting", "idle") and r.name != gone.name for r in rows)

        await until(replaced, 15, "a new idle runner")


async def test_a_github_outage_never_touches_running_runners(
    make_config: ConfigFactory, tmp_path: Path, github: FakeGitHub, sock: Any, runner_dir: Path
) -> None:
    config = config_for(make_config, tmp_path, github)
    async with serving(config, sock, backend=fake_backend(runner_dir)) as running:
        job = github.queue_job(REPO, LABELS, run=["sleep", "3"])

        async def busy() -> bool:
            return any(r.state == "busy" for r in await runner_rows(running))

        await until(busy, 20, "the runner to take the job")
        github.fail("*", r"^/(repos|app)", 503, times=10_000)
        await until(lambda: github.jobs[job].status == "completed", 20, "the job to finish")
        assert github.jobs[job].conclusion == "success"
        github.clear_faults()
        await until(lambda: all_settled(running, github, [job]), 30, "clean-up after the outage")


async def test_health_metrics_and_the_runner_listing_show_the_integration(
    make_config: ConfigFactory, tmp_path: Path, github: FakeGitHub, sock: Any, runner_dir: Path
) -> None:
    token = "ops-token-for-tests"
    config = config_for(make_config, tmp_path, github).model_copy(
        update={
            "tokens": (
                TokenConfig(
                    name="ops", sha256=hashlib.sha256(token.encode()).hexdigest(), scopes=("read",)
                ),
            )
        }
    )
    async with serving(config, sock, backend=fake_backend(runner_dir)) as running:
        job = github.queue_job(REPO, LABELS)
        await until(lambda: all_settled(running, github, [job]), 30, "the job to finish")
        async with httpx.AsyncClient(base_url=running.url) as client:
            anonymous = await client.get("/v1/github/runners")
            auth = {"Authorization": f"Bearer {token}"}
            live = (await client.get("/v1/github/runners", headers=auth)).json()
            everything = (await client.get("/v1/github/runners?all=true", headers=auth)).json()
            integrations = (await client.get("/v1/integrations", headers=auth)).json()
        assert anonymous.status_code == 401
        assert live == []
        assert [r["state"] for r in everything] == ["destroyed"]
        assert everything[0]["github_job_id"] == job
        [view] = integrations
        assert (view["name"], view["targets"], view["leader"]) == (
            "github",
            [f"repository:{REPO}"],
            True,
        )
        # Runners by live state, all present; the destroyed one is history.
        assert view["runners"] == dict.fromkeys(
            ["intent", "registered", "booting", "idle", "busy", "finished", "deregistered"], 0
        )
        assert view["last_webhook_at"] and view["last_pass_at"] and view["last_error"] is None
        assert view["rate_limit_remaining"] is not None
        await running.integration.run_once(full=True)
        health = await running.service.health()
        state = health.integrations["github"]
        assert state["leader"] and state["passes"] >= 1 and state["last_webhook_at"]
        assert state["rate_limit_remaining"] is not None
        from prometheus_client import generate_latest

        text = generate_latest(running.metrics.registry).decode()
        assert 'stoker_github_runners{state="destroyed"} 1.0' in text
        assert 'stoker_github_queued_jobs{pool="gh"} 0.0' in text
        assert "stoker_github_rate_limit_remaining" in text
        assert 'route="POST /repos/{owner}/{repo}/actions/runners/generate-jitconfig"' in text
        assert "stoker_github_job_start_seconds_count 1.0" in text


def test_kill_9_mid_job_leaves_no_orphans_after_restart(
    tmp_path: Path, keys: bytes, runner_dir: Path, allow_fake: None
) -> None:
    """``stoker serve`` (fake backend) SIGKILLed while its runner runs a job, then restarted."""
    listener = make_socket()
    port = listener.getsockname()[1]
    listener.close()  # the service binds it itself
    with FakeGitHub(
        app_id=APP_ID,
        public_key_pem=keys,
        webhook_url=f"http://127.0.0.1:{port}/v1/github/webhook",
        webhook_secret=SECRET,
        lost_after=3.0,
    ) as github:
        github.install(OWNER, INSTALLATION)
        github.add_repo(REPO)
        table = github_table(tmp_path, github.url, runner_user="root")
        config = tmp_path / "stoker.toml"
        config.write_text(_toml(tmp_path, port, table))
        env = {
            **os.environ,
            "STOKER_ALLOW_FAKE_BACKEND": "1",
            "STOKER_FAKE_IMAGE_FILES": json.dumps({"/opt/actions-runner": str(runner_dir)}),
        }
        argv = [sys.executable, "-m", "stoker.cli", "serve", "--config", str(config)]
        log = (tmp_path / "serve-1.log").open("wb")
        first = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            stuck = github.queue_job(REPO, LABELS, run=["sleep", "600"])
            _wait(lambda: github.jobs[stuck].status == "in_progress", 60, "the job to start")
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
            # Real VMs die with the daemon (QEMU has a parent-death signal); the fake
            # backend's "VMs" are host processes, so end them as their VMs would end.
            kill_fake_vms(tmp_path)
        # GitHub notices the dead runner's job failing; meanwhile a new job queues.
        later = github.queue_job(REPO, LABELS, run=["true"])
        log2 = (tmp_path / "serve-2.log").open("wb")
        second = subprocess.Popen(argv, env=env, stdout=log2, stderr=subprocess.STDOUT)
        try:
            _wait(lambda: github.jobs[later].status == "completed", 60, "the new job to run")

            def clean() -> bool:
                # The stuck job's runner died with the daemon: stoker deleted it on GitHub.
                return all(r.busy is False for r in github.runners.values()) and not any(
                    r.status == "online" for r in github.runners.values()
                )

            _wait(clean, 60, "no orphan runner")

            def settled() -> bool:
                states = _runner_states(tmp_path).values()
                return all(s == "destroyed" for s in states)

            _wait(settled, 30, "every runner record to reach destroyed")
            # One runner for the job that was lost with the daemon, one for the new job.
            assert len(_runner_states(tmp_path)) == 2
            assert not github.runners
        finally:
            second.send_signal(signal.SIGTERM)
            try:
                second.wait(timeout=60)
            except subprocess.TimeoutExpired:
                second.kill()
                second.wait()
        assert github.jobs[later].conclusion == "success"


def _toml(tmp_path: Path, port: int, table: dict[str, Any]) -> str:
    pools = "\n".join(
        f"[github.pools.{k}]\nlabels = {json.dumps(v['labels'])}"
        for k, v in table.pop("pools").items()
    )
    targets = "\n".join(
        f"[[github.targets]]\nrepository = {json.dumps(t['repository'])}"
        for t in table.pop("targets")
    )
    github = "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items())
    return f"""
state_dir = "{tmp_path / "state"}"
backend = "fake"
heartbeat_seconds = 0.5
lease_seconds = 2
poll_seconds = 0.2
shutdown_grace_seconds = 5
[listen]
host = "127.0.0.1"
port = {port}
[host]
name = "kill-test"
cpus = 4
memory_mb = 4096
[pools.gh]
cpus = 1
memory = 256
max = 2
[submitters.overrides.github]
max_concurrent = 10
[github]
{github}
{targets}
{pools}
"""


def _wait(check: Any, timeout: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)


def _runner_states(tmp_path: Path) -> dict[str, str]:
    import sqlite3

    with sqlite3.connect(tmp_path / "state" / "stoker.db") as db:
        return dict(db.execute("select name, state from github_runners").fetchall())
