"""The dashboard's read-only routes: hosts' capacity in use, VMs' shapes.

Over the fake-backend service of ``test_api`` (its ``api`` fixture and tokens),
every answer validated against the API's own OpenAPI document.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from test_api import LIMITS, POOLS, SECRET, Api, api, bearer, token_config, validate

from stoker.errors import BootError, VMMCrashed
from stoker.service.api import create_app
from stoker.service.config import ServiceConfig
from stoker.service.failures import CONSOLE_TAIL_BYTES, record_failure
from stoker.service.fake_backend import FakeBackend
from stoker.service.metrics import Metrics
from stoker.service.service import Service

ConfigFactory = Callable[..., ServiceConfig]
ServiceFactory = Callable[..., Awaitable[Service]]

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
    # A VM's age counts from when it was first recorded (booting), not its last change.
    created = {vm.name: vm.created_at for vm in await api.service.vms()}
    events = (await api.service.get(big["id"])).events
    booting = next(e.at for e in events if e.to_state.value == "booting")
    assert created[vms[big["id"]]["name"]] <= booting + timedelta(seconds=1)
    assert created[vms[big["id"]]["name"]] < next(
        e.at for e in events if e.to_state.value == "running"
    )
    hosts = await get(api, "/v1/hosts", "HostView")
    assert (hosts[0]["used_cpus"], hosts[0]["used_memory_mb"]) == (3.0, 768.0)
    for job in (big, small):
        await api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer("ci"))
        await api.service.wait(job["id"], timeout=20)
    hosts = await get(api, "/v1/hosts", "HostView")
    assert (hosts[0]["used_cpus"], hosts[0]["used_memory_mb"]) == (0.0, 0.0)


# --- failed VMs -----------------------------------------------------------------------------------

#: What the broken fake VMs print before they fail: a secret, then more than is kept.
CONSOLE = f"[    0.1] booting\nTOKEN={SECRET}\n" + "x" * CONSOLE_TAIL_BYTES + "\nend of console\n"


@pytest.fixture
async def broken_api(
    make_config: ConfigFactory, fake_service: ServiceFactory
) -> AsyncIterator[Api]:
    """An API whose VMs never boot (their console shown); pool ``warm`` keeps one VM warm."""

    def broken(spec: object) -> None:
        raise BootError("the guest agent did not come up (simulated)", console=CONSOLE)

    pools = {**POOLS, "warm": {"cpus": 1, "memory": 256, "max": 1, "min_idle": 1}}
    config = make_config(tokens=token_config(), limits=LIMITS, pools=pools, retry_limit=1)
    metrics = Metrics()
    service = await fake_service(config, observer=metrics, backend=FakeBackend(on_launch=broken))
    app = create_app(service, config)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://stoker.test") as client:
        yield Api(app, service, config, metrics, client)


async def test_failed_vms_are_listed_with_their_console(broken_api: Api) -> None:
    api = broken_api
    spec = {"command": ["true"], "pool": "default", "secrets": {"TOKEN": SECRET}}
    job = (await api.submit(spec)).json()
    assert (await api.service.wait(job["id"], timeout=20)).state.value == "errored"
    failed = await get(api, "/v1/vms/failed?limit=1000", "FailedVMView")
    ours = [f for f in failed if f["job_id"] == job["id"]]
    assert len(ours) == 2  # the first attempt and its retry
    assert [f["id"] for f in failed] == sorted((f["id"] for f in failed), reverse=True)
    for f in ours:
        assert (f["host"], f["pool"]) == ("test-host", "default")
        assert f["reason"] == "the guest agent did not come up (simulated)"
        assert f["vm_name"] and f["failed_at"]
        # The end of the console is kept, bounded, and the secret never shows.
        assert f["console"].endswith("end of console\n")
        assert len(f["console"].encode()) <= CONSOLE_TAIL_BYTES
        assert SECRET not in f["console"]
    # The warm pool's boots fail too: recorded without a job.
    assert any(f["pool"] == "warm" and f["job_id"] is None for f in failed)
    assert len(await get(api, "/v1/vms/failed?limit=1")) == 1
    response = await api.client.get("/v1/vms/failed?limit=0", headers=bearer("viewer"))
    assert response.status_code == 422


async def test_a_secret_cut_by_the_bound_is_masked_first(api: Api) -> None:
    crash = VMMCrashed("the VMM exited unexpectedly (signal 9)", console="y" * 5 + SECRET)
    record = functools.partial(
        record_failure, vm_name="vm-1", host="h", pool="default", exc=crash, secrets=[SECRET]
    )
    row = await api.service.db.run(record)
    assert row.console == "yyyyy***" and row.reason.startswith("the VMM exited")


async def test_nul_bytes_from_the_guest_console_are_stored_as_text(api: Api) -> None:
    # PostgreSQL's text refuses NUL: a guest printing one must not lose the record.
    crash = VMMCrashed("the VMM\0 exited", console="boot\0ing\n\0")
    record = functools.partial(record_failure, vm_name="vm-2", host="h", pool="default", exc=crash)
    row = await api.service.db.run(record)
    assert row.console == "boot\ufffding\n\ufffd" and "\0" not in row.reason


async def test_each_host_keeps_its_newest_failures(api: Api) -> None:
    async def fail(host: str, n: int) -> None:
        crash = VMMCrashed(f"crash {n}", console=f"console {n}")
        await api.service.db.run(
            functools.partial(
                record_failure, vm_name=f"vm-{n}", host=host, pool="default", exc=crash, keep=3
            )
        )

    for n in range(5):
        await fail("host-a", n)
        if n < 2:
            await fail("host-b", 100 + n)
    failed = await get(api, "/v1/vms/failed", "FailedVMView")
    seen = [(f["host"], f["reason"], f["console"]) for f in failed]
    assert seen == [
        ("host-a", "crash 4", "console 4"),
        ("host-a", "crash 3", "console 3"),
        ("host-a", "crash 2", "console 2"),
        ("host-b", "crash 101", "console 101"),
        ("host-b", "crash 100", "console 100"),
    ]


# --- statistics -----------------------------------------------------------------------------------


async def test_stats_count_what_finished_in_the_window(api: Api) -> None:
    before = await get(api, "/v1/stats", "StatsView")
    assert before["window_s"] == 3600 and before["total_jobs"] == 0
    assert before["finished"] == dict.fromkeys(
        ["cancelled", "errored", "failed", "succeeded", "timed_out"], 0
    )
    await api.run({"command": ["true"]})
    await api.run({"command": ["sh", "-c", "exit 3"]})
    waiting = (await api.submit({"command": ["sleep", "60"], "pool": "big"})).json()
    await running(api, waiting["id"])
    stats = await get(api, "/v1/stats?window=60", "StatsView")
    assert stats["window_s"] == 60 and stats["total_jobs"] == 3
    assert (stats["finished"]["succeeded"], stats["finished"]["failed"]) == (1, 1)
    assert stats["by_cause"]["exit"] == 2 and stats["by_cause"]["oom"] == 0
    assert stats["running"] == {"big": 1} and stats["queued"] == {}
    await api.client.post(f"/v1/jobs/{waiting['id']}/cancel", headers=bearer("ci"))
    await api.service.wait(waiting["id"], timeout=20)
    for bad in ("59", "604801", "x"):
        response = await api.client.get(f"/v1/stats?window={bad}", headers=bearer("viewer"))
        assert response.status_code == 422, bad
