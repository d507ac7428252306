"""The REST API (``stoker.service.api``) over the fake-backend service.

Most tests talk to the ASGI app in process (httpx's ASGITransport); the
server-sent-events test runs the real uvicorn server on a loopback socket, so
that it can see output arrive while the job still runs.  Responses are
validated against the API's own OpenAPI document, whose paths, methods and
schema names are golden-tested (``tests/golden/openapi-paths.json``;
regenerate with ``STOKER_UPDATE_GOLDEN=1``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from openapi_schema_validator import OAS31Validator
from prometheus_client.parser import text_string_to_metric_families
from referencing import Registry, Resource

from stoker.service.api import create_app
from stoker.service.auth import hash_token
from stoker.service.config import ServiceConfig
from stoker.service.daemon import listen_socket, serve
from stoker.service.metrics import Metrics, failure_kind
from stoker.service.service import Observer, Service

ConfigFactory = Callable[..., ServiceConfig]
ServiceFactory = Callable[..., Awaitable[Service]]

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "openapi-paths.json"
SECRET = "hunter2-very-secret"

#: name -> (token, scopes)
TOKENS: dict[str, tuple[str, list[str]]] = {
    "ci": ("stk_ci_0123456789abcdef", ["submit", "read"]),
    "other": ("stk_other_0123456789abcdef", ["submit", "read"]),
    "viewer": ("stk_viewer_0123456789abcdef", ["read"]),
    "pusher": ("stk_pusher_0123456789abcdef", ["submit"]),
    "root": ("stk_root_0123456789abcdef", ["admin"]),
}
LIMITS = {"max_upload_bytes": 64 << 10, "max_source_bytes": 256 << 10}
POOLS = {
    "default": {"cpus": 1, "memory": 256, "max": 8, "labels": ["linux"], "timeout": "10m"},
    "big": {"cpus": 2, "memory": 512, "max": 4, "labels": ["linux", "big"]},
}


def token_config() -> list[dict[str, Any]]:
    return [
        {"name": name, "sha256": hash_token(token), "scopes": scopes}
        for name, (token, scopes) in TOKENS.items()
    ]


def bearer(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[who][0]}"}


def tarball(files: Mapping[str, bytes | str] | None = None, *, members: Any = ()) -> bytes:
    """A tar.gz of ``files`` plus raw ``(TarInfo, data)`` members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content in (files or {}).items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> Any:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    data = b"x" if kind == tarfile.REGTYPE else None
    info.size = len(data or b"")
    return info, data


# --- the OpenAPI document as a validator --------------------------------------------------------


def validate(document: Mapping[str, Any], schema: str, value: Any) -> None:
    """``value`` matches ``#/components/schemas/<schema>`` of the API's own document."""
    registry: Registry[Any] = Registry().with_resource(
        "urn:stoker-api", Resource.opaque(dict(document))
    )
    ref = {"$ref": f"urn:stoker-api#/components/schemas/{schema}"}
    OAS31Validator(ref, registry=registry).validate(value)


@dataclass
class Api:
    """The app, its service and an in-process client."""

    app: FastAPI
    service: Service
    config: ServiceConfig
    metrics: Metrics
    client: httpx.AsyncClient

    @property
    def openapi(self) -> dict[str, Any]:
        return self.app.openapi()

    async def submit(
        self,
        spec: Mapping[str, Any] | str,
        source: bytes | None = None,
        *,
        who: str = "ci",
        expect: int | None = 201,
    ) -> httpx.Response:
        body = spec if isinstance(spec, str) else json.dumps(spec)
        files: dict[str, Any] = {"spec": (None, body, "application/json")}
        if source is not None:
            files["source"] = ("source.tar.gz", source, "application/gzip")
        response = await self.client.post("/v1/jobs", files=files, headers=bearer(who))
        if expect is not None:
            assert response.status_code == expect, response.text
        if response.status_code == 201:
            validate(self.openapi, "Job", response.json())
        else:
            validate(self.openapi, "ErrorBody", response.json())
        return response

    async def run(self, spec: Mapping[str, Any], source: bytes | None = None) -> dict[str, Any]:
        """Submit and wait for the end; the final job as the API returns it."""
        job = (await self.submit(spec, source)).json()
        await self.service.wait(job["id"], timeout=30)
        response = await self.client.get(f"/v1/jobs/{job['id']}", headers=bearer("ci"))
        assert response.status_code == 200
        validate(self.openapi, "Job", response.json())
        return dict(response.json())

    def leftovers(self) -> list[str]:
        """Files in the job store other than finished jobs' directories (should be none)."""
        root = self.config.jobs_dir
        found = [str(p.relative_to(root)) for p in root.rglob("*")]
        return [p for p in found if p != ".incoming"]


@pytest.fixture
async def api(make_config: ConfigFactory, fake_service: ServiceFactory) -> AsyncIterator[Api]:
    config = make_config(tokens=token_config(), limits=LIMITS, pools=POOLS)
    metrics = Metrics()
    service = await fake_service(config, observer=metrics)
    app = create_app(service, config)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://stoker.test") as client:
        yield Api(app, service, config, metrics, client)


# --- submitting -----------------------------------------------------------------------------------


async def test_submit_runs_the_upload_and_hides_secrets(api: Api) -> None:
    source = tarball({"hello.txt": "hello from the upload\n"})
    spec = {
        "command": ["sh", "-c", "cat hello.txt; echo $GREETING; echo $TOKEN >&2"],
        "env": {"GREETING": "hi"},
        "secrets": {"TOKEN": SECRET},
        "labels": ["linux"],
        "timeout": "5m",
    }
    created = await api.submit(spec, source)
    assert created.headers["content-type"] == "application/json"
    job = created.json()
    assert job["state"] == "queued" and job["submitter"] == "ci" and job["pool"] == "default"
    assert job["env"] == {"GREETING": "hi"} and job["secrets"] == {"TOKEN": "***"}
    assert job["secret_keys"] == ["TOKEN"] and job["timeout_s"] == 300
    assert job["source"] == {"kind": "upload", "url": None, "ref": None}
    done = await api.run(spec, source)
    assert done["state"] == "succeeded" and done["exit_code"] == 0
    assert [e["to_state"] for e in done["events"]] == [
        "queued",
        "assigned",
        "booting",
        "running",
        "succeeded",
    ]
    logs = await api.client.get(f"/v1/jobs/{done['id']}/logs", headers=bearer("ci"))
    listing = await api.client.get("/v1/jobs", headers=bearer("ci"))
    for response in (created, logs, listing):
        assert SECRET not in response.text
    chunks = logs.json()["chunks"]
    stdout = "".join(c["data"] for c in chunks if c["stream"] == "stdout")
    stderr = "".join(c["data"] for c in chunks if c["stream"] == "stderr")
    assert stdout == "hello from the upload\nhi\n" and stderr == "***\n"


def _streaming_body(boundary: str, pulled: list[int]) -> AsyncIterator[bytes]:
    async def body() -> AsyncIterator[bytes]:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n'
            '{"command": ["true"]}\r\n'
            f"--{boundary}\r\nContent-Disposition: form-data; "
            'name="source"; filename="s.tar"\r\n\r\n'
        )
        yield head.encode()
        for _ in range(10_000):  # 640 MiB if anyone read it all
            pulled.append(1)
            yield b"\0" * (64 << 10)

    return body()


async def test_an_oversized_upload_is_refused_while_streaming(api: Api) -> None:
    pulled: list[int] = []
    boundary = "stokerboundary"
    response = await api.client.post(
        "/v1/jobs",
        content=_streaming_body(boundary, pulled),
        headers={
            **bearer("ci"),
            "Content-Type": f"multipart/form-data; boundary={boundary}",
        },
    )
    assert response.status_code == 413, response.text
    assert f"limit of {LIMITS['max_upload_bytes']} bytes" in response.json()["error"]
    assert len(pulled) <= 3  # it stopped reading right after the limit
    # A declared length above the limit is refused before reading anything.
    pulled.clear()
    response = await api.client.post(
        "/v1/jobs",
        content=_streaming_body(boundary, pulled),
        headers={
            **bearer("ci"),
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(1 << 30),
        },
    )
    assert response.status_code == 413 and pulled == []
    assert response.json()["detail"] == {"max_upload_bytes": LIMITS["max_upload_bytes"]}
    assert (await api.service.list()) == [] and api.leftovers() == []


def true(**extra: Any) -> dict[str, Any]:
    return {"command": ["true"], **extra}


def evil(*entries: Any) -> bytes:
    return tarball(members=[member(*entry) for entry in entries])


BAD_SUBMISSIONS: dict[str, tuple[Any, bytes | None, int, list[str]]] = {
    # name: (spec, source, status, words the error must contain)
    "unknown key": (true(colour="red"), None, 422, ["unknown key 'colour'"]),
    "wrong type": (true(cpus="two"), None, 422, ["cpus"]),
    "no command": ({"image": "default"}, None, 422, ["command is empty", "session"]),
    "not json": ("{nope", None, 422, ["not valid JSON"]),
    "unknown image": (true(image="gentoo"), None, 400, ["gentoo", "default"]),
    "unknown pool": (true(pool="huge"), None, 400, ["huge", "big, default"]),
    "cpus above max": (true(cpus=16), None, 400, ["16 vCPUs"]),
    "memory above max": (true(pool="default", memory="4G"), None, 400, ["memory"]),
    "timeout above max": (true(pool="default", timeout="2h"), None, 400, ["timeout"]),
    "dotdot entry": (true(), evil(("a/../../escape",)), 400, ["a/../../escape", ".."]),
    "absolute entry": (true(), evil(("/etc/evil",)), 400, ["/etc/evil", "absolute"]),
    "symlink out": (true(), evil(("link", tarfile.SYMTYPE, "../../etc")), 400, ["link"]),
    "device": (true(), evil(("dev", tarfile.CHRTYPE)), 400, ["dev"]),
    "not a tarball": (true(), b"this is not a tarball" * 100, 400, ["source"]),
    "upload and git": (
        true(git={"url": "https://example.com/r.git"}),
        tarball({"a": "b"}),
        400,
        ["git"],
    ),
    # the service reports it as bad input (400); 413 would be as right
    "unpacks too big": (true(), tarball({"zeros": b"\0" * (1 << 20)}), 400, ["too much"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SUBMISSIONS))
async def test_bad_submissions_are_refused_and_leave_nothing(api: Api, case: str) -> None:
    spec, source, status, words = BAD_SUBMISSIONS[case]
    response = await api.submit(spec, source, expect=status)
    error = response.json()["error"] + json.dumps(response.json()["detail"])
    for word in words:
        assert word in error, (word, response.json())
    assert (await api.service.list()) == [] and api.leftovers() == []


@pytest.mark.parametrize(
    ("content_type", "body", "words"),
    [
        ("application/json", b'{"command": ["true"]}', ["multipart/form-data"]),
        ("multipart/form-data", b"", ["boundary"]),
        ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; "
         b'name="source"\r\n\r\nxx\r\n--b--\r\n', ["no 'spec' part"]),
        ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; "
         b'name="extra"\r\n\r\nxx\r\n--b--\r\n', ["unknown multipart part 'extra'"]),
        ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; "
         b'name="spec"\r\n\r\n{"command": ["true"]}', ["closing boundary"]),
    ],
)  # fmt: skip
async def test_malformed_bodies(api: Api, content_type: str, body: bytes, words: list[str]) -> None:
    response = await api.client.post(
        "/v1/jobs", content=body, headers={**bearer("ci"), "Content-Type": content_type}
    )
    assert response.status_code == 400, response.text
    for word in words:
        assert word in response.json()["error"]
    assert (await api.service.list()) == [] and api.leftovers() == []


async def test_validation_errors_never_echo_secrets(api: Api) -> None:
    for secrets in ({"bad name": SECRET}, {"OK": SECRET + "\0"}, {"OK": [SECRET]}):
        response = await api.submit({"command": ["true"], "secrets": secrets}, expect=422)
        assert SECRET not in response.text
        assert response.json()["detail"][0]["loc"][0] == "secrets"
    # the request-level handler (query parameters) has the same shape
    response = await api.client.get("/v1/jobs?limit=0", headers=bearer("ci"))
    assert response.status_code == 422 and response.json()["error"].startswith("invalid request")
    validate(api.openapi, "ErrorBody", response.json())


# --- reading jobs ---------------------------------------------------------------------------------


async def test_list_filters_and_pages(api: Api) -> None:
    small = (await api.submit({"command": ["true"], "pool": "default"})).json()
    big = (await api.submit({"command": ["true"], "pool": "big"}, who="other")).json()
    labelled = (
        await api.submit({"command": ["true"], "image": "default", "labels": ["big"]})
    ).json()
    for job in (small, big, labelled):
        await api.service.wait(job["id"], timeout=30)

    async def ids(**params: Any) -> list[str]:
        response = await api.client.get("/v1/jobs", params=params, headers=bearer("viewer"))
        assert response.status_code == 200, response.text
        validate(api.openapi, "JobList", response.json())
        return [j["id"] for j in response.json()["jobs"]]

    assert await ids() == [labelled["id"], big["id"], small["id"]]
    assert await ids(pool="big") == [labelled["id"], big["id"]]
    assert await ids(label="big") == [labelled["id"]]
    assert await ids(submitter="other") == [big["id"]]
    assert await ids(state="succeeded", pool="default") == [small["id"]]
    assert await ids(state="queued") == []
    page = (await api.client.get("/v1/jobs?limit=2", headers=bearer("ci"))).json()
    assert [j["id"] for j in page["jobs"]] == [labelled["id"], big["id"]]
    assert await ids(limit=2, before=page["next_before"]) == [small["id"]]
    response = await api.client.get("/v1/jobs?state=exploded", headers=bearer("ci"))
    assert response.status_code == 422 and "state" in response.json()["error"]


async def test_unknown_and_malformed_job_ids(api: Api) -> None:
    for suffix in ("", "/logs", "/artifacts", "/artifacts/x"):
        response = await api.client.get(f"/v1/jobs/{'a' * 32}{suffix}", headers=bearer("ci"))
        assert response.status_code == 404, (suffix, response.text)
        assert "no job" in response.json()["error"] or "no artifact" in response.json()["error"]
    response = await api.client.get("/v1/jobs/..%2F..%2Fetc", headers=bearer("ci"))
    assert response.status_code in (404, 422)
    response = await api.client.get("/v1/jobs/NOT-AN-ID", headers=bearer("ci"))
    assert response.status_code == 422 and "job_id" in response.json()["error"]


async def test_cancel(api: Api) -> None:
    job = (await api.submit({"command": ["sh", "-c", "echo started; sleep 60"]})).json()
    url = f"/v1/jobs/{job['id']}/cancel"
    deadline = time.monotonic() + 20
    while (await api.service.get(job["id"])).state.value != "running":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    response = await api.client.post(url, headers=bearer("other"))
    assert response.status_code == 403 and "submitted by 'ci'" in response.json()["error"]
    assert (await api.client.post(url, headers=bearer("viewer"))).status_code == 403
    response = await api.client.post(url, headers=bearer("ci"))
    assert response.status_code == 200, response.text
    validate(api.openapi, "Job", response.json())
    assert response.json()["cancel_requested"] is True
    done = await api.service.wait(job["id"], timeout=20)
    assert done.state.value == "cancelled"
    response = await api.client.post(url, headers=bearer("ci"))
    assert response.status_code == 409 and "already ended" in response.json()["error"]
    # an admin may cancel anyone's job
    other = (await api.submit({"command": ["sleep", "60"]}, who="other")).json()
    response = await api.client.post(f"/v1/jobs/{other['id']}/cancel", headers=bearer("root"))
    assert response.status_code == 200
    assert (await api.service.wait(other["id"], timeout=20)).state.value == "cancelled"


async def test_stored_logs_page_by_page(api: Api) -> None:
    script = "for i in $(seq 1 40); do echo line $i; sleep 0.01; done; printf '\\377\\376\\n'"
    job = await api.run({"command": ["sh", "-c", script]})
    after, chunks = 0, []
    while True:
        response = await api.client.get(
            f"/v1/jobs/{job['id']}/logs", params={"after": after}, headers=bearer("viewer")
        )
        validate(api.openapi, "LogPage", response.json())
        page = response.json()
        chunks += page["chunks"]
        if page["complete"]:
            break
        assert page["next_after"] > after
        after = page["next_after"]
    assert [c["seq"] for c in chunks] == list(range(1, len(chunks) + 1))
    stdout = b"".join(
        base64.b64decode(c["data"]) if c["encoding"] == "base64" else c["data"].encode()
        for c in chunks
        if c["stream"] == "stdout"
    )
    assert stdout == b"".join(b"line %d\n" % i for i in range(1, 41)) + b"\xff\xfe\n"
    assert any(c["encoding"] == "base64" for c in chunks)
    last = chunks[-1]["seq"]
    response = await api.client.get(
        f"/v1/jobs/{job['id']}/logs", params={"after": last}, headers=bearer("ci")
    )
    assert response.json()["chunks"] == [] and response.json()["complete"] is True


async def test_artifacts(api: Api) -> None:
    script = "mkdir -p out/sub; echo report > out/a.txt; head -c 3000 /dev/urandom > out/sub/b.bin"
    job = await api.run({"command": ["sh", "-c", script], "artifacts": ["out/*"]})
    response = await api.client.get(f"/v1/jobs/{job['id']}/artifacts", headers=bearer("viewer"))
    assert response.status_code == 200, response.text
    validate(api.openapi, "ArtifactList", response.json())
    listed = {a["name"]: a for a in response.json()["artifacts"]}
    assert {"out/a.txt", "out/sub/b.bin"} <= set(listed)
    for name in ("out/a.txt", "out/sub/b.bin"):
        response = await api.client.get(
            f"/v1/jobs/{job['id']}/artifacts/{name}", headers=bearer("viewer")
        )
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/octet-stream"
        assert hashlib.sha256(response.content).hexdigest() == listed[name]["sha256"]
        assert len(response.content) == listed[name]["size"]
    assert (
        await api.client.get(f"/v1/jobs/{job['id']}/artifacts/out/a.txt", headers=bearer("ci"))
    ).text == "report\n"
    for name in ("out/missing", "../../state/stoker.db", "out"):
        response = await api.client.get(
            f"/v1/jobs/{job['id']}/artifacts/{name}", headers=bearer("ci")
        )
        assert response.status_code == 404, name


async def test_pools_vms_hosts(api: Api) -> None:
    pools = (await api.client.get("/v1/pools", headers=bearer("viewer"))).json()
    assert [p["name"] for p in pools] == ["default", "big"]
    small = pools[0]
    assert (small["cpus"], small["memory_mb"], small["labels"]) == (1, 256, ["linux"])
    hosts = (await api.client.get("/v1/hosts", headers=bearer("viewer"))).json()
    assert [h["name"] for h in hosts] == ["test-host"] and hosts[0]["alive"] is True
    vms = (await api.client.get("/v1/vms", headers=bearer("viewer"))).json()
    assert isinstance(vms, list)
    document = api.openapi
    for path, schema in (("/v1/pools", "PoolView"), ("/v1/hosts", "HostView")):
        for item in (await api.client.get(path, headers=bearer("ci"))).json():
            validate(document, schema, item)


# --- metrics --------------------------------------------------------------------------------------


async def scrape(api: Api) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await api.client.get("/metrics", headers=bearer("viewer"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_follow_jobs_through_their_states(api: Api) -> None:
    before = await scrape(api)
    assert before[("stoker_jobs_total", (("outcome", "succeeded"),))] == 0
    assert before[("stoker_job_wait_seconds_count", ())] == 0
    assert before[("stoker_queue_depth", (("pool", "default"),))] == 0
    assert before[("stoker_capacity_total", (("resource", "cpus"),))] == 8
    ok = await api.run({"command": ["true"]})
    bad = await api.run({"command": ["sh", "-c", "exit 2"]})
    assert (ok["state"], bad["state"]) == ("succeeded", "failed")
    after = await scrape(api)
    assert after[("stoker_jobs_total", (("outcome", "succeeded"),))] == 1
    assert after[("stoker_jobs_total", (("outcome", "failed"),))] == 1
    finished = "stoker_jobs_finished_total"
    assert after[(finished, (("cause", "exit"), ("outcome", "succeeded")))] == 1
    assert after[(finished, (("cause", "exit"), ("outcome", "failed")))] == 1
    assert after[("stoker_job_wait_seconds_count", ())] == 2
    assert after[("stoker_boot_seconds_count", (("kind", "cold"),))] >= 2
    assert ("stoker_vms", (("state", "busy"),)) in after
    assert ("stoker_capacity_used", (("resource", "memory_mb"),)) in after
    # a job waiting in the queue shows up in its pool's depth
    pool_full = {"command": ["sleep", "30"], "pool": "big"}
    jobs = [(await api.submit(pool_full)).json() for _ in range(6)]  # big has max 4
    deadline = time.monotonic() + 20
    while (await scrape(api))[("stoker_queue_depth", (("pool", "big"),))] < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    for job in jobs:
        await api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer("ci"))
    for job in jobs:
        await api.service.wait(job["id"], timeout=20)
    final = await scrape(api)
    assert final[("stoker_jobs_total", (("outcome", "cancelled"),))] == 6
    assert final[("stoker_jobs_finished_total", (("cause", "none"), ("outcome", "cancelled")))] == 6
    # failures are counted by kind, a bounded label
    api.metrics.infrastructure_failure("boot")
    assert (await scrape(api))[("stoker_failures_total", (("reason", "boot"),))] == 1


def test_failure_kinds_are_bounded() -> None:
    assert failure_kind("vmm_crash") == "vmm_crash"
    assert failure_kind("BootError: guest never answered") == "boot_error"
    assert failure_kind("") == "unknown"
    assert len(failure_kind("x" * 500)) == 40


def test_metrics_is_an_observer() -> None:
    observer: Observer = Metrics()  # checked by mypy against the service's protocol
    assert observer is not None
    a, b = Metrics(), Metrics()
    a.infrastructure_failure("boot")
    assert b"stoker_failures_total" in a.render() and b'reason="boot"' not in b.render()


# --- server-sent events, through the real server ------------------------------------------------


@dataclass
class Event:
    name: str
    data: dict[str, Any]
    id: str | None
    at: float


async def read_events(response: httpx.Response) -> AsyncIterator[Event]:
    name, data, event_id = "message", list[str](), None
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield Event(name, json.loads("\n".join(data)), event_id, time.monotonic())
            name, data, event_id = "message", [], None
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
            elif field == "id":
                event_id = value


async def test_follow_streams_live_over_http(make_config: ConfigFactory) -> None:
    config = make_config(tokens=token_config(), limits=LIMITS, pools=POOLS)
    sock = listen_socket("127.0.0.1", 0)
    stop = asyncio.Event()
    ready: list[str] = []
    server = asyncio.create_task(serve(config, stop=stop, sock=sock, on_ready=ready.append))
    try:
        while not ready:
            assert not server.done(), server.exception()
            await asyncio.sleep(0.01)
        url = ready[0]
        assert url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=url, headers=bearer("ci")) as client:
            script = "for i in 1 2 3 4 5; do echo tick $i; sleep 0.3; done; echo bye >&2; exit 4"
            files = {"spec": (None, json.dumps({"command": ["sh", "-c", script]}))}
            created = await client.post("/v1/jobs", files=files)
            assert created.status_code == 201, created.text
            job_id = created.json()["id"]
            events: list[Event] = []
            async with client.stream(
                "GET", f"/v1/jobs/{job_id}/logs", params={"follow": 1}
            ) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                assert response.headers["cache-control"] == "no-cache"
                events = [e async for e in read_events(response)]
            logs = [e for e in events if e.name == "log"]
            assert [e.name for e in events] == ["log"] * len(logs) + ["end"]
            document = create_app(Service(config), config).openapi()
            for event in events:
                validate(document, "LogChunk" if event.name == "log" else "LogEnd", event.data)
            assert [int(e.id or 0) for e in logs] == [e.data["seq"] for e in logs]
            stdout = "".join(e.data["data"] for e in logs if e.data["stream"] == "stdout")
            assert stdout == "".join(f"tick {i}\n" for i in range(1, 6))
            assert "".join(e.data["data"] for e in logs if e.data["stream"] == "stderr") == "bye\n"
            ticks = [e for e in logs if e.data["stream"] == "stdout"]
            assert len(ticks) >= 3  # not one lump at the end
            end = events[-1]
            assert end.at - ticks[0].at > 0.6  # the first tick arrived while the job ran
            assert end.data["state"] == "failed" and end.data["exit_code"] == 4
            assert end.data["job"]["id"] == job_id
            # resuming after a seq (Last-Event-ID) replays only what came later
            last_tick = int(ticks[-2].id or 0)
            async with client.stream(
                "GET",
                f"/v1/jobs/{job_id}/logs?follow=1",
                headers={"Last-Event-ID": str(last_tick)},
            ) as response:
                resumed = [e async for e in read_events(response)]
            assert [e.data["seq"] for e in resumed if e.name == "log"] == [
                e.data["seq"] for e in logs if e.data["seq"] > last_tick
            ]
            assert resumed[-1].name == "end"
            # a follower of a running job is let go when the service shuts down
            sleeper = await client.post(
                "/v1/jobs", files={"spec": (None, json.dumps({"command": ["sleep", "60"]}))}
            )
            async with client.stream(
                "GET", f"/v1/jobs/{sleeper.json()['id']}/logs?follow=1"
            ) as response:
                stop.set()
                tail = [e async for e in read_events(response)]
            assert all(e.name == "log" for e in tail)
        await asyncio.wait_for(server, timeout=30)
    finally:
        stop.set()
        if not server.done():
            server.cancel()
        sock.close()


# --- the OpenAPI document -------------------------------------------------------------------------


def _shape(document: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "paths": {
            path: sorted(method.upper() for method in operations)
            for path, operations in sorted(document["paths"].items())
        },
        "schemas": sorted(document["components"]["schemas"]),
    }


async def test_openapi_paths_methods_and_schemas_are_golden(api: Api) -> None:
    response = await api.client.get("/openapi.json", headers=bearer("viewer"))
    assert response.status_code == 200
    shape = _shape(response.json())
    if os.environ.get("STOKER_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(shape, indent=1) + "\n")
    assert shape == json.loads(GOLDEN.read_text()), (
        f"regenerate with STOKER_UPDATE_GOLDEN=1 if intended ({GOLDEN})"
    )


async def test_openapi_documents_everything(api: Api) -> None:
    document = api.openapi
    OAS31Validator.check_schema({"type": "object"})  # the validator itself works
    assert document["info"]["title"] == "stoker" and document["info"]["description"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            assert operation.get("summary"), where
            assert operation.get("description"), where
            assert operation.get("tags"), where
            for status, response in operation["responses"].items():
                assert response.get("description"), (where, status)
                if status.startswith(("4", "5")) and path != "/health":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (where, status)
    for name, schema in document["components"]["schemas"].items():
        assert schema.get("description"), name
    spec = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert spec["multipart/form-data"]["schema"]["properties"]["spec"] == {
        "$ref": "#/components/schemas/JobRequest"
    }
    validate(document, "JobRequest", {"command": ["make", "test"], "cpus": 2, "memory": 512})
