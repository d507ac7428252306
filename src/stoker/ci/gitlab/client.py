"""GitLab's REST API, the part runner management needs (httpx).

* ``POST /user/runners``: create a runner (``create_runner`` scope; instance,
  group or project type) and get its ``glrt-`` token, shown only once;
* ``POST /runners/verify``: is a runner token still valid;
* ``DELETE /runners/:id``: delete a runner (``manage_runner`` scope);
* ``GET /runners/:id``: a runner's type (used to refuse instance-wide tokens).

The access token goes in the ``PRIVATE-TOKEN`` header only; runner tokens go
in request bodies only; neither ever appears in an error or a log line (what
GitLab says is scrubbed of both before it is quoted).  Answers are bounded
(1 MiB) and validated.

Refusals are typed, each a :class:`~stoker.errors.UsageError` naming what to
fix: :class:`GitLabAuthError` (401), :class:`GitLabForbidden` (403, with the
missing scope or role), :class:`GitLabNotFound` (404), :class:`GitLabRejected`
(400 and other refusals of the request itself).  GitLab being down, slow or
incoherent is :class:`GitLabUnavailable`, an
:class:`~stoker.errors.InfrastructureError`.

Server errors, 429 and transport failures are retried with exponential backoff
and jitter (``Retry-After`` is honoured) where that is safe; see
:meth:`GitLabClient._request` for why creating a runner is retried less.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stoker.errors import InfrastructureError, UsageError

#: Largest answer read from GitLab (runner answers are a few hundred bytes).
MAX_BODY: Final = 1 << 20
#: Longest ``Retry-After`` honoured; a longer one fails at once instead of hanging a pass.
MAX_RETRY_AFTER: Final = 120.0
#: Longest wait between two attempts without ``Retry-After``.
MAX_BACKOFF: Final = 30.0
#: Longest quote of GitLab's own error text in our messages.
MAX_QUOTE: Final = 300

RunnerType = Literal["instance_type", "group_type", "project_type"]
M = TypeVar("M", bound=BaseModel)

#: Transport failures raised before any byte of the request left: retrying cannot duplicate.
_NOT_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
#: Answers of a proxy in front of GitLab (or GitLab shedding load) that did not run the request.
_GATEWAY: Final = frozenset({429, 502, 503, 504})


class GitLabError(UsageError):
    """GitLab refused a request (a problem of the token, the configuration or the target).

    ``status`` is GitLab's HTTP status.
    """

    def __init__(self, message: str, status: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class GitLabAuthError(GitLabError):
    """GitLab did not accept the access token at all (401: wrong, expired or revoked)."""


class GitLabForbidden(GitLabError):
    """The token is valid but lacks a scope or role (403); the message names which."""


class GitLabNotFound(GitLabError):
    """GitLab has no such group, project or runner, or does not show it to this token (404)."""


class GitLabRejected(GitLabError):
    """GitLab refused the request itself (400 and the like), with GitLab's reason."""


class GitLabUnavailable(InfrastructureError):
    """GitLab could not be reached, failed (5xx), or sent something invalid."""


class CreatedRunner(BaseModel):
    """What ``POST /user/runners`` answers (``token`` is shown by GitLab only once)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: int
    # repr=False: a logged or printed CreatedRunner must not leak the runner token.
    token: str = Field(min_length=1, repr=False)
    token_expires_at: str | None = None


class RunnerDetails(BaseModel):
    """The part of ``GET /runners/:id`` we use."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: int
    runner_type: RunnerType
    description: str | None = None


class GitLabClient:
    """An async client for one GitLab instance and access token (an async context manager).

    ``url`` is GitLab's address (``https://gitlab.example.com``; a trailing
    ``/api/v4`` is accepted), ``token`` an access token sent as ``PRIVATE-TOKEN``.
    ``transport`` replaces the network (tests); ``retries`` is how many times a
    failed attempt is repeated; ``sleep`` is what waits between attempts.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"expected GitLab's URL as https://HOST, got {url!r}")
        if parts.username is not None or parts.password is not None:
            # httpx would send them as Basic credentials, next to the token.
            raise UsageError(
                "GitLab's URL must not carry credentials (the token goes in token_file)"
            )
        if parts.query or parts.fragment:
            raise UsageError(f"GitLab's URL must not have a query or fragment, got {url!r}")
        if not token or any(c in token for c in "\r\n"):
            raise UsageError("the GitLab access token is empty or spans several lines")
        base = url.rstrip("/")
        self.url = base.removesuffix("/api/v4")
        self._token = token
        self._retries = max(0, retries)
        self._backoff = backoff
        self._sleep = sleep
        self._client = httpx.AsyncClient(
            base_url=f"{self.url}/api/v4",
            headers={"PRIVATE-TOKEN": token, "User-Agent": "stoker"},
            timeout=timeout,
            transport=transport,
            # The configured URL is where the token may go: never through an
            # environment proxy, never to wherever a redirect points.
            trust_env=False,
            follow_redirects=False,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections (idempotent)."""
        await self._client.aclose()

    # --- runners

    async def create_runner(
        self,
        *,
        runner_type: RunnerType,
        description: str,
        tags: Sequence[str],
        run_untagged: bool,
        group_id: int | None = None,
        project_id: int | None = None,
        locked: bool = False,
        paused: bool = False,
        access_level: str | None = None,
        maximum_timeout: int | None = None,
        maintenance_note: str | None = None,
    ) -> CreatedRunner:
        """Create a runner linked to the token's user (``POST /user/runners``).

        ``group_id`` is required exactly for ``group_type``, ``project_id``
        exactly for ``project_type`` (checked here, before asking GitLab).
        Returns the runner's id and its token, which GitLab never shows again.
        """
        if (runner_type == "group_type") != (group_id is not None):
            raise UsageError("group_id is given exactly for group_type runners")
        if (runner_type == "project_type") != (project_id is not None):
            raise UsageError("project_id is given exactly for project_type runners")
        if isinstance(tags, str):
            # A str is a Sequence[str] too: "linux" would become five one-letter tags.
            raise UsageError("tags must be a list of tags, not one string")
        body: dict[str, Any] = {
            "runner_type": runner_type,
            "description": description,
            # An array in the JSON body: GitLab's comma-separated form would split a tag.
            "tag_list": list(tags),
            "run_untagged": run_untagged,
            "locked": locked,
            "paused": paused,
        }
        optional = {
            "group_id": group_id,
            "project_id": project_id,
            "access_level": access_level,
            "maximum_timeout": maximum_timeout,
            "maintenance_note": maintenance_note,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        if group_id is not None:
            target = f"group {group_id}"
        elif project_id is not None:
            target = f"project {project_id}"
        else:
            target = "the instance"
        response = await self._request("POST", "/user/runners", json=body, idempotent=False)
        if response.status_code == 201:
            return self._parse(CreatedRunner, response)
        raise self._refusal(
            response,
            action=f"create a runner for {target}",
            needs=f"the create_runner scope and Owner/administrator rights for {target}",
            missing=f"GitLab has no {target}" if target != "the instance" else None,
            hint_404=f"check the {target.split()[0]}_id, and that the token's user can see it",
        )

    async def verify_runner(self, token: str, system_id: str) -> bool:
        """Whether GitLab still accepts runner ``token`` (False: GitLab removed it).

        The runner token goes only in the request body.
        """
        response = await self._request(
            "POST", "/runners/verify", json={"token": token, "system_id": system_id}
        )
        if response.status_code == 200:
            return True
        if response.status_code == 403:
            return False
        raise self._refusal(response, action="verify a runner token", secrets=(token,))

    async def verify_runner_id(self, token: str, system_id: str) -> int | None:
        """The id GitLab gives runner ``token`` (None: not a valid runner token)."""
        response = await self._request(
            "POST", "/runners/verify", json={"token": token, "system_id": system_id}
        )
        if response.status_code == 403:
            return None
        if response.status_code != 200:
            raise self._refusal(response, action="verify a runner token", secrets=(token,))
        return self._parse(CreatedRunner, response).id

    async def runner(self, runner_id: int) -> RunnerDetails:
        """A runner's details (needs an access token that may see it)."""
        response = await self._request("GET", f"/runners/{int(runner_id)}")
        if response.status_code == 200:
            return self._parse(RunnerDetails, response)
        raise self._refusal(
            response,
            action=f"read runner {runner_id}",
            needs="the read_api scope",
            missing=f"GitLab has no runner {runner_id}",
        )

    async def delete_runner(self, runner_id: int) -> bool:
        """Delete a runner (``DELETE /runners/:id``); False when it was already gone (404)."""
        response = await self._request("DELETE", f"/runners/{int(runner_id)}")
        if response.status_code in (200, 204):
            return True
        if response.status_code == 404:
            return False
        raise self._refusal(
            response,
            action=f"delete runner {runner_id}",
            needs=(
                "the manage_runner scope and the Owner role of the runner's group, "
                "Maintainer of its project, or administrator for an instance runner"
            ),
        )

    # --- plumbing

    async def _request(
        self, method: str, path: str, *, json: Any = None, idempotent: bool = True
    ) -> httpx.Response:
        """Send with retries; the answer (any status) with its body read, at most MAX_BODY.

        Verifying and deleting are safe to repeat, so every transport failure,
        429 and 5xx is retried.  Creating a runner is not: if GitLab acted on a
        request whose answer was lost, a second POST makes a second runner.  So
        a create is retried only when GitLab cannot have acted: the connection
        was never made, or the answer is 429 or a gateway's 502/503/504.  The
        risk left (a gateway timing out while GitLab still completes the
        request) is a stray runner with our description and a token nobody has:
        it never takes a job (no runner manager holds its token), and it can be
        recognised and deleted by its description.  NOTE: register.py does not
        garbage-collect such runners yet; it is the place to do it.
        """
        attempt = 0
        while True:
            attempt += 1
            response: httpx.Response | None = None
            try:
                response = await self._send(method, path, json)
            except _NOT_SENT as exc:
                failure = f"cannot connect to {self.url}: {type(exc).__name__}: {exc}"
                retry = True
            except httpx.TransportError as exc:
                failure = f"{method} {path} at {self.url} failed: {type(exc).__name__}"
                retry = idempotent
            else:
                status = response.status_code
                if status < 500 and status != 429:
                    return response
                failure = f"GitLab answered {method} {path} with HTTP {status}"
                retry = idempotent or status in _GATEWAY
            if not retry or attempt > self._retries:
                raise GitLabUnavailable(self._redact(failure))
            await self._sleep(self._delay(attempt, response, failure))

    async def _send(self, method: str, path: str, json: Any) -> httpx.Response:
        request = self._client.build_request(method, path, json=json)
        response = await self._client.send(request, stream=True)
        try:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_BODY:
                raise self._too_large(method, path)
            body = bytearray()
            # Decoded bytes: the bound holds after decompression too.
            async for chunk in response.aiter_bytes():
                body.extend(chunk)
                if len(body) > MAX_BODY:
                    raise self._too_large(method, path)
        finally:
            await response.aclose()
        # Re-wrapped without the encoding headers: the body is already decoded.
        headers = httpx.Headers(response.headers)
        for name in ("content-encoding", "content-length", "transfer-encoding"):
            headers.pop(name, None)
        return httpx.Response(
            response.status_code, headers=headers, content=bytes(body), request=request
        )

    @staticmethod
    def _too_large(method: str, path: str) -> GitLabUnavailable:
        return GitLabUnavailable(
            f"GitLab's answer to {method} {path} is larger than {MAX_BODY} bytes"
        )

    def _delay(self, attempt: int, response: httpx.Response | None, failure: str) -> float:
        """How long to wait before attempt ``attempt + 1``: Retry-After, else backoff."""
        if response is not None:
            after = retry_after(response)
            if after is not None:
                if after > MAX_RETRY_AFTER:
                    raise GitLabUnavailable(
                        f"{failure}; it asks to wait {after:.0f}s, longer than stoker waits"
                    )
                return after
        # Jitter spreads the retries of several hosts started together.
        delay = self._backoff * 2 ** (attempt - 1) * (0.5 + random.random())  # noqa: S311
        return float(min(MAX_BACKOFF, delay))

    def _parse(self, model: type[M], response: httpx.Response) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError:
            # Not the validation details: they could quote the answer, token included.
            raise GitLabUnavailable(
                f"GitLab sent an invalid answer to {response.request.method} "
                f"{response.request.url.path}"
            ) from None

    def _refusal(
        self,
        response: httpx.Response,
        *,
        action: str,
        needs: str | None = None,
        missing: str | None = None,
        hint_404: str | None = None,
        secrets: Sequence[str] = (),
    ) -> Exception:
        """The typed error for a non-success answer to ``action``."""
        status = response.status_code
        said = self._redact(_message_of(response), *secrets)
        quoted = f" (GitLab said: {said})" if said else ""
        if status == 401:
            return GitLabAuthError(
                f"GitLab refused the access token (401) trying to {action}: check token_file",
                status,
                hint="the token in token_file may be mistyped, expired or revoked",
            )
        if status == 403:
            wanted = needs or "more rights"
            return GitLabForbidden(
                f"GitLab forbade it (403) trying to {action}: the token needs {wanted}{quoted}",
                status,
                hint=f"the token needs {wanted}",
            )
        if status == 404:
            what = missing or f"GitLab found nothing to {action}"
            return GitLabNotFound(
                f"GitLab could not {action}: {what}{quoted or ' (404)'}", status, hint=hint_404
            )
        if 400 <= status < 500:
            return GitLabRejected(
                f"GitLab refused to {action} ({status}): {said or 'no reason given'}", status
            )
        if 300 <= status < 400:
            return GitLabError(
                f"GitLab answered {status} (a redirect) trying to {action}",
                status,
                hint="set the GitLab url to the address it redirects to (https, exact host)",
            )
        return GitLabUnavailable(f"GitLab answered HTTP {status} trying to {action}")

    def _redact(self, text: str, *secrets: str) -> str:
        for secret in (self._token, *secrets):
            if secret:
                text = text.replace(secret, "[redacted]")
        return text


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), None when absent or bad."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _message_of(response: httpx.Response) -> str:
    """GitLab's error text (``message``, ``error_description`` or ``error``), one bounded line."""
    try:
        body = response.json()
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    for key in ("message", "error_description", "error"):
        value = body.get(key)
        if isinstance(value, str | dict | list) and value:
            text = value if isinstance(value, str) else str(value)
            text = "".join(c if c.isprintable() else " " for c in text)
            return " ".join(text.split())[:MAX_QUOTE]
    return ""
