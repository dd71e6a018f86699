"""A LangChain callback handler that captures any Runnable's runs (graphs, agents, chains).

Every method builds one event tuple and hands it to the recorder: no serialisation, no I/O,
no locks on the agent's thread. `run_inline` keeps async runs from hopping through an executor.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from langgraph.callbacks import GraphCallbackHandler

from honed.capture.assembler import CHAIN, END, ERROR, INTERRUPT, LLM, MODEL, START, TOOL
from honed.capture.recorder import Recorder


class CallbackHandler(GraphCallbackHandler):
    """Capture every run this handler sees into the recorder's store.

    >>> agent.invoke(inputs, config={"callbacks": [honed.CallbackHandler(store="sqlite:///honed.db")]})

    A run paused at an interrupt shows as a node ending with `GraphInterrupt`; passed in the
    config (not through `instrument()`'s hook, which LangGraph leaves out of its graph callbacks),
    the handler also hears LangGraph's `on_interrupt`, which adds static `interrupt_before/after`
    pauses and the checkpoint to resume from.
    """

    run_inline = True
    raise_error = False

    def __init__(
        self, store: Any = None, *, recorder: Recorder | None = None, **recorder_options: Any
    ) -> None:
        from honed.capture.instrument import recorder_for

        self.recorder = recorder or recorder_for(store, **recorder_options)
        self.enabled = True

    # -- chains (graphs, nodes, agents) --------------------------------------------------------

    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self.enabled:
            return
        name = kwargs.get("name") or (serialized or {}).get("name")
        if parent_run_id is None:
            # A root's config may be reused and mutated by the caller for the next task: copy
            # the small parts we keep (inputs' top level, honed metadata) now.
            inputs = dict(inputs) if isinstance(inputs, dict) else inputs
            if metadata and isinstance(metadata.get("honed"), dict):
                metadata = {**metadata, "honed": dict(metadata["honed"])}
        self.recorder.emit(
            (START, run_id, parent_run_id, time.time(), (CHAIN, name, inputs, metadata, tags, None))
        )

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if self.enabled:
            self.recorder.emit((END, run_id, None, time.time(), outputs))

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        if self.enabled:
            self.recorder.emit((ERROR, run_id, None, time.time(), error))

    # -- models ----------------------------------------------------------------------------------

    def on_chat_model_start(
        self,
        serialized: dict[str, Any] | None,
        messages: list[list[Any]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self.enabled:
            return
        params = kwargs.get("invocation_params") or {}
        extra = {
            "tools": params.get("tools"),
            "settings": params,
            "model": params.get("model") or params.get("model_name"),
        }
        self.recorder.emit(
            (
                START,
                run_id,
                parent_run_id,
                time.time(),
                (MODEL, kwargs.get("name"), messages[0] if messages else [], metadata, tags, extra),
            )
        )

    def on_llm_start(
        self,
        serialized: dict[str, Any] | None,
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self.enabled:
            return
        params = kwargs.get("invocation_params") or {}
        extra = {"settings": params, "model": params.get("model") or params.get("model_name")}
        self.recorder.emit(
            (
                START,
                run_id,
                parent_run_id,
                time.time(),
                (LLM, kwargs.get("name"), list(prompts), metadata, tags, extra),
            )
        )

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if self.enabled:
            self.recorder.emit((END, run_id, None, time.time(), response))

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        if self.enabled:
            self.recorder.emit((ERROR, run_id, None, time.time(), error))

    # -- tools and retrievers ----------------------------------------------------------------------

    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self.enabled:
            return
        name = (serialized or {}).get("name") or kwargs.get("name")
        extra = {"tool_call_id": kwargs.get("tool_call_id")}
        self.recorder.emit(
            (
                START,
                run_id,
                parent_run_id,
                time.time(),
                (TOOL, name, inputs if inputs is not None else input_str, metadata, tags, extra),
            )
        )

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if self.enabled:
            self.recorder.emit((END, run_id, None, time.time(), output))

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        if self.enabled:
            self.recorder.emit((ERROR, run_id, None, time.time(), error))

    def on_retriever_start(
        self,
        serialized: dict[str, Any] | None,
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self.enabled:
            return
        name = kwargs.get("name") or (serialized or {}).get("name") or "retriever"
        self.recorder.emit(
            (START, run_id, parent_run_id, time.time(), (TOOL, name, {"query": query}, metadata, tags, {}))
        )

    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if self.enabled:
            self.recorder.emit((END, run_id, None, time.time(), documents))

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        if self.enabled:
            self.recorder.emit((ERROR, run_id, None, time.time(), error))

    # -- LangGraph lifecycle (only for a handler passed in the invocation's config) -----------------

    def on_interrupt(self, event: Any) -> None:
        if self.enabled and event.run_id is not None:
            payload = (list(event.interrupts), event.checkpoint_id)
            self.recorder.emit((INTERRUPT, event.run_id, None, time.time(), payload))
