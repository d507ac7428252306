"""Per-pool network policy in the service: configuration, the job record, connection records.

The egress tests run on the FAKE backend: the job's command runs on this host
through the real agent, whose proxy listener is on 127.0.0.1, and the VM's
real :class:`~stoker.net.proxy.EgressProxy` decides.  NETWORK RULE: nothing
here sends a byte to any address but 127.0.0.1: the only destination asked
for is ``denied.test``, which the proxy refuses by name before any lookup,
and the command refuses to run without a loopback proxy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from stoker.errors import UsageError
from stoker.net.proxy import ConnectionRecord
from stoker.service.api import create_app
from stoker.service.auth import hash_token
from stoker.service.config import ServiceConfig, parse_config_text
from stoker.service.daemon import JsonFormatter
from stoker.service.jobs import JobRequest, JobState
from stoker.service.logs import LogWriter
from stoker.service.metrics import Metrics
from stoker.service.network import JobConnections
from stoker.service.service import Service

ConfigFactory = Callable[..., ServiceConfig]
ServiceFactory = Callable[..., Awaitable[Service]]

ORIGIN = Path("/etc/stoker/stoker.toml")
TOKEN = "stk_net_0123456789abcdef"
#: Allowed names that no test ever connects to (only their presence in the policy matters).
ALLOW = ["pkg.test", "*.mirror.test:443"]
EGRESS = {"mode": "egress", "allow": ALLOW, "limits": {"max_connections": 8}}

#: The job's command: ``N`` plain-HTTP requests for http://denied.test/ through the
#: loopback proxy only (it exits before any request when there is none), then exit 3.
CLIENT = r"""
import os, sys, urllib.error, urllib.request
proxy = os.environ.get("http_proxy", "")
if not proxy.startswith("http://127.0.0.1:"):
    sys.exit("no loopback proxy: %r" % proxy)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
for _ in range(int(sys.argv[1])):
    try:
        opener.open("http://denied.test/", timeout=30)
        print("allowed?!")
    except urllib.error.HTTPError as exc:
        print(exc.code, exc.headers.get("X-Stoker-Deny-Reason"))
sys.exit(3)
"""


def client(requests: int, **kw: Any) -> JobRequest:
    return JobRequest(command=(sys.executable, "-c", CLIENT, str(requests)), **kw)


def pools(**egress: Any) -> dict[str, Any]:
    return {
        "plain": {"cpus": 1, "memory": 256, "max": 4},
        "egress": {"cpus": 1, "memory": 256, "max": 4, "network": EGRESS, **egress},
    }


async def system_log(service: Service, job_id: str) -> str:
    return "".join(c.text for c in await service.logs(job_id) if c.stream == "system")


async def until(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------ configuration


def _error(text: str) -> str:
    with pytest.raises(UsageError) as info:
        parse_config_text(text, origin=ORIGIN)
    return str(info.value)


def test_network_table_forms_agree() -> None:
    inline = parse_config_text(
        '[pools.ci]\nnetwork = { mode = "egress", allow = ["pkg.test", "@pypi"], '
        "limits = { total_bytes = 1000000 } }\n",
        origin=ORIGIN,
    )
    table = parse_config_text(
        '[pools.ci.network]\nmode = "egress"\nallow = ["pkg.test", "@pypi"]\n'
        "[pools.ci.network.limits]\ntotal_bytes = 1000000\n",
        origin=ORIGIN,
    )
    assert inline.pools["ci"].network == table.pools["ci"].network
    net = table.pools["ci"].network
    assert net is not None and net.limits.total_bytes == 1_000_000
    assert net.summary()["allow"] == ["pkg.test", "@pypi"]
    nat = parse_config_text('[pools.n]\nnetwork = { mode = "nat" }\n', origin=ORIGIN)
    assert nat.pools["n"].network is not None and nat.pools["n"].network.mode == "nat"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[pools.ci]\nnetwork = { allow = ["pkg.test"] }\n',
            ["stoker.toml:2: pools.ci.network.allow", "allow entries only apply"],
        ),
        (
            '[pools.ci]\nnetwork = { mode = "open" }\n',
            ["stoker.toml:2: pools.ci.network.mode", "'open'"],
        ),
        (
            '[pools.ci.network]\nmode = "egress"\nallow = ["pkg.test", "@nope"]\n',
            ["stoker.toml:3: pools.ci.network.allow[1]", "'@nope'", "unknown preset"],
        ),
        (
            '[pools.ci.network]\nmode = "egress"\nallow = ["10.0.0.0/4"]\n',
            ["pools.ci.network.allow[0]", "'10.0.0.0/4'"],
        ),
        (
            '[pools.ci.network]\nmode = "egress"\nallow = ["https://pkg.test"]\n',
            ["pools.ci.network.allow[0]", "https://pkg.test"],
        ),
        (
            '[pools.ci.network]\nmode = "egress"\nallw = ["pkg.test"]\n',
            ["stoker.toml:3: pools.ci.network.allw", "unknown key"],
        ),
        (
            '[pools.ci.network]\nmode = "egress"\n[pools.ci.network.limits]\nidle_timeout = 10\n',
            ["stoker.toml:4: pools.ci.network.limits.idle_timeout", "at least 120"],
        ),
        (
            '[pools.ci.network]\nmode = "egress"\n[pools.ci.network.limits]\nmax_connections = 0\n',
            ["pools.ci.network.limits.max_connections"],
        ),
        ('[pools.ci]\nnetwork = "egress"\n', ["pools.ci.network", "expected a table"]),
    ],
)
def test_bad_network_tables_name_the_pool_and_entry(text: str, expected: list[str]) -> None:
    message = _error(text)
    for part in expected:
        assert part in message, message


# ------------------------------------------------------------------ connection records -> log


class _Notes:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def note(self, text: str) -> None:
        self.lines.append(text)


def _denied(host: str, conn: int = 1) -> ConnectionRecord:
    return ConnectionRecord(
        vm="vm", job="j", conn=conn, method="GET", host=host, port=80, decision="denied",
        reason="not in allowlist",
    )  # fmt: skip


def test_refusals_in_the_log_are_bounded_masked_and_printable() -> None:
    notes = _Notes()
    connections = JobConnections(cast(LogWriter, notes), secrets=["s3cr3t-value"], limit=3)
    connections.record(
        ConnectionRecord(vm="vm", job="j", conn=1, host="ok.test", port=80, decision="allowed")
    )
    connections.record(_denied("s3cr3t-value.test"))
    connections.record(_denied("evil.test\n[stoker] forged"))
    for i in range(5):
        connections.record(_denied("denied.test", conn=10 + i))
    assert connections.finish(None) is None  # no VM: no proxy, no summary
    assert notes.lines == [
        "network: denied ***.test:80: not in allowlist",
        "network: denied evil.test?[stoker] forged:80: not in allowlist",
        "network: denied denied.test:80: not in allowlist",
        "network: 4 more refused connections not shown",
    ]


def test_json_log_lines_carry_connection_records() -> None:
    record = _denied("denied.test")
    entry = logging.LogRecord("stoker.net", logging.WARNING, __file__, 1, "egress", (), None)
    entry.connection = record.as_dict()
    line = json.loads(JsonFormatter().format(entry))
    assert line["connection"]["host"] == "denied.test"
    assert line["connection"]["decision"] == "denied"
    assert line["job"] == "j" and line["vm"] == "vm" and line["logger"] == "stoker.net"


# ------------------------------------------------------------------ jobs on egress pools


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
async def test_denied_request_is_in_the_job_log_summary_and_metrics(
    make_config: ConfigFactory,
    fake_service: ServiceFactory,
    caplog: pytest.LogCaptureFixture,
    warm: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="stoker.net")
    metrics = Metrics()
    config = make_config(pools=pools(min_idle=1 if warm else 0))
    service = await fake_service(config, observer=metrics)
    if warm:
        sup = service.supervisor
        assert sup is not None
        await until(lambda: len(sup.pools["egress"].idle) == 1)
    job = await service.submit(client(2, pool="egress"), "alice")
    assert job.network is not None and job.network.mode == "egress"
    done = await service.wait(job.id, timeout=30)
    out = "".join(c.text for c in await service.logs(job.id) if c.stream == "stdout")
    assert out == "403 not in allowlist\n" * 2, out
    assert done.state is JobState.FAILED and done.exit_code == 3
    assert done.vm_kind == ("warm" if warm else "cold")
    # The policy in force, and what the guest did with it.
    assert done.network is not None
    assert (done.network.mode, done.network.allow) == ("egress", tuple(ALLOW))
    assert done.network.limits["max_connections"] == 8
    assert done.network_summary is not None
    counts = done.network_summary.connections
    assert (counts.allowed, counts.denied, counts.errors) == (0, 2, 0)
    assert done.network_summary.denied == ("denied.test:80: not in allowlist (2x)",)
    # A user reading the job sees why it failed.
    system = await system_log(service, job.id)
    assert system.count("[stoker] network: denied denied.test:80: not in allowlist\n") == 2
    assert "[stoker] network: 0 connections allowed, 2 denied, 0 failed" in system
    # The service's log has every record, with the job's id.
    records = [r.__dict__["connection"] for r in caplog.records if r.name == "stoker.net"]
    assert [(r["job"], r["host"], r["decision"]) for r in records] == [
        (job.id, "denied.test", "denied")
    ] * 2
    # Metrics: by pool and decision.
    text = metrics.render().decode()
    assert 'stoker_egress_connections_total{decision="denied",pool="egress"} 2.0' in text


async def test_policy_on_the_job_and_in_the_api(
    make_config: ConfigFactory, fake_service: ServiceFactory
) -> None:
    tokens = [{"name": "ci", "sha256": hash_token(TOKEN), "scopes": ["submit", "read"]}]
    config = make_config(pools=pools(), tokens=tokens)
    service = await fake_service(config)
    app = create_app(service, config)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://stoker.test"
    ) as http:

        async def submit(spec: dict[str, Any]) -> dict[str, Any]:
            files = {"spec": (None, json.dumps(spec), "application/json")}
            response = await http.post("/v1/jobs", files=files, headers=headers)
            assert response.status_code == 201, response.text
            return dict(response.json())

        async def final(job_id: str) -> dict[str, Any]:
            await service.wait(job_id, timeout=30)
            response = await http.get(f"/v1/jobs/{job_id}", headers=headers)
            assert response.status_code == 200
            return dict(response.json())

        queued = await submit({"command": ["true"], "pool": "egress"})
        assert queued["network"]["mode"] == "egress" and queued["network"]["allow"] == ALLOW
        assert queued["network"]["limits"]["idle_timeout"] == 300.0
        assert queued["network_summary"] is None
        done = await final(queued["id"])
        assert done["state"] == "succeeded" and done["network"] == queued["network"]
        assert done["network_summary"] == {
            "connections": {"allowed": 0, "denied": 0, "errors": 0, "bytes_up": 0, "bytes_down": 0},
            "denied": [],
        }
        # A pool without a policy: the image's, known once the VM runs (none on the fake).
        plain = await submit({"command": ["true"], "pool": "plain"})
        assert plain["network"] is None
        done = await final(plain["id"])
        assert done["network"]["mode"] == "none" and done["network"]["allow"] == []
        assert done["network_summary"] is None
        listed = await http.get("/v1/jobs", headers=headers)
        assert {j["network"]["mode"] for j in listed.json()["jobs"]} == {"egress", "none"}
        pools_view = (await http.get("/v1/pools", headers=headers)).json()
        by_name = {p["name"]: p for p in pools_view}
        assert by_name["egress"]["network"]["allow"] == ALLOW
        assert by_name["plain"]["network"] is None


async def test_a_submission_cannot_widen_the_pool_policy(
    make_config: ConfigFactory, fake_service: ServiceFactory
) -> None:
    service = await fake_service(make_config(pools=pools()))
    with pytest.raises(Exception, match="network"):
        JobRequest.model_validate(
            {"command": ["true"], "pool": "egress", "network": {"allow": ["*"]}}
        )
    job = await service.submit(JobRequest(command=("true",), pool="egress"), "alice")
    assert job.network is not None and tuple(job.network.allow) == tuple(ALLOW)


async def test_the_fake_backend_refuses_nat(
    make_config: ConfigFactory, fake_service: ServiceFactory
) -> None:
    config = make_config(pools={"nat": {"cpus": 1, "memory": 256, "network": {"mode": "nat"}}})
    service = await fake_service(config)
    job = await service.submit(JobRequest(command=("true",)), "alice")
    done = await service.wait(job.id, timeout=30)
    assert done.state is JobState.ERRORED and done.attempt == 0
    assert done.reason is not None and "network mode 'nat' is not available" in done.reason
