"""Monitoring: monitor results, alerts, feedback; the request log's finish reason.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UTC_DATETIME = sa.DateTime(timezone=True)
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("request_log") as t:
        t.add_column(sa.Column("finish_reason", sa.String(), nullable=True))

    op.create_table(
        "monitor_results",
        sa.Column("id", ID, nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("ts", UTC_DATETIME, nullable=False),
        sa.Column("endpoint", sa.String(), nullable=True),
        sa.Column("deployment", sa.String(), nullable=True),
        sa.Column("model_version", sa.String(), nullable=True),
        sa.Column("signal", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("value", sa.Double(), nullable=True),
        sa.Column("threshold", sa.Double(), nullable=True),
        sa.Column("p_value", sa.Double(), nullable=True),
        sa.Column("n_reference", sa.Integer(), nullable=True),
        sa.Column("n_window", sa.Integer(), nullable=True),
        sa.Column("window_start", UTC_DATETIME, nullable=False),
        sa.Column("window_end", UTC_DATETIME, nullable=False),
        sa.Column("reference", sa.Text(), nullable=True),
        sa.Column("alert", sa.Boolean(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_monitor_results"),
    )
    op.create_index("ix_monitor_results_run_id", "monitor_results", ["run_id"])
    op.create_index("ix_monitor_results_endpoint_signal_ts", "monitor_results", ["endpoint", "signal", "ts"])

    op.create_table(
        "alerts",
        sa.Column("id", ID, nullable=False),
        sa.Column("ts", UTC_DATETIME, nullable=False),
        sa.Column("run_id", sa.String(), nullable=True),
        sa.Column("endpoint", sa.String(), nullable=True),
        sa.Column("deployment", sa.String(), nullable=True),
        sa.Column("signal", sa.String(), nullable=False),
        sa.Column("value", sa.Double(), nullable=True),
        sa.Column("threshold", sa.Double(), nullable=True),
        sa.Column("rule", sa.Text(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("delivered_at", UTC_DATETIME, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_alerts"),
    )
    op.create_index("ix_alerts_ts", "alerts", ["ts"])

    op.create_table(
        "feedback",
        sa.Column("id", ID, nullable=False),
        sa.Column("ts", UTC_DATETIME, nullable=False),
        sa.Column("request_id", sa.String(), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=True),
        sa.Column("endpoint", sa.String(), nullable=True),
        sa.Column("deployment", sa.String(), nullable=True),
        sa.Column("model_version", sa.String(), nullable=True),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_feedback"),
    )
    op.create_index("ix_feedback_ts", "feedback", ["ts"])
    op.create_index("ix_feedback_request_id", "feedback", ["request_id"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_table("alerts")
    op.drop_table("monitor_results")
    with op.batch_alter_table("request_log") as t:
        t.drop_column("finish_reason")
