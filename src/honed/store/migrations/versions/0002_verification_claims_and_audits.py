"""verifier work queue and audits

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "verification_claims",
        sa.Column("trajectory_id", sa.String(length=64), nullable=False),
        sa.Column("queue", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("available_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["trajectory_id"], ["trajectories.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("trajectory_id", "queue"),
    )
    with op.batch_alter_table("verification_claims", schema=None) as batch_op:
        batch_op.create_index("ix_verification_claims_owner", ["owner"], unique=False)
        batch_op.create_index(
            "ix_verification_claims_queue_state", ["queue", "state", "available_at"], unique=False
        )

    op.create_table(
        "verifier_audits",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("verifier", sa.String(length=200), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=True),
        sa.Column("gold", sa.String(length=200), nullable=False),
        sa.Column("tp", sa.Integer(), nullable=False),
        sa.Column("fp", sa.Integer(), nullable=False),
        sa.Column("tn", sa.Integer(), nullable=False),
        sa.Column("fn", sa.Integer(), nullable=False),
        sa.Column("undecided", sa.Integer(), nullable=False),
        sa.Column("precision", sa.Float(), nullable=True),
        sa.Column("precision_low", sa.Float(), nullable=True),
        sa.Column("precision_high", sa.Float(), nullable=True),
        sa.Column("recall", sa.Float(), nullable=True),
        sa.Column("recall_low", sa.Float(), nullable=True),
        sa.Column("recall_high", sa.Float(), nullable=True),
        sa.Column("false_positive_rate", sa.Float(), nullable=True),
        sa.Column("false_positive_rate_low", sa.Float(), nullable=True),
        sa.Column("false_positive_rate_high", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("verifier_audits", schema=None) as batch_op:
        batch_op.create_index("ix_verifier_audits_verifier_created", ["verifier", "created_at"], unique=False)

    op.create_table(
        "verifier_policies",
        sa.Column("verifier", sa.String(length=200), nullable=False),
        sa.Column("trust", sa.String(length=8), nullable=False),
        sa.Column("min_precision", sa.Float(), nullable=True),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("verifier"),
    )


def downgrade() -> None:
    op.drop_table("verifier_policies")
    with op.batch_alter_table("verifier_audits", schema=None) as batch_op:
        batch_op.drop_index("ix_verifier_audits_verifier_created")

    op.drop_table("verifier_audits")
    with op.batch_alter_table("verification_claims", schema=None) as batch_op:
        batch_op.drop_index("ix_verification_claims_queue_state")
        batch_op.drop_index("ix_verification_claims_owner")

    op.drop_table("verification_claims")
