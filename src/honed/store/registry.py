"""The model registry (versions, promotion, rollback), as methods of `TrajectoryStore`.

A served name (`support-agent`) has numbered versions (`support-agent@v3`), each a folder of
weights or a LoRA adapter. Exactly one version per name is live; `ServedModel`s follow it.

Every change is one transaction that starts with a compare-and-set on the name's live pointer
(`model_live.generation`), so two processes promoting at once cannot both win, on SQLite (the
first write takes the database's write lock) and on PostgreSQL (the row lock, then the
re-checked `WHERE generation = :seen`). Each change is recorded in `model_events` with who and
why, and on PostgreSQL announced with `NOTIFY honed_models` so followers swap at once.
Files are checked *before* the pointer moves: a version with missing or corrupt weights is
refused and the live one keeps serving.
"""

from __future__ import annotations

import getpass
import importlib
import importlib.util
import json
import logging
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError

from honed.store.database import Database
from honed.store.registry_tables import ModelEventRow, ModelLiveRow, ModelVersionRow
from honed.trajectory import ModelVersion

log = logging.getLogger("honed")

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

NOTIFY_CHANNEL = "honed_models"
_REF = re.compile(r"^(?:(?P<name>[^@\s]+)@)?v?(?P<version>\d+)$")
_ANY: Any = object()
_RETRIES = 20
T = TypeVar("T")


class ModelVersionNotFound(KeyError):
    """No such name or version in the registry; `honed versions NAME` lists what there is."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "model version not found"


class ModelVersionInvalid(ValueError):
    """A version's files are missing or corrupt: it cannot be promoted (the live one keeps serving)."""

    def __init__(self, ref: str, reason: str) -> None:
        super().__init__(f"{ref} cannot be served: {reason}")
        self.ref = ref
        self.reason = reason


class PromotionConflict(RuntimeError):
    """The live version changed while this promotion or rollback was being made; nothing was
    changed by this call. Look at `honed versions NAME` and try again if it still makes sense."""


class NoLiveVersion(LookupError):
    """The name has no live version yet: promote one (`honed promote NAME@v1`)."""


class NoPreviousVersion(LookupError):
    """A rollback found no earlier live version (that was not itself rolled back) to return to."""


@dataclass(slots=True)
class ModelEvent:
    """One change to a name's versions: register | promote | rollback | reject, by whom, why."""

    id: int
    name: str
    action: str
    version: int | None
    from_version: int | None
    actor: str
    reason: str
    generation: int | None
    created_at: datetime


def parse_model_ref(ref: str | int, name: str | None = None) -> tuple[str, int]:
    """`"support-agent@v3"` → `("support-agent", 3)`; `"v3"`, `"3"` or `3` need `name`."""
    match = _REF.match(str(ref).strip())
    if match is None:
        raise ValueError(f"{ref!r} is not a model version: write NAME@vN (e.g. support-agent@v3)")
    found = match.group("name") or name
    if not found:
        raise ValueError(f"{ref!r} names no model: write NAME@vN (e.g. support-agent@v3)")
    return found, int(match.group("version"))


def default_actor() -> str:
    """Who is making a change: `HONED_ACTOR`, else `user@host`."""
    if os.environ.get("HONED_ACTOR"):
        return os.environ["HONED_ACTOR"]
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:200]


def validate_model_files(path: str | Path, ref: str | None = None) -> None:
    """Raise `ModelVersionInvalid` unless `path` is a loadable model or adapter folder: a config
    that parses, weights whose safetensors headers parse and whose sizes match the file (a
    truncated copy is caught), every shard an index names, and a tokenizer for a full model.
    Cheap: reads headers, never the weights."""
    ref = ref or str(path)
    folder = Path(path)
    if not folder.exists():
        raise ModelVersionInvalid(ref, f"{folder} does not exist")
    if not folder.is_dir():
        raise ModelVersionInvalid(ref, f"{folder} is a file; expected a folder saved with save_pretrained")
    adapter = (folder / "adapter_config.json").exists()
    config = folder / ("adapter_config.json" if adapter else "config.json")
    if not config.exists():
        raise ModelVersionInvalid(ref, f"no config.json (or adapter_config.json) in {folder}")
    try:
        settings = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise ModelVersionInvalid(ref, f"{config.name} is not valid JSON: {exc}") from exc
    if not adapter and not (
        isinstance(settings, dict)
        and "vocab_size" in settings
        and any(k in settings for k in ("hidden_size", "n_embd", "d_model"))
    ):
        # transformers fills a config without sizes with its defaults: a 7B-parameter random
        # model where a tiny one was meant, which no server ever finishes loading.
        raise ModelVersionInvalid(
            ref, f"{config.name} does not give the model's sizes (vocab_size, hidden_size)"
        )
    weights = sorted(folder.glob("*.safetensors"))
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as exc:
            raise ModelVersionInvalid(ref, f"{index.name} is not a valid shard index: {exc}") from exc
        missing = sorted(s for s in shards if not (folder / s).exists())
        if missing:
            raise ModelVersionInvalid(ref, f"{index.name} names missing shards: {', '.join(missing)}")
    shapes: dict[str, list[int]] = {}
    for file in weights:
        shapes |= _check_safetensors(file, ref)
    pickled = [f for f in folder.glob("*.bin") if "model" in f.name]
    for file in pickled:
        _check_torch_checkpoint(file, ref)
    if not weights and not pickled:
        raise ModelVersionInvalid(ref, f"no weights (*.safetensors or *model*.bin) in {folder}")
    if not adapter and not any((folder / f).exists() for f in _VOCABULARIES):
        raise ModelVersionInvalid(
            ref,
            f"no tokenizer vocabulary in {folder} (tokenizer.json...: save it with tokenizer.save_pretrained)",
        )
    templated = False
    for name in _JSON_FILES:  # what a server parses at load: a broken one serves nothing
        file = folder / name
        if file.exists():
            try:
                parsed = json.loads(file.read_text())
            except (OSError, ValueError) as exc:
                raise ModelVersionInvalid(ref, f"{name} is not valid JSON: {exc}") from exc
            if name == "tokenizer.json" and not adapter:
                _check_vocabulary(parsed, settings.get("vocab_size"), ref)
            if name == "tokenizer_config.json" and isinstance(parsed, dict) and parsed.get("chat_template"):
                templated = True
    if not adapter and not (templated or any((folder / f).exists() for f in _CHAT_TEMPLATES)):
        # A base model's tokenizer: every chat request would fail to render (a QA pass, session 19).
        raise ModelVersionInvalid(
            ref,
            f"no chat template in {folder} (chat_template.jinja, or tokenizer_config.json's chat_template): "
            "a chat model needs one",
        )
    if adapter:
        _check_adapter_base(settings, ref)
    else:
        _check_model_type(settings, ref)
        if shapes and not pickled:
            _check_structure(folder, shapes, ref)


def _check_vocabulary(tokenizer: Any, vocab_size: Any, ref: str) -> None:
    """The tokenizer's ids must all have a row in the model's embeddings: a tokenizer of another
    model was promoted and then every request failed ("token ids outside the vocabulary")."""
    if not isinstance(tokenizer, dict) or not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        return
    model = tokenizer.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    ids = [i for i in vocab.values() if isinstance(i, int)] if isinstance(vocab, dict) else []
    if isinstance(vocab, list):
        ids.append(len(vocab) - 1)
    added = tokenizer.get("added_tokens")
    if isinstance(added, list):
        ids += [t["id"] for t in added if isinstance(t, dict) and isinstance(t.get("id"), int)]
    top = max(ids, default=-1)
    if top >= vocab_size:
        raise ModelVersionInvalid(
            ref,
            f"the tokenizer gives token ids up to {top} but the model's vocabulary has {vocab_size} rows "
            "(config.json vocab_size): a tokenizer of another model?",
        )


# Files transformers parses when it loads a folder.
_JSON_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
)


def _model_library(name: str) -> Any:
    """`torch` or `transformers`, imported where installed (the CLI's `promote` had not loaded
    them, so a checkpoint with layers its weights lack went live: an operator's QA pass, session
    21); None in a capture-only install."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


def _check_model_type(settings: dict[str, Any], ref: str) -> None:
    """A `model_type` transformers does not know loads nowhere. Checked where transformers is
    installed (a capture-only install has none)."""
    model_type = settings.get("model_type")
    transformers = _model_library("transformers")
    mapping = getattr(transformers, "CONFIG_MAPPING", None) if transformers is not None else None
    if mapping is not None and model_type is not None and model_type not in mapping:
        raise ModelVersionInvalid(
            ref, f"config.json names model_type {model_type!r}, which transformers does not know"
        )


def _check_adapter_base(settings: Any, ref: str) -> None:
    """An adapter loads on its base model: a base given as a local path must be there (models
    are loaded from paths; no machine here reaches a model hub)."""
    base = settings.get("base_model_name_or_path") if isinstance(settings, dict) else None
    if not isinstance(base, str) or not base:
        raise ModelVersionInvalid(ref, "adapter_config.json names no base_model_name_or_path")
    if base.startswith(("/", ".", "~")) and not Path(base).expanduser().is_dir():
        raise ModelVersionInvalid(ref, f"the adapter's base model {base} does not exist")


# A tokenizer's vocabulary (tokenizer_config.json alone names a class, not the tokens).
_CHAT_TEMPLATES = ("chat_template.jinja", "chat_template.json", "additional_chat_templates")
_VOCABULARIES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _check_structure(folder: Path, shapes: dict[str, list[int]], ref: str) -> None:
    """The weights are the ones config.json describes: every tensor of the model it builds
    (on the meta device: no memory) is in the files, with its shape. A GPT-2 config over Qwen
    weights served noise, a layer more than the weights hold was initialised at random, and
    a larger vocabulary made the version unloadable once live. Skipped where transformers
    cannot build the model from its config alone (remote code), or where transformers is not installed."""
    # Where transformers is installed (`honed[train]`, a server); a capture-only install has none.
    settings = json.loads((folder / "config.json").read_text())
    torch, transformers = _model_library("torch"), _model_library("transformers")
    if torch is None or transformers is None:
        return
    AutoConfig, AutoModelForCausalLM = transformers.AutoConfig, transformers.AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:
        if isinstance(settings, dict) and "auto_map" in settings:
            log.debug("honed: %s needs its own code to load; its weights' shapes are not checked", ref)
            return
        # A config transformers refuses (`num_hidden_layers` against `layer_types`) made a version
        # the store called live and no server could load (an operator's QA pass, session 21).
        raise ModelVersionInvalid(ref, f"config.json does not load: {type(exc).__name__}: {exc}") from exc
    if isinstance(settings, dict) and settings.get("quantization_config"):
        return  # GPTQ, AWQ, bitsandbytes: other tensors (`qweight`, `scales`) than the model's own
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:
        log.debug("honed: cannot build %s from its config alone; its weights' shapes are not checked", ref)
        return
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    held = {name.removeprefix(prefix): shape for name, shape in shapes.items()}
    tied = bool(getattr(config, "tie_word_embeddings", False)) or bool(
        getattr(config.get_text_config(), "tie_word_embeddings", False)
    )
    missing, wrong = [], []
    # Parameters only: buffers (masks, rotary tables) are rebuilt at load, and whether one is
    # saved has changed between transformers versions.
    for name, tensor in model.named_parameters():
        key = name.removeprefix(prefix)
        if key not in held:
            if not (tied and "lm_head" in key):
                missing.append(name)
        elif list(held[key]) != list(tensor.shape):
            wrong.append(f"{name} {list(held[key])} (config: {list(tensor.shape)})")
    if wrong:
        raise ModelVersionInvalid(
            ref, f"weights of other shapes than config.json describes: {', '.join(wrong[:3])}"
        )
    if missing:
        raise ModelVersionInvalid(
            ref,
            f"{len(missing)} tensors config.json describes are not in the weights (e.g. {missing[0]}): "
            "another architecture's config, or weights of another model",
        )


def _check_safetensors(file: Path, ref: str) -> dict[str, list[int]]:
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > min(size - 8, 100_000_000):
                raise ValueError("header length beyond the file")
            header = json.loads(handle.read(header_len))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ModelVersionInvalid(ref, f"{file.name} is not a valid safetensors file: {exc}") from exc
    expected = 8 + header_len + max(ends, default=0)
    if expected != size:
        raise ModelVersionInvalid(
            ref, f"{file.name} is {size} bytes but its header describes {expected}: truncated or corrupt"
        )
    return {k: v.get("shape", []) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


class ModelRegistry:
    """The model registry, a part of `TrajectoryStore`: `register_model`, `promote`, `rollback`,
    `live_version`, `versions`."""

    def __init__(self, db: Database) -> None:
        self.engine, self._sessions = db.engine, db.sessions

    # -- reading ---------------------------------------------------------------------------

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of `name`, oldest first."""
        with self._sessions() as session:
            rows = session.scalars(
                select(ModelVersionRow).where(ModelVersionRow.name == name).order_by(ModelVersionRow.version)
            ).all()
            return [_version(r) for r in rows]

    def model_version(self, name: str, version: int | str | None = None) -> ModelVersion:
        """One version, by `(name, 3)`, `(name, "v3")` or `("name@v3")`."""
        name, number = parse_model_ref(
            name if version is None else version, None if version is None else name
        )
        with self._sessions() as session:
            return _version(_find(session, name, number))

    def live_version(self, name: str) -> ModelVersion | None:
        """The version of `name` being served now, or None before the first promotion."""
        with self._sessions() as session:
            row = session.scalar(
                select(ModelVersionRow)
                .join(ModelLiveRow, ModelLiveRow.version_id == ModelVersionRow.id)
                .where(ModelLiveRow.name == name)
            )
            return None if row is None else _version(row)

    def live_pointer(self, name: str) -> tuple[int | None, int]:
        """`(version id, generation)` of the live pointer: the one-row read followers poll."""
        with self._sessions() as session:
            row = session.get(ModelLiveRow, name)
            return (None, 0) if row is None else (row.version_id, row.generation)

    def model_names(self) -> list[str]:
        with self._sessions() as session:
            return list(
                session.scalars(select(ModelVersionRow.name).distinct().order_by(ModelVersionRow.name))
            )

    def model_history(self, name: str) -> list[ModelEvent]:
        """Every change to `name`, oldest first."""
        with self._sessions() as session:
            numbers = dict(
                session.execute(
                    select(ModelVersionRow.id, ModelVersionRow.version).where(ModelVersionRow.name == name)
                ).all()
            )
            rows = session.scalars(
                select(ModelEventRow).where(ModelEventRow.name == name).order_by(ModelEventRow.id)
            ).all()
            return [
                ModelEvent(
                    id=r.id,
                    name=r.name,
                    action=r.action,
                    version=numbers.get(r.version_id),
                    from_version=numbers.get(r.from_version_id),
                    actor=r.actor,
                    reason=r.reason,
                    generation=r.generation,
                    created_at=r.created_at,
                )
                for r in rows
            ]

    # -- changing --------------------------------------------------------------------------

    def register_model(
        self,
        name: str,
        path: str | Path,
        parent: ModelVersion | int | str | None = None,
        metrics: dict[str, Any] | None = None,
        *,
        base: str | None = None,
        training_run: int | None = None,
        actor: str | None = None,
        reason: str = "",
    ) -> ModelVersion:
        """Record a new candidate version of `name` (numbered after the last one) and return it.

        `path` is a folder of weights (or a LoRA adapter; `base` then defaults to its base model).
        `parent` is the version it was trained from: a `ModelVersion`, its id, or `"name@vN"`.
        Its files are checked here (`ModelVersionInvalid`: nothing is recorded) and again when the
        version is promoted (files can change in between); a remote location (`s3://...`) only then.
        """
        _check_name(name)
        location = _normal_path(path)
        if "://" not in location:
            validate_model_files(location, f"{name} (a new version)")
        base = base or _adapter_base(location)
        actor = actor or default_actor()

        def attempt(session: Session) -> ModelVersion:
            self._ensure_live_row(session, name)  # first statement writes: takes SQLite's write lock
            parent_id = _parent_id(session, name, parent)
            last = session.scalar(
                select(func.max(ModelVersionRow.version)).where(ModelVersionRow.name == name)
            )
            row = ModelVersionRow(
                name=name,
                version=(last or 0) + 1,
                parent=parent_id,
                base=base,
                path=location,
                status="candidate",
                training_run=training_run,
                metrics=dict(metrics or {}),
            )
            session.add(row)
            session.flush()
            session.add(
                ModelEventRow(name=name, action="register", version_id=row.id, actor=actor, reason=reason)
            )
            return _version(row)

        return self._write(attempt, retry_conflicts=True)

    def promote(
        self,
        name: str,
        version: int | str | None = None,
        *,
        expected_live: int | None = _ANY,
        reason: str = "",
        actor: str | None = None,
        validate: bool = True,
    ) -> ModelVersion:
        """Make a version live: `promote("support-agent", 3)` or `promote("support-agent@v3")`.

        Its files are checked first (`ModelVersionInvalid`: nothing changes). `expected_live=N`
        promotes only if vN is still live (None: only if none is), e.g. the version a candidate was
        evaluated against; otherwise `PromotionConflict`, as when another promotion wins a race.
        The previous live version becomes `retired`. Promoting the live version changes nothing.
        """
        name, number = parse_model_ref(
            name if version is None else version, None if version is None else name
        )
        with self._sessions() as session:
            target_version = _version(_find(session, name, number))
            live = session.get(ModelLiveRow, name)
            seen_id, generation = (live.version_id, live.generation) if live is not None else (None, 0)
            seen = session.get(ModelVersionRow, seen_id) if seen_id is not None else None
            seen_number = seen.version if seen is not None else None
        if expected_live is not _ANY and seen_number != expected_live:
            raise PromotionConflict(
                f"{name}: expected v{expected_live} to be live but it is "
                f"{'v' + str(seen_number) if seen_number else 'none'}; not promoting {target_version.ref}"
            )
        if seen_id == target_version.id:
            return target_version
        if validate:
            validate_model_files(target_version.path, target_version.ref)
        return self._move_live(
            name,
            target_version,
            seen_id,
            generation,
            action="promote",
            old_status="retired",
            actor=actor,
            reason=reason,
        )

    def rollback(self, name: str, *, reason: str = "", actor: str | None = None) -> ModelVersion:
        """Return `name` to the version live before the current one; the current one becomes
        `rejected` (a later rollback will not return to it; `promote` still can)."""
        with self._sessions() as session:
            live = session.get(ModelLiveRow, name)
            seen_id, generation = (live.version_id, live.generation) if live is not None else (None, 0)
            if seen_id is None:
                raise NoLiveVersion(f"{name} has no live version to roll back")
            statuses = dict(
                session.execute(
                    select(ModelVersionRow.id, ModelVersionRow.status).where(ModelVersionRow.name == name)
                ).all()
            )
            went_live = session.scalars(
                select(ModelEventRow.version_id)
                .where(ModelEventRow.name == name, ModelEventRow.action.in_(("promote", "rollback")))
                .order_by(ModelEventRow.id.desc())
            ).all()
            target_id = next(
                (v for v in went_live if v is not None and v != seen_id and statuses.get(v) != "rejected"),
                None,
            )
            if target_id is None:
                raise NoPreviousVersion(f"{name} has no earlier live version to roll back to")
            target = _version(session.get(ModelVersionRow, target_id))  # type: ignore[arg-type]
        validate_model_files(target.path, target.ref)
        return self._move_live(
            name,
            target,
            seen_id,
            generation,
            action="rollback",
            old_status="rejected",
            actor=actor,
            reason=reason,
        )

    def reject(
        self, name: str, version: int | str | None = None, *, reason: str = "", actor: str | None = None
    ) -> ModelVersion:
        """Mark a candidate `rejected` (it failed a gate); the live version cannot be rejected."""
        name, number = parse_model_ref(
            name if version is None else version, None if version is None else name
        )
        actor = actor or default_actor()

        def attempt(session: Session) -> ModelVersion:
            self._ensure_live_row(session, name)
            row = _find(session, name, number)
            if row.status == "live":
                raise PromotionConflict(
                    f"{name}@v{number} is live: roll back or promote another version first"
                )
            row.status = "rejected"
            session.add(
                ModelEventRow(name=name, action="reject", version_id=row.id, actor=actor, reason=reason)
            )
            return _version(row)

        return self._write(attempt)

    # -- internals -------------------------------------------------------------------------

    def _move_live(
        self,
        name: str,
        target: ModelVersion,
        seen_id: int | None,
        generation: int,
        *,
        action: str,
        old_status: str,
        actor: str | None,
        reason: str,
    ) -> ModelVersion:
        actor = actor or default_actor()

        def attempt(session: Session) -> ModelVersion:
            now = datetime.now(UTC)
            moved = session.execute(
                update(ModelLiveRow)
                .where(ModelLiveRow.name == name, ModelLiveRow.generation == generation)
                .values(version_id=target.id, generation=generation + 1, updated_at=now)
            )
            if moved.rowcount != 1:  # type: ignore[attr-defined]
                raise PromotionConflict(
                    f"{name}: the live version changed while making {target.ref} live "
                    "(another promotion or rollback won); nothing was changed"
                )
            if seen_id is not None:
                session.execute(
                    update(ModelVersionRow).where(ModelVersionRow.id == seen_id).values(status=old_status)
                )
            session.execute(
                update(ModelVersionRow).where(ModelVersionRow.id == target.id).values(status="live")
            )
            session.add(
                ModelEventRow(
                    name=name,
                    action=action,
                    version_id=target.id,
                    from_version_id=seen_id,
                    generation=generation + 1,
                    actor=actor,
                    reason=reason,
                )
            )
            if session.get_bind().dialect.name == "postgresql":
                session.execute(
                    text("SELECT pg_notify(:channel, :name)"), {"channel": NOTIFY_CHANNEL, "name": name}
                )
            row = session.get(ModelVersionRow, target.id)
            session.flush()
            session.refresh(row)  # type: ignore[arg-type]
            return _version(row)  # type: ignore[arg-type]

        return self._write(attempt)

    def _write(self, attempt: Callable[[Session], T], *, retry_conflicts: bool = False) -> T:
        """Run `attempt` in one transaction; SQLite's "database is locked" (a concurrent writer
        held the lock past the timeout) and, when asked, unique-key races are retried."""
        for tries in range(_RETRIES):
            try:
                with self._sessions.begin() as session:
                    return attempt(session)
            except OperationalError as exc:
                if "locked" not in str(exc).lower() or tries == _RETRIES - 1:
                    raise
            except IntegrityError as exc:
                if not retry_conflicts:
                    raise PromotionConflict(f"a concurrent change won: {exc.orig}") from exc
                if tries == _RETRIES - 1:
                    raise
            time.sleep(0.01 * (tries + 1))
        raise AssertionError("unreachable")

    def _ensure_live_row(self, session: Session, name: str) -> None:
        dialect = session.get_bind().dialect.name
        values = {"name": name, "version_id": None, "generation": 0, "updated_at": datetime.now(UTC)}
        if dialect in ("sqlite", "postgresql"):
            if dialect == "sqlite":
                from sqlalchemy.dialects.sqlite import insert as dialect_insert
            else:
                from sqlalchemy.dialects.postgresql import insert as dialect_insert
            session.execute(dialect_insert(ModelLiveRow).values(**values).on_conflict_do_nothing())
        elif session.get(ModelLiveRow, name) is None:
            session.execute(insert(ModelLiveRow).values(**values))


def _find(session: Session, name: str, number: int) -> ModelVersionRow:
    row = session.scalar(
        select(ModelVersionRow).where(ModelVersionRow.name == name, ModelVersionRow.version == number)
    )
    if row is None:
        known = session.scalars(
            select(ModelVersionRow.version)
            .where(ModelVersionRow.name == name)
            .order_by(ModelVersionRow.version)
        ).all()
        have = ", ".join(f"v{v}" for v in known) if known else "no versions (register one first)"
        raise ModelVersionNotFound(f"{name}@v{number} is not registered; {name} has {have}")
    return row


def _parent_id(session: Session, name: str, parent: ModelVersion | int | str | None) -> int | None:
    if parent is None:
        return None
    if isinstance(parent, ModelVersion):
        return parent.id
    if isinstance(parent, int):
        if session.get(ModelVersionRow, parent) is None:
            raise ModelVersionNotFound(f"no model version has id {parent} (parent= takes an id or NAME@vN)")
        return parent
    parent_name, number = parse_model_ref(parent, name)
    return _find(session, parent_name, number).id


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


# What a weights-only torch checkpoint's pickle may name: torch's tensor rebuilders, storages and
# dtypes, and OrderedDict. Anything else (os.system, builtins.eval, ...) is code, not weights.
_SAFE_GLOBALS = re.compile(
    r"(torch(\._utils)?\.(_rebuild_\w+|\w*Storage|\w+)|collections\.OrderedDict|torch\.nn\.parameter\.Parameter)"
)


def _check_torch_checkpoint(file: Path, ref: str) -> None:
    """A `*.bin` must be a torch zip checkpoint whose pickle names only what `torch.load(...,
    weights_only=True)` would accept; read statically (no torch, nothing executed)."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(file) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                raise ModelVersionInvalid(ref, f"{file.name} has no data.pkl: not a torch checkpoint")
            pickle = archive.read(names[0])
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelVersionInvalid(
            ref, f"{file.name} is not a torch checkpoint (corrupt or truncated)"
        ) from exc
    strings: list[str] = []
    named: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(pickle):
            if opcode.name == "GLOBAL":
                named.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL":
                named.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
    except ValueError as exc:  # pickletools on a corrupt stream
        raise ModelVersionInvalid(ref, f"{file.name} has a corrupt pickle: {exc}") from exc
    unsafe = [n for n in named if not _SAFE_GLOBALS.fullmatch(n)]
    if unsafe:
        raise ModelVersionInvalid(
            ref, f"{file.name} names {unsafe[0]!r}: code, not weights (a weights-only load refuses it)"
        )


def _check_name(name: str) -> None:
    """Names end up in paths (candidates' folders, the spool) and URLs: letters, digits, `.`, `_`,
    `-`, starting with a letter or digit (so no `..`, no separators, no hidden files)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a model name: 1-200 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )


def _normal_path(path: str | Path) -> str:
    text_path = str(path)
    if "://" in text_path:
        return text_path  # a remote location, kept as given
    return str(Path(text_path).expanduser().resolve())


def _adapter_base(path: str) -> str | None:
    config = Path(path) / "adapter_config.json"
    try:
        return json.loads(config.read_text()).get("base_model_name_or_path") if config.exists() else None
    except (OSError, ValueError):
        return None


def _version(row: ModelVersionRow) -> ModelVersion:
    return ModelVersion(
        id=row.id,
        name=row.name,
        version=row.version,
        path=row.path,
        parent=row.parent,
        base=row.base,
        status=row.status,  # type: ignore[arg-type]
        training_run=row.training_run,
        metrics=row.metrics or {},
        created_at=row.created_at,
    )
