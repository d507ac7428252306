"""The HTTP routes of :mod:`stoker.ci.gitlab.fake_gitlab` (a **fake** GitLab, tests only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from stoker.ci.gitlab.fake_gitlab_model import (
    API,
    MAX_BODY,
    _bad,
    _BadRequest,
    _message,
)

if TYPE_CHECKING:
    from stoker.ci.gitlab.fake_gitlab import FakeGitLab


def make_app(fake: FakeGitLab) -> FastAPI:
    """The fake's HTTP routes (its handlers are :class:`FakeGitLab` methods)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def gate(request: Request, call_next: Any) -> Response:
        method, path = request.method, request.url.path
        length = request.headers.get("content-length", "0")
        trace = path.startswith(API + "/jobs/") and path.endswith("/trace")
        response: Response | None = None
        if not length.isdigit():
            response = _message(400)
        elif int(length) > (fake.max_trace_bytes if trace else MAX_BODY):
            response = _message(413)
        if response is None:
            response = fake._fault(method, path)
        if response is None:
            try:
                response = await call_next(request)
            except _BadRequest as exc:
                response = _bad(str(exc))
        with fake.lock:
            # The path only: tokens travel in headers and bodies, never logged.
            fake._log.append((method, path, response.status_code))
        return response

    async def with_params(request: Request) -> dict[str, Any] | Response:
        try:
            return await fake._params(request)
        except _BadRequest as exc:
            return _bad(str(exc))

    def guarded(handler: Any, *args: Any) -> Response:
        try:
            result: Response = handler(*args)
        except _BadRequest as exc:
            return _bad(str(exc))
        return result

    @app.post(API + "/user/runners")
    async def create_runner(request: Request) -> Response:
        params = await with_params(request)
        if isinstance(params, Response):
            return params
        return guarded(fake._create_runner, request, params)

    @app.delete(API + "/runners/{runner_id}")
    async def delete_runner(request: Request, runner_id: str) -> Response:
        if not runner_id.isdigit():
            return _message(404, "404 Runner Not Found")
        return fake._delete_runner_by_id(request, int(runner_id))

    @app.get(API + "/runners/{runner_id}")
    async def get_runner(request: Request, runner_id: str) -> Response:
        if not runner_id.isdigit():
            return _message(404, "404 Runner Not Found")
        return fake._get_runner(request, int(runner_id))

    @app.delete(API + "/runners")
    async def delete_runner_by_token(request: Request) -> Response:
        params = await with_params(request)
        if isinstance(params, Response):
            return params
        return guarded(fake._delete_runner_by_token, params)

    @app.post(API + "/runners/verify")
    async def verify(request: Request) -> Response:
        params = await with_params(request)
        if isinstance(params, Response):
            return params
        return guarded(fake._verify, params)

    @app.post(API + "/jobs/request")
    async def request_job(request: Request) -> Response:
        params = await with_params(request)
        if isinstance(params, Response):
            return params
        return guarded(fake._request_job, params)

    @app.put(API + "/jobs/{job_id}")
    async def update_job(request: Request, job_id: str) -> Response:
        if not job_id.isdigit():
            return _message(404)
        params = await with_params(request)
        if isinstance(params, Response):
            return params
        return guarded(fake._update_job, request, int(job_id), params)

    @app.patch(API + "/jobs/{job_id}/trace")
    async def patch_trace(request: Request, job_id: str) -> Response:
        if not job_id.isdigit():
            return _message(404)
        return await fake._patch_trace(request, int(job_id))

    @app.get("/{path:path}")
    async def git(request: Request, path: str) -> Response:
        if ("/" + path).startswith(API + "/"):
            return _message(404, "404 Not Found")
        return fake._git(request, path)

    return app
