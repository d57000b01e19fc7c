"""Rollouts: a canary or blue-green rollout of a deployment, its state, analyses and driver lease.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UTC_DATETIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("endpoint", sa.String(), nullable=False),
        sa.Column("target", sa.String(), nullable=False),
        sa.Column("stable", sa.String(), nullable=False),
        sa.Column("strategy", sa.String(), nullable=False),
        sa.Column("steps", sa.JSON(), nullable=False),
        sa.Column("window_s", sa.Double(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("step_started_at", UTC_DATETIME, nullable=True),
        sa.Column("analysed_at", UTC_DATETIME, nullable=True),
        sa.Column("inconclusive", sa.Integer(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("analyses", sa.JSON(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("previous_traffic", sa.JSON(), nullable=False),
        sa.Column("champion_before", sa.String(), nullable=True),
        sa.Column("promoted_version", sa.String(), nullable=True),
        sa.Column("driver", sa.String(), nullable=True),
        sa.Column("lease_until", UTC_DATETIME, nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("started_at", UTC_DATETIME, nullable=False),
        sa.Column("started_by", sa.String(), nullable=False),
        sa.Column("updated_at", UTC_DATETIME, nullable=False),
        sa.Column("finished_at", UTC_DATETIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_rollouts"),
        sa.ForeignKeyConstraint(["endpoint"], ["endpoints.name"], name="fk_rollouts_endpoint_endpoints",
                                ondelete="CASCADE"),
    )
    op.create_index("ix_rollouts_endpoint", "rollouts", ["endpoint"])
    op.create_index("ix_rollouts_status", "rollouts", ["status"])


def downgrade() -> None:
    op.drop_index("ix_rollouts_status", "rollouts")
    op.drop_index("ix_rollouts_endpoint", "rollouts")
    op.drop_table("rollouts")
