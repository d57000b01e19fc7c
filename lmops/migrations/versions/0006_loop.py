"""The loop's runs (lmops/store/loop.py).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UTC_DATETIME = sa.DateTime(timezone=True)
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "loop_runs",
        sa.Column("id", ID, nullable=False),
        sa.Column("created", UTC_DATETIME, nullable=False),
        sa.Column("updated", UTC_DATETIME, nullable=False),
        sa.Column("endpoint", sa.String(), nullable=True),
        sa.Column("alert_id", sa.Integer(), nullable=True),
        sa.Column("signal", sa.String(), nullable=True),
        sa.Column("window_start", UTC_DATETIME, nullable=True),
        sa.Column("window_end", UTC_DATETIME, nullable=True),
        sa.Column("step", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("outcome", sa.String(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=True),
        sa.Column("heartbeat", UTC_DATETIME, nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_loop_runs"),
    )
    op.create_index("ix_loop_runs_created", "loop_runs", ["created"])
    op.create_index("ix_loop_runs_alert_id", "loop_runs", ["alert_id"])


def downgrade() -> None:
    op.drop_table("loop_runs")
