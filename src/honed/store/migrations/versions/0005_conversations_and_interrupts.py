"""conversations: a trajectory's LangGraph thread and checkpoint

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("trajectories", schema=None) as batch_op:
        batch_op.add_column(sa.Column("thread_id", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("checkpoint_id", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_trajectories_thread_started", ["thread_id", "started_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("trajectories", schema=None) as batch_op:
        batch_op.drop_index("ix_trajectories_thread_started")
        batch_op.drop_column("checkpoint_id")
        batch_op.drop_column("thread_id")
