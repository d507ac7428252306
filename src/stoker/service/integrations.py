"""Integrations: pieces of ``stoker serve`` that bring work from elsewhere (CI services).

The service stays generic: an integration submits ordinary jobs through
:meth:`Service.submit <stoker.service.service.Service.submit>` (to the
scheduler a CI runner is one kind of job), may add routes to the REST API
(webhooks, its own views) and metrics to the service's registry, and runs its
own loop between :meth:`Integration.start` and :meth:`Integration.stop`.
For the dashboard, each builds its own :class:`IntegrationView`
(``GET /v1/integrations``): the service knows no CI service.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from fastapi import APIRouter
    from prometheus_client import CollectorRegistry

    from stoker.service.service import Service


class CorrectionView(BaseModel):
    """The last thing an integration's reconcile loop had to repair rather than advance."""

    model_config = ConfigDict(frozen=True)

    kind: str = Field(description="What it repaired (github: expired, orphan_runners, ...).")
    at: datetime


class IntegrationView(BaseModel):
    """One integration's state, as this host sees it (for the dashboard's CI panel)."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="github or gitlab.")
    targets: list[str] = Field(description="Where its runners are registered.")
    runners: dict[str, int] = Field(description="Its runners by state (every state, 0 too).")
    leader: bool = Field(description="Whether this host runs its reconcile loop.")
    rate_limit_remaining: int | None = Field(
        description="API calls left in the CI service's rate-limit window (null: unknown)."
    )
    last_webhook_at: datetime | None = Field(description="null: none received by this host.")
    last_pass_at: datetime | None = Field(description="This host's last reconcile pass.")
    last_correction: CorrectionView | None
    last_error: str | None = Field(description="The last pass's error (null: it worked).")


class Integration(Protocol):
    """One integration of a running service."""

    #: Short name (``github``): the API's path prefix and the health report's key.
    name: str

    def router(self) -> APIRouter | None:
        """Routes to add to the REST API (None: none)."""
        ...

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Add the integration's metrics to the service's registry."""
        ...

    async def start(self, service: Service) -> None:
        """Start after the service has started (its database and supervisor are up).

        Raises :class:`~stoker.errors.UsageError` for a configuration that
        cannot work (the service's start-up then fails with that message).
        """
        ...

    async def stop(self) -> None:
        """Stop (idempotent); called before the service stops its jobs."""
        ...

    def status(self) -> dict[str, Any]:
        """A JSON-able summary for the health report."""
        ...

    async def view(self) -> IntegrationView:
        """Its state for ``GET /v1/integrations`` (may read the database)."""
        ...
