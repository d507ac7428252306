"""The REST API's tokens, authentication and scopes (``stoker.service.auth``, ``apiutil``).

Over the fake-backend service of ``test_api`` (its ``api`` fixture and tokens).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_api import SECRET, TOKENS, Api, api, bearer, validate

from stoker.service import auth
from stoker.service.auth import TokenTable, config_snippet, hash_token, parse_scopes
from stoker.service.config import parse_config_text

__all__ = ["api"]  # the fixture, imported for these tests


# --- tokens ---------------------------------------------------------------------------------------


def test_token_hashing_and_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    assert hash_token("abc") == hashlib.sha256(b"abc").hexdigest()
    table = TokenTable(
        [
            _Entry("ci", hash_token("t-ci"), ("submit", "read")),
            _Entry("boss", hash_token("t-boss").upper(), ("admin",)),
        ]
    )
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    ci = table.authenticate("t-ci")
    assert ci is not None and ci.name == "ci" and ci.allows("submit") and not ci.allows("admin")
    assert len(compared) == 2  # every entry, even after a match
    boss = table.authenticate("t-boss")
    assert boss is not None and all(boss.allows(s) for s in ("submit", "read", "admin"))
    assert table.authenticate("t-nobody") is None and table.authenticate("") is None
    assert parse_scopes("read, submit,read") == ("read", "submit")
    for bad in ("", "write", "read,root"):
        with pytest.raises(ValueError, match="scope"):
            parse_scopes(bad)
    with pytest.raises(ValueError, match="64 hex"):
        TokenTable([_Entry("x", "abc", ("read",))])


def test_token_snippet_is_valid_config(tmp_path: Path) -> None:
    token = auth.new_token()
    assert token.startswith("stk_") and len(token) > 40 and auth.new_token() != token
    snippet = config_snippet("release-bot", ("submit", "read"), token)
    assert token not in snippet and hash_token(token) in snippet
    config = parse_config_text(
        f'state_dir = "{tmp_path}"\n' + snippet, origin=tmp_path / "stoker.toml"
    )
    principal = TokenTable(config.tokens).authenticate(token)
    assert principal is not None and principal.name == "release-bot"
    assert principal.scopes == {"submit", "read"}
    with pytest.raises(ValueError, match="token name"):
        config_snippet('evil"\nname', ("read",), token)


@dataclass(frozen=True)
class _Entry:
    name: str
    sha256: str
    scopes: tuple[str, ...]


# --- authentication and scopes ------------------------------------------------------------------


async def test_health_is_open(api: Api) -> None:
    response = await api.client.get("/health")
    assert response.status_code == 200, response.text
    validate(api.openapi, "HealthView", response.json())
    assert response.json()["status"] == "ok"


async def test_every_other_endpoint_needs_a_valid_token(api: Api) -> None:
    job_id = "0" * 32
    seen = 0
    for path, operations in api.openapi["paths"].items():
        url = path.replace("{job_id}", job_id).replace("{name}", "out/a.txt")
        url = url.replace("{seq}", "1")
        for method, operation in operations.items():
            if path == "/health":
                assert "security" not in operation
                continue
            [requirement] = operation["security"]
            assert list(requirement) == ["bearerToken"] and len(requirement["bearerToken"]) == 1
            for headers, error in (
                ({}, "missing bearer token"),
                ({"Authorization": "Bearer not-a-token"}, "invalid bearer token"),
                ({"Authorization": f"Basic {TOKENS['ci'][0]}"}, "missing bearer token"),
            ):
                response = await api.client.request(method, url, headers=headers)
                assert response.status_code == 401, (method, path, response.text)
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert response.json()["error"].startswith(error)
                seen += 1
    assert seen == 3 * 18  # 14 job, fleet and operations endpoints, whoami, 3 of sessions
    # the document itself is behind a token too; no browser UIs
    response = await api.client.get("/openapi.json")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert (await api.client.get("/openapi.json", headers=bearer("viewer"))).status_code == 200
    for path in ("/docs", "/redoc"):
        assert (await api.client.get(path, headers=bearer("viewer"))).status_code == 404


async def test_scopes(api: Api) -> None:
    spec = {"command": ["true"]}
    response = await api.submit(spec, who="viewer", expect=403)
    assert "lacks the 'submit' scope" in response.json()["error"]
    assert "insufficient_scope" in response.headers["www-authenticate"]
    for path in ("/v1/jobs", "/v1/pools", "/v1/vms", "/v1/hosts", "/metrics"):
        assert (await api.client.get(path, headers=bearer("pusher"))).status_code == 403
        assert (await api.client.get(path, headers=bearer("viewer"))).status_code == 200
        assert (await api.client.get(path, headers=bearer("root"))).status_code == 200
    job = (await api.submit(spec, who="pusher")).json()
    assert job["submitter"] == "pusher"
    assert (
        await api.client.get(f"/v1/jobs/{job['id']}", headers=bearer("pusher"))
    ).status_code == 403
    await api.submit(spec, who="root")


async def test_tokens_and_secrets_are_never_logged(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    spec = {"command": ["sh", "-c", "echo $TOKEN"], "secrets": {"TOKEN": SECRET}}
    job = await api.run(spec)
    await api.client.get("/v1/jobs", headers=bearer("ci"))
    await api.client.get(f"/v1/jobs/{job['id']}/logs", headers=bearer("ci"))
    await api.submit({"command": ["true"], "secrets": {"bad name": SECRET}}, expect=422)
    await api.client.get("/v1/jobs", headers={"Authorization": "Bearer stk_wrong_token"})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "submitted by ci" in text
    for token, _ in TOKENS.values():
        assert token not in text
    assert "stk_wrong_token" not in text and SECRET not in text
