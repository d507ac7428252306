"""Indexes for the job list's filters (newest first) and the statistics' window.

``GET /v1/jobs`` filters by state, pool or submitter in ``created_at, id``
order, and ``GET /v1/stats`` counts jobs finished lately by state and cause:
each becomes an index range scan (see :mod:`stoker.service.joblist`).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision: str | None = "0008"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None

INDEXES: dict[str, list[str]] = {
    "ix_jobs_created_id": ["created_at", "id"],
    "ix_jobs_state_created": ["state", "created_at", "id"],
    "ix_jobs_pool_created": ["pool", "created_at", "id"],
    "ix_jobs_submitter_created": ["submitter", "created_at", "id"],
    "ix_jobs_finished": ["finished_at", "state", "cause"],
}


def upgrade() -> None:
    for name, columns in INDEXES.items():
        op.create_index(name, "jobs", columns)
    # ix_jobs_created_id serves everything it did (its first column is created_at).
    op.drop_index("ix_jobs_created", table_name="jobs")


def downgrade() -> None:
    op.create_index("ix_jobs_created", "jobs", ["created_at"])
    for name in INDEXES:
        op.drop_index(name, table_name="jobs")
