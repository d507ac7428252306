"""Job rows written straight into the ``jobs`` table, for the job list's test and bench.

Both need thousands of jobs in a few seconds, far faster than submitting them;
the row is what :func:`stoker.service.jobs.new_job` would store for a plain
job with no source, plus the end of a finished one.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

#: States whose jobs have finished (a finished_at, and a cause unless cancelled).
_RUNNING = ("queued", "assigned", "booting", "running")


def job_row(
    job_id: str,
    *,
    submitter: str,
    state: str,
    pool: str,
    labels: list[str],
    created: datetime,
    runtime: timedelta = timedelta(seconds=30),
) -> dict[str, Any]:
    """One row of ``jobs`` (``insert(Job)`` values) for a job created at ``created``."""
    done = state not in _RUNNING
    return {
        "id": job_id,
        "submitter": submitter,
        "state": state,
        "pool": pool,
        "image": "debian",
        "cpus": 1,
        "memory_mb": 512,
        "disk_mb": 1024,
        "timeout_s": 600.0,
        "argv": ["make", "test"],
        "env": {},
        "secret_keys": [],
        "artifacts": [],
        "labels": labels,
        "priority": 0,
        "source_kind": "none",
        "attempt": 0,
        "cancel_requested": False,
        "created_at": created,
        "updated_at": created,
        "queued_at": created,
        "finished_at": created + runtime if done else None,
        "cause": "exit" if done and state != "cancelled" else None,
        "log_bytes": 0,
        "log_truncated": False,
        "event_seq": 1,
    }
