"""REST routes the dashboard reads: hosts, VMs, failed VMs, job statistics, integrations.

Everything here is read from the database, so any host's API shows every
host: see :mod:`stoker.service.fleet`, :mod:`stoker.service.failures` and
:mod:`stoker.service.stats`.
"""

from __future__ import annotations

import functools
from typing import Annotated

from fastapi import APIRouter, Query, Request

from stoker.service.api import _call, _service
from stoker.service.apiutil import ERRORS, Reader
from stoker.service.failures import FailedVMView, read_failures
from stoker.service.fleet import HostView, VMView
from stoker.service.integrations import IntegrationView
from stoker.service.models import utcnow
from stoker.service.stats import DEFAULT_WINDOW, MAX_WINDOW, MIN_WINDOW, StatsView, read_stats

router = APIRouter(prefix="/v1", tags=["fleet"], responses=ERRORS)


@router.get("/vms", summary="List VMs", response_model=list[VMView])
async def list_vms(request: Request, principal: Reader) -> list[VMView]:
    """The VMs of every host: booting, warm and idle, or running a job; with their shapes."""
    return await _call(_service(request).vms())


@router.get("/vms/failed", summary="List failed VMs", response_model=list[FailedVMView])
async def list_failed_vms(
    request: Request,
    principal: Reader,
    limit: Annotated[
        int, Query(ge=1, le=1000, description="At most this many, newest first.")
    ] = 50,
) -> list[FailedVMView]:
    """VMs that failed lately (boot failure, VMM crash or kill, kernel panic), newest first.

    Each with the last 16 KiB of its serial console, the job's secrets shown as
    ``***``.  Every host keeps its newest 100 (``failures.KEPT_PER_HOST``).
    """
    read = functools.partial(read_failures, limit=limit)
    return await _call(_service(request).db.run(read, write=False))


@router.get("/hosts", summary="List hosts", response_model=list[HostView])
async def list_hosts(request: Request, principal: Reader) -> list[HostView]:
    """The ``stoker serve`` processes sharing the database: capacity, use and heartbeat."""
    return await _call(_service(request).hosts())


@router.get("/stats", summary="Job statistics", response_model=StatsView, tags=["jobs"])
async def job_stats(
    request: Request,
    principal: Reader,
    window: Annotated[
        int,
        Query(
            ge=MIN_WINDOW,
            le=MAX_WINDOW,
            description="Count jobs finished in this many seconds before now (60 to 604800).",
        ),
    ] = DEFAULT_WINDOW,
) -> StatsView:
    """Jobs finished in the window by final state and cause; jobs queued and running by pool.

    Counted by the database (aggregate queries over indexes), cheap at any number of jobs.
    """
    read = functools.partial(read_stats, window_s=window, now=utcnow())
    return await _call(_service(request).db.run(read, write=False))


@router.get(
    "/integrations",
    summary="List integrations",
    response_model=list[IntegrationView],
    tags=["operations"],
)
async def list_integrations(request: Request, principal: Reader) -> list[IntegrationView]:
    """Each configured CI integration: its targets, runners by state, and its loop as this
    host sees it (only the leader host runs the loop: the others show no passes)."""
    return [await _call(i.view()) for i in _service(request).integrations]
