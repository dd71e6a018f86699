"""training runs, their lineage, eval runs and the trainer lock

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "training_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("parent", sa.String(length=220), nullable=True),
        sa.Column("candidate", sa.String(length=220), nullable=True),
        sa.Column("config", JSON, nullable=False),
        sa.Column("data", JSON, nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_training_runs_model_id", "training_runs", ["model", "id"])
    op.create_table(
        "training_examples",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("trajectory_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["training_runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "trajectory_id"),
    )
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("version", sa.String(length=220), nullable=False),
        sa.Column("split", sa.String(length=32), nullable=False),
        sa.Column("training_run", sa.Integer(), nullable=True),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(["training_run"], ["training_runs.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_eval_runs_model_id", "eval_runs", ["model", "id"])
    op.create_table(
        "trainer_locks",
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("acquired_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("model"),
    )


def downgrade() -> None:
    op.drop_table("trainer_locks")
    op.drop_index("ix_eval_runs_model_id", table_name="eval_runs")
    op.drop_table("eval_runs")
    op.drop_table("training_examples")
    op.drop_index("ix_training_runs_model_id", table_name="training_runs")
    op.drop_table("training_runs")
