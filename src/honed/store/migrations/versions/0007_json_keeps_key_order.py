"""json, not jsonb, on PostgreSQL: stored JSON keeps its keys' order

Revision ID: 0007
Revises: 0006

jsonb reorders an object's keys (shortest first) and drops repeated ones, so a tool call's
arguments and a tool's schema read back in another order than the model wrote or saw them, and
training learned that order. Every jsonb column becomes json (the text is kept verbatim from now
on; what jsonb already reordered stays so). SQLite stores JSON as text: nothing to do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    _retype(lambda t: isinstance(t, postgresql.JSONB), sa.JSON(), "json")


def downgrade() -> None:
    _retype(
        lambda t: isinstance(t, sa.JSON) and not isinstance(t, postgresql.JSONB), postgresql.JSONB(), "jsonb"
    )


def _retype(old: Callable[[Any], bool], new: sa.types.TypeEngine[Any], name: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    inspector = sa.inspect(bind)
    for table in inspector.get_table_names():
        if table == "alembic_version":
            continue
        for column in inspector.get_columns(table):
            if old(column["type"]):
                op.alter_column(
                    table, column["name"], type_=new, postgresql_using=f'"{column["name"]}"::{name}'
                )
