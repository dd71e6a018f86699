"""Trajectories as fine-tuning data: OpenAI chat-format JSONL, Hugging Face `Dataset` and parquet.

One row per trajectory. The last model call's input messages plus its reply are the whole
conversation the agent had (system, user, assistant tool calls, tool results, final answer), and
that call's tools are the tools the model saw, so the row is exactly what produced the verified
outcome. The JSONL is the OpenAI fine-tuning format, which TRL's `SFTTrainer` also trains on
unchanged (`load_dataset("json", data_files=...)`).

Rows that cannot be faithful are skipped and counted, never guessed: a capture cut by the size
cap, non-text content, a trajectory with no chat model call. The row itself is
`honed.messages.chat_example` (re-exported here); this module writes rows out.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from honed.messages import NotExportable, chat_example
from honed.trajectory import Trajectory

if TYPE_CHECKING:
    import datasets

_dumps = json.JSONEncoder(ensure_ascii=False).encode
PARQUET_ROWS_PER_GROUP = 1000
ID_COLUMNS = ("trajectory_id", "agent", "task_id", "model_version")


@dataclass(slots=True)
class ExportResult:
    """How many rows were written, and how many trajectories were skipped for which reason."""

    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    path: str | None = None

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {"written": self.written, "skipped": dict(self.skipped), "path": self.path}


def chat_examples(
    trajectories: Iterable[Trajectory], result: ExportResult | None = None, *, reasoning: bool = False
) -> Iterator[tuple[Trajectory, dict[str, Any]]]:
    """`(trajectory, example)` for each exportable trajectory; skips are counted in `result`."""
    for trajectory in trajectories:
        try:
            example = chat_example(trajectory, reasoning=reasoning)
        except NotExportable as exc:
            if result is not None:
                result.skip(exc.reason)
            continue
        yield trajectory, example


def write_jsonl(
    trajectories: Iterable[Trajectory],
    path: str | Path | IO[str],
    *,
    reasoning: bool = False,
    on_trajectory: Callable[[Trajectory], None] | None = None,
) -> ExportResult:
    """Write one OpenAI chat-format example per line to `path` (or an open text file), e.g.
    `write_jsonl(select_trajectories(store, verdict="pass"), "train.jsonl")`."""
    if hasattr(path, "write"):
        return _write_jsonl(trajectories, path, ExportResult(), reasoning, on_trajectory)  # type: ignore[arg-type]
    with written(Path(path)) as target, open(target, "w", encoding="utf-8") as out:  # type: ignore[arg-type]
        return _write_jsonl(trajectories, out, ExportResult(path=str(path)), reasoning, on_trajectory)


@contextlib.contextmanager
def written(target: Path) -> Iterator[Path]:
    """The path to write `target` through. A file is written beside it and moved into place when
    whole: an export stopped midway (Ctrl-C, a store gone) left a partial file where the previous
    complete one was; a symbolic link's file is the one replaced, the link kept. A pipe, a
    device or a process substitution (`>(gzip > x.gz)`) cannot be replaced: written straight to
    (replacing a named pipe with a file fed its reader nothing)."""
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        yield target
        return
    real = Path(os.path.realpath(target))
    if not real.parent.is_dir():
        raise FileNotFoundError(f"{target.parent} is not a folder: cannot write {target}")
    _replaceable(target, real, mode)
    partial = real.with_name(f".{real.name}.{os.getpid()}.partial")
    try:
        yield partial
        if partial.is_dir() and real.is_dir():  # a saved dataset's folder: the old one out first
            old = real.with_name(f".{real.name}.{os.getpid()}.old")
            os.replace(real, old)
            os.replace(partial, real)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, real)
    finally:
        with contextlib.suppress(FileNotFoundError):
            if partial.is_dir():
                shutil.rmtree(partial)
            else:
                partial.unlink()


# What `Dataset.save_to_disk` leaves in a folder: only such a folder is replaced by an export.
_SAVED_DATASET = frozenset({"dataset_info.json", "state.json", "dataset_dict.json"})


def _replaceable(target: Path, real: Path, mode: int | None) -> None:
    """Refuse to replace what an export did not make (a QA pass, session 20: `export hf .`
    deleted the folder it ran in, the store and the code beside it; `export jsonl honed.db`
    wrote over the store it read): a folder that is not an earlier saved dataset, or a database."""
    if mode is None:
        return
    if stat.S_ISDIR(mode):
        names = {p.name for p in real.iterdir()}
        if names and not names & _SAVED_DATASET:
            raise FileExistsError(
                f"{target} is a folder holding other files, not a saved dataset: nothing was written "
                "(give a new folder's name)"
            )
        return
    header = b""
    with contextlib.suppress(OSError), open(real, "rb") as f:
        header = f.read(16)
    # A store in WAL mode may have all its data in `-wal` and an empty file of its own.
    if header == b"SQLite format 3\x00" or real.with_name(real.name + "-wal").exists():
        raise FileExistsError(
            f"{target} is a SQLite database (a store?): not overwritten, nothing was written"
        )


def _write_jsonl(
    trajectories: Iterable[Trajectory],
    out: IO[str],
    result: ExportResult,
    reasoning: bool,
    on_trajectory: Callable[[Trajectory], None] | None,
) -> ExportResult:
    for _trajectory, example in chat_examples(
        _watched(trajectories, on_trajectory), result, reasoning=reasoning
    ):
        out.write(_dumps(_earlier_turns_unweighted(example)))
        out.write("\n")
        result.written += 1
    return result


def _earlier_turns_unweighted(example: dict[str, Any]) -> dict[str, Any]:
    """`weight: 0` on the assistant messages of earlier turns of a conversation (before its last
    user message): the verdict judged this turn, not them, and OpenAI's fine-tuning trains every
    assistant message that does not say otherwise."""
    messages = example["messages"]
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    if not any(m.get("role") == "assistant" for m in messages[:last_user]):
        return example
    marked = [
        {**m, "weight": 0} if i < last_user and m.get("role") == "assistant" else m
        for i, m in enumerate(messages)
    ]
    return {**example, "messages": marked}


def dataset_features(
    *, reasoning: bool = False, ids: bool = True, arguments_as_text: bool = False
) -> datasets.Features:
    """Explicit features, so rows never merge each other's keys (`Dataset.from_list` fills keys
    one row lacks with None): tool schemas are `Json` values kept whole, tool-call arguments are
    JSON strings, and a message lacking `tool_calls` or `tool_call_id` has None there."""
    from datasets import Features, List, Value

    arguments = Value("string") if arguments_as_text else _json_feature()[0]
    tool_call = {
        "id": Value("string"),
        "type": Value("string"),
        "function": {"name": Value("string"), "arguments": arguments},
    }
    message: dict[str, Any] = {
        "role": Value("string"),
        "content": Value("string"),
        "tool_calls": List(tool_call),
        "tool_call_id": Value("string"),
        "weight": Value("int64"),  # 0 on earlier turns' replies (OpenAI's marker), else None
    }
    if reasoning:
        message["reasoning_content"] = Value("string")
    columns: dict[str, Any] = {"messages": List(message), "tools": _tools_feature()[0]}
    if ids:
        columns.update(dict.fromkeys(ID_COLUMNS, Value("string")))
    return Features(columns)


def to_hf_dataset(
    trajectories: Iterable[Trajectory],
    *,
    reasoning: bool = False,
    ids: bool = True,
    result: ExportResult | None = None,
    on_trajectory: Callable[[Trajectory], None] | None = None,
) -> datasets.Dataset:
    """A Hugging Face `Dataset` with a `messages` and a `tools` column (TRL's SFT format), plus
    `trajectory_id`, `agent`, `task_id`, `model_version` unless `ids=False`."""
    from datasets import Dataset

    result = result if result is not None else ExportResult()
    rows = list(_hf_rows(_watched(trajectories, on_trajectory), result, reasoning, ids))
    result.written += len(rows)
    features = dataset_features(reasoning=reasoning, ids=ids)
    if not rows:  # `from_list([])` refuses the features ("Keys mismatch"): an empty selection is no error
        return Dataset.from_dict({name: [] for name in features}, features=features)
    return Dataset.from_list(rows, features=features)


def write_parquet(
    trajectories: Iterable[Trajectory],
    path: str | Path,
    *,
    reasoning: bool = False,
    ids: bool = True,
    rows_per_group: int = PARQUET_ROWS_PER_GROUP,
    on_trajectory: Callable[[Trajectory], None] | None = None,
) -> ExportResult:
    """Write the `to_hf_dataset` rows to a parquet file, `rows_per_group` at a time (memory stays
    bounded); `datasets.Dataset.from_parquet(path)` reads it back with the same features."""
    import pyarrow.parquet as pq
    from datasets import Dataset

    features = dataset_features(reasoning=reasoning, ids=ids)
    schema = features.arrow_schema
    result = ExportResult(path=str(path))
    with written(Path(path)) as partial, pq.ParquetWriter(str(partial), schema) as writer:
        chunk: list[dict[str, Any]] = []
        for row in _hf_rows(_watched(trajectories, on_trajectory), result, reasoning, ids):
            chunk.append(row)
            if len(chunk) >= rows_per_group:
                writer.write_table(Dataset.from_list(chunk, features=features).data.table.cast(schema))
                result.written += len(chunk)
                chunk = []
        if chunk:  # no rows at all: the file still carries the schema, in no row group
            writer.write_table(Dataset.from_list(chunk, features=features).data.table.cast(schema))
            result.written += len(chunk)
    return result


# -- helpers -----------------------------------------------------------------------------------


def _hf_rows(
    trajectories: Iterable[Trajectory], result: ExportResult, reasoning: bool, ids: bool
) -> Iterator[dict[str, Any]]:
    tools_as_text = _tools_feature()[1]
    for trajectory, example in chat_examples(trajectories, result, reasoning=reasoning):
        example = _earlier_turns_unweighted(example)  # as in JSONL: only this turn is judged
        tools = example.get("tools", [])
        row: dict[str, Any] = {
            "messages": example["messages"] if tools_as_text else _arguments_as_objects(example["messages"]),
            "tools": _dumps(tools) if tools_as_text else tools,
        }
        if ids:
            row.update(
                trajectory_id=trajectory.id,
                agent=trajectory.agent,
                task_id=trajectory.task_id,
                model_version=trajectory.model_version,
            )
        yield row


def _tools_feature() -> tuple[Any, bool]:
    """`List(Json())` (datasets ≥ 5) keeps each tool schema whole; before it, the list as one
    JSON string, which TRL decodes too. Returns the feature and whether tools go as text."""
    from datasets import List

    feature, as_text = _json_feature()
    return (feature, True) if as_text else (List(feature), False)


def _json_feature() -> tuple[Any, bool]:
    """`Json()` (datasets ≥ 5): any JSON value kept whole; before it, a string. Returns the
    feature and whether values go as text."""
    from datasets import Value

    try:
        from datasets import Json
    except ImportError:
        return Value("string"), True
    return Json(), False


def _arguments_as_objects(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool-call arguments as objects, as chat templates read them (TRL's and transformers'
    convention: a Qwen2.5 or Llama 3 template wrote a JSON string inside the call's JSON, and
    the model learned double-encoded calls: a QA pass, session 20). JSONL keeps OpenAI's strings."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = {**m, "tool_calls": [_call_with_object(c) for c in calls]}
        out.append(m)
    return out


def _call_with_object(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):  # not JSON (a model's broken call): the text it wrote
            arguments = json.loads(arguments)
    return {**call, "function": {**function, "arguments": arguments}}


def _watched(
    trajectories: Iterable[Trajectory], on_trajectory: Callable[[Trajectory], None] | None
) -> Iterable[Trajectory]:
    if on_trajectory is None:
        return trajectories
    return _each(trajectories, on_trajectory)


def _each(trajectories: Iterable[Trajectory], callback: Callable[[Trajectory], None]) -> Iterator[Trajectory]:
    for trajectory in trajectories:
        callback(trajectory)
        yield trajectory
