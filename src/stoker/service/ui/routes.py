"""The dashboard's routes: the sign-in form, the page's shell and its static files.

Everything the page shows it fetches from the REST API with the sign-in
cookie; these routes only authenticate the token once (to refuse a wrong one
on the form rather than on the first API call) and serve files.  Every
response carries a strict Content-Security-Policy: scripts and styles come
only from ``/ui/static`` and no inline script runs, so job output that
reaches the page as markup could not execute even if it escaped its text
node.
"""

from __future__ import annotations

import hashlib
import html
from importlib import resources
from typing import Annotated, Final

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

import stoker
from stoker.service.apiutil import CSRF_HEADER, SESSION_COOKIE
from stoker.service.auth import Principal, TokenTable

__all__ = ["COOKIE_MAX_AGE_S", "router"]

#: A sign-in lasts this long (the cookie's Max-Age); the token itself does not expire.
COOKIE_MAX_AGE_S: Final = 12 * 3600
#: The longest token the form accepts (ours are 47 characters).
MAX_TOKEN_CHARS: Final = 512

_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HEADERS: Final = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
_TYPES: Final = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}


def _load_static() -> dict[str, tuple[bytes, str, str]]:
    """``name -> (content, media type, etag)`` of every file the page may load, read once.

    A fixed table, not a directory lookup: no request path ever reaches the
    file system.
    """
    files: dict[str, tuple[bytes, str, str]] = {}
    for entry in resources.files("stoker.service.ui").joinpath("static").iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in _TYPES:
            data = entry.read_bytes()
            etag = '"' + hashlib.sha256(data).hexdigest()[:32] + '"'
            files[entry.name] = (data, _TYPES[suffix], etag)
    return files


_STATIC: Final = _load_static()

router = APIRouter(prefix="/ui", include_in_schema=False)


def _principal(request: Request) -> Principal | None:
    token = request.cookies.get(SESSION_COOKIE)
    if token is None:
        return None
    tokens: TokenTable = request.app.state.tokens
    return tokens.authenticate(token)


def _page(title: str, body: str, *, status: int = 200) -> HTMLResponse:
    return HTMLResponse(
        f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>{html.escape(title)} · stoker</title>
<link rel="stylesheet" href="/ui/static/style.css">
<link rel="icon" href="/ui/static/icon.svg" type="image/svg+xml">
</head>
{body}
</html>
""",
        status_code=status,
        headers=_HEADERS,
    )


def _sign_in_page(error: str | None = None, *, status: int = 200) -> HTMLResponse:
    alert = (
        f'<p class="alert" role="alert" id="sign-in-error">{html.escape(error)}</p>'
        if error
        else ""
    )
    described = ' aria-describedby="sign-in-error"' if error else ""
    return _page(
        "Sign in",
        f"""<body class="sign-in">
<main>
<h1><img src="/ui/static/icon.svg" alt="" width="28" height="28"> stoker</h1>
<form method="post" action="/ui/login" class="card">
<h2>Sign in</h2>
{alert}
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="current-password"
 required maxlength="{MAX_TOKEN_CHARS}" autofocus{described}>
<p class="hint">A token made by <code>stoker token new</code>. A <em>read</em> token
can look; <em>submit</em> or <em>admin</em> can also cancel jobs.</p>
<button type="submit">Sign in</button>
</form>
</main>
<script type="module" src="/ui/static/login.js"></script>
</body>""",
        status=status,
    )


@router.get("")
async def ui_root() -> RedirectResponse:
    """``/ui`` -> ``/ui/`` (the page's relative links start there)."""
    return RedirectResponse("/ui/", status_code=308)


@router.get("/")
async def shell(request: Request) -> Response:
    """The page: signed in, its shell (the modules fill it in); else the sign-in form."""
    principal = _principal(request)
    if principal is None:
        return RedirectResponse("/ui/login", status_code=303, headers=_HEADERS)
    version = html.escape(stoker.__version__)
    return _page(
        "Dashboard",
        f"""<body>
<a class="skip" href="#main">Skip to content</a>
<header class="top">
<a class="brand" href="#/"><img src="/ui/static/icon.svg" alt="" width="22" height="22">
stoker</a>
<nav aria-label="Sections"><ul>
<li><a href="#/" data-section="overview">Overview</a></li>
<li><a href="#/jobs" data-section="jobs">Jobs</a></li>
<li><a href="#/vms" data-section="vms">VMs</a></li>
</ul></nav>
<div class="who">
<span id="who" data-csrf-header="{CSRF_HEADER}">{html.escape(principal.name)}</span>
<form method="post" action="/ui/logout"><button type="submit" class="link">Sign out</button></form>
</div>
</header>
<div id="banner" role="status" aria-live="polite" hidden></div>
<main id="main" tabindex="-1"><p class="muted">Loading…</p></main>
<footer class="muted">stoker {version}</footer>
<noscript><p class="alert">The dashboard needs JavaScript; the REST API and
<code>stoker</code> CLI show the same.</p></noscript>
<script type="module" src="/ui/static/app.js"></script>
</body>""",
    )


@router.get("/login")
async def sign_in_form(request: Request) -> Response:
    """The sign-in form (or the page, when already signed in)."""
    if _principal(request) is not None:
        return RedirectResponse("/ui/", status_code=303, headers=_HEADERS)
    return _sign_in_page()


def _same_origin(request: Request) -> bool:
    """Whether a form post comes from this site's own page.

    Browsers say so in ``Sec-Fetch-Site``; older ones only in ``Origin``.  A
    client that sends neither is not a browser a cross-site form could drive.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return origin.split("://", 1)[-1] == request.headers.get("host", "")


@router.post("/login")
async def sign_in(
    request: Request, token: Annotated[str, Form(max_length=MAX_TOKEN_CHARS)] = ""
) -> Response:
    """Check the token; a valid one is set as the HTTP-only, same-site cookie."""
    if not _same_origin(request):
        return _sign_in_page("This form must be sent from the dashboard's own page.", status=403)
    tokens: TokenTable = request.app.state.tokens
    principal = tokens.authenticate(token.strip()) if token.strip() else None
    if principal is None:
        return _sign_in_page("That token is not valid here.", status=401)
    if not principal.allows("read"):
        return _sign_in_page(
            f"Token {principal.name!r} lacks the 'read' scope the dashboard needs.", status=403
        )
    response = RedirectResponse("/ui/", status_code=303, headers=_HEADERS)
    response.set_cookie(
        SESSION_COOKIE,
        token.strip(),
        max_age=COOKIE_MAX_AGE_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def sign_out(request: Request) -> Response:
    """Forget the cookie (the token stays valid for the API)."""
    response = RedirectResponse("/ui/login", status_code=303, headers=_HEADERS)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/static/{name}")
async def static(request: Request, name: str) -> Response:
    """One of the page's files (a fixed set, read at import)."""
    found = _STATIC.get(name)
    if found is None:
        return Response("not found\n", status_code=404, media_type="text/plain")
    data, media_type, etag = found
    headers = {**_HEADERS, "ETag": etag, "Cache-Control": "no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)
