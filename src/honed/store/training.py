"""The training log in the store: runs, lineage, evaluations, and one trainer per model.

Mixed into `TrajectoryStore`. The trainer lock is a row with an expiry rather than a database
session lock, so it works the same on SQLite and PostgreSQL, survives no process (a crashed
trainer's lock expires; its run is then marked `interrupted`), and `honed status` can show who holds it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from honed.store.database import Database
from honed.store.training_tables import EvalRunRow, TrainerLockRow, TrainingExampleRow, TrainingRunRow

log = logging.getLogger("honed")

FINAL = ("promoted", "rejected", "failed", "nothing_to_learn", "interrupted")


class TrainerBusy(RuntimeError):
    """Another trainer holds this model's lock (one trainer at a time per model)."""


@dataclass
class TrainingRun:
    """One training cycle: `status` is running, promoted, rejected, failed, nothing_to_learn or
    interrupted; `reason` says why in words a person reads in `honed status`."""

    id: int
    model: str
    method: str
    status: str
    parent: str | None = None
    candidate: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    error: str | None = None
    owner: str = ""
    started_at: datetime | None = None
    ended_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("started_at", "ended_at"):
            d[key] = d[key].isoformat() if d[key] else None
        return d


@dataclass
class EvalRun:
    """One scored evaluation of `version` on `split` (metrics from `honed.learn.evaluate.Scores`)."""

    id: int
    model: str
    version: str
    split: str
    metrics: dict[str, Any] = field(default_factory=dict)
    training_run: int | None = None
    duration_s: float = 0.0
    created_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat() if self.created_at else None
        return d


def default_owner() -> str:
    """`host@scope:pid`: the scope tells apart pid spaces that share a host name (containers
    with a fixed hostname or `--network host`, where each sees the other's pid as gone)."""
    return f"{socket.gethostname()}@{_pid_scope()}:{os.getpid()}"


@functools.cache
def _pid_scope() -> str:
    """This boot's id and this pid namespace's, hashed: where a pid means this process."""
    parts = []
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:10] if parts else "-"


def _process_gone(owner: str) -> bool:
    """Whether `owner` (`default_owner()`) names a process of this pid space that has ended. An
    owner of another scope (another container, another boot, an older honed's `host:pid`) is
    never judged from here: its lock expires with its ttl."""
    where, _, pid = owner.rpartition(":")
    if where != f"{socket.gethostname()}@{_pid_scope()}" or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: alive
        return False
    return False


def _interrupt_runs(session: Any, model: str, now: datetime, reason: str) -> None:
    """Mark `model`'s runs left `running` interrupted, and reject the candidates they registered
    (left `candidate`, never gated, they would sit in the registry forever)."""
    from honed.store.registry_tables import ModelEventRow, ModelVersionRow

    running = list(
        session.scalars(
            select(TrainingRunRow.id).where(TrainingRunRow.model == model, TrainingRunRow.status == "running")
        )
    )
    if not running:
        return
    # Stopped after its gate promoted its candidate, before the run said so (a kill -9 between the
    # two writes): it was recorded "the live version was not changed" beside its own promotion.
    promoted = dict(
        session.execute(
            select(ModelVersionRow.training_run, ModelVersionRow.version).where(
                ModelVersionRow.training_run.in_(running), ModelVersionRow.status.in_(("live", "retired"))
            )
        ).all()
    )
    for run_id, version in promoted.items():
        session.execute(
            update(TrainingRunRow)
            .where(TrainingRunRow.id == run_id)
            .values(
                status="promoted",
                ended_at=now,
                reason=f"the trainer stopped after promoting its candidate ({model}@v{version}), "
                "before recording the run",
            )
        )
    running = [r for r in running if r not in promoted]
    if not running:
        return
    session.execute(
        update(TrainingRunRow)
        .where(TrainingRunRow.id.in_(running))
        .values(status="interrupted", ended_at=now, reason=reason)
    )
    orphans = session.scalars(
        select(ModelVersionRow).where(
            ModelVersionRow.training_run.in_(running), ModelVersionRow.status == "candidate"
        )
    ).all()
    for version in orphans:
        version.status = "rejected"
        session.add(
            ModelEventRow(
                name=version.name,
                action="reject",
                version_id=version.id,
                actor="honed",
                reason=f"its training run {version.training_run} was interrupted before the gate",
            )
        )


class TrainingLog:
    """The training log, a part of `TrajectoryStore`: training runs, eval runs and the trainer lock."""

    def __init__(self, db: Database) -> None:
        self.engine, self._sessions = db.engine, db.sessions

    # -- the lock --------------------------------------------------------------------------

    def acquire_trainer_lock(self, model: str, *, owner: str | None = None, ttl_s: float = 3600.0) -> str:
        """Take `model`'s trainer lock for `ttl_s` (renew it while working); returns the owner.

        A lock past its expiry is taken over, and so is one whose holder was a process of this
        machine that no longer exists (killed, out of memory): the runs its holder left `running`
        are marked `interrupted`, and the candidates they registered `rejected` (never gated).
        Raises `TrainerBusy` when a live holder has it.
        """
        owner = owner or default_owner()
        now = datetime.now(UTC)
        expires = now + timedelta(seconds=ttl_s)
        with self._sessions.begin() as session:
            row = session.get(TrainerLockRow, model)
            held = [TrainerLockRow.model == model]
            if row is not None and _process_gone(row.owner):
                held.append(TrainerLockRow.owner == row.owner)
            else:  # atomically: a holder renewing meanwhile keeps it
                held.append(TrainerLockRow.expires_at < now)
            if (
                row is not None
                and session.execute(
                    update(TrainerLockRow)
                    .where(*held)
                    .values(owner=owner, acquired_at=now, expires_at=expires)
                ).rowcount
            ):
                _interrupt_runs(
                    session, model, now,
                    "the trainer stopped before finishing (its lock expired or its process ended); "
                    "the live version was not changed",
                )  # fmt: skip
                return owner
        try:
            with self._sessions.begin() as session:
                session.execute(
                    insert(TrainerLockRow).values(
                        model=model, owner=owner, acquired_at=now, expires_at=expires
                    )
                )
                # A run left `running` with no lock row at all (the lock was released by hand).
                _interrupt_runs(session, model, now, "the trainer stopped before finishing")
            return owner
        except IntegrityError:
            holder = self.trainer_lock_holder(model)
            raise TrainerBusy(
                f"{model}: another trainer holds the lock ({holder or 'unknown'}); one trainer at a time per model"
            ) from None

    def renew_trainer_lock(self, model: str, owner: str, *, ttl_s: float = 3600.0) -> bool:
        with self._sessions.begin() as session:
            return bool(
                session.execute(
                    update(TrainerLockRow)
                    .where(TrainerLockRow.model == model, TrainerLockRow.owner == owner)
                    .values(expires_at=datetime.now(UTC) + timedelta(seconds=ttl_s))
                ).rowcount
            )

    def release_trainer_lock(self, model: str, owner: str) -> None:
        with self._sessions.begin() as session:
            session.execute(
                delete(TrainerLockRow).where(TrainerLockRow.model == model, TrainerLockRow.owner == owner)
            )

    def trainer_lock_holder(self, model: str) -> str | None:
        with self._sessions() as session:
            row = session.get(TrainerLockRow, model)
            if row is None or row.expires_at < datetime.now(UTC) or _process_gone(row.owner):
                return None  # a trainer killed on this machine holds nothing, whatever its ttl
            return row.owner

    @contextmanager
    def trainer_lock(self, model: str, *, ttl_s: float = 3600.0) -> Iterator[str]:
        """Hold `model`'s trainer lock for the block, renewed every third of `ttl_s` while it runs
        (a training run and its gate may outlast any fixed time: unrenewed, a second trainer took
        the lock over mid-run and marked the first interrupted while it still trained)."""
        owner = self.acquire_trainer_lock(model, ttl_s=ttl_s)
        done = threading.Event()

        def renew() -> None:
            while not done.wait(ttl_s / 3):
                try:
                    if not self.renew_trainer_lock(model, owner, ttl_s=ttl_s):
                        return  # taken over: the holder checks before it promotes
                except Exception:  # the store briefly down: the next renewal may get through
                    log.warning("honed: could not renew the trainer lock of %s", model, exc_info=True)

        renewer = threading.Thread(target=renew, name=f"honed-trainer-lock[{model}]", daemon=True)
        renewer.start()
        try:
            yield owner
        finally:
            done.set()
            renewer.join(timeout=10)
            self.release_trainer_lock(model, owner)

    # -- runs ------------------------------------------------------------------------------

    def start_training_run(
        self, model: str, method: str, *, parent: str | None, config: dict[str, Any], owner: str = ""
    ) -> TrainingRun:
        with self._sessions.begin() as session:
            row = TrainingRunRow(
                model=model, method=method, status="running", parent=parent, config=config, owner=owner
            )
            session.add(row)
            session.flush()
            return _run(row)

    def update_training_run(self, run_id: int, **fields: Any) -> TrainingRun:
        """Set fields of a run (`status`, `data`, `metrics`, `candidate`, `reason`, `error`); a final
        status stamps `ended_at`. `metrics` and `data` are merged into what is there."""
        with self._sessions.begin() as session:
            row = session.get(TrainingRunRow, run_id)
            if row is None:
                raise KeyError(f"no training run {run_id}")
            for key in ("metrics", "data"):
                if key in fields:
                    fields[key] = {**getattr(row, key), **fields[key]}
            for key, value in fields.items():
                setattr(row, key, value)
            if fields.get("status") in FINAL:
                row.ended_at = datetime.now(UTC)
            session.flush()
            return _run(row)

    def add_training_examples(self, run_id: int, trajectory_ids: Iterable[str]) -> int:
        rows = [{"run_id": run_id, "trajectory_id": t} for t in dict.fromkeys(trajectory_ids)]
        if rows:
            with self._sessions.begin() as session:
                session.execute(insert(TrainingExampleRow), rows)
        return len(rows)

    def training_examples(self, run_id: int) -> list[str]:
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(TrainingExampleRow.trajectory_id).where(TrainingExampleRow.run_id == run_id)
                )
            )

    def trained_on(self, trajectory_id: str) -> list[TrainingRun]:
        """The training runs whose datasets were built from this trajectory (lineage read back:
        which versions hold a run's content, what an erasure asks), oldest first."""
        with self._sessions() as session:
            rows = session.scalars(
                select(TrainingRunRow)
                .join(TrainingExampleRow, TrainingExampleRow.run_id == TrainingRunRow.id)
                .where(TrainingExampleRow.trajectory_id == trajectory_id)
                .order_by(TrainingRunRow.id)
            ).all()
            return [_run(row) for row in rows]

    def training_runs(
        self, model: str | None = None, *, limit: int | None = 50, statuses: Iterable[str] | None = None
    ) -> list[TrainingRun]:
        """Runs, newest first; of those `statuses` only, when given."""
        query = select(TrainingRunRow).order_by(TrainingRunRow.id.desc()).limit(limit)
        if model is not None:
            query = query.where(TrainingRunRow.model == model)
        if statuses is not None:
            query = query.where(TrainingRunRow.status.in_(list(statuses)))
        with self._sessions() as session:
            return [_run(r) for r in session.scalars(query)]

    def training_run(self, run_id: int) -> TrainingRun:
        with self._sessions() as session:
            row = session.get(TrainingRunRow, run_id)
            if row is None:
                raise KeyError(f"no training run {run_id}")
            return _run(row)

    # -- evaluations -----------------------------------------------------------------------

    def record_eval(
        self,
        model: str,
        version: str,
        split: str,
        metrics: dict[str, Any],
        *,
        training_run: int | None = None,
        duration_s: float = 0.0,
    ) -> EvalRun:
        with self._sessions.begin() as session:
            row = EvalRunRow(
                model=model,
                version=version,
                split=split,
                metrics=metrics,
                training_run=training_run,
                duration_s=duration_s,
            )
            session.add(row)
            session.flush()
            return _eval(row)

    def eval_runs(
        self, model: str | None = None, *, version: str | None = None, split: str | None = None
    ) -> list[EvalRun]:
        """Evaluations, oldest first."""
        query = select(EvalRunRow).order_by(EvalRunRow.id)
        if model is not None:
            query = query.where(EvalRunRow.model == model)
        if version is not None:
            query = query.where(EvalRunRow.version == version)
        if split is not None:
            query = query.where(EvalRunRow.split == split)
        with self._sessions() as session:
            return [_eval(r) for r in session.scalars(query)]


def _run(row: TrainingRunRow) -> TrainingRun:
    return TrainingRun(
        id=row.id,
        model=row.model,
        method=row.method,
        status=row.status,
        parent=row.parent,
        candidate=row.candidate,
        config=dict(row.config or {}),
        data=dict(row.data or {}),
        metrics=dict(row.metrics or {}),
        reason=row.reason or "",
        error=row.error,
        owner=row.owner or "",
        started_at=row.started_at,
        ended_at=row.ended_at,
    )


def _eval(row: EvalRunRow) -> EvalRun:
    return EvalRun(
        id=row.id,
        model=row.model,
        version=row.version,
        split=row.split,
        metrics=dict(row.metrics or {}),
        training_run=row.training_run,
        duration_s=row.duration_s or 0.0,
        created_at=row.created_at,
    )
