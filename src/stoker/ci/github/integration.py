"""GitHub Actions as a ``stoker serve`` integration: webhook, reconcile loop, metrics.

* ``POST /v1/github/webhook``: GitHub's deliveries (no bearer token: the
  signature is the authentication).  ``ping`` -> 200; ``workflow_job`` ->
  recorded (see :mod:`.demand`), the loop woken, 202; anything unsigned,
  badly signed, oversized, malformed or of another event -> 4xx, nothing kept.
* ``GET /v1/github/runners`` (``read`` scope): the managed runners and their states.
* The loop: one host at a time (a lease in the database) runs reconcile passes
  (:mod:`.reconcile`): after every accepted delivery, and every
  ``reconcile_seconds`` with a sweep of GitHub's queued jobs and garbage
  collection.  GitHub being down (5xx, timeouts) only delays passes: running
  VMs are never touched because GitHub did not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from stoker.ci.github.client import GitHubClient
from stoker.ci.github.config import GitHubConfig, read_secret_file
from stoker.ci.github.demand import ApiSweep, Demand, Sighting
from stoker.ci.github.models import (
    GitHubJob,
    GitHubRunner,
    IntegrationLease,
    JobStatus,
    RunnerState,
)
from stoker.ci.github.reconcile import PassReport, Reconciler
from stoker.ci.github.webhook import MAX_BODY, WebhookRejected, parse_delivery
from stoker.errors import InfrastructureError, StokerError, UsageError
from stoker.service.apiutil import ERRORS, Reader
from stoker.service.integrations import CorrectionView, IntegrationView
from stoker.service.models import utcnow

if TYPE_CHECKING:
    import httpx

    from stoker.service.service import Service

log = logging.getLogger("stoker.github")

LEASE = "github"
#: Webhook passes closer together than this are merged into one.
MIN_PASS_INTERVAL = 0.2


class RunnerView(BaseModel):
    """One managed runner, as ``GET /v1/github/runners`` shows it."""

    name: str
    pool: str
    target: str
    state: str
    runner_id: int | None
    job_id: str | None
    github_job_id: int | None
    created_at: datetime
    updated_at: datetime
    deadline: datetime | None
    reason: str | None


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.queued = Gauge(
            "stoker_github_queued_jobs",
            "Workflow jobs GitHub has queued for each pool's labels.",
            ["pool"],
            registry=registry,
        )
        self.runners = Gauge(
            "stoker_github_runners", "Managed runners by state.", ["state"], registry=registry
        )
        self.api_calls = Gauge(
            "stoker_github_api_calls",
            "GitHub REST API calls made since start, by route.",
            ["route"],
            registry=registry,
        )
        self.rate_remaining = Gauge(
            "stoker_github_rate_limit_remaining",
            "GitHub API requests left in the current rate-limit window.",
            registry=registry,
        )
        self.webhooks = Counter(
            "stoker_github_webhooks",
            "Webhook deliveries by event and outcome.",
            ["event", "outcome"],
            registry=registry,
        )
        self.corrections = Counter(
            "stoker_github_reconcile_corrections",
            "What reconcile passes repaired: expired runners, orphans deleted, jobs found.",
            ["kind"],
            registry=registry,
        )
        self.job_start = Histogram(
            "stoker_github_job_start_seconds",
            "From stoker first seeing a queued workflow job to GitHub starting it on a runner.",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
            registry=registry,
        )
        self.runner_online = Histogram(
            "stoker_github_runner_online_seconds",
            "From a runner's record being written to its runner process running in its VM.",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
            registry=registry,
        )


class GitHubIntegration:
    """The GitHub Actions runner manager of one ``stoker serve``."""

    name = "github"

    def __init__(
        self,
        config: GitHubConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self._transport = transport
        self._service: Service | None = None
        self._client: GitHubClient | None = None
        self._demand: Demand | None = None
        self._sweep: ApiSweep | None = None
        self.reconciler: Reconciler | None = None
        self._secret: bytes | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._metrics: _Metrics | None = None
        self._registry: CollectorRegistry | None = None
        self._holder = f"{socket.gethostname()}:{id(self):x}"
        self.leader = False
        self.last_pass: PassReport | None = None
        self.last_pass_at: datetime | None = None
        self.last_sweep_at: datetime | None = None
        self.passes = 0
        self.corrections = 0
        #: The kind and time of the last correction a pass made.
        self.last_correction: CorrectionView | None = None
        self.last_error: str | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self, service: Service) -> None:
        """Check the configuration against the service and GitHub's credentials; start the loop."""
        self._service = service
        cfg = self.config
        if cfg.webhook_secret_file is not None:
            try:
                self._secret = read_secret_file(cfg.webhook_secret_file, "webhook secret")
            except ValueError as exc:
                raise UsageError(f"github.webhook_secret_file: {exc}") from None
        for a, b in cfg.overlapping_pools():
            log.warning(
                "github: pools %s and %s serve overlapping labels; the one with fewer labels "
                "gets the jobs both could run",
                a,
                b,
            )
        policy = service.config.submitters.policy("github")
        wanted = sum(service.config.pools[p].max for p in cfg.pools)
        if policy.max_concurrent < wanted:
            log.warning(
                "github: submitter 'github' may run %d jobs at once but the pools allow %d "
                "runners; raise [submitters.overrides.github] max_concurrent",
                policy.max_concurrent,
                wanted,
            )
        self._client = GitHubClient(cfg, transport=self._transport)
        try:
            await self._client.check_auth()
        except InfrastructureError as exc:
            # GitHub down or out of budget: the service still starts (running jobs and
            # restarts must not depend on GitHub); the loop retries.
            log.warning("github: cannot check the credentials now (%s); will retry", exc)
        except StokerError:
            await self._client.aclose()
            self._client = None
            raise
        self._demand = Demand(cfg, service.db)
        self._sweep = ApiSweep(cfg, service.db, self._client)
        self.reconciler = Reconciler(
            cfg,
            service,
            self._client,
            controller_label=self.controller_label(service),
            runner_user=cfg.runner_user,
            runner_dir=cfg.runner_dir,
        )
        self._task = asyncio.create_task(self._loop(), name="github-reconcile")

    async def stop(self) -> None:
        """Stop the loop and close the API client (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.leader and self._service is not None:
            with contextlib.suppress(Exception):
                await self._service.db.run(self._release_lease)
            self.leader = False
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def controller_label(self, service: Service) -> str:
        """The label of every runner this service manages.

        See :meth:`GitHubConfig.controller_label`.
        """
        url = service.config.database_url
        # The database identifies the installation; its password must not shape the label.
        scope = url.split("@", 1)[-1] if "@" in url else url
        return self.config.controller_label(scope)

    # ------------------------------------------------------------------ the loop

    def wake(self) -> None:
        """Ask for a pass soon (a webhook changed the demand)."""
        self._wake.set()

    async def _loop(self) -> None:
        period = self.config.reconcile_seconds
        next_full = 0.0  # the first pass sweeps: jobs queued while stoker was down
        while True:
            now = time.monotonic()
            full = now >= next_full
            try:
                assert self._service is not None
                if await self._service.db.run(self._take_lease):
                    self.leader = True
                    await self.run_once(full=full)
                else:
                    self.leader = False
                if full:
                    next_full = now + period
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # GitHub or the database down: try again later
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("github: reconcile pass failed: %s", self.last_error)
                next_full = now + min(period, 10.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_full - time.monotonic())):
                    await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(MIN_PASS_INTERVAL)

    async def run_once(self, *, full: bool) -> PassReport:
        """One pass now (``full``: sweep GitHub and collect garbage too)."""
        assert self._demand is not None and self._sweep is not None
        assert self.reconciler is not None
        now = utcnow()
        found = 0
        if full:
            sightings = await self._sweep.poll(now)
            results = await self._demand.observe(sightings)
            found = sum(1 for r in results if r == "new")
            self.last_sweep_at = now
        rechecked = await self._sweep.recheck(now)
        if rechecked:
            results = await self._demand.observe(rechecked)
            found += sum(1 for r in results if r == "advanced")
        report = await self.reconciler.run_pass(collect=full)
        self.passes += 1
        self.last_pass, self.last_pass_at = report, utcnow()
        corrections = report.corrections + found
        self.corrections += corrections
        for kind, value in _correction_kinds(report, found):
            if value:
                self.last_correction = CorrectionView(kind=kind, at=utcnow())
        self.last_error = "; ".join(report.errors[:3]) or None
        await self._observe(report, found)
        if corrections or report.created or report.deregistered:
            log.info(
                "github: pass: %d created, %d online, %d finished, %d deregistered, "
                "%d corrections (%d jobs found by asking GitHub)",
                report.created,
                report.online,
                report.finished,
                report.deregistered,
                corrections,
                found,
                extra={"github_pass": self.passes},
            )
        return report

    def _take_lease(self, session: Session) -> bool:
        now = utcnow()
        until = now + timedelta(seconds=max(3 * self.config.reconcile_seconds, 30))
        lease = session.get(IntegrationLease, LEASE, with_for_update=True)
        if lease is None:
            session.add(IntegrationLease(name=LEASE, holder=self._holder, until=until))
            return True
        if lease.holder == self._holder or lease.until < now:
            lease.holder, lease.until = self._holder, until
            return True
        return False

    def _release_lease(self, session: Session) -> None:
        lease = session.get(IntegrationLease, LEASE, with_for_update=True)
        if lease is not None and lease.holder == self._holder:
            session.delete(lease)

    # ------------------------------------------------------------------ webhooks

    async def receive(self, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """Handle one delivery; returns the HTTP status and body to answer with."""
        if self._secret is None or self._demand is None:
            return 404, {"error": "webhooks are not configured (github.webhook_secret_file)"}
        event = headers.get("x-github-event", "?")[:40]
        try:
            delivery = parse_delivery(self._secret, body, headers)
        except WebhookRejected as exc:
            self._count_webhook(event, f"rejected_{exc.status}")
            log.warning("github webhook refused (%d): %s", exc.status, exc.message)
            return exc.status, {"error": exc.message}
        if delivery.job is None:
            self._count_webhook("ping", "ok")
            return 200, {"ok": True}
        sighting = Sighting.of_webhook(delivery.job)
        if sighting is None:
            self._count_webhook(event, "ignored")
            return 202, {"recorded": "ignored", "why": "unknown status"}
        (outcome,) = await self._demand.observe([sighting])
        self._count_webhook(event, outcome)
        if outcome in ("new", "advanced"):
            self.wake()
        return 202, {"recorded": outcome}

    def _count_webhook(self, event: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.webhooks.labels(
                event=event if event in ("ping", "workflow_job") else "other", outcome=outcome
            ).inc()

    def router(self) -> APIRouter:
        """``POST /v1/github/webhook`` and ``GET /v1/github/runners``."""
        router = APIRouter(prefix="/v1/github", tags=["github"])

        @router.post(
            "/webhook",
            summary="GitHub's webhook deliveries (workflow_job, ping); signed, no token.",
            status_code=202,
        )
        async def webhook(request: Request) -> JSONResponse:
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
                return JSONResponse({"error": "the body is too large"}, status_code=413)
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY:
                    return JSONResponse({"error": "the body is too large"}, status_code=413)
            headers = {k.lower(): v for k, v in request.headers.items()}
            status, answer = await self.receive(bytes(body), headers)
            return JSONResponse(answer, status_code=status)

        @router.get("/runners", responses=ERRORS, summary="The runners stoker manages.")
        async def runners(principal: Reader, all: bool = False) -> list[RunnerView]:
            return await self.runners(include_destroyed=all)

        return router

    async def runners(self, *, include_destroyed: bool = False) -> list[RunnerView]:
        """The managed runners, newest first (destroyed ones only when asked)."""
        assert self._service is not None

        def read(session: Session) -> list[RunnerView]:
            query = select(GitHubRunner).order_by(GitHubRunner.created_at.desc()).limit(1000)
            if not include_destroyed:
                query = query.where(GitHubRunner.state != "destroyed")
            return [
                RunnerView(
                    name=r.name,
                    pool=r.pool,
                    target=r.target,
                    state=r.state,
                    runner_id=r.runner_id,
                    job_id=r.job_id,
                    github_job_id=r.github_job_id,
                    created_at=r.created_at,
                    updated_at=r.updated_at,
                    deadline=r.deadline,
                    reason=r.reason,
                )
                for r in session.scalars(query)
            ]

        return await self._service.db.run(read, write=False)

    # ------------------------------------------------------------------ observing

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Add the GitHub metrics to ``registry`` (the service's; again: no change)."""
        if registry is not self._registry:
            self._registry, self._metrics = registry, _Metrics(registry)

    async def _observe(self, report: PassReport, found: int) -> None:
        metrics = self._metrics
        if metrics is None or self._service is None:
            return

        def read(session: Session) -> tuple[dict[str, int], dict[str, int]]:
            queued = dict(
                session.execute(
                    select(GitHubJob.pool, func.count())
                    .where(GitHubJob.status == int(JobStatus.QUEUED))
                    .group_by(GitHubJob.pool)
                ).all()
            )
            states = dict(
                session.execute(
                    select(GitHubRunner.state, func.count()).group_by(GitHubRunner.state)
                ).all()
            )
            return queued, states

        queued, states = await self._service.db.run(read, write=False)
        assert self._demand is not None
        started = self._demand.take_start_latencies()
        assert self._client is not None
        for pool in self.config.pools:
            metrics.queued.labels(pool=pool).set(queued.get(pool, 0))
        for state in RunnerState:
            metrics.runners.labels(state=state.value).set(states.get(state.value, 0))
        for route, calls in self._client.stats.calls.items():
            metrics.api_calls.labels(route=route).set(calls)
        if self._client.rate_limit.remaining is not None:
            metrics.rate_remaining.set(self._client.rate_limit.remaining)
        for kind, value in _correction_kinds(report, found):
            if value:
                metrics.corrections.labels(kind=kind).inc(value)
        for seconds in started:
            metrics.job_start.observe(seconds)
        for seconds in report.online_seconds:
            metrics.runner_online.observe(seconds)

    async def view(self) -> IntegrationView:
        """For ``GET /v1/integrations``: runners by state (all hosts'), this host's loop."""
        service = self._service
        states: dict[str, int] = {}
        if service is not None:
            query = select(GitHubRunner.state, func.count()).group_by(GitHubRunner.state)
            rows = await service.db.run(lambda s: s.execute(query).all(), write=False)
            states = {state: n for state, n in rows}
        client, demand = self._client, self._demand
        return IntegrationView(
            name=self.name,
            targets=[f"{t.kind}:{t.name}" for t in self.config.targets],
            # Destroyed runners are history (they pile up): only the live states.
            runners={
                s.value: states.get(s.value, 0)
                for s in RunnerState
                if s is not RunnerState.DESTROYED
            },
            leader=self.leader,
            rate_limit_remaining=client.rate_limit.remaining if client else None,
            last_webhook_at=demand.last_webhook_at if demand else None,
            last_pass_at=self.last_pass_at,
            last_correction=self.last_correction,
            last_error=self.last_error,
        )

    def status(self) -> dict[str, Any]:
        """For ``/health``: the loop, the last pass, webhooks and the API budget."""
        client = self._client
        return {
            "leader": self.leader,
            "passes": self.passes,
            "last_pass_at": self.last_pass_at.isoformat() if self.last_pass_at else None,
            "last_sweep_at": self.last_sweep_at.isoformat() if self.last_sweep_at else None,
            "last_webhook_at": (
                self._demand.last_webhook_at.isoformat()
                if self._demand is not None and self._demand.last_webhook_at
                else None
            ),
            "corrections": self.corrections,
            "last_error": self.last_error,
            "rate_limit_remaining": client.rate_limit.remaining if client else None,
            "api_calls": client.stats.total if client else 0,
        }


def _correction_kinds(report: PassReport, found: int) -> tuple[tuple[str, int], ...]:
    """What a pass repaired, by kind (the metric's label and the view's ``kind``)."""
    return (
        ("expired", report.expired),
        ("orphan_runners", report.gc_runners),
        ("orphan_jobs", report.gc_jobs),
        ("jobs_found", found),
    )
