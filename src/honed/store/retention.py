"""Deleting captured runs: retention (runs stored before a date) and erasure (a run, a thread).

A trajectory goes with its steps, verdicts and verifier-queue rows (their foreign keys cascade).
Held-out runs stay unless asked for: they define the gate's tasks (`honed.learn.cycle.tasks_from_store`), so a
prune by age would quietly shrink what every candidate is gated on. Training lineage
(`training_examples`) keeps the ids of the runs a version learned from: it says what was learned,
not what is still stored. On SQLite the deleted rows are overwritten (`secure_delete`) and the
write-ahead log emptied, so an erased secret is not left in the file's free pages; PostgreSQL
reclaims the space of deleted rows with (auto)vacuum.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, select

from honed.store.schema import TrajectoryRow
from honed.store.training_tables import TrainingExampleRow

if TYPE_CHECKING:
    from honed.store.store import TrajectoryStore

_CHUNK = 500  # ids per statement: far under every database's limit on bound parameters


@dataclass(frozen=True, slots=True)
class Pruned:
    """What a prune deleted (or, dry, would delete): the ids, the held-out runs it matched and
    kept, and how many of the deleted runs a trained version learned from."""

    deleted: list[str] = field(default_factory=list)
    kept_heldout: int = 0
    learned_from: int = 0
    # SQLite: False when a reader kept the deleted rows' old pages in the file (they go at the
    # next checkpoint once it is done).
    erased: bool = True


def prune(
    store: TrajectoryStore,
    *,
    ids: Iterable[str] | None = None,
    agent: str | None = None,
    task_id: str | None = None,
    thread_id: str | None = None,
    until: datetime | None = None,
    include_heldout: bool = False,
    dry_run: bool = False,
) -> Pruned:
    """Delete the trajectories matching every given filter (`until`: stored before it), with their
    steps, verdicts and queue rows; held-out runs stay unless `include_heldout`. Returns what went
    (with `dry_run`, what would). `TrajectoryStore.prune` is this function."""
    from honed.store.select import HeldOut
    from honed.store.store import _filtered

    if ids is None and agent is None and task_id is None and thread_id is None and until is None:
        raise ValueError("say what to delete: ids, an agent, a task id, a thread or a time (until)")
    T = TrajectoryRow
    query = _filtered(
        select(T.id, T.task_id, T.split, T.meta),
        agent=agent,
        task_id=task_id,
        thread_id=thread_id,
        ids=None if ids is None else list(ids),
    ).order_by(T.created_at, T.id)
    if until is not None:
        # By when the database stored the run, which the agent's process cannot set: by when it
        # says it started, a capture role dated its paused run back to 2000, and the operator's
        # retention deleted it with the verdict that failed it (a QA pass, session 28).
        query = query.where(T.created_at < until)
    with store.engine.connect() as conn:
        matched = conn.execute(query).all()
    heldout = None if include_heldout else HeldOut.of(store)
    doomed = [
        run_id
        for run_id, task, split, meta in matched
        if heldout is None or not (heldout.holds((task, split)) or (meta or {}).get("held_out_by"))
    ]
    learned = _learned_from(store, doomed)
    result = Pruned(doomed, len(matched) - len(doomed), learned)
    if dry_run or not doomed:
        return result
    sqlite = store.dialect == "sqlite"
    with store.engine.begin() as conn:
        if sqlite:
            conn.exec_driver_sql("PRAGMA secure_delete=ON")
        for chunk in _chunks(doomed):
            conn.execute(delete(T).where(T.id.in_(chunk)))
    if sqlite:
        with store.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA secure_delete=OFF")
        return dataclasses.replace(result, erased=_checkpointed(store))
    return result


def _checkpointed(store: TrajectoryStore, wait_s: float = 5.0) -> bool:
    """Copy the overwritten pages into the file and empty the write-ahead log. A reader in a
    transaction holds the old pages in the file (a QA pass, session 28: "deleted", and the secret
    still there): waited for up to `wait_s` (SQLite's busy handler), then False."""
    with store.engine.connect() as conn:
        timeout = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
        conn.exec_driver_sql(f"PRAGMA busy_timeout={int(wait_s * 1000)}")
        try:
            busy = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").first()
        finally:
            conn.exec_driver_sql(f"PRAGMA busy_timeout={int(timeout or 0)}")
    return not busy or not busy[0]


def _learned_from(store: TrajectoryStore, ids: list[str]) -> int:
    E = TrainingExampleRow
    total = 0
    with store.engine.connect() as conn:
        for chunk in _chunks(ids):
            query = select(func.count(func.distinct(E.trajectory_id))).where(E.trajectory_id.in_(chunk))
            total += int(conn.scalar(query) or 0)
    return total


def _chunks(ids: list[str]) -> Iterable[list[str]]:
    return (ids[i : i + _CHUNK] for i in range(0, len(ids), _CHUNK))
