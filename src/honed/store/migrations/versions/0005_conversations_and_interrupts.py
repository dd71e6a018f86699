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


# Plain ALTER TABLE on both backends (SQLite >= 3.35 drops columns): a batch "move and copy" on
# SQLite recreates `trajectories`, and dropping the old table cascades to every step.


def upgrade() -> None:
    op.add_column("trajectories", sa.Column("thread_id", sa.String(length=200), nullable=True))
    op.add_column("trajectories", sa.Column("checkpoint_id", sa.String(length=64), nullable=True))
    op.create_index("ix_trajectories_thread_started", "trajectories", ["thread_id", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_trajectories_thread_started", table_name="trajectories")
    op.drop_column("trajectories", "checkpoint_id")
    op.drop_column("trajectories", "thread_id")
