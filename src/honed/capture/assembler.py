"""Events → trajectory records, on the writer thread.

The hot path only enqueues `(kind, run_id, parent_run_id, time, payload)` tuples; this module turns
that stream back into trajectories: one per root run, with model, tool and graph-node steps in
start order, parented to their nearest recorded ancestor. Everything expensive (message conversion,
serialisation, redaction, size caps) happens here, never in the agent's thread.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import typing
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Annotated, Any, NotRequired, Required

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import LLMResult
from langgraph.errors import GraphBubbleUp, GraphInterrupt
from langgraph.types import Command

from honed.capture.events import (
    CHAIN,
    CONTENTS,
    DISCARD,
    END,
    ERROR,
    INTERRUPT,
    LLM,
    MODEL,
    NESTED_LABELS,
    NO_VALUE,
    PENDING_ERROR,
    RESUME,
    START,
    TOOL,
    ModelRanAs,
    NotRun,
    NotTheAnswer,
    RanAs,
    StreamedBeforeError,
    ToolAnswer,
    inherited_labels,
)
from honed.capture.serialize import to_jsonable
from honed.messages import ROLES, answering_reply, stored_message, text_of, tool_schema
from honed.trajectory import HELDOUT, INTERRUPTED, STRUCTURED_KEY

log = logging.getLogger("honed")

PUSH = "__pregel_push"  # LangGraph's trigger for a node run by `Send`
_MAX_OUTPUT_KEYS_CAPPED_APART = 16  # a final state over the cap with more keys is one marker

_HIDDEN_TAG = "langsmith:hidden"
_INTERNAL_STATE_KEYS = {"messages", "jump_to", "remaining_steps"}
_CLOSED_MEMORY = 50_000
# Paused trajectories kept in memory, so a resume in this process writes the whole trajectory
# (live exporters see it whole); older ones are continued in the store (see save_records).
_PAUSED_MEMORY = 256


class _Run:
    __slots__ = (
        "extra", "in_tool", "inputs", "kind", "name", "parent_step", "started", "step_id", "trajectory",
    )  # fmt: skip

    def __init__(
        self, trajectory: _Open, kind: str, name: str, parent_step: str | None, started: float
    ) -> None:
        self.trajectory = trajectory
        self.kind = kind
        self.name = name
        self.parent_step = parent_step
        self.started = started
        self.step_id: str | None = None
        self.inputs: Any = None
        self.extra: dict[str, Any] = {}
        self.in_tool = False  # runs inside a tool: the agent's own code, which labels nothing


class _Open:
    """A trajectory still being assembled."""

    __slots__ = (
        "graph",
        "interrupts",
        "last_seen",
        "memo",
        "next_index",
        "open_runs",
        "output_keys",
        "pending_error",
        "record",
        "root_id",
        "root_key",
        "steps",
        "tool_call_ids",
        "unanswered",
    )

    def __init__(self, root_key: Any, record: dict[str, Any]) -> None:
        self.root_key = root_key
        self.root_id = str(root_key)
        self.graph = ""  # the root run's name: which graph, of those sharing a thread, this is
        self.pending_error: tuple[Any, float] | None = None
        # Interrupts the run paused at (None: it did not pause; []: paused, no value known).
        self.interrupts: list[dict[str, Any]] | None = None
        self.last_seen = 0.0
        # Every model call resends the whole conversation: each message (and the tool list) is
        # serialised and redacted once per trajectory, keyed by identity (the ref keeps it alive).
        self.memo: dict[Any, tuple[Any, Any, bool]] = {}  # key -> (object, stored, altered)
        self.record = record
        self.steps: list[dict[str, Any]] = []
        self.next_index = 0
        self.output_keys: str | list[str] | None = None  # a streamed graph's output schema
        self.open_runs: set[str] = set()
        self.tool_call_ids: set[str] = set()
        # Failed tool steps by call id, waiting for what the model was told instead (a ToolNode's
        # `handle_tool_errors` answers a raised error with a message of its own).
        self.unanswered: dict[str, dict[str, Any]] = {}

    def add_interrupts(self, values: Any) -> None:
        known = self.interrupts if self.interrupts is not None else []
        ids = {i.get("id") for i in known}
        for value in values or ():
            item = _interrupt(value)
            if item.get("id") is None or item["id"] not in ids:
                known.append(item)
                ids.add(item.get("id"))
        self.interrupts = known


class Assembler:
    """Feeds on events, yields finished trajectory records (`take_completed`).

    `field` is the serialiser applied to every payload (JSON-able, redacted, size-capped).
    Unknown, duplicate and late events are counted, never raised: capture must not fail.
    """

    def __init__(
        self,
        field: Callable[[Any], Any],
        altered: Callable[[], int],
        ident: Callable[[str], str] | None = None,
    ) -> None:
        self._field = field
        # A name or id the run gave as text (a tool's name, a call id, a model version, a thread or
        # task id), as stored: redacted like every other field (a QA pass, session 23: a key as a
        # call id or thread id was stored whole). Kept as it came while the run is assembled.
        self._ident = ident
        # How many fields `field` has stored otherwise than they came (redacted, hooked, cut):
        # `Serializer.altered_count`.
        self._altered = altered
        self._stale_memo = False  # a memoised field reused by this step was altered when stored
        self._runs: dict[Any, _Run] = {}
        self._completed: list[dict[str, Any]] = []
        self._closed: deque[Any] = deque()
        self._closed_set: set[Any] = set()
        self._paused: OrderedDict[str, dict[str, Any]] = OrderedDict()  # trajectory id -> record
        # (thread id, graph) -> its paused trajectory's id. By graph too: two graphs sharing a
        # thread id (a user's or session's id), each paused, are each resumed into their own run
        # (a QA pass, session 25: the first's resume was stored as the second's answer).
        self._paused_on_thread: dict[tuple[str, str], str] = {}
        self._paused_keys: dict[str, tuple[str, str]] = {}  # and back, to forget it with its record
        # (thread id, graph) -> the trajectory whose run failed on it last: `invoke(None, config)` retries it
        self._failed_on_thread: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.ignored_events = 0

    @property
    def open_trajectories(self) -> int:
        return len({id(r.trajectory) for r in self._runs.values()})

    def feed(self, event: tuple[Any, ...]) -> None:
        kind, run_id, parent_id, when, payload = event
        try:
            if kind == START:
                self._start(run_id, parent_id, when, payload)
            elif kind == END:
                self._end(run_id, when, payload, error=None)
            elif kind == ERROR:
                self._end(run_id, when, None, error=payload)
            elif kind == PENDING_ERROR:
                run = self._runs.get(run_id)
                if run is not None:
                    run.trajectory.pending_error = (payload, when)
            elif kind == INTERRUPT:
                self._interrupted(run_id, when, payload)
            elif kind == RESUME:
                self._resume(run_id, when, payload)
            elif kind == DISCARD:
                self._discard(run_id)
        except Exception:  # one malformed event must not stop the writer
            self.ignored_events += 1
            log.exception("honed: could not assemble a capture event; it was skipped")

    def take_completed(self) -> list[dict[str, Any]]:
        done, self._completed = self._completed, []
        return done if self._ident is None else [self._ids_at_rest(r) for r in done]

    def _ids_at_rest(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record with its names and ids redacted: a copy where any changes (a paused record
        is kept as it came, to be continued)."""
        ident = self._ident
        assert ident is not None
        changed: dict[str, Any] = {}
        for key in ("task_id", "thread_id", "model_version"):
            value = record.get(key)
            if type(value) is str and (out := ident(value)) != value:
                changed[key] = out
        steps = record.get("steps") or ()
        new_steps: list[dict[str, Any]] | None = None
        for i, step in enumerate(steps):
            update: dict[str, Any] = {}
            for key in ("name", "model_version"):
                value = step.get(key)
                if type(value) is str and (out := ident(value)) != value:
                    update[key] = out
            extra = step.get("extra")
            call_id = extra.get("tool_call_id") if type(extra) is dict else None
            if type(call_id) is str and (out := ident(call_id)) != call_id:
                update["extra"] = {**extra, "tool_call_id": out}  # type: ignore[dict-item]
            if update:
                new_steps = new_steps if new_steps is not None else list(steps)
                new_steps[i] = {**step, **update}
        if new_steps is not None:
            changed["steps"] = new_steps
        meta = record.get("metadata")
        if isinstance(meta, dict) and (
            "within_task_id" in meta or "nested_task_ids" in meta or "held_out_by" in meta
        ):  # the other tasks a run names: ids too (a review, session 23: the hook rewrote them)
            meta = dict(meta)
            if type(meta.get("within_task_id")) is str:
                meta["within_task_id"] = ident(meta["within_task_id"])
            if isinstance(meta.get("nested_task_ids"), list):
                meta["nested_task_ids"] = [ident(t) if type(t) is str else t for t in meta["nested_task_ids"]]
            held = meta.get("held_out_by")
            if isinstance(held, dict) and type(held.get("task_id")) is str:
                meta["held_out_by"] = {**held, "task_id": ident(held["task_id"])}
            changed["metadata"] = meta
        return {**record, **changed} if changed else record

    def close_all(self, reason: str, when: float) -> None:
        """End every open trajectory as an error (at exit: the process is going away)."""
        for root in {r.trajectory.root_key for r in self._runs.values()}:
            self._end(root, when, None, error=reason)

    def close_stale(self, older_than: float, when: float) -> None:
        """End trajectories with no news since `older_than` (a caller that abandoned a stream
        leaves no trace a middleware can see): bounded memory in a long-lived process."""
        stale = {r.trajectory for r in self._runs.values() if r.trajectory.last_seen < older_than}
        for trajectory in stale:
            self._end(
                trajectory.root_key,
                when,
                None,
                error="incomplete: no event for this run within the open timeout",
            )

    def close_pending(self, older_than: float | None = None) -> None:
        """End the trajectories whose last news was an escaped error (all, or those older than)."""
        pending = {r.trajectory for r in self._runs.values() if r.trajectory.pending_error is not None}
        for trajectory in pending:
            error, when = trajectory.pending_error  # type: ignore[misc]
            if older_than is None or when < older_than:
                self._end(trajectory.root_key, when, None, error=error)

    # -- starts ----------------------------------------------------------------------------

    def _start(self, run_id: Any, parent_id: Any, when: float, payload: tuple[Any, ...]) -> None:
        run_kind, name, inputs, metadata, tags, extra = payload
        # A root run whose id belongs to a run that has ended is another run under a reused id
        # (`config["run_id"]` as a request or idempotency key): an attempt of its own, not dropped.
        reused = parent_id is None and run_id in self._closed_set and run_id not in self._runs
        if run_id in self._runs or (run_id in self._closed_set and not reused):
            self.ignored_events += 1  # the same run seen by two handlers, or a replayed start
            return
        parent = self._runs.get(parent_id) if parent_id is not None else None
        if parent is None and parent_id is not None and parent_id in self._closed_set:
            self.ignored_events += 1  # a child of a trajectory that already ended (or was discarded)
            self._remember_closed(run_id)  # so its own children are known as late too
            return
        name = _run_name(run_kind, name, metadata, extra)
        if parent is not None and extra and NESTED_LABELS in extra:
            extra = dict(extra)
            self._nested_labels(
                parent.trajectory, extra.pop(NESTED_LABELS), in_tool=parent.in_tool or parent.kind == TOOL
            )
        if parent is None:
            resume = _resume_value(inputs)
            thread_id = _thread_of(metadata, extra)
            on_thread = (thread_id, name) if thread_id else None
            retried = None
            if (
                resume is NO_VALUE
                and inputs is None
                and (on_thread in self._paused_on_thread or on_thread in self._failed_on_thread)
                and not (metadata or {}).get("checkpoint_id")
            ):
                # `invoke(None, config)`: LangGraph's way on past a static breakpoint, or to retry
                # a run that failed from its last checkpoint (stored as an attempt of its own with
                # the failed run's task, `replayed_from` it: a QA pass, session 24, found it
                # stored with no task at all, an answer to nothing).
                resume = None
                if on_thread not in self._paused_on_thread:
                    retried = self._failed_on_thread.pop(on_thread, None)
            if resume is not NO_VALUE:
                paused = self._paused_on_thread.pop(on_thread, None) if on_thread else None
                trajectory = self._continuation(
                    run_id, paused or retried, name, resume, metadata, tags, extra, when
                )
            else:
                if on_thread:  # a new turn: a pause left unanswered on this thread stays paused
                    self._paused_on_thread.pop(on_thread, None)
                    self._failed_on_thread.pop(on_thread, None)
                record = self._trajectory_record(run_id, name, inputs, metadata, tags, when, extra)
                if reused:
                    record["id"] = str(uuid.uuid4())
                    record["metadata"] = {**(record["metadata"] or {}), "replayed_from": str(run_id)}
                trajectory = _Open(run_id, record)
            trajectory.last_seen = when
            trajectory.graph = name
            if extra and extra.get("output_keys"):
                trajectory.output_keys = extra["output_keys"]
            run = _Run(trajectory, run_kind, name, None, when)
            self._runs[run_id] = run
            trajectory.open_runs.add(run_id)
            if run_kind == CHAIN:
                return  # the root chain is the trajectory itself
            in_tool = False
        else:
            trajectory = parent.trajectory
            trajectory.last_seen = when
            trajectory.pending_error = None  # the run went on: whatever raised was handled
            parent_step = parent.step_id or parent.parent_step
            run = _Run(trajectory, run_kind, name, parent_step, when)
            run.in_tool = parent.in_tool or parent.kind == TOOL
            self._runs[run_id] = run
            trajectory.open_runs.add(run_id)
            # A subgraph run as a node shows up twice (the node, then the graph inside it).
            same_as_parent = parent.kind == CHAIN and parent.step_id is not None and parent.name == name
            # A graph (or chain) a tool invokes, e.g. a subagent: one step named after it.
            in_tool = parent.kind == TOOL and not (tags and _HIDDEN_TAG in tags)
            if run_kind == CHAIN and (same_as_parent or not (in_tool or _is_node(name, metadata, tags))):
                run.step_id = None  # transparent plumbing: children attach to our parent step
                return
        if run_kind == MODEL:  # calls answered without running, before this one: steps first
            self._synthesise_unseen_tool_errors(trajectory, inputs, run.parent_step, when)
        run.step_id = str(run_id)
        run.inputs = inputs
        run.extra = extra or {}
        run.extra["_index"] = trajectory.next_index
        if run_kind == CHAIN and (in_tool or _pushed(metadata)):
            # A node's input is the whole state (every model step has the conversation already),
            # but a `Send`'s payload, or a subagent's request, is what tells its steps apart.
            run.extra["_keep_input"] = True
        trajectory.next_index += 1

    def _trajectory_record(
        self,
        run_id: Any,
        name: str,
        inputs: Any,
        metadata: dict[str, Any] | None,
        tags: list[str] | None,
        when: float,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        labels = (metadata or {}).get("honed")
        honed = dict(labels) if isinstance(labels, Mapping) else {}
        if labels and not isinstance(labels, Mapping):
            _warn_labels(labels)  # captured all the same, unlabelled: the run is not lost
        user_tags = [t for t in tags or () if ":" not in t]
        if user_tags:
            honed.setdefault("tags", user_tags)
        # `create_agent`'s name before the run's (`run_name` renames the run), as `Middleware` does.
        agent = str(honed.pop("agent", None) or (metadata or {}).get("lc_agent_name") or name)
        meta = self._field(honed)
        within = _opt_str(honed.get("within_task_id"))
        if within is not None and isinstance(meta, dict):
            meta["within_task_id"] = within  # an id: redacted at rest as ids are (`_ids_at_rest`)
        replayed_from = (extra or {}).get("replayed_from")
        if replayed_from and isinstance(meta, dict):
            # A run replayed from a checkpoint taken inside another (`Middleware` knows which):
            # linked to it, as a retry is (a QA pass, session 25: sent, and dropped here).
            meta["replayed_from"] = str(replayed_from)
        return {
            "id": str(run_id),
            "agent": agent,
            "task": self._field(_plain(inputs)),
            "task_id": _opt_str(honed.get("task_id")),
            "split": _opt_str(honed.get("split")),
            "metadata": meta,
            "output": None,
            "status": "ok",
            "error": None,
            "model_version": _opt_str(honed.get("model_version")),
            "started_at": when,
            "ended_at": None,
            "steps": None,
            "thread_id": _thread_of(metadata, extra),
            "checkpoint_id": _opt_str(
                (extra or {}).get("checkpoint_id") or (metadata or {}).get("checkpoint_id")
            ),
        }

    def _nested_labels(
        self, trajectory: _Open, labels: Any, *, in_tool: bool = False, resumed: bool = False
    ) -> None:
        """Labels the caller's code gave a run inside this one (`agent.invoke(q, {"metadata":
        {"honed": ...}})` in a request handler, or in a node). Under a root without labels they are
        the run's (the handler only wraps the agent); under a labelled root, a held-out split among
        them holds the whole run out. Both were dropped: the held-out run was trained on (a QA pass,
        session 22).

        Labels given inside a tool are the agent's own code speaking, and decide nothing of the run
        but that it holds another task's conversation (a QA pass, session 25: a tool labelled its
        unlabelled run with another task's id, its own expected answer and verifier, and trained).
        A nested held-out split holds this run out (`held_out_by`) without making its task held
        out: a tool's `split="heldout"` withdrew every run of its task from training. Only the
        caller's labels of a resumed run (`resumed`) say the run's own split."""
        from honed.store.select import evaluation_split, same_split

        record = trajectory.record
        if not isinstance(labels, Mapping):
            return
        meta = record["metadata"] if isinstance(record["metadata"], dict) else None
        if (
            not in_tool
            and record["task_id"] is None
            and record["split"] is None
            and meta is not None
            and set(meta) <= {"tags"}
        ):
            honed = {**meta, **{k: v for k, v in labels.items() if k != "agent"}}
            record.update(
                task_id=_opt_str(honed.get("task_id")),
                split=_opt_str(honed.get("split")),
                metadata=self._field(honed),
                model_version=record["model_version"] or _opt_str(honed.get("model_version")),
            )
            return
        task_id = _opt_str(labels.get("task_id"))
        if task_id is not None and task_id != record["task_id"] and meta is not None:
            # Another task's conversation in this run: held out if that task is (by the gate's
            # names, a hash), wherever this run's own labels say (a second review, session 22).
            others = meta.setdefault("nested_task_ids", [])
            if isinstance(others, list) and task_id[:256] not in others:
                if len(others) < 64:
                    others.append(task_id[:256])
                else:  # more than are kept: held out whenever any task is (a review, session 22)
                    meta["nested_task_ids_cut"] = True
        split = _opt_str(labels.get("split"))
        if split is None or not (evaluation_split(split) or same_split(split, HELDOUT)):
            return
        current = record["split"]
        if current is None or not (evaluation_split(current) or same_split(current, HELDOUT)):
            if resumed:
                record["split"] = split
            if meta is not None:
                meta["held_out_by"] = {"task_id": task_id, "split": self._field(split)}

    # -- interrupts and resumes ------------------------------------------------------------

    def _continuation(
        self,
        root_key: Any,
        paused_id: str | None,
        name: str,
        resume: Any,
        metadata: dict[str, Any] | None,
        tags: list[str] | None,
        extra: dict[str, Any] | None,
        when: float,
    ) -> _Open:
        """The trajectory a resumed run continues: the paused one when this process still holds
        it (written whole again), else a record of this part alone, `resumes` marking it for the
        store to join to the paused trajectory (by id, or by thread)."""
        paused = self._paused.pop(paused_id, None) if paused_id is not None else None
        if paused is not None:
            self._paused_keys.pop(paused_id, None)  # type: ignore[arg-type]
        if paused is not None:
            record = {**paused, "status": "ok", "error": None, "output": None, "ended_at": None}
            trajectory = _Open(root_key, record)
            trajectory.steps = list(paused["steps"])
            trajectory.next_index = max((s["index"] for s in trajectory.steps), default=-1) + 1
            # The calls answered before the pause: their messages, read again by the next model
            # call, are not new calls (a tool's error was stored twice; since calls the model asked
            # for are synthesised when they succeed too, every earlier call was, a QA pass, session 23).
            # A call paused inside (`bubbled`) is answered after the resume: a reviewer's rejection.
            trajectory.tool_call_ids = {
                str(s["extra"]["tool_call_id"])
                for s in trajectory.steps
                if s.get("kind") == "tool"
                and isinstance(s.get("extra"), dict)
                and s["extra"].get("tool_call_id")
                and not s["extra"].get("bubbled")
            }
            # Labels the resume was given: a held-out split among them holds the whole run out, as
            # a nested run's do (a QA pass, session 24: dropped here, kept half by the store).
            labels = metadata.get("honed") if isinstance(metadata, Mapping) else None
            if labels is not None:
                self._nested_labels(trajectory, labels, resumed=True)
        else:
            record_id = paused_id or str(root_key)
            value = None if resume is NO_VALUE else {"resume": _plain(resume)}
            record = self._trajectory_record(record_id, name, value, metadata, tags, when, extra)
            trajectory = _Open(root_key, record)
        record["resumes"] = True
        record["steps"] = None
        self._synthetic_step(
            trajectory, "resume", when, input=None if resume is NO_VALUE else self._field(_plain(resume))
        )
        return trajectory

    def _resume(self, trajectory_id: str, when: float, payload: tuple[Any, ...]) -> None:
        """A middleware's trajectory continues after an interrupt (under the same id)."""
        if trajectory_id in self._runs:
            self.ignored_events += 1
            return
        name, resume, metadata, extra = payload
        self._closed_set.discard(trajectory_id)
        trajectory = self._continuation(
            trajectory_id,
            trajectory_id if trajectory_id in self._paused else None,
            name, resume, metadata, None, extra, when,
        )  # fmt: skip
        trajectory.record["id"] = trajectory_id
        trajectory.last_seen = when
        self._runs[trajectory_id] = _Run(trajectory, CHAIN, name, None, when)
        trajectory.open_runs.add(trajectory_id)

    def _interrupted(self, run_id: Any, when: float, payload: tuple[Any, ...]) -> None:
        run = self._runs.get(run_id)
        if run is None:
            self.ignored_events += 1
            return
        values, checkpoint_id = payload
        run.trajectory.add_interrupts(values)
        run.trajectory.last_seen = when
        if checkpoint_id:
            run.trajectory.record["_pause_checkpoint"] = str(checkpoint_id)

    def _discard(self, run_id: Any) -> None:
        run = self._runs.get(run_id)
        if run is None:
            return
        trajectory = run.trajectory
        for key in [k for k, r in self._runs.items() if r.trajectory is trajectory]:
            del self._runs[key]
            self._remember_closed(key)
        self._remember_closed(trajectory.root_key)

    def _synthetic_step(
        self, trajectory: _Open, name: str, when: float, *, extra: dict[str, Any] | None = None, **fields: Any
    ) -> None:
        """A step no callback reports: the pause at an interrupt (`output`: what it waits for), the
        value a run resumed with (`input`). Both are `node` steps marked `extra["synthesised"]`."""
        trajectory.steps.append(
            {
                "id": f"{trajectory.record['id']}:{name}:{uuid.uuid4().hex[:12]}",
                "index": trajectory.next_index,
                "parent_id": None,
                "kind": "node",
                "name": name,
                "input": None,
                "output": None,
                "error": None,
                "reasoning": None,
                "tool_calls": [],
                "usage": None,
                "model_version": None,
                "started_at": when,
                "ended_at": when,
                "extra": {"synthesised": True, **(extra or {})},
                **fields,
            }
        )
        trajectory.next_index += 1

    # -- ends ------------------------------------------------------------------------------

    def _end(self, run_id: Any, when: float, outputs: Any, error: Any) -> None:
        run = self._runs.pop(run_id, None)
        if run is None:
            self.ignored_events += 1
            return
        trajectory = run.trajectory
        trajectory.last_seen = when
        trajectory.open_runs.discard(run_id)
        streamed = None
        if isinstance(error, StreamedBeforeError):  # the reply so far is the step's output
            streamed, error = AIMessage(content=error.text), error.error
        bubbled = None
        if isinstance(error, GraphBubbleUp):
            # Not a failure: LangGraph's control flow (an interrupt, a Command to the parent graph).
            if isinstance(error, GraphInterrupt):
                trajectory.add_interrupts(error.args[0] if error.args else ())
            elif outputs is None and error.args and isinstance(error.args[0], Command):
                outputs = error.args[0]  # a handoff's `Command(goto=..., update=..., graph=PARENT)`
            bubbled, error = type(error).__name__, None
        if error is None:
            trajectory.pending_error = None
        if run.step_id is not None:
            step = self._step(run, when, outputs if streamed is None else streamed, error)
            if bubbled:
                step["extra"]["bubbled"] = bubbled
            if streamed is not None and run.kind in (MODEL, LLM):
                step["extra"]["streamed_before_error"] = True
            trajectory.steps.append(step)
        if run.kind == CHAIN and isinstance(outputs, dict | list):
            self._synthesise_unseen_tool_errors(
                trajectory, _node_messages(outputs), run.step_id or run.parent_step, when
            )
        if run_id == trajectory.root_key:
            self._finish(trajectory, run_id, when, outputs, error)

    def _finish(self, trajectory: _Open, run_id: Any, when: float, outputs: Any, error: Any) -> None:
        for orphan in list(trajectory.open_runs):  # children the run never closed (interrupted, crashed)
            self._end(orphan, when, None, error="incomplete: the run ended before this step finished")
        record = trajectory.record
        if (
            record["task"] is None
            and not trajectory.steps
            and error is None
            and trajectory.interrupts is None
            and not record.get("resumes")
        ):
            # `invoke(None, config)` on a thread with nothing left to run (a UI's "continue"): no
            # node ran, nothing was asked or answered. Stored, it was an `ok` run of no task holding
            # the last turn's answer, which a reference check passed (a QA pass, session 25); the
            # middleware, whose hooks never ran, stores nothing either.
            self._remember_closed(run_id)
            return
        record["ended_at"] = when
        if isinstance(outputs, NotTheAnswer):  # a step of its run towards another turn's answer
            outputs = outputs.outputs
            if isinstance(record.get("metadata"), dict):
                record["metadata"] = inherited_labels({**record["metadata"], "task_id": record["task_id"]})
            record["task_id"] = None
        pause_checkpoint = record.pop("_pause_checkpoint", None)
        if error is not None:
            record["status"] = "error"
            record["error"] = self._text(_describe_error(error))
            if record.get("thread_id"):
                on_thread = (record["thread_id"], trajectory.graph)
                self._failed_on_thread[on_thread] = record["id"]
                self._failed_on_thread.move_to_end(on_thread)
                while len(self._failed_on_thread) > _PAUSED_MEMORY:
                    self._failed_on_thread.popitem(last=False)
        elif trajectory.interrupts is not None:
            # Paused for a human: not an outcome. What it waits for is the `interrupt` step.
            record["status"] = INTERRUPTED
            extra = {"checkpoint_id": pause_checkpoint} if pause_checkpoint else {}
            self._synthetic_step(
                trajectory, "interrupt", when, output=self._field(trajectory.interrupts), extra=extra
            )
            outputs = None
        if outputs is not None:
            output, types = _final_output(_output_view(outputs, trajectory.output_keys))
            record["output"] = self._output_field(output)
            if types and isinstance(record["metadata"], dict):
                record["metadata"] = {**record["metadata"], "output_types": types}
        steps = _in_call_order(trajectory.steps)
        record["steps"] = steps
        if record["task"] is None:  # `update_state(...)` then `invoke(None)`: what the state asked
            record["task"] = _task_of_first_model_call(steps)
        if record["model_version"] is None:
            record["model_version"] = _answering_version(steps, record.get("output"))
        self._completed.append(record)
        self._remember_closed(run_id)
        if record["status"] == INTERRUPTED:
            self._remember_paused(record, trajectory.graph)

    def _output_field(self, output: Any) -> Any:
        """The final output under the field cap. A state with one huge key (a document, a long
        log) is capped key by key, so the small ones (the answer a verifier reads) survive."""
        value = self._field(output)
        if (
            isinstance(value, dict)
            and value.get("__truncated__") is True
            and isinstance(output, dict)
            and 1 < len(output) <= _MAX_OUTPUT_KEYS_CAPPED_APART
        ):
            value = {str(k): self._field(v) for k, v in output.items()}
        return value

    def _remember_paused(self, record: dict[str, Any], graph: str) -> None:
        self._paused[record["id"]] = record
        if record.get("thread_id"):
            self._paused_on_thread[(record["thread_id"], graph)] = record["id"]
            self._paused_keys[record["id"]] = (record["thread_id"], graph)
        while len(self._paused) > _PAUSED_MEMORY:
            old_id, _ = self._paused.popitem(last=False)
            on_thread = self._paused_keys.pop(old_id, None)
            if on_thread is not None and self._paused_on_thread.get(on_thread) == old_id:
                del self._paused_on_thread[on_thread]

    def _remember_closed(self, run_key: Any) -> None:
        self._closed.append(run_key)
        self._closed_set.add(run_key)
        if len(self._closed) > _CLOSED_MEMORY:
            self._closed_set.discard(self._closed.popleft())

    def _step(self, run: _Run, when: float, outputs: Any, error: Any) -> dict[str, Any]:
        extra = run.extra
        index = extra.pop("_index")
        step: dict[str, Any] = {
            "id": run.step_id,
            "index": index,
            "parent_id": run.parent_step,
            "kind": "model" if run.kind in (MODEL, LLM) else run.kind if run.kind == TOOL else "node",
            "name": run.name,
            "input": None,
            "output": None,
            "error": self._text(_describe_error(error)) if error is not None else None,
            "reasoning": None,
            "tool_calls": [],
            "usage": None,
            "model_version": None,
            "started_at": run.started,
            "ended_at": when,
            "extra": {},
        }
        if run.kind in (MODEL, LLM):
            if outputs is None and error is not None:
                outputs = _reply_of(error)
            self._model_step(step, run, outputs)
        elif run.kind == TOOL:
            self._tool_step(step, run, outputs)
        else:
            if extra.pop("_keep_input", False):
                step["input"] = self._field(_plain(_payload(run.inputs)))
            step["output"] = self._field(_plain(outputs)) if outputs is not None else None
            if "handoff" in extra:  # `Middleware`'s step for a hook's handoff (`Trajectory.handed_off_to`)
                step["extra"].update(synthesised=True, handoff=extra["handoff"])
        return step

    def _model_step(self, step: dict[str, Any], run: _Run, outputs: Any) -> None:
        extra, trajectory = run.extra, run.trajectory
        ran_as = isinstance(outputs, ModelRanAs)
        if ran_as:  # what the model received, not what the middleware saw
            run.inputs = outputs.messages
            if outputs.tools is not None:
                extra["tools"] = outputs.tools
            if outputs.name:
                step["name"] = extra["model"] = outputs.name
            outputs = outputs.response
        contents = extra.pop(CONTENTS, None)
        before, self._stale_memo = self._altered(), False
        if run.kind == MODEL:
            inputs = run.inputs or []
            if not isinstance(contents, list) or len(contents) != len(inputs) or ran_as:
                contents = [getattr(m, "content", None) for m in inputs]  # as they are now
            messages = [
                self._message(trajectory, m, content) if isinstance(m, BaseMessage) else self._field(m)
                for m, content in zip(inputs, contents, strict=True)
            ]
            model_input: dict[str, Any] = {"messages": messages}
        else:
            model_input = {"prompts": self._field(run.inputs)}
        tools = extra.get("tools")
        if tools:
            key = ("tools", *(id(t) for t in tools))
            model_input["tools"] = self._memoised(trajectory, key, list(tools), _tool_schemas)
        structured = (
            extra.get("structured_tools") or []
            if extra.get("structured_offered")
            else _structured_tools_called(extra.get("structured_tools"), outputs)
        )
        if structured:  # bound to the call (or the model answered through it: it saw that tool)
            offered = model_input.get("tools") or []
            named = {_schema_name(t) for t in offered}  # the model's own parameters may hold them
            added = [t for t in self._field(structured) if _schema_name(t) not in named]
            if added:
                model_input["tools"] = [*offered, *added]
        step["input"] = model_input
        prompt_exact = self._altered() == before and not self._stale_memo
        settings = {k: v for k, v in (extra.get("settings") or {}).items() if k not in ("tools", "messages")}
        if settings:  # the same settings at every call, in a new dict: memoised by value
            step["extra"]["settings"] = self._memoised(trajectory, "settings", settings, _same)
        message = _ai_message(outputs)
        if message is not None:
            before, self._stale_memo = self._altered(), False
            output = self._message(trajectory, message, message.content)
            reply_exact = self._altered() == before and not self._stale_memo
            step["output"] = output
            if isinstance(output, dict):
                step["tool_calls"] = output.get("tool_calls") or []
                step["reasoning"] = (
                    output.get("reasoning") if isinstance(output.get("reasoning"), str) else None
                )
            if message.usage_metadata:
                step["usage"] = _usage(message.usage_metadata)
            meta = message.response_metadata or {}
            step["model_version"] = _opt_str(
                meta.get("model_version") or meta.get("model_name") or meta.get("model") or extra.get("model")
            )
            for key in ("finish_reason", "stop_reason"):
                if meta.get(key) is not None:
                    step["extra"][key] = self._field(meta[key])
            if any(meta.get(key) is not None for key in _TOKEN_KEYS):
                self._token_ids(step, meta, prompt_exact, reply_exact)
        elif isinstance(outputs, LLMResult) and outputs.generations and outputs.generations[0]:
            step["output"] = self._field(outputs.generations[0][0].text)
        if step["model_version"] is None:
            step["model_version"] = _opt_str(extra.get("model"))

    def _token_ids(
        self, step: dict[str, Any], meta: dict[str, Any], prompt_clean: bool, reply_clean: bool
    ) -> None:
        """The token ids (and log-probabilities) a local model recorded, unless the text they
        encode was stored otherwise (redacted, rewritten by the redact hook, cut at the field cap):
        decoded, they would give back what the text no longer holds, a secret past the cap or a
        name the hook took out (a QA pass, session 22) (the prompt's in `prompt_token_ids`, the
        reply's in `token_ids`)."""
        for key, keep in (
            ("prompt_token_ids", prompt_clean),
            ("token_ids", reply_clean),
            ("logprobs", reply_clean),
        ):
            if meta.get(key) is not None and keep:
                step["extra"][key] = self._field(meta[key])
        if isinstance(meta.get("tokenizer"), str) and (prompt_clean or reply_clean):
            step["extra"]["tokenizer"] = meta["tokenizer"][:64]  # whose ids these are
        if not (prompt_clean and reply_clean):
            step["extra"]["token_ids_dropped"] = "redacted"

    def _message(self, trajectory: _Open, message: BaseMessage, content: Any) -> Any:
        """A message as stored, memoised by its id while its content is the one it had when
        memoised (`CONTENTS`); with `content` (its content when the call began) if it was
        replaced since."""
        key = id(message)
        hit = trajectory.memo.get(key)
        if hit is not None and hit[0] is message and (hit[3] is content or _same_blocks(hit[3], content)):
            self._stale_memo |= hit[2]
            return hit[1]
        before = self._altered()
        as_called = message
        if message.content is not content and not _same_blocks(message.content, content):
            try:
                as_called = message.model_copy(update={"content": content})
            except Exception:  # a message type that cannot be copied: as it is now
                as_called = message
        value = self._field(stored_message(as_called))
        trajectory.memo[key] = (message, value, self._altered() != before, content)
        return value

    def _memoised(self, trajectory: _Open, key: Any, obj: Any, convert: Callable[[Any], Any]) -> Any:
        hit = trajectory.memo.get(key)
        if hit is not None and (hit[0] is obj or (not isinstance(key, int) and _equal(hit[0], obj))):
            self._stale_memo |= hit[2]  # (or the same tools, or settings, in a new list or dict)
            return hit[1]
        before = self._altered()
        value = self._field(convert(obj))
        trajectory.memo[key] = (obj, value, self._altered() != before)
        return value

    def _tool_step(self, step: dict[str, Any], run: _Run, outputs: Any) -> None:
        extra = run.extra
        if isinstance(outputs, NotRun):  # answered without running (a reviewer's rejection)
            step["extra"]["synthesised"] = True
            outputs = outputs.result
        if isinstance(outputs, RanAs):  # what ran, not what the model asked (a reviewer's edit)
            step["extra"]["asked"] = self._field(
                {"name": outputs.asked_name, "args": _plain(outputs.asked_args)}
            )
            step["name"], run.inputs, outputs = outputs.name or step["name"], outputs.args, outputs.result
        answered = outputs if isinstance(outputs, ToolAnswer) else None
        if answered is not None:
            outputs = answered.message
        step["input"] = self._field(_plain(run.inputs))
        tool_call_id = extra.get("tool_call_id")
        handoff = next(
            (c.goto for c in (outputs if isinstance(outputs, list) else [outputs])
             if isinstance(c, Command) and c.graph == Command.PARENT and isinstance(c.goto, str)),
            None,
        )  # fmt: skip
        if handoff is not None:  # what tells a handoff (`Trajectory.handed_off_to`): not the output's shape
            step["extra"]["handoff"] = handoff[:200]
        if isinstance(outputs, Command) and isinstance(outputs.update, dict):
            # A tool that updates the agent's state: its answer is the ToolMessage inside.
            update = outputs.update
            reply = next(
                (
                    m
                    for m in update.get("messages") or ()
                    if isinstance(m, ToolMessage) and (tool_call_id is None or m.tool_call_id == tool_call_id)
                ),
                None,
            )
            rest = {k: v for k, v in update.items() if k != "messages"}
            if reply is not None:
                outputs = reply
                if rest:
                    step["extra"]["state_update"] = self._field(_plain(rest))
        if isinstance(outputs, ToolMessage):
            tool_call_id = tool_call_id or outputs.tool_call_id
            # (as it was when the tool answered, where that was recorded: `ToolAnswer`)
            step["output"] = self._field(_plain(outputs.content if answered is None else answered.content))
            if outputs.status == "error" and step["error"] is None:
                step["error"] = self._text(text_of(outputs))
            if outputs.artifact is not None:
                step["extra"]["artifact"] = self._field(outputs.artifact)
        elif outputs is not None:
            step["output"] = self._field(_plain(outputs))
        if tool_call_id:
            step["extra"]["tool_call_id"] = str(tool_call_id)
            run.trajectory.tool_call_ids.add(str(tool_call_id))
            if step["error"] is not None and step["output"] is None:
                run.trajectory.unanswered[str(tool_call_id)] = step
            else:  # a retry that answered (`ToolRetryMiddleware`): the failed attempt keeps its
                # own nothing, not this one's result (a QA pass, session 27)
                run.trajectory.unanswered.pop(str(tool_call_id), None)

    def _synthesise_unseen_tool_errors(
        self, trajectory: _Open, messages: Any, parent_step: str | None, when: float
    ) -> None:
        """A call to a tool that does not exist, or that a middleware answered without running it
        (a call limit, a reviewer's rejection, a cache, `LLMToolEmulator`), never reaches a tool
        callback: the only trace is the ToolMessage in the conversation. Record it as a tool step
        (failed, for an error), once, when the run's next model call reads it (so the steps keep
        their order) or when a chain ends with it. A reply that is no error counts only for a
        call this run's model asked for (a QA pass, session 22: a cached call left no step).
        Earlier turns' messages (before the last user message) belong to earlier runs."""
        if not isinstance(messages, list):
            return
        unseen = []  # this turn's (after the last user message): read back to it, no further
        for message in reversed(messages):
            if isinstance(message, HumanMessage):
                break
            if not isinstance(message, ToolMessage):
                continue
            if message.tool_call_id not in trajectory.tool_call_ids or _another_call(trajectory, message):
                unseen.append(message)
            elif trajectory.unanswered:  # a raised error's step: what the model was told of it
                failed = trajectory.unanswered.pop(message.tool_call_id, None)
                if failed is not None:
                    failed["output"] = self._field(_plain(message.content))
        for message in reversed(unseen):
            if message.tool_call_id in trajectory.tool_call_ids and not _another_call(trajectory, message):
                continue  # the same message twice in the list
            asked = _asked_arguments(trajectory.steps, message.tool_call_id)
            failed = message.status == "error" or _structured_output_retry(message)
            if not failed and asked is None:
                continue
            trajectory.tool_call_ids.add(message.tool_call_id)
            ran = _ran_without_id(trajectory.steps, message.name, asked)
            if ran is not None:  # a node ran the tool on its arguments (no id): the call's step
                ran["extra"]["tool_call_id"] = message.tool_call_id
                continue
            text = self._text(text_of(message)) if failed else None
            trajectory.steps.append(
                {
                    "id": f"{parent_step or trajectory.root_id}:{message.tool_call_id}",
                    "index": trajectory.next_index,
                    "parent_id": parent_step,
                    "kind": "tool",
                    "name": message.name or "unknown_tool",
                    "input": asked,
                    "output": self._field(_plain(message.content)),
                    "error": text,
                    "reasoning": None,
                    "tool_calls": [],
                    "usage": None,
                    "model_version": None,
                    "started_at": when,
                    "ended_at": when,
                    "extra": {"tool_call_id": message.tool_call_id, "synthesised": True},
                }
            )
            trajectory.next_index += 1

    def _text(self, value: str) -> str:
        out = self._field(value)
        return out if isinstance(out, str) else json.dumps(out, ensure_ascii=False)


# -- helpers -----------------------------------------------------------------------------------


def _same_blocks(a: Any, b: Any) -> bool:
    """Two lists of content blocks alike (a list's snapshot is a copy, never the list itself)."""
    return type(a) is list and type(b) is list and a == b


def _another_call(trajectory: _Open, message: ToolMessage) -> bool:
    """An error under the id of calls of the run that all succeeded answers another call: a
    second agent whose model numbers its calls as the first's did (a QA pass, session 27: its
    call to a tool it lacks left no step)."""
    if message.status != "error":
        return False
    found = False
    for step in trajectory.steps:
        if step["kind"] == "tool" and (step.get("extra") or {}).get("tool_call_id") == message.tool_call_id:
            if step.get("error") is not None:
                return False
            found = True
    return found


def _answering_version(steps: list[dict[str, Any]], output: Any) -> str | None:
    """The run's model version: that of the model call whose reply is the run's answer, else of
    the last model call (a middleware asking another model to check the reply, a guardrail, made
    the guard's the run's version)."""
    answer = output.get("answer") if isinstance(output, dict) else output
    structured = output.get(STRUCTURED_KEY) if isinstance(output, dict) else None
    versioned = [s for s in steps if s["kind"] == "model" and s["model_version"]]
    at = answering_reply([s.get("output") for s in versioned], answer, structured)
    if at is not None:
        return versioned[at]["model_version"]
    return versioned[-1]["model_version"] if versioned else None


def _structured_output_error_affixes() -> tuple[str, str]:
    try:
        from langchain.agents.factory import STRUCTURED_OUTPUT_ERROR_TEMPLATE as template
    except ImportError:  # `langchain` (v1) is not installed: LangGraph alone
        return ("Error: ", "\n Please fix your mistakes.")
    before, _, after = template.partition("{error}")
    return before, after


_STRUCTURED_ERROR_BEFORE, _STRUCTURED_ERROR_AFTER = _structured_output_error_affixes()


def _structured_output_retry(message: ToolMessage) -> bool:
    """A `ToolStrategy` reply that failed to parse, answered (`handle_errors`) with LangChain's own
    error text for the model to try again: LangChain marks the message a success, yet the call
    failed (a QA pass, session 25: counted as a tool call that worked)."""
    content = message.content
    return (
        isinstance(content, str)
        and content.startswith(_STRUCTURED_ERROR_BEFORE)
        and content.endswith(_STRUCTURED_ERROR_AFTER)
        and ("structured output" in content or "structured responses" in content)
    )


def _reply_of(error: Any) -> AIMessage | None:
    """The reply a model call's error carries: a structured output that failed to parse (LangChain's
    `StructuredOutputError`) came after the model answered, and `Middleware`'s step, the call and
    its parsing, lost what the model said (a QA pass, session 25); `instrument()` kept it."""
    try:
        reply = getattr(error, "ai_message", None)
    except Exception:  # an exception class whose attributes raise: no reply to keep
        return None
    return reply if isinstance(reply, AIMessage) else None


def _run_name(kind: str, name: Any, metadata: dict[str, Any] | None, extra: dict[str, Any] | None) -> str:
    if name:
        return str(name)
    if kind in (MODEL, LLM):
        meta = metadata or {}
        return str(meta.get("ls_model_name") or (extra or {}).get("model") or meta.get("ls_provider") or kind)
    return kind


def _is_node(name: str, metadata: dict[str, Any] | None, tags: list[str] | None) -> bool:
    """A LangGraph node (or a subgraph run as one), not the runnables plumbing inside it."""
    if tags and _HIDDEN_TAG in tags:
        return False
    node = (metadata or {}).get("langgraph_node")
    return node is not None and node == name and not name.startswith("HonedMiddleware.")


def _tool_schemas(tools: Any) -> list[Any]:
    """Tools as OpenAI-format schemas (what a chat template and a fine-tuning file expect); one
    that cannot be converted is recorded by name, so capture never loses the step."""
    schemas = []
    for tool in tools:
        try:
            schemas.append(tool_schema(tool))
        except Exception:
            schemas.append({"type": "function", "function": {"name": getattr(tool, "name", repr(tool))}})
    return schemas


def _schema_name(schema: Any) -> Any:
    function = schema.get("function") if isinstance(schema, dict) else None
    return function.get("name") if isinstance(function, dict) else None


def _same(value: Any) -> Any:
    return value


_PLAIN = frozenset((str, int, float, bool, type(None)))


def _equal(a: Any, b: Any, depth: int = 0) -> bool:
    """Whether `b` would be stored as `a` is: the same types and key order, equal plain values,
    and the very same objects elsewhere (`0.0 == False`, yet they are stored differently).
    Past 32 levels (a cycle, say) the answer is no: the value is serialised anew."""
    if a is b:
        return True
    t = type(a)
    if t is not type(b) or depth > 32:
        return False
    if t in _PLAIN:
        return bool(a == b)
    if t is list or t is tuple:
        return len(a) == len(b) and all(_equal(x, y, depth + 1) for x, y in zip(a, b, strict=True))
    if t is dict:
        return len(a) == len(b) and all(
            _equal(k, j, depth + 1) and _equal(x, y, depth + 1)
            for (k, x), (j, y) in zip(a.items(), b.items(), strict=True)
        )
    return False


_TOKEN_KEYS = ("token_ids", "prompt_token_ids", "logprobs")


def _ai_message(outputs: Any) -> BaseMessage | None:
    if isinstance(outputs, AIMessage):
        return outputs
    if isinstance(outputs, LLMResult) and outputs.generations and outputs.generations[0]:
        return getattr(outputs.generations[0][0], "message", None)
    return None


def _plain(value: Any) -> Any:
    """Convert LangChain messages (anywhere at the top two levels) into role dicts."""
    if isinstance(value, BaseMessage):
        return stored_message(value)
    if isinstance(value, dict):
        return {k: _plain_inner(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain_inner(v) for v in value]
    return value


def _plain_inner(value: Any) -> Any:
    if isinstance(value, BaseMessage):
        return stored_message(value)
    if isinstance(value, list) and value and isinstance(value[0], BaseMessage | tuple):
        return [
            stored_message(v)
            if isinstance(v, BaseMessage)
            else _tuple_message(v)
            if isinstance(v, tuple)
            else v
            for v in value
        ]
    return value


def _tuple_message(value: tuple[Any, ...]) -> Any:
    if len(value) == 2 and isinstance(value[0], str):
        role = ROLES.get(value[0], value[0])
        return {"role": role, "content": value[1]}
    return list(value)


def _pushed(metadata: dict[str, Any] | None) -> bool:
    """Whether LangGraph ran this node for a `Send` (its input is the Send's payload)."""
    triggers = (metadata or {}).get("langgraph_triggers")
    return isinstance(triggers, list | tuple) and PUSH in triggers


def _ran_without_id(steps: list[dict[str, Any]], name: str | None, asked: Any) -> dict[str, Any] | None:
    """The tool step, since the last model step, of a tool `name` run on `asked` by a node that
    called it with the arguments alone (LangGraph's hand-written tool node: `tool.invoke(args)`),
    so its callback carried no call id: that call's step, not one to make up (a review, session 22:
    each call was stored twice)."""
    tools = {s["id"] for s in steps if s["kind"] == "tool"}
    parents = {s["id"]: s.get("parent_id") for s in steps}

    def in_a_tool(step: dict[str, Any]) -> bool:  # a model a tool called (a summariser) is no turn
        parent, seen = step.get("parent_id"), 0
        while parent is not None and seen < 64:
            if parent in tools:
                return True
            parent, seen = parents.get(parent), seen + 1
        return False

    since = 0
    for i in range(len(steps) - 1, -1, -1):
        if steps[i]["kind"] == "model" and not in_a_tool(steps[i]):
            since = i + 1
            break
    for step in steps[since:]:  # the earliest: two equal calls keep their order
        if (
            step["kind"] == "tool"
            and step["name"] == name
            and "tool_call_id" not in step["extra"]
            and step["input"] == asked
        ):
            return step
    return None


def _payload(inputs: Any) -> Any:
    """A `Send`'s payload as stored: `create_react_agent`'s tool node (v2) is sent its call with the
    whole state beside it, which stored in every tool node's step grew with the square of the
    conversation (a QA pass, session 28: 753 KB of one run's 60 messages); the call is what tells
    the step apart, and the state is the model steps' already."""
    if isinstance(inputs, dict) and inputs.get("__type") == "tool_call_with_context" and "state" in inputs:
        return {k: v for k, v in inputs.items() if k != "state"}
    return inputs


def _in_call_order(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Steps by index, the tool steps of one reply's calls in the order the model asked for them,
    where the first of them ran: parallel calls start in any order, and the step of a call to a
    missing tool is made from its ToolMessage once the others ran (second of three, it was stored
    last, a QA pass, session 28). A call whose tool ran other steps keeps its place. The same
    indices, handed out again in that order."""
    ordered = sorted(steps, key=lambda s: s["index"])
    parents = {s["parent_id"] for s in ordered}
    for asking in [s for s in ordered if len(s.get("tool_calls") or ()) > 1]:
        asked = [c.get("id") for c in asking["tool_calls"] if isinstance(c, dict)]
        calls = [
            s
            for s in ordered
            if s["kind"] == "tool" and s["extra"].get("tool_call_id") in asked and s["id"] not in parents
        ]
        if len(calls) < 2:
            continue
        at = ordered.index(calls[0])
        moved = set(map(id, calls))
        rest = [s for s in ordered if id(s) not in moved]
        calls.sort(key=lambda s: asked.index(s["extra"]["tool_call_id"]))
        ordered = rest[:at] + calls + rest[at:]
    indices = sorted(s["index"] for s in ordered)
    for step, index in zip(ordered, indices, strict=True):
        step["index"] = index
    return ordered


def _asked_arguments(steps: list[dict[str, Any]], tool_call_id: str) -> Any:
    """The arguments a model step asked a tool call for (a call that never reached its tool)."""
    for step in reversed(steps):
        for call in step.get("tool_calls") or ():
            if isinstance(call, dict) and call.get("id") == tool_call_id:
                return call.get("args")
    return None


_warned_labels = False


def _warn_labels(labels: Any) -> None:
    global _warned_labels
    if not _warned_labels:
        _warned_labels = True
        log.warning(
            "honed: config metadata 'honed' must be a dict of labels such as {'task_id': ...}, not %s; "
            "runs are captured without labels",
            type(labels).__name__,
        )


def _output_view(outputs: Any, keys: str | list[str] | None) -> Any:
    """A streamed graph's final state cut down to its output schema, as `invoke` returns it."""
    if keys is None or not isinstance(outputs, dict):
        return outputs
    if isinstance(keys, str):
        return outputs.get(keys)
    return {k: outputs[k] for k in keys if k in outputs}


def _final_output(outputs: Any) -> tuple[Any, dict[str, str]]:
    """The final answer: the last assistant message's text for message-based agents, plus any
    other state keys (a structured response) when there are some. Structured objects (pydantic
    models, dataclasses) become the plain JSON their schema describes; their types are returned
    beside it, by JSON path (`$` the whole output, `$.structured_response` a state key)."""
    types: dict[str, str] = {}
    if isinstance(outputs, BaseMessage):
        return text_of(outputs), types
    if isinstance(outputs, LLMResult):  # a chat model run alone (`honed serve`): its reply
        message = _ai_message(outputs)
        if message is not None:
            return text_of(message), types
        return (
            outputs.generations[0][0].text if outputs.generations and outputs.generations[0] else ""
        ), types
    if isinstance(outputs, dict) and isinstance(outputs.get("messages"), list):
        # The last reply; a `return_direct` tool's result ends the run in the model's place.
        last = next(
            (m for m in reversed(outputs["messages"]) if isinstance(m, AIMessage | ToolMessage)), None
        )
        answer = text_of(last) if last is not None else ""
        rest = {}
        private = _private_agent_state()
        for key, value in outputs.items():
            if key in _INTERNAL_STATE_KEYS or key in private:
                continue
            rest[key], type_name = _untyped(value)
            if type_name:
                types[f"$.{key}"] = type_name
        return ({"answer": answer, **rest} if rest else answer), types
    value, type_name = _untyped(outputs)
    if type_name:
        types["$"] = type_name
    elif isinstance(outputs, dict):  # `with_structured_output(..., include_raw=True)`: `parsed`
        value = {}
        for key, item in outputs.items():
            value[key], type_name = _untyped(item)
            if type_name:
                types[f"$.{key}"] = type_name
    return value, types


_private_cache: tuple[tuple[type, ...], frozenset[str]] = ((), frozenset())


def _private_agent_state() -> frozenset[str]:
    """State keys that `create_agent` middlewares declare left out of the agent's output
    (`PrivateStateAttr`, `OmitFromOutput`): honed's own trajectory id, a call limit's counters. A
    streamed run ends with every channel (LangGraph's default `output_keys`), an invoked one with
    the output schema; either way these stay out of the stored output. A key some middleware
    declares public stays, as in the agent's own output schema."""
    global _private_cache
    types = sys.modules.get("langchain.agents.middleware.types")
    if types is None:
        return frozenset()  # no create_agent agent in this process
    classes, todo = [], [types.AgentMiddleware]
    while todo:
        cls = todo.pop()
        classes.append(cls)
        todo += cls.__subclasses__()
    known = tuple(classes)
    if known == _private_cache[0]:
        return _private_cache[1]
    omitted, public = set(), set()
    for schema in {getattr(c, "state_schema", None) for c in known}:
        try:
            hints = typing.get_type_hints(schema, include_extras=True)
        except Exception:
            hints = dict(getattr(schema, "__annotations__", {}))
        for key, hint in hints.items():
            if typing.get_origin(hint) in (Required, NotRequired):
                hint = typing.get_args(hint)[0]
            meta = hint.__metadata__ if typing.get_origin(hint) is Annotated else ()
            hidden = any(isinstance(m, types.OmitFromSchema) and m.output for m in meta)
            (omitted if hidden else public).add(key)
    _private_cache = (known, frozenset(omitted - public))
    return _private_cache[1]


def _untyped(value: Any) -> tuple[Any, str | None]:
    """A pydantic model or dataclass instance as plain JSON, and its type; anything else as is."""
    if (
        isinstance(value, BaseMessage | type)
        or type(value).__module__.startswith("langchain_core.")  # LangChain's own results (LLMResult)
        or not (dataclasses.is_dataclass(value) or callable(getattr(value, "model_dump", None)))
    ):
        return _plain(value), None
    data = to_jsonable(value)
    if (
        isinstance(data, dict)
        and isinstance(data.get("__type__"), str)
        and isinstance(data.get("value"), dict)
    ):
        return data["value"], data["__type__"]
    return data, None


def _resume_value(inputs: Any) -> Any:
    """What a `Command(resume=...)` input resumes with; NO_VALUE for any other input."""
    if isinstance(inputs, Command) and inputs.resume is not None:
        return inputs.resume
    return NO_VALUE


def _thread_of(metadata: dict[str, Any] | None, extra: dict[str, Any] | None) -> str | None:
    """The LangGraph thread: LangGraph copies `configurable.thread_id` into the run metadata."""
    return _opt_str((extra or {}).get("thread_id") or (metadata or {}).get("thread_id"))


def _task_of_first_model_call(steps: list[dict[str, Any]]) -> Any:
    """A run given no input (it ran on from its checkpoint) was asked what its first model call
    read after the last reply: the task `Middleware` records from the state for the same run.
    With nothing after it (a replay or fork from a checkpoint inside a turn: a QA pass, session
    28, stored no task), the last request before it: the turn it goes on with."""
    for step in steps:
        if step["kind"] != "model":
            continue
        messages = step["input"].get("messages") if isinstance(step["input"], dict) else None
        if not isinstance(messages, list):
            return None
        new: list[Any] = []
        last: list[Any] = []
        for message in messages:
            role = message.get("role") if isinstance(message, dict) else None
            if role in ("assistant", "tool"):
                last, new = new or last, []  # the request is what came after the last reply
            elif role != "system":
                new.append(message)
        request = new or last
        return {"messages": request} if request else None
    return None


def _interrupt(value: Any) -> dict[str, Any]:
    """An `Interrupt` (or its value) as `{"value", "id"}`."""
    if isinstance(value, dict) and "value" in value:
        return {"value": value["value"], "id": value.get("id")}
    return {"value": getattr(value, "value", value), "id": getattr(value, "id", None)}


def _node_messages(outputs: dict[str, Any] | list[Any]) -> list[Any]:
    """The messages a node wrote: its update's, or (a `ToolNode` one of whose tools returned a
    `Command`) those of each update and `Command` in its list."""
    parts = outputs if isinstance(outputs, list) else [outputs]
    messages: list[Any] = []
    for part in parts:
        update = part.update if isinstance(part, Command) else part
        found = update.get("messages") if isinstance(update, dict) else None
        if isinstance(found, list):
            messages.extend(found)
    return messages


def _structured_tools_called(structured: Any, outputs: Any) -> list[dict[str, Any]]:
    if not structured:
        return []
    message = _ai_message(outputs)
    called = {c.get("name") for c in getattr(message, "tool_calls", None) or ()}
    return [t for t in structured if t.get("function", {}).get("name") in called]


def _describe_error(error: Any) -> str:
    if isinstance(error, str):
        return error
    if isinstance(error, GeneratorExit):
        return "GeneratorExit: abandoned (the caller stopped consuming the stream)"
    name = type(error).__name__
    try:
        text = str(error)
    except Exception:
        text = "<unprintable error>"
    if name == "CancelledError":
        return "CancelledError: cancelled (the task was cancelled)"
    return f"{name}: {text}" if text else name


def _opt_str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _usage(metadata: Any) -> dict[str, Any]:
    """LangChain's `usage_metadata`: the token counts and their details (`input_token_details`:
    cache reads and writes, `output_token_details`: reasoning tokens), what cost is read from."""
    usage: dict[str, Any] = {}
    for key, value in metadata.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            usage[key] = int(value)
        elif isinstance(value, dict):
            details = {
                k: int(v) for k, v in value.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
            if details:
                usage[key] = details
    return usage
