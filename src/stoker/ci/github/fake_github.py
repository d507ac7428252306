"""FakeGitHub: a **fake** GitHub for tests and benchmarks, on 127.0.0.1 only.

GitHub cannot be reached from where stoker is developed, so this implements
the documented REST contract of what stoker calls (GitHub's REST reference,
``../shared/reference/github/``) plus a webhook emitter, in memory:

* App JWTs (RS256, verified with the App's public key) for ``/app/...``;
  installation tokens (1 h) and static tokens for the rest;
* ``generate-jitconfig`` (one-time configurations), runners list / get /
  delete (422 while busy), runner downloads and groups, for repositories,
  organisations and enterprises; workflow runs and jobs, paginated with
  ``Link`` headers;
* ``x-ratelimit-*`` headers with a settable budget (403 when spent) and
  injectable faults (any status, ``Retry-After``);
* ``workflow_job`` webhooks, signed with the secret, that can be dropped,
  duplicated, held and released in reverse order, and redelivered.

The real runner talks to GitHub's Actions broker, which no fake can stand in
for; :mod:`stoker.ci.github.stand_in` (a stand-in ``run.sh``) uses the small
runner protocol under ``/_fake/runner/`` instead: open a session with the JIT
configuration, long-poll for a job (the oldest queued job whose labels are a
subset of the runner's, case-insensitive), run it, report it.  Ephemeral
runners disappear after their job, as GitHub's do.

Never use it anywhere but tests and ``bench/``.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import queue
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from stoker.ci.github.webhook import signature

MAX_BODY = 1 << 20
_BEARER_RE = re.compile(r"Bearer ([A-Za-z0-9._~+/=-]{1,4096})")


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(at: datetime | None) -> str | None:
    return at.isoformat().replace("+00:00", "Z") if at else None


@dataclass
class FakeJob:
    """A workflow job of the fake."""

    id: int
    run_id: int
    repository: str
    labels: list[str]
    run: list[str]
    status: str = "queued"
    conclusion: str | None = None
    runner_id: int | None = None
    runner_name: str | None = None
    created_at: datetime = field(default_factory=_now)
    started_at: datetime | None = None
    completed_at: datetime | None = None

    def api(self) -> dict[str, Any]:
        """As the REST API and webhooks show it."""
        return {
            "id": self.id,
            "run_id": self.run_id,
            "status": self.status,
            "conclusion": self.conclusion,
            "labels": list(self.labels),
            "runner_id": self.runner_id,
            "runner_name": self.runner_name,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "completed_at": _iso(self.completed_at),
            "name": f"job-{self.id}",
            "workflow_name": "ci",
            "head_branch": "main",
            "html_url": f"https://github.example/{self.repository}/actions/runs/{self.run_id}",
        }


@dataclass
class FakeRunner:
    """A registered self-hosted runner of the fake."""

    id: int
    name: str
    scope: str
    labels: list[str]
    group_id: int
    secret: str
    status: str = "offline"
    busy: bool = False
    sessions: int = 0
    job_id: int | None = None
    ephemeral: bool = True
    #: When the runner last talked to the fake (sessions, polls, heartbeats).
    last_seen: float = 0.0

    def api(self) -> dict[str, Any]:
        """As the REST API shows it."""
        return {
            "id": self.id,
            "name": self.name,
            "os": "Linux",
            "status": self.status,
            "busy": self.busy,
            "ephemeral": self.ephemeral,
            "labels": [
                {"id": i + 1, "name": n, "type": "custom"} for i, n in enumerate(self.labels)
            ],
        }


@dataclass
class Fault:
    """An injected failure: the next ``times`` calls matching answer ``status``."""

    method: str
    path: re.Pattern[str]
    status: int
    times: int
    retry_after: float | None


@dataclass
class Delivery:
    """One webhook delivery and what the receiver answered."""

    delivery_id: str
    event: str
    body: bytes
    status: int | None = None


class Webhooks:
    """The fake's webhook emitter (a thread posting to ``url``); controls for tests."""

    def __init__(self, url: str | None, secret: bytes) -> None:
        self.url = url
        self.secret = secret
        self.deliveries: list[Delivery] = []
        self._queue: queue.Queue[Delivery | None] = queue.Queue()
        self._lock = threading.Lock()
        self._drop = 0
        self._duplicate = 0
        self._held: list[Delivery] | None = None
        self.delay = 0.0
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()

    def start(self) -> None:
        """Start the sender thread."""
        self._thread = threading.Thread(target=self._send_loop, name="fake-github-hooks")
        self._thread.start()

    def stop(self) -> None:
        """Stop the sender thread (undelivered ones are dropped)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def drop_next(self, count: int = 1) -> None:
        """The next ``count`` deliveries are lost (never sent)."""
        with self._lock:
            self._drop += count

    def duplicate_next(self, count: int = 1) -> None:
        """The next ``count`` deliveries are each sent twice."""
        with self._lock:
            self._duplicate += count

    def hold(self) -> None:
        """Keep deliveries back until :meth:`release`."""
        with self._lock:
            self._held = []

    def release(self, *, reverse: bool = True) -> None:
        """Send the held deliveries (newest first by default: out of order)."""
        with self._lock:
            held, self._held = self._held or [], None
        for delivery in reversed(held) if reverse else held:
            self._queue.put(delivery)

    def redeliver(self, delivery_id: str) -> None:
        """Send a delivery again, same body and id (what GitHub's redeliver button does)."""
        with self._lock:
            original = next(d for d in self.deliveries if d.delivery_id == delivery_id)
        self._queue.put(Delivery(original.delivery_id, original.event, original.body))

    def emit(self, event: str, payload: dict[str, Any]) -> None:
        """Queue one delivery, subject to the controls."""
        body = json.dumps(payload).encode()
        delivery = Delivery(str(uuid.uuid4()), event, body)
        with self._lock:
            if self.url is None:
                return
            if self._drop:
                self._drop -= 1
                self.deliveries.append(delivery)
                return
            copies = 2 if self._duplicate else 1
            if self._duplicate:
                self._duplicate -= 1
            if self._held is not None:
                self._held.extend([delivery] * copies)
                return
        for _ in range(copies):
            self._queue.put(Delivery(delivery.delivery_id, event, body))

    def wait_idle(self, timeout: float = 30) -> None:
        """Wait until every queued delivery was sent."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.empty() and self._idle.is_set():
                return
            time.sleep(0.02)
        raise TimeoutError("webhook deliveries still pending")

    def _send_loop(self) -> None:
        with httpx.Client(timeout=30) as client:
            while True:
                delivery = self._queue.get()
                if delivery is None:
                    return
                self._idle.clear()
                try:
                    if self.delay:
                        time.sleep(self.delay)
                    assert self.url is not None
                    try:
                        response = client.post(
                            self.url,
                            content=delivery.body,
                            headers={
                                "X-GitHub-Event": delivery.event,
                                "X-GitHub-Delivery": delivery.delivery_id,
                                "X-Hub-Signature-256": signature(self.secret, delivery.body),
                                "Content-Type": "application/json",
                                "User-Agent": "GitHub-Hookshot/fake",
                            },
                        )
                        delivery.status = response.status_code
                    except httpx.HTTPError:
                        delivery.status = 0
                    with self._lock:
                        self.deliveries.append(delivery)
                finally:
                    if self._queue.empty():
                        self._idle.set()


class FakeGitHub:
    """The fake (see the module docstring); ``with FakeGitHub(...) as gh:`` serves on ``gh.url``."""

    def __init__(
        self,
        *,
        app_id: int = 1,
        client_id: str = "Iv1.fake",
        public_key_pem: bytes | None = None,
        tokens: tuple[str, ...] = (),
        webhook_url: str | None = None,
        webhook_secret: bytes = b"",
        runner_version: str = "2.321.0",
        api_prefix: str = "",
        lost_after: float = 60.0,
        host: str = "127.0.0.1",
        token_lifetime: float = 3600.0,
    ) -> None:
        if not host.startswith("127."):
            raise ValueError("the fake GitHub listens on loopback addresses only")
        self.host = host
        self.app_id = app_id
        self.client_id = client_id
        self.public_key_pem = public_key_pem
        self.static_tokens = set(tokens)
        self.webhooks = Webhooks(webhook_url, webhook_secret)
        self.runner_version = runner_version
        #: A busy runner silent this long has lost communication: its job fails, it goes
        #: offline (what GitHub does when a runner's machine dies mid-job).
        self.lost_after = lost_after
        self.token_lifetime = token_lifetime
        self.prefix = api_prefix.rstrip("/")
        self.lock = threading.RLock()
        self._ids = itertools.count(1000)
        #: owner -> installation id (repositories are installed through their owner).
        self.installations: dict[str, int] = {}
        self.repos: dict[str, int] = {}
        self.groups: dict[str, list[dict[str, Any]]] = {}
        self.tokens: dict[str, tuple[int, datetime]] = {}
        self.job_table: dict[int, FakeJob] = {}
        self.runner_table: dict[int, FakeRunner] = {}
        self.faults: list[Fault] = []
        self.calls: list[tuple[str, str, int]] = []
        self.rate_limit = 5000
        self.rate_remaining = 5000
        self.rate_reset = int(time.time()) + 3600
        self.api_delay = 0.0
        self._job_ready = threading.Condition(self.lock)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.url = ""
        self.app = self._make_app()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> FakeGitHub:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        sock.listen(128)
        self._sock = sock
        self.url = f"http://{self.host}:{sock.getsockname()[1]}{self.prefix}"
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="fake-github"
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self.__exit__()
                raise RuntimeError("the fake GitHub did not start")
            time.sleep(0.01)
        self.webhooks.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.webhooks.stop()
        with self.lock:
            self._job_ready.notify_all()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._server = None

    # ------------------------------------------------------------------ control (tests)

    def install(self, owner: str, installation: int) -> None:
        """Install the App on an account (its repositories and organisation)."""
        with self.lock:
            self.installations[owner.lower()] = installation

    def add_repo(self, repository: str) -> None:
        """A repository that exists (its owner's installation serves it)."""
        with self.lock:
            self.repos[repository.lower()] = next(self._ids)

    def add_group(self, org: str, name: str) -> int:
        """A runner group of an organisation (``Default`` exists as id 1)."""
        with self.lock:
            groups = self.groups.setdefault(org.lower(), [{"id": 1, "name": "Default"}])
            group_id = len(groups) + 1
            groups.append({"id": group_id, "name": name})
            return group_id

    def queue_job(self, repository: str, labels: list[str], run: list[str] | None = None) -> int:
        """Queue a workflow job (one run each); emits ``workflow_job`` ``queued``."""
        with self.lock:
            job = FakeJob(
                id=next(self._ids),
                run_id=next(self._ids),
                repository=repository,
                labels=list(labels),
                run=list(run or ["true"]),
            )
            self.job_table[job.id] = job
            self._emit(job)
            self._job_ready.notify_all()
            return job.id

    def add_runner(self, scope: str, name: str, labels: list[str], status: str = "online") -> int:
        """Register a runner directly (not through stoker): for garbage-collection tests."""
        with self.lock:
            runner = FakeRunner(
                id=next(self._ids),
                name=name,
                scope=scope,
                labels=list(labels),
                group_id=1,
                secret=secrets.token_hex(16),
                status=status,
                ephemeral=False,
            )
            self.runner_table[runner.id] = runner
            return runner.id

    def fail(
        self,
        method: str,
        path_regex: str,
        status: int,
        *,
        times: int = 1,
        retry_after: float | None = None,
    ) -> None:
        """The next ``times`` calls of ``method`` (``*``: any) on matching paths get ``status``."""
        with self.lock:
            self.faults.append(
                Fault(method.upper(), re.compile(path_regex), status, times, retry_after)
            )

    def clear_faults(self) -> None:
        """Remove every injected fault."""
        with self.lock:
            self.faults.clear()

    def set_rate_limit(self, remaining: int, *, limit: int = 5000, reset_in: float = 3600) -> None:
        """Set the budget left in the current window."""
        with self.lock:
            self.rate_limit, self.rate_remaining = limit, remaining
            self.rate_reset = int(time.time() + reset_in)

    @property
    def jobs(self) -> dict[int, FakeJob]:
        """A copy of every job."""
        with self.lock:
            return {k: FakeJob(**asdict(v)) for k, v in self.job_table.items()}

    @property
    def runners(self) -> dict[int, FakeRunner]:
        """A copy of every registered runner."""
        with self.lock:
            return {k: FakeRunner(**asdict(v)) for k, v in self.runner_table.items()}

    def api_calls(self, *, prefix: str = "/") -> list[tuple[str, str, int]]:
        """The REST calls made (not the runner protocol's)."""
        with self.lock:
            return [c for c in self.calls if c[1].startswith(prefix) and "/_fake/" not in c[1]]

    # ------------------------------------------------------------------ internals

    def _emit(self, job: FakeJob) -> None:
        owner = job.repository.split("/")[0].lower()
        payload = {
            "action": job.status,
            "workflow_job": job.api(),
            "repository": {
                "id": self.repos.get(job.repository.lower(), 0),
                "name": job.repository.split("/")[1],
                "full_name": job.repository,
                "owner": {"login": job.repository.split("/")[0]},
            },
            "installation": {"id": self.installations.get(owner, 0)},
        }
        self.webhooks.emit("workflow_job", payload)

    def _authorise(self, request: Request, path: str) -> JSONResponse | None:
        match = _BEARER_RE.fullmatch(request.headers.get("authorization", ""))
        if match is None:
            return _error(401, "Requires authentication")
        token = match[1]
        if path.startswith("/app") or path.endswith("/installation"):
            # What GitHub serves to the App itself (its JWT), not to an installation.
            if self.public_key_pem is None:
                return _error(401, "A JSON web token could not be decoded")
            try:
                claims = jwt.decode(
                    token,
                    self.public_key_pem,
                    algorithms=["RS256"],
                    options={"require": ["iat", "exp", "iss"]},
                    leeway=0,
                )
            except jwt.PyJWTError as exc:
                return _error(401, f"A JSON web token could not be decoded ({exc})")
            if str(claims["iss"]) not in (str(self.app_id), self.client_id):
                return _error(401, "'Issuer' claim ('iss') is not a known App")
            if int(claims["exp"]) - int(claims["iat"]) > 600:
                return _error(401, "'Expiration time' claim ('exp') is too far in the future")
            return None
        if token in self.static_tokens:
            return None
        entry = self.tokens.get(token)
        if entry is None or entry[1] < _now():
            return _error(401, "Bad credentials")
        return None

    def _make_app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        fake = self

        @app.middleware("http")
        async def gate(request: Request, call_next: Any) -> Response:
            path = request.url.path
            if fake.prefix and path.startswith(fake.prefix):
                path = path[len(fake.prefix) :]
            method = request.method
            length = request.headers.get("content-length", "0")
            response: Response
            if not length.isdigit() or int(length) > MAX_BODY:
                response = _error(413, "Payload too large")
            elif path.startswith("/_fake/"):
                response = await call_next(request)
            else:
                if fake.api_delay:
                    await asyncio.sleep(fake.api_delay)
                response = fake._gate(method, path) or fake._authorise(request, path)  # type: ignore[assignment]
                if response is None:
                    response = await call_next(request)
                with fake.lock:
                    response.headers["x-ratelimit-limit"] = str(fake.rate_limit)
                    response.headers["x-ratelimit-remaining"] = str(max(0, fake.rate_remaining))
                    response.headers["x-ratelimit-reset"] = str(fake.rate_reset)
                    response.headers["x-ratelimit-used"] = str(
                        fake.rate_limit - max(0, fake.rate_remaining)
                    )
                    response.headers["x-ratelimit-resource"] = "core"
            with fake.lock:
                fake.calls.append((method, path, response.status_code))
            return response

        _routes(app, fake)
        return app

    def _expire_lost(self) -> None:
        now = time.monotonic()
        for runner in self.runner_table.values():
            if runner.busy and now - runner.last_seen > self.lost_after:
                job = self.job_table.get(runner.job_id or -1)
                runner.busy, runner.status, runner.job_id = False, "offline", None
                if job is not None and job.status == "in_progress":
                    job.status, job.conclusion, job.completed_at = "completed", "failure", _now()
                    self._emit(job)

    def _gate(self, method: str, path: str) -> JSONResponse | None:
        with self.lock:
            self._expire_lost()
            for fault in self.faults:
                if fault.times > 0 and fault.method in ("*", method) and fault.path.search(path):
                    fault.times -= 1
                    headers = (
                        {"retry-after": f"{fault.retry_after:g}"}
                        if fault.retry_after is not None
                        else {}
                    )
                    message = (
                        "You have exceeded a secondary rate limit"
                        if fault.status in (403, 429)
                        else "Server Error"
                    )
                    return _error(fault.status, message, headers)
            if self.rate_remaining <= 0 and time.time() < self.rate_reset:
                return _error(403, "API rate limit exceeded for installation.")
            if self.rate_remaining <= 0:
                self.rate_remaining = self.rate_limit
                self.rate_reset = int(time.time()) + 3600
            self.rate_remaining -= 1
        return None

    def _scope_exists(self, scope: str) -> bool:
        kind, _, name = scope.partition("/")
        if kind == "repos":
            return name.lower() in self.repos
        return name.split("/")[0].lower() in self.installations

    def _assign(self, runner: FakeRunner) -> FakeJob | None:
        """The oldest queued job this runner can take (GitHub's choice, simplified)."""
        labels = {label.lower() for label in runner.labels}
        for job in sorted(self.job_table.values(), key=lambda j: (j.created_at, j.id)):
            if job.status != "queued" or not {x.lower() for x in job.labels} <= labels:
                continue
            kind, _, name = runner.scope.partition("/")
            owner = job.repository.split("/")[0].lower()
            if kind == "repos" and name.lower() != job.repository.lower():
                continue
            if kind == "orgs" and name.lower() != owner:
                continue
            return job
        return None

    def _paged(self, request: Request, key: str, items: list[Any]) -> JSONResponse:
        per_page = min(100, max(1, int(request.query_params.get("per_page", "30") or 30)))
        page = max(1, int(request.query_params.get("page", "1") or 1))
        chunk = items[(page - 1) * per_page : page * per_page]
        headers = {}
        if page * per_page < len(items):
            query = dict(request.query_params)
            query.update({"per_page": str(per_page), "page": str(page + 1)})
            next_url = request.url.include_query_params(**query)
            headers["link"] = f'<{next_url}>; rel="next"'
        return JSONResponse({"total_count": len(items), key: chunk}, headers=headers)

    def iter_runners(self, scope: str) -> Iterator[FakeRunner]:
        """The runners registered on ``scope`` (``repos/o/r``, ``orgs/o``), by id."""
        for runner in sorted(self.runner_table.values(), key=lambda r: r.id):
            if runner.scope.lower() == scope.lower():
                yield runner


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"message": message, "documentation_url": "https://docs.github.com/rest"},
        status_code=status,
        headers=headers,
    )


async def _json_body(request: Request) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY:
        return None
    try:
        return json.loads(body or b"{}")
    except ValueError:
        return None


def _routes(app: FastAPI, fake: FakeGitHub) -> None:
    """The REST contract and the stand-in runner protocol."""
    p = fake.prefix

    @app.get(p + "/app")
    async def get_app() -> Any:
        return {
            "id": fake.app_id,
            "slug": "stoker-fake",
            "client_id": fake.client_id,
            "name": "stoker (fake)",
        }

    @app.get(p + "/rate_limit")
    async def rate_limit() -> Any:
        with fake.lock:
            core = {
                "limit": fake.rate_limit,
                "remaining": fake.rate_remaining,
                "reset": fake.rate_reset,
            }
        return {"resources": {"core": core}, "rate": core}

    @app.get(p + "/app/installations")
    async def installations() -> Any:
        with fake.lock:
            return [
                {"id": i, "account": {"login": o, "type": "Organization"}}
                for o, i in fake.installations.items()
            ]

    async def installation_of(owner: str) -> Any:
        with fake.lock:
            found = fake.installations.get(owner.lower())
        if found is None:
            return _error(404, "Not Found")
        return {"id": found, "account": {"login": owner}}

    @app.get(p + "/repos/{owner}/{repo}/installation")
    async def repo_installation(owner: str, repo: str) -> Any:
        with fake.lock:
            known = f"{owner}/{repo}".lower() in fake.repos
        return await installation_of(owner) if known else _error(404, "Not Found")

    @app.get(p + "/orgs/{org}/installation")
    async def org_installation(org: str) -> Any:
        return await installation_of(org)

    @app.get(p + "/enterprises/{enterprise}/installation")
    async def enterprise_installation(enterprise: str) -> Any:
        return await installation_of(enterprise)

    @app.post(p + "/app/installations/{installation}/access_tokens")
    async def access_token(installation: int) -> Any:
        with fake.lock:
            if installation not in fake.installations.values():
                return _error(404, "Not Found")
            token = "ghs_" + secrets.token_hex(18)
            expires = _now() + timedelta(seconds=fake.token_lifetime)
            fake.tokens[token] = (installation, expires)
        return JSONResponse(
            {
                "token": token,
                "expires_at": _iso(expires),
                "permissions": {"administration": "write"},
                "repository_selection": "all",
            },
            status_code=201,
        )

    scopes = ("/repos/{owner}/{name}", "/orgs/{owner}", "/enterprises/{owner}")

    def scope_of(request: Request) -> str:
        path = request.url.path[len(p) :] if p else request.url.path
        parts = path.strip("/").split("/")
        return "/".join(parts[:3] if parts[0] == "repos" else parts[:2])

    for prefix in scopes:

        @app.post(p + prefix + "/actions/runners/generate-jitconfig")
        async def generate_jitconfig(request: Request) -> Any:
            scope = scope_of(request)
            body = await _json_body(request)
            if not isinstance(body, dict):
                return _error(400, "Problems parsing JSON")
            name, labels = body.get("name"), body.get("labels")
            group = body.get("runner_group_id")
            if not isinstance(name, str) or not name or len(name) > 64:
                return _error(422, "Invalid request: name")
            if (
                not isinstance(labels, list)
                or not 1 <= len(labels) <= 100
                or not all(isinstance(x, str) and x for x in labels)
            ):
                return _error(422, "Invalid request: labels")
            if not isinstance(group, int):
                return _error(422, "Invalid request: runner_group_id")
            with fake.lock:
                if not fake._scope_exists(scope):
                    return _error(404, "Not Found")
                if any(r.name == name for r in fake.iter_runners(scope)):
                    return _error(409, "Already exists - A runner with the same name exists")
                runner = FakeRunner(
                    id=next(fake._ids),
                    name=name,
                    scope=scope,
                    labels=list(labels),
                    group_id=group,
                    secret=secrets.token_hex(16),
                )
                fake.runner_table[runner.id] = runner
            config = {
                "url": fake.url.removesuffix(p) if p else fake.url,
                "runner_id": runner.id,
                "runner_name": name,
                "secret": runner.secret,
            }
            encoded = base64.b64encode(json.dumps(config).encode()).decode()
            return JSONResponse(
                {"runner": runner.api(), "encoded_jit_config": encoded}, status_code=201
            )

        @app.get(p + prefix + "/actions/runners")
        async def list_runners(request: Request) -> Any:
            scope = scope_of(request)
            with fake.lock:
                if not fake._scope_exists(scope):
                    return _error(404, "Not Found")
                items = [r.api() for r in fake.iter_runners(scope)]
            return fake._paged(request, "runners", items)

        @app.get(p + prefix + "/actions/runners/downloads")
        async def downloads(request: Request) -> Any:
            v = fake.runner_version
            return [
                {
                    "os": "linux",
                    "architecture": arch,
                    "download_url": f"https://github.com/actions/runner/releases/download/v{v}/"
                    f"actions-runner-linux-{arch}-{v}.tar.gz",
                    "filename": f"actions-runner-linux-{arch}-{v}.tar.gz",
                    "sha256_checksum": "0" * 64,
                }
                for arch in ("x64", "arm64")
            ]

        @app.get(p + prefix + "/actions/runners/{runner_id}")
        async def get_runner(request: Request, runner_id: int) -> Any:
            scope = scope_of(request)
            with fake.lock:
                runner = fake.runner_table.get(runner_id)
                if runner is None or runner.scope.lower() != scope.lower():
                    return _error(404, "Not Found")
                return runner.api()

        @app.delete(p + prefix + "/actions/runners/{runner_id}")
        async def delete_runner(request: Request, runner_id: int) -> Any:
            scope = scope_of(request)
            with fake.lock:
                runner = fake.runner_table.get(runner_id)
                if runner is None or runner.scope.lower() != scope.lower():
                    return _error(404, "Not Found")
                if runner.busy:
                    return _error(
                        422, f'Bad request - Runner "{runner.name}" is still running a job"'
                    )
                del fake.runner_table[runner_id]
            return Response(status_code=204)

    for prefix in scopes[1:]:

        @app.get(p + prefix + "/actions/runner-groups")
        async def runner_groups(request: Request) -> Any:
            scope = scope_of(request)
            with fake.lock:
                if not fake._scope_exists(scope):
                    return _error(404, "Not Found")
                owner = scope.split("/")[1].lower()
                groups = fake.groups.get(owner, [{"id": 1, "name": "Default"}])
            items = [{**g, "default": g["id"] == 1} for g in groups]
            return fake._paged(request, "runner_groups", items)

    @app.get(p + "/repos/{owner}/{repo}/actions/runs")
    async def runs(request: Request, owner: str, repo: str) -> Any:
        repository = f"{owner}/{repo}".lower()
        status = request.query_params.get("status")
        with fake.lock:
            if repository not in fake.repos:
                return _error(404, "Not Found")
            items = [
                {"id": j.run_id, "status": j.status, "name": "ci"}
                for j in sorted(fake.job_table.values(), key=lambda j: j.id)
                if j.repository.lower() == repository and (status is None or j.status == status)
            ]
        return fake._paged(request, "workflow_runs", items)

    @app.get(p + "/repos/{owner}/{repo}/actions/runs/{run_id}/jobs")
    async def run_jobs(request: Request, owner: str, repo: str, run_id: int) -> Any:
        repository = f"{owner}/{repo}".lower()
        with fake.lock:
            items = [
                j.api()
                for j in fake.job_table.values()
                if j.run_id == run_id and j.repository.lower() == repository
            ]
        if not items:
            return _error(404, "Not Found")
        return fake._paged(request, "jobs", items)

    @app.get(p + "/repos/{owner}/{repo}/actions/jobs/{job_id}")
    async def get_job(owner: str, repo: str, job_id: int) -> Any:
        with fake.lock:
            job = fake.job_table.get(job_id)
            if job is None or job.repository.lower() != f"{owner}/{repo}".lower():
                return _error(404, "Not Found")
            return job.api()

    # --- the stand-in runner's protocol (not GitHub's; see the module docstring)

    def runner_of(body: Any) -> FakeRunner | JSONResponse:
        if not isinstance(body, dict) or not isinstance(body.get("runner_id"), int):
            return _error(400, "runner_id and secret required")
        runner = fake.runner_table.get(body["runner_id"])
        if runner is None or not secrets.compare_digest(runner.secret, str(body.get("secret"))):
            return _error(401, "unknown runner or wrong secret")
        return runner

    @app.post("/_fake/runner/session")
    async def session(request: Request) -> Any:
        body = await _json_body(request)
        with fake.lock:
            runner = runner_of(body)
            if isinstance(runner, JSONResponse):
                return runner
            if runner.sessions:
                return _error(409, "this JIT configuration was used already")
            runner.sessions += 1
            runner.status, runner.last_seen = "online", time.monotonic()
        return {"ok": True}

    @app.post("/_fake/runner/acquire")
    async def acquire(request: Request) -> Any:
        body = await _json_body(request)
        wait = min(30.0, float(body.get("wait", 10))) if isinstance(body, dict) else 10.0
        deadline = time.monotonic() + wait

        def take() -> Any:
            with fake.lock:
                while True:
                    runner = runner_of(body)
                    if isinstance(runner, JSONResponse):
                        return runner
                    runner.last_seen = time.monotonic()
                    job = fake._assign(runner)
                    if job is not None:
                        job.status, job.started_at = "in_progress", _now()
                        job.runner_id, job.runner_name = runner.id, runner.name
                        runner.busy, runner.job_id = True, job.id
                        fake._emit(job)
                        return {"job": {"id": job.id, "run": job.run}}
                    left = deadline - time.monotonic()
                    if left <= 0 or fake._server is None or fake._server.should_exit:
                        return Response(status_code=204)
                    fake._job_ready.wait(min(left, 0.5))

        return await asyncio.to_thread(take)

    @app.post("/_fake/runner/heartbeat")
    async def heartbeat(request: Request) -> Any:
        body = await _json_body(request)
        with fake.lock:
            runner = runner_of(body)
            if isinstance(runner, JSONResponse):
                return runner
            runner.last_seen = time.monotonic()
        return {"ok": True}

    @app.post("/_fake/runner/complete")
    async def complete(request: Request) -> Any:
        body = await _json_body(request)
        with fake.lock:
            runner = runner_of(body)
            if isinstance(runner, JSONResponse):
                return runner
            job = fake.job_table.get(body.get("job_id", -1))
            if job is None or job.runner_id != runner.id or job.status != "in_progress":
                return _error(409, "not this runner's job")
            conclusion = body.get("conclusion")
            job.status, job.completed_at = "completed", _now()
            job.conclusion = conclusion if conclusion in ("success", "failure") else "failure"
            fake._emit(job)
            # An ephemeral runner is removed once its job is done.
            del fake.runner_table[runner.id]
        return {"ok": True}
