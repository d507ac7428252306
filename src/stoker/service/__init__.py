"""``stoker serve``: a job service on top of the VM runtime (see ``docs/serve-design.md``).

The pieces, each in its module:

* :mod:`~stoker.service.config` - :class:`ServiceConfig`, from TOML with located errors;
* :mod:`~stoker.service.models` and :mod:`~stoker.service.db` - durable state
  (SQLite or PostgreSQL), migrations, the claim;
* :mod:`~stoker.service.jobs` - submissions and the job state machine;
* :mod:`~stoker.service.scheduler` - placement and fairness (pure);
* :mod:`~stoker.service.supervisor` - runs the claimed jobs: scheduling passes,
  execution, leases, recovery; with :mod:`~stoker.service.runs` (one run and
  its outcome), :mod:`~stoker.service.pools` (the host's VMs, warm pools and
  capacity ledger), :mod:`~stoker.service.logs` (bounded, masked job output)
  :mod:`~stoker.service.files` (uploads, git sources, artifacts) and
  :mod:`~stoker.service.network` (a job's connection records and their summary);
* :mod:`~stoker.service.service` - :class:`Service`, the facade the API and CLI use;
* :mod:`~stoker.service.fake_backend` - an in-process FAKE backend for scale tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stoker._lazy import lazy_exports

if TYPE_CHECKING:
    from stoker.service.config import ServiceConfig, load_config
    from stoker.service.fleet import HostView, VMView
    from stoker.service.jobs import (
        Conflict,
        GitSource,
        JobRequest,
        JobState,
        NotFound,
        QuotaExceeded,
        TooLarge,
    )
    from stoker.service.jobviews import ArtifactView, EventView, JobFilter, JobView, LogChunkView
    from stoker.service.service import (
        HealthView,
        NullObserver,
        Observer,
        PoolView,
        Service,
    )

# Imported when first used: clients of the API (stoker job, the GitLab executor, which
# gitlab-runner starts for every stage) import stoker.service.client and must not pay
# for SQLAlchemy, FastAPI and the supervisor.
_HOMES = {
    "ServiceConfig": "config",
    "load_config": "config",
    "ArtifactView": "jobs",
    "Conflict": "jobs",
    "EventView": "jobs",
    "GitSource": "jobs",
    "JobFilter": "jobs",
    "JobRequest": "jobs",
    "JobState": "jobs",
    "JobView": "jobs",
    "LogChunkView": "jobs",
    "NotFound": "jobs",
    "QuotaExceeded": "jobs",
    "TooLarge": "jobs",
    "HealthView": "service",
    "HostView": "fleet",
    "NullObserver": "service",
    "Observer": "service",
    "PoolView": "service",
    "Service": "service",
    "VMView": "fleet",
}


__getattr__ = lazy_exports(__name__, _HOMES)


__all__ = [
    "ArtifactView",
    "Conflict",
    "EventView",
    "GitSource",
    "HealthView",
    "HostView",
    "JobFilter",
    "JobRequest",
    "JobState",
    "JobView",
    "LogChunkView",
    "NotFound",
    "NullObserver",
    "Observer",
    "PoolView",
    "QuotaExceeded",
    "Service",
    "ServiceConfig",
    "TooLarge",
    "VMView",
    "load_config",
]
