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
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from stoker.ci.github.fake_routes import add_routes, error
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
            # GitHub reports a queued job's started_at as its creation time, never null.
            "started_at": _iso(self.started_at or self.created_at),
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
        #: Deliveries queued and not yet sent (or failed): wait_idle waits for 0.
        self._pending = 0
        self._idle = threading.Condition(self._lock)

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
            self._put(Delivery(delivery.delivery_id, delivery.event, delivery.body))

    def redeliver(self, delivery_id: str) -> None:
        """Send a delivery again, same body and id (what GitHub's redeliver button does)."""
        with self._lock:
            found = [d for d in self.deliveries if d.delivery_id == delivery_id]
        if not found:
            raise KeyError(f"no delivery {delivery_id}")
        self._put(Delivery(found[0].delivery_id, found[0].event, found[0].body))

    def ping(self, hook_id: int = 1, app_id: int | None = None) -> None:
        """Send a ``ping``, as GitHub does when a webhook is created."""
        self.emit(
            "ping",
            {
                "zen": "Keep it logically awesome.",
                "hook_id": hook_id,
                "hook": {
                    "type": "App" if app_id is not None else "Repository",
                    "id": hook_id,
                    "name": "web",
                    "active": True,
                    "events": ["workflow_job"],
                    "config": {"content_type": "json", "insecure_ssl": "0", "url": self.url},
                    **({"app_id": app_id} if app_id is not None else {}),
                },
            },
        )

    def _put(self, delivery: Delivery) -> None:
        with self._lock:
            self._pending += 1
        self._queue.put(delivery)

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
            self._put(Delivery(delivery.delivery_id, event, body))

    def wait_idle(self, timeout: float = 30) -> None:
        """Wait until every queued delivery was sent (held ones are not queued)."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._pending == 0, timeout):
                raise TimeoutError("webhook deliveries still pending")

    def _send_loop(self) -> None:
        # trust_env=False: deliveries go to the configured URL only, never through a
        # proxy named by the environment of whoever runs the tests.
        with httpx.Client(timeout=30, trust_env=False) as client:
            while True:
                delivery = self._queue.get()
                if delivery is None:
                    return
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
                    with self._idle:
                        self._pending -= 1
                        self._idle.notify_all()


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
            return error(401, "Requires authentication")
        token = match[1]
        if path.startswith("/app") or path.endswith("/installation"):
            # What GitHub serves to the App itself (its JWT), not to an installation.
            if self.public_key_pem is None:
                return error(401, "A JSON web token could not be decoded")
            try:
                claims = jwt.decode(
                    token,
                    self.public_key_pem,
                    algorithms=["RS256"],
                    options={"require": ["iat", "exp", "iss"]},
                    leeway=0,
                )
            except jwt.PyJWTError as exc:
                return error(401, f"A JSON web token could not be decoded ({exc})")
            if str(claims["iss"]) not in (str(self.app_id), self.client_id):
                return error(401, "'Issuer' claim ('iss') is not a known App")
            if int(claims["exp"]) - int(claims["iat"]) > 600:
                return error(401, "'Expiration time' claim ('exp') is too far in the future")
            return None
        if token in self.static_tokens:
            return None
        entry = self.tokens.get(token)
        if entry is None or entry[1] < _now():
            return error(401, "Bad credentials")
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
                response = error(413, "Payload too large")
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

        add_routes(app, fake)
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
                    return error(fault.status, message, headers)
            if self.rate_remaining <= 0 and time.time() < self.rate_reset:
                return error(403, "API rate limit exceeded for installation.")
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
