"""FakeGitLab (a **fake** GitLab, loopback only): its runner API, job protocol and git contract.

The contract is GitLab's documented runner API (``../shared/reference/gitlab/``:
``POST /user/runners``, ``DELETE /runners[/:id]``, ``POST /runners/verify``) and
the job protocol ``gitlab-runner`` speaks (``/jobs/request``, ``PUT /jobs/:id``,
``PATCH /jobs/:id/trace``), plus git's dumb HTTP for the job's repository.

Everything listens on 127.0.0.1; every server a test starts is stopped by that
test (the ``gl`` fixture's context manager).
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import subprocess
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from stoker.ci.gitlab import fake_gitlab
from stoker.ci.gitlab.fake_gitlab import FakeGitLab

pytestmark = pytest.mark.usefixtures("no_threads_left")

OWNER = "glpat-owner"  # create_runner + manage_runner, not an admin
ADMIN = "glpat-admin"
READER = "glpat-reader"  # no runner scopes
API_ONLY = "glpat-api"
GROUP_ID, GROUP = 10, "acme"
PROJECT_ID, PROJECT = 20, "acme/app"
OTHER_ID, OTHER = 21, "acmex/other"  # a path that only *starts* like the group's
ZERO_SHA = "0" * 40


def crc(data: bytes) -> str:
    return f"crc32:{zlib.crc32(data):08x}"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    """A stand-in bare repository: the fake only serves its files."""
    repo = tmp_path / "app.git"
    (repo / "info").mkdir(parents=True)
    (repo / "objects" / "info").mkdir(parents=True)
    (repo / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / "info" / "refs").write_text(f"{'a' * 40}\trefs/heads/main\n")
    (tmp_path / "secret.txt").write_text("outside the repository")
    return repo


@pytest.fixture
def gl(repo_dir: Path) -> Iterator[FakeGitLab]:
    with FakeGitLab() as fake:
        fake.add_token(OWNER, scopes={"create_runner", "manage_runner"})
        fake.add_token(ADMIN, scopes={"create_runner", "manage_runner"}, admin=True)
        fake.add_token(READER, scopes={"read_api"})
        fake.add_token(API_ONLY, scopes={"api"})
        fake.add_group(GROUP_ID, GROUP)
        fake.add_project(PROJECT_ID, PROJECT, repo_dir=repo_dir)
        fake.add_project(OTHER_ID, OTHER)
        yield fake


@pytest.fixture
def api(gl: FakeGitLab) -> Iterator[httpx.Client]:
    """A client of the REST API; never through a proxy of the environment."""
    with httpx.Client(base_url=gl.api_url, trust_env=False, timeout=10) as client:
        yield client


def create(api: httpx.Client, token: str = OWNER, **attrs: Any) -> httpx.Response:
    return api.post("/user/runners", headers={"PRIVATE-TOKEN": token}, json=attrs)


def runner(api: httpx.Client, **attrs: Any) -> tuple[int, str]:
    """A new runner's (id, authentication token); project_type of PROJECT by default."""
    attrs.setdefault("runner_type", "project_type")
    if attrs["runner_type"] == "project_type":
        attrs.setdefault("project_id", PROJECT_ID)
    token = ADMIN if attrs["runner_type"] == "instance_type" else OWNER
    response = create(api, token, **attrs)
    assert response.status_code == 201, response.text
    return response.json()["id"], response.json()["token"]


def take(api: httpx.Client, token: str) -> httpx.Response:
    return api.post("/jobs/request", json={"token": token, "info": {}, "system_id": "s_1"})


def started(gl: FakeGitLab, api: httpx.Client, **job: Any) -> dict[str, Any]:
    """Queue a job of PROJECT, take it with a fresh runner: the job payload."""
    gl.queue_job(PROJECT_ID, ["echo hi"], **job)
    _, token = runner(api)
    response = take(api, token)
    assert response.status_code == 201, response.text
    payload: dict[str, Any] = response.json()
    return payload


def patch(
    api: httpx.Client, job: dict[str, Any], data: bytes, start: int, token: str | None = None
) -> httpx.Response:
    return api.patch(
        f"/jobs/{job['id']}/trace",
        content=data,
        headers={
            "JOB-TOKEN": token or job["token"],
            "Content-Range": f"{start}-{start + len(data) - 1}",
        },
    )


# ---------------------------------------------------------------------- the server


def test_named_a_fake_and_loopback_only() -> None:
    assert "**fake** GitLab" in (fake_gitlab.__doc__ or "")
    for host in ("0.0.0.0", "10.0.0.1", "192.168.1.1", "localhost", "gitlab.example.com", "::"):
        with pytest.raises(ValueError, match="loopback"):
            FakeGitLab(host=host)


def test_serves_on_another_loopback_address_and_stops() -> None:
    with FakeGitLab(host="127.0.0.2") as fake:
        assert urlsplit(fake.url).hostname == "127.0.0.2"
        assert fake.api_url == fake.url + "/api/v4"
        with httpx.Client(trust_env=False) as client:
            assert (
                client.post(fake.api_url + "/jobs/request", json={"token": "x"}).status_code == 403
            )
        port = urlsplit(fake.url).port
    with pytest.raises(OSError), socket.create_connection(("127.0.0.2", port or 0), timeout=1):
        pass


# ---------------------------------------------------------------------- POST /user/runners


def test_create_project_runner(gl: FakeGitLab, api: httpx.Client) -> None:
    response = create(
        api,
        runner_type="project_type",
        project_id=PROJECT_ID,
        tag_list=[" linux ", "kvm"],
        description="stoker",
        paused=False,
        locked=True,
        access_level="ref_protected",
        maximum_timeout=900,
        maintenance_note="made by a test",
    )
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "token", "token_expires_at"}
    assert body["token"].startswith("glrt-") and body["token_expires_at"] is None
    record = gl.runners()[body["id"]]
    assert (record.type, record.project_id, record.group_id) == ("project_type", PROJECT_ID, None)
    assert record.tags == ["linux", "kvm"] and record.run_untagged is False
    assert (record.description, record.locked, record.access_level) == (
        "stoker",
        True,
        "ref_protected",
    )
    assert (record.maximum_timeout, record.maintenance_note) == (900, "made by a test")
    assert record.token == body["token"] and not record.deleted and record.system_ids == {}


def test_tag_list_as_comma_string_form_and_array(gl: FakeGitLab, api: httpx.Client) -> None:
    headers = {"PRIVATE-TOKEN": OWNER}
    form = {"runner_type": "project_type", "project_id": str(PROJECT_ID)}
    by_form = api.post("/user/runners", headers=headers, data={**form, "tag_list": "a, b ,,c"})
    by_json = create(api, runner_type="group_type", group_id=GROUP_ID, tag_list="x,y")
    by_array = api.post(
        "/user/runners", headers=headers, data={**form, "tag_list[]": ["p", "q"], "paused": "true"}
    )
    runners = gl.runners()
    assert runners[by_form.json()["id"]].tags == ["a", "b", "c"]
    assert runners[by_json.json()["id"]].tags == ["x", "y"]
    assert runners[by_array.json()["id"]].tags == ["p", "q"]
    assert runners[by_array.json()["id"]].paused is True


def test_run_untagged_defaults_true_only_without_tags(gl: FakeGitLab, api: httpx.Client) -> None:
    untagged, _ = runner(api)
    tagged, _ = runner(api, tag_list=["linux"])
    both, _ = runner(api, tag_list=["linux"], run_untagged=True)
    runners = gl.runners()
    assert runners[untagged].run_untagged is True
    assert runners[tagged].run_untagged is False
    assert runners[both].run_untagged is True
    # GitLab's model validation: such a runner could never take any job.
    refused = create(api, runner_type="project_type", project_id=PROJECT_ID, run_untagged=False)
    assert refused.status_code == 400


def test_create_authentication_and_scopes(gl: FakeGitLab, api: httpx.Client) -> None:
    attrs = {"runner_type": "project_type", "project_id": PROJECT_ID}
    assert create(api, "glpat-unknown", **attrs).json() == {"message": "401 Unauthorized"}
    assert api.post("/user/runners", json=attrs).status_code == 401
    missing = create(api, READER, **attrs)
    assert missing.status_code == 403 and missing.json()["error"] == "insufficient_scope"
    manage_only = "glpat-manage"
    gl.add_token(manage_only, scopes={"manage_runner"})
    assert create(api, manage_only, **attrs).status_code == 403
    assert create(api, API_ONLY, **attrs).status_code == 201  # ``api`` grants everything


def test_create_runner_types(gl: FakeGitLab, api: httpx.Client) -> None:
    assert create(api).json() == {"error": "runner_type is missing"}
    bad = create(api, runner_type="shared")
    assert bad.status_code == 400
    assert bad.json() == {"error": "runner_type does not have a valid value"}
    assert create(api, runner_type="instance_type").json() == {"message": "403 Forbidden"}
    instance = create(api, ADMIN, runner_type="instance_type")
    assert instance.status_code == 201
    assert gl.runners()[instance.json()["id"]].type == "instance_type"
    assert create(api, runner_type="group_type").status_code == 400
    assert create(api, runner_type="group_type", group_id=99).json() == {
        "message": "404 Group Not Found"
    }
    assert create(api, runner_type="group_type", group_id=GROUP_ID).status_code == 201
    assert create(api, runner_type="project_type").status_code == 400
    assert create(api, runner_type="project_type", project_id=99).json() == {
        "message": "404 Project Not Found"
    }
    assert create(api, runner_type="project_type", project_id="x").status_code == 400


def test_create_validates_attributes(api: httpx.Client) -> None:
    base: dict[str, Any] = {"runner_type": "project_type", "project_id": PROJECT_ID}
    assert create(api, **base, access_level="everyone").status_code == 400
    assert create(api, **base, maximum_timeout=59).status_code == 400
    assert create(api, **base, paused="perhaps").status_code == 400
    assert create(api, **base, maintenance_note="x" * 1025).status_code == 400
    assert create(api, **base, tag_list=[1, 2]).status_code == 400
    bad_json = api.post(
        "/user/runners",
        headers={"PRIVATE-TOKEN": OWNER, "Content-Type": "application/json"},
        content=b"{not json",
    )
    assert bad_json.status_code == 400


# ---------------------------------------------------------------------- delete, verify


def test_delete_runner_by_id(gl: FakeGitLab, api: httpx.Client) -> None:
    runner_id, token = runner(api)
    create_only = "glpat-create"
    gl.add_token(create_only, scopes={"create_runner"})
    assert api.delete(f"/runners/{runner_id}").status_code == 401
    assert (
        api.delete(f"/runners/{runner_id}", headers={"PRIVATE-TOKEN": create_only}).status_code
        == 403
    )
    owner = {"PRIVATE-TOKEN": OWNER}
    assert api.delete("/runners/999999", headers=owner).json() == {
        "message": "404 Runner Not Found"
    }
    assert api.delete(f"/runners/{runner_id}", headers=owner).status_code == 204
    assert api.delete(f"/runners/{runner_id}", headers=owner).status_code == 404
    assert gl.runners()[runner_id].deleted
    assert api.post("/runners/verify", json={"token": token, "system_id": "s_1"}).status_code == 403
    assert take(api, token).status_code == 403
    instance_id, _ = runner(api, runner_type="instance_type")
    assert api.delete(f"/runners/{instance_id}", headers=owner).status_code == 403
    assert (
        api.delete(f"/runners/{instance_id}", headers={"PRIVATE-TOKEN": ADMIN}).status_code == 204
    )


def test_delete_runner_by_token(gl: FakeGitLab, api: httpx.Client) -> None:
    runner_id, token = runner(api)
    assert api.request("DELETE", "/runners", data={"token": "glrt-nope"}).status_code == 403
    assert api.request("DELETE", "/runners", json={}).status_code == 400
    assert api.request("DELETE", "/runners", data={"token": token}).status_code == 204
    assert gl.runners()[runner_id].deleted
    assert api.request("DELETE", "/runners", json={"token": token}).status_code == 403


def test_verify(gl: FakeGitLab, api: httpx.Client) -> None:
    runner_id, token = runner(api)
    response = api.post("/runners/verify", data={"token": token, "system_id": "s_abc"})
    assert response.status_code == 200
    assert response.json() == {"id": runner_id, "token": token, "token_expires_at": None}
    missing = api.post("/runners/verify", json={"token": token})
    assert missing.status_code == 400 and "system_id" in missing.json()["error"]
    assert (
        api.post("/runners/verify", json={"token": "glrt-x", "system_id": "s"}).status_code == 403
    )
    assert api.post("/runners/verify", json={"token": "legacy"}).status_code == 403
    api.post("/runners/verify", json={"token": token, "system_id": "s_def"})
    record = gl.runners()[runner_id]
    assert set(record.system_ids) == {"s_abc", "s_def"} and record.contacted_at is not None


# ---------------------------------------------------------------------- POST /jobs/request


def test_request_job_unknown_token_and_empty_queue(gl: FakeGitLab, api: httpx.Client) -> None:
    assert take(api, "glrt-unknown").status_code == 403
    _, token = runner(api)
    empty = take(api, token)
    assert empty.status_code == 204 and empty.content == b""
    first = empty.headers["X-GitLab-Last-Update"]
    assert take(api, token).headers["X-GitLab-Last-Update"] == first
    gl.queue_job(OTHER_ID, ["true"])  # not this runner's project: still nothing, queue changed
    again = take(api, token)
    assert again.status_code == 204 and again.headers["X-GitLab-Last-Update"] != first


def test_job_payload(gl: FakeGitLab, api: httpx.Client) -> None:
    job_id = gl.queue_job(
        PROJECT_ID,
        ["make", "make test"],
        variables={"MY_VAR": "value"},
        after_script=["echo done"],
        name="build",
        stage="compile",
        timeout=1800,
        sha="b" * 40,
        ref="feature",
    )
    runner_id, token = runner(api, maximum_timeout=1200)
    response = take(api, token)
    assert response.status_code == 201
    job = response.json()
    assert job["id"] == job_id and job["allow_git_fetch"] is True
    assert job["job_info"] == {
        "id": job_id,
        "name": "build",
        "stage": "compile",
        "project_id": PROJECT_ID,
        "project_name": "app",
    }
    git = job["git_info"]
    repo = urlsplit(git["repo_url"])
    assert (repo.username, repo.password) == ("gitlab-ci-token", job["token"])
    assert f"{repo.scheme}://{repo.hostname}:{repo.port}" == gl.url
    assert repo.path == f"/{PROJECT}.git"
    assert (git["ref"], git["sha"], git["before_sha"]) == ("feature", "b" * 40, ZERO_SHA)
    assert (git["ref_type"], git["refspecs"], git["depth"]) == ("branch", [], 20)
    # The runner's maximum_timeout caps the job's.
    assert job["runner_info"] == {"timeout": 1200, "runner_session_url": None}
    variables = {v["key"]: v for v in job["variables"]}
    assert all(set(v) == {"key", "value", "public", "masked", "file"} for v in job["variables"])
    expected = {
        "CI_JOB_ID": str(job_id),
        "CI_PROJECT_ID": str(PROJECT_ID),
        "CI_PROJECT_PATH": PROJECT,
        "CI_PROJECT_NAME": "app",
        "CI_REPOSITORY_URL": git["repo_url"],
        "CI_COMMIT_SHA": "b" * 40,
        "CI_COMMIT_REF_NAME": "feature",
        "CI_SERVER_URL": gl.url,
        "CI_JOB_NAME": "build",
        "CI_JOB_STAGE": "compile",
        "CI": "true",
        "GITLAB_CI": "true",
        "MY_VAR": "value",
    }
    assert {k: variables[k]["value"] for k in expected} == expected
    assert variables["CI_PIPELINE_ID"]["value"].isdigit()
    assert variables["CI_JOB_TOKEN"]["value"] == job["token"]
    assert variables["CI_JOB_TOKEN"]["masked"] and not variables["CI_JOB_TOKEN"]["public"]
    assert job["steps"] == [
        {
            "name": "script",
            "script": ["make", "make test"],
            "timeout": 1200,
            "when": "on_success",
            "allow_failure": False,
        },
        {
            "name": "after_script",
            "script": ["echo done"],
            "timeout": 1200,
            "when": "always",
            "allow_failure": True,
        },
    ]
    assert job["image"] is None and job["features"] == {"trace_sections": True}
    for key in ("services", "artifacts", "cache", "credentials", "dependencies"):
        assert job[key] == []
    record = gl.jobs()[job_id]
    assert (record.state, record.runner_id) == ("running", runner_id)
    assert gl.runners()[runner_id].system_ids.keys() == {"s_1"}


def test_job_handed_out_once(gl: FakeGitLab, api: httpx.Client) -> None:
    gl.queue_job(PROJECT_ID, ["true"])
    _, first = runner(api)
    _, second = runner(api)
    assert take(api, first).status_code == 201
    assert take(api, second).status_code == 204
    assert take(api, first).status_code == 204


def test_job_handed_out_once_under_concurrency(gl: FakeGitLab, api: httpx.Client) -> None:
    job_ids = {gl.queue_job(PROJECT_ID, ["true"]) for _ in range(8)}
    tokens = [runner(api)[1] for _ in range(4)]
    taken: list[int] = []
    lock = threading.Lock()

    def work(token: str) -> None:
        with httpx.Client(base_url=gl.api_url, trust_env=False, timeout=10) as client:
            while (response := take(client, token)).status_code == 201:
                with lock:
                    taken.append(response.json()["id"])

    threads = [threading.Thread(target=work, args=(t,)) for t in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(taken) == sorted(job_ids)


def test_tag_and_scope_matching(gl: FakeGitLab, api: httpx.Client) -> None:
    gl.add_project(30, "acme/sub/lib")
    tagged_job = gl.queue_job(PROJECT_ID, ["true"], tags=["linux", "kvm"])
    untagged_job = gl.queue_job(PROJECT_ID, ["true"])
    other_job = gl.queue_job(OTHER_ID, ["true"], tags=["linux"])
    nested_job = gl.queue_job(30, ["true"], tags=["linux"])

    _, linux_only = runner(api, tag_list=["linux"])
    assert take(api, linux_only).status_code == 204  # kvm missing; untagged not allowed
    _, superset = runner(api, tag_list=["kvm", "linux", "arm"])
    assert take(api, superset).json()["id"] == tagged_job
    _, untagged_runner = runner(api)
    assert take(api, untagged_runner).json()["id"] == untagged_job

    _, group = runner(api, runner_type="group_type", group_id=GROUP_ID, tag_list=["linux"])
    # acmex/other only starts like "acme": not in the group.
    assert take(api, group).json()["id"] == nested_job
    assert take(api, group).status_code == 204
    _, instance = runner(api, runner_type="instance_type", tag_list=["linux"])
    assert take(api, instance).json()["id"] == other_job


def test_paused_runner_gets_nothing(gl: FakeGitLab, api: httpx.Client) -> None:
    gl.queue_job(PROJECT_ID, ["true"])
    _, token = runner(api, paused=True)
    assert take(api, token).status_code == 204


def test_cancel_pending_job(gl: FakeGitLab, api: httpx.Client) -> None:
    job_id = gl.queue_job(PROJECT_ID, ["true"])
    gl.cancel_job(job_id)
    _, token = runner(api)
    assert take(api, token).status_code == 204
    assert gl.jobs()[job_id].state == "canceled"


# ---------------------------------------------------------------------- PUT /jobs/:id


def test_update_job_tokens_and_states(gl: FakeGitLab, api: httpx.Client) -> None:
    job = started(gl, api)
    url = f"/jobs/{job['id']}"
    assert api.put(url, json={"token": "wrong", "state": "running"}).status_code == 403
    assert (
        api.put("/jobs/999999", json={"token": job["token"], "state": "running"}).status_code == 403
    )
    assert api.put(url, json={"token": job["token"], "state": "bogus"}).status_code == 400
    beat = api.put(url, json={"token": job["token"], "state": "running"})
    assert beat.status_code == 200 and beat.headers["Job-Status"] == "running"
    done = api.put(
        url,
        json={
            "token": job["token"],
            "state": "failed",
            "exit_code": 3,
            "failure_reason": "script_failure",
            "checksum": crc(b""),
            "output": {"checksum": crc(b""), "bytesize": 0},
        },
    )
    assert done.status_code == 200 and done.headers["Job-Status"] == "failed"
    record = gl.jobs()[job["id"]]
    assert (record.state, record.exit_code, record.failure_reason) == (
        "failed",
        3,
        "script_failure",
    )
    # A finished job accepts nothing more.
    late = api.put(url, json={"token": job["token"], "state": "success"})
    assert late.status_code == 403 and late.headers["Job-Status"] == "failed"


def test_update_job_checksum(gl: FakeGitLab, api: httpx.Client) -> None:
    job = started(gl, api)
    url = f"/jobs/{job['id']}"
    assert patch(api, job, b"hello\n", 0).status_code == 202
    wrong = api.put(
        url, json={"token": job["token"], "state": "success", "exit_code": 0, "checksum": crc(b"x")}
    )
    assert wrong.status_code == 412 and wrong.json() == {"message": "412 Precondition Failed"}
    assert gl.jobs()[job["id"]].state == "running"
    short = api.put(
        url,
        json={
            "token": job["token"],
            "state": "success",
            "output": {"checksum": crc(b"hello\n"), "bytesize": 3},
        },
    )
    assert short.status_code == 412
    malformed = api.put(url, json={"token": job["token"], "state": "success", "checksum": "md5:1"})
    assert malformed.status_code == 400
    right = api.put(
        url,
        json={
            "token": job["token"],
            "state": "success",
            "exit_code": 0,
            "checksum": crc(b"hello\n"),
            "output": {"checksum": crc(b"hello\n"), "bytesize": 6},
        },
    )
    assert right.status_code == 200
    record = gl.jobs()[job["id"]]
    assert (record.state, record.exit_code, record.failure_reason) == ("success", 0, None)


# ---------------------------------------------------------------------- PATCH /jobs/:id/trace


def test_trace_append(gl: FakeGitLab, api: httpx.Client) -> None:
    job = started(gl, api)
    first = patch(api, job, b"line 1\n", 0)
    assert first.status_code == 202
    assert first.headers["Job-Status"] == "running"
    assert first.headers["Range"] == "0-7"
    assert first.headers["X-GitLab-Trace-Update-Interval"] == "3"
    second = patch(api, job, b"line 2\n", 7)
    assert second.status_code == 202 and second.headers["Range"] == "0-14"
    assert gl.jobs()[job["id"]].trace == b"line 1\nline 2\n"


def test_trace_wrong_offset_is_416_with_stored_range(gl: FakeGitLab, api: httpx.Client) -> None:
    job = started(gl, api)
    patch(api, job, b"abc", 0)
    for start in (0, 2, 10):
        response = patch(api, job, b"zz", start)
        assert response.status_code == 416 and response.headers["Range"] == "0-3"
    assert gl.jobs()[job["id"]].trace == b"abc"


def test_trace_refusals(gl: FakeGitLab, api: httpx.Client) -> None:
    job = started(gl, api)
    trace = f"/jobs/{job['id']}/trace"
    assert patch(api, job, b"x", 0, token="wrong").status_code == 403
    no_range = api.patch(trace, content=b"x", headers={"JOB-TOKEN": job["token"]})
    assert no_range.status_code == 400
    bad = {"JOB-TOKEN": job["token"], "Content-Range": "bytes 0-1/2"}
    assert api.patch(trace, content=b"xy", headers=bad).status_code == 400
    mismatch = {"JOB-TOKEN": job["token"], "Content-Range": "0-9"}
    assert api.patch(trace, content=b"xy", headers=mismatch).status_code == 400
    api.put(f"/jobs/{job['id']}", json={"token": job["token"], "state": "success"})
    assert patch(api, job, b"x", 0).status_code == 403  # no longer running
    assert gl.jobs()[job["id"]].trace == b""


def test_trace_of_canceled_job(gl: FakeGitLab, api: httpx.Client) -> None:
    job = started(gl, api)
    gl.cancel_job(job["id"])
    response = patch(api, job, b"still going\n", 0)
    assert response.status_code == 202 and response.headers["Job-Status"] == "canceled"
    final = api.put(f"/jobs/{job['id']}", json={"token": job["token"], "state": "failed"})
    assert final.status_code == 403 and final.headers["Job-Status"] == "canceled"
    assert gl.jobs()[job["id"]].state == "canceled"


def test_trace_size_bound(repo_dir: Path) -> None:
    with FakeGitLab(max_trace_bytes=10) as gl:
        gl.add_token(OWNER, scopes={"create_runner"})
        gl.add_project(PROJECT_ID, PROJECT, repo_dir=repo_dir)
        with httpx.Client(base_url=gl.api_url, trust_env=False, timeout=10) as api:
            job = started(gl, api)
            assert patch(api, job, b"12345678", 0).status_code == 202
            over = patch(api, job, b"abc", 8)
            assert over.status_code == 403 and "exceeded" in over.json()["message"]
            assert patch(api, job, b"ab", 8).status_code == 202
            assert gl.jobs()[job["id"]].trace == b"12345678ab"


# ---------------------------------------------------------------------- git dumb HTTP


def test_git_requires_a_running_job_token_of_the_project(gl: FakeGitLab, api: httpx.Client) -> None:
    job = started(gl, api)
    with httpx.Client(base_url=gl.url, trust_env=False, timeout=10) as web:
        url = f"/{PROJECT}.git/info/refs"
        anonymous = web.get(url)
        assert anonymous.status_code == 401
        assert anonymous.headers["WWW-Authenticate"] == 'Basic realm="GitLab"'
        assert web.get(url, headers=basic("gitlab-ci-token", "wrong")).status_code == 401
        assert web.get(url, headers=basic("someone", job["token"])).status_code == 401
        assert web.get(url, headers={"Authorization": "Basic !!!"}).status_code == 401
        auth = basic("gitlab-ci-token", job["token"])
        ok = web.get(url, headers=auth)
        assert ok.status_code == 200 and ok.text == f"{'a' * 40}\trefs/heads/main\n"
        assert web.get(f"/{PROJECT}.git/HEAD", headers=auth).text == "ref: refs/heads/main\n"
        assert web.get(f"/{PROJECT}.git/objects/ab/cdef", headers=auth).status_code == 404
        assert web.get(f"/{OTHER}.git/HEAD", headers=auth).status_code == 401
        assert web.get("/nobody/nothing.git/HEAD", headers=auth).status_code == 401
        api.put(f"/jobs/{job['id']}", json={"token": job["token"], "state": "success"})
        assert web.get(url, headers=auth).status_code == 401  # the job is over


def test_git_refuses_traversal(gl: FakeGitLab, api: httpx.Client, repo_dir: Path) -> None:
    job = started(gl, api)
    auth = basic("gitlab-ci-token", job["token"])
    (repo_dir / "objects" / "escape").symlink_to(repo_dir.parent / "secret.txt")
    with httpx.Client(base_url=gl.url, trust_env=False, timeout=10) as web:
        for path in ("%2e%2e/secret.txt", "objects/%2E%2E/%2e%2e/secret.txt", "objects/escape"):
            response = web.get(f"/{PROJECT}.git/{path}", headers=auth)
            assert response.status_code == 404, path
            assert b"outside" not in response.content
    # A literal ``..`` (clients normalise it away, so send the request by hand).
    host, port = urlsplit(gl.url).hostname or "", urlsplit(gl.url).port or 0
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(
            f"GET /{PROJECT}.git/../secret.txt HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {auth['Authorization']}\r\nConnection: close\r\n\r\n".encode()
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 404") and b"outside" not in reply


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_real_git_clones_over_dumb_http(gl: FakeGitLab, api: httpx.Client, tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }

    def git(*args: str, cwd: Path = tmp_path) -> str:
        done = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    work, bare = tmp_path / "work", tmp_path / "served.git"
    git("init", "-q", "-b", "main", str(work))
    (work / "README").write_text("hello\n")
    git("add", "README", cwd=work)
    git("commit", "-q", "-m", "first", cwd=work)
    sha = git("rev-parse", "HEAD", cwd=work).strip()
    git("clone", "-q", "--bare", str(work), str(bare))
    git("update-server-info", cwd=bare)
    gl.add_project(40, "acme/served", repo_dir=bare)
    gl.queue_job(40, ["true"], sha=sha)
    _, token = runner(api, runner_type="project_type", project_id=40)
    job = take(api, token).json()
    git("clone", "-q", job["git_info"]["repo_url"], str(tmp_path / "clone"))
    assert (tmp_path / "clone" / "README").read_text() == "hello\n"
    assert git("rev-parse", "HEAD", cwd=tmp_path / "clone").strip() == sha


# ---------------------------------------------------------------------- faults, log


def test_fail_next_and_request_log(gl: FakeGitLab, api: httpx.Client) -> None:
    _, token = runner(api)
    gl.fail_next("POST", "/api/v4/jobs/request", 502)
    gl.fail_next("*", "/api/v4/runners/verify", 429, count=2, retry_after=7)
    assert take(api, token).status_code == 502
    assert take(api, token).status_code == 204
    for _ in range(2):
        limited = api.post("/runners/verify", json={"token": token, "system_id": "s"})
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
    assert api.post("/runners/verify", json={"token": token, "system_id": "s"}).status_code == 200
    log = gl.requests()
    assert log[0] == ("POST", "/api/v4/user/runners", 201)
    assert log[1:] == [
        ("POST", "/api/v4/jobs/request", 502),
        ("POST", "/api/v4/jobs/request", 204),
        ("POST", "/api/v4/runners/verify", 429),
        ("POST", "/api/v4/runners/verify", 429),
        ("POST", "/api/v4/runners/verify", 200),
    ]
    gl.fail_next("*", "/api/v4/user/", 599)  # any status, even a non-standard one
    odd = create(api, runner_type="project_type", project_id=PROJECT_ID)
    assert odd.status_code == 599 and odd.json() == {"message": "599 Error"}


def test_tokens_are_never_logged_or_shown(gl: FakeGitLab, api: httpx.Client) -> None:
    job = started(gl, api)
    patch(api, job, b"x", 0)
    with httpx.Client(base_url=gl.url, trust_env=False, timeout=10) as web:
        web.get(f"/{PROJECT}.git/HEAD", headers=basic("gitlab-ci-token", job["token"]))
    runner_token = next(iter(gl.runners().values())).token
    shown = repr(gl.requests()) + repr(gl.runners()) + repr(gl.jobs())
    for secret in (job["token"], runner_token, OWNER):
        assert secret not in shown
