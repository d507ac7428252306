"""Session jobs: a VM held for a client that sends commands one at a time (steps).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("session_idle_s", sa.Float(), nullable=True))
        batch.add_column(
            sa.Column("session_closed", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_table(
        "job_steps",
        sa.Column(
            "job_id",
            sa.String(32),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("argv", sa.JSON(), nullable=False),
        sa.Column("env", sa.JSON(), nullable=False),
        sa.Column("secret_keys", sa.JSON(), nullable=False),
        sa.Column("stdin", sa.LargeBinary(), nullable=True),
        sa.Column("cwd", sa.Text(), nullable=True),
        sa.Column("user", sa.String(64), nullable=True),
        sa.Column("timeout_s", sa.Float(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("signal", sa.Integer(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("log_from", sa.Integer(), nullable=True),
        sa.Column("log_to", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("job_steps")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("session_closed")
        batch.drop_column("session_idle_s")
