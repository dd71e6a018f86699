"""signed labels: verdicts.digest and .signature, verifier_policies.signature, verifier_audits.signature

Revision ID: 0008
Revises: 0007

`honed.store.signing`: nullable columns, nothing converted. Rows written before the key was set
stay unsigned, and a store opened with the key does not count them (judge again, label again).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_COLUMNS = (
    ("verdicts", "digest"),
    ("verdicts", "signature"),
    ("verifier_policies", "signature"),
    ("verifier_audits", "signature"),
)


def upgrade() -> None:
    for table, column in _COLUMNS:
        op.add_column(table, sa.Column(column, sa.String(64), nullable=True))


def downgrade() -> None:
    for table, column in reversed(_COLUMNS):
        with op.batch_alter_table(table) as batch:
            batch.drop_column(column)
