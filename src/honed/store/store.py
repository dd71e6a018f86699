"""The trajectory store: one SQLAlchemy engine, migrations applied on open, typed queries.

Every process of the loop (agents, verifier workers, trainers, the CLI) shares nothing but this
store, so its API speaks `honed.trajectory` objects and its filters are the ones those processes need.
"""

from __future__ import annotations

import logging
import operator
import os
import re
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import closing, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

from sqlalchemy import (
    JSON,
    Engine,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    false,
    func,
    insert,
    inspect,
    literal,
    select,
    text,
    true,
    tuple_,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DataError, SQLAlchemyError
from sqlalchemy.orm import aliased, sessionmaker
from sqlalchemy.pool import StaticPool

from honed._json import dumps as fast_json_dumps
from honed._json import scrubbed
from honed.store import retention
from honed.store.conversations import compact
from honed.store.database import Database
from honed.store.reader import read, trajectory_columns
from honed.store.registry import ModelRegistry
from honed.store.roles import possibly_held_out
from honed.store.schema import JSONText, StepRow, TrajectoryRow, UTCDateTime, VerdictRow
from honed.store.signing import Signer, content_digest, signer_from_env
from honed.store.training import TrainingLog
from honed.store.verification import VerificationStore, verdict_row
from honed.trajectory import ERROR_KEY, HELDOUT, INTERRUPTED, Status, Step, Trajectory, Verdict

log = logging.getLogger("honed")

DEFAULT_STORE_URL = "sqlite:///honed.db"
VerdictFilter = Literal["pass", "fail", "labeled", "unlabeled"]
_MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK_KEY = 0x686F6E6564  # "honed": serialises concurrent first opens on PostgreSQL


class StoreUnavailable(RuntimeError):
    """The store cannot be reached or migrated; the message names the URL (password hidden)."""


class StoreNotFound(StoreUnavailable):
    """`open_store(url, create=False)` found no honed store there (read-only commands never make one)."""


class StoreSchemaOld(StoreUnavailable):
    """`open_store(url, create=False)` found a store of an older honed: reading never upgrades it
    (`honed init` does), since the older honed processes writing to it could not after."""


class StoreSchemaUnknown(StoreUnavailable):
    """The database's schema is at a revision this honed does not know: a newer honed's store
    (upgrade honed), or another application's database. Nothing was changed."""


class InvalidStoreURL(ValueError):
    """A store URL that can never work: malformed, or a database honed does not support. Not an
    outage: retrying cannot help, the configuration must change."""


class TrajectoryNotFound(KeyError):
    """No trajectory has this id (or id prefix)."""

    def __str__(self) -> str:  # the message, not KeyError's repr of it
        return str(self.args[0]) if self.args else ""


class AmbiguousTrajectoryId(TrajectoryNotFound):
    """An id prefix (or suffix) that several trajectories share."""


SUPPORTED_SCHEMES = ("sqlite:///PATH", "postgresql://USER@HOST/DB")
# `postgres://` (Heroku, many PaaS) and a bare `postgresql://` mean psycopg 3, the driver of
# `honed[postgres]` (SQLAlchemy's own default for a bare `postgresql://` is psycopg2).
_DRIVER_ALIASES = {"postgres": "postgresql+psycopg", "postgresql": "postgresql+psycopg"}
_SUPPORTED_BACKENDS = {"sqlite", "postgresql"}


def resolve_store_url(url: str | None = None) -> str:
    """An explicit URL, else `HONED_STORE`, else `sqlite:///honed.db` in the working directory;
    `postgres://` and `postgresql://` become `postgresql+psycopg://`. Never raises: a URL that
    cannot work is reported when a store is opened with it (`check_store_url`)."""
    url = url or os.environ.get("HONED_STORE") or DEFAULT_STORE_URL
    try:
        return check_store_url(url)
    except InvalidStoreURL:
        return url


def check_store_url(url: str) -> str:
    """The URL normalised (driver aliases applied), or `InvalidStoreURL` with a one-line reason
    naming the supported schemes."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError, TypeError) as exc:
        raise InvalidStoreURL(
            f"{_shown(url)} is not a store URL; use {' or '.join(SUPPORTED_SCHEMES)}"
        ) from exc
    if parsed.drivername in _DRIVER_ALIASES:
        return parsed.set(drivername=_DRIVER_ALIASES[parsed.drivername]).render_as_string(hide_password=False)
    if parsed.get_backend_name() == "sqlite" and not parsed.database and re.match(r"[^:]*:///(\?|$)", url):
        # `sqlite:///$STORE_PATH` with the variable unset: a store in memory lost every run.
        raise InvalidStoreURL(
            f"{_shown(url)} names no file: use {' or '.join(SUPPORTED_SCHEMES)} (sqlite:// is a "
            "store in memory, gone with the process)"
        )
    if parsed.get_backend_name() == "sqlite" and parsed.host:
        # `sqlite://x.db`: SQLite's file follows three slashes (a QA pass, session 25: told to
        # `honed init` it, which then failed as "Invalid SQLite URL").
        raise InvalidStoreURL(
            f"{_shown(url)} names a host, not a file: a store's file is sqlite:///{parsed.host}"
            f"{'/' + parsed.database if parsed.database else ''} (three slashes; four for an absolute path): "
            f"use {' or '.join(SUPPORTED_SCHEMES)}"
        )
    if parsed.get_backend_name() not in _SUPPORTED_BACKENDS:
        raise InvalidStoreURL(
            f"unsupported store URL {_shown(url)}: honed stores live in SQLite or PostgreSQL "
            f"({' or '.join(SUPPORTED_SCHEMES)})"
        )
    return url


def open_store(
    url: str | None = None, *, create: bool = True, verdict_key: str | Literal[False] | None = None
) -> TrajectoryStore:
    """Open the store at `url` (see `resolve_store_url` for the default), migrating it to the
    current schema. With `create=False` (what read-only commands use) a URL with no honed store
    raises `StoreNotFound` instead of creating one, and a store of an older honed `StoreSchemaOld`
    instead of upgrading it: nothing is written there. `verdict_key`
    (default `$HONED_VERDICT_KEY`) signs the labels written and counts only signed ones
    (`honed.store.signing`); False: neither (what capture and serving open: they write no label)."""
    return TrajectoryStore(resolve_store_url(url), create=create, verdict_key=verdict_key)


class _Part:
    """`store.promote(...)` is `store.registry.promote(...)`: the facade's flat API, one line per
    method of a part (so the table below is the store's whole surface)."""

    def __init__(self, part: str) -> None:
        self.part = part

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, store: Any, owner: type | None = None) -> Any:
        return self if store is None else getattr(getattr(store, self.part), self.name)


class TrajectoryStore:
    """Typed access to trajectories, their steps and verdicts, composed with its parts: the model
    `registry`, the `training` log and `verification` (work queue, audits), each given the one
    `Database` it needs. Their methods are also the store's own (`store.promote` ...).

    Thread-safe: each call opens its own short session. Writes of captured trajectories are
    idempotent (an id already stored is skipped), which is what lets a spool be replayed safely.
    """

    def __init__(
        self,
        url: str,
        *,
        migrate: bool = True,
        create: bool = True,
        verdict_key: str | Literal[False] | None = None,
    ) -> None:
        self.url = check_store_url(url)
        # Before any connection: a bad key is said at once, not after the agent ran.
        self.signer = (
            None if verdict_key is False else Signer(verdict_key) if verdict_key else signer_from_env()
        )
        _check_sqlite_file(self.url, must_exist=not create)
        self.engine = _create_engine(self.url, create=create)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        db = Database(self.engine, self._sessions, self.signer)
        self.registry, self.training, self.verification = (
            ModelRegistry(db),
            TrainingLog(db),
            VerificationStore(db),
        )
        if migrate:
            try:
                _migrate(self.engine, create=create, shown=self.safe_url)
            except SQLAlchemyError as exc:
                self.engine.dispose()
                if "must be owner of" in str(exc):  # a capture role meeting a schema to upgrade
                    raise StoreUnavailable(
                        f"cannot open the store at {self.safe_url}: its schema must be upgraded by the store's "
                        f"owner (`honed init --store OWNER_URL`, then `--capture-role` again); this role may "
                        f"not ({str(exc).splitlines()[0]})"
                    ) from exc
                raise StoreUnavailable(f"cannot open the store at {self.safe_url}: {exc}") from exc
            except StoreUnavailable:
                self.engine.dispose()
                raise

    # -- the parts' methods, as the store's own ------------------------------------------------

    versions = _Part("registry")
    model_version = _Part("registry")
    live_version = _Part("registry")
    live_pointer = _Part("registry")
    model_names = _Part("registry")
    model_history = _Part("registry")
    register_model = _Part("registry")
    promote = _Part("registry")
    rollback = _Part("registry")
    reject = _Part("registry")

    acquire_trainer_lock = _Part("training")
    renew_trainer_lock = _Part("training")
    release_trainer_lock = _Part("training")
    trainer_lock_holder = _Part("training")
    trainer_lock = _Part("training")
    start_training_run = _Part("training")
    update_training_run = _Part("training")
    add_training_examples = _Part("training")
    training_examples = _Part("training")
    trained_on = _Part("training")
    training_runs = _Part("training")
    training_run = _Part("training")
    record_eval = _Part("training")
    eval_runs = _Part("training")

    enqueue_verification = _Part("verification")
    claim_verification = _Part("verification")
    renew_claims = _Part("verification")
    finish_claims = _Part("verification")
    release_claims = _Part("verification")
    verification_backlog = _Part("verification")
    audit_verifier = _Part("verification")
    audits = _Part("verification")
    set_min_precision = _Part("verification")
    set_trust = _Part("verification")
    rekey = _Part("verification")
    register_verifiers = _Part("verification")
    verifier_policy = _Part("verification")
    verifier_policies = _Part("verification")
    untrusted_verifiers = _Part("verification")
    verifier_counts = _Part("verification")
    unsigned_verdicts = _Part("verification")
    label_signing = _Part("verification")

    @property
    def safe_url(self) -> str:
        return safe_url(self.url)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def grant_capture(self, role: str) -> list[str]:
        """Let a PostgreSQL role capture into this store and do nothing more (`honed.store.roles`):
        the role the agent's process connects as."""
        from honed.store.roles import grant_capture

        return grant_capture(self.engine, role)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> TrajectoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TrajectoryStore({self.safe_url!r})"

    # -- writing ---------------------------------------------------------------------------

    def save_records(self, records: Sequence[dict[str, Any]]) -> int:
        """Insert captured trajectory records (the writer's and the spool's format) in one
        transaction; returns how many trajectories were new.

        Idempotent, so a spool can be replayed: a record whose id is stored is skipped, except
        that a run resumed after an interrupt continues its trajectory: a record that continues a
        stored `interrupted` one (same id, or `resumes` on the thread of one) adds the steps not
        stored yet and, ending later, takes over its status, output and end."""
        if not records:
            return 0
        try:
            return self._save_records(records)
        except (DataError, UnicodeError):
            # Text no database takes (NUL, a lone surrogate from a hostile client or a broken
            # tool), which would fail the whole batch on every retry: stored with U+FFFD instead.
            return self._save_records([scrubbed(r) for r in records])

    def _save_records(self, records: Sequence[dict[str, Any]]) -> int:
        ids = [r["id"] for r in records]
        with self._sessions.begin() as session:
            existing = set(session.scalars(select(TrajectoryRow.id).where(TrajectoryRow.id.in_(ids))))
            fresh, continuations, seen = [], [], set(existing)
            for record in records:
                if record.get("resumes") or record["id"] in seen:
                    continuations.append(record)
                else:
                    seen.add(record["id"])
                    fresh.append(record)
            if fresh:
                trajectory_rows, step_rows = [], []
                for record in fresh:
                    steps = [_step_row(record["id"], s) for s in record.get("steps") or ()]
                    trajectory_rows.append(_conversation_once(_trajectory_row(record), steps))
                    step_rows += steps
                _insert(session, TrajectoryRow, trajectory_rows)
                _insert(session, StepRow, step_rows)
            return len(fresh) + sum(_continue(session, record) for record in continuations)

    def save(self, trajectory: Trajectory) -> None:
        """Store a `Trajectory` built in code (imports, tests, synthetic data)."""
        self.save_records([trajectory_to_record(trajectory)])

    # Retention and erasure (`honed.store.retention`): `store.prune(until=..., agent=..., ids=...)`.
    prune = retention.prune

    def add_verdict(self, trajectory_id: str, verdict: Verdict) -> Verdict:
        """Record a verdict; one per (trajectory, verifier, version), so re-running replaces it.
        A pass that reports an error in its evidence is refused: it would count as a judgement
        (errors are `passed=None`, see `honed.trajectory.is_verifier_error`)."""
        if verdict.passed is True and (verdict.evidence or {}).get(ERROR_KEY):
            raise ValueError(
                f"verdict of {verdict.verifier!r} passes and reports an error "
                f"({verdict.evidence[ERROR_KEY]!r}): a verifier that failed to judge says passed=None"
            )
        # Signed, a verdict names the content it judged: the run as stored now.
        digest = None
        if self.signer is not None:
            judged = self.trajectories(ids=[trajectory_id], limit=None)
            if not judged:
                raise TrajectoryNotFound(trajectory_id)
            digest = content_digest(judged[0])
        with self._sessions.begin() as session:
            if session.get(TrajectoryRow, trajectory_id) is None:
                raise TrajectoryNotFound(trajectory_id)
            session.execute(
                delete(VerdictRow).where(
                    VerdictRow.trajectory_id == trajectory_id,
                    VerdictRow.verifier == verdict.verifier,
                    VerdictRow.version == verdict.version,
                )
            )
            row = VerdictRow(**verdict_row(trajectory_id, verdict, _now(), digest, self.signer))
            session.add(row)
            session.flush()
            written = _verdict(row)
        if self.signer is not None:  # signed, a verifier with no signed policy is not trusted
            trust = "low" if (verdict.evidence or {}).get("trust") == "low" else "high"
            self.register_verifiers({verdict.verifier: trust}, only_new=True)
        return written

    # -- reading ---------------------------------------------------------------------------

    def trajectories(
        self,
        limit: int | None = 50,
        *,
        offset: int = 0,
        after: Trajectory | None = None,
        agent: str | None = None,
        task_id: str | None = None,
        split: str | Sequence[str] | None = None,
        status: str | None = None,
        verdict: VerdictFilter | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        model_version: str | Sequence[str] | None = None,
        thread_id: str | None = None,
        finished: bool | None = None,
        ids: Iterable[str] | None = None,
        exclude_task_ids: Iterable[str] | None = None,
        with_steps: bool = True,
        step_content: bool = True,
        oldest_first: bool = False,
    ) -> list[Trajectory]:
        """Trajectories matching every given filter, newest first (oldest first when asked).

        `verdict="pass" | "fail"` is `honed.trajectory.label` in SQL: only judgements of trusted
        verifiers count (`untrusted_verifiers()`); `"labeled" | "unlabeled"`: any verdict or none.
        With a verdict key only signed verdicts count there, and the rows read keep only those whose
        signature checks out (`honed.store.signing`): `select_trajectories` applies `label` to them,
        exact where SQL cannot check a signature. `thread_id` gives the turns of one conversation;
        `finished=True` leaves out runs paused at
        an interrupt (`False`: only those). `step_content=False` leaves each step's `input` and
        `output` None (what a span export without content needs, read ~40% faster). `after`, the
        last trajectory of the previous page, pages by position rather than `offset`: a run stored
        meanwhile that started earlier (a long one finishing) shifts no page, so none is read twice."""
        order = (TrajectoryRow.started_at, TrajectoryRow.id)
        if not oldest_first:
            order = tuple(c.desc() for c in order)
        cursor = true() if after is None else _beyond(after, oldest_first)
        page = _filtered(
            select(TrajectoryRow.id), agent=agent, task_id=task_id, split=self.split_names(split), status=status,
            verdict=verdict, since=since, until=until, model_version=model_version, thread_id=thread_id,
            finished=finished, ids=ids, exclude_task_ids=exclude_task_ids,
            untrusted=self._untrusted_for(verdict), signed=self.signer is not None,
        ).where(cursor).order_by(*order).offset(offset).limit(limit).subquery()  # fmt: skip
        # The page's ids first, then its rows by primary key: an OFFSET skips ids, not whole rows.
        columns = trajectory_columns(self.dialect, with_steps=with_steps, step_content=step_content)
        query = select(*columns).join(page, TrajectoryRow.id == page.c.id).order_by(*order)
        with self.engine.connect() as conn:
            return read(
                conn,
                conn.execute(query).all(),
                with_steps=with_steps,
                step_content=step_content,
                signer=self.signer,
            )

    def first_stored(self, *, split: str | Sequence[str], agent: str | None = None) -> dict[str, str]:
        """Each task id of `split` (and `agent`) with the id of its run stored first: by when the
        database stored it, which a capture role cannot set (`honed.store.roles`), not by when
        the run says it started. In the order they were stored."""
        T = TrajectoryRow
        query = _filtered(
            select(T.task_id, T.id).where(T.task_id.is_not(None)), agent=agent, split=self.split_names(split)
        ).order_by(T.created_at, T.id)
        first: dict[str, str] = {}
        with self._sessions() as session:
            for task_id, run_id in session.execute(query):
                first.setdefault(task_id, run_id)
        return first

    def count(
        self,
        *,
        agent: str | None = None,
        task_id: str | None = None,
        split: str | Sequence[str] | None = None,
        status: str | None = None,
        verdict: VerdictFilter | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        model_version: str | None = None,
        thread_id: str | None = None,
        finished: bool | None = None,
        exclude_task_ids: Iterable[str] | None = None,
    ) -> int:
        """How many trajectories `trajectories()` would return for the same filters."""
        query = _filtered(
            select(func.count()).select_from(TrajectoryRow),
            agent=agent, task_id=task_id, split=self.split_names(split), status=status, verdict=verdict,
            since=since, until=until, model_version=model_version, thread_id=thread_id,
            finished=finished, exclude_task_ids=exclude_task_ids,
            untrusted=self._untrusted_for(verdict), signed=self.signer is not None,
        )  # fmt: skip
        with self._sessions() as session:
            return int(session.scalar(query) or 0)

    def stored_values(self, field: Literal["agent", "model_version", "split", "status"]) -> list[str]:
        """The values a filter of that name can match (an agent's name, a model version, ...), so
        that a selection that matched nothing can say what would have matched."""
        if field not in ("agent", "model_version", "split", "status"):
            raise ValueError(f"no stored values for {field!r}")
        column = getattr(TrajectoryRow, field)
        with self._sessions() as session:
            return sorted(v for v in session.scalars(select(column).distinct()).all() if v is not None)

    def split_names(self, split: str | Sequence[str] | None) -> str | Sequence[str] | None:
        """The stored splits a `split=` filter means: a name however written (`Test`, `test`), and
        the held-out split ("heldout") every evaluation split (`test`, `eval`, `validation`, ...),
        as the held-out policy has it. A sequence is taken as stored names already: a reader of
        many pages resolves its name once (one `DISTINCT` query), not once per page."""
        from honed.store.select import evaluation_split, same_split

        if split is None or not isinstance(split, str):
            return split
        held = same_split(split, HELDOUT)
        stored = self.stored_values("split")
        return [s for s in stored if (evaluation_split(s) if held else same_split(s, split))] or [split]

    def _untrusted_for(self, verdict: str | None) -> set[str]:
        return self.untrusted_verifiers() if verdict in ("pass", "fail") else set()

    def get(self, trajectory_id: str) -> Trajectory:
        """One trajectory by id, or by a unique prefix or suffix of it, or the start of the short id
        the CLI prints (its last 12 characters: ids are time-ordered UUIDs, so their heads are
        alike; a new user typed the head of what `honed runs` showed, a QA pass, session 27)."""
        columns = trajectory_columns(self.dialect, with_steps=True)
        with self.engine.connect() as conn:
            rows = conn.execute(select(*columns).where(TrajectoryRow.id == trajectory_id)).all()
            if not rows and trajectory_id:
                rows = conn.execute(
                    select(*columns)
                    .where(
                        TrajectoryRow.id.startswith(trajectory_id, autoescape=True)
                        | TrajectoryRow.id.endswith(trajectory_id, autoescape=True)
                        | (
                            func.substr(
                                TrajectoryRow.id, func.length(TrajectoryRow.id) - 11, len(trajectory_id)
                            )
                            == trajectory_id
                            if len(trajectory_id) <= 12
                            else false()
                        )
                    )
                    .limit(2)
                ).all()
                if len(rows) > 1:
                    raise AmbiguousTrajectoryId(
                        f"{trajectory_id!r} matches several trajectories; give more of the id"
                    )
            if not rows:
                raise TrajectoryNotFound(trajectory_id)
            return read(conn, rows, with_steps=True, signer=self.signer)[0]

    def ping(self) -> bool:
        """True when the store answers a trivial query."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except SQLAlchemyError:
            return False


# -- engine and migrations ---------------------------------------------------------------------

_migrate_lock = threading.Lock()


def _create_engine(url: str, *, create: bool = True) -> Engine:
    parsed = make_url(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            database = parsed.database or ""
            in_memory = database in ("", ":memory:") or "mode=memory" in database
            if not in_memory and database.startswith("~"):  # SQLite opens `~` as a folder named so
                parsed = parsed.set(database=str(Path(database).expanduser()))
            if not in_memory and create:
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            read_only = None if in_memory else _read_only_uri(Path(database).expanduser())
            engine = create_engine(
                parsed,
                connect_args={"timeout": 30, "check_same_thread": False},
                poolclass=StaticPool if in_memory else None,
                json_serializer=fast_json_dumps,
                **({"creator": read_only} if read_only else {}),
            )
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        connect_args = {"connect_timeout": 10} if parsed.get_backend_name() == "postgresql" else {}
        return create_engine(
            parsed, pool_pre_ping=True, connect_args=connect_args, json_serializer=fast_json_dumps
        )
    except (ArgumentError, ImportError) as exc:  # e.g. a driver that is not installed
        raise InvalidStoreURL(
            f"cannot use the store URL {_shown(url)}: {exc} (honed[postgres] installs psycopg for "
            "postgresql://)"
        ) from exc


def _read_only_uri(path: Path) -> Callable[[], sqlite3.Connection] | None:
    """How to open a store file nobody here may write (a snapshot on a read-only mount, a folder
    of another user's), or None when it can be written. Opened as it is, SQLite could not read it
    at all (a QA pass, session 23): a WAL-mode file needs its `-shm` beside it, made at the first
    read. `mode=ro` reads one whose `-shm` is there; on a read-only file system, where it cannot
    be and nothing can change the file, `immutable=1` reads it without one (the writes of a `-wal`
    left beside it not checkpointed are not seen: said in a warning)."""
    if not path.is_file() or (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
        return None
    uri = path.resolve().as_uri()
    try:
        with closing(sqlite3.connect(f"{uri}?mode=ro", uri=True)) as conn:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        uri += "?mode=ro"
    except sqlite3.Error:
        read_only_fs = bool(os.statvfs(path.parent).f_flag & os.ST_RDONLY)
        if not read_only_fs:
            return None  # the normal open says why it cannot be read
        wal = path.with_name(path.name + "-wal")
        if wal.is_file() and wal.stat().st_size:
            log.warning(
                "honed: %s is on a read-only file system beside a write-ahead log that was not "
                "checkpointed; its last writes are not read",
                path,
            )
        uri += "?immutable=1"
    log.info("honed: %s cannot be written here: it is opened read-only", path)
    return lambda: sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)


def _check_sqlite_file(url: str, *, must_exist: bool) -> None:
    """Without creating or changing anything (not even the file, its folder or a WAL): is there a
    SQLite file (where it `must_exist`), and is it a honed store or one to make? A file holding
    another application's tables is neither (a QA pass, session 20: `honed init` added honed's
    tables to it and switched it to WAL)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return
    database = parsed.database or ""
    path = Path(database).expanduser()
    if database in ("", ":memory:") or "mode=memory" in database or not path.is_file():
        if must_exist:
            raise StoreNotFound(_not_found(url))
        return
    try:  # read-only: a file that is not a honed store must not even be switched to WAL
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:
        return  # cannot tell read-only (a locked WAL file, say): the normal open decides
    if "alembic_version" in tables:
        return
    from honed.store.schema import Base

    foreign = sorted(tables - set(Base.metadata.tables) - {"sqlite_sequence"})
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise StoreSchemaUnknown(
            f"{_shown(url)} is another application's SQLite database (tables: {shown}): a honed store "
            "is a file of its own; nothing was changed"
        )
    if must_exist:
        raise StoreNotFound(_not_found(url))


def _beyond(last: Trajectory, oldest_first: bool) -> Any:
    """Rows after `last` in the (started_at, id) order, either way: a row-value comparison, which
    both databases answer from the index on that order (spelled with OR and AND, SQLite sorted the
    table again for every page: bulk reads 35% slower)."""
    position = tuple_(TrajectoryRow.started_at, TrajectoryRow.id)
    here = tuple_(literal(last.started_at, UTCDateTime()), literal(last.id))
    return position > here if oldest_first else position < here


def _not_found(shown: str) -> str:
    return (
        f"no honed store at {_shown(shown)}; create one with `honed init --store {_shown(shown)}` "
        "(capturing into it creates it too)"
    )


def _shown(url: str) -> str:
    try:
        return safe_url(url)
    except Exception:  # not a URL SQLAlchemy reads (a typo in the port): mask what looks secret
        masked = _USERINFO_PASSWORD.sub(r"\1***@", str(url))
        return repr(_QUERY_SECRET.sub(r"\1***", masked))


_USERINFO_PASSWORD = re.compile(r"(://[^/?#@:]*:)[^/?#]*@")
_QUERY_SECRET = re.compile(r"([?&;][^=&;]*(?:pass|pwd|token|secret|key)[^=&;]*=)[^&;]*", re.I)


def safe_url(url: str | URL) -> str:
    """A store URL fit for logs, files and pages: the user's password and every query parameter
    that names a secret (libpq's `password`, `sslpassword`, a `token`) shown as `***`."""
    parsed = make_url(url)
    hidden = {k: "***" for k in parsed.query if _SECRET_PARAM.search(k)}
    return parsed.update_query_dict(hidden).render_as_string(hide_password=True)


_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|api.?key|credential|auth", re.I)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # WAL lets readers (CLI, verifiers) run while the writer appends. A read-only file (a
        # backup copy) cannot switch, and is read as it is.
        with suppress(sqlite3.OperationalError):
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


# The newest migration's revision. Opening a store at this revision reads one row and never
# imports alembic (0.2-0.4 s of every start); a test keeps it equal to the migrations' head.
SCHEMA_HEAD = "0008"
_KNOWN_REVISIONS = frozenset(f"{n:04d}" for n in range(1, int(SCHEMA_HEAD)))  # older than head


def _migrate(engine: Engine, *, create: bool = True, shown: str = "") -> None:
    """Bring the schema to head; cheap when it already is (one row read, no alembic import).
    With `create=False`, a database with no honed schema raises `StoreNotFound` untouched."""
    with _migrate_lock:
        revision = _revision(engine)
        if revision == SCHEMA_HEAD:
            return
        if revision is None and not create:
            raise StoreNotFound(_not_found(shown or safe_url(engine.url)))
        if not create and revision in _KNOWN_REVISIONS:
            # A reading command upgraded a store an older honed agent still captured into: from
            # then on all its runs went to its spool (a QA pass, session 28). Upgrading is said.
            where = shown or safe_url(engine.url)
            raise StoreSchemaOld(
                f"the store {where} is at schema {revision}, this honed's is {SCHEMA_HEAD}: upgrade it with "
                f"`honed init --store {where}` (older honed processes using it must be upgraded too: they "
                "cannot write to it after); reading commands never change a store"
            )
        from alembic import command
        from alembic.runtime.migration import MigrationContext
        from alembic.util import CommandError

        config = _alembic_config()
        with engine.begin() as conn:
            # One migrator at a time across processes (a fleet starting on a new store): each
            # waits for the lock, then re-reads the revision the one before it left.
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
            elif engine.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")  # SQLite's write lock, taken now
            current = MigrationContext.configure(conn).get_current_revision()
            if current != SCHEMA_HEAD:
                if current is not None:
                    # Said, not silent (a QA pass, session 23: a reading command upgraded a
                    # production store): an older honed cannot open what this leaves.
                    log.warning(
                        "honed: upgrading the store %s from schema %s to %s (older honed processes "
                        "using it must be upgraded too)",
                        shown or safe_url(engine.url),
                        current,
                        SCHEMA_HEAD,
                    )
                config.attributes["connection"] = conn
                try:
                    command.upgrade(config, "head")
                except CommandError:  # a revision none of honed's migrations made
                    raise StoreSchemaUnknown(
                        f"{shown or safe_url(engine.url)}: its schema is at revision {current!r}, which this "
                        f"honed (schema {SCHEMA_HEAD}) does not know: a store of a newer honed (upgrade "
                        "honed), or another application's database; nothing was changed"
                    ) from None


def _revision(engine: Engine) -> str | None:
    """The schema's alembic revision, or None where there is no schema yet (an unreachable
    database raises: it is not an empty one)."""
    with engine.connect() as conn:
        try:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except SQLAlchemyError as exc:
            if "permission denied" in str(exc).lower():
                # The tables are there, this role may not read them: not a store to create.
                raise StoreUnavailable(
                    f"the store at {_shown(engine.url.render_as_string(hide_password=False))} refuses this "
                    f"user: {str(getattr(exc, 'orig', exc)).splitlines()[0]} (grant it SELECT, and INSERT "
                    "and UPDATE to write)"
                ) from exc
            return None


def _alembic_config() -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    return config


# -- rows <-> vocabulary -----------------------------------------------------------------------


def _filtered(
    query: Any,
    *,
    agent: str | None = None,
    task_id: str | None = None,
    split: str | list[str] | None = None,
    status: str | None = None,
    verdict: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    model_version: str | None = None,
    thread_id: str | None = None,
    finished: bool | None = None,
    ids: Iterable[str] | None = None,
    exclude_task_ids: Iterable[str] | None = None,
    untrusted: set[str] = frozenset(),  # type: ignore[assignment]
    signed: bool = False,
) -> Any:
    T = TrajectoryRow
    # Said plainly (a QA pass, session 26: `since="1d"` raised SQLAlchemy's error with the whole
    # query in it, and `status="weird"` matched nothing, silently).
    for name, when in (("since", since), ("until", until)):
        if when is not None and not isinstance(when, datetime):
            raise TypeError(f"{name} must be a datetime, not {type(when).__name__} {when!r}")
    if isinstance(status, str) and status not in get_args(Status):
        raise ValueError(f"status must be one of {', '.join(get_args(Status))}, not {status!r}")
    for column, value in (
        (T.agent, agent),
        (T.task_id, task_id),
        (T.split, split),
        (T.status, status),
        (T.thread_id, thread_id),
    ):
        if isinstance(value, list):
            query = query.where(column.in_(value))
        elif value is not None:
            query = query.where(column == value)
    if isinstance(model_version, str):
        query = query.where(T.model_version == model_version)
    elif model_version is not None:  # several versions: a model's lineage
        query = query.where(T.model_version.in_(list(model_version)))
    if finished is not None:
        query = query.where(T.status != INTERRUPTED if finished else T.status == INTERRUPTED)
    if since is not None:
        query = query.where(T.started_at >= since)
    if until is not None:
        query = query.where(T.started_at < until)
    if ids is not None:
        query = query.where(T.id.in_(list(ids)))
    if exclude_task_ids is not None:
        excluded = list(exclude_task_ids)
        if excluded:
            query = query.where(T.task_id.is_(None) | T.task_id.not_in(excluded))
    if verdict is not None:
        # With a key, unsigned rows count for nothing (`honed.store.signing`); forged signatures
        # are found where the rows are read.
        mine = [VerdictRow.trajectory_id == T.id, *([VerdictRow.signature.is_not(None)] if signed else [])]
        any_verdict = exists().where(*mine)
        # `honed.trajectory.label`: any fail fails it; untrusted verifiers' passes and errors
        # count for nothing.
        current = [*mine, ~_superseded(signed)]
        counted = [*current, VerdictRow.verifier.not_in(sorted(untrusted))] if untrusted else current
        failed = exists().where(*current, VerdictRow.passed.is_(False))
        passed = exists().where(*counted, VerdictRow.passed.is_(True))
        errored = exists().where(  # `honed.trajectory.label`: an error leaves the run undecided
            *counted, VerdictRow.passed.is_(None), VerdictRow.evidence[ERROR_KEY].as_string().is_not(None)
        )
        conditions = {
            "pass": passed & ~failed & ~errored,
            "fail": failed,
            "labeled": any_verdict,
            "unlabeled": ~any_verdict,
        }
        if verdict not in conditions:
            raise ValueError(f"verdict filter must be one of {sorted(conditions)}, not {verdict!r}")
        query = query.where(conditions[verdict])
    return query


def _superseded(signed: bool = False) -> Any:
    """`honed.trajectory.current_verdicts` in SQL, of the VerdictRow in scope: another version of
    its verifier judged the run later, or (this one a pass) has any verdict on it later (not a
    person's label, neither of them; `signed`: only a signed one supersedes)."""
    newer = aliased(VerdictRow)
    return exists().where(
        *([newer.signature.is_not(None)] if signed else []),
        newer.trajectory_id == VerdictRow.trajectory_id,
        newer.verifier == VerdictRow.verifier,
        newer.version != VerdictRow.version,
        newer.passed.is_not(None) | VerdictRow.passed.is_(True),
        newer.created_at > VerdictRow.created_at,
        newer.evidence["labeler"].as_string().is_(None),
        VerdictRow.evidence["labeler"].as_string().is_(None),
    )


def _insert(session: Any, table: type[TrajectoryRow | StepRow], rows: list[dict[str, Any]]) -> None:
    """Insert rows (keyed by attribute, all with the same keys) in one DBAPI executemany, their
    JSON values encoded here, once; None is SQL NULL.

    Below the ORM and Core: the ORM's bulk insert drops None-valued keys and batches only rows
    with the same keys (one statement a row when model and tool steps alternate), and both run
    SQLAlchemy's per-value processing for every row (JSON encoded again). The statement and the
    column types' own processors (timestamps) come from SQLAlchemy, once per table and dialect.
    """
    if not rows:
        return
    connection = session.connection()
    plan = _insert_plan(table, tuple(rows[0]), connection.dialect)
    if plan.defaults:
        rows = [row | {key: default(None) for key, default in plan.defaults} for row in rows]
    dumps, values_of, json_at, processed_at, names = (
        fast_json_dumps,
        plan.values_of,
        plan.json_at,
        plan.processed_at,
        plan.names,
    )
    # SQLite gives a column declared JSON numeric affinity: a bare number's text is stored as a
    # REAL or INTEGER (0.1 + 0.2 read back as 0.3, 2**63 + 7 as a float, 2.0 as 2). As a BLOB of
    # the same text it is kept as it is; the reader's `||` reads it as text.
    numbers_as_blobs = connection.dialect.name == "sqlite"
    params: list[Any] = []
    for row in rows:
        values = list(values_of(row))
        for i in json_at:
            value = values[i]
            if value is not None:
                values[i] = dumps(value)
                if numbers_as_blobs and (type(value) is float or type(value) is int):
                    values[i] = values[i].encode()
        for i, process in processed_at:
            if values[i] is not None:
                values[i] = process(values[i])
        params.append(tuple(values) if names is None else dict(zip(names, values, strict=True)))
    connection.exec_driver_sql(plan.sql, params)


class _InsertPlan(NamedTuple):
    sql: str
    names: tuple[str, ...] | None  # None: the driver takes positional parameters
    values_of: Callable[[dict[str, Any]], tuple[Any, ...]]  # a row's values, in parameter order
    json_at: tuple[int, ...]  # JSON columns (bound as `JSONText`: the text as is)
    processed_at: tuple[tuple[int, Callable[[Any], Any]], ...]  # the column types' bind processors
    defaults: tuple[tuple[str, Callable[[Any], Any]], ...]  # columns the rows leave out


_plans: dict[tuple[Any, ...], _InsertPlan] = {}


def _insert_plan(table: type[Any], keys: tuple[str, ...], dialect: Any) -> _InsertPlan:
    """How to insert rows with these attribute keys into `table` on this kind of database."""
    cache_key = (table, keys, type(dialect), dialect.paramstyle)
    plan = _plans.get(cache_key)
    if plan is not None:
        return plan
    columns = {attribute.key: attribute.columns[0] for attribute in inspect(table).column_attrs}
    # Columns the rows leave out get their Python-side default (`created_at`), as in the ORM.
    defaults = []
    for key, column in columns.items():
        if key not in keys and column.default is not None:
            arg = column.default.arg  # type: ignore[attr-defined]
            defaults.append((key, arg if column.default.is_callable else (lambda _ctx, arg=arg: arg)))
    binds = {}  # parameter name -> (key, is_json, processor)
    values = {}
    for n, key in enumerate((*keys, *(key for key, _ in defaults))):
        column = columns[key]
        is_json = isinstance(column.type, JSON)
        type_ = JSONText() if is_json else column.type
        values[column.key] = bindparam(f"p{n}", type_=type_)  # a column's own name is reserved
        processor = None if is_json else type_.dialect_impl(dialect).bind_processor(dialect)
        binds[f"p{n}"] = (key, is_json, processor)
    compiled = insert(table.__table__).values(values).compile(dialect=dialect)
    order = list(compiled.positiontup or binds)
    ordered = [binds[name] for name in order]
    getter = operator.itemgetter(*(key for key, _, _ in ordered))
    plan = _plans[cache_key] = _InsertPlan(
        sql=str(compiled),
        names=None if compiled.positiontup is not None else tuple(order),
        values_of=getter if len(ordered) > 1 else (lambda row: (getter(row),)),
        json_at=tuple(i for i, (_, is_json, _) in enumerate(ordered) if is_json),
        processed_at=tuple((i, p) for i, (_, _, p) in enumerate(ordered) if p is not None),
        defaults=tuple(defaults),
    )
    return plan


def _ts(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    if isinstance(value, str):
        return datetime.fromisoformat(value)
    return datetime.fromtimestamp(float(value), UTC)


def _trajectory_row(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": record["id"],
        "agent": (record.get("agent") or "agent")[:200],
        "task": record.get("task"),
        "task_id": _short(record.get("task_id")),
        "split": _short(record.get("split"), 32),
        "meta": record.get("metadata") or {},
        "output": record.get("output"),
        "status": record.get("status") or "ok",
        "error": record.get("error"),
        "model_version": _short(record.get("model_version")),
        "started_at": _ts(record.get("started_at")) or datetime.now(UTC),
        "ended_at": _ts(record.get("ended_at")),
        "n_steps": len(record.get("steps", ())),
        "thread_id": _short(record.get("thread_id")),
        "checkpoint_id": _short(record.get("checkpoint_id"), 64),
    }


def _step_row(trajectory_id: str, step: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": step["id"],
        "trajectory_id": trajectory_id,
        "index": step["index"],
        "parent_id": step.get("parent_id"),
        "kind": step["kind"],
        "name": (step.get("name") or step["kind"])[:200],
        "input": step.get("input"),
        "output": step.get("output"),
        "error": step.get("error"),
        "reasoning": step.get("reasoning"),
        "tool_calls": step.get("tool_calls") or [],
        "usage": step.get("usage"),
        "model_version": _short(step.get("model_version")),
        "started_at": _ts(step.get("started_at")),
        "ended_at": _ts(step.get("ended_at")),
        "extra": step.get("extra") or {},
    }


def _short(value: Any, limit: int = 200) -> str | None:
    return None if value is None else str(value)[:limit]


def _continue(session: Any, record: dict[str, Any]) -> int:
    """Merge a continuation (or a replayed record) into its stored trajectory; returns 1 when it
    was stored as a new trajectory instead (nothing stored to continue)."""
    target = _continued_id(session, record)
    if target is None:
        _insert(session, TrajectoryRow, [_trajectory_row(record)])
        _insert(session, StepRow, [_step_row(record["id"], s) for s in record.get("steps", ())])
        return 1
    stored = session.get(TrajectoryRow, target)
    known = dict(
        session.execute(select(StepRow.id, StepRow.index).where(StepRow.trajectory_id == target)).all()
    )
    candidates = [s for s in record.get("steps", ()) if s["id"] not in known]
    if stored.status != INTERRUPTED and not candidates:
        return 0  # a replayed record: already there
    if stored.status != INTERRUPTED and record.get("resumes") and record.get("status") != INTERRUPTED:
        # The pause of a run that has finished, resumed again (replayed from its checkpoint): an
        # attempt of its own. Merged, it rewrote a verified run's output under its old verdict.
        replay = {**record, "id": str(uuid.uuid4()), "resumes": False}
        replay["metadata"] = {**(record.get("metadata") or {}), "replayed_from": target}
        task = record.get("task")
        if task is None or (isinstance(task, dict) and set(task) <= {"resume"}):
            # A retry (`invoke(None, config)` after a failure) asked what the run it carries on
            # asked: with `{"resume": null}` for a task, a verifier judged an answer to nothing (a
            # QA pass, session 24).
            replay["task"] = stored.task
            for key in ("task_id", "split"):
                replay[key] = replay.get(key) if replay.get(key) is not None else getattr(stored, key)
        _insert(session, TrajectoryRow, [_trajectory_row(replay)])
        _insert(session, StepRow, [_step_row(replay["id"], s) for s in candidates])
        return 1
    if (
        stored.status != INTERRUPTED
        and not record.get("resumes")
        and stored.ended_at is not None
        and _trajectory_row(record)["started_at"] >= stored.ended_at
    ):
        # Another run under the id of one that had ended (`config["run_id"]` reused as a request
        # key, in another process): merged, it rewrote a verified run's answer under its verdict.
        # (The earlier half of a paused run, arriving second, started before the stored half.)
        again = {**record, "id": str(uuid.uuid4())}
        again["metadata"] = {**(record.get("metadata") or {}), "replayed_from": target}
        _insert(session, TrajectoryRow, [_trajectory_row(again)])
        _insert(session, StepRow, [_step_row(again["id"], s) for s in candidates])
        return 1
    taken = set(session.scalars(select(StepRow.id).where(StepRow.id.in_([s["id"] for s in candidates]))))
    new_steps = [s for s in candidates if s["id"] not in taken]
    if any(s.get("kind") == "tool" for s in new_steps):
        # A call answered before the pause, in another process: the resumed part read its
        # message again and recorded the call a second time (a failure; since calls the model
        # asked for are synthesised when they succeed too, any call). One step per call.
        failed: set[str] = set()
        answered: set[str] = set()
        for extra, error in session.execute(
            select(StepRow.extra, StepRow.error).where(
                StepRow.trajectory_id == target, StepRow.kind == "tool"
            )
        ):
            if isinstance(extra, dict) and extra.get("tool_call_id") and not extra.get("bubbled"):
                answered.add(str(extra["tool_call_id"]))
                if error is not None:
                    failed.add(str(extra["tool_call_id"]))
        new_steps = [
            s
            for s in new_steps
            if not (
                s.get("kind") == "tool"
                and str((s.get("extra") or {}).get("tool_call_id"))
                in (
                    answered
                    if (s.get("extra") or {}).get("synthesised")
                    else failed
                    if s.get("error") is not None
                    else ()
                )
            )
        ]
    if new_steps:
        # A continuation captured in another process numbers its steps from 0: put them after.
        last, first = max(known.values(), default=-1), min(s["index"] for s in new_steps)
        shift = last + 1 - first if first <= last else 0
        rows = [_step_row(target, {**s, "index": s["index"] + shift}) for s in new_steps]
        _insert(session, StepRow, rows)
    row = _trajectory_row(record)
    values: dict[str, Any] = {"n_steps": len(known) + len(new_steps)}
    if stored.ended_at is None or row["ended_at"] is None or row["ended_at"] >= stored.ended_at:
        values |= {k: row[k] for k in ("status", "error", "output", "ended_at")}
        values["meta"] = _merged_meta(stored.meta, row["meta"], stored.split)
        for key in ("model_version", "thread_id"):
            if row[key] is not None:
                values[key] = row[key]
    if _held_out(row["split"]) and not _held_out(stored.split):
        # The resumed part was labelled held out (`agent.invoke(Command(resume=...), {"metadata":
        # {"honed": {"split": "heldout"}}})`): the whole run is (a QA pass, session 24: its
        # metadata said so, its split did not, and it trained).
        values["split"] = row["split"]
        held_by = (row["meta"] or {}).get("held_out_by") or {"task_id": row["task_id"], "split": row["split"]}
        kept = values.get("meta", stored.meta or {})
        values["meta"] = {**kept, "held_out_by": kept.get("held_out_by") or held_by}
    if row["started_at"] < stored.started_at:  # the earlier half arrived second
        values |= {
            "started_at": row["started_at"],
            "task": row["task"],
            "checkpoint_id": row["checkpoint_id"],
        }
    session.execute(update(TrajectoryRow).where(TrajectoryRow.id == target).values(**values))
    return 0


# What holds a run out of training besides its split (`honed.store.select.HeldOut`): a resumed
# part adds to them, never takes away (its own `nested_task_ids` replaced the first part's, and a
# nested held-out task of the first part trained).
_HELD_MARKS = ("held_out_by", "within_task_id", "nested_task_ids_cut")


def _merged_meta(stored: Any, new: Any, split: str | None) -> dict[str, Any]:
    """A paused run's metadata with its resumed part's: the part's keys win, except what holds
    the run out; of a run that may be held out (`honed.store.roles.possibly_held_out`, what the
    capture role's guard allows), every key it had, which its verifiers read (`expected`)."""
    stored = stored if isinstance(stored, dict) else {}
    new = new if isinstance(new, dict) else {}
    if possibly_held_out(split, stored):
        # Not a key added either: `match` or `tolerance` change how its task is judged.
        merged = {**stored, **({"output_types": new["output_types"]} if "output_types" in new else {})}
    else:
        merged = {**stored, **new} | {k: stored[k] for k in _HELD_MARKS if k in stored}
    before = stored.get("nested_task_ids")
    if isinstance(before, list):
        after = new.get("nested_task_ids")
        added = [t for t in after if t not in before] if isinstance(after, list) else []
        merged["nested_task_ids"] = before + added
    return merged


def _held_out(split: str | None) -> bool:
    from honed.store.select import evaluation_split, same_split

    return split is not None and (evaluation_split(split) or same_split(split, HELDOUT))


def _continued_id(session: Any, record: dict[str, Any]) -> str | None:
    """The stored trajectory a record continues: its own id; else the one holding its steps (a
    resume merged before, replayed); else the newest interrupted run of its thread and agent."""
    T = TrajectoryRow
    if session.get(T, record["id"]) is not None:
        return str(record["id"])
    step_ids = [s["id"] for s in record.get("steps", ())]
    if step_ids:
        holder = session.scalar(select(StepRow.trajectory_id).where(StepRow.id.in_(step_ids)).limit(1))
        if holder is not None:
            return str(holder)
    if not (record.get("resumes") and record.get("thread_id")):
        return None
    # A paused run started before its resume (a QA pass, session 26: a run planted ten years
    # ahead, paused on the victim's thread, took the victim's resume, and the victim's own run
    # stayed paused for good); where the resume names the checkpoint it starts from, the run that
    # paused there.
    started = _trajectory_row(record)["started_at"]
    candidates = session.scalars(
        select(T.id)
        .where(
            T.thread_id == str(record["thread_id"]),
            T.status == INTERRUPTED,
            T.agent == record.get("agent"),
            T.started_at <= started,
        )
        .order_by(T.started_at.desc())
        .limit(8)
    ).all()
    checkpoint = record.get("checkpoint_id")
    if checkpoint and len(candidates) > 1:
        paused_there = session.scalar(
            select(StepRow.trajectory_id)
            .where(
                StepRow.trajectory_id.in_(candidates),
                StepRow.extra["checkpoint_id"].as_string() == str(checkpoint),
            )
            .limit(1)
        )
        if paused_there is not None:
            return str(paused_there)
    if not candidates:
        return None
    # A pause a later turn of its thread left unanswered was abandoned: LangGraph resumes nothing
    # after a new input, so a stale `Command(resume=...)` (an old "Approve" button) runs nothing,
    # and joined to the pause it stored a run that never finished as `ok`, with the later turn's
    # answer (a QA pass, session 27).
    newest = session.scalar(
        select(T.id)
        .where(
            T.thread_id == str(record["thread_id"]), T.agent == record.get("agent"), T.started_at <= started
        )
        .order_by(T.started_at.desc())
        .limit(1)
    )
    return str(candidates[0]) if newest == candidates[0] else None


def trajectory_to_record(trajectory: Trajectory) -> dict[str, Any]:
    """A `Trajectory` as the record format `save_records` and the spool use."""
    record = trajectory.to_dict()
    record.pop("verdicts", None)
    return record


def record_to_trajectory(record: dict[str, Any]) -> Trajectory:
    """A captured record (the writer's format, epoch-second times) as a `Trajectory`."""
    row = _trajectory_row(record)
    steps = [_step_row(record["id"], s) for s in record.get("steps") or ()]
    return Trajectory(
        id=row["id"],
        agent=row["agent"],
        task=row["task"],
        task_id=row["task_id"],
        split=row["split"],
        metadata=row["meta"],
        steps=[Step(**{k: v for k, v in s.items() if k != "trajectory_id"}) for s in steps],
        output=row["output"],
        status=row["status"],
        error=row["error"],
        model_version=row["model_version"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        thread_id=row["thread_id"],
        checkpoint_id=row["checkpoint_id"],
    )


def _conversation_once(row: dict[str, Any], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The trajectory's row with the messages and tools its model steps saw, once; the steps'
    inputs become references to them (`honed.store.conversations`)."""
    model = [s for s in steps if s["kind"] == "model"]
    messages, tools, inputs = compact(s["input"] for s in model)
    for step, value in zip(model, inputs, strict=True):
        step["input"] = value
    row["messages"], row["tools"] = messages, tools
    return row


def _now() -> datetime:
    return datetime.now(UTC)


def _verdict(row: VerdictRow) -> Verdict:
    return Verdict(
        passed=row.passed,
        score=row.score,
        reason=row.reason,
        evidence=row.evidence or {},
        verifier=row.verifier,
        version=row.version,
        duration_s=row.duration_s,
        trajectory_id=row.trajectory_id,
        id=row.id,
        created_at=row.created_at,
    )
