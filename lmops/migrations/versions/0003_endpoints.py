"""Endpoints: endpoints and their deployments, answer scores, and the request log's endpoint columns.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

request_log.endpoint held the HTTP path; it becomes `route`, and `endpoint` / `deployment` name the
lmops endpoint and the deployment that answered (None for a request no endpoint served).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

UTC_DATETIME = sa.DateTime(timezone=True)
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "endpoints",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("traffic", sa.JSON(), nullable=False),
        sa.Column("mirror", sa.JSON(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("created_by", sa.String(), nullable=False),
        sa.Column("updated_at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_endpoints"),
    )
    op.create_table(
        "deployments",
        sa.Column("endpoint", sa.String(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("model_ref", sa.String(), nullable=False),
        sa.Column("model_name", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=False),
        sa.Column("model_uri", sa.String(), nullable=False),
        sa.Column("runtime", sa.String(), nullable=True),
        sa.Column("max_batch", sa.Integer(), nullable=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("created_by", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("endpoint", "name", name="pk_deployments"),
        sa.ForeignKeyConstraint(["endpoint"], ["endpoints.name"], name="fk_deployments_endpoint_endpoints",
                                ondelete="CASCADE"),
    )
    op.create_table(
        "answer_scores",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("ts", UTC_DATETIME, nullable=False),
        sa.Column("request_id", sa.String(), nullable=False),
        sa.Column("endpoint", sa.String(), nullable=False),
        sa.Column("deployment", sa.String(), nullable=False),
        sa.Column("role", sa.String(), nullable=False),
        sa.Column("model_version", sa.String(), nullable=True),
        sa.Column("reference", sa.String(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("prompt_nll", sa.Double(), nullable=True),
        sa.Column("answer_nll", sa.Double(), nullable=True),
        sa.Column("finish_reason", sa.String(), nullable=True),
        sa.Column("flagged", sa.Boolean(), nullable=True),
        sa.Column("ttft_s", sa.Double(), nullable=True),
        sa.Column("latency_s", sa.Double(), nullable=True),
        sa.Column("agree", sa.Boolean(), nullable=True),
        sa.Column("error", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_answer_scores"),
    )
    op.create_index("ix_answer_scores_endpoint_ts", "answer_scores", ["endpoint", "ts"])
    op.create_index("ix_answer_scores_request_id", "answer_scores", ["request_id"])
    with op.batch_alter_table("request_log") as batch:  # SQLite rebuilds the table; PostgreSQL alters it
        batch.alter_column("endpoint", new_column_name="route", existing_type=sa.String(), existing_nullable=False)
    with op.batch_alter_table("request_log") as batch:
        batch.add_column(sa.Column("endpoint", sa.String(), nullable=True))
        batch.add_column(sa.Column("deployment", sa.String(), nullable=True))
    op.create_index("ix_request_log_endpoint_ts", "request_log", ["endpoint", "ts"])


def downgrade() -> None:
    op.drop_index("ix_request_log_endpoint_ts", "request_log")
    with op.batch_alter_table("request_log") as batch:
        batch.drop_column("deployment")
        batch.drop_column("endpoint")
    with op.batch_alter_table("request_log") as batch:
        batch.alter_column("route", new_column_name="endpoint", existing_type=sa.String(), existing_nullable=False)
    op.drop_table("answer_scores")
    op.drop_table("deployments")
    op.drop_table("endpoints")
