"""The REST API fuzzed from its own OpenAPI document (schemathesis), and its scopes.

A real ``stoker serve`` on 127.0.0.1 (fake backend, SQLite) serves the
document; schemathesis generates requests for every operation in it, valid
and invalid, and checks each answer: no 5xx, a status code the operation
documents, a content type and a body that match its declared schema.  Path
parameters are real ids half of the time (a finished job with an artifact,
a running job, a session), so the operations get past "no such job".

Every operation's required scope is read from the app's routes (the
dependency that checks it), never from a list here: each one is called with
no token and a wrong token (401) and with every token lacking its scope
(403), with requests generated from the document, and nothing it would do
happens (no job is created or cancelled).

The fake backend runs commands on this host: a generated job or step always
runs ``true`` (every other field stays as generated), and git sources may
only use ``file://`` URLs, so nothing leaves this machine.

Bounded for CI (about a minute): a fixed number of examples per operation,
derandomized (the same requests every run), no example database.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.parameters import ParameterLocation
from schemathesis.schemas import APIOperation, BaseSchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from serve_process import SCOPED_TOKENS, ServeProcess

from stoker.service.api import create_app
from stoker.service.apiutil import route_scopes
from stoker.service.auth import SCOPES, Principal
from stoker.service.config import ServiceConfig
from stoker.service.jobs import JobRequest
from stoker.service.service import Service

#: Examples per operation (each one request); the run stays around a minute.
EXAMPLES = 60
#: The operations no token guards (anything else without a scope fails the test).
#: Operations open by design -> (the URL tried without a token, its status).
OPEN_ANSWERS: dict[tuple[str, str], tuple[str, int]] = {
    ("GET", "/health"): ("/health", 200),
    # The dashboard's own routes: no API data. The form and the page's files are public,
    # the page's shell checks the sign-in cookie itself (test_dashboard_routes.py).
    ("GET", "/ui"): ("/ui", 308),
    ("GET", "/ui/"): ("/ui/", 303),
    ("GET", "/ui/login"): ("/ui/login", 200),
    ("POST", "/ui/login"): ("/ui/login", 401),
    ("POST", "/ui/logout"): ("/ui/logout", 303),
    ("GET", "/ui/static/{name}"): ("/ui/static/app.js", 200),
}
OPEN_OPERATIONS = set(OPEN_ANSWERS)
#: Not positive_data_acceptance: a valid spec may still name no configured pool, and a
#: "binary" source may be no tarball (both a documented 400).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
HARMLESS = ["true"]
ENDED = {"succeeded", "failed", "errored", "cancelled", "timed_out"}


class Fuzzed:
    """The server under test and the ids of the jobs it was seeded with."""

    def __init__(self, server: ServeProcess) -> None:
        self.server = server
        self.client = httpx.Client(base_url=server.url, timeout=30)
        self.finished = self.submit(
            {
                "command": ["sh", "-c", "echo hello; mkdir -p out; echo data > out/a.txt"],
                "artifacts": ["out/*"],
            }
        )
        self.running = self.submit({"command": ["sleep", "600"]})
        self.session = self.submit({"session": {}})
        self.wait_ended(self.finished)

    def submit(self, spec: dict[str, Any], who: str = "ci") -> str:
        response = self.client.post(
            "/v1/jobs",
            files={"spec": (None, json.dumps(spec), "application/json")},
            headers=self.server.headers(who),
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.client.get(f"/v1/jobs/{job_id}", headers=self.server.headers("root"))
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait_ended(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id))["state"] not in ENDED:
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        return job

    def job_count(self) -> int:
        response = self.client.get(
            "/v1/jobs", params={"limit": 1000}, headers=self.server.headers("root")
        )
        return len(response.json()["jobs"])

    def ids_for(self, case: schemathesis.Case) -> list[str]:
        """Real job ids this case may use: none that would stream without end."""
        query = case.query or {}
        if str(query.get("follow", "")).lower() in {"true", "1", "yes", "on"}:
            return [self.finished]
        return [self.finished, self.running, self.session]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    root = tmp_path_factory.mktemp("fuzz")
    with ServeProcess(root, extra='[git]\nallow_protocols = ["file"]\n') as server:
        target = Fuzzed(server)
        try:
            yield target
        finally:
            target.client.close()


@pytest.fixture(scope="module")
def document(fuzzed: Fuzzed) -> dict[str, Any]:
    """The OpenAPI document the server serves."""
    response = fuzzed.client.get("/openapi.json", headers=fuzzed.server.headers("viewer"))
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.fixture(scope="module")
def schema(fuzzed: Fuzzed, document: dict[str, Any]) -> BaseSchema:
    loaded = schemathesis.openapi.from_dict(document)
    loaded.config.update(base_url=fuzzed.server.url)
    # The token is sent with every request (a missing one is what the scope test is about).
    loaded.config.generation.update(with_security_parameters=False)
    return loaded


def the_app() -> FastAPI:
    """The app (not started: its routes and document are all that is read)."""
    config = ServiceConfig.model_validate({"state_dir": "/nonexistent", "pools": {"default": {}}})
    return create_app(Service(config), config)


def required_scopes() -> dict[tuple[str, str], frozenset[str]]:
    """Every operation of the app and the scopes it requires, read from its routes."""
    return dict(route_scopes(the_app().routes))


def documented_operations() -> list[tuple[str, str]]:
    """The operations of the app's OpenAPI document (every route but the document's own)."""
    paths = the_app().openapi()["paths"]
    return sorted((method.upper(), path) for path in paths for method in paths[path])


OPERATIONS = required_scopes()
DOCUMENTED = documented_operations()
ALL = sorted(OPERATIONS)


def label(operation: tuple[str, str]) -> str:
    return " ".join(operation)


def run_examples(
    operation: APIOperation,
    modes: Sequence[GenerationMode],
    examples: int,
    test: Callable[[schemathesis.Case, st.DataObject], None],
) -> None:
    """Run ``test`` on ``examples`` cases of ``operation`` generated in ``modes``."""
    cases = st.one_of([operation.as_strategy(mode) for mode in modes])

    @settings(FUZZ, max_examples=examples)
    @given(case=cases, data=st.data())
    def run(case: schemathesis.Case, data: st.DataObject) -> None:
        test(case, data)

    run()


def neutralise(case: schemathesis.Case) -> None:
    """Generated commands run ``true``; no git source (see the module docstring)."""
    body = case.body
    spec = body.get("spec") if isinstance(body, dict) and case.path == "/v1/jobs" else body
    if isinstance(spec, dict):
        if isinstance(spec.get("command"), list) and spec["command"]:
            spec["command"] = list(HARMLESS)
        if isinstance(spec.get("git"), dict):
            spec["git"] = None


def use_real_ids(case: schemathesis.Case, fuzzed: Fuzzed, data: st.DataObject) -> None:
    """Half of the time, a generated job id is replaced by one of the seeded jobs.

    Not when the path is the invalid part of the case (it would become valid).
    """
    params = case.path_parameters
    path = case.meta.components.get(ParameterLocation.PATH) if case.meta else None
    if path is not None and path.mode is GenerationMode.NEGATIVE:
        return
    if params and "job_id" in params and data.draw(st.booleans(), label="real id"):
        params["job_id"] = data.draw(st.sampled_from(fuzzed.ids_for(case)), label="job")
    if params and "name" in params and data.draw(st.booleans(), label="real artifact"):
        params["name"] = "out/a.txt"


@pytest.mark.parametrize(("method", "path"), DOCUMENTED, ids=[label(o) for o in DOCUMENTED])
def test_fuzz_every_operation(method: str, path: str, fuzzed: Fuzzed, schema: BaseSchema) -> None:
    def check(case: schemathesis.Case, data: st.DataObject) -> None:
        neutralise(case)
        use_real_ids(case, fuzzed, data)
        case.call_and_validate(
            base_url=fuzzed.server.url, headers=fuzzed.server.headers("root"), checks=CHECKS
        )

    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    run_examples(schema[path][method], modes, EXAMPLES, check)


# --- scopes ---------------------------------------------------------------------------------------


def test_every_operation_declares_a_scope() -> None:
    scopes = OPERATIONS
    assert len(scopes) >= 15
    unguarded = {op for op, needed in scopes.items() if not needed} - OPEN_OPERATIONS
    assert not unguarded, f"operations without a scope: {sorted(unguarded)}"
    for operation, needed in scopes.items():
        assert needed <= set(SCOPES), operation
    assert {op for op, needed in scopes.items() if not needed} == OPEN_OPERATIONS


def test_the_document_names_every_scope(fuzzed: Fuzzed) -> None:
    response = fuzzed.client.get("/openapi.json", headers=fuzzed.server.headers("viewer"))
    document = response.json()
    documented = {
        (method.upper(), path): operation.get("security")
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    }
    assert sorted(documented) == DOCUMENTED
    assert set(DOCUMENTED) <= OPERATIONS.keys()
    for operation in DOCUMENTED:
        needed = OPERATIONS[operation]
        expected = [{"bearerToken": sorted(needed)}] if needed else None
        assert documented[operation] == expected, operation


def weaker_tokens(needed: frozenset[str]) -> list[str]:
    """The configured tokens that lack one of ``needed`` (admin holds every scope)."""
    return [
        name
        for name, scopes in SCOPED_TOKENS.items()
        if not all(Principal(name, frozenset(scopes)).allows(s) for s in needed)  # type: ignore[arg-type]
    ]


@pytest.mark.parametrize(("method", "path"), ALL, ids=[label(o) for o in ALL])
def test_no_request_bypasses_a_scope(
    method: str, path: str, fuzzed: Fuzzed, schema: BaseSchema
) -> None:
    needed = OPERATIONS[(method, path)]
    if not needed:  # open by design (OPEN_OPERATIONS): it answers without a token
        url, status = OPEN_ANSWERS[(method, path)]
        assert fuzzed.client.request(method, url).status_code == status
        return
    attempts: list[tuple[dict[str, str], int]] = [
        ({}, 401),
        ({"Authorization": "Bearer stk_not-a-token"}, 401),
        ({"Authorization": f"Basic {fuzzed.server.tokens['root']}"}, 401),
    ]
    attempts += [(fuzzed.server.headers(who), 403) for who in weaker_tokens(needed)]

    def check(case: schemathesis.Case, data: st.DataObject) -> None:
        neutralise(case)
        use_real_ids(case, fuzzed, data)
        before = fuzzed.job_count()
        running = fuzzed.job(fuzzed.running)["state"]
        for headers, status in attempts:
            response = case.call(base_url=fuzzed.server.url, headers=headers)
            assert response.status_code == status, (method, path, headers, response.text)
            assert response.headers["www-authenticate"][0].startswith("Bearer")
            assert set(response.json()) == {"error", "detail"}
        assert fuzzed.job_count() == before
        assert fuzzed.job(fuzzed.running)["state"] == running

    if (method, path) not in DOCUMENTED:
        # The document's own route: no parameters, nothing to generate.
        assert "{" not in path, path
        response = fuzzed.client.request(method, path)
        assert response.status_code == 401, response.text
        for headers, status in attempts:
            assert fuzzed.client.request(method, path, headers=headers).status_code == status
        return
    # Valid requests: an invalid one might not reach the route (404 for a path with a '/').
    run_examples(schema[path][method], [GenerationMode.POSITIVE], 8, check)


def test_there_are_weaker_tokens_for_every_scope() -> None:
    for scope in SCOPES:
        if scope != "admin":
            assert weaker_tokens(frozenset({scope})), scope


# --- what the fuzzer found ------------------------------------------------------------------------


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object inside ``node``."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def test_a_405_names_every_method_of_the_path(fuzzed: Fuzzed) -> None:
    # Starlette named only the first route's methods: `Allow: POST` for /v1/jobs.
    headers = fuzzed.server.headers("root")
    response = fuzzed.client.request("OPTIONS", "/v1/jobs", headers=headers)
    assert response.status_code == 405 and response.headers["allow"] == "GET, POST"
    assert response.json()["error"] == "Method Not Allowed"
    response = fuzzed.client.delete(f"/v1/jobs/{fuzzed.finished}", headers=headers)
    assert response.status_code == 405 and response.headers["allow"] == "GET"


def test_paging_before_an_unknown_job(fuzzed: Fuzzed, document: dict[str, Any]) -> None:
    # `before=` (empty) was an undocumented 404 "no job ''"; it is now checked as an id,
    # and an id of no job is the documented 404.
    headers = fuzzed.server.headers("viewer")
    response = fuzzed.client.get("/v1/jobs", params={"before": ""}, headers=headers)
    assert response.status_code == 422, response.text
    response = fuzzed.client.get("/v1/jobs", params={"before": "0" * 32}, headers=headers)
    assert response.status_code == 404 and response.json()["error"] == f"no job {'0' * 32!r}"
    assert "404" in document["paths"]["/v1/jobs"]["get"]["responses"]
    response = fuzzed.client.get("/v1/jobs", params={"before": fuzzed.finished}, headers=headers)
    assert response.status_code == 200 and fuzzed.finished not in str(response.json())


def test_array_bounds_are_item_counts(fuzzed: Fuzzed, document: dict[str, Any]) -> None:
    # A bound of an `Items` field came out as minLength (ignored on arrays): the document
    # promised that a step with no command was valid.
    arrays = [node for node in walk(document) if node.get("type") == "array"]
    assert arrays and not [a for a in arrays if {"minLength", "maxLength"} & a.keys()]
    step = document["components"]["schemas"]["StepRequest"]["properties"]["command"]
    assert step["minItems"] == 1
    labels = document["components"]["schemas"]["JobRequest"]["properties"]["labels"]
    assert labels["maxItems"] >= 1
    response = fuzzed.client.post(
        f"/v1/jobs/{fuzzed.session}/steps",
        json={"command": []},
        headers=fuzzed.server.headers("ci"),
    )
    assert response.status_code == 422 and "command" in response.json()["error"]


def test_a_step_for_a_job_that_is_no_session(fuzzed: Fuzzed, document: dict[str, Any]) -> None:
    # An undocumented 400.
    for method, path, body in (
        ("post", f"/v1/jobs/{fuzzed.finished}/steps", {"command": ["true"]}),
        ("get", f"/v1/jobs/{fuzzed.finished}/steps/1", None),
        ("post", f"/v1/jobs/{fuzzed.finished}/close", None),
    ):
        response = fuzzed.client.request(
            method, path, json=body, headers=fuzzed.server.headers("ci")
        )
        assert response.status_code == 400, response.text
        assert "is not a session" in response.json()["error"]
        template = path.replace(fuzzed.finished, "{job_id}").replace("/1", "/{seq}")
        assert "400" in document["paths"][template][method]["responses"]


def test_the_token_is_checked_before_the_body(fuzzed: Fuzzed) -> None:
    # FastAPI parsed a declared JSON body before the route's token check: a step of broken
    # JSON sent with no token (or a read-only one) was answered 422, not 401 (403).
    url = f"/v1/jobs/{fuzzed.session}/steps"
    broken = {"content": b'{"command": [', "headers": {"Content-Type": "application/json"}}
    for who, status in ((None, 401), ("viewer", 403), ("ci", 422)):
        headers = {**broken["headers"], **(fuzzed.server.headers(who) if who else {})}
        response = fuzzed.client.post(url, content=broken["content"], headers=headers)
        assert response.status_code == status, (who, response.text)
    assert response.json()["error"] == "the body is not valid JSON"
    response = fuzzed.client.post(
        url,
        json={"command": ["true"], "secrets": {"bad name": "s3cr3t-value"}},
        headers=fuzzed.server.headers("ci"),
    )
    assert response.status_code == 422 and response.json()["error"].startswith("invalid step")
    assert "s3cr3t-value" not in response.text


def test_a_spec_needs_a_command_or_a_session(document: dict[str, Any]) -> None:
    # The document called `{}` a valid spec (the service refuses it: 422).
    spec = {"$ref": "#/components/schemas/JobRequest", "components": document["components"]}
    validator = jsonschema_rs.Draft202012Validator(spec)
    for good in ({"command": ["make"]}, {"session": {}}, {"session": {}, "retries": 0}):
        assert validator.is_valid(good), good
        JobRequest.model_validate(good)
    for bad in (
        {},
        {"command": []},
        {"command": [""]},
        {"command": ["make"], "session": {}},
        {"session": {}, "artifacts": ["a"]},
        {"session": {}, "retries": 2},
    ):
        assert not validator.is_valid(bad), bad
        with pytest.raises(ValueError):
            JobRequest.model_validate(bad)


def test_the_unknown_multipart_parts_are_documented(document: dict[str, Any]) -> None:
    # The document let any part through; the service refuses parts other than these two.
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    form = body["multipart/form-data"]["schema"]
    assert form["additionalProperties"] is False and set(form["properties"]) == {
        "spec",
        "source",
    }


def test_log_events_match_their_documented_schema(fuzzed: Fuzzed, schema: BaseSchema) -> None:
    # The stream was documented as {"type": "string"}: now each event, with its JSON data.
    operation = schema["/v1/jobs/{job_id}/logs"]["GET"]
    case = operation.Case(path_parameters={"job_id": fuzzed.finished}, query={"follow": "true"})
    response = case.call_and_validate(
        base_url=fuzzed.server.url, headers=fuzzed.server.headers("viewer"), checks=CHECKS
    )
    events = [line for line in response.text.splitlines() if line.startswith("event: ")]
    assert events[-1] == "event: end" and "event: log" in events
    # A stream whose end event breaks its schema is caught.
    tampered = case.call(base_url=fuzzed.server.url, headers=fuzzed.server.headers("viewer"))
    bad, count = re.subn(r'"state":"[a-z_]+"', '"state":"exploded"', tampered.text)
    assert count >= 2  # the end event's state and its job's
    tampered.content = bad.encode()
    with pytest.raises(FailureGroup, match="SSE event violates schema"):
        case.validate_response(tampered, checks=[response_schema_conformance])
