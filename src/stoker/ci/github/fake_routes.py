"""The routes of :class:`~stoker.ci.github.fake_github.FakeGitHub` (a **fake** GitHub).

GitHub's documented REST contract for what stoker calls, and the stand-in
runner's protocol under ``/_fake/runner/``; the fake's state and controls are
in :mod:`stoker.ci.github.fake_github`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

if TYPE_CHECKING:
    from stoker.ci.github.fake_github import FakeGitHub

MAX_BODY = 1 << 20


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"message": message, "documentation_url": "https://docs.github.com/rest"},
        status_code=status,
        headers=headers,
    )


async def _json_body(request: Request) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY:
        return None
    try:
        return json.loads(body or b"{}")
    except ValueError:
        return None


def add_routes(app: FastAPI, fake: FakeGitHub) -> None:
    """The REST contract and the stand-in runner protocol."""
    # At call time: fake_github imports this module.
    from stoker.ci.github.fake_github import FakeRunner, _iso, _now

    p = fake.prefix

    @app.get(p + "/app")
    async def get_app() -> Any:
        return {
            "id": fake.app_id,
            "slug": "stoker-fake",
            "client_id": fake.client_id,
            "name": "stoker (fake)",
        }

    @app.get(p + "/rate_limit")
    async def rate_limit() -> Any:
        with fake.lock:
            core = {
                "limit": fake.rate_limit,
                "remaining": fake.rate_remaining,
                "reset": fake.rate_reset,
            }
        return {"resources": {"core": core}, "rate": core}

    @app.get(p + "/app/installations")
    async def installations() -> Any:
        with fake.lock:
            return [
                {"id": i, "account": {"login": o, "type": "Organization"}}
                for o, i in fake.installations.items()
            ]

    async def installation_of(owner: str) -> Any:
        with fake.lock:
            found = fake.installations.get(owner.lower())
        if found is None:
            return error(404, "Not Found")
        return {"id": found, "account": {"login": owner}}

    @app.get(p + "/repos/{owner}/{repo}/installation")
    async def repo_installation(owner: str, repo: str) -> Any:
        with fake.lock:
            known = f"{owner}/{repo}".lower() in fake.repos
        return await installation_of(owner) if known else error(404, "Not Found")

    @app.get(p + "/orgs/{org}/installation")
    async def org_installation(org: str) -> Any:
        return await installation_of(org)

    @app.get(p + "/enterprises/{enterprise}/installation")
    async def enterprise_installation(enterprise: str) -> Any:
        return await installation_of(enterprise)

    @app.post(p + "/app/installations/{installation}/access_tokens")
    async def access_token(installation: int) -> Any:
        with fake.lock:
            if installation not in fake.installations.values():
                return error(404, "Not Found")
            token = "ghs_" + secrets.token_hex(18)
            expires = _now() + timedelta(seconds=fake.token_lifetime)
            fake.tokens[token] = (installation, expires)
        return JSONResponse(
            {
                "token": token,
                "expires_at": _iso(expires),
                "permissions": {"administration": "write"},
                "repository_selection": "all",
            },
            status_code=201,
        )

    scopes = ("/repos/{owner}/{name}", "/orgs/{owner}", "/enterprises/{owner}")

    def scope_of(request: Request) -> str:
        path = request.url.path[len(p) :] if p else request.url.path
        parts = path.strip("/").split("/")
        return "/".join(parts[:3] if parts[0] == "repos" else parts[:2])

    for prefix in scopes:

        @app.post(p + prefix + "/actions/runners/generate-jitconfig")
        async def generate_jitconfig(request: Request) -> Any:
            scope = scope_of(request)
            body = await _json_body(request)
            if not isinstance(body, dict):
                return error(400, "Problems parsing JSON")
            name, labels = body.get("name"), body.get("labels")
            group = body.get("runner_group_id")
            if not isinstance(name, str) or not name or len(name) > 64:
                return error(422, "Invalid request: name")
            if (
                not isinstance(labels, list)
                or not 1 <= len(labels) <= 100
                or not all(isinstance(x, str) and x for x in labels)
            ):
                return error(422, "Invalid request: labels")
            if not isinstance(group, int):
                return error(422, "Invalid request: runner_group_id")
            with fake.lock:
                if not fake._scope_exists(scope):
                    return error(404, "Not Found")
                if any(r.name == name for r in fake.iter_runners(scope)):
                    return error(409, "Already exists - A runner with the same name exists")
                runner = FakeRunner(
                    id=next(fake._ids),
                    name=name,
                    scope=scope,
                    labels=list(labels),
                    group_id=group,
                    secret=secrets.token_hex(16),
                )
                fake.runner_table[runner.id] = runner
            config = {
                "url": fake.url.removesuffix(p) if p else fake.url,
                "runner_id": runner.id,
                "runner_name": name,
                "secret": runner.secret,
            }
            encoded = base64.b64encode(json.dumps(config).encode()).decode()
            return JSONResponse(
                {"runner": runner.api(), "encoded_jit_config": encoded}, status_code=201
            )

        @app.get(p + prefix + "/actions/runners")
        async def list_runners(request: Request) -> Any:
            scope = scope_of(request)
            with fake.lock:
                if not fake._scope_exists(scope):
                    return error(404, "Not Found")
                items = [r.api() for r in fake.iter_runners(scope)]
            return fake._paged(request, "runners", items)

        @app.get(p + prefix + "/actions/runners/downloads")
        async def downloads(request: Request) -> Any:
            v = fake.runner_version
            return [
                {
                    "os": "linux",
                    "architecture": arch,
                    "download_url": f"https://github.com/actions/runner/releases/download/v{v}/"
                    f"actions-runner-linux-{arch}-{v}.tar.gz",
                    "filename": f"actions-runner-linux-{arch}-{v}.tar.gz",
                    "sha256_checksum": "0" * 64,
                }
                for arch in ("x64", "arm64")
            ]

        @app.get(p + prefix + "/actions/runners/{runner_id}")
        async def get_runner(request: Request, runner_id: int) -> Any:
            scope = scope_of(request)
            with fake.lock:
                runner = fake.runner_table.get(runner_id)
                if runner is None or runner.scope.lower() != scope.lower():
                    return error(404, "Not Found")
                return runner.api()

        @app.delete(p + prefix + "/actions/runners/{runner_id}")
        async def delete_runner(request: Request, runner_id: int) -> Any:
            scope = scope_of(request)
            with fake.lock:
                runner = fake.runner_table.get(runner_id)
                if runner is None or runner.scope.lower() != scope.lower():
                    return error(404, "Not Found")
                if runner.busy:
                    return error(
                        422, f'Bad request - Runner "{runner.name}" is still running a job"'
                    )
                del fake.runner_table[runner_id]
            return Response(status_code=204)

    for prefix in scopes[1:]:

        @app.get(p + prefix + "/actions/runner-groups")
        async def runner_groups(request: Request) -> Any:
            scope = scope_of(request)
            with fake.lock:
                if not fake._scope_exists(scope):
                    return error(404, "Not Found")
                owner = scope.split("/")[1].lower()
                groups = fake.groups.get(owner, [{"id": 1, "name": "Default"}])
            items = [{**g, "default": g["id"] == 1} for g in groups]
            return fake._paged(request, "runner_groups", items)

    @app.get(p + "/repos/{owner}/{repo}/actions/runs")
    async def runs(request: Request, owner: str, repo: str) -> Any:
        repository = f"{owner}/{repo}".lower()
        status = request.query_params.get("status")
        with fake.lock:
            if repository not in fake.repos:
                return error(404, "Not Found")
            items = [
                {"id": j.run_id, "status": j.status, "name": "ci"}
                for j in sorted(fake.job_table.values(), key=lambda j: j.id)
                if j.repository.lower() == repository and (status is None or j.status == status)
            ]
        return fake._paged(request, "workflow_runs", items)

    @app.get(p + "/repos/{owner}/{repo}/actions/runs/{run_id}/jobs")
    async def run_jobs(request: Request, owner: str, repo: str, run_id: int) -> Any:
        repository = f"{owner}/{repo}".lower()
        with fake.lock:
            items = [
                j.api()
                for j in fake.job_table.values()
                if j.run_id == run_id and j.repository.lower() == repository
            ]
        if not items:
            return error(404, "Not Found")
        return fake._paged(request, "jobs", items)

    @app.get(p + "/repos/{owner}/{repo}/actions/jobs/{job_id}")
    async def get_job(owner: str, repo: str, job_id: int) -> Any:
        with fake.lock:
            job = fake.job_table.get(job_id)
            if job is None or job.repository.lower() != f"{owner}/{repo}".lower():
                return error(404, "Not Found")
            return job.api()

    # --- the stand-in runner's protocol (not GitHub's; see the module docstring)

    def runner_of(body: Any) -> FakeRunner | JSONResponse:
        if not isinstance(body, dict) or not isinstance(body.get("runner_id"), int):
            return error(400, "runner_id and secret required")
        runner = fake.runner_table.get(body["runner_id"])
        if runner is None or not secrets.compare_digest(runner.secret, str(body.get("secret"))):
            return error(401, "unknown runner or wrong secret")
        return runner

    @app.post("/_fake/runner/session")
    async def session(request: Request) -> Any:
        body = await _json_body(request)
        with fake.lock:
            runner = runner_of(body)
            if isinstance(runner, JSONResponse):
                return runner
            if runner.sessions:
                return error(409, "this JIT configuration was used already")
            runner.sessions += 1
            runner.status, runner.last_seen = "online", time.monotonic()
        return {"ok": True}

    @app.post("/_fake/runner/acquire")
    async def acquire(request: Request) -> Any:
        body = await _json_body(request)
        wait = min(30.0, float(body.get("wait", 10))) if isinstance(body, dict) else 10.0
        deadline = time.monotonic() + wait

        def take() -> Any:
            with fake.lock:
                while True:
                    runner = runner_of(body)
                    if isinstance(runner, JSONResponse):
                        return runner
                    runner.last_seen = time.monotonic()
                    job = fake._assign(runner)
                    if job is not None:
                        job.status, job.started_at = "in_progress", _now()
                        job.runner_id, job.runner_name = runner.id, runner.name
                        runner.busy, runner.job_id = True, job.id
                        fake._emit(job)
                        return {"job": {"id": job.id, "run": job.run}}
                    left = deadline - time.monotonic()
                    if left <= 0 or fake._server is None or fake._server.should_exit:
                        return Response(status_code=204)
                    fake._job_ready.wait(min(left, 0.5))

        return await asyncio.to_thread(take)

    @app.post("/_fake/runner/heartbeat")
    async def heartbeat(request: Request) -> Any:
        body = await _json_body(request)
        with fake.lock:
            runner = runner_of(body)
            if isinstance(runner, JSONResponse):
                return runner
            runner.last_seen = time.monotonic()
        return {"ok": True}

    @app.post("/_fake/runner/complete")
    async def complete(request: Request) -> Any:
        body = await _json_body(request)
        with fake.lock:
            runner = runner_of(body)
            if isinstance(runner, JSONResponse):
                return runner
            job = fake.job_table.get(body.get("job_id", -1))
            if job is None or job.runner_id != runner.id or job.status != "in_progress":
                return error(409, "not this runner's job")
            conclusion = body.get("conclusion")
            job.status, job.completed_at = "completed", _now()
            job.conclusion = conclusion if conclusion in ("success", "failure") else "failure"
            fake._emit(job)
            # An ephemeral runner is removed once its job is done.
            del fake.runner_table[runner.id]
        return {"ok": True}
