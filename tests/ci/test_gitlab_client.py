"""The GitLab REST client against httpx.MockTransport handlers (no network).

``FakeRunnersAPI`` implements the documented behaviour of ``POST /user/runners``,
``POST /runners/verify`` and ``DELETE /runners/:id`` (tokens with scopes, groups,
projects); faults are queued per request.  Waits are recorded, not slept.
"""

from __future__ import annotations

import email.utils
import gzip
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from stoker.ci.gitlab.client import (
    MAX_BODY,
    CreatedRunner,
    GitLabAuthError,
    GitLabClient,
    GitLabError,
    GitLabForbidden,
    GitLabNotFound,
    GitLabRejected,
    GitLabUnavailable,
    retry_after,
)
from stoker.errors import InfrastructureError, UsageError

URL = "https://gitlab.example.com"
PAT = "glpat-secret-access-token-0123"
READER = "glpat-read-only-token-4567"
Fault = Callable[[httpx.Request], httpx.Response]


@dataclass
class FakeRunnersAPI:
    """GitLab's runner endpoints as documented (users.md, runners.md)."""

    tokens: dict[str, set[str]] = field(
        default_factory=lambda: {PAT: {"create_runner", "manage_runner"}, READER: {"read_api"}}
    )
    groups: set[int] = field(default_factory=lambda: {7})
    projects: set[int] = field(default_factory=lambda: {42})
    runners: dict[int, dict[str, Any]] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    next_id: int = 9171

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.faults:
            return self.faults.pop(0)(request)
        path = request.url.path
        if request.method == "POST" and path == "/api/v4/runners/verify":
            return self.verify(json.loads(request.content))
        scopes = self.tokens.get(request.headers.get("PRIVATE-TOKEN", ""))
        if scopes is None:
            return _message(401, "401 Unauthorized")
        if request.method == "POST" and path == "/api/v4/user/runners":
            return self.create(scopes, json.loads(request.content))
        found = re.fullmatch(r"/api/v4/runners/(\d+)", path)
        if request.method == "DELETE" and found:
            if "manage_runner" not in scopes:
                return _message(403, "403 Forbidden")
            if self.runners.pop(int(found[1]), None) is None:
                return _message(404, "404 Runner Not Found")
            return httpx.Response(204)
        return _message(404, "404 Not Found")

    def create(self, scopes: set[str], body: dict[str, Any]) -> httpx.Response:
        if "create_runner" not in scopes:
            return _message(403, "403 Forbidden")
        kind = body.get("runner_type")
        if kind not in ("instance_type", "group_type", "project_type"):
            return httpx.Response(400, json={"error": "runner_type does not have a valid value"})
        if kind == "group_type" and body.get("group_id") not in self.groups:
            return _message(404, "404 Group Not Found")
        if kind == "project_type" and body.get("project_id") not in self.projects:
            return _message(404, "404 Project Not Found")
        if len(body.get("maintenance_note") or "") > 1024:
            return _message(400, {"maintenance_note": ["is too long (maximum is 1024 characters)"]})
        self.next_id += 1
        token = f"glrt-t1_{self.next_id:020d}"
        self.runners[self.next_id] = {**body, "token": token}
        return httpx.Response(
            201, json={"id": self.next_id, "token": token, "token_expires_at": None}
        )

    def verify(self, body: dict[str, Any]) -> httpx.Response:
        for runner_id, runner in self.runners.items():
            if runner["token"] == body.get("token") and body.get("system_id"):
                return httpx.Response(
                    200, json={"id": runner_id, "token": runner["token"], "token_expires_at": None}
                )
        return _message(403, "403 Forbidden")


def _message(status: int, message: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json={"message": message}, headers=headers)


def status(code: int, headers: dict[str, str] | None = None) -> Fault:
    return lambda _request: _message(code, f"{code} error", headers)


def raising(exc: type[httpx.TransportError]) -> Fault:
    def fault(request: httpx.Request) -> httpx.Response:
        raise exc("simulated", request=request)

    return fault


class Sleeps(list[float]):
    """An injected sleep: records what would have been waited."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def api() -> FakeRunnersAPI:
    return FakeRunnersAPI()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def client(api: FakeRunnersAPI, sleeps: Sleeps) -> AsyncIterator[GitLabClient]:
    async with GitLabClient(URL, PAT, transport=httpx.MockTransport(api), sleep=sleeps) as c:
        yield c


def project_runner(**extra: Any) -> dict[str, Any]:
    return {
        "runner_type": "project_type",
        "project_id": 42,
        "description": "stoker linux (host-a)",
        "tags": ["stoker", "linux"],
        "run_untagged": False,
        **extra,
    }


def no_secret_in(exc: BaseException, *secrets: str) -> None:
    text = f"{exc} {exc!r} {getattr(exc, 'hint', '')}"
    for secret in (PAT, READER, *secrets):
        assert secret not in text


# --- creating runners


async def test_create_runner_sends_the_documented_request(
    client: GitLabClient, api: FakeRunnersAPI
) -> None:
    created = await client.create_runner(
        **project_runner(maximum_timeout=3600, access_level="ref_protected")
    )
    assert isinstance(created, CreatedRunner)
    assert created.id == 9172 and created.token.startswith("glrt-")
    assert created.token_expires_at is None
    assert created.token not in repr(created)  # a logged answer does not leak the token
    (request,) = api.requests
    assert request.method == "POST"
    assert request.url == "https://gitlab.example.com/api/v4/user/runners"
    assert request.headers["PRIVATE-TOKEN"] == PAT
    assert request.headers["content-type"] == "application/json"
    body = json.loads(request.content)
    assert body == {
        "runner_type": "project_type",
        "project_id": 42,
        "description": "stoker linux (host-a)",
        "tag_list": ["stoker", "linux"],
        "run_untagged": False,
        "locked": False,
        "paused": False,
        "access_level": "ref_protected",
        "maximum_timeout": 3600,
    }


async def test_create_group_and_instance_runners(client: GitLabClient, api: FakeRunnersAPI) -> None:
    await client.create_runner(
        runner_type="group_type", group_id=7, description="g", tags=["a b"], run_untagged=True,
        locked=True, paused=True, maintenance_note="made by stoker",
    )  # fmt: skip
    await client.create_runner(
        runner_type="instance_type", description="i", tags=[], run_untagged=True
    )
    group, instance = (json.loads(r.content) for r in api.requests)
    assert group["group_id"] == 7 and "project_id" not in group
    assert group["tag_list"] == ["a b"]  # an array: a tag is never split
    assert group["locked"] is True and group["paused"] is True
    assert group["maintenance_note"] == "made by stoker"
    assert instance["tag_list"] == [] and "group_id" not in instance
    assert "project_id" not in instance


@pytest.mark.parametrize(
    ("kind", "ids", "words"),
    [
        ("group_type", {}, "group_id is given exactly"),
        ("group_type", {"group_id": 7, "project_id": 42}, "project_id is given exactly"),
        ("project_type", {}, "project_id is given exactly"),
        ("project_type", {"project_id": 42, "group_id": 7}, "group_id is given exactly"),
        ("instance_type", {"group_id": 7}, "group_id is given exactly"),
        ("instance_type", {"project_id": 42}, "project_id is given exactly"),
    ],
)
async def test_create_runner_checks_its_target_locally(
    client: GitLabClient, api: FakeRunnersAPI, kind: str, ids: dict[str, Any], words: str
) -> None:
    with pytest.raises(UsageError, match=words):
        await client.create_runner(
            runner_type=kind,  # type: ignore[arg-type]
            description="x",
            tags=[],
            run_untagged=True,
            **ids,
        )
    assert api.requests == []


async def test_one_string_is_not_a_list_of_tags(client: GitLabClient) -> None:
    with pytest.raises(UsageError, match="not one string"):
        await client.create_runner(**project_runner(tags="linux"))


# --- refusals, typed and naming what to fix


async def test_401_names_the_token_file(api: FakeRunnersAPI, sleeps: Sleeps) -> None:
    transport = httpx.MockTransport(api)
    async with GitLabClient(URL, "glpat-unknown-1234", transport=transport, sleep=sleeps) as c:
        with pytest.raises(GitLabAuthError) as refused:
            await c.create_runner(**project_runner())
    assert isinstance(refused.value, UsageError) and refused.value.status == 401
    assert "refused the access token (401)" in str(refused.value)
    assert "check token_file" in str(refused.value)
    no_secret_in(refused.value, "glpat-unknown-1234")
    assert sleeps == []  # a refusal is not retried


async def test_403_on_create_names_scope_and_role(api: FakeRunnersAPI) -> None:
    async with GitLabClient(URL, READER, transport=httpx.MockTransport(api)) as reader:
        with pytest.raises(GitLabForbidden) as refused:
            await reader.create_runner(
                runner_type="group_type", group_id=7, description="x", tags=[], run_untagged=True
            )
    message = str(refused.value)
    assert refused.value.status == 403 and isinstance(refused.value, UsageError)
    assert "create a runner for group 7" in message
    assert "the create_runner scope and Owner/administrator rights for group 7" in message
    assert "create_runner scope" in (refused.value.hint or "")
    no_secret_in(refused.value)


async def test_403_on_delete_names_manage_runner(api: FakeRunnersAPI) -> None:
    async with GitLabClient(URL, READER, transport=httpx.MockTransport(api)) as reader:
        with pytest.raises(GitLabForbidden, match="manage_runner scope") as refused:
            await reader.delete_runner(5)
    assert "delete runner 5" in str(refused.value)
    no_secret_in(refused.value)


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ({"group_id": 99}, "GitLab has no group 99"),
        ({"project_id": 99}, "GitLab has no project 99"),
    ],
)
async def test_404_on_create_names_the_missing_target(
    client: GitLabClient, target: dict[str, Any], words: str
) -> None:
    kind = "group_type" if "group_id" in target else "project_type"
    with pytest.raises(GitLabNotFound) as missing:
        await client.create_runner(
            runner_type=kind,  # type: ignore[arg-type]
            description="x",
            tags=[],
            run_untagged=True,
            **target,
        )
    assert words in str(missing.value) and missing.value.status == 404
    assert "Not Found" in str(missing.value)  # GitLab's own message is quoted
    assert missing.value.hint is not None and "_id" in missing.value.hint
    no_secret_in(missing.value)


async def test_400_quotes_gitlabs_reason(client: GitLabClient, api: FakeRunnersAPI) -> None:
    with pytest.raises(GitLabRejected, match=r"\(400\).*maintenance_note.*too long") as bad:
        await client.create_runner(**project_runner(maintenance_note="x" * 2000))
    assert bad.value.status == 400 and isinstance(bad.value, GitLabError)
    with pytest.raises(GitLabRejected, match="runner_type does not have a valid value"):
        await client.create_runner(
            runner_type="shared",  # type: ignore[arg-type]
            description="x",
            tags=[],
            run_untagged=True,
        )


async def test_gitlabs_quoted_text_is_scrubbed_of_tokens(
    client: GitLabClient, api: FakeRunnersAPI
) -> None:
    runner_token = "glrt-runner-token-abcdef"
    api.faults.append(lambda _r: _message(400, f"bad token {PAT} / {runner_token}\x1b[31m"))
    with pytest.raises(GitLabRejected) as bad:
        await client.verify_runner(runner_token, "s_0123456789ab")
    assert "[redacted]" in str(bad.value) and "\x1b" not in str(bad.value)
    no_secret_in(bad.value, runner_token)


# --- verify and delete


async def test_verify_and_delete_a_runner(client: GitLabClient, api: FakeRunnersAPI) -> None:
    created = await client.create_runner(**project_runner())
    assert await client.verify_runner(created.token, "s_0123456789ab") is True
    verify = api.requests[-1]
    assert verify.method == "POST" and verify.url.path == "/api/v4/runners/verify"
    assert json.loads(verify.content) == {"token": created.token, "system_id": "s_0123456789ab"}
    # the runner token goes in the body only: not in the URL nor any header
    assert created.token not in str(verify.url)
    assert all(created.token not in value for value in verify.headers.values())

    assert await client.delete_runner(created.id) is True
    delete = api.requests[-1]
    assert delete.method == "DELETE" and delete.url.path == f"/api/v4/runners/{created.id}"
    assert delete.headers["PRIVATE-TOKEN"] == PAT and delete.content == b""

    assert await client.verify_runner(created.token, "s_0123456789ab") is False  # 403: removed
    assert await client.delete_runner(created.id) is False  # 404: already gone
    assert await client.verify_runner_id(created.token, "s_0123456789ab") is None


# --- retries


async def test_500_then_success_is_retried_for_verify_and_delete(
    client: GitLabClient, api: FakeRunnersAPI, sleeps: Sleeps
) -> None:
    created = await client.create_runner(**project_runner())
    api.faults += [status(500), raising(httpx.ReadTimeout)]
    assert await client.verify_runner(created.token, "s_1") is True
    api.faults += [status(500), raising(httpx.RemoteProtocolError)]
    assert await client.delete_runner(created.id) is True
    assert len(api.requests) == 1 + 3 + 3
    # exponential backoff with jitter: 0.5 s then 1 s, each scaled by 0.5..1.5
    assert len(sleeps) == 4
    assert 0.25 <= sleeps[0] <= 0.75 and 0.5 <= sleeps[1] <= 1.5


async def test_retries_give_up_with_an_infrastructure_error(
    api: FakeRunnersAPI, sleeps: Sleeps
) -> None:
    transport = httpx.MockTransport(api)
    async with GitLabClient(URL, PAT, transport=transport, retries=2, sleep=sleeps) as c:
        api.faults += [status(503)] * 5
        with pytest.raises(GitLabUnavailable, match="HTTP 503") as down:
            await c.delete_runner(1)
        assert isinstance(down.value, InfrastructureError)
        assert not isinstance(down.value, UsageError)
        assert len(api.requests) == 3 and len(sleeps) == 2
        no_secret_in(down.value)
        api.faults[:] = [raising(httpx.ConnectError)] * 5
        with pytest.raises(GitLabUnavailable, match=r"cannot connect to https://gitlab\.example"):
            await c.verify_runner("glrt-x", "s_1")
        assert len(api.requests) == 6


async def test_create_is_retried_only_when_gitlab_cannot_have_acted(
    client: GitLabClient, api: FakeRunnersAPI, sleeps: Sleeps
) -> None:
    # not sent, rate limited, or a gateway's answer: retried
    api.faults += [raising(httpx.ConnectError), status(429), status(502), status(504)]
    created = await client.create_runner(**project_runner())
    assert len(api.requests) == 5 and len(api.runners) == 1 and created.id in api.runners
    api.faults += [raising(httpx.ConnectTimeout), status(503)]
    await client.create_runner(**project_runner())
    assert len(api.requests) == 8 and len(api.runners) == 2
    # GitLab may have created it: a 500 or a lost answer is not retried (no duplicate)
    for fault in (status(500), raising(httpx.ReadTimeout), raising(httpx.RemoteProtocolError)):
        api.requests.clear()
        api.faults.append(fault)
        with pytest.raises(GitLabUnavailable):
            await client.create_runner(**project_runner())
        assert len(api.requests) == 1


async def test_429_waits_retry_after(
    client: GitLabClient, api: FakeRunnersAPI, sleeps: Sleeps
) -> None:
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    api.faults += [status(429, {"Retry-After": "7"}), status(429, {"Retry-After": later})]
    assert await client.delete_runner(1) is False
    assert sleeps[0] == 7.0 and 25 <= sleeps[1] <= 31
    api.faults.append(status(429, {"Retry-After": "3600"}))
    with pytest.raises(GitLabUnavailable, match="wait 3600s"):
        await client.delete_runner(1)
    assert len(sleeps) == 2  # an hour is not waited


def test_retry_after_parsing() -> None:
    def of(value: str) -> float | None:
        return retry_after(httpx.Response(429, headers={"Retry-After": value}))

    assert of("12") == 12.0 and of("soon") is None and of("-3") is None
    assert of(email.utils.formatdate(0, usegmt=True)) == 0.0
    assert retry_after(httpx.Response(429)) is None


# --- answers: bounded and validated


async def test_an_oversized_answer_is_refused(
    client: GitLabClient, api: FakeRunnersAPI, sleeps: Sleeps
) -> None:
    huge = b'{"id": 1, "token": "' + b"x" * MAX_BODY + b'"}'
    api.faults.append(lambda _r: httpx.Response(201, content=huge))
    with pytest.raises(GitLabUnavailable, match="larger than"):
        await client.create_runner(**project_runner())

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(MAX_BODY // 65536 + 2):
            yield b" " * 65536

    api.faults.append(lambda _r: httpx.Response(200, content=chunks()))
    with pytest.raises(GitLabUnavailable, match="larger than"):
        await client.verify_runner("glrt-x", "s_1")
    assert sleeps == []


@pytest.mark.parametrize(
    "answer",
    [
        b"<html>502 Bad Gateway</html>",
        b'{"id": "nine", "token": "glrt-leaked-in-answer"}',
        b'{"id": 5}',
        b'{"id": 5, "token": ""}',
        b"[]",
    ],
)
async def test_an_invalid_answer_is_an_infrastructure_error(
    client: GitLabClient, api: FakeRunnersAPI, answer: bytes
) -> None:
    api.faults.append(lambda _r: httpx.Response(201, content=answer))
    with pytest.raises(GitLabUnavailable, match="GitLab sent an invalid answer") as bad:
        await client.create_runner(**project_runner())
    no_secret_in(bad.value, "glrt-leaked-in-answer")


async def test_a_compressed_answer_is_read(client: GitLabClient, api: FakeRunnersAPI) -> None:
    body = gzip.compress(b'{"id": 3, "token": "glrt-zipped", "token_expires_at": null}')
    api.faults.append(
        lambda _r: httpx.Response(201, content=body, headers={"Content-Encoding": "gzip"})
    )
    created = await client.create_runner(**project_runner())
    assert created.id == 3 and created.token == "glrt-zipped"


# --- construction


@pytest.mark.parametrize(
    "url",
    ["gitlab.example.com", "ftp://gitlab.example.com", "https://", "https://u:p@gitlab.example.com",
     "https://gitlab.example.com/?x=1"],
)  # fmt: skip
def test_the_url_must_be_http_with_a_host(url: str) -> None:
    with pytest.raises(UsageError) as bad:
        GitLabClient(url, PAT)
    no_secret_in(bad.value)


async def test_the_api_base_and_the_token_header(api: FakeRunnersAPI) -> None:
    transport = httpx.MockTransport(api)
    for url in ("http://gl.internal:8080/", "http://gl.internal:8080/api/v4"):
        async with GitLabClient(url, PAT, transport=transport) as c:
            assert c.url == "http://gl.internal:8080"
            await c.delete_runner(77)
        assert str(api.requests[-1].url) == "http://gl.internal:8080/api/v4/runners/77"
    with pytest.raises(UsageError, match="empty"):
        GitLabClient(URL, "")
