"""The [github] configuration and webhook verification (no network, no database)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stoker.ci.github.config import GitHubConfig, read_secret_file
from stoker.ci.github.webhook import MAX_BODY, WebhookRejected, parse_delivery, signature, verify
from stoker.errors import UsageError
from stoker.service.config import parse_config_text

SECRET = b"It's a Secret to Everybody"

BASE = """
state_dir = "state"
[pools.linux]
max = 3
[pools.big]
cpus = 2
memory = "2G"
[github]
app_id = 42
private_key_file = "app.pem"
webhook_secret_file = "hook"
[[github.targets]]
repository = "acme/app"
[[github.targets]]
organization = "acme-org"
runner_group = "builders"
[github.pools.linux]
labels = ["self-hosted", "Linux"]
[github.pools.big]
labels = ["self-hosted", "linux", "big"]
"""


def config(text: str = BASE) -> GitHubConfig:
    parsed = parse_config_text(text, origin=Path("/etc/stoker/stoker.toml"))
    assert parsed.github is not None
    return parsed.github


def test_a_full_table_parses_with_paths_relative_to_the_file() -> None:
    cfg = config()
    assert cfg.private_key_file == Path("/etc/stoker/app.pem")
    assert cfg.uses_app and cfg.issuer == "42"
    assert [t.scope for t in cfg.targets] == ["repos/acme/app", "orgs/acme-org"]
    assert cfg.targets[1].runner_group == "builders"


@pytest.mark.parametrize(
    ("labels", "pool"),
    [
        (["self-hosted"], "linux"),
        (["SELF-HOSTED", "linux"], "linux"),  # case-insensitive
        (["self-hosted", "linux", "big"], "big"),
        (["self-hosted", "gpu"], None),
        (["ubuntu-latest"], None),
    ],
)
def test_the_most_specific_pool_covering_a_jobs_labels_serves_it(
    labels: list[str], pool: str | None
) -> None:
    assert config().pool_for(labels) == pool


def test_overlapping_pools_are_reported() -> None:
    assert config().overlapping_pools() == [("big", "linux")]


def test_targets_cover_their_repositories_only() -> None:
    cfg = config()
    assert cfg.target_for("acme/app") is cfg.targets[0]
    assert cfg.target_for("ACME-ORG/anything") is cfg.targets[1]
    assert cfg.target_for("someone/else") is None


def test_the_controller_label_differs_per_installation() -> None:
    cfg = config()
    a, b = cfg.controller_label("db-a"), cfg.controller_label("db-b")
    assert a != b and a.startswith("stoker-") and a == cfg.controller_label("db-a")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("app_id = 42\n", ""), "no credentials"),
        (("app_id = 42\n", 'app_id = 42\ntoken_file = "t"\n'), "not both"),
        (('private_key_file = "app.pem"\n', ""), "needs private_key_file"),
        (('repository = "acme/app"', 'repository = "acme"'), "expected OWNER/REPOSITORY"),
        (('repository = "acme/app"', 'repository = "acme/app"\norganization = "x"'), "exactly one"),
        (("[github.pools.big]", "[github.pools.huge]"), "not a [pools.NAME]"),
        (('labels = ["self-hosted", "Linux"]', "labels = []"), "github.pools.linux.labels"),
        (('webhook_secret_file = "hook"', 'webhook_secret = "x"'), "unknown key 'webhook_secret'"),
    ],
)
def test_bad_settings_are_named(change: tuple[str, str], message: str) -> None:
    text = BASE.replace(*change)
    assert text != BASE
    with pytest.raises(UsageError) as info:
        config(text)
    assert message in str(info.value)


def test_secret_files_are_bounded_and_must_not_be_empty(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        read_secret_file(empty, "webhook secret")
    big = tmp_path / "big"
    big.write_bytes(b"x" * 70_000)
    with pytest.raises(ValueError, match="larger than"):
        read_secret_file(big, "webhook secret")
    with pytest.raises(ValueError, match="cannot read"):
        read_secret_file(tmp_path / "missing", "webhook secret")
    ok = tmp_path / "ok"
    ok.write_text("secret\n")
    assert read_secret_file(ok, "webhook secret") == b"secret"


# --- webhooks -----------------------------------------------------------------------------------


def test_signature_matches_githubs_documented_example() -> None:
    # The example from GitHub's "Validating webhook deliveries" page.
    assert signature(SECRET, b"Hello, World!") == (
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    )


def job_event(**job: Any) -> dict[str, Any]:
    workflow_job = {
        "id": 7,
        "run_id": 3,
        "status": "queued",
        "conclusion": None,
        "labels": ["self-hosted", "linux"],
        "runner_id": None,
        "runner_name": None,
        "created_at": "2026-12-05T10:00:00Z",
        "started_at": None,
        "completed_at": None,
        "name": "build",
        **job,
    }
    return {
        "action": workflow_job["status"],
        "workflow_job": workflow_job,
        "repository": {"full_name": "acme/app", "owner": {"login": "acme"}},
        "installation": {"id": 9},
    }


def deliver(body: bytes, *, event: str = "workflow_job", sign: str | None = None) -> Any:
    headers = {
        "x-github-event": event,
        "x-github-delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "x-hub-signature-256": signature(SECRET, body) if sign is None else sign,
    }
    return parse_delivery(SECRET, body, headers)


def test_a_signed_workflow_job_is_parsed() -> None:
    delivery = deliver(json.dumps(job_event()).encode())
    assert delivery.event == "workflow_job"
    assert delivery.job is not None
    assert delivery.job.workflow_job.id == 7
    assert delivery.job.repository.full_name == "acme/app"


def test_ping_is_accepted() -> None:
    assert deliver(b'{"zen": "Keep it logically awesome."}', event="ping").event == "ping"


@pytest.mark.parametrize(
    ("body", "kwargs", "status", "message"),
    [
        (b"{}", {"sign": ""}, 401, "missing"),
        (b"{}", {"sign": "sha256=" + "0" * 64}, 401, "does not match"),
        (b"{}", {"sign": "sha1=abc"}, 401, "does not match"),
        (b"{}", {"event": "push"}, 400, "not handled"),
        (b"not json", {}, 400, "not JSON"),
        (b"[1]", {}, 400, "not a JSON object"),
        (json.dumps({"action": "queued"}).encode(), {}, 400, "workflow_job"),
        (
            json.dumps(job_event(id="x")).encode(),
            {},
            400,
            "malformed workflow_job payload: workflow_job.id",
        ),
        (
            json.dumps(job_event(labels=["x"] * 101)).encode(),
            {},
            400,
            "workflow_job.labels",
        ),
    ],
)
def test_bad_deliveries_are_refused_with_the_right_status(
    body: bytes, kwargs: dict[str, str], status: int, message: str
) -> None:
    with pytest.raises(WebhookRejected) as info:
        deliver(body, **kwargs)
    assert info.value.status == status
    assert message in info.value.message


def test_the_signature_is_checked_before_the_body_is_read() -> None:
    # A forged delivery with an unparseable body is a 401, not a 400: nothing was parsed.
    with pytest.raises(WebhookRejected) as info:
        deliver(b"\xff\xfe not json", sign="sha256=" + "1" * 64)
    assert info.value.status == 401


def test_oversized_bodies_are_refused_unread() -> None:
    with pytest.raises(WebhookRejected) as info:
        verify(SECRET, b"{}", signature(SECRET, b"{}"))  # fine
        deliver(b" " * (MAX_BODY + 1))
    assert info.value.status == 413
