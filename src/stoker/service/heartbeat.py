"""The supervisor's heartbeat: renew leases, notice cancels and take-overs, sweep.

A mixin of :class:`~stoker.service.supervisor.Supervisor` (split out to keep
that module readable; the lease rules are in its docstring).  Every
``heartbeat_seconds`` it renews this host's claim and its jobs' leases in one
transaction, stops the runs whose job is no longer theirs, and recovers the
jobs of hosts that stopped heartbeating.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from stoker.service.db import (
    Database,
    DatabaseError,
    cancel_requests,
    heartbeat,
    recover_expired,
    renew_leases,
)
from stoker.service.jobs import JobState
from stoker.service.jobviews import JobView
from stoker.service.models import utcnow

if TYPE_CHECKING:
    from stoker.service.config import ServiceConfig
    from stoker.service.pools import Fleet
    from stoker.service.runs import JobRun


class Heartbeats:
    """Lease renewal and sweeping, for :class:`~stoker.service.supervisor.Supervisor`."""

    if TYPE_CHECKING:
        config: ServiceConfig
        db: Database
        host: str
        incarnation: str
        jobs: dict[str, JobRun]
        displaced: bool
        fleet: Fleet
        _log: logging.Logger
        _wake: asyncio.Event

        def _observe(self, method: str, *args: object) -> None: ...

        def _observe_transition(
            self, view: JobView, source: str | JobState | None, target: JobState
        ) -> None: ...

        def _publish_queue_depth(self) -> Coroutine[Any, Any, None]: ...

        def _publish_vms(self) -> None: ...

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_seconds)
            try:
                await self.heartbeat_once()
            except DatabaseError:
                pass  # logged once by the database's health; leases wait (see the docstring)
            except Exception:
                self._log.exception("heartbeat failed")

    async def heartbeat_once(self) -> None:
        """Renew leases, notice cancels and take-overs, recover other hosts' lost jobs."""
        now = utcnow()
        attempts = {job_id: run.job.attempt for job_id, run in self.jobs.items()}
        local = list(attempts)
        until = now + timedelta(seconds=self.config.lease_seconds)

        def beat(session: Session) -> tuple[bool, set[str], set[str]]:
            alive = heartbeat(session, host=self.host, incarnation=self.incarnation, now=now)
            held = renew_leases(
                session, host=self.host, job_ids=local, until=until, attempts=attempts
            )
            return alive, held, cancel_requests(session, job_ids=local)

        alive, held, cancels = await self.db.run(beat)
        if not alive and not self.displaced:
            self.displaced = True
            self._log.error(
                "another stoker serve now runs as host %r: this one claims no more jobs",
                self.host,
            )
        for job_id in local:
            run = self.jobs.get(job_id)
            if run is None:
                continue
            if job_id not in held:
                run.stop("lease_lost")
            elif job_id in cancels:
                run.stop("cancel")
        await self.sweep(now)
        self.fleet.drop_dead_idle()
        await self._publish_queue_depth()
        self._publish_vms()

    async def sweep(self, now: datetime | None = None) -> int:
        """Recover jobs whose host stopped heartbeating; return how many.

        Only once this host's database calls have all worked for a lease
        period (the rule in the module docstring): right after an outage the
        leases of live hosts have expired too, and they renew first.
        """
        if not self.db.steady_for(self.config.lease_seconds):
            return 0
        changes = await self.db.run(
            functools.partial(
                recover_expired,
                host=self.host,
                now=now or utcnow(),
                local=set(self.jobs),  # ours and running: the heartbeat just renewed them
                lease_seconds=self.config.lease_seconds,
                retry_limit=self.config.retry_limit,
            )
        )
        for view, source, target in changes:
            self._log.warning(
                "job %s: %s -> %s (%s)",
                view.id,
                source,
                target,
                view.reason,
                extra={"job": view.id, "state": target.value, "host": self.host},
            )
            self._observe_transition(view, source, target)
            self._observe("infrastructure_failure", "host_lost")
        if changes:
            self._wake.set()
        return len(changes)
