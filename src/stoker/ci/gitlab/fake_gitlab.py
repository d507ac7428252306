"""FakeGitLab: a **fake** GitLab for tests and benchmarks, on loopback addresses only.

GitLab cannot be reached from where stoker is developed, so this implements,
in memory, the documented runner contract of GitLab's REST API (``doc/api/runners.md``,
``doc/api/users.md`` "Create a runner linked to a user", and the runner's job
protocol of ``lib/api/ci/runner.rb``) that stoker and ``gitlab-runner`` use:

* ``POST /api/v4/user/runners`` (personal access tokens with scopes, runner types,
  groups and projects), ``DELETE /api/v4/runners/:id``, ``DELETE /api/v4/runners``
  and ``POST /api/v4/runners/verify``;
* the job protocol: ``POST /api/v4/jobs/request`` (tag and scope matching; 204 with
  ``X-GitLab-Last-Update`` when there is nothing), ``PUT /api/v4/jobs/:id`` (state,
  with CRC32 trace checksums) and ``PATCH /api/v4/jobs/:id/trace`` (``Content-Range``
  appends, 416 with the stored ``Range``);
* the job's repository over git's "dumb HTTP" protocol (static files of a bare
  repository the test provides), behind ``gitlab-ci-token`` basic authentication;
* injectable faults (:meth:`FakeGitLab.fail_next`) and a log of requests.

Deliberate simplifications: the user behind every personal access token owns
every group and project; jobs are answered at once (no long polling); no
artifacts, caches, services or images.  Where the brief differs from GitLab it
is said so beside the code.

Never use it anywhere but tests and ``bench/``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import ipaddress
import itertools
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import FormData

from stoker.ci.gitlab.fake_gitlab_model import (
    _CHECKSUM_RE,
    _FINAL_STATES,
    _RANGE_RE,
    ACCESS_LEVELS,
    API,
    MAX_TRACE,
    NULL_SHA,
    RUNNER_TYPES,
    FakeGitLabJob,
    FakeGitLabRunner,
    FakeGroup,
    FakeProject,
    FakeToken,
    _bad,
    _BadRequest,
    _bool,
    _crc32,
    _Fault,
    _int,
    _message,
    _str,
    _tags,
)

__all__ = ["FakeGitLab", "FakeGitLabJob", "FakeGitLabRunner", "FakeGroup", "FakeProject"]


class FakeGitLab:
    """The fake (see the module docstring); ``with FakeGitLab() as gl:`` serves on ``gl.url``.

    ``gl.url`` is the instance URL (what runners are configured with); the REST
    API is under ``gl.api_url`` (``gl.url + "/api/v4"``).  Only literal loopback
    addresses are accepted as ``host`` (``ValueError`` otherwise).
    """

    def __init__(
        self, *, host: str = "127.0.0.1", max_trace_bytes: int = MAX_TRACE, trace_interval: int = 3
    ) -> None:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("the fake GitLab listens on literal loopback addresses only") from None
        if not address.is_loopback:
            raise ValueError("the fake GitLab listens on loopback addresses only")
        self.host = host
        self._family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        self.max_trace_bytes = max_trace_bytes
        self.trace_interval = trace_interval
        self.lock = threading.Lock()
        self._ids = itertools.count(1)
        self._tokens: dict[str, FakeToken] = {}
        self._groups: dict[int, FakeGroup] = {}
        self._projects: dict[int, FakeProject] = {}
        self._runners: dict[int, FakeGitLabRunner] = {}
        self._jobs: dict[int, FakeGitLabJob] = {}
        self._faults: list[_Fault] = []
        self._log: list[tuple[str, str, int]] = []
        self._last_update = secrets.token_hex(8)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.url = ""
        self.app = self._make_app()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> FakeGitLab:
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(128)
        self._sock = sock
        shown = f"[{self.host}]" if self._family == socket.AF_INET6 else self.host
        self.url = f"http://{shown}:{sock.getsockname()[1]}"
        # log_config=None, access_log=False: request lines could carry credentials.
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fake-gitlab"
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.__exit__()
                raise RuntimeError("the fake GitLab did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._server = None

    @property
    def api_url(self) -> str:
        """The REST API's base URL."""
        return self.url + API

    # ------------------------------------------------------------------ control (tests)

    def add_token(self, value: str, scopes: Iterable[str], *, admin: bool = False) -> None:
        """Register a personal access token (``create_runner``, ``manage_runner``, ``api``)."""
        with self.lock:
            self._tokens[value] = FakeToken(value, frozenset(scopes), admin)

    def add_group(self, group_id: int, path: str) -> None:
        """A group with a full path (``acme`` or ``acme/sub``)."""
        with self.lock:
            self._groups[group_id] = FakeGroup(group_id, path.strip("/"))

    def add_project(self, project_id: int, path: str, repo_dir: Path | None = None) -> None:
        """A project with a full path (``acme/app``); ``repo_dir``: a bare repository to serve."""
        with self.lock:
            self._projects[project_id] = FakeProject(
                project_id, path.strip("/"), repo_dir.resolve() if repo_dir else None
            )

    def queue_job(
        self,
        project_id: int,
        script: list[str],
        *,
        tags: Iterable[str] = (),
        variables: Mapping[str, str] | None = None,
        after_script: list[str] | None = None,
        name: str = "test",
        stage: str = "test",
        timeout: int = 3600,
        sha: str | None = None,
        ref: str = "main",
    ) -> int:
        """Queue a pending job of a known project; returns its id."""
        with self.lock:
            if project_id not in self._projects:
                raise KeyError(f"no project {project_id}")
            job_id = next(self._ids)
            self._jobs[job_id] = FakeGitLabJob(
                id=job_id,
                project_id=project_id,
                script=list(script),
                tags=list(tags),
                variables=dict(variables or {}),
                after_script=list(after_script) if after_script is not None else None,
                name=name,
                stage=stage,
                timeout=timeout,
                sha=sha or secrets.token_hex(20),
                ref=ref,
                pipeline_id=next(self._ids),
                token="glcbt-" + secrets.token_hex(20),
            )
            self._queue_changed()
            return job_id

    def cancel_job(self, job_id: int) -> None:
        """Cancel a pending or running job (a running one learns it from trace patches)."""
        with self.lock:
            job = self._jobs[job_id]
            if job.state in ("pending", "running"):
                job.state = "canceled"
                self._queue_changed()

    def fail_next(
        self,
        method: str,
        path_prefix: str,
        status: int,
        count: int = 1,
        *,
        retry_after: int | None = None,
    ) -> None:
        """The next ``count`` requests of ``method`` (``*``: any) whose full URL path
        (``/api/v4/jobs/request``) starts with ``path_prefix`` get ``status``."""
        with self.lock:
            self._faults.append(_Fault(method.upper(), path_prefix, status, count, retry_after))

    def runners(self) -> dict[int, FakeGitLabRunner]:
        """A copy of every runner (deleted ones too, ``deleted=True``)."""
        with self.lock:
            return copy.deepcopy(self._runners)

    def jobs(self) -> dict[int, FakeGitLabJob]:
        """A copy of every job."""
        with self.lock:
            return copy.deepcopy(self._jobs)

    def requests(self) -> list[tuple[str, str, int]]:
        """Every request served: (method, URL path without query, status).  No credentials."""
        with self.lock:
            return list(self._log)

    # ------------------------------------------------------------------ internals

    def _queue_changed(self) -> None:
        # Opaque and new on every change, as GitLab's runner queue value is.
        self._last_update = secrets.token_hex(8)

    def _fault(self, method: str, path: str) -> Response | None:
        with self.lock:
            for fault in self._faults:
                if (
                    fault.count > 0
                    and fault.method in ("*", method)
                    and path.startswith(fault.prefix)
                ):
                    fault.count -= 1
                    headers = (
                        {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
                    )
                    return _message(fault.status, headers=headers)
        return None

    async def _params(self, request: Request) -> dict[str, Any]:
        """Query parameters overlaid with a JSON or form body (Grape merges them too)."""
        params: dict[str, Any] = dict(request.query_params)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "application/json":
            raw = await request.body()
            if raw.strip():
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise _BadRequest("body is not valid JSON") from None
                if not isinstance(body, dict):
                    raise _BadRequest("body must be a JSON object")
                params.update(body)
        elif kind in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form: FormData = await request.form()
            for key in form:
                values = [v for v in form.getlist(key) if isinstance(v, str)]
                if key in ("tag_list", "tag_list[]"):
                    params["tag_list"] = values
                elif values:
                    params[key] = values[-1]
        return params

    def _user_token(self, request: Request, scope: str) -> FakeToken | Response:
        token = self._tokens.get(request.headers.get("private-token", ""))
        if token is None:
            return _message(401, "401 Unauthorized")
        # The ``api`` scope grants the whole API in GitLab, the narrow scope just this.
        if not token.scopes & {scope, "api"}:
            return JSONResponse(
                {
                    "error": "insufficient_scope",
                    "error_description": "The request requires higher privileges than "
                    "provided by the access token.",
                    "scope": f"api {scope}",
                },
                status_code=403,
            )
        return token

    def _runner_by_token(self, token: Any) -> FakeGitLabRunner | None:
        if not isinstance(token, str) or not token:
            return None
        for runner in self._runners.values():
            if not runner.deleted and secrets.compare_digest(runner.token, token):
                return runner
        return None

    def _seen(self, runner: FakeGitLabRunner, system_id: str | None) -> None:
        now = time.time()
        runner.contacted_at = now
        if system_id:
            runner.system_ids[system_id] = now

    def _matches(self, runner: FakeGitLabRunner, job: FakeGitLabJob) -> bool:
        if job.tags and not set(job.tags) <= set(runner.tags):
            return False
        if not job.tags and not runner.run_untagged:
            return False
        project = self._projects[job.project_id]
        if runner.type == "project_type":
            return runner.project_id == job.project_id
        if runner.type == "group_type":
            group = self._groups.get(runner.group_id or -1)
            return group is not None and project.path.startswith(group.path + "/")
        return True

    def _payload(self, job: FakeGitLabJob, runner: FakeGitLabRunner) -> dict[str, Any]:
        project = self._projects[job.project_id]
        host = self.url.split("://", 1)[1]
        repo_url = f"http://gitlab-ci-token:{quote(job.token, safe='')}@{host}/{project.path}.git"
        timeout = job.timeout
        if runner.maximum_timeout is not None:
            timeout = min(timeout, runner.maximum_timeout)

        def var(key: str, value: str, public: bool = True, masked: bool = False) -> dict[str, Any]:
            return {"key": key, "value": value, "public": public, "masked": masked, "file": False}

        variables = [
            var("CI", "true"),
            var("GITLAB_CI", "true"),
            var("CI_SERVER_URL", self.url),
            var("CI_JOB_ID", str(job.id)),
            var("CI_JOB_NAME", job.name),
            var("CI_JOB_STAGE", job.stage),
            var("CI_JOB_TOKEN", job.token, public=False, masked=True),
            var("CI_PIPELINE_ID", str(job.pipeline_id)),
            var("CI_PROJECT_ID", str(project.id)),
            var("CI_PROJECT_PATH", project.path),
            var("CI_PROJECT_NAME", project.name),
            var("CI_REPOSITORY_URL", repo_url, public=False),
            var("CI_COMMIT_SHA", job.sha),
            var("CI_COMMIT_REF_NAME", job.ref),
        ]
        # A project's own CI/CD variables are not public in GitLab's payload.
        variables += [var(k, v, public=False) for k, v in job.variables.items()]
        steps: list[dict[str, Any]] = [
            {
                "name": "script",
                "script": list(job.script),
                "timeout": timeout,
                "when": "on_success",
                "allow_failure": False,
            }
        ]
        if job.after_script is not None:
            steps.append(
                {
                    "name": "after_script",
                    "script": list(job.after_script),
                    "timeout": timeout,
                    "when": "always",
                    "allow_failure": True,
                }
            )
        return {
            "id": job.id,
            "token": job.token,
            "allow_git_fetch": True,
            "job_info": {
                "id": job.id,
                "name": job.name,
                "stage": job.stage,
                "project_id": project.id,
                "project_name": project.name,
            },
            "git_info": {
                "repo_url": repo_url,
                "ref": job.ref,
                "sha": job.sha,
                "before_sha": NULL_SHA,
                "ref_type": "branch",
                "refspecs": [],
                "depth": 20,
            },
            "runner_info": {"timeout": timeout, "runner_session_url": None},
            "variables": variables,
            "steps": steps,
            "image": None,
            "services": [],
            "artifacts": [],
            "cache": [],
            "credentials": [],
            "dependencies": [],
            "features": {"trace_sections": True},
        }

    def _job_for(self, job_id: int, token: Any) -> FakeGitLabJob | None:
        job = self._jobs.get(job_id)
        if job is None or not isinstance(token, str) or not token:
            return None
        return job if secrets.compare_digest(job.token, token) else None

    # ------------------------------------------------------------------ endpoints

    def _create_runner(self, request: Request, params: dict[str, Any]) -> Response:
        with self.lock:
            token = self._user_token(request, "create_runner")
            if isinstance(token, Response):
                return token
            kind = params.get("runner_type")
            if kind is None:
                return _bad("runner_type is missing")
            if kind not in RUNNER_TYPES:
                return _bad("runner_type does not have a valid value")
            group_id = _int(params, "group_id")
            project_id = _int(params, "project_id")
            if kind == "instance_type" and not token.admin:
                return _message(403, "403 Forbidden")
            if kind == "group_type":
                if group_id is None:
                    return _bad("group_id is missing")
                if group_id not in self._groups:
                    return _message(404, "404 Group Not Found")
                project_id = None
            elif kind == "project_type":
                if project_id is None:
                    return _bad("project_id is missing")
                if project_id not in self._projects:
                    return _message(404, "404 Project Not Found")
                group_id = None
            else:
                group_id = project_id = None
            tags = _tags(params.get("tag_list"))
            run_untagged = _bool(params, "run_untagged")
            if run_untagged is None:
                # gitlab-runner's rule: untagged jobs by default only for a runner without tags.
                run_untagged = not tags
            if not run_untagged and not tags:
                # The model validation GitLab applies (Ci::Runner#tag_constraints).
                return _message(
                    400,
                    "tags_list can not be empty when runner is not allowed to pick untagged jobs",
                )
            access_level = _str(params, "access_level") or "not_protected"
            if access_level not in ACCESS_LEVELS:
                return _bad("access_level does not have a valid value")
            maximum_timeout = _int(params, "maximum_timeout")
            if maximum_timeout is not None and maximum_timeout < 600:
                return _message(400, "maximum_timeout needs to be at least 10 minutes")
            note = _str(params, "maintenance_note") or ""
            if len(note) > 1024:
                return _message(400, "maintenance_note is too long (maximum is 1024 characters)")
            runner = FakeGitLabRunner(
                id=next(self._ids),
                type=kind,
                token="glrt-" + secrets.token_urlsafe(20),
                tags=tags,
                run_untagged=run_untagged,
                description=_str(params, "description") or "",
                paused=bool(_bool(params, "paused")),
                locked=bool(_bool(params, "locked")),
                access_level=access_level,
                maximum_timeout=maximum_timeout,
                maintenance_note=note,
                group_id=group_id,
                project_id=project_id,
            )
            self._runners[runner.id] = runner
            return JSONResponse(
                {"id": runner.id, "token": runner.token, "token_expires_at": None},
                status_code=201,
            )

    def _delete_runner_by_id(self, request: Request, runner_id: int) -> Response:
        with self.lock:
            token = self._user_token(request, "manage_runner")
            if isinstance(token, Response):
                return token
            runner = self._runners.get(runner_id)
            if runner is None or runner.deleted:
                return _message(404, "404 Runner Not Found")
            if runner.type == "instance_type" and not token.admin:
                return _message(403, "403 Forbidden")
            runner.deleted = True
            return Response(status_code=204)

    def _get_runner(self, request: Request, runner_id: int) -> Response:
        """``GET /runners/:id``: a runner's details (``read_api`` scope; no role checks here)."""
        with self.lock:
            token = self._user_token(request, "read_api")
            if isinstance(token, Response):
                return token
            runner = self._runners.get(runner_id)
            if runner is None or runner.deleted:
                return _message(404, "404 Runner Not Found")
            return JSONResponse(
                {
                    "id": runner.id,
                    "runner_type": runner.type,
                    "description": runner.description,
                    "paused": runner.paused,
                    "is_shared": runner.type == "instance_type",
                    "tag_list": list(runner.tags),
                    "run_untagged": runner.run_untagged,
                    "locked": runner.locked,
                    "access_level": runner.access_level,
                    "maximum_timeout": runner.maximum_timeout,
                }
            )

    def _delete_runner_by_token(self, params: dict[str, Any]) -> Response:
        if not params.get("token"):
            return _bad("token is missing")
        with self.lock:
            runner = self._runner_by_token(params["token"])
            if runner is None:
                return _message(403, "403 Forbidden")
            runner.deleted = True
            return Response(status_code=204)

    def _verify(self, params: dict[str, Any]) -> Response:
        token = params.get("token")
        if not token:
            return _bad("token is missing")
        system_id = _str(params, "system_id")
        if isinstance(token, str) and token.startswith("glrt-") and not system_id:
            return _bad("system_id is missing")
        with self.lock:
            runner = self._runner_by_token(token)
            if runner is None:
                return _message(403, "403 Forbidden")
            self._seen(runner, system_id)
            return JSONResponse({"id": runner.id, "token": runner.token, "token_expires_at": None})

    def _request_job(self, params: dict[str, Any]) -> Response:
        if not params.get("token"):
            return _bad("token is missing")
        system_id = _str(params, "system_id")
        with self.lock:
            runner = self._runner_by_token(params["token"])
            if runner is None:
                return _message(403, "403 Forbidden")
            self._seen(runner, system_id)
            if not runner.paused:
                for job in sorted(self._jobs.values(), key=lambda j: j.id):
                    if job.state == "pending" and self._matches(runner, job):
                        # Handed out once: no other runner can take it any more.
                        job.state, job.runner_id = "running", runner.id
                        self._queue_changed()
                        return JSONResponse(self._payload(job, runner), status_code=201)
            return Response(status_code=204, headers={"X-GitLab-Last-Update": self._last_update})

    def _update_job(self, request: Request, job_id: int, params: dict[str, Any]) -> Response:
        state = _str(params, "state")
        exit_code = _int(params, "exit_code")
        failure_reason = _str(params, "failure_reason")
        checksum = _str(params, "checksum")
        output = params.get("output")
        bytesize: int | None = None
        if isinstance(output, dict):
            checksum = checksum or _str(output, "checksum")
            bytesize = _int(output, "bytesize")
        elif output is not None:
            return _bad("output is invalid")
        if state not in (None, "running", *_FINAL_STATES):
            return _bad("state does not have a valid value")
        if checksum is not None and not _CHECKSUM_RE.fullmatch(checksum):
            return _bad("checksum is invalid")
        with self.lock:
            job = self._job_for(job_id, params.get("token") or request.headers.get("job-token"))
            if job is None:
                return _message(403, "403 Forbidden")
            if job.state != "running":
                return _message(
                    403, "403 Forbidden - Job is not running", {"Job-Status": job.state}
                )
            if state in _FINAL_STATES:
                # The brief's contract (GitLab itself answers 202 while it waits for the
                # trace): a final state whose trace does not match is refused, job stays running.
                if (checksum is not None and checksum.lower() != _crc32(job.trace)) or (
                    bytesize is not None and bytesize != len(job.trace)
                ):
                    return _message(412, "412 Precondition Failed", {"Job-Status": job.state})
                job.state = state
                job.exit_code = exit_code
                job.failure_reason = failure_reason if state == "failed" else None
            return Response(status_code=200, headers={"Job-Status": job.state})

    async def _patch_trace(self, request: Request, job_id: int) -> Response:
        token = request.headers.get("job-token") or request.query_params.get("token")
        content_range = request.headers.get("content-range")
        with self.lock:
            job = self._job_for(job_id, token)
            if job is None:
                return _message(403, "403 Forbidden")
            if job.state not in ("running", "canceled"):
                return _message(
                    403, "403 Forbidden - Job is not running", {"Job-Status": job.state}
                )
            limit = self.max_trace_bytes - len(job.trace)
        if content_range is None:
            return _message(400, "400 Missing header Content-Range")
        match = _RANGE_RE.fullmatch(content_range.strip())
        if match is None:
            return _message(400, "400 Bad Request - Content-Range is invalid")
        start, end = int(match[1]), int(match[2])
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return _message(403, "403 Forbidden - Job's log exceeded limit")
        if end - start + 1 != len(body):
            return _message(400, "400 Bad Request - Content-Range does not match the body")
        with self.lock:
            stored = len(job.trace)
            if start != stored:
                # GitLab's answer: the range the server holds, so the runner can resume.
                return _message(416, "416 Range Not Satisfiable", {"Range": f"0-{stored}"})
            if stored + len(body) > self.max_trace_bytes:
                return _message(403, "403 Forbidden - Job's log exceeded limit")
            job.trace += bytes(body)
            return Response(
                status_code=202,
                headers={
                    "Job-Status": job.state,
                    "Range": f"0-{len(job.trace)}",
                    "X-GitLab-Trace-Update-Interval": str(self.trace_interval),
                },
            )

    def _git(self, request: Request, path: str) -> Response:
        project_path, sep, rest = path.partition(".git/")
        unauthorised = _message(
            401, "401 Unauthorized", {"WWW-Authenticate": 'Basic realm="GitLab"'}
        )
        if not sep:
            return _message(404, "404 Not Found")
        with self.lock:
            project = next(
                (
                    p
                    for p in self._projects.values()
                    if p.path.lower() == project_path.strip("/").lower()
                ),
                None,
            )
            if project is None or not self._git_authorised(request, project):
                return unauthorised
            root = project.repo_dir
        parts = rest.split("/")
        # Refuse anything that could climb out of the repository, before touching the disk.
        if root is None or any(p in ("..", ".") for p in parts) or "\\" in rest or "\x00" in rest:
            return _message(404, "404 Not Found")
        candidate = root.joinpath(*[p for p in parts if p])
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            return _message(404, "404 Not Found")
        if not resolved.is_relative_to(root) or not resolved.is_file():
            return _message(404, "404 Not Found")
        kind = "text/plain" if rest in ("info/refs", "HEAD") else "application/octet-stream"
        return FileResponse(resolved, media_type=kind)

    def _git_authorised(self, request: Request, project: FakeProject) -> bool:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if user != "gitlab-ci-token" or not password:
            return False
        return any(
            job.project_id == project.id
            and job.state == "running"
            and secrets.compare_digest(job.token, password)
            for job in self._jobs.values()
        )

    # ------------------------------------------------------------------ the app

    def _make_app(self) -> FastAPI:
        from stoker.ci.gitlab.fake_gitlab_routes import make_app

        return make_app(self)
