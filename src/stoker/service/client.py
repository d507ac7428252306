"""A client of the ``stoker serve`` REST API (used by ``stoker job ...``).

Library code: every failure is raised as :class:`ApiError` (the server
answered with an error) or :class:`ServiceUnreachable` (it did not answer);
only :mod:`stoker.cli` turns them into exit statuses.  Tokens are sent in
the ``Authorization`` header only and never appear in errors.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, BinaryIO, Final, Self, cast

import httpx

from stoker.archive import pack_tree
from stoker.errors import InfrastructureError, StokerError, UsageError

__all__ = [
    "ApiClient",
    "ApiError",
    "ApiFailed",
    "ApiRejected",
    "LogEnd",
    "LogEvent",
    "ServiceUnreachable",
    "pack_source",
]

#: Reconnections of a followed log stream before giving up.
_FOLLOW_RETRIES: Final = 5


class ApiError(StokerError):
    """The service answered with an error; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, detail: object = None) -> None:
        hint = _hint_for(status, detail)
        super().__init__(f"{message} (HTTP {status})", hint=hint)
        self.status = status
        self.detail = detail


class ApiRejected(ApiError, UsageError):
    """The service refused the request (4xx): bad input, token, scope, or state."""


class ApiFailed(ApiError, InfrastructureError):
    """The service failed to handle the request (5xx)."""


class ServiceUnreachable(InfrastructureError):
    """The service could not be reached, or broke the protocol."""


def _hint_for(status: int, detail: object) -> str | None:
    if isinstance(detail, dict) and isinstance(detail.get("hint"), str):
        return str(detail["hint"])
    if status == 401:
        return "check --token-file / STOKER_TOKEN (`stoker token new` makes a token)"
    if status == 403:
        return "this token lacks the scope; ask for a token with it"
    return None


@dataclass(frozen=True)
class LogEvent:
    """A piece of a job's output from the log stream."""

    seq: int
    stream: str
    data: bytes


@dataclass(frozen=True)
class LogEnd:
    """The job ended; ``job`` is its final representation."""

    job: dict[str, Any]


def pack_source(src: Path, directory: Path) -> Path:
    """Pack the project ``src`` into ``directory/source.tar.gz`` (deterministic PAX)."""
    out = directory / "source.tar.gz"
    with out.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        pack_tree(src, cast(BinaryIO, gz))
    return out


def decode_chunk(chunk: Mapping[str, Any]) -> bytes:
    """The bytes of a log chunk as the API sends it (``encoding``: utf-8 or base64)."""
    data = chunk.get("data", "")
    if not isinstance(data, str):
        raise ServiceUnreachable("the service sent a log chunk without data")
    if chunk.get("encoding") == "base64":
        return base64.b64decode(data)
    return data.encode()


class ApiClient:
    """An async client for one service URL and token; use it as an async context manager."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--url must start with http:// or https://, not {url!r}")
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
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

    # --- jobs

    async def submit(self, spec: Mapping[str, Any], source: Path | None = None) -> dict[str, Any]:
        """Submit a job (``spec`` as ``POST /v1/jobs`` takes it; ``source`` a tar or tar.gz)."""
        files: dict[str, Any] = {"spec": (None, json.dumps(spec), "application/json")}
        if source is None:
            return await self._json("POST", "/v1/jobs", files=files)
        with source.open("rb") as fh:
            files["source"] = (source.name, fh, "application/gzip")
            return await self._json("POST", "/v1/jobs", files=files)

    async def get(self, job_id: str) -> dict[str, Any]:
        """One job, with its events."""
        return await self._json("GET", f"/v1/jobs/{_segment(job_id)}")

    async def jobs(self, **filters: str | int | None) -> list[dict[str, Any]]:
        """Jobs matching ``filters`` (state, pool, label, submitter, limit), newest first."""
        params = {k: v for k, v in filters.items() if v is not None}
        body = await self._json("GET", "/v1/jobs", params=params)
        return list(body["jobs"])

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask for a job to be cancelled; returns the job."""
        return await self._json("POST", f"/v1/jobs/{_segment(job_id)}/cancel")

    async def logs(self, job_id: str, *, after: int = 0) -> dict[str, Any]:
        """The stored log after chunk ``after`` (one bounded page)."""
        return await self._json("GET", f"/v1/jobs/{_segment(job_id)}/logs", params={"after": after})

    async def follow(self, job_id: str, *, after: int = 0) -> AsyncIterator[LogEvent | LogEnd]:
        """The job's output as it is produced, then a :class:`LogEnd`.

        A dropped connection is resumed after the last chunk seen.
        """
        path = f"/v1/jobs/{_segment(job_id)}/logs"
        async for item in self._follow(path, after, f"the log stream of job {job_id}"):
            if isinstance(item, LogEvent):
                yield item
            else:
                yield LogEnd(job=dict(item["job"]))

    # --- sessions

    async def add_step(
        self,
        job_id: str,
        command: list[str],
        *,
        stdin: bytes = b"",
        env: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        interrupt: bool = False,
    ) -> dict[str, Any]:
        """Send a command to session ``job_id``; returns the queued step.

        ``interrupt``: stop the step still running (and skip queued ones) first.
        """
        body: dict[str, Any] = {"command": command, "env": dict(env or {})}
        if interrupt:
            body["interrupt"] = True
        if secrets:
            body["secrets"] = dict(secrets)
        if stdin:
            body["stdin"] = base64.b64encode(stdin).decode("ascii")
        for key, value in (("cwd", cwd), ("user", user), ("timeout", timeout)):
            if value is not None:
                body[key] = value
        return await self._json("POST", f"/v1/jobs/{_segment(job_id)}/steps", json=body)

    async def step(self, job_id: str, seq: int) -> dict[str, Any]:
        """One step of session ``job_id``."""
        return await self._json("GET", f"/v1/jobs/{_segment(job_id)}/steps/{int(seq)}")

    async def follow_step(self, job_id: str, seq: int) -> AsyncIterator[LogEvent | dict[str, Any]]:
        """A step's output as it is produced, then the finished step (a dict)."""
        path = f"/v1/jobs/{_segment(job_id)}/steps/{int(seq)}"
        async for item in self._follow(path, 0, f"the output of step {seq} of job {job_id}"):
            yield item

    async def close_session(self, job_id: str) -> dict[str, Any]:
        """Close session ``job_id`` (no more steps); returns the job."""
        return await self._json("POST", f"/v1/jobs/{_segment(job_id)}/close")

    async def _follow(
        self, path: str, after: int, what: str
    ) -> AsyncIterator[LogEvent | dict[str, Any]]:
        """``log`` events as :class:`LogEvent`, then the ``end`` event's data; resumes."""
        retries = 0
        while True:
            try:
                async with self._client.stream(
                    "GET",
                    path,
                    params={"follow": 1, "after": after},
                    headers={"Accept": "text/event-stream"},
                    timeout=httpx.Timeout(None, connect=10.0),
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise _error_of(response)
                    async for event, data in _sse_events(response):
                        retries = 0
                        if event == "log":
                            item = LogEvent(
                                seq=int(data["seq"]),
                                stream=str(data["stream"]),
                                data=decode_chunk(data),
                            )
                            after = item.seq
                            yield item
                        elif event == "end":
                            yield dict(data)
                            return
                        elif event == "error":
                            raise ApiFailed(503, str(data.get("error", f"{what} failed")))
            except (httpx.TransportError, httpx.StreamError) as exc:
                retries += 1
                if retries > _FOLLOW_RETRIES:
                    raise ServiceUnreachable(f"lost {what} at {self.url}: {exc}") from None
                continue
            # The stream ended without an "end" event (the server is restarting): resume.
            retries += 1
            if retries > _FOLLOW_RETRIES:
                raise ServiceUnreachable(f"{what} keeps ending early")

    async def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        """The files job ``job_id`` produced (name, size, sha256)."""
        body = await self._json("GET", f"/v1/jobs/{_segment(job_id)}/artifacts")
        return list(body["artifacts"])

    async def download(
        self, job_id: str, name: str, out: Path, *, sha256: str | None = None
    ) -> Path:
        """Download artifact ``name`` under the directory ``out``; returns the file written.

        ``name`` comes from the server (originally from a guest): it must be a
        relative path without ``..``, and nothing is written through a
        symlink.  With ``sha256`` the content is checked (a mismatch removes
        the file and raises :class:`ServiceUnreachable`).
        """
        target = _safe_target(out, name)
        url = f"/v1/jobs/{_segment(job_id)}/artifacts/{name}"
        digest = hashlib.sha256()
        try:
            async with self._client.stream("GET", url) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise _error_of(response)
                target.parent.mkdir(parents=True, exist_ok=True)
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
                with os.fdopen(os.open(target, flags, 0o644), "wb") as fh:
                    async for chunk in response.aiter_bytes():
                        digest.update(chunk)
                        fh.write(chunk)
        except httpx.HTTPError as exc:
            raise ServiceUnreachable(f"cannot download {name!r} from {self.url}: {exc}") from None
        if sha256 is not None and digest.hexdigest() != sha256:
            target.unlink(missing_ok=True)
            raise ServiceUnreachable(
                f"artifact {name!r} of job {job_id}: the download does not match its SHA-256"
            )
        return target

    async def get_json(self, path: str) -> Any:
        """``GET path`` (pools, VMs, hosts, health) as JSON."""
        return await self._request_json("GET", path)

    # --- plumbing

    async def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        body = await self._request_json(method, path, **kwargs)
        if not isinstance(body, dict):
            raise ServiceUnreachable(f"{method} {path}: expected a JSON object from the service")
        return body

    async def _request_json(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceUnreachable(
                f"cannot reach the stoker service at {self.url}: {exc}",
                hint="is `stoker serve` running there? (--url / STOKER_URL)",
            ) from None
        if response.status_code >= 400:
            raise _error_of(response)
        try:
            return response.json()
        except ValueError:
            raise ServiceUnreachable(
                f"{method} {path}: the service answered with something other than JSON"
            ) from None


def _segment(job_id: str) -> str:
    if not job_id or "/" in job_id or job_id in (".", ".."):
        raise UsageError(f"not a job id: {job_id!r}")
    return job_id


def _error_of(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = None
    kind = ApiRejected if response.status_code < 500 else ApiFailed
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return kind(response.status_code, body["error"], body.get("detail"))
    return kind(response.status_code, response.reason_phrase or "request failed")


async def _sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Server-sent events of ``response`` as (event name, JSON data); comments skipped."""
    event, data = "message", list[str]()
    async for line in response.aiter_lines():
        if not line:
            if data:
                try:
                    payload = json.loads("\n".join(data))
                except ValueError:
                    raise ServiceUnreachable("the log stream carried invalid JSON") from None
                yield event, payload
            event, data = "message", list[str]()
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)


def _safe_target(out: Path, name: str) -> Path:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\0" in name:
        raise ServiceUnreachable(f"the service sent an unsafe artifact name {name!r}")
    target = out.joinpath(*path.parts)
    # Refuse to write through a symlink anywhere below ``out``.
    for parent in [*reversed(target.relative_to(out).parents)][1:]:
        if (out / parent).is_symlink():
            raise UsageError(f"{out / parent} is a symlink; refusing to write {name!r} through it")
    return target


def temporary_directory() -> tempfile.TemporaryDirectory[str]:
    """A private temporary directory for packing sources."""
    return tempfile.TemporaryDirectory(prefix="stoker-submit-")
