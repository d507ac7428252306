"""GitHub's REST API, the calls the runner manager makes, within GitHub's limits.

* **Credentials**: a GitHub App (a JWT signed with its private key, RS256,
  exchanged for an installation token cached until 5 minutes before it
  expires; the installation is discovered from the first target when not
  configured) or a fine-grained token.  A 401 drops the cached token and the
  call is tried once more with a fresh one.
* **Limits**: every answer's ``x-ratelimit-*`` headers are recorded; with the
  budget spent the next call waits for the reset (up to :data:`MAX_WAIT`);
  403/429 secondary limits wait ``Retry-After`` (else a minute, doubling);
  5xx, timeouts and connection errors back off exponentially with jitter.
  Mutating calls are serialised (GitHub asks integrations not to make them
  concurrently).  Calls are counted per route for the metrics.
* **Hostile answers**: bodies are bounded, JSON is validated with pydantic
  (a malformed answer is a :class:`GitHubAPIError`, never a ``KeyError``),
  pagination follows ``Link: rel="next"`` on the same origin only, for at
  most :data:`MAX_PAGES` pages.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import httpx
import jwt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

import stoker
from stoker.ci.github.config import GitHubConfig, Target, read_secret_file
from stoker.errors import InfrastructureError, StokerError, UsageError

#: Longest wait for a rate-limit window to reset before a call gives up.
MAX_WAIT = 15 * 60.0
#: Pages followed at most in one listing (100 items each).
MAX_PAGES = 50
#: Largest answer read (listings of 100 runners or jobs are far smaller).
MAX_BODY = 8 << 20
#: Installation tokens are replaced this long before they expire.
TOKEN_MARGIN = timedelta(minutes=5)
API_VERSION = "2022-11-28"
M = TypeVar("M", bound=BaseModel)


class GitHubConfigError(UsageError):
    """The ``[github]`` settings cannot work (bad key, App not installed, unknown group)."""


class GitHubAPIError(StokerError):
    """GitHub refused a call (4xx) or answered something malformed."""

    def __init__(self, status: int, message: str, *, method: str = "", path: str = "") -> None:
        where = f"{method} {path}: " if method else ""
        super().__init__(f"{where}{status}: {message}" if status else f"{where}{message}")
        self.status = status
        self.github_message = message


class RateLimited(InfrastructureError):
    """GitHub's rate limit is spent for longer than :data:`MAX_WAIT`."""


class GitHubUnavailable(InfrastructureError):
    """GitHub did not answer usefully (5xx, timeouts) after every retry."""


def _printable(text: str, limit: int = 300) -> str:
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


# --- answers ------------------------------------------------------------------------------------


class _Answer(BaseModel):
    # GitHub adds fields over time: read what we use, ignore the rest.
    model_config = ConfigDict(extra="ignore", frozen=True)


class Runner(_Answer):
    """A self-hosted runner as GitHub lists it."""

    id: int
    name: str = Field(max_length=256)
    os: str = ""
    status: str = ""
    busy: bool = False
    labels: list[str] = Field(default_factory=list)

    @field_validator("labels", mode="before")
    @classmethod
    def _label_names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [v.get("name") if isinstance(v, dict) else v for v in value]
        return value


class JitConfig(_Answer):
    """``generate-jitconfig``'s answer: the runner registered and its one-time configuration."""

    runner: Runner
    encoded_jit_config: str = Field(min_length=1, max_length=64 * 1024)


class WorkflowJob(_Answer):
    """A workflow job (``GET .../actions/jobs/{id}``)."""

    id: int
    run_id: int
    status: str
    conclusion: str | None = None
    labels: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=list, max_length=100
    )
    runner_id: int | None = None
    runner_name: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    name: str | None = None
    workflow_name: str | None = None
    head_branch: str | None = None
    html_url: str | None = None


class RunnerDownload(_Answer):
    """One runner release file GitHub offers (``.../runners/downloads``)."""

    os: str
    architecture: str
    download_url: str
    filename: str
    sha256_checksum: str | None = None


class _Runners(_Answer):
    total_count: int = 0
    runners: list[Runner]


class _Runs(_Answer):
    class _Run(_Answer):
        id: int
        status: str | None = None

    total_count: int = 0
    workflow_runs: list[_Run]


class _Jobs(_Answer):
    total_count: int = 0
    jobs: list[WorkflowJob]


class _Groups(_Answer):
    class _Group(_Answer):
        id: int
        name: str

    total_count: int = 0
    runner_groups: list[_Group]


class _Token(_Answer):
    token: str = Field(min_length=1, max_length=1024)
    expires_at: datetime


class _Installation(_Answer):
    id: int


class _App(_Answer):
    id: int
    slug: str | None = None
    name: str | None = None


# --- bookkeeping --------------------------------------------------------------------------------


@dataclass
class RateLimit:
    """The last ``x-ratelimit-*`` headers seen."""

    limit: int | None = None
    remaining: int | None = None
    reset: float | None = None
    resource: str | None = None


@dataclass
class ApiStats:
    """Calls by route template, retries and waits (for metrics and the benchmark)."""

    calls: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    rate_limit_waits: int = 0
    waited_seconds: float = 0.0

    @property
    def total(self) -> int:
        """Every call made (each retry counts)."""
        return sum(self.calls.values())

    def snapshot(self) -> dict[str, Any]:
        """Plain data."""
        return {
            "calls": dict(self.calls),
            "total": self.total,
            "retries": self.retries,
            "rate_limit_waits": self.rate_limit_waits,
            "waited_seconds": round(self.waited_seconds, 3),
        }


_NEXT_RE = re.compile(r'<([^>]+)>\s*;\s*rel="next"')


def _route(path: str) -> str:
    """``/repos/acme/app/actions/runners/5`` -> ``/repos/{owner}/{repo}/actions/runners/{id}``."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    names = {"orgs": "{org}", "enterprises": "{enterprise}", "installations": "{id}"}
    out: list[str] = []
    i = 0
    while i < len(parts):
        part = parts[i]
        if part == "repos" and i + 2 < len(parts):
            out += ["repos", "{owner}", "{repo}"]
            i += 3
        elif part in names and i + 1 < len(parts):
            out += [part, names[part]]
            i += 2
        else:
            out.append("{id}" if part.isdigit() else part)
            i += 1
    return "/" + "/".join(out)


# --- the client ---------------------------------------------------------------------------------


class GitHubClient:
    """GitHub's REST API for one ``[github]`` configuration (see the module docstring)."""

    def __init__(
        self,
        config: GitHubConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        timeout: float = 30.0,
        max_retries: int = 5,
    ) -> None:
        self.config = config
        self._clock = clock
        self._sleep = sleep
        self.max_retries = max_retries
        self.rate_limit = RateLimit()
        self.stats = ApiStats()
        self._origin = urlsplit(config.api_url)
        self._http = httpx.AsyncClient(
            base_url=config.api_url,
            transport=transport,
            timeout=timeout,
            follow_redirects=False,
            headers={
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": API_VERSION,
                "User-Agent": f"stoker/{stoker.__version__}",
            },
        )
        self._key: bytes | None = None
        self._static_token: str | None = None
        self._token: str | None = None
        self._token_expires: datetime | None = None
        self._installation: int | None = config.installation_id
        self._token_lock = asyncio.Lock()
        self._mutate_lock = asyncio.Lock()
        self._load_credentials()

    def _load_credentials(self) -> None:
        cfg = self.config
        try:
            if cfg.token_file is not None:
                token = read_secret_file(cfg.token_file, "token").decode("ascii", "strict")
                # It goes into a header: a newline or space in it would be a header injection.
                if not re.fullmatch(r"[A-Za-z0-9_.~+/=-]{1,1024}", token):
                    raise ValueError(f"the token file {cfg.token_file} does not hold one token")
                self._static_token = token
                return
            assert cfg.private_key_file is not None
            key = read_secret_file(cfg.private_key_file, "private key")
        except (ValueError, UnicodeDecodeError) as exc:
            setting = "token_file" if cfg.token_file is not None else "private_key_file"
            raise GitHubConfigError(f"github.{setting}: {exc}") from None
        try:
            jwt.encode({"iss": "check"}, key, algorithm="RS256")
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise GitHubConfigError(
                f"github.private_key_file: {cfg.private_key_file} is not an RSA private key "
                f"in PEM format ({type(exc).__name__})",
                hint="download the App's private key from its settings page",
            ) from None
        self._key = key

    async def __aenter__(self) -> GitHubClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections (idempotent)."""
        await self._http.aclose()

    # ------------------------------------------------------------------ credentials

    def app_jwt(self) -> str:
        """A JWT authenticating as the App (valid 9 minutes, back-dated a minute for skew)."""
        assert self._key is not None
        now = int(self._clock())
        claims = {"iat": now - 60, "exp": now + 540, "iss": self.config.issuer}
        return jwt.encode(claims, self._key, algorithm="RS256")

    async def installation_id(self) -> int | None:
        """The App's installation serving the targets (None with a token)."""
        if self._key is None:
            return None
        if self._installation is None:
            target = self.config.targets[0]
            path = {
                "repository": f"/repos/{target.name}/installation",
                "organization": f"/orgs/{target.name}/installation",
                "enterprise": f"/enterprises/{target.name}/installation",
            }[target.kind]
            try:
                answer = await self._call("GET", path, auth="app")
            except GitHubAPIError as exc:
                if exc.status == 404:
                    raise GitHubConfigError(
                        f"github: the App ({self.config.issuer}) is not installed on "
                        f"{target.kind} {target.name}",
                        hint="install it there, or set github.installation_id",
                    ) from None
                raise
            self._installation = _parse(_Installation, answer, "GET", path).id
        return self._installation

    async def _access_token(self, *, fresh: bool = False) -> str:
        if self._static_token is not None:
            return self._static_token
        async with self._token_lock:
            now = datetime.fromtimestamp(self._clock(), UTC)
            if (
                not fresh
                and self._token is not None
                and self._token_expires is not None
                and now < self._token_expires - TOKEN_MARGIN
            ):
                return self._token
            installation = await self.installation_id()
            path = f"/app/installations/{installation}/access_tokens"
            # Not through _call: a mutation waiting for its token holds the mutation lock,
            # and a token is not a change GitHub asks integrations to serialise.
            answer, _ = await self._retrying("POST", path, "app", None, None, ())
            token = _parse(_Token, answer, "POST", path)
            self._token, self._token_expires = token.token, token.expires_at
            return token.token

    async def check_auth(self) -> str:
        """Authenticate once; a description of who we are for ``stoker github check``."""
        if self._key is None:
            await self._call("GET", "/rate_limit")
            return "a token (github.token_file)"
        try:
            app = _parse(_App, await self._call("GET", "/app", auth="app"), "GET", "/app")
        except GitHubAPIError as exc:
            if exc.status == 401:
                raise GitHubConfigError(
                    f"github: GitHub refused the App's JWT ({exc.github_message}); check "
                    "app_id/client_id and private_key_file"
                ) from None
            raise
        installation = await self.installation_id()
        await self._access_token()
        return f"App {app.slug or app.name or app.id} (id {app.id}), installation {installation}"

    # ------------------------------------------------------------------ calls

    async def _call(
        self,
        method: str,
        path: str,
        *,
        auth: Literal["app", "token"] = "token",
        json: Any = None,
        params: dict[str, Any] | None = None,
        allow: tuple[int, ...] = (),
    ) -> Any:
        """One call with retries; the parsed JSON (None for 204 or an ``allow``-ed status)."""
        data, _ = await self._call_full(
            method, path, auth=auth, json=json, params=params, allow=allow
        )
        return data

    async def _call_full(
        self,
        method: str,
        path: str,
        *,
        auth: Literal["app", "token"] = "token",
        json: Any = None,
        params: dict[str, Any] | None = None,
        allow: tuple[int, ...] = (),
    ) -> tuple[Any, httpx.Headers]:
        """:meth:`_call`, with the answer's headers."""
        if method not in ("GET", "HEAD"):
            async with self._mutate_lock:
                return await self._retrying(method, path, auth, json, params, allow)
        return await self._retrying(method, path, auth, json, params, allow)

    async def _retrying(
        self,
        method: str,
        path: str,
        auth: Literal["app", "token"],
        json: Any,
        params: dict[str, Any] | None,
        allow: tuple[int, ...],
    ) -> tuple[Any, httpx.Headers]:
        refreshed = False
        secondary_wait = 60.0
        attempt = 0
        while True:
            await self._respect_budget()
            bearer = self.app_jwt() if auth == "app" else await self._access_token()
            route = f"{method} {_route(path)}"
            self.stats.calls[route] = self.stats.calls.get(route, 0) + 1
            request = self._http.build_request(
                method,
                path,
                json=json,
                params=params,
                headers={"Authorization": f"Bearer {bearer}"},
            )
            try:
                response = await self._http.send(request, stream=True)
                try:
                    body = await _bounded(response, method, path)
                finally:
                    await response.aclose()
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                attempt += 1
                if attempt > self.max_retries:
                    raise GitHubUnavailable(
                        f"{method} {path}: GitHub did not answer ({type(exc).__name__}) "
                        f"after {attempt} attempts"
                    ) from None
                await self._backoff(attempt)
                continue
            self._record_limits(response)
            status = response.status_code
            if status in allow:
                return None, response.headers
            if 200 <= status < 300:
                data = _json(body, method, path) if status != 204 and body else None
                return data, response.headers
            message = _message(body)
            if status == 401 and auth == "token" and not refreshed and self._key is not None:
                refreshed = True
                await self._access_token(fresh=True)
                continue
            if status in (403, 429) and self._is_rate_limited(response, message):
                attempt += 1
                if attempt > self.max_retries:
                    raise RateLimited(f"{method} {path}: GitHub's rate limit: {message}")
                wait = _retry_after(response)
                if wait is None:
                    if self.rate_limit.remaining == 0 and self.rate_limit.reset:
                        wait = max(0.0, self.rate_limit.reset - self._clock()) + 1
                    else:
                        wait, secondary_wait = secondary_wait, secondary_wait * 2
                await self._wait(wait, f"{method} {path}")
                continue
            if status >= 500:
                attempt += 1
                if attempt > self.max_retries:
                    raise GitHubUnavailable(
                        f"{method} {path}: GitHub answered {status} after {attempt} attempts"
                    )
                await self._backoff(attempt)
                continue
            raise GitHubAPIError(status, message, method=method, path=path)

    def _is_rate_limited(self, response: httpx.Response, message: str) -> bool:
        if response.status_code == 429 or "retry-after" in response.headers:
            return True
        if response.headers.get("x-ratelimit-remaining") == "0":
            return True
        return "rate limit" in message.lower()

    def _record_limits(self, response: httpx.Response) -> None:
        headers = response.headers
        for name, attr in (
            ("x-ratelimit-limit", "limit"),
            ("x-ratelimit-remaining", "remaining"),
        ):
            value = headers.get(name)
            if value is not None and value.isdigit():
                setattr(self.rate_limit, attr, int(value))
        reset = headers.get("x-ratelimit-reset")
        if reset is not None and reset.isdigit():
            self.rate_limit.reset = float(reset)
        resource = headers.get("x-ratelimit-resource")
        if resource:
            self.rate_limit.resource = resource[:32]

    async def _respect_budget(self) -> None:
        limit = self.rate_limit
        if limit.remaining == 0 and limit.reset is not None:
            wait = limit.reset - self._clock()
            if wait > 0:
                await self._wait(wait + 1, "the rate-limit window")
                limit.remaining = None

    async def _wait(self, seconds: float, what: str) -> None:
        if seconds > MAX_WAIT:
            raise RateLimited(
                f"{what}: GitHub's rate limit resets in {seconds:.0f}s, longer than stoker waits"
            )
        self.stats.rate_limit_waits += 1
        self.stats.waited_seconds += seconds
        await self._sleep(seconds)

    async def _backoff(self, attempt: int) -> None:
        self.stats.retries += 1
        delay = min(60.0, 2.0 ** (attempt - 1)) * (0.5 + random.random() / 2)  # noqa: S311
        await self._sleep(delay)

    async def _pages(self, path: str, key: str, query: dict[str, Any] | None = None) -> list[Any]:
        """Every item under ``key`` of a paginated listing (same origin, bounded).

        ``query`` goes into the first request's parameters: httpx replaces a query
        written into the path when parameters are given, so it must not be there.
        """
        items: list[Any] = []
        url: str | None = path
        params: dict[str, Any] | None = {**(query or {}), "per_page": 100}
        for _ in range(MAX_PAGES):
            assert url is not None
            response_items, next_url = await self._page(url, key, params)
            items += response_items
            if next_url is None:
                return items
            url, params = next_url, None
        raise GitHubAPIError(0, f"more than {MAX_PAGES} pages", method="GET", path=path)

    async def _page(
        self, url: str, key: str, params: dict[str, Any] | None
    ) -> tuple[list[Any], str | None]:
        answer, headers = await self._call_full("GET", url, params=params)
        if not isinstance(answer, dict) or not isinstance(answer.get(key), list):
            raise GitHubAPIError(0, f"malformed answer: no list {key!r}", method="GET", path=url)
        return answer[key], self._next_link(headers.get("link", ""))

    def _next_link(self, header: str) -> str | None:
        match = _NEXT_RE.search(header)
        if match is None:
            return None
        target = urlsplit(match[1])
        if (target.scheme, target.netloc) != (self._origin.scheme, self._origin.netloc):
            # A next link to another host would carry our token there.
            raise GitHubAPIError(0, f"refusing a pagination link to {target.netloc!r}")
        base = self._origin.path.rstrip("/")
        path = target.path[len(base) :] if base and target.path.startswith(base) else target.path
        return path + (f"?{target.query}" if target.query else "")

    # ------------------------------------------------------------------ the calls stoker makes

    async def generate_jitconfig(
        self,
        target: Target,
        *,
        name: str,
        labels: list[str],
        runner_group_id: int,
        work_folder: str = "_work",
    ) -> JitConfig:
        """Register a just-in-time runner on ``target``; its one-time configuration."""
        path = f"/{target.scope}/actions/runners/generate-jitconfig"
        body = {
            "name": name,
            "runner_group_id": runner_group_id,
            "labels": labels,
            "work_folder": work_folder,
        }
        return _parse(JitConfig, await self._call("POST", path, json=body), "POST", path)

    async def list_runners(self, target: Target) -> list[Runner]:
        """Every self-hosted runner registered on ``target``."""
        path = f"/{target.scope}/actions/runners"
        return [_parse(Runner, r, "GET", path) for r in await self._pages(path, "runners")]

    async def get_runner(self, target: Target, runner_id: int) -> Runner | None:
        """One runner (None: GitHub does not know it)."""
        path = f"/{target.scope}/actions/runners/{runner_id}"
        answer = await self._call("GET", path, allow=(404,))
        return None if answer is None else _parse(Runner, answer, "GET", path)

    async def delete_runner(
        self, target: Target, runner_id: int
    ) -> Literal["deleted", "gone", "busy"]:
        """Deregister a runner: ``deleted``, ``gone`` (404) or ``busy`` (422: running a job)."""
        path = f"/{target.scope}/actions/runners/{runner_id}"
        try:
            await self._call("DELETE", path)
        except GitHubAPIError as exc:
            if exc.status == 404:
                return "gone"
            if exc.status == 422:
                return "busy"
            raise
        return "deleted"

    async def runner_group_id(self, target: Target, name: str) -> int:
        """The id of the runner group ``name`` on an organisation or enterprise target."""
        if target.kind == "repository":
            return 1
        path = f"/{target.scope}/actions/runner-groups"
        groups = [
            _parse(_Groups._Group, g, "GET", path) for g in await self._pages(path, "runner_groups")
        ]
        for group in groups:
            if group.name.lower() == name.lower():
                return group.id
        raise GitHubConfigError(
            f"github.targets ({target.name}): no runner group {name!r}",
            hint=f"its groups: {', '.join(g.name for g in groups) or 'none'}",
        )

    async def runner_downloads(self, target: Target) -> list[RunnerDownload]:
        """The runner releases GitHub offers ``target``'s runners."""
        path = f"/{target.scope}/actions/runners/downloads"
        answer = await self._call("GET", path)
        if not isinstance(answer, list):
            raise GitHubAPIError(0, "malformed answer: expected a list", method="GET", path=path)
        return [_parse(RunnerDownload, d, "GET", path) for d in answer[:100]]

    async def get_job(self, repository: str, job_id: int) -> WorkflowJob | None:
        """A workflow job (None: GitHub does not know it)."""
        path = f"/repos/{repository}/actions/jobs/{job_id}"
        answer = await self._call("GET", path, allow=(404,))
        return None if answer is None else _parse(WorkflowJob, answer, "GET", path)

    async def queued_jobs(
        self, repository: str, *, known_runs: frozenset[int] = frozenset()
    ) -> list[WorkflowJob]:
        """Every queued job of ``repository``'s queued workflow runs.

        Runs in ``known_runs`` (whose jobs stoker recorded already) are not
        asked about: one listing call per 100 runs plus one per new run.
        """
        path = f"/repos/{repository}/actions/runs"
        listed = await self._pages(path, "workflow_runs", {"status": "queued"})
        runs = [_parse(_Runs._Run, r, "GET", path) for r in listed]
        jobs: list[WorkflowJob] = []
        for run in runs:
            if run.id in known_runs:
                continue
            jobs_path = f"/repos/{repository}/actions/runs/{run.id}/jobs"
            for item in await self._pages(jobs_path, "jobs"):
                job = _parse(WorkflowJob, item, "GET", jobs_path)
                if job.status == "queued":
                    jobs.append(job)
        return jobs


def _parse(model: type[M], data: Any, method: str, path: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the answer"
        raise GitHubAPIError(
            0, f"malformed answer: {where}: {first['msg']}", method=method, path=path
        ) from None


async def _bounded(response: httpx.Response, method: str, path: str) -> bytes:
    """The answer's body, refusing (unread) anything over :data:`MAX_BODY`."""
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise GitHubAPIError(
            response.status_code, f"answer larger than {MAX_BODY} bytes", method=method, path=path
        )
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > MAX_BODY:
            raise GitHubAPIError(
                response.status_code,
                f"answer larger than {MAX_BODY} bytes",
                method=method,
                path=path,
            )
    return bytes(body)


def _json(body: bytes, method: str, path: str) -> Any:
    try:
        return jsonlib.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise GitHubAPIError(0, "malformed answer: not JSON", method=method, path=path) from None


def _message(body: bytes) -> str:
    try:
        document = jsonlib.loads(body)
    except (UnicodeDecodeError, ValueError):
        return _printable(body.decode("utf-8", "replace")) or "(no message)"
    if isinstance(document, dict) and isinstance(document.get("message"), str):
        return _printable(document["message"])
    return "(no message)"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
