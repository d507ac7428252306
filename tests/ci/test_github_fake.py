"""FakeGitHub (a **fake** GitHub, on 127.0.0.1 only): its REST, runner and webhook contract.

The contract is ``docs/github-design.md`` ("The fake GitHub") and, for the
shapes, GitHub's own descriptions in ``../shared/reference/github/``: every
field the fake returns must be one GitHub documents, with the documented type
(the fake returns a subset, so GitHub's ``required`` lists are not enforced).
Those descriptions are not vendored; the shape checks skip where they are absent.
The stand-in runner's tests are in ``test_github_stand_in.py``.

Everything listens on 127.0.0.1.  Every server and thread a test starts is
stopped by that test's fixtures.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fake_support import (
    APP_ID,
    CLIENT_ID,
    INSTALLATION,
    JOB_FIELDS,
    LABELS,
    OWNER,
    PAT,
    RATE_HEADERS,
    REFERENCE,
    REPO,
    SECRET,
    Receiver,
    app_jwt,
    bearer,
    jit_identity,
    make_fake,
    payloads,
    register,
    runner_call,
    take_job,
    until,
)
from openapi_schema_validator import (
    OAS30Validator,
    OAS31Validator,
    oas30_format_checker,
    oas31_format_checker,
)

from stoker.ci.github.fake_github import FakeGitHub

pytestmark = pytest.mark.usefixtures("no_threads_left")

# --------------------------------------------------------------------------- GitHub's shapes


@cache
def rest_spec() -> dict[str, Any]:
    path = REFERENCE / "rest-actions.openapi.deref.json"
    if not path.is_file():
        pytest.skip(f"{path} is not beside this checkout")
    spec: dict[str, Any] = json.loads(path.read_text())
    return spec


@cache
def webhook_spec() -> dict[str, Any]:
    path = REFERENCE / "webhooks-workflow-job.openapi.json"
    if not path.is_file():
        pytest.skip(f"{path} is not beside this checkout")
    spec: dict[str, Any] = json.loads(path.read_text())
    return spec


def subset_schema(schema: Any, spec: dict[str, Any], depth: int = 0) -> Any:
    """``schema`` for a subset of GitHub's fields: no ``required``, no undocumented keys.

    Local ``$ref`` are inlined.  Objects are closed (``additionalProperties:
    false``), so a field GitHub does not document fails; the branches of an
    ``allOf`` stay open and the union of their properties closes the whole.
    """
    assert depth < 40, "a recursive schema"
    if isinstance(schema, list):
        return [subset_schema(s, spec, depth + 1) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        node: Any = spec
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return subset_schema(node, spec, depth + 1)
    out = {k: subset_schema(v, spec, depth + 1) for k, v in schema.items() if k != "required"}
    if out.get("nullable") and "enum" in out and None not in out["enum"]:
        # GitHub means null too (an in-progress job's conclusion), though OpenAPI 3.0's
        # validators read ``enum`` as excluding it.
        out["enum"] = [*out["enum"], None]
    if "properties" in schema:
        out["additionalProperties"] = False
    if "allOf" in schema:
        names: set[str] = set()
        for branch in out["allOf"]:
            branch.pop("additionalProperties", None)
            names |= set(branch.get("properties", {}))
        out["properties"] = {n: {} for n in names} | out.get("properties", {})
        out["additionalProperties"] = False
    return out


def check_rest(method: str, path: str, response: httpx.Response) -> None:
    """``response`` has only fields GitHub documents for ``method path``, of their types."""
    operation = rest_spec()["paths"][path][method.lower()]
    documented = operation["responses"].get(str(response.status_code))
    assert documented is not None, f"GitHub documents no {response.status_code} for {path}"
    content = documented.get("content", {}).get("application/json")
    if content is None:
        assert not response.content, response.content
        return
    schema = subset_schema(content["schema"], rest_spec())
    validator = OAS30Validator(schema, format_checker=oas30_format_checker)
    errors = [
        f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(response.json())
    ]
    assert not errors, f"{method} {path} -> {response.status_code}: {errors}"


def check_webhook(action: str, payload: dict[str, Any]) -> None:
    """A ``workflow_job`` payload against GitHub's description of that action's delivery."""
    spec = webhook_spec()
    body = spec["webhooks"][f"workflow-job-{action.replace('_', '-')}"]["post"]["requestBody"]
    schema = subset_schema(body["content"]["application/json"]["schema"], spec)
    validator = OAS31Validator(schema, format_checker=oas31_format_checker)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(payload)]
    assert not errors, f"workflow_job {action}: {errors}"


# --------------------------------------------------------------------------- lifecycle


def test_it_serves_on_loopback_only_and_teardown_is_idempotent(
    app_key: rsa.RSAPrivateKey,
) -> None:
    with pytest.raises(ValueError, match="loopback"):
        FakeGitHub(host="0.0.0.0")
    fake = make_fake(app_key, None)
    with fake:
        match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)", fake.url)
        assert match is not None and int(match[1]) > 0
        assert httpx.get(fake.url + "/app", trust_env=False).status_code == 401
    fake.__exit__(None, None, None)  # a second teardown changes nothing
    assert not [t for t in threading.enumerate() if t.name.startswith("fake-github")]
    with pytest.raises(httpx.ConnectError):
        httpx.get(fake.url + "/app", trust_env=False, timeout=2)


# --------------------------------------------------------------------------- authentication


@pytest.mark.parametrize(
    ("token", "status"),
    [
        (lambda key, other: app_jwt(key), 200),
        (lambda key, other: app_jwt(key, iss=CLIENT_ID), 200),
        (lambda key, other: app_jwt(other), 401),  # signed by another key
        (lambda key, other: app_jwt(key, age=700, lifetime=600), 401),  # expired
        (lambda key, other: app_jwt(key, lifetime=601), 401),  # exp - iat > 600 s
        (lambda key, other: app_jwt(key, iss="999"), 401),  # not this App
        (lambda key, other: jwt.encode({"iss": str(APP_ID)}, key, algorithm="RS256"), 401),
        (lambda key, other: PAT, 401),  # a token is not the App's JWT
        (lambda key, other: "", 401),
    ],
    ids=[
        "app-id",
        "client-id",
        "other-key",
        "expired",
        "too-long",
        "issuer",
        "no-exp",
        "pat",
        "none",
    ],
)
def test_app_endpoints_take_only_a_valid_app_jwt(
    gh: FakeGitHub,
    app_key: rsa.RSAPrivateKey,
    other_key: rsa.RSAPrivateKey,
    token: Callable[[rsa.RSAPrivateKey, rsa.RSAPrivateKey], str],
    status: int,
) -> None:
    response = httpx.get(
        gh.url + "/app", headers=bearer(token(app_key, other_key)), trust_env=False
    )
    assert response.status_code == status, response.text
    if status == 200:
        assert response.json() == {
            "id": APP_ID,
            "slug": "stoker-fake",
            "client_id": CLIENT_ID,
            "name": "stoker (fake)",
        }
    else:
        assert response.json()["message"]


def test_installation_tokens_are_issued_to_the_app_and_expire(
    app_key: rsa.RSAPrivateKey, receiver: Receiver
) -> None:
    with (
        make_fake(app_key, receiver, token_lifetime=1.0) as gh,
        httpx.Client(base_url=gh.url, trust_env=False, timeout=10) as http,
    ):
        as_app = bearer(app_jwt(app_key))
        found = http.get(f"/repos/{REPO}/installation", headers=as_app)
        assert found.status_code == 200 and found.json()["id"] == INSTALLATION
        assert http.get(f"/orgs/{OWNER}/installation", headers=as_app).json()["id"] == INSTALLATION
        assert http.get("/repos/acme/absent/installation", headers=as_app).status_code == 404
        assert http.get("/orgs/nobody/installation", headers=as_app).status_code == 404
        listed = http.get("/app/installations", headers=as_app).json()
        assert [(i["id"], i["account"]["login"]) for i in listed] == [(INSTALLATION, OWNER)]
        assert http.post("/app/installations/999/access_tokens", headers=as_app).status_code == 404

        before = datetime.now(UTC)
        issued = http.post(f"/app/installations/{INSTALLATION}/access_tokens", headers=as_app)
        assert issued.status_code == 201
        token = issued.json()
        expires = datetime.fromisoformat(token["expires_at"])
        assert before < expires <= datetime.now(UTC) + timedelta(seconds=1)
        assert token["repository_selection"] in ("all", "selected")
        assert token["permissions"]["administration"] == "write"

        runners = f"/repos/{REPO}/actions/runners"
        assert http.get(runners, headers=bearer(token["token"])).status_code == 200
        assert http.get(runners, headers=bearer(PAT)).status_code == 200
        # The App's JWT is not an installation token, nor is a made-up one.
        for wrong in (as_app, bearer("ghs_unknown"), {}):
            refused = http.get(runners, headers=wrong)
            assert refused.status_code == 401
            assert refused.json()["message"] in ("Bad credentials", "Requires authentication")
        until(lambda: datetime.now(UTC) > expires, 5, "the token's expiry")
        expired = http.get(runners, headers=bearer(token["token"]))
        assert (expired.status_code, expired.json()["message"]) == (401, "Bad credentials")


# --------------------------------------------------------------------------- runners


@pytest.mark.parametrize("scope", [f"repos/{REPO}", f"orgs/{OWNER}", f"enterprises/{OWNER}"])
def test_generate_jitconfig_registers_an_offline_runner(
    gh: FakeGitHub, api: httpx.Client, scope: str
) -> None:
    created = register(api, "r-1", ["Self-Hosted", "linux"], scope=scope)
    runner = created["runner"]
    assert runner["name"] == "r-1" and runner["os"] == "Linux"
    assert (runner["status"], runner["busy"]) == ("offline", False)
    assert [label["name"] for label in runner["labels"]] == ["Self-Hosted", "linux"]
    assert all({"id", "name", "type"} <= set(label) for label in runner["labels"])
    config = json.loads(base64.b64decode(created["encoded_jit_config"]))
    assert config["url"] == gh.url
    assert (config["runner_id"], config["runner_name"]) == (runner["id"], "r-1")
    assert config["secret"]
    assert api.get(f"/{scope}/actions/runners/{runner['id']}").json() == runner
    listed = api.get(f"/{scope}/actions/runners").json()
    assert (listed["total_count"], listed["runners"]) == (1, [runner])


def test_generate_jitconfig_refuses_bad_requests(api: httpx.Client) -> None:
    register(api, "taken")
    path = f"/repos/{REPO}/actions/runners/generate-jitconfig"
    good = {"name": "new", "runner_group_id": 1, "labels": ["self-hosted"]}
    cases = [
        ({**good, "name": "taken"}, 409),
        ({**good, "labels": []}, 422),
        ({**good, "labels": [f"l{i}" for i in range(101)]}, 422),
        ({**good, "labels": [""]}, 422),
        ({k: v for k, v in good.items() if k != "runner_group_id"}, 422),
        ({**good, "name": ""}, 422),
    ]
    for body, status in cases:
        response = api.post(path, json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["message"]
    assert api.post(path, content=b"{not json").status_code == 400
    absent = api.post("/repos/acme/absent/actions/runners/generate-jitconfig", json=good)
    assert absent.status_code == 404
    listed = api.get(f"/repos/{REPO}/actions/runners").json()["runners"]
    assert [r["name"] for r in listed] == ["taken"]


def test_a_jit_configuration_opens_one_session_only(gh: FakeGitHub, api: httpx.Client) -> None:
    created = register(api, "once")
    who = jit_identity(created["encoded_jit_config"])
    assert runner_call(api, "session", {**who, "secret": "wrong"}).status_code == 401
    assert runner_call(api, "session", {**who, "runner_id": 1}).status_code == 401
    assert runner_call(api, "session", who).status_code == 200
    runner = api.get(f"/repos/{REPO}/actions/runners/{who['runner_id']}").json()
    assert (runner["status"], runner["busy"]) == ("online", False)
    assert runner_call(api, "session", who).status_code == 409
    # Nothing queued: the long poll answers 204 once ``wait`` is over.
    started = time.monotonic()
    assert runner_call(api, "acquire", who, wait=0.3).status_code == 204
    assert 0.25 < time.monotonic() - started < 5


def test_runner_listings_are_paged_with_link_headers(gh: FakeGitHub, api: httpx.Client) -> None:
    ids = [gh.add_runner(f"repos/{REPO}", f"r-{i}", LABELS) for i in range(7)]
    seen: list[int] = []
    url: str | None = f"/repos/{REPO}/actions/runners?per_page=3"
    pages = 0
    while url is not None:
        response = api.get(url)
        assert response.status_code == 200
        assert response.json()["total_count"] == 7
        seen += [r["id"] for r in response.json()["runners"]]
        pages += 1
        link = response.headers.get("link")
        match = re.fullmatch(r'<([^>]+)>; rel="next"', link) if link else None
        if link:
            assert match is not None, link
            assert urlsplit(match[1]).netloc == urlsplit(gh.url).netloc
            assert parse_qs(urlsplit(match[1]).query)["per_page"] == ["3"]
        url = match[1] if match else None
    assert (pages, seen) == (3, ids)
    # per_page is capped at 100, as GitHub does.
    for i in range(7, 105):
        gh.add_runner(f"repos/{REPO}", f"r-{i}", LABELS)
    capped = api.get(f"/repos/{REPO}/actions/runners", params={"per_page": 1000})
    assert len(capped.json()["runners"]) == 100 and 'rel="next"' in capped.headers["link"]
    last = api.get(f"/repos/{REPO}/actions/runners", params={"per_page": 100, "page": 2})
    assert len(last.json()["runners"]) == 5 and "link" not in last.headers


def test_runners_are_deleted_unless_busy(gh: FakeGitHub, api: httpx.Client) -> None:
    idle = register(api, "idle")["runner"]["id"]
    assert api.get(f"/orgs/{OWNER}/actions/runners/{idle}").status_code == 404  # other scope
    assert api.delete(f"/repos/{REPO}/actions/runners/{idle}").status_code == 204
    assert api.delete(f"/repos/{REPO}/actions/runners/{idle}").status_code == 404
    assert api.get(f"/repos/{REPO}/actions/runners/{idle}").status_code == 404

    job_id = gh.queue_job(REPO, LABELS)
    who, job = take_job(api, "busy")
    assert job["id"] == job_id
    shown = api.get(f"/repos/{REPO}/actions/runners/{who['runner_id']}").json()
    assert (shown["status"], shown["busy"]) == ("online", True)
    refused = api.delete(f"/repos/{REPO}/actions/runners/{who['runner_id']}")
    assert refused.status_code == 422
    assert refused.json()["message"] == 'Bad request - Runner "busy" is still running a job"'
    assert runner_call(api, "heartbeat", who).status_code == 200
    done = runner_call(api, "complete", who, job_id=job_id, conclusion="success")
    assert done.status_code == 200
    # Ephemeral: gone once its job is done.
    assert api.get(f"/repos/{REPO}/actions/runners/{who['runner_id']}").status_code == 404
    assert gh.jobs[job_id].conclusion == "success" and not gh.runners


# --------------------------------------------------------------------------- jobs


def test_a_runner_gets_the_oldest_queued_job_its_labels_cover(
    gh: FakeGitHub, api: httpx.Client
) -> None:
    gpu = gh.queue_job(REPO, ["self-hosted", "gpu"])
    first = gh.queue_job(REPO, ["Self-Hosted", "LINUX"])  # labels compare case-insensitively
    second = gh.queue_job(REPO, ["self-hosted", "linux"])
    queued = api.get(f"/repos/{REPO}/actions/runs", params={"status": "queued"}).json()
    assert queued["total_count"] == 3

    _, job = take_job(api, "a")
    assert job["id"] == first
    who_b, job_b = take_job(api, "b")
    assert job_b == {"id": second, "run": ["true"]}
    narrow = jit_identity(register(api, "c", ["self-hosted"])["encoded_jit_config"])
    assert runner_call(api, "session", narrow).status_code == 200
    assert runner_call(api, "acquire", narrow, wait=0.2).status_code == 204

    shown = api.get(f"/repos/{REPO}/actions/jobs/{second}").json()
    assert set(shown) >= JOB_FIELDS
    assert (shown["status"], shown["runner_id"], shown["runner_name"]) == (
        "in_progress",
        who_b["runner_id"],
        "b",
    )
    assert shown["started_at"] is not None and shown["completed_at"] is None
    still = api.get(f"/repos/{REPO}/actions/runs", params={"status": "queued"}).json()
    assert [r["id"] for r in still["workflow_runs"]] == [gh.jobs[gpu].run_id]
    run_jobs = api.get(f"/repos/{REPO}/actions/runs/{gh.jobs[gpu].run_id}/jobs").json()
    assert [j["id"] for j in run_jobs["jobs"]] == [gpu]
    assert api.get(f"/repos/acme/other/actions/jobs/{second}").status_code == 404
    assert api.get(f"/repos/{REPO}/actions/jobs/1").status_code == 404

    # Only the runner holding the job completes it, once; anything but success is failure.
    assert (
        runner_call(api, "complete", narrow, job_id=second, conclusion="success").status_code == 409
    )
    done = runner_call(api, "complete", who_b, job_id=second, conclusion="bogus")
    assert done.status_code == 200
    assert gh.jobs[second].conclusion == "failure" and gh.jobs[second].status == "completed"
    # ...and the runner is gone with it (ephemeral): its identity is unknown now.
    assert (
        runner_call(api, "complete", who_b, job_id=second, conclusion="success").status_code == 401
    )


def test_a_busy_runner_that_falls_silent_loses_its_job(
    app_key: rsa.RSAPrivateKey, receiver: Receiver
) -> None:
    with (
        make_fake(app_key, receiver, lost_after=0.3) as gh,
        httpx.Client(base_url=gh.url, headers=bearer(PAT), trust_env=False) as api,
    ):
        job_id = gh.queue_job(REPO, LABELS)
        who, _ = take_job(api, "lost")
        time.sleep(0.5)
        # Any API call lets the fake notice, as GitHub notices in its own time.
        shown = api.get(f"/repos/{REPO}/actions/runners/{who['runner_id']}").json()
        assert (shown["status"], shown["busy"]) == ("offline", False)
        job = api.get(f"/repos/{REPO}/actions/jobs/{job_id}").json()
        assert (job["status"], job["conclusion"]) == ("completed", "failure")


# --------------------------------------------------------------------------- limits and faults


def test_every_api_response_carries_rate_limit_headers(gh: FakeGitHub, api: httpx.Client) -> None:
    gh.set_rate_limit(100, limit=100)
    responses = [
        api.get(f"/repos/{REPO}/actions/runners"),
        api.get("/repos/acme/absent/actions/runners"),
        api.get(f"/repos/{REPO}/actions/runners", headers={"Authorization": "Bearer nope"}),
    ]
    assert [r.status_code for r in responses] == [200, 404, 401]
    for i, response in enumerate(responses):
        headers = {h: response.headers[h] for h in RATE_HEADERS}
        assert headers["x-ratelimit-limit"] == "100"
        assert headers["x-ratelimit-remaining"] == str(99 - i)
        assert headers["x-ratelimit-used"] == str(i + 1)
        assert headers["x-ratelimit-resource"] == "core"
        assert int(headers["x-ratelimit-reset"]) > time.time()


def test_a_spent_budget_answers_403_until_the_reset(gh: FakeGitHub, api: httpx.Client) -> None:
    # The reset is whole seconds: 1.5 s leaves at least half a second for three calls.
    gh.set_rate_limit(2, limit=10, reset_in=1.5)
    path = f"/repos/{REPO}/actions/runners"
    assert [api.get(path).status_code for _ in range(2)] == [200, 200]
    spent = api.get(path)
    assert spent.status_code == 403
    assert spent.headers["x-ratelimit-remaining"] == "0"
    assert spent.json()["message"].startswith("API rate limit exceeded")
    reset = int(spent.headers["x-ratelimit-reset"])
    assert reset <= time.time() + 1.5
    until(lambda: time.time() >= reset, 3, "the reset")
    fresh = api.get(path)
    assert fresh.status_code == 200 and fresh.headers["x-ratelimit-remaining"] == "9"
    assert int(fresh.headers["x-ratelimit-reset"]) > reset


def test_injected_faults_answer_with_their_status_then_stop(
    gh: FakeGitHub, api: httpx.Client
) -> None:
    runners = f"/repos/{REPO}/actions/runners"
    gh.fail("GET", r"/actions/runners$", 503, times=2)
    gh.fail("POST", "generate-jitconfig", 429, retry_after=7)
    gh.fail("*", r"/actions/jobs/", 403, retry_after=1.5)
    assert api.delete(f"{runners}/1").status_code == 404  # another method: no fault
    failed = [api.get(runners) for _ in range(3)]
    assert [r.status_code for r in failed] == [503, 503, 200]
    assert failed[0].json()["message"] == "Server Error"
    assert all(h in failed[0].headers for h in RATE_HEADERS)
    limited = api.post(f"{runners}/generate-jitconfig", json={})
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "7")
    secondary = api.get(f"/repos/{REPO}/actions/jobs/5")
    assert (secondary.status_code, secondary.headers["retry-after"]) == (403, "1.5")
    assert "secondary rate limit" in secondary.json()["message"]
    gh.fail("GET", ".", 500, times=5)
    gh.clear_faults()
    assert api.get(runners).status_code == 200
    assert api.get("/app").status_code == 401  # the JWT check is back: no fault left


def test_bodies_over_a_mebibyte_are_refused_and_calls_are_logged(
    gh: FakeGitHub, api: httpx.Client
) -> None:
    path = f"/repos/{REPO}/actions/runners/generate-jitconfig"
    assert api.post(path, content=b"x" * ((1 << 20) + 1)).status_code == 413
    assert runner_call_raw(api, b" " * ((1 << 20) + 1)).status_code == 413
    api.get(f"/repos/{REPO}/actions/runners")
    assert gh.api_calls() == [
        ("POST", path, 413),
        ("GET", f"/repos/{REPO}/actions/runners", 200),
    ]
    assert ("POST", "/_fake/runner/session", 413) in gh.calls


def runner_call_raw(api: httpx.Client, body: bytes) -> httpx.Response:
    return api.post("/_fake/runner/session", content=body)


# --------------------------------------------------------------------------- webhooks


def test_job_webhooks_are_signed_and_shaped_like_githubs(
    gh: FakeGitHub, api: httpx.Client, receiver: Receiver
) -> None:
    job_id = gh.queue_job(REPO, LABELS)
    who, _ = take_job(api, "hooked")
    runner_call(api, "complete", who, job_id=job_id, conclusion="success")
    received = receiver.wait_for(3)
    ids = set()
    for headers, body in received:
        assert headers["X-GitHub-Event"] == "workflow_job"
        assert headers["Content-Type"] == "application/json"
        assert headers["User-Agent"] == "GitHub-Hookshot/fake"
        expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Hub-Signature-256"], expected)
        assert uuid.UUID(headers["X-GitHub-Delivery"]).version == 4
        ids.add(headers["X-GitHub-Delivery"])
    assert len(ids) == 3
    queued, started, completed = payloads(received)
    assert [p["action"] for p in (queued, started, completed)] == [
        "queued",
        "in_progress",
        "completed",
    ]
    for payload in (queued, started, completed):
        assert set(payload) == {"action", "workflow_job", "repository", "installation"}
        assert set(payload["workflow_job"]) == JOB_FIELDS
        assert payload["workflow_job"]["id"] == job_id
        assert payload["workflow_job"]["status"] == payload["action"]
        assert payload["repository"]["full_name"] == REPO
        assert payload["repository"]["name"] == "app"
        assert payload["repository"]["owner"] == {"login": OWNER}
        assert payload["installation"] == {"id": INSTALLATION}
    assert (queued["workflow_job"]["runner_id"], queued["workflow_job"]["runner_name"]) == (
        None,
        None,
    )
    assert started["workflow_job"]["runner_name"] == "hooked"
    assert completed["workflow_job"]["conclusion"] == "success"
    until(lambda: len(gh.webhooks.deliveries) == 3, 5, "the delivery log")
    assert [d.status for d in gh.webhooks.deliveries] == [200, 200, 200]
    assert {d.delivery_id for d in gh.webhooks.deliveries} == ids


def test_dropped_deliveries_are_logged_and_can_be_redelivered(
    gh: FakeGitHub, receiver: Receiver
) -> None:
    gh.webhooks.drop_next(1)
    lost = gh.queue_job(REPO, LABELS)
    kept = gh.queue_job(REPO, LABELS)
    ((headers, body),) = receiver.wait_for(1)
    assert json.loads(body)["workflow_job"]["id"] == kept
    dropped = gh.webhooks.deliveries[0]
    assert dropped.status is None and json.loads(dropped.body)["workflow_job"]["id"] == lost
    gh.webhooks.redeliver(dropped.delivery_id)
    again_headers, again_body = receiver.wait_for(2)[1]
    assert again_headers["X-GitHub-Delivery"] == dropped.delivery_id
    assert again_body == dropped.body
    # A redelivery of a delivered one repeats it byte for byte, id included.
    gh.webhooks.redeliver(headers["X-GitHub-Delivery"])
    third_headers, third_body = receiver.wait_for(3)[2]
    assert (third_headers["X-GitHub-Delivery"], third_body) == (headers["X-GitHub-Delivery"], body)
    assert third_headers["X-Hub-Signature-256"] == headers["X-Hub-Signature-256"]


def test_duplicated_deliveries_repeat_body_and_id(gh: FakeGitHub, receiver: Receiver) -> None:
    gh.webhooks.duplicate_next(1)
    gh.queue_job(REPO, LABELS)
    gh.queue_job(REPO, LABELS)
    received = receiver.wait_for(3)
    assert received[0] == received[1]
    assert received[2][0]["X-GitHub-Delivery"] != received[0][0]["X-GitHub-Delivery"]
    time.sleep(0.2)
    assert len(receiver.received) == 3


def test_held_deliveries_are_released_out_of_order(gh: FakeGitHub, receiver: Receiver) -> None:
    gh.webhooks.hold()
    jobs = [gh.queue_job(REPO, LABELS) for _ in range(3)]
    time.sleep(0.2)
    assert receiver.received == []
    gh.webhooks.release(reverse=True)
    order = [p["workflow_job"]["id"] for p in payloads(receiver.wait_for(3))]
    assert order == jobs[::-1]
    gh.webhooks.hold()
    later = [gh.queue_job(REPO, LABELS) for _ in range(2)]
    gh.webhooks.release(reverse=False)
    assert [p["workflow_job"]["id"] for p in payloads(receiver.wait_for(5))[3:]] == later


def test_ping_and_unknown_redeliveries(gh: FakeGitHub, receiver: Receiver) -> None:
    gh.webhooks.ping(hook_id=9, app_id=APP_ID)
    ((headers, body),) = receiver.wait_for(1)
    assert headers["X-GitHub-Event"] == "ping"
    expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Hub-Signature-256"], expected)
    ping = json.loads(body)
    assert (ping["hook_id"], ping["hook"]["app_id"], ping["hook"]["events"]) == (
        9,
        APP_ID,
        ["workflow_job"],
    )
    with pytest.raises(KeyError):
        gh.webhooks.redeliver(str(uuid.uuid4()))


def test_deliveries_ignore_the_proxy_of_the_environment(
    app_key: rsa.RSAPrivateKey, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens there: a delivery sent through it would fail.
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with make_fake(app_key, receiver) as gh:
        gh.queue_job(REPO, LABELS)
        gh.webhooks.wait_idle(timeout=10)
        assert [d.status for d in gh.webhooks.deliveries] == [200]


def test_delivery_delay_and_the_receivers_answers_are_logged(
    gh: FakeGitHub, receiver: Receiver
) -> None:
    receiver.status = 500
    gh.webhooks.delay = 0.3
    started = time.monotonic()
    gh.queue_job(REPO, LABELS)
    receiver.wait_for(1)
    assert time.monotonic() - started >= 0.3
    until(lambda: gh.webhooks.deliveries, 5, "the delivery log")
    assert gh.webhooks.deliveries[0].status == 500


# --------------------------------------------------------------------------- GitHub's shapes


def test_rest_responses_carry_only_githubs_fields(
    gh: FakeGitHub, api: httpx.Client, app_key: rsa.RSAPrivateKey
) -> None:
    as_app = bearer(app_jwt(app_key))
    checks: list[tuple[str, str, httpx.Response]] = [
        ("GET", "/app", api.get("/app", headers=as_app)),
        ("GET", "/app/installations", api.get("/app/installations", headers=as_app)),
        (
            "POST",
            "/app/installations/{installation_id}/access_tokens",
            api.post(f"/app/installations/{INSTALLATION}/access_tokens", headers=as_app),
        ),
        (
            "GET",
            "/repos/{owner}/{repo}/installation",
            api.get(f"/repos/{REPO}/installation", headers=as_app),
        ),
        ("GET", "/orgs/{org}/installation", api.get(f"/orgs/{OWNER}/installation", headers=as_app)),
        (
            "GET",
            "/repos/{owner}/{repo}/installation",
            api.get("/repos/a/b/installation", headers=as_app),
        ),
    ]
    for template, scope in (
        ("/repos/{owner}/{repo}", f"/repos/{REPO}"),
        ("/orgs/{org}", f"/orgs/{OWNER}"),
        ("/enterprises/{enterprise}", f"/enterprises/{OWNER}"),
    ):
        base = f"{scope}/actions/runners"
        body = {"name": "shape", "runner_group_id": 1, "labels": LABELS}
        created = api.post(f"{base}/generate-jitconfig", json=body)
        runner_id = created.json()["runner"]["id"]
        checks += [
            ("POST", f"{template}/actions/runners/generate-jitconfig", created),
            (
                "POST",
                f"{template}/actions/runners/generate-jitconfig",
                api.post(f"{base}/generate-jitconfig", json=body),  # 409
            ),
            (
                "POST",
                f"{template}/actions/runners/generate-jitconfig",
                api.post(f"{base}/generate-jitconfig", json={**body, "labels": []}),  # 422
            ),
            ("GET", f"{template}/actions/runners", api.get(base)),
            ("GET", f"{template}/actions/runners/{{runner_id}}", api.get(f"{base}/{runner_id}")),
            ("GET", f"{template}/actions/runners/downloads", api.get(f"{base}/downloads")),
            (
                "DELETE",
                f"{template}/actions/runners/{{runner_id}}",
                api.delete(f"{base}/{runner_id}"),
            ),
        ]
        if not template.startswith("/repos"):
            groups = api.get(f"{scope}/actions/runner-groups")
            checks.append(("GET", f"{template}/actions/runner-groups", groups))
    gh.queue_job(REPO, LABELS)
    checks.append(
        ("GET", "/repos/{owner}/{repo}/actions/runs", api.get(f"/repos/{REPO}/actions/runs"))
    )
    for method, path, response in checks:
        check_rest(method, path, response)
    downloads = api.get(f"/repos/{REPO}/actions/runners/downloads").json()
    assert {(d["os"], d["architecture"]) for d in downloads} == {
        ("linux", "x64"),
        ("linux", "arm64"),
    }


def test_the_shape_check_catches_undocumented_and_mistyped_fields() -> None:
    path = "/repos/{owner}/{repo}/actions/runners/{runner_id}"
    good = {"id": 1, "name": "r", "os": "Linux", "status": "online", "busy": False, "labels": []}
    check_rest("GET", path, httpx.Response(200, json=good))
    for bad in ({**good, "invented": 1}, {**good, "busy": "no"}, {**good, "labels": [{"name": 5}]}):
        with pytest.raises(AssertionError):
            check_rest("GET", path, httpx.Response(200, json=bad))
    with pytest.raises(AssertionError, match="documents no 418"):
        check_rest("GET", path, httpx.Response(418, json=good))
    job = {"id": 1, "status": "in_progress", "run_id": 2, "labels": ["x"]}
    check_webhook("in_progress", {"action": "in_progress", "workflow_job": job})
    for payload in (
        {"action": "queued", "workflow_job": job},
        {"action": "in_progress", "workflow_job": {**job, "invented": True}},
        {"action": "in_progress", "workflow_job": job, "installation": {"id": "7"}},
    ):
        with pytest.raises(AssertionError):
            check_webhook("in_progress", payload)


@pytest.mark.parametrize("state", ["queued", "in_progress", "completed"])
def test_jobs_carry_only_githubs_fields(
    gh: FakeGitHub, api: httpx.Client, receiver: Receiver, state: str
) -> None:
    job_id = gh.queue_job(REPO, LABELS)
    if state != "queued":
        who, _ = take_job(api, "shape")
        if state == "completed":
            runner_call(api, "complete", who, job_id=job_id, conclusion="success")
    job = api.get(f"/repos/{REPO}/actions/jobs/{job_id}")
    assert job.json()["status"] == state
    run_id = job.json()["run_id"]
    check_rest("GET", "/repos/{owner}/{repo}/actions/jobs/{job_id}", job)
    listed = api.get(f"/repos/{REPO}/actions/runs/{run_id}/jobs")
    check_rest("GET", "/repos/{owner}/{repo}/actions/runs/{run_id}/jobs", listed)
    expected = ["queued", "in_progress", "completed"]
    received = payloads(receiver.wait_for(expected.index(state) + 1))
    check_webhook(state, received[-1])
