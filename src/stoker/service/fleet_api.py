"""REST routes of the fleet: hosts and VMs (with what they use).

Everything here is read from the database, so any host's API shows every
host; see :mod:`stoker.service.fleet`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from stoker.service.api import _call, _service
from stoker.service.apiutil import ERRORS, Reader
from stoker.service.fleet import HostView, VMView

router = APIRouter(prefix="/v1", tags=["fleet"], responses=ERRORS)


@router.get("/vms", summary="List VMs", response_model=list[VMView])
async def list_vms(request: Request, principal: Reader) -> list[VMView]:
    """The VMs of every host: booting, warm and idle, or running a job; with their shapes."""
    return await _call(_service(request).vms())


@router.get("/hosts", summary="List hosts", response_model=list[HostView])
async def list_hosts(request: Request, principal: Reader) -> list[HostView]:
    """The ``stoker serve`` processes sharing the database: capacity, use and heartbeat."""
    return await _call(_service(request).hosts())
