"""Job submissions, their resolution against the configuration, and the state machine."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from stoker.errors import UsageError
from stoker.service.config import ServiceConfig
from stoker.service.jobs import (
    ACTIVE,
    TERMINAL,
    InvalidTransition,
    JobRequest,
    JobState,
    TooLarge,
    can_transition,
    job_env,
    new_job,
    redact,
    resolve,
    transition,
)
from stoker.service.jobviews import JobView


def config(**pools: dict[str, Any]) -> ServiceConfig:
    return ServiceConfig.model_validate(
        {
            "state_dir": "/tmp/stoker-test-state",
            "host": {"cpus": 16, "memory_mb": 65536},
            "submitters": {"priority": 0, "overrides": {"vip": {"priority": 50}}},
            "git": {"allow_protocols": ["https"]},
            "limits": {"max_env_bytes": 1024},
            "pools": pools
            or {
                "small": {"cpus": 1, "memory": 512, "labels": ["linux"], "timeout": 600},
                "large": {"cpus": 4, "memory": 4096, "labels": ["linux", "big"]},
                "py": {"image": "python", "cpus": 2, "memory": 1024},
            },
        }
    )


# ------------------------------------------------------------------ requests


def test_minimal_request_from_json() -> None:
    request = JobRequest.model_validate_json('{"command": ["make", "test"]}')
    assert request.command == ("make", "test") and request.env == {} and request.git is None


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"command": []},
        {"command": [""]},
        {"command": "make test"},
        {"command": ["a\0b"]},
        {"command": ["x"], "cpus": 0},
        {"command": ["x"], "cpus": "2"},
        {"command": ["x"], "memory": "lots"},
        {"command": ["x"], "env": {"1BAD": "x"}},
        {"command": ["x"], "env": {"A": "x\0"}},
        {"command": ["x"], "env": {"A": "1"}, "secrets": {"A": "2"}},
        {"command": ["x"], "artifacts": ["../etc/passwd"]},
        {"command": ["x"], "artifacts": ["/abs"]},
        {"command": ["x"], "labels": ["no spaces"]},
        {"command": ["x"], "git": {"url": "https://h/r.git", "ref": "--upload-pack=evil"}},
        {"command": ["x"], "git": {"url": "no scheme"}},
        {"command": ["x"], "unknown": 1},
        {"command": ["x"], "priority": 10_000},
    ],
)
def test_malformed_requests_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        JobRequest.model_validate(body)


# ------------------------------------------------------------------ resolution


def test_pool_by_image_picks_the_smallest_that_fits() -> None:
    cfg = config()
    assert resolve(JobRequest(command=("x",), image="default"), cfg, "u").pool == "small"
    got = resolve(JobRequest(command=("x",), image="default", cpus=2), cfg, "u")
    assert got.pool == "large" and got.cpus == 4 and got.memory_mb == 4096
    assert resolve(JobRequest(command=("x",), labels=("big",), image="default"), cfg, "u").pool == (
        "large"
    )
    assert resolve(JobRequest(command=("x",), image="python"), cfg, "u").pool == "py"


def test_defaults_timeout_and_priority() -> None:
    got = resolve(JobRequest(command=("x",), pool="small"), config(), "u")
    assert got.timeout_s == 600 and got.priority == 0 and got.image == "default"
    assert resolve(JobRequest(command=("x",), pool="small"), config(), "vip").priority == 50


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (JobRequest(command=("x",), image="nonexistent"), "unknown image 'nonexistent'"),
        (JobRequest(command=("x",), pool="nope"), "unknown pool 'nope'"),
        (JobRequest(command=("x",)), "name an image or a pool"),
        (JobRequest(command=("x",), image="default", cpus=8), "no pool can run this job"),
        (JobRequest(command=("x",), pool="small", memory=1024), "1024 MiB memory (pool has 512)"),
        (JobRequest(command=("x",), pool="small", labels=("big",)), "labels big"),
        (JobRequest(command=("x",), pool="small", image="python"), "runs image 'default'"),
        (JobRequest(command=("x",), pool="small", timeout=601), "above pool 'small'"),
        (JobRequest(command=("x",), pool="small", priority=1), "priority 1 is above"),
        (
            JobRequest(command=("x",), pool="small", git={"url": "file:///etc", "ref": "main"}),
            "scheme 'file' are not allowed",
        ),
    ],
)
def test_requests_the_configuration_cannot_serve(request_: JobRequest, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(request_, config(), "u")


def test_oversized_environment() -> None:
    request = JobRequest(command=("x",), pool="small", secrets={"BIG": "x" * 2000})
    with pytest.raises(TooLarge):
        resolve(request, config(), "u")


def test_single_pool_is_the_default() -> None:
    cfg = config(only={"cpus": 1, "memory": 256})
    assert resolve(JobRequest(command=("x",)), cfg, "u").pool == "only"


# ------------------------------------------------------------------ the state machine


def test_edges() -> None:
    every = list(JobState)
    allowed = {(a, b) for a, b in itertools.product(every, every) if can_transition(a, b)}
    for state in TERMINAL:
        assert not any(a is state for a, _ in allowed), f"{state} must be final"
    for state in ACTIVE:
        assert (state, JobState.QUEUED) in allowed and (state, JobState.CANCELLED) in allowed
        assert (state, JobState.ERRORED) in allowed
    assert (JobState.QUEUED, JobState.RUNNING) not in allowed
    assert (JobState.ASSIGNED, JobState.SUCCEEDED) not in allowed
    assert (JobState.RUNNING, JobState.SUCCEEDED) in allowed
    assert (JobState.QUEUED, JobState.CANCELLED) in allowed


def _job() -> Any:
    request = JobRequest(
        command=("make",),
        pool="small",
        env={"PLAIN": "visible"},
        secrets={"TOKEN": "hunter2-secret"},
        git={"url": "https://user:pa55word@git.example/r.git", "ref": "main"},
    )
    resolved = resolve(request, config(), "alice")
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    return new_job(
        request,
        resolved,
        submitter="alice",
        job_id="j1",
        source_kind="git",
        source_ref=f"{request.git.url}#main" if request.git else None,
        now=t0,
    )


class _Session:
    """Just enough of a Session for transition(): it only adds events."""

    def __init__(self) -> None:
        self.added: list[Any] = []

    def add(self, obj: Any) -> None:
        self.added.append(obj)


def test_transitions_are_timestamped_and_recorded() -> None:
    job, first = _job()
    session = _Session()
    t = first.at
    steps = [
        (JobState.ASSIGNED, "h1"),
        (JobState.BOOTING, "h1"),
        (JobState.RUNNING, "h1"),
        (JobState.QUEUED, None),
        (JobState.ASSIGNED, "h2"),
        (JobState.BOOTING, "h2"),
        (JobState.RUNNING, "h2"),
        (JobState.SUCCEEDED, "h2"),
    ]
    for state, host in steps:
        t += timedelta(seconds=1)
        transition(session, job, state, host=host, now=t, reason=f"to {state}")  # type: ignore[arg-type]
    events = session.added
    assert [e.seq for e in events] == list(range(2, 10)) and job.event_seq == 9
    assert [e.to_state for e in events] == [s.value for s, _ in steps]
    assert all(b.at > a.at for a, b in itertools.pairwise(events))
    assert job.attempt == 1 and job.host == "h2" and job.lease_until is None
    assert job.started_at == events[-2].at and job.finished_at == events[-1].at
    assert job.queued_at == events[3].at
    with pytest.raises(InvalidTransition):
        transition(session, job, JobState.RUNNING)  # type: ignore[arg-type]


def test_views_never_show_secrets() -> None:
    job, event = _job()
    view = JobView.of(job, [event])
    text = view.model_dump_json()
    assert "hunter2" not in text and "pa55word" not in text
    assert view.env == {"PLAIN": "visible"} and view.secret_keys == ("TOKEN",)
    assert view.source.url == "https://user:***@git.example/r.git" and view.source.ref == "main"
    assert job_env(job)["TOKEN"] == "hunter2-secret" and job_env(job)["STOKER_JOB_ATTEMPT"] == "0"
    assert redact("token=hunter2-secret!", ["hunter2-secret", "x"]) == "token=***!"
