"""Jobs may run as an account of the image, in a directory of their choice, retried less.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: tuple[str, ...] | None = None
depends_on: tuple[str, ...] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("user", sa.String(64), nullable=True))
        batch.add_column(sa.Column("workdir", sa.Text(), nullable=True))
        batch.add_column(sa.Column("retries", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("retries")
        batch.drop_column("workdir")
        batch.drop_column("user")
