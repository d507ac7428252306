"""Session jobs over the REST API: steps in order, their output and status, close, limits.

The fake backend runs the real agent in threads (no VMs); the API is served
on 127.0.0.1 and used through :class:`~stoker.service.client.ApiClient`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_api import LIMITS, POOLS, TOKENS, token_config

from conftest import ConfigFactory
from stoker.service.client import ApiClient, ApiRejected, LogEvent
from stoker.service.daemon import listen_socket, serve


@pytest.fixture
async def client(make_config: ConfigFactory) -> AsyncIterator[ApiClient]:
    config = make_config(tokens=token_config(), limits=LIMITS, pools=POOLS)
    sock = listen_socket("127.0.0.1", 0)
    stop = asyncio.Event()
    ready: list[str] = []
    server = asyncio.create_task(serve(config, stop=stop, sock=sock, on_ready=ready.append))
    try:
        while not ready:
            assert not server.done(), server.exception()
            await asyncio.sleep(0.01)
        async with ApiClient(ready[0], TOKENS["ci"][0]) as api:
            yield api
    finally:
        stop.set()
        await asyncio.wait_for(server, timeout=30)


async def run_step(
    api: ApiClient, job_id: str, **kwargs: Any
) -> tuple[bytes, bytes, dict[str, Any]]:
    step = await api.add_step(job_id, **kwargs)
    out, err = bytearray(), bytearray()
    final: dict[str, Any] = {}
    async for item in api.follow_step(job_id, step["seq"]):
        if isinstance(item, LogEvent):
            (out if item.stream == "stdout" else err).extend(item.data)
        else:
            final = item
    return bytes(out), bytes(err), final


async def session(api: ApiClient, **extra: Any) -> str:
    job = await api.submit({"session": {"idle_timeout": 30}, **extra})
    assert job["session_idle_timeout"] == 30 and job["command"] == []
    return str(job["id"])


async def wait_end(api: ApiClient, job_id: str) -> dict[str, Any]:
    for _ in range(300):
        job = await api.get(job_id)
        if job["state"] in ("succeeded", "failed", "errored", "cancelled", "timed_out"):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end")


async def test_steps_run_in_order_in_one_vm(client: ApiClient) -> None:
    job_id = await session(
        client, env={"JOBVAR": "from-job"}, secrets={"JOBSECRET": "s3cr3t-job-value"}
    )
    script = b"echo one; echo $JOBVAR $STEPVAR; echo two >&2; touch mark; exit 3\n"
    out, err, step = await run_step(
        client, job_id, command=["sh", "-s"], stdin=script, env={"STEPVAR": "from-step"}
    )
    assert out == b"one\nfrom-job from-step\n" and err == b"two\n"
    assert step["state"] == "done" and step["exit_code"] == 3 and step["seq"] == 1
    # the same VM: what step 1 left is there for step 2; cwd and secrets work
    out, _, step = await run_step(
        client,
        job_id,
        command=["sh", "-c", "test -e src/mark && echo $TOKEN $JOBSECRET"],
        cwd="/work",
        secrets={"TOKEN": "step-secret-value-123"},
    )
    assert out == b"*** ***\n", (out, step)
    assert step["exit_code"] == 0 and step["secret_keys"] == ["TOKEN"]
    assert "step-secret-value-123" not in str(await client.step(job_id, 2))
    # a step that outlives its timeout is killed and says so
    _, _, step = await run_step(client, job_id, command=["sleep", "30"], timeout=0.5)
    assert step["exit_code"] is None and "timed out" in step["reason"]
    closed = await client.close_session(job_id)
    assert closed["session_closed"] is True
    job = await wait_end(client, job_id)
    assert job["state"] == "succeeded", job
    assert job["reason"] == "session closed by its client"
    # closing twice changes nothing; a step after the end is refused
    await client.close_session(job_id)
    with pytest.raises(ApiRejected) as refused:
        await client.add_step(job_id, ["true"])
    assert refused.value.status == 409


async def test_steps_queue_behind_a_running_one(client: ApiClient) -> None:
    job_id = await session(client)
    first = await client.add_step(job_id, ["sh", "-c", "sleep 0.5; echo first"])
    second = await client.add_step(job_id, ["echo", "second"])
    assert (first["seq"], second["seq"]) == (1, 2)
    outputs = []
    for seq in (1, 2):
        async for item in client.follow_step(job_id, seq):
            if isinstance(item, LogEvent):
                outputs.append(item.data)
            else:
                assert item["exit_code"] == 0
    assert outputs == [b"first\n", b"second\n"]
    s1, s2 = await client.step(job_id, 1), await client.step(job_id, 2)
    assert s1["finished_at"] <= s2["started_at"]
    await client.close_session(job_id)
    await wait_end(client, job_id)


async def test_a_step_sent_with_interrupt_stops_the_ones_before_it(client: ApiClient) -> None:
    # A client killed mid-step leaves its command running; its next process says so.
    job_id = await session(client)
    await client.add_step(job_id, ["sh", "-c", "echo $$; exec sleep 600"])
    pid = b""
    async for item in client.follow_step(job_id, 1):
        assert isinstance(item, LogEvent)
        pid = item.data.strip()
        break  # the follower goes away, like a killed client; the command runs on
    assert pid.isdigit()
    queued = await client.add_step(job_id, ["echo", "never"])
    assert queued["state"] == "queued"
    probe = f"kill -0 {pid.decode()} 2>/dev/null && echo alive || echo gone"
    out, _, last = await run_step(client, job_id, command=["sh", "-c", probe], interrupt=True)
    assert out == b"gone\n" and last["exit_code"] == 0 and last["seq"] == 3
    first, second = await client.step(job_id, 1), await client.step(job_id, 2)
    assert first["state"] == "done" and first["exit_code"] is None
    assert first["reason"] == "interrupted by a later step (its client had gone)"
    assert second["state"] == "done" and second["started_at"] is None
    assert second["reason"] == "skipped: a later step interrupted it"
    await client.close_session(job_id)
    assert (await wait_end(client, job_id))["state"] == "succeeded"


async def test_an_idle_session_ends_and_unrun_steps_say_why(
    make_config: ConfigFactory, client: ApiClient
) -> None:
    job = await client.submit({"session": {"idle_timeout": 0.5}})
    ended = await wait_end(client, job["id"])
    assert ended["state"] == "timed_out" and "no step for 0.5s" in ended["reason"]
    job_id = await session(client)
    await client.add_step(job_id, ["sleep", "30"])
    queued = await client.add_step(job_id, ["echo", "never"])
    for _ in range(100):
        if (await client.step(job_id, 1))["state"] == "running":
            break
        await asyncio.sleep(0.05)
    await client.cancel(job_id)
    await wait_end(client, job_id)
    stopped = await client.step(job_id, 1)
    assert stopped["state"] == "done" and "the session was stopped" in stopped["reason"]
    never = await client.step(job_id, queued["seq"])
    assert never["state"] == "done" and never["exit_code"] is None
    assert "the session ended (cancelled" in never["reason"]


async def test_sessions_refuse_bad_requests(client: ApiClient) -> None:
    with pytest.raises(ApiRejected, match="either a command or a session"):
        await client.submit({"session": {}, "command": ["true"]})
    with pytest.raises(ApiRejected, match="never retried"):
        await client.submit({"session": {}, "retries": 2})
    with pytest.raises(ApiRejected, match="command is empty"):
        await client.submit({})
    plain = await client.submit({"command": ["true"]})
    with pytest.raises(ApiRejected, match="not a session") as refused:
        await client.add_step(plain["id"], ["true"])
    assert refused.value.status == 400
    job_id = await session(client)
    with pytest.raises(ApiRejected) as refused:
        await client._json(
            "POST", f"/v1/jobs/{job_id}/steps", json={"command": ["true"], "stdin": "%%%"}
        )
    assert refused.value.status == 422 and "base64" in str(refused.value.detail)
    with pytest.raises(ApiRejected) as refused:
        await client.add_step(job_id, ["true"], cwd="relative/dir")
    assert refused.value.status == 422
    with pytest.raises(ApiRejected) as refused:
        await client.step(job_id, 9)
    assert refused.value.status == 404
    async with ApiClient(client.url, TOKENS["other"][0]) as other:
        with pytest.raises(ApiRejected) as refused:
            await other.add_step(job_id, ["true"])
        assert refused.value.status == 403
        with pytest.raises(ApiRejected) as refused:
            await other.close_session(job_id)
        assert refused.value.status == 403
    async with ApiClient(client.url, TOKENS["viewer"][0]) as viewer:
        with pytest.raises(ApiRejected) as refused:
            await viewer.add_step(job_id, ["true"])
        assert refused.value.status == 403
    async with ApiClient(client.url, TOKENS["root"][0]) as root:
        _, _, step = await run_step(root, job_id, command=["true"])
        assert step["exit_code"] == 0
    _, _, step = await run_step(client, job_id, command=["true"], user="nobody-here")
    assert step["exit_code"] is None and "nobody-here" in step["reason"]
    await client.close_session(job_id)
    assert (await wait_end(client, job_id))["state"] == "succeeded"
