"""The dashboard's read-only routes: hosts' capacity in use, VMs' shapes.

Over the fake-backend service of ``test_api`` (its ``api`` fixture and tokens),
every answer validated against the API's own OpenAPI document.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from test_api import Api, api, bearer, validate

__all__ = ["api"]  # the fixture, imported for these tests


async def running(api: Api, job_id: str) -> None:
    deadline = time.monotonic() + 20
    while (await api.service.get(job_id)).state.value != "running":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def get(api: Api, path: str, schema: str | None = None) -> Any:
    response = await api.client.get(path, headers=bearer("viewer"))
    assert response.status_code == 200, response.text
    body = response.json()
    if schema is not None:
        for item in body if isinstance(body, list) else [body]:
            validate(api.openapi, schema, item)
    return body


async def test_vms_have_shapes_and_hosts_their_use(api: Api) -> None:
    hosts = await get(api, "/v1/hosts", "HostView")
    assert [(h["used_cpus"], h["used_memory_mb"]) for h in hosts] == [(0.0, 0.0)]
    assert (hosts[0]["cpu_budget"], hosts[0]["memory_budget_mb"]) == (8.0, 8192.0)
    big = (await api.submit({"command": ["sleep", "60"], "pool": "big"})).json()
    small = (await api.submit({"command": ["sleep", "60"]})).json()
    await running(api, big["id"])
    await running(api, small["id"])
    vms = {vm["job_id"]: vm for vm in await get(api, "/v1/vms", "VMView")}
    shapes = {j: (vm["pool"], vm["cpus"], vm["memory_mb"], vm["state"]) for j, vm in vms.items()}
    assert shapes == {big["id"]: ("big", 2, 512, "busy"), small["id"]: ("default", 1, 256, "busy")}
    assert all(vm["disk_mb"] > 0 and vm["created_at"] for vm in vms.values())
    hosts = await get(api, "/v1/hosts", "HostView")
    assert (hosts[0]["used_cpus"], hosts[0]["used_memory_mb"]) == (3.0, 768.0)
    for job in (big, small):
        await api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer("ci"))
        await api.service.wait(job["id"], timeout=20)
    hosts = await get(api, "/v1/hosts", "HostView")
    assert (hosts[0]["used_cpus"], hosts[0]["used_memory_mb"]) == (0.0, 0.0)
