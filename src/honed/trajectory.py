"""The vocabulary every part of honed speaks: Trajectory, Step, Verdict, ModelVersion, Task, and
the one rule that turns a trajectory's verdicts into its label (`label`).

Plain dataclasses and pure functions with no I/O and no dependency on the rest of honed, so that
the store, the verifiers, the trainers, the exporters and the report share them (and agree).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

StepKind = Literal["model", "tool", "node"]
Status = Literal["ok", "error", "interrupted"]
Split = Literal["train", "heldout"]

TRAIN, HELDOUT = "train", "heldout"  # the split names: train on the first, gate on the second
INTERRUPTED = "interrupted"  # a run paused for a human (LangGraph `interrupt()`): not finished, never judged
STRUCTURED_KEY = "structured_response"  # where a `create_agent(response_format=...)` agent leaves its answer
TRUNCATED_KEY = "__truncated__"  # marks a field the recorder replaced because it was over the size cap
REDACTED_MARK = "[REDACTED:"  # how every redaction marker starts: `[REDACTED:<kind>]`
HANDOFF_KEY = "handoff"  # the output of an agent's turn that handed the conversation on
ERROR_KEY = "error"  # evidence key that marks a verdict as a verifier failure, not a judgement
Label = Literal["pass", "fail", "unknown"]


@dataclass(slots=True)
class Step:
    """One model call, tool call or graph node inside a trajectory.

    `input`/`output` are JSON-able (already serialised, redacted and size-capped by the recorder).
    A model step's `output` is the assistant message; `tool_calls` are `{"name", "args", "id"}`;
    `usage` is `{"input_tokens", "output_tokens", "total_tokens"}` and, where the provider reports
    them, `input_token_details` (`cache_read`, `cache_creation`) and `output_token_details`
    (`reasoning`). `extra` carries what only some
    steps have: finish reason, the tool call id a tool step answered, token ids and logprobs.
    """

    id: str
    index: int
    kind: StepKind
    name: str
    parent_id: str | None = None
    input: Any = None
    output: Any = None
    error: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    model_version: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds()

    def to_dict(self) -> dict[str, Any]:
        return _with_iso_times(asdict(self))


@dataclass(slots=True)
class Verdict:
    """A verifier's judgement of one trajectory's outcome.

    `passed` is None when the verifier could not tell (missing reference, malformed output,
    truncated capture): such a verdict is never a pass, and never training data.
    """

    passed: bool | None
    score: float = 0.0
    reason: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    verifier: str = ""
    version: str = "1"
    duration_s: float = 0.0
    trajectory_id: str | None = None
    id: int | None = None
    created_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return _with_iso_times(asdict(self))


@dataclass(slots=True)
class Trajectory:
    """One top-level agent invocation (one turn of a conversation): the task, every step, the outcome.

    `task` is what this invocation was given, under every entry point: for a chat agent, this
    turn's new messages (`{"messages": [...]}`), never the history before them (that is in the
    model steps' input, and every turn of a conversation shares its `thread_id`). `output` is the
    final answer (the last assistant message's text for message-based agents, with the other
    state keys beside it, e.g. `structured_response`) or the final output otherwise; structured
    objects are stored as the plain JSON their schema describes, their types in
    `metadata["output_types"]`.

    `status` is `ok`, `error`, or `interrupted`: paused by LangGraph's `interrupt()` (human in the
    loop) and not resumed yet. A resumed run continues the same trajectory. `thread_id` is the
    LangGraph thread (`configurable.thread_id`) and `checkpoint_id` the checkpoint the run started
    from, where the entry point can see it (`honed.Middleware`).
    """

    id: str
    agent: str
    task: Any = None
    task_id: str | None = None
    split: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    output: Any = None
    status: Status = "ok"
    error: str | None = None
    model_version: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    thread_id: str | None = None
    checkpoint_id: str | None = None

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds()

    @property
    def answer(self) -> str:
        """The final answer as text: what reference checks compare against. An agent's structured
        response is its answer (as JSON text), whatever its last message said."""
        output = self.output
        if isinstance(output, str):
            return output
        if isinstance(output, dict) and output.get(STRUCTURED_KEY) is not None:
            output = output[STRUCTURED_KEY]
            if isinstance(output, str):
                return output
        elif isinstance(output, dict) and isinstance(output.get("answer"), str):
            return output["answer"]
        return "" if output is None else json.dumps(output, ensure_ascii=False, sort_keys=True)

    @property
    def handed_off_to(self) -> str | None:
        """The agent this run handed the conversation to (`Command(goto=..., graph=PARENT)`), when
        its turn ended that way: `Middleware` on the agents of a team stores each agent's turn,
        and a turn that hands off is a step of the team's run, not an outcome to judge alone. Told
        by capture's mark on the tool step that returned the `Command`: an answer shaped like a
        handoff (`{"handoff": "..."}`) made every verifier "could not tell" (a QA pass, session 19);
        or on the node step `Middleware` adds for a handoff another middleware's hook made."""
        output = self.output
        if not (isinstance(output, dict) and len(output) == 1 and isinstance(output.get(HANDOFF_KEY), str)):
            return None
        marked = {(s.extra or {}).get("handoff") for s in self.steps if s.kind in ("tool", "node")}
        return output[HANDOFF_KEY] if output[HANDOFF_KEY][:200] in marked else None

    @property
    def finished(self) -> bool:
        """False while the run waits at an interrupt: not an outcome to verify, train on or export."""
        return self.status != INTERRUPTED

    def model_steps(self) -> list[Step]:
        return [s for s in self.steps if s.kind == "model"]

    def tool_steps(self) -> list[Step]:
        """The tool calls that ran to an end (answered or failed). A call paused at an `interrupt()`
        inside it is in `steps` once per pause too (`extra["bubbled"]`, no output, no error), but not
        here: it ran again on resume, so a call made once was counted three times (a QA pass,
        session 24: a plan's statistics)."""
        return [s for s in self.steps if s.kind == "tool" and not _paused_attempt(s)]

    def to_dict(self) -> dict[str, Any]:
        data = _with_iso_times(asdict(self))
        data["steps"] = [s.to_dict() for s in self.steps]
        data["verdicts"] = [v.to_dict() for v in self.verdicts]
        return data


@dataclass(slots=True)
class ModelVersion:
    """One registered version of a served model; `status` moves candidate → live → retired."""

    id: int | None
    name: str
    version: int
    path: str
    parent: int | None = None
    base: str | None = None
    status: Literal["candidate", "live", "retired", "rejected"] = "candidate"
    training_run: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None

    @property
    def ref(self) -> str:
        """`name@vN`, the form the CLI and captured steps use."""
        return f"{self.name}@v{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return _with_iso_times(asdict(self))


def _with_iso_times(data: dict[str, Any]) -> dict[str, Any]:
    for key, value in data.items():
        if isinstance(value, datetime):
            data[key] = value.isoformat()
    return data


@dataclass(frozen=True)
class Task:
    """One verifiable task: the user's request and what its verifiers need to judge an attempt.

    `metadata` travels with every attempt (`config["metadata"]["honed"]`), so the verifiers find
    `expected`, `schema`, `tests`... in `trajectory.metadata`; `metadata["slice"]` tags the task
    for the gate's per-slice regression check.
    """

    id: str
    prompt: str
    split: str = TRAIN
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def slice(self) -> str | None:
        return self.metadata.get("slice")

    def honed_metadata(self, **extra: Any) -> dict[str, Any]:
        """What the capture layer records for an attempt: task id, split, the verifiers' inputs."""
        return {**self.metadata, **extra, "task_id": self.id, "split": self.split}


def is_verifier_error(verdict: Verdict) -> bool:
    """Whether a stored verdict records a verifier failure (retried) rather than a judgement."""
    return verdict.passed is None and ERROR_KEY in (verdict.evidence or {})


def call_changed_before_running(t: Trajectory) -> bool:
    """Whether a tool call ran as another than the model asked for, or not at all: a reviewer's
    edit or rejection in human-in-the-loop, a middleware's rewrite. Such a run passed on someone else's call, not the
    model's: neither training nor an exported dataset may teach it as the model's. `Middleware` records it (`extra["asked"]`); under
    callbacks (`instrument()`), or resumed in another process, only the model step's call with
    the tool step's `tool_call_id` tells, so the two are compared here."""
    asked: dict[Any, dict[str, Any]] = {}
    offered: set[Any] = set()
    for step in t.steps:
        if step.kind == "model":
            asked.update((c.get("id"), c) for c in step.tool_calls or () if isinstance(c, dict))
            offered.update(_tool_names(step.input))
            continue
        extra = step.extra or {}
        if step.kind != "tool":
            continue
        if "asked" in extra:
            return True
        if extra.get("synthesised") and step.error is not None and step.name in offered:
            # A tool the model had, answered with an error without running: a reviewer's
            # rejection (a QA pass, session 21: trained as the model's good call), a call limit.
            return True
        call = asked.get(extra.get("tool_call_id")) if extra.get("tool_call_id") else None
        if call is not None and (call.get("args") != step.input or call.get("name") not in (None, step.name)):
            return True
        if call is None and extra.get("tool_call_id") and not extra.get("synthesised"):
            # A call no model call of this run made: the run went on from a checkpoint someone
            # edited (`update_state`, then `invoke(None, ...)` from a fork or a static breakpoint).
            return True
    return False


def _tool_names(request: Any) -> list[Any]:
    """The names of the tools a stored model request offered (OpenAI's or a bare schema's)."""
    tools = request.get("tools") if isinstance(request, dict) else None
    if not isinstance(tools, list):
        return []
    names = []
    for tool in tools:
        if isinstance(tool, dict):
            function = tool.get("function")
            names.append(function.get("name") if isinstance(function, dict) else tool.get("name"))
    return names


def label(
    verdicts: Iterable[Verdict], *, untrusted: Iterable[str] = (), only: Iterable[str] | None = None
) -> bool | None:
    """THE label of a trajectory, for training, export, spans, the report and the store's
    `verdict=` filter alike: False when any verifier failed it; else None when a counted
    verifier's verdict is an error (the run's own code can bring one about, killing the sandbox
    that tests it: the pass is not left to the other verifiers) or none could tell; else True.
    Counted: verifiers outside `untrusted` (low trust, or under their audited minimum precision:
    `store.untrusted_verifiers()`: an audit measures false passes, so their fails still fail a
    run), and of `only` those when given."""
    skip = set(untrusted)
    names = None if only is None else set(only)
    named = [v for v in current_verdicts(list(verdicts)) if names is None or v.verifier in names]
    if any(v.passed is False for v in named):
        return False
    counted = [v for v in named if v.verifier not in skip]
    if any(is_verifier_error(v) for v in counted):
        return None
    return True if any(v.passed for v in counted) else None


def current_verdicts(verdicts: list[Verdict]) -> list[Verdict]:
    """The verdicts that count: a verifier fixed and upgraded judges every run again, and its
    older versions' verdicts on a run stop counting once a newer version has judged it (passed
    or failed); an older version's pass stops counting as soon as a newer version has any verdict
    on the run (an error, "could not tell"): a pass only counts under the version judging now,
    a fail until that version says otherwise. Every person's label counts (`honed label`: each
    labeller is a version of its source)."""

    def superseded(v: Verdict) -> bool:
        if v.created_at is None or is_persons_label(v):
            return False
        return any(
            w.verifier == v.verifier
            and w.version != v.version
            and w.created_at is not None
            and w.created_at > v.created_at
            and not is_persons_label(w)
            and (w.passed is not None or v.passed is True)
            for w in verdicts
        )

    return [v for v in verdicts if not superseded(v)]


def is_persons_label(verdict: Verdict) -> bool:
    """A label a person gave (`honed label`, `evidence["labeler"]`), not a verifier's judgement."""
    return isinstance(verdict.evidence, dict) and "labeler" in verdict.evidence


def label_word(passed: bool | None) -> Label:
    """`pass`, `fail` or `unknown`: how the CLI, spans and the report spell a label."""
    return "pass" if passed is True else "fail" if passed is False else "unknown"


def is_truncated(value: Any) -> bool:
    """Whether a stored field is the marker the recorder leaves in place of an oversized value."""
    return type(value) is dict and value.get(TRUNCATED_KEY) is True


def _paused_attempt(step: Step) -> bool:
    return bool((step.extra or {}).get("bubbled")) and step.output is None and step.error is None
