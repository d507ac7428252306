"""Prometheus metrics of one ``stoker serve`` process.

Each :class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry`
(never the process-global one), so several services in one process (tests)
do not share or collide on counters.  Names::

    stoker_queue_depth{pool}                    gauge      queued jobs, per pool ("" = none)
    stoker_job_wait_seconds                     histogram  queued -> running
    stoker_boot_seconds{kind=cold|warm}         histogram  VM start until its agent answers
    stoker_vms{state}                           gauge      this host's VMs by state
    stoker_jobs_total{outcome}                  counter    jobs that ended, by final state
    stoker_jobs_finished_total{outcome,cause}   counter    the same, with how the command ended
                                                           (stoker.outcomes: oom, pids_limit,
                                                           disk_full, timeout, kernel_panic,
                                                           vmm_crash, exit, ...; none: it never ran)
    stoker_failures_total{reason}               counter    infrastructure failures, by kind
    stoker_capacity_used{resource=cpus|memory_mb} gauge    what this host's VMs hold
    stoker_capacity_total{resource=cpus|memory_mb} gauge   this host's budget (after overcommit)
    stoker_egress_connections_total{pool,decision} counter guest connections through egress
                                                           proxies (allowed, denied, error)
    stoker_egress_bytes_total{pool,direction=up|down} counter bytes they carried (up: sent)
    stoker_db_up                                gauge      1 while the database takes writes,
                                                           0 while unreachable or its disk is full
    stoker_db_errors_total{kind=unreachable|disk_full} counter  failed database calls
    stoker_db_outages_total                     counter    times the database went away

:class:`Metrics` implements the service's
:class:`~stoker.service.service.Observer` protocol: the service reports
transitions, boots, failures, capacity, VM counts, queue depths and guest
connections as they change (the REST API also refreshes the queue depths from
the database just before each scrape, since other hosts' submissions change
them too).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from stoker.outcomes import CAUSES
from stoker.service.db import DatabaseHealth
from stoker.service.jobs import TERMINAL, JobState
from stoker.service.jobviews import JobView

__all__ = ["CONTENT_TYPE", "Metrics", "failure_kind"]

#: The ``Content-Type`` of :meth:`Metrics.render`'s output.
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

_WAIT_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_BOOT_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
_VM_STATES: Final = ("booting", "idle", "busy", "stopping")
_DECISIONS: Final = ("allowed", "denied", "error")
_LABEL_RE: Final = re.compile(r"[^a-z0-9_]+")


def failure_kind(reason: str) -> str:
    """A bounded label value for a failure ``reason`` (e.g. an exception class name).

    Free text would give every failure its own time series; this keeps the
    first word, lowercased, as ``snake_case`` and at most 40 characters.
    """
    word = reason.strip().split(":", 1)[0].split(None, 1)[0] if reason.strip() else "unknown"
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", word).lower()
    return _LABEL_RE.sub("_", snake).strip("_")[:40] or "unknown"


class Metrics:
    """The service's metrics in a private registry; an :class:`Observer` of the service."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.queue = Gauge(
            "stoker_queue_depth",
            "Queued jobs per pool (pool is empty for jobs that name only an image).",
            ["pool"],
            registry=self.registry,
        )
        self.job_wait = Histogram(
            "stoker_job_wait_seconds",
            "Time from a job's (latest) queueing until its command started running.",
            buckets=_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.boot_seconds = Histogram(
            "stoker_boot_seconds",
            "Time from starting a VM until its agent answered: cold boots and warm "
            "(snapshot-restored) starts.",
            ["kind"],
            buckets=_BOOT_BUCKETS,
            registry=self.registry,
        )
        self.vms = Gauge(
            "stoker_vms", "This host's VMs by state.", ["state"], registry=self.registry
        )
        self.jobs = Counter(
            "stoker_jobs",
            "Jobs that reached a final state, by that state.",
            ["outcome"],
            registry=self.registry,
        )
        self.finished = Counter(
            "stoker_jobs_finished",
            "Jobs that reached a final state, by that state and how their command ended "
            "(none: it never ran).",
            ["outcome", "cause"],
            registry=self.registry,
        )
        self.failures = Counter(
            "stoker_failures",
            "Infrastructure failures (boot, VMM, agent, lost host), by kind.",
            ["reason"],
            registry=self.registry,
        )
        self.capacity_used = Gauge(
            "stoker_capacity_used",
            "Capacity of this host held by its VMs (cpus: vCPUs, memory_mb: MiB).",
            ["resource"],
            registry=self.registry,
        )
        self.capacity_total = Gauge(
            "stoker_capacity_total",
            "Capacity of this host that may be handed out (after overcommit).",
            ["resource"],
            registry=self.registry,
        )
        self.egress_connections = Counter(
            "stoker_egress_connections",
            "Guest connections through the egress proxies of a pool's VMs, by decision.",
            ["pool", "decision"],
            registry=self.registry,
        )
        self.egress_bytes = Counter(
            "stoker_egress_bytes",
            "Bytes carried by the egress proxies of a pool's VMs (up: from the guest).",
            ["pool", "direction"],
            registry=self.registry,
        )
        for outcome in sorted(TERMINAL):
            self.jobs.labels(outcome=outcome.value)  # export zeros: rate() needs the series early
        for kind in ("cold", "warm"):
            self.boot_seconds.labels(kind=kind)
        for resource in ("cpus", "memory_mb"):
            self.capacity_used.labels(resource=resource).set(0)
        self._database: _DatabaseCollector | None = None

    # --- the service's Observer protocol (stoker.service.service.Observer)

    def job_transition(self, job: JobView, from_state: JobState | None, to_state: JobState) -> None:
        """Count final states; time the wait of a job that starts running."""
        if to_state is JobState.RUNNING:
            started = job.started_at or datetime.now(UTC)
            self.job_wait.observe(max(0.0, (started - job.queued_at).total_seconds()))
        if to_state.terminal:
            self.jobs.labels(outcome=to_state.value).inc()
            cause = job.cause if job.cause in CAUSES else ("other" if job.cause else "none")
            self.finished.labels(outcome=to_state.value, cause=cause).inc()

    def boot(self, kind: Literal["cold", "warm"], seconds: float) -> None:
        """A VM reached agent-ready ``seconds`` after its start."""
        self.boot_seconds.labels(kind=kind).observe(max(0.0, seconds))

    def capacity(self, used_cpus: float, used_memory_mb: float) -> None:
        """What this host's VMs hold now."""
        self.capacity_used.labels(resource="cpus").set(used_cpus)
        self.capacity_used.labels(resource="memory_mb").set(used_memory_mb)

    def queue_depth(self, pool: str, depth: int) -> None:
        """``depth`` jobs wait for ``pool``."""
        self.queue.labels(pool=pool).set(depth)

    def vm_state_counts(self, counts: Mapping[str, int]) -> None:
        """This host's VMs by state (states not given are zero)."""
        for state in {*_VM_STATES, *counts}:
            self.vms.labels(state=state).set(counts.get(state, 0))

    def infrastructure_failure(self, reason: str) -> None:
        """An attempt failed for a reason that is not the job's (``reason``: its kind)."""
        self.failures.labels(reason=failure_kind(reason)).inc()

    def connection(self, pool: str, decision: str, bytes_up: int, bytes_down: int) -> None:
        """A guest connection through an egress proxy ended."""
        if decision not in _DECISIONS:
            decision = "error"  # bounded labels, whatever a caller passes
        self.egress_connections.labels(pool=pool, decision=decision).inc()
        if bytes_up > 0:
            self.egress_bytes.labels(pool=pool, direction="up").inc(bytes_up)
        if bytes_down > 0:
            self.egress_bytes.labels(pool=pool, direction="down").inc(bytes_down)

    def watch_database(self, health: DatabaseHealth) -> None:
        """Export ``health`` (read at every scrape) as the ``stoker_db_*`` metrics."""
        if self._database is None:
            self._database = _DatabaseCollector(health)
            self.registry.register(self._database)
        self._database.health = health

    # --- exposition

    def set_budget(self, cpus: float, memory_mb: float) -> None:
        """This host's capacity budget (after overcommit)."""
        self.capacity_total.labels(resource="cpus").set(cpus)
        self.capacity_total.labels(resource="memory_mb").set(memory_mb)

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


class _DatabaseCollector(Collector):
    """The ``stoker_db_*`` metrics, read from a :class:`DatabaseHealth` when scraped."""

    def __init__(self, health: DatabaseHealth) -> None:
        self.health = health

    def collect(self) -> list[Metric]:
        health = self.health
        up = GaugeMetricFamily(
            "stoker_db_up", "1 while the database takes writes, 0 while unreachable or full."
        )
        up.add_metric([], 1.0 if health.up else 0.0)
        errors = CounterMetricFamily(
            "stoker_db_errors", "Failed database calls, by kind.", labels=["kind"]
        )
        for kind, n in sorted(health.errors.items()):
            errors.add_metric([kind], n)
        outages = CounterMetricFamily(
            "stoker_db_outages", "Times the database became unreachable or full."
        )
        outages.add_metric([], health.outages)
        return [up, errors, outages]
