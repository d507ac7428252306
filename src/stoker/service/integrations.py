"""Integrations: pieces of ``stoker serve`` that bring work from elsewhere (CI services).

The service stays generic: an integration submits ordinary jobs through
:meth:`Service.submit <stoker.service.service.Service.submit>` (to the
scheduler a CI runner is one kind of job), may add routes to the REST API
(webhooks, its own views) and metrics to the service's registry, and runs its
own loop between :meth:`Integration.start` and :meth:`Integration.stop`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fastapi import APIRouter
    from prometheus_client import CollectorRegistry

    from stoker.service.service import Service


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
