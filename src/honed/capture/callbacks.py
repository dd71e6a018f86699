"""A LangChain callback handler that captures any Runnable's runs (graphs, agents, chains).

Every method builds one event tuple and hands it to the recorder: no serialisation, no I/O,
no locks on the agent's thread. `run_inline` keeps async runs from hopping through an executor.
"""

from __future__ import annotations

import copy
import sys
import time
from types import FrameType
from typing import Any
from uuid import UUID

from langgraph.callbacks import GraphCallbackHandler

from honed.capture.events import (
    CHAIN,
    CONTENTS,
    END,
    ERROR,
    INTERRUPT,
    LLM,
    MODEL,
    NESTED_LABELS,
    START,
    TOOL,
    StreamedBeforeError,
    contents_of,
    snapshot,
    tool_answer,
)
from honed.capture.recorder import Recorder

# LangGraph's `update_state()` names the run that applies a node's writes `<graph name>UpdateState`.
_UPDATE_STATE = "UpdateState"
_MAX_ROOTS = 10_000  # roots tracked at once (one never ended, abandoned, must not grow it forever)


class CallbackHandler(GraphCallbackHandler):
    """Capture every run this handler sees into the recorder's store.

    >>> agent.invoke(inputs, config={"callbacks": [honed.CallbackHandler(store="sqlite:///honed.db")]})

    A run paused at an interrupt shows as a node ending with `GraphInterrupt`; passed in the
    config (not through `instrument()`'s hook, which LangGraph leaves out of its graph callbacks),
    the handler also hears LangGraph's `on_interrupt`, which adds the checkpoint to resume from. A
    static `interrupt_before/after` pause raises nothing a callback sees and ends the run as if it
    were done, so a graph run with breakpoints is asked at its end whether it stopped at one.
    """

    run_inline = True
    raise_error = False

    def __init__(
        self, store: Any = None, *, recorder: Recorder | None = None, **recorder_options: Any
    ) -> None:
        from honed.capture.instrument import recorder_for

        self.recorder = recorder or recorder_for(store, **recorder_options)
        self.enabled = True
        # The `honed` labels of the root runs going on (run id -> the caller's dict, and that dict's
        # id -> a root): every run inside one carries its root's dict, while a run the caller's code
        # labelled itself (an agent invoked in a request handler, in a node) carries another.
        self._root_labels: dict[UUID, Any] = {}
        self._root_label_ids: dict[int, UUID] = {}
        # Root graph runs with static breakpoints -> the `stream`/`astream` frame running them.
        self._breakpoint_runs: dict[UUID, FrameType] = {}
        # Model calls streaming now -> the text streamed so far: kept when the call fails.
        self._streamed: dict[UUID, list[str]] = {}
        # Runs of a `graph.update_state()` (an edit of the checkpoint) and the runs inside them.
        self._edits: set[UUID] = set()

    # -- chains (graphs, nodes, agents) --------------------------------------------------------

    def on_chain_start(self, serialized: dict[str, Any] | None, inputs: Any, **kwargs: Any) -> None:
        if not self.enabled:
            return
        name = kwargs.get("name") or (serialized or {}).get("name")
        if kwargs.get("parent_run_id") is None:
            if isinstance(name, str) and name.endswith(_UPDATE_STATE):
                # `graph.update_state()` running a node's writers: an edit, not an attempt; and so
                # is what runs inside it (the node's router: stored as an `ok` run named after
                # it, with the thread's labels, and judged a pass, a QA pass, session 28).
                if len(self._edits) < _MAX_ROOTS:
                    self._edits.add(kwargs["run_id"])
                return
            # A root's inputs may be reused and changed by the caller for the next turn: copy
            # them now (the labels: `_started`).
            inputs = snapshot(inputs)
            if serialized is None:  # how LangGraph starts a graph's run
                frame = _graph_stream_frame()
                keys = streamed_output_keys(frame)
                if frame is not None and _has_breakpoints(frame) and len(self._breakpoint_runs) < _MAX_ROOTS:
                    self._breakpoint_runs[kwargs["run_id"]] = frame
                self._started(CHAIN, name, inputs, keys and {"output_keys": keys}, **kwargs)
                return
        self._started(CHAIN, name, inputs, None, **kwargs)

    # -- models ----------------------------------------------------------------------------------

    def on_chat_model_start(
        self, serialized: dict[str, Any] | None, messages: list[list[Any]], **kwargs: Any
    ) -> None:
        if self.enabled:
            extra = {"tools": (kwargs.get("invocation_params") or {}).get("tools"), **_model_settings(kwargs)}
            inputs = messages[0] if messages else []
            extra[CONTENTS] = contents_of(inputs)
            self._started(MODEL, kwargs.get("name"), inputs, extra, **kwargs)

    def on_llm_start(self, serialized: dict[str, Any] | None, prompts: list[str], **kwargs: Any) -> None:
        if self.enabled:
            self._started(LLM, kwargs.get("name"), list(prompts), _model_settings(kwargs), **kwargs)

    # -- tools and retrievers ----------------------------------------------------------------------

    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.enabled:
            name = (serialized or {}).get("name") or kwargs.get("name")
            extra = {"tool_call_id": kwargs.get("tool_call_id")}
            self._started(TOOL, name, inputs if inputs is not None else input_str, extra, **kwargs)

    def on_retriever_start(self, serialized: dict[str, Any] | None, query: str, **kwargs: Any) -> None:
        if self.enabled:
            name = kwargs.get("name") or (serialized or {}).get("name") or "retriever"
            self._started(TOOL, name, {"query": query}, {}, **kwargs)

    # -- what every run emits: its start, end or error ------------------------------------------

    def _started(
        self,
        kind: str,
        name: Any,
        inputs: Any,
        extra: dict[str, Any] | None,
        /,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        if self._edits and parent_run_id in self._edits:
            self._edits.add(run_id)
            return
        labels = metadata.get("honed") if metadata else None
        if labels is not None and isinstance(labels, dict):
            if parent_run_id is None:
                if len(self._root_labels) < _MAX_ROOTS:
                    self._root_labels[run_id] = labels
                    self._root_label_ids[id(labels)] = run_id
                metadata = {**metadata, "honed": frozen_labels(labels)}  # type: ignore[dict-item]
            elif id(labels) not in self._root_label_ids:  # labels of its own: the assembler decides
                extra = {**(extra or {}), NESTED_LABELS: frozen_labels(labels)}
        step = (kind, name, inputs, metadata, tags, extra)
        self.recorder.emit((START, run_id, parent_run_id, time.time(), step))

    def _edit_ended(self, run_id: UUID) -> bool:
        """Whether `run_id` ran inside a `graph.update_state()` (nothing to emit); forgotten now."""
        if self._edits and run_id in self._edits:
            self._edits.discard(run_id)
            return True
        return False

    def _ended(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if self._edit_ended(run_id):
            return
        if self._root_labels and run_id in self._root_labels:
            self._root_ended(run_id)
        if self.enabled:
            self.recorder.emit((END, run_id, None, time.time(), outputs))

    def _failed(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        if self._edit_ended(run_id):
            return
        if self._root_labels and run_id in self._root_labels:
            self._root_ended(run_id)
        if self._breakpoint_runs:
            self._breakpoint_runs.pop(run_id, None)
        if self.enabled:
            self.recorder.emit((ERROR, run_id, None, time.time(), error))

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if self._edit_ended(run_id):
            return
        if self._root_labels and run_id in self._root_labels:
            self._root_ended(run_id)
        frame = self._breakpoint_runs.pop(run_id, None) if self._breakpoint_runs else None
        checkpoint = _breakpoint_checkpoint(frame) if frame is not None else None
        if checkpoint is not None and self.enabled:  # paused, not done: resumed by `invoke(None)`
            self.recorder.emit((INTERRUPT, run_id, None, time.time(), ([], checkpoint or None)))
        if self.enabled:  # a node's or the run's state: changed in place later, by nodes or the caller
            self.recorder.emit((END, run_id, None, time.time(), snapshot(outputs)))

    def _root_ended(self, run_id: UUID) -> None:
        labels = self._root_labels.pop(run_id, None)
        if labels is not None and self._root_label_ids.get(id(labels)) == run_id:
            self._root_label_ids.pop(id(labels), None)  # (another root on the same dict: still its)

    on_retriever_end = _ended

    def on_llm_new_token(self, token: str, *, run_id: UUID, **kwargs: Any) -> None:
        if self.enabled and token and isinstance(token, str):
            streamed = self._streamed.get(run_id)
            if streamed is None:
                if len(self._streamed) >= _MAX_ROOTS:  # calls abandoned without an end or an error
                    self._streamed.pop(next(iter(self._streamed)), None)
                streamed = self._streamed[run_id] = []
            streamed.append(token)

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if self._streamed:
            self._streamed.pop(run_id, None)
        self._ended(response, run_id=run_id, **kwargs)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """A call that fails mid-stream keeps what it streamed (a timeout after half a reply)."""
        streamed = self._streamed.pop(run_id, None) if self._streamed else None
        failed = StreamedBeforeError(error, "".join(streamed)) if streamed else error
        self._failed(failed, run_id=run_id, **kwargs)  # type: ignore[arg-type]

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._ended(tool_answer(output) if self.enabled else output, run_id=run_id, **kwargs)

    on_chain_error = on_tool_error = on_retriever_error = _failed

    # -- LangGraph lifecycle (only for a handler passed in the invocation's config) -----------------

    def on_interrupt(self, event: Any) -> None:
        if self.enabled and event.run_id is not None:
            payload = (list(event.interrupts), event.checkpoint_id)
            self.recorder.emit((INTERRUPT, event.run_id, None, time.time(), payload))


def _graph_stream_frame(depth: int = 8) -> FrameType | None:
    """The frame of the LangGraph `stream`/`astream` (`invoke` streams too) starting the run now,
    found on the caller's frames (the handler's caller's); None when it cannot tell."""
    main = sys.modules.get("langgraph.pregel.main")
    try:
        frame: FrameType | None = sys._getframe(2)
    except ValueError:
        return None
    for _ in range(depth):
        if frame is None or main is None:
            return None
        if frame.f_code.co_name in ("stream", "astream") and isinstance(
            frame.f_locals.get("self"), main.Pregel
        ):
            return frame
        frame = frame.f_back
    return None


def streamed_output_keys(frame: FrameType | None) -> str | list[str] | None:
    """The graph's output channels when the LangGraph run starting in `frame` was *streamed*: its
    end event then carries every channel (LangGraph streams `stream_channels`), where an invoked
    run carries the output schema's. The stored output must be the same either way (a verifier
    reads it), so the root's end is cut down to these. None when invoked, or when it cannot tell."""
    if frame is None:
        return None
    local = frame.f_locals
    graph, streamed = local.get("self"), local.get("output_keys")
    wanted = graph.output_channels
    same = wanted == streamed or (not isinstance(wanted, str) and list(wanted) == list(streamed or ()))
    return None if same else (wanted if isinstance(wanted, str) else list(wanted))


def _has_breakpoints(frame: FrameType) -> bool:
    """Whether the graph run starting in `frame` has static breakpoints (its own or the call's)."""
    local = frame.f_locals
    return bool(local.get("interrupt_before_") or local.get("interrupt_after_"))


def _breakpoint_checkpoint(frame: FrameType) -> str | None:
    """The checkpoint a graph run ending now in `frame` paused at, when its loop stopped at a
    static breakpoint ("" when it has no id); None when it ran to its end. The loop says which
    (`status`); LangGraph tells only handlers in the invocation's config (`on_interrupt`). An
    `interrupt_after` its last node reached has nothing left to resume: the run is done."""
    try:
        loop = frame.f_locals.get("loop")
        if getattr(loop, "status", None) not in ("interrupt_before", "interrupt_after"):
            return None
        if not getattr(loop, "tasks", None):
            return None
        checkpoint = getattr(loop, "checkpoint", None)
        found = checkpoint.get("id") if isinstance(checkpoint, dict) else None
        return str(found) if found else ""
    except Exception:  # a LangGraph whose loop reads otherwise: the run is stored as it ended
        return None


def frozen_labels(labels: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a run's `honed` metadata (its task id, split, expected answer), taken as the
    run starts: the agent's own code can reach the config (`get_config()`) and edit the lists and
    dicts inside it in place before the writer reads them, so it would decide its own label."""
    try:
        return copy.deepcopy(labels)
    except Exception:  # an object that cannot be copied: its JSON (or text) is what is stored anyway
        from honed.capture.serialize import to_jsonable

        return to_jsonable(labels)  # never raises (a `repr` that raises too: a QA pass, session 20)


def _model_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A model call's settings and model name, from what LangChain passes (`invocation_params`, else
    its tracing metadata's `ls_model_name`: a custom chat model whose replies name no model, a QA pass,
    session 28)."""
    params = kwargs.get("invocation_params") or {}
    traced = kwargs.get("metadata") or {}
    return {
        "settings": params,
        "model": params.get("model") or params.get("model_name") or traced.get("ls_model_name"),
    }
