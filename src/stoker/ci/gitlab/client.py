"""GitLab's REST API, the part runner management needs (httpx).

* ``POST /user/runners``: create a runner (``create_runner`` scope; instance,
  group or project type) and get its ``glrt-`` token, shown only once;
* ``POST /runners/verify``: is a runner token still valid;
* ``DELETE /runners/:id``: delete a runner (``manage_runner`` scope);
* ``GET /runners/:id``: a runner's type (used to refuse instance-wide tokens).

The access token goes in the ``PRIVATE-TOKEN`` header only; runner tokens go
in request bodies only; neither ever appears in an error or a log line.
Answers are bounded (1 MiB) and validated.  Server errors, 429 and transport
failures are retried with exponential backoff and jitter where that is safe
(everything but creating a runner after the request may have reached GitLab:
a retried create could leave a duplicate, which the next registration pass
would not know about, so it is only retried when GitLab certainly did not
act: connection refused, 429, 502, 503, 504).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Final, Literal, Self, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from stoker.errors import InfrastructureError, UsageError

#: Largest answer read from GitLab.
MAX_BODY: Final = 1 << 20
RunnerType = Literal["instance_type", "group_type", "project_type"]
M = TypeVar("M", bound=BaseModel)


class GitLabError(UsageError):
    """GitLab refused a request (a problem of the token, the configuration or the target)."""

    def __init__(self, message: str, status: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.status = status


class GitLabUnavailable(InfrastructureError):
    """GitLab could not be reached, failed (5xx) or sent something invalid."""


class CreatedRunner(BaseModel):
    """What ``POST /user/runners`` answers."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: int
    token: str
    token_expires_at: str | None = None


class RunnerDetails(BaseModel):
    """The part of ``GET /runners/:id`` we use."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: int
    runner_type: RunnerType
    description: str | None = None


class GitLabClient:
    """An async client for one GitLab instance and access token (async context manager)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"expected GitLab's URL as https://HOST, got {url!r}")
        self.url = url.rstrip("/")
        self._retries = retries
        self._backoff = backoff
        self._client = httpx.AsyncClient(
            base_url=f"{self.url}/api/v4",
            headers={"PRIVATE-TOKEN": token, "User-Agent": "stoker"},
            timeout=timeout,
            transport=transport,
            # The configured URL is where the token may go; never through an environment proxy.
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
        """Create a runner linked to the token's user; its id and (only-once) token."""
        if (runner_type == "group_type") != (group_id is not None):
            raise UsageError("group_id is given exactly for group_type runners")
        if (runner_type == "project_type") != (project_id is not None):
            raise UsageError("project_id is given exactly for project_type runners")
        body: dict[str, Any] = {
            "runner_type": runner_type,
            "description": description,
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
        target = (
            f"group {group_id}"
            if group_id is not None
            else f"project {project_id}"
            if project_id is not None
            else "the instance"
        )
        response = await self._request("POST", "/user/runners", json=body, idempotent=False)
        if response.status_code == 201:
            return self._parse(CreatedRunner, response)
        raise self._refusal(
            response,
            action=f"create a runner for {target}",
            scope="create_runner",
            role="the Owner role of the group or project (an administrator for the instance)",
        )

    async def verify_runner(self, token: str, system_id: str) -> bool:
        """Whether GitLab still accepts runner ``token`` (False: deleted or invalid)."""
        response = await self._request(
            "POST", "/runners/verify", json={"token": token, "system_id": system_id}
        )
        if response.status_code == 200:
            return True
        if response.status_code == 403:
            return False
        raise self._refusal(response, action="verify a runner token")

    async def runner(self, runner_id: int) -> RunnerDetails:
        """A runner's details (needs an access token that may see it)."""
        response = await self._request("GET", f"/runners/{int(runner_id)}")
        if response.status_code == 200:
            return self._parse(RunnerDetails, response)
        raise self._refusal(response, action=f"read runner {runner_id}", scope="read_api")

    async def verify_runner_id(self, token: str, system_id: str) -> int | None:
        """The id GitLab gives runner ``token`` (None: not a valid runner token)."""
        response = await self._request(
            "POST", "/runners/verify", json={"token": token, "system_id": system_id}
        )
        if response.status_code == 403:
            return None
        if response.status_code != 200:
            raise self._refusal(response, action="verify a runner token")
        return self._parse(CreatedRunner, response).id

    async def delete_runner(self, runner_id: int) -> bool:
        """Delete a runner; False when GitLab had no such runner (already gone)."""
        response = await self._request("DELETE", f"/runners/{int(runner_id)}")
        if response.status_code in (200, 204):
            return True
        if response.status_code == 404:
            return False
        raise self._refusal(
            response,
            action=f"delete runner {runner_id}",
            scope="manage_runner",
            role="the Owner role of its group, Maintainer of its project, or administrator",
        )

    # --- plumbing

    async def _request(
        self, method: str, path: str, *, json: Any = None, idempotent: bool = True
    ) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._send(method, path, json)
            except httpx.ConnectError as exc:
                failure: str = f"cannot connect to {self.url}: {exc}"
                retry = True  # nothing reached GitLab
            except httpx.TransportError as exc:
                failure = f"{method} {path} at {self.url} failed: {type(exc).__name__}"
                retry = idempotent
            else:
                status = response.status_code
                if status == 429 or (status >= 500 and (idempotent or status in (502, 503, 504))):
                    failure = f"GitLab answered {method} {path} with HTTP {status}"
                    retry = True
                    if attempt <= self._retries:
                        await asyncio.sleep(self._delay(attempt, response))
                        continue
                    raise GitLabUnavailable(failure)
                return response
            if not retry or attempt > self._retries:
                raise GitLabUnavailable(failure)
            await asyncio.sleep(self._delay(attempt, None))

    async def _send(self, method: str, path: str, json: Any) -> httpx.Response:
        request = self._client.build_request(method, path, json=json)
        response = await self._client.send(request, stream=True)
        try:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body.extend(chunk)
                if len(body) > MAX_BODY:
                    raise GitLabUnavailable(
                        f"GitLab's answer to {method} {path} is larger than {MAX_BODY} bytes"
                    )
        finally:
            await response.aclose()
        return httpx.Response(
            response.status_code, headers=response.headers, content=bytes(body), request=request
        )

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        if response is not None:
            after = response.headers.get("retry-after", "")
            if after.isdigit():
                return min(float(after), 60.0)
        return float(self._backoff * 2 ** (attempt - 1) * (0.5 + random.random()))  # noqa: S311

    def _parse(self, model: type[M], response: httpx.Response) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError:
            raise GitLabUnavailable(
                f"GitLab sent an invalid answer to {response.request.method} "
                f"{response.request.url.path}"
            ) from None

    def _refusal(
        self,
        response: httpx.Response,
        *,
        action: str,
        scope: str | None = None,
        role: str | None = None,
    ) -> Exception:
        status = response.status_code
        said = _message_of(response)
        if status == 401:
            return GitLabError(
                f"GitLab refused the access token (401) trying to {action}",
                status,
                hint="check gitlab.token_file: the token may be expired or revoked",
            )
        if status == 403:
            needs = f"the {scope} scope" if scope else "more rights"
            return GitLabError(
                f"GitLab forbade it (403) trying to {action}: {said}",
                status,
                hint=f"the token needs {needs}" + (f" and {role}" if role else ""),
            )
        if status == 404:
            return GitLabError(f"GitLab could not {action}: {said or 'not found'} (404)", status)
        if status in (400, 409, 410, 422):
            return GitLabError(f"GitLab refused to {action}: {said} ({status})", status)
        return GitLabUnavailable(f"GitLab answered HTTP {status} trying to {action}")


def _message_of(response: httpx.Response) -> str:
    """GitLab's error text (``message`` or ``error``), bounded and single-line."""
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
            return " ".join(text.split())[:300]
    return ""
