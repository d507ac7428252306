"""GitLab as a ``stoker serve`` integration: runners registered and verified at start.

GitLab's jobs reach stoker through gitlab-runner (the manager on this host),
which calls ``stoker gitlab-executor`` against this service's API: a GitLab
job is a session job of a pool, scheduled like every other job.  What the
service adds is registration: with ``register_on_start`` (the default) it
runs :func:`~stoker.ci.gitlab.register.register` when it starts, and again
every ``VERIFY_SECONDS``, so that a runner GitLab removed is recreated and
the file gitlab-runner reads stays in step.  GitLab being unreachable never
stops the service from starting: the pass is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from stoker.ci.gitlab.client import GitLabClient
from stoker.ci.gitlab.register import Registrar, Report, register
from stoker.errors import StokerError, UsageError
from stoker.service.integrations import CorrectionView, IntegrationView

if TYPE_CHECKING:
    from fastapi import APIRouter

    from stoker.service.config import ServiceConfig
    from stoker.service.service import Service

log = logging.getLogger("stoker.gitlab")

#: How often registered runners are verified (and missing ones recreated).
VERIFY_SECONDS: Final = 3600.0
#: How soon a failed pass (GitLab down) is retried.
RETRY_SECONDS: Final = 60.0


def read_token(path: Path, what: str) -> str:
    """One token from ``path`` (:class:`UsageError` naming the file otherwise)."""
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} from {path}: {exc.strerror}") from None
    if not value or any(c.isspace() for c in value):
        raise UsageError(f"{path} must hold exactly one {what}")
    return value


def registrar_for(config: ServiceConfig) -> Registrar:
    """What :func:`register` needs, from the service's configuration."""
    gitlab = config.gitlab
    assert gitlab is not None
    listen = config.listen
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    return Registrar(
        config=gitlab,
        limits={name: config.pools[name].max for name in gitlab.pools},
        service_url=gitlab.service_url or f"http://{host}:{listen.port}",
        state_file=gitlab.state_file or config.state_dir / "gitlab-runners.json",
        **({"stoker": str(gitlab.stoker)} if gitlab.stoker is not None else {}),
    )


class GitLabIntegration:
    """Registers and verifies the pools' GitLab runners (see the module docstring)."""

    name = "gitlab"

    def __init__(self, config: ServiceConfig, *, interval: float = VERIFY_SECONDS) -> None:
        assert config.gitlab is not None
        self.config = config
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self.last_report: Report | None = None
        self.last_pass_at: float | None = None
        self.last_error: str | None = None
        #: The last runner a pass had to re-create (GitLab had removed it) or delete.
        self.last_correction: CorrectionView | None = None
        self._registry: CollectorRegistry | None = None
        self._runners: Gauge | None = None
        self._failures: Counter | None = None

    def router(self) -> APIRouter | None:
        """None: gitlab-runner talks to the jobs API, GitLab sends nothing here."""
        return None

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """``stoker_gitlab_runners`` and ``stoker_gitlab_registration_failures_total``."""
        if registry is self._registry:
            return
        self._registry = registry
        self._runners = Gauge(
            "stoker_gitlab_runners",
            "GitLab runners registered for the pools, as of the last pass.",
            registry=registry,
        )
        self._failures = Counter(
            "stoker_gitlab_registration_failures",
            "Registration passes that failed (GitLab unreachable or refusing).",
            registry=registry,
        )

    async def start(self, service: Service) -> None:
        """Check what can be checked without GitLab; start the registration loop."""
        gitlab = self.config.gitlab
        assert gitlab is not None
        read_token(gitlab.token_file, "GitLab access token")
        registrar = registrar_for(self.config)
        registrar.token_file()
        if gitlab.register_on_start:
            self._task = asyncio.get_running_loop().create_task(self._loop(registrar))

    async def _loop(self, registrar: Registrar) -> None:
        gitlab = registrar.config
        while True:
            delay = self.interval
            try:
                token = read_token(gitlab.token_file, "GitLab access token")
                async with GitLabClient(gitlab.url, token) as client:
                    report = await register(registrar, client, lambda m: log.info("gitlab: %s", m))
                self.last_report, self.last_error = report, None
                for kind, names in (("replaced", report.replaced), ("deleted", report.deleted)):
                    if names:
                        self.last_correction = CorrectionView(kind=kind, at=datetime.now(UTC))
                if self._runners is not None:
                    self._runners.set(len(report.created + report.replaced + report.kept))
            except StokerError as exc:
                self.last_error = str(exc)
                delay = RETRY_SECONDS
                log.warning("gitlab: registration failed (retrying in %gs): %s", delay, exc)
                if self._failures is not None:
                    self._failures.inc()
            self.last_pass_at = time.time()
            await asyncio.sleep(delay)

    async def stop(self) -> None:
        """Stop the loop (idempotent); registered runners stay (jobs may be queued for them)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def view(self) -> IntegrationView:
        """For ``GET /v1/integrations``: the runners of the last registration pass.

        GitLab's runners are registrations, not rows (gitlab-runner on this host
        runs their jobs as session jobs): ``runners`` counts the ``registered``
        ones as of the last pass.  GitLab sends no webhooks here.
        """
        gitlab = self.config.gitlab
        assert gitlab is not None
        report = self.last_report
        registered = len(report.created + report.replaced + report.kept) if report else 0
        at = self.last_pass_at
        return IntegrationView(
            name=self.name,
            targets=[f"{gitlab.url} pool:{pool}" for pool in gitlab.pools],
            runners={"registered": registered},
            leader=self._task is not None,
            rate_limit_remaining=None,
            last_webhook_at=None,
            last_pass_at=datetime.fromtimestamp(at, UTC) if at is not None else None,
            last_correction=self.last_correction,
            last_error=self.last_error,
        )

    def status(self) -> dict[str, Any]:
        """For ``/health``: the last registration pass."""
        report = self.last_report
        return {
            "last_pass_at": self.last_pass_at,
            "last_error": self.last_error,
            "runners": sorted(report.created + report.replaced + report.kept) if report else [],
        }
