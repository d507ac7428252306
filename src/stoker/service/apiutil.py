"""What every router of the REST API shares: error bodies, bearer-token scopes.

Routers outside :mod:`stoker.service.api` (the CI integrations' webhooks and
views) use these, so that every endpoint authenticates and fails the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, Final

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from stoker.errors import StokerError, UsageError
from stoker.service.auth import Principal, Scope, TokenTable
from stoker.service.db import DatabaseError, DatabaseFull
from stoker.service.jobs import Conflict, Forbidden, NotFound, QuotaExceeded, TooLarge

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


def require(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the caller's principal, which must hold ``scope``."""

    async def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        tokens: TokenTable = request.app.state.tokens
        if credentials is None:
            raise ApiError(
                401,
                "missing bearer token (send 'Authorization: Bearer <token>')",
                headers={"WWW-Authenticate": "Bearer"},
            )
        principal = tokens.authenticate(credentials.credentials)
        if principal is None:
            raise ApiError(
                401,
                "invalid bearer token",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if not principal.allows(scope):
            raise ApiError(
                403,
                f"token {principal.name!r} lacks the {scope!r} scope",
                headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
            )
        return principal

    dependency.__name__ = f"require_{scope}"
    return dependency


Submitter = Annotated[Principal, Depends(require("submit"))]
Reader = Annotated[Principal, Depends(require("read"))]
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No bearer token, or an unknown one."},
    403: {"model": ErrorBody, "description": "The token lacks the scope."},
}
