"""VMs that failed (boot failure, VMM crash, kernel panic) with their console's tail.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision: str | None = "0007"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None


def upgrade() -> None:
    op.create_table(
        "vm_failures",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("vm_name", sa.String(64), nullable=False),
        sa.Column("host", sa.String(64), nullable=False),
        sa.Column("pool", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.Column("failed_at", sa.DateTime(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("console", sa.Text(), nullable=False),
    )
    op.create_index("ix_vm_failures_failed", "vm_failures", ["failed_at"])
    op.create_index("ix_vm_failures_host", "vm_failures", ["host", "failed_at"])


def downgrade() -> None:
    op.drop_index("ix_vm_failures_host", table_name="vm_failures")
    op.drop_index("ix_vm_failures_failed", table_name="vm_failures")
    op.drop_table("vm_failures")
