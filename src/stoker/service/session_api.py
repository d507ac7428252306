"""REST routes of session jobs: send a step, follow it, close the session.

See :mod:`stoker.service.sessions`.  A token may use the sessions it
submitted; an ``admin`` token any session.
"""

from __future__ import annotations

import functools
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse

from stoker.service.api import Job, JobId, _call, _service, event_stream, json_body, parse_json
from stoker.service.apiutil import ERRORS, ErrorBody, Submitter, event_stream_schema
from stoker.service.sessions import (
    StepRequest,
    StepView,
    add_step,
    check_owner,
    close_session,
    follow_step,
    read_step,
    steps_key,
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS)

StepSeq = Annotated[int, PathParam(ge=1, le=1_000_000, description="The step's number.")]
_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorBody, "description": "The job is not a session, or a bad step."},
    404: {"model": ErrorBody, "description": "No such job or step."},
    409: {"model": ErrorBody, "description": "The session has ended or is closing."},
}


@router.post(
    "/{job_id}/steps",
    summary="Send a command to a session",
    status_code=201,
    response_model=StepView,
    openapi_extra=json_body(StepRequest, "The command and how to run it."),
    responses={
        **_RESPONSES,
        413: {"model": ErrorBody, "description": "The step's environment is too large."},
    },
)
async def post_step(request: Request, principal: Submitter, job_id: JobId) -> StepView:
    """Queue a command for the session's VM; steps run one at a time, in order."""
    step = parse_json(StepRequest, await request.body(), what="step", where="the body")
    service = _service(request)
    admin = principal.allows("admin")
    view = await _call(
        service.db.run(
            functools.partial(
                add_step, job_id=job_id, request=step, principal=principal.name, admin=admin
            )
        )
    )
    service.notifier.notify(steps_key(job_id))
    return view


@router.get(
    "/{job_id}/steps/{seq}",
    summary="Get or follow a step",
    response_model=StepView,
    responses={
        **_RESPONSES,
        200: {
            "description": "The step (JSON), or with `follow=1` a `text/event-stream` of "
            "`log` events (data: a LogChunk, its stdout and stderr) ending with one `end` "
            "event (data: the finished step).",
            "content": {
                "text/event-stream": {
                    "schema": event_stream_schema(
                        {"log": "LogChunk", "end": "StepView", "error": "ErrorBody"}
                    )
                }
            },
        },
    },
)
async def get_step(
    request: Request,
    principal: Submitter,
    job_id: JobId,
    seq: StepSeq,
    follow: Annotated[bool, Query(description="Stream its output until it ends.")] = False,
    after: Annotated[
        int, Query(ge=0, description="Only output after this log seq (resume where you were).")
    ] = 0,
) -> StepView | StreamingResponse:
    """One step of a session; only its submitter (or an admin) may read it."""
    service = _service(request)
    admin = principal.allows("admin")
    await _call(
        service.db.run(
            functools.partial(check_owner, job_id=job_id, principal=principal.name, admin=admin),
            write=False,
        )
    )
    if follow:
        return StreamingResponse(
            event_stream(
                request,
                follow_step(
                    service.db,
                    service.notifier,
                    job_id,
                    seq,
                    after=after,
                    poll=service.config.poll_seconds,
                ),
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _call(
        service.db.run(functools.partial(read_step, job_id=job_id, seq=seq), write=False)
    )


@router.post(
    "/{job_id}/close",
    summary="Close a session",
    response_model=Job,
    responses=_RESPONSES,
)
async def close(request: Request, principal: Submitter, job_id: JobId) -> Job:
    """No more steps: the session ends (``succeeded``) once the steps sent have run.

    Closing a session that has ended already changes nothing.
    """
    service = _service(request)
    admin = principal.allows("admin")
    await _call(
        service.db.run(
            functools.partial(close_session, job_id=job_id, principal=principal.name, admin=admin)
        )
    )
    service.notifier.notify(steps_key(job_id))
    return Job.from_view(await _call(service.get(job_id)))
