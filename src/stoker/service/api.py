"""The REST API of ``stoker serve`` (FastAPI); its OpenAPI document is part of the product.

Every endpoint but ``GET /health`` needs a bearer token with a scope
(:mod:`stoker.service.auth`)::

    POST /v1/jobs                          submit   multipart: spec (JSON) + source (tar[.gz])
    GET  /v1/jobs                          read     filters: state, pool, label, submitter
    GET  /v1/jobs/{id}                     read
    POST /v1/jobs/{id}/cancel              submit   (own jobs; admin: any)
    GET  /v1/jobs/{id}/logs                read     ?follow=1: server-sent events
    GET  /v1/jobs/{id}/artifacts           read
    GET  /v1/jobs/{id}/artifacts/{name}    read
    GET  /v1/pools | /v1/vms | /v1/hosts   read     VMs' shapes; hosts' budget and use
    GET  /v1/vms/failed                    read     ?limit=: newest first, console tail
    GET  /v1/stats                         read     ?window=: jobs finished, queued, running
    GET  /v1/integrations                  read     CI integrations: runners, loop, errors
    GET  /v1/whoami                        read     the token's name and scopes
    GET  /metrics                          read     Prometheus text format
    GET  /openapi.json                     read     this API's OpenAPI document
    GET  /health                           -
    GET  /ui/                              -        the dashboard (signs in with a token)

The dashboard (``/ui/``) signs in with a token once and keeps it in an
HTTP-only, SameSite=Strict cookie, which every endpoint accepts in place of the
header; a change made that way (``POST``) must also carry ``X-Stoker-CSRF``.

Errors are ``{"error": "<one line>", "detail": ...}`` with 400 (bad input),
401 (no or unknown token; ``WWW-Authenticate: Bearer``), 403 (scope), 404,
409 (state conflict), 413 (too large), 422 (spec does not validate) or 429
(quota).  A rejected submission leaves nothing behind: its temporary
directory is removed and no job row exists.

Secret environment values never appear in a response or a log line: jobs
are returned through :class:`~stoker.service.jobviews.JobView` (which leaves
them out) with every secret shown as ``"***"``, and validation errors are
built from locations and messages only, never from the submitted input.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from pydantic.json_schema import JsonSchemaMode
from starlette.exceptions import HTTPException as StarletteHTTPException

import stoker
from stoker.errors import StokerError
from stoker.service.apiutil import (
    ERRORS,
    ApiError,
    ErrorBody,
    Reader,
    Submitter,
    error_response,
    event_stream_schema,
    from_stoker,
)
from stoker.service.auth import TokenTable
from stoker.service.config import ServiceConfig
from stoker.service.jobs import JobRequest, JobState, redact
from stoker.service.jobviews import ArtifactView, JobFilter, JobView, LogChunkView
from stoker.service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from stoker.service.metrics import Metrics
from stoker.service.openapi import allowed_methods, document
from stoker.service.service import HealthView, NullObserver, PoolView, Service
from stoker.service.sessions import StepRequest
from stoker.service.upload import BadUpload, UploadTooLarge, body_limit, receive_upload

log = logging.getLogger(__name__)

__all__ = ["create_app"]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

#: Chunks per page of ``GET /v1/jobs/{id}/logs`` (without ``follow``).
MAX_LOG_PAGE_CHUNKS: Final = 1000
#: Bytes per page of the same (a chunk is never split, so a page may exceed it by one chunk).
MAX_LOG_PAGE_BYTES: Final = 4 << 20
#: A comment line is sent on an idle event stream this often (proxies close silent ones).
SSE_KEEPALIVE_SECONDS: Final = 15.0
SECRET_MASK: Final = "***"  # noqa: S105 - the mask, not a secret


class Job(JobView):
    """A job as the API shows it: secret environment values are replaced by ``***``."""

    secrets: dict[str, str] = Field(
        default_factory=dict,
        description="The secret environment variables, each value shown as ***.",
    )

    @classmethod
    def from_view(cls, view: JobView) -> Job:
        """The API representation of ``view``."""
        return cls(
            **{name: getattr(view, name) for name in JobView.model_fields},
            secrets=dict.fromkeys(view.secret_keys, SECRET_MASK),
        )


class JobList(BaseModel):
    """A page of jobs, newest first."""

    jobs: list[Job]
    next_before: str | None = Field(
        default=None,
        description="Pass as `before` to get the next page; null on the last page.",
    )


class LogChunk(BaseModel):
    """A piece of a job's output (``data`` is text, or base64 when it is not UTF-8)."""

    seq: int = Field(description="Position in the job's log, from 1; use as `after` to resume.")
    stream: Literal["stdout", "stderr", "system"]
    encoding: Literal["utf-8", "base64"]
    data: str
    at: datetime

    @classmethod
    def of(cls, chunk: LogChunkView) -> LogChunk:
        """Encode ``chunk`` for JSON: as text when it is valid UTF-8."""
        try:
            return cls(
                seq=chunk.seq,
                stream=chunk.stream,
                encoding="utf-8",
                data=chunk.data.decode("utf-8"),
                at=chunk.at,
            )
        except UnicodeDecodeError:
            return cls(
                seq=chunk.seq,
                stream=chunk.stream,
                encoding="base64",
                data=base64.b64encode(chunk.data).decode("ascii"),
                at=chunk.at,
            )


class LogPage(BaseModel):
    """Stored output of a job after chunk ``after``, at most one bounded page."""

    job_id: str
    state: JobState
    chunks: list[LogChunk]
    next_after: int = Field(description="The seq of the last chunk returned (or `after`).")
    complete: bool = Field(description="The job has ended and this page reaches its last chunk.")
    truncated: bool = Field(description="The job wrote more than the service keeps.")


class LogEnd(BaseModel):
    """The ``end`` event of a log stream: the job's final state."""

    state: JobState
    exit_code: int | None
    signal: int | None
    reason: str | None
    job: Job


class ArtifactList(BaseModel):
    """The files a job produced (download each by name)."""

    job_id: str
    artifacts: list[ArtifactView]


# --- errors -------------------------------------------------------------------------------------


def _validation_problems(
    errors: Iterable[Any], secrets: Iterable[str] = (), *, strip: int = 0
) -> list[dict[str, Any]]:
    """Pydantic errors as ``[{loc, msg, type}]``: no ``input`` (it may hold secrets)."""
    problems = []
    for err in errors:
        loc = [str(part) for part in err.get("loc", ())][strip:]
        kind = str(err.get("type", ""))
        if kind == "extra_forbidden":
            msg = f"unknown key {loc[-1]!r}" if loc else "unknown key"
        else:
            msg = redact(str(err.get("msg", "")), secrets)
        problems.append({"loc": loc, "msg": msg, "type": kind})
    return problems


def _summary(problems: list[dict[str, Any]]) -> str:
    first = problems[0]
    where = ".".join(first["loc"])
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return f"{where}: {first['msg']}{more}" if where else f"{first['msg']}{more}"


def _raw_secrets(spec: bytes) -> list[str]:
    """The secret values of a (maybe invalid) spec, to keep them out of error messages."""
    try:
        document = json.loads(spec)
    except ValueError:
        return []
    secrets = document.get("secrets") if isinstance(document, dict) else None
    if not isinstance(secrets, dict):
        return []
    return [v for v in secrets.values() if isinstance(v, str)]


# --- authentication -----------------------------------------------------------------------------


JobId = Annotated[str, PathParam(description="The job's id.", pattern=r"^[0-9a-f]{32}$")]

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such job."}
}


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def _call(awaitable: Awaitable[T]) -> T:
    """Await a service call, turning its errors into HTTP errors."""
    try:
        return await awaitable
    except StokerError as exc:
        raise from_stoker(exc) from None


# --- routes -------------------------------------------------------------------------------------

jobs = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS)

_SUBMIT_BODY: Final[dict[str, Any]] = {
    "requestBody": {
        "required": True,
        "description": "A `spec` part (JSON: the job) and an optional `source` part "
        "(a tar or tar.gz of the project, at most `limits.max_upload_bytes`).",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["spec"],
                    "additionalProperties": False,
                    "properties": {
                        "spec": {"$ref": "#/components/schemas/JobRequest"},
                        "source": {"type": "string", "format": "binary"},
                    },
                },
                "encoding": {"spec": {"contentType": "application/json"}},
            }
        },
    }
}


@jobs.post(
    "",
    status_code=201,
    summary="Submit a job",
    response_model=Job,
    openapi_extra=_SUBMIT_BODY,
    responses={
        400: {"model": ErrorBody, "description": "Unknown pool or image, unsafe tarball, ..."},
        413: {"model": ErrorBody, "description": "The upload or its unpacked tree is too large."},
        422: {"model": ErrorBody, "description": "The spec does not validate."},
        429: {"model": ErrorBody, "description": "Too many queued jobs for this submitter."},
    },
)
async def submit_job(request: Request, principal: Submitter) -> Job:
    """Queue a job: its command, where to run it and optionally its source tree.

    The body is read as it arrives and refused (413) as soon as the source
    passes the upload limit.  The tarball is unpacked and checked before the
    job exists: an entry escaping its root, a device node or a link out of
    the tree is refused (400) naming the entry, and nothing is left behind.
    """
    config: ServiceConfig = request.app.state.config
    limits = config.limits
    length = request.headers.get("content-length")
    if (
        length is not None
        and length.isdigit()
        and int(length) > body_limit(limits.max_upload_bytes)
    ):
        raise ApiError(
            413,
            f"the request body has {length} bytes, more than this service accepts: sources "
            f"of at most {limits.max_upload_bytes} bytes (limits.max_upload_bytes)",
            {"max_upload_bytes": limits.max_upload_bytes},
        )
    workdir = Path(tempfile.mkdtemp(prefix="upload-", dir=_incoming_dir(config)))
    try:
        try:
            upload = await receive_upload(
                request.stream(),
                request.headers.get("content-type", ""),
                workdir=workdir,
                max_source_bytes=limits.max_upload_bytes,
            )
        except UploadTooLarge as exc:
            raise ApiError(413, str(exc), {"max_upload_bytes": limits.max_upload_bytes}) from None
        except BadUpload as exc:
            raise ApiError(400, str(exc)) from None
        spec = _parse_spec(upload.spec)
        # The service checks the spec against the pools and unpacks the source with
        # safe_extract before it creates the job; a refusal leaves nothing behind.
        view = await _call(_service(request).submit(spec, principal.name, source=upload.source))
    finally:
        await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)
    log.info("job %s submitted by %s", view.id, principal.name)
    return Job.from_view(view)


def _incoming_dir(config: ServiceConfig) -> Path:
    """Where submissions are received (the job store's scratch directory, shared with
    :meth:`Service.submit`); each request's files are removed when it ends."""
    path = config.jobs_dir / ".incoming"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _parse_spec(raw: bytes) -> JobRequest:
    return parse_json(JobRequest, raw, what="job spec", where="the spec part")


def parse_json(model: type[M], raw: bytes, *, what: str, where: str) -> M:
    """``raw`` (JSON) as ``model``, or a 422 naming ``what`` (and ``where`` for bad JSON).

    Routes parse their bodies with this rather than declaring them as parameters:
    FastAPI parses a declared body before it checks the token, so a caller without one
    would hear about its JSON (422) rather than its missing token (401).
    """
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        problems = _validation_problems(exc.errors(), _raw_secrets(raw))
        if any(p["type"] == "json_invalid" for p in problems):
            raise ApiError(422, f"{where} is not valid JSON", problems) from None
        raise ApiError(422, f"invalid {what}: {_summary(problems)}", problems) from None


def json_body(model: type[BaseModel], description: str) -> dict[str, Any]:
    """``openapi_extra`` documenting a JSON body of ``model`` that a route parses itself."""
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    }


@jobs.get(
    "",
    summary="List jobs",
    response_model=JobList,
    responses={404: {"model": ErrorBody, "description": "No job `before` names."}},
)
async def list_jobs(
    request: Request,
    principal: Reader,
    state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
    pool: Annotated[str | None, Query(description="Only jobs of this pool.")] = None,
    label: Annotated[str | None, Query(description="Only jobs asking for this label.")] = None,
    submitter: Annotated[str | None, Query(description="Only jobs of this submitter.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many jobs.")] = 100,
    before: Annotated[
        str | None,
        Query(description="Only jobs created before this job (paging).", pattern=r"^[0-9a-f]{32}$"),
    ] = None,
) -> JobList:
    """Jobs matching every given filter, newest first, one page at a time."""
    filters = JobFilter(
        state=state, pool=pool, label=label, submitter=submitter, limit=limit, before=before
    )
    views = await _call(_service(request).list(filters))
    next_before = views[-1].id if len(views) == limit else None
    return JobList(jobs=[Job.from_view(v) for v in views], next_before=next_before)


@jobs.get("/{job_id}", summary="Get a job", response_model=Job, responses=_NOT_FOUND)
async def get_job(request: Request, principal: Reader, job_id: JobId) -> Job:
    """One job with every state transition it went through."""
    return Job.from_view(await _call(_service(request).get(job_id)))


@jobs.post(
    "/{job_id}/cancel",
    summary="Cancel a job",
    response_model=Job,
    responses={
        **_NOT_FOUND,
        409: {"model": ErrorBody, "description": "The job has already ended."},
    },
)
async def cancel_job(request: Request, principal: Submitter, job_id: JobId) -> Job:
    """Cancel a queued or running job (its VM is destroyed).

    A token may cancel the jobs it submitted; an ``admin`` token any job.
    """
    service = _service(request)
    current = await _call(service.get(job_id))
    if current.submitter != principal.name and not principal.allows("admin"):
        raise ApiError(
            403,
            f"job {job_id} was submitted by {current.submitter!r}; "
            "only its submitter or an admin may cancel it",
        )
    view = await _call(service.cancel(job_id))
    log.info("job %s cancelled by %s", job_id, principal.name)
    return Job.from_view(view)


@jobs.get(
    "/{job_id}/logs",
    summary="Get or follow a job's output",
    response_model=LogPage,
    responses={
        **_NOT_FOUND,
        200: {
            "description": "The stored log (JSON), or with `follow=1` a `text/event-stream` "
            "of `log` events (data: a LogChunk) ending with one `end` event (data: LogEnd), "
            "or an `error` event (data: ErrorBody) if the service fails meanwhile.",
            "content": {
                "text/event-stream": {
                    "schema": event_stream_schema(
                        {"log": "LogChunk", "end": "LogEnd", "error": "ErrorBody"}
                    )
                }
            },
        },
    },
)
async def job_logs(
    request: Request,
    principal: Reader,
    job_id: JobId,
    follow: Annotated[
        bool, Query(description="Stream server-sent events until the job ends.")
    ] = False,
    after: Annotated[
        int, Query(ge=0, description="Only chunks after this seq (resume where you were).")
    ] = 0,
) -> Response | LogPage:
    """The job's output: stdout, stderr and stoker's own messages, in order.

    Without ``follow`` one page of the stored log (at most 1000 chunks,
    about 4 MiB); page with ``after=next_after``.  With ``follow=1`` a
    stream of server-sent events: ``log`` for every chunk (its ``id`` is the
    chunk's seq, so ``Last-Event-ID`` resumes), then ``end`` with the final
    state.
    """
    service = _service(request)
    job = await _call(service.get(job_id))
    if follow:
        resume = request.headers.get("last-event-id", "")
        start = max(after, int(resume)) if resume.isdigit() else after
        return StreamingResponse(
            event_stream(
                request,
                service.follow_logs(job_id, start),
                functools.partial(_log_end, service, job_id),
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    chunks = await _call(service.logs(job_id, after, limit=MAX_LOG_PAGE_CHUNKS))
    page: list[LogChunk] = []
    size = 0
    for chunk in chunks:
        if page and size + len(chunk.data) > MAX_LOG_PAGE_BYTES:
            break
        page.append(LogChunk.of(chunk))
        size += len(chunk.data)
    ended = job.state in {JobState(s) for s in _TERMINAL_STATES}
    return LogPage(
        job_id=job_id,
        state=job.state,
        chunks=page,
        next_after=page[-1].seq if page else after,
        complete=ended and len(page) == len(chunks) and len(chunks) < MAX_LOG_PAGE_CHUNKS,
        truncated=job.log_truncated,
    )


_TERMINAL_STATES: Final = ("succeeded", "failed", "errored", "cancelled", "timed_out")


def _sse(event: str, data: BaseModel, event_id: int | None = None) -> bytes:
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {data.model_dump_json()}")
    return ("\n".join(lines) + "\n\n").encode()


async def _log_end(service: Service, job_id: str) -> LogEnd:
    job = Job.from_view(await service.get(job_id))
    return LogEnd(
        state=job.state, exit_code=job.exit_code, signal=job.signal, reason=job.reason, job=job
    )


async def event_stream(
    request: Request,
    items: AsyncIterator[LogChunkView | BaseModel],
    end: Callable[[], Awaitable[BaseModel]] | None = None,
) -> AsyncIterator[bytes]:
    """Server-sent events: ``log`` for every chunk of ``items``, then ``end``.

    ``end()`` is the last event's data, awaited once ``items`` is exhausted;
    without it, the last item of ``items`` (a model that is not a chunk) is.
    Keep-alive comments are sent while idle.  A failure of the service while
    streaming ends the stream with an ``error`` event (data: an
    :class:`ErrorBody`).  The stream also ends (without ``end``) when the
    service shuts down, so clients reconnect with ``Last-Event-ID`` to
    another process or later.
    """
    closing: asyncio.Event = request.app.state.closing
    chunks = aiter(items)
    closed: asyncio.Future[Any] = asyncio.ensure_future(closing.wait())
    pending: asyncio.Future[Any] | None = None
    last: BaseModel | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(chunks))
            done, _ = await asyncio.wait(
                {pending, closed},
                timeout=SSE_KEEPALIVE_SECONDS,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if pending in done:
                future, pending = pending, None
                try:
                    chunk = future.result()
                except StopAsyncIteration:
                    break
                except StokerError as exc:
                    # Headers are sent: report the failure in the stream itself.
                    yield _sse("error", ErrorBody(error=str(exc)))
                    return
                if isinstance(chunk, LogChunkView):
                    yield _sse("log", LogChunk.of(chunk), chunk.seq)
                else:
                    last = chunk
            elif closed in done:
                return
            else:
                yield b": keep-alive\n\n"
        final = await end() if end is not None else last
        if final is not None:
            yield _sse("end", final)
    finally:
        closed.cancel()
        if pending is not None:
            # The generator is suspended inside this task: cancel it and let it unwind first.
            pending.cancel()
            await asyncio.wait({pending})
            if not pending.cancelled():
                pending.exception()  # retrieved: it ended the stream either way
        await chunks.aclose()  # type: ignore[attr-defined]


@jobs.get(
    "/{job_id}/artifacts",
    summary="List a job's artifacts",
    response_model=ArtifactList,
    responses=_NOT_FOUND,
)
async def list_artifacts(request: Request, principal: Reader, job_id: JobId) -> ArtifactList:
    """The files the job's artifact patterns matched, copied out of its VM."""
    items = await _call(_service(request).artifacts(job_id))
    return ArtifactList(job_id=job_id, artifacts=list(items))


@jobs.get(
    "/{job_id}/artifacts/{name:path}",
    summary="Download an artifact",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The file's bytes.",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        },
        404: {"model": ErrorBody, "description": "No such job or artifact."},
    },
)
async def get_artifact(
    request: Request,
    principal: Reader,
    job_id: JobId,
    name: Annotated[str, PathParam(description="The artifact's name (a relative path).")],
) -> FileResponse:
    """One artifact's content (``application/octet-stream``)."""
    path = await _call(_service(request).artifact_path(job_id, name))
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=Path(name).name,
        headers={"X-Content-Type-Options": "nosniff"},
    )


fleet = APIRouter(prefix="/v1", tags=["fleet"], responses=ERRORS)


@fleet.get("/pools", summary="List pools", response_model=list[PoolView])
async def list_pools(request: Request, principal: Reader) -> list[PoolView]:
    """The configured pools: VM shape, warm VMs on this host, jobs waiting (all hosts)."""
    return await _call(_service(request).pools())


ops = APIRouter(tags=["operations"])


class WhoAmI(BaseModel):
    """The token a request was made with: its name (the submitter of its jobs) and scopes."""

    name: str
    scopes: list[str]


@ops.get("/v1/whoami", summary="The caller's token", response_model=WhoAmI, responses=ERRORS)
async def whoami(principal: Reader) -> WhoAmI:
    """Who the token belongs to and what it may do (the dashboard shows only what it may)."""
    return WhoAmI(name=principal.name, scopes=sorted(principal.scopes))


@ops.get(
    "/health",
    summary="Health check",
    response_model=HealthView,
    responses={503: {"model": HealthView, "description": "Starting, stopping or degraded."}},
)
async def health(request: Request) -> JSONResponse:
    """Whether this process works: 200 when it does, 503 otherwise. No token needed."""
    report = await _service(request).health()
    status = 200 if report.status == "ok" else 503
    return JSONResponse(report.model_dump(mode="json"), status_code=status)


@ops.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        **ERRORS,
        200: {
            "description": "Metrics in the Prometheus text format.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
    },
)
async def metrics(request: Request, principal: Reader) -> Response:
    """Queue depth, wait and boot histograms, VMs, job outcomes, failures, capacity."""
    collector: Metrics = request.app.state.metrics
    # Other hosts' submissions change the queues too: read them fresh for every scrape.
    for pool in await _call(_service(request).pools()):
        collector.queue_depth(pool.name, pool.queued)
    return Response(collector.render(), media_type=METRICS_CONTENT_TYPE)


# --- the application ----------------------------------------------------------------------------


def create_app(service: Service, config: ServiceConfig) -> FastAPI:
    """The API of ``service``, configured by ``config`` (tokens, limits).

    The app does not start or stop the service; ``stoker serve`` does.  Set
    ``app.state.closing`` to end every open log stream before shutting down.
    ``/metrics`` serves the service's observer when it is a :class:`Metrics`
    (a service not started yet with no observer gets one).
    """
    app = FastAPI(
        title="stoker",
        version=stoker.__version__,
        summary="Build and test untrusted code in throw-away microVMs.",
        description=__doc__ or "",
        openapi_tags=[
            {"name": "jobs", "description": "Submit jobs, follow their output, get artifacts."},
            {"name": "fleet", "description": "Pools, VMs and hosts."},
            {"name": "operations", "description": "Health and metrics."},
        ],
        # Only /health is open: the document is served below, behind a token, and the
        # browser UIs (which would load scripts from a CDN) are left out.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.state.config = config
    app.state.metrics = _metrics_of(service)
    app.state.tokens = TokenTable(config.tokens)
    app.state.closing = asyncio.Event()
    app.include_router(jobs)
    app.include_router(fleet)
    app.include_router(ops)
    # These import this module.
    from stoker.service.fleet_api import router as fleet_views
    from stoker.service.session_api import router as sessions

    app.include_router(fleet_views)
    app.include_router(sessions)
    from stoker.service.ui import router as dashboard

    app.include_router(dashboard)
    for integration in service.integrations:
        router = integration.router()
        if router is not None:
            app.include_router(router)
        integration.register_metrics(app.state.metrics.registry)

    app.openapi = lambda: document(app, _BUILT_BODIES)  # type: ignore[method-assign]

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_document(principal: Reader) -> JSONResponse:
        """This API's OpenAPI document."""
        return JSONResponse(app.openapi())

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = _validation_problems(exc.errors())
        return error_response(ApiError(422, f"invalid request: {_summary(problems)}", problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = exc.headers
        if exc.status_code == 405:
            # Starlette names only the methods of the first route with this path; a path
            # served by several routes (GET and POST /v1/jobs) must list them all.
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(app, request))}
        return error_response(ApiError(exc.status_code, str(exc.detail), headers=headers))

    @app.exception_handler(StokerError)
    async def _stoker_error(request: Request, exc: StokerError) -> JSONResponse:
        return error_response(from_stoker(exc))

    return app


#: Bodies the routes parse or stream themselves: the submission's spec, a session's step,
#: the log stream's end.
_BUILT_BODIES: Final[tuple[tuple[type[BaseModel], JsonSchemaMode], ...]] = (
    (JobRequest, "validation"),
    (StepRequest, "validation"),
    (LogEnd, "serialization"),
)


def _metrics_of(service: Service) -> Metrics:
    """The :class:`Metrics` the service reports to (installed if it has no observer yet)."""
    if isinstance(service.observer, Metrics):
        collector = service.observer
    else:
        collector = Metrics()
        if isinstance(service.observer, NullObserver) and service.status == "created":
            service.observer = collector
    budget = service.config.host
    collector.set_budget(budget.cpu_budget, budget.memory_budget_mb)
    return collector
