"""SQLAlchemy 2 typed ORM tables of the trajectory store.

The tables mirror `honed.trajectory`; JSON payloads are `json` on PostgreSQL, not `jsonb`: jsonb
reorders an object's keys (shortest first) and drops repeated ones, so a tool call's arguments or a
tool's schema would read back in another order than the model wrote or saw them, and training would
learn that order instead (migration 0007 converts older stores). Indexes follow the
queries the rest of the loop makes: unlabeled work for verifiers, verified data by split and task
for trainers, recent runs by agent for the CLI. Schema changes go through Alembic migrations.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

JSONType = JSON()


class JSONText(TypeDecorator[str]):
    """A JSON column's value given as its JSON text, encoded by the caller: bound as is, and
    checked by the database (SQLite stores the text, PostgreSQL's `json` keeps it verbatim). None stays
    SQL NULL. The capture writer's inserts use it: SQLAlchemy's JSON type would encode again."""

    impl = JSON
    cache_ok = True

    def bind_processor(self, dialect: Any) -> None:
        return None


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        # The instant in UTC: SQLite stores the wall time and drops the offset (12:00+02:00 was
        # read back as 12:00Z), and compares times as text, so every value must be in one zone.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSONType, Any: JSONType, datetime: UTCDateTime}


class TrajectoryRow(Base):
    __tablename__ = "trajectories"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    agent: Mapped[str] = mapped_column(String(200))
    task: Mapped[Any] = mapped_column(nullable=True)
    task_id: Mapped[str | None] = mapped_column(String(200))
    split: Mapped[str | None] = mapped_column(String(32))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    output: Mapped[Any] = mapped_column(nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    model_version: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    n_steps: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=lambda: datetime.now(UTC))
    thread_id: Mapped[str | None] = mapped_column(String(200))
    checkpoint_id: Mapped[str | None] = mapped_column(String(64))
    # The distinct messages and tool lists its model steps saw, stored once; each model step's
    # input refers to them (`honed.store.conversations`).
    messages: Mapped[Any] = mapped_column(nullable=True)
    tools: Mapped[Any] = mapped_column(nullable=True)

    steps: Mapped[list[StepRow]] = relationship(
        back_populates="trajectory", order_by="StepRow.index", cascade="all, delete-orphan"
    )
    verdicts: Mapped[list[VerdictRow]] = relationship(
        back_populates="trajectory", order_by="VerdictRow.id", cascade="all, delete-orphan"
    )

    __table_args__ = (
        Index("ix_trajectories_started_at", "started_at"),
        Index("ix_trajectories_agent_started", "agent", "started_at"),
        Index("ix_trajectories_task_id", "task_id"),
        Index("ix_trajectories_split_started", "split", "started_at"),
        Index("ix_trajectories_status", "status"),
        Index("ix_trajectories_model_version", "model_version"),
        Index("ix_trajectories_thread_started", "thread_id", "started_at"),
    )


class StepRow(Base):
    __tablename__ = "steps"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    trajectory_id: Mapped[str] = mapped_column(ForeignKey("trajectories.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    input: Mapped[Any] = mapped_column(nullable=True)
    output: Mapped[Any] = mapped_column(nullable=True)
    error: Mapped[str | None] = mapped_column(Text)
    reasoning: Mapped[str | None] = mapped_column(Text)
    tool_calls: Mapped[Any] = mapped_column(nullable=True)
    usage: Mapped[Any] = mapped_column(nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)

    trajectory: Mapped[TrajectoryRow] = relationship(back_populates="steps")

    __table_args__ = (
        Index("ix_steps_trajectory_index", "trajectory_id", "index"),
        Index("ix_steps_kind_name", "kind", "name"),
    )


class VerdictRow(Base):
    __tablename__ = "verdicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trajectory_id: Mapped[str] = mapped_column(ForeignKey("trajectories.id", ondelete="CASCADE"))
    verifier: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(64))
    passed: Mapped[bool | None]
    score: Mapped[float] = mapped_column(Float, default=0.0)
    reason: Mapped[str] = mapped_column(Text, default="")
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    duration_s: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=lambda: datetime.now(UTC))
    # `honed.store.signing`: the judged content's digest and the HMAC of the row (migration 0008).
    digest: Mapped[str | None] = mapped_column(String(64))
    signature: Mapped[str | None] = mapped_column(String(64))

    trajectory: Mapped[TrajectoryRow] = relationship(back_populates="verdicts")

    __table_args__ = (
        UniqueConstraint("trajectory_id", "verifier", "version", name="uq_verdicts_trajectory_verifier"),
        Index("ix_verdicts_passed", "passed", "trajectory_id"),
    )
