"""The dashboard's server side: sign-in, the cookie as a credential, its files and headers.

In process (httpx's ASGITransport) over the fake-backend service; what the
page does with them is tested in a real browser (``test_dashboard.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from test_api import POOLS, TOKENS, ConfigFactory, ServiceFactory, bearer, token_config

from stoker.service.api import create_app
from stoker.service.apiutil import CSRF_HEADER, SESSION_COOKIE
from stoker.service.ui import routes


@pytest.fixture
async def client(
    make_config: ConfigFactory, fake_service: ServiceFactory
) -> AsyncIterator[httpx.AsyncClient]:
    config = make_config(tokens=token_config(), pools=POOLS)
    service = await fake_service(config)
    transport = httpx.ASGITransport(app=create_app(service, config))
    async with httpx.AsyncClient(transport=transport, base_url="http://stoker.test") as client:
        yield client


def signed_in(who: str) -> dict[str, str]:
    return {"Cookie": f"{SESSION_COOKIE}={TOKENS[who][0]}"}


async def sign_in(client: httpx.AsyncClient, token: str, **headers: str) -> httpx.Response:
    return await client.post(
        "/ui/login", data={"token": token}, headers={"Sec-Fetch-Site": "same-origin", **headers}
    )


async def test_sign_in_sets_an_http_only_same_site_cookie(client: httpx.AsyncClient) -> None:
    response = await sign_in(client, TOKENS["viewer"][0])
    assert response.status_code == 303 and response.headers["location"] == "/ui/"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}={TOKENS['viewer'][0]};")
    attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "samesite=strict", "path=/"} <= attributes
    assert f"max-age={routes.COOKIE_MAX_AGE_S}" in attributes
    assert "secure" not in attributes  # plain http here; https sets it
    client.cookies.clear()
    page = await client.get("/ui/", headers=signed_in("viewer"))
    assert page.status_code == 200 and 'src="/ui/static/app.js"' in page.text
    assert ">viewer<" in page.text


@pytest.mark.parametrize(
    ("token", "headers", "status", "message"),
    [
        ("stk_not_a_token", {}, 401, "That token is not valid here."),
        ("", {}, 401, "That token is not valid here."),
        (TOKENS["pusher"][0], {}, 403, "lacks the &#x27;read&#x27; scope"),
        (TOKENS["viewer"][0], {"Sec-Fetch-Site": "cross-site"}, 403, "dashboard&#x27;s own page"),
    ],
)
async def test_sign_in_refuses(
    client: httpx.AsyncClient, token: str, headers: dict[str, str], status: int, message: str
) -> None:
    response = await sign_in(client, token, **headers)
    assert response.status_code == status
    assert message in response.text and 'role="alert"' in response.text
    assert "set-cookie" not in response.headers
    assert token not in response.text or not token


async def test_cross_site_form_by_origin(client: httpx.AsyncClient) -> None:
    # A browser without Sec-Fetch-Site still sends Origin on a POST.
    response = await client.post(
        "/ui/login", data={"token": TOKENS["viewer"][0]}, headers={"Origin": "https://evil.test"}
    )
    assert response.status_code == 403 and "set-cookie" not in response.headers
    response = await client.post(
        "/ui/login", data={"token": TOKENS["viewer"][0]}, headers={"Origin": "http://stoker.test"}
    )
    assert response.status_code == 303


async def test_the_cookie_is_a_credential_with_the_tokens_scopes(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/v1/jobs", headers=signed_in("viewer"))).status_code == 200
    me = await client.get("/v1/whoami", headers=signed_in("viewer"))
    assert me.json() == {"name": "viewer", "scopes": ["read"]}
    bad = await client.get("/v1/jobs", headers={"Cookie": f"{SESSION_COOKIE}=stk_nope"})
    assert bad.status_code == 401 and "invalid bearer token" in bad.json()["error"]
    # A bearer header wins over the cookie.
    both = {**signed_in("viewer"), **bearer("root")}
    assert (await client.get("/v1/whoami", headers=both)).json()["name"] == "root"


async def test_changes_by_cookie_need_the_csrf_header(client: httpx.AsyncClient) -> None:
    submitted = await client.post(
        "/v1/jobs",
        files={"spec": (None, '{"command": ["sleep", "30"]}', "application/json")},
        headers=bearer("ci"),
    )
    job = submitted.json()["id"]
    # A read token may not cancel, with or without the header.
    for extra in ({}, {CSRF_HEADER: "1"}):
        refused = await client.post(
            f"/v1/jobs/{job}/cancel", headers={**signed_in("viewer"), **extra}
        )
        assert refused.status_code == 403
    # The submitter's cookie without the header: refused, the job untouched.
    refused = await client.post(f"/v1/jobs/{job}/cancel", headers=signed_in("ci"))
    assert refused.status_code == 403 and CSRF_HEADER in refused.json()["error"]
    state = (await client.get(f"/v1/jobs/{job}", headers=bearer("ci"))).json()["state"]
    assert state not in ("cancelled",)
    done = await client.post(
        f"/v1/jobs/{job}/cancel", headers={**signed_in("ci"), CSRF_HEADER: "1"}
    )
    assert done.status_code == 200 and done.json()["cancel_requested"]


async def test_pages_need_a_signed_in_cookie(client: httpx.AsyncClient) -> None:
    assert (await client.get("/ui")).headers["location"] == "/ui/"
    for cookie in ({}, {"Cookie": f"{SESSION_COOKIE}=stk_nope"}):
        response = await client.get("/ui/", headers=cookie)
        assert response.status_code == 303 and response.headers["location"] == "/ui/login"
    form = await client.get("/ui/login")
    assert form.status_code == 200 and 'name="token"' in form.text
    assert 'for="token"' in form.text  # the field is labelled
    again = await client.get("/ui/login", headers=signed_in("viewer"))
    assert again.status_code == 303 and again.headers["location"] == "/ui/"
    out = await client.post("/ui/logout", headers=signed_in("viewer"))
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    assert out.headers["set-cookie"].startswith(f'{SESSION_COOKIE}="";')


async def test_every_page_forbids_inline_scripts_and_framing(client: httpx.AsyncClient) -> None:
    for path in ("/ui/login", "/ui/static/app.js"):
        response = await client.get(path)
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
    page = await client.get("/ui/", headers=signed_in("viewer"))
    assert page.headers["cache-control"] == "no-store"
    assert "<script>" not in page.text  # only the module, from /ui/static


async def test_static_files_are_a_fixed_set(client: httpx.AsyncClient) -> None:
    script = await client.get("/ui/static/app.js")
    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    etag = script.headers["etag"]
    again = await client.get("/ui/static/app.js", headers={"If-None-Match": etag})
    assert again.status_code == 304 and not again.content
    css = await client.get("/ui/static/style.css")
    assert css.headers["content-type"].startswith("text/css")
    for path in (
        "/ui/static/missing.js",
        "/ui/static/..%2Froutes.py",
        "/ui/static/%2e%2e%2f__init__.py",
        "/ui/static/routes.py",
    ):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert b"import" not in response.content
