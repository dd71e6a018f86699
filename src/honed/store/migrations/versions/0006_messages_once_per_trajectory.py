"""messages once per trajectory: trajectories.messages/tools, model-step inputs as references

Revision ID: 0006
Revises: 0005

Existing trajectories are converted in batches: each model step's input becomes references into
its trajectory's distinct messages and tool lists (`honed.store.conversations`); downgrade writes
the full inputs back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from honed.store.conversations import compact, expand, is_compacted

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BATCH = 200  # trajectories per read-convert-write round: bounded memory on big stores

trajectories = sa.table(
    "trajectories", sa.column("id", sa.String), sa.column("messages", JSON), sa.column("tools", JSON)
)
steps = sa.table(
    "steps",
    sa.column("id", sa.String),
    sa.column("trajectory_id", sa.String),
    sa.column("index", sa.Integer),
    sa.column("kind", sa.String),
    sa.column("input", JSON),
)


# Plain ALTER TABLE on both backends (SQLite >= 3.35 drops columns): a batch "move and copy" of
# `trajectories` on SQLite would drop the old table, and with foreign keys on, cascade to its steps.


def upgrade() -> None:
    op.add_column("trajectories", sa.Column("messages", JSON, nullable=True))
    op.add_column("trajectories", sa.Column("tools", JSON, nullable=True))
    _convert(_compact_one)


def downgrade() -> None:
    _convert(_expand_one)
    op.drop_column("trajectories", "tools")
    op.drop_column("trajectories", "messages")


def _compact_one(rows: list[Any], _messages: Any, _tools: Any) -> tuple[Any, Any, list[Any]]:
    if any(is_compacted(r.input) for r in rows):  # already in the new form (a re-run)
        return _messages, _tools, [r.input for r in rows]
    return compact(r.input for r in rows)


def _expand_one(rows: list[Any], messages: Any, tools: Any) -> tuple[Any, Any, list[Any]]:
    return None, None, [expand(r.input, messages, tools) for r in rows]


def _convert(convert: Callable[[list[Any], Any, Any], tuple[Any, Any, list[Any]]]) -> None:
    """Each trajectory with model steps, BATCH at a time (keyset on id): its model steps' inputs
    and its pools rewritten by `convert(step rows, messages, tools)`."""
    conn = op.get_bind()
    with_model_steps = (
        sa.select(steps.c.trajectory_id)
        .where(steps.c.kind == "model")
        .distinct()
        .order_by(steps.c.trajectory_id)
    )
    last = None
    while True:
        query = with_model_steps if last is None else with_model_steps.where(steps.c.trajectory_id > last)
        ids = list(conn.execute(query.limit(BATCH)).scalars())
        if not ids:
            return
        last = ids[-1]
        pools = {
            row.id: (row.messages, row.tools)
            for row in conn.execute(
                sa.select(trajectories.c.id, trajectories.c.messages, trajectories.c.tools).where(
                    trajectories.c.id.in_(ids)
                )
            )
        }
        by_trajectory: dict[str, list[Any]] = {}
        for row in conn.execute(
            sa.select(steps.c.id, steps.c.trajectory_id, steps.c.input)
            .where(steps.c.trajectory_id.in_(ids), steps.c.kind == "model")
            .order_by(steps.c.trajectory_id, steps.c.index)
        ):
            by_trajectory.setdefault(row.trajectory_id, []).append(row)
        step_updates, pool_updates = [], []
        for trajectory_id, rows in by_trajectory.items():
            messages, tools = pools.get(trajectory_id, (None, None))
            new_messages, new_tools, inputs = convert(rows, messages, tools)
            pool_updates.append({"t_id": trajectory_id, "t_messages": new_messages, "t_tools": new_tools})
            step_updates += [
                {"s_id": r.id, "s_input": new}
                for r, new in zip(rows, inputs, strict=True)
                if new is not r.input
            ]
        if step_updates:
            conn.execute(
                steps.update()
                .where(steps.c.id == sa.bindparam("s_id"))
                .values(input=sa.bindparam("s_input")),
                step_updates,
            )
        conn.execute(
            trajectories.update()
            .where(trajectories.c.id == sa.bindparam("t_id"))
            .values(messages=sa.bindparam("t_messages"), tools=sa.bindparam("t_tools")),
            pool_updates,
        )
