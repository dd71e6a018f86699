"""ORM tables of the training log: runs, their lineage, evaluations, and the one-trainer-per-model lock.

A training run records what went in (config, data counts, the trajectories it learned from) and
what came out (metrics, the candidate version, promoted / rejected / failed and why); an eval run
records one scored evaluation of one version on one split. Together with `model_events` they answer
"why is this version live, and what did it learn from?".
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from honed.store.schema import Base


class TrainingRunRow(Base):
    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(24), default="running")
    parent: Mapped[str | None] = mapped_column(String(220))
    candidate: Mapped[str | None] = mapped_column(String(220))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    reason: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    owner: Mapped[str] = mapped_column(String(200), default="")
    started_at: Mapped[datetime] = mapped_column(default=lambda: datetime.now(UTC))
    ended_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_training_runs_model_id", "model", "id"),)


class TrainingExampleRow(Base):
    """Lineage: which trajectories a run's dataset was built from (no FK: trajectories may be pruned)."""

    __tablename__ = "training_examples"

    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"), primary_key=True)
    trajectory_id: Mapped[str] = mapped_column(String(64), primary_key=True)


class EvalRunRow(Base):
    __tablename__ = "eval_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(220))
    split: Mapped[str] = mapped_column(String(32))
    training_run: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id", ondelete="SET NULL"))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    duration_s: Mapped[float] = mapped_column(default=0.0)
    created_at: Mapped[datetime] = mapped_column(default=lambda: datetime.now(UTC))

    __table_args__ = (Index("ix_eval_runs_model_id", "model", "id"),)


class TrainerLockRow(Base):
    __tablename__ = "trainer_locks"

    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[datetime] = mapped_column(default=lambda: datetime.now(UTC))
    expires_at: Mapped[datetime]
