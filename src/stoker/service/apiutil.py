"""What every router of the REST API shares: error bodies, bearer-token scopes.

Routers outside :mod:`stoker.service.api` (the CI integrations' webhooks and
views) use these, so that every endpoint authenticates and fails the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Annotated, Any, Final

import fastapi.routing
from fastapi import Depends, Request, Security
from fastapi.dependencies.models import Dependant
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.routing import BaseRoute

from stoker.errors import StokerError, UsageError
from stoker.service.auth import Principal, Scope, TokenTable
from stoker.service.db import DatabaseError, DatabaseFull
from stoker.service.jobs import Conflict, Forbidden, NotFound, QuotaExceeded, TooLarge

#: The dashboard's sign-in cookie: the token itself, HTTP-only and SameSite=Strict.
SESSION_COOKIE: Final = "stoker_session"
#: Requests that change something and are signed in by the cookie must carry this header.
CSRF_HEADER: Final = "X-Stoker-CSRF"
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearerToken",
    description="A token made by `stoker token new`; the service stores only its SHA-256.",
)


# --- response models ----------------------------------------------------------------------------


class ErrorBody(BaseModel):
    """Every error response: a one-line message and optional details."""

    error: str = Field(description="What went wrong, in one line.")
    detail: Any = Field(
        default=None,
        description="Details: the validation problems, or a hint with the known names.",
    )


class ApiError(Exception):
    """An error response (raised inside handlers, rendered by :func:`_api_error`)."""

    def __init__(
        self,
        status: int,
        message: str,
        detail: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail
        self.headers = headers


#: Seconds a client is asked to wait before retrying a request the database could not serve.
RETRY_AFTER_S: Final = 5
_STATUS_OF: Final[tuple[tuple[type[StokerError], int], ...]] = (
    (NotFound, 404),
    (Forbidden, 403),
    (Conflict, 409),
    (TooLarge, 413),
    (QuotaExceeded, 429),
    (DatabaseFull, 507),
    (UsageError, 400),
)


def from_stoker(exc: StokerError) -> ApiError:
    """The HTTP error for a service exception (infrastructure errors are 503)."""
    status = next((code for kind, code in _STATUS_OF if isinstance(exc, kind)), 503)
    detail = {"hint": exc.hint} if exc.hint else None
    # The database is away or full: worth trying again later, not at once.
    headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, DatabaseError) else None
    return ApiError(status, str(exc), detail, headers=headers)


def error_response(exc: ApiError) -> JSONResponse:
    body = ErrorBody(error=exc.message, detail=exc.detail)
    return JSONResponse(body.model_dump(mode="json"), status_code=exc.status, headers=exc.headers)


class ScopeCheck:
    """A dependency: the caller's principal, which must hold :attr:`scope`.

    A class rather than a closure so that the scope an operation requires can
    be read back from the app's routes (:func:`route_scopes`), e.g. by the
    tests that call every operation with too weak a token.
    """

    def __init__(self, scope: Scope) -> None:
        self.scope: Final[Scope] = scope

    def __repr__(self) -> str:
        return f"ScopeCheck({self.scope!r})"

    async def __call__(
        self,
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        tokens: TokenTable = request.app.state.tokens
        # A bearer token wins; without one, the dashboard's sign-in cookie (same site only,
        # HTTP-only) carries the same token.
        token = credentials.credentials if credentials is not None else None
        by_cookie = token is None and SESSION_COOKIE in request.cookies
        if by_cookie:
            token = request.cookies[SESSION_COOKIE]
        if token is None:
            raise ApiError(
                401,
                "missing bearer token (send 'Authorization: Bearer <token>')",
                headers={"WWW-Authenticate": "Bearer"},
            )
        principal = tokens.authenticate(token)
        if principal is None:
            raise ApiError(
                401,
                "invalid bearer token" if not by_cookie else "invalid bearer token (signed out)",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if by_cookie and request.method not in SAFE_METHODS and CSRF_HEADER not in request.headers:
            # SameSite=Strict already keeps the cookie off other sites' requests; a header
            # no form can send (and no other origin may without CORS) makes sure of it.
            raise ApiError(
                403,
                f"a change made with the dashboard's cookie needs the {CSRF_HEADER} header",
            )
        if not principal.allows(self.scope):
            raise ApiError(
                403,
                f"token {principal.name!r} lacks the {self.scope!r} scope",
                headers={
                    "WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{self.scope}"'
                },
            )
        return principal


def require(scope: Scope) -> ScopeCheck:
    """A dependency: the caller's principal, which must hold ``scope``."""
    return ScopeCheck(scope)


def api_routes(routes: Iterable[BaseRoute]) -> Iterator[Any]:
    """Every API route under ``routes`` (the app's), with the path and dependencies it has
    once included: its prefix, and the dependencies of the routers that include it."""
    # FastAPI 0.16x keeps included routers as lazy entries and lists their effective routes
    # through iter_route_contexts; before it, included routes were copied into app.routes.
    contexts: Callable[[Sequence[BaseRoute]], Iterator[Any]] | None = getattr(
        fastapi.routing, "iter_route_contexts", None
    )
    for route in contexts(list(routes)) if contexts is not None else routes:
        if isinstance(getattr(route, "original_route", route), APIRoute):
            yield route


def route_scopes(routes: Iterable[BaseRoute]) -> dict[tuple[str, str], frozenset[Scope]]:
    """``(METHOD, path) -> the scopes its dependencies require`` for every API route.

    An empty set: the operation checks no token (only ``GET /health`` should).
    """
    found: dict[tuple[str, str], frozenset[Scope]] = {}
    for route in api_routes(routes):
        scopes: set[Scope] = set()
        pending: list[Dependant] = [route.dependant]
        while pending:
            dependant = pending.pop()
            if isinstance(dependant.call, ScopeCheck):
                scopes.add(dependant.call.scope)
            pending.extend(dependant.dependencies)
        for method in route.methods:
            found[(method, route.path_format)] = frozenset(scopes)
    return found


# The scope is given to Security too, so that the OpenAPI document names it in each
# operation's security requirement ({"bearerToken": ["submit"]}).
Submitter = Annotated[Principal, Security(require("submit"), scopes=["submit"])]
Reader = Annotated[Principal, Security(require("read"), scopes=["read"])]
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No bearer token, or an unknown one."},
    403: {"model": ErrorBody, "description": "The token lacks the scope."},
}


def event_stream_schema(events: Mapping[str, str]) -> dict[str, Any]:
    """The schema of one server-sent event of a stream: ``event name -> data's schema``.

    (Before OpenAPI 3.2 the ``schema`` of ``text/event-stream`` describes each
    event.)  ``data`` is JSON text, described by ``contentSchema``; ``id``
    is the log seq where the stream sends one.
    """
    return {
        "oneOf": [
            {
                "type": "object",
                "required": ["event", "data"],
                "properties": {
                    "event": {"const": name},
                    "id": {"type": "string", "pattern": "^[0-9]+$"},
                    "data": {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"$ref": f"#/components/schemas/{schema}"},
                    },
                },
            }
            for name, schema in events.items()
        ]
    }
