"""What honed sees of the top-level run in progress: its run id, thread, input, and how it ended.

`honed.Middleware` lives inside the agent's graph, so two things escape it: what the caller passed
in (its hooks see the state, the conversation's history included) and a pause at an interrupt
(the graph returns to the caller, and no `after_agent` hook runs). A callback handler registered
process-wide, the way `instrument()` registers its own, watches only root runs and their direct
children and tells the middleware. LangGraph's own `GraphCallbackHandler.on_interrupt` would say
it directly, but it only reaches handlers passed in the invocation's config, never a configure
hook's: a node of the root that ends with `GraphInterrupt` is how the pause shows instead. A third:
an agent's turn that a hook of another middleware ends by handing the conversation on
(`Command(goto=..., graph=Command.PARENT)`), which honed's hooks never see; the `ParentCommand` it
raises, on its way up to the graph that takes it, is how that shows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langgraph.errors import GraphInterrupt, ParentCommand
from langgraph.types import Command

from honed.capture.events import snapshot

log = logging.getLogger("honed")

_current: ContextVar[RootRun | None] = ContextVar("honed_root_run", default=None)
_registered = False
_register_lock = threading.Lock()


class RootRun:
    """One top-level run: `inputs` as the caller gave them, the interrupts its nodes raised, the
    graphs inside it that handed the conversation on, and callbacks to call when it ends (with the
    exception it ended with, or None)."""

    __slots__ = (
        "_on_end",
        "forked",
        "handoffs",
        "inputs",
        "interrupts",
        "labels",
        "outputs",
        "run_id",
        "thread_id",
    )

    def __init__(
        self, run_id: UUID, thread_id: str | None, inputs: Any, *, forked: bool = False, labels: Any = None
    ) -> None:
        self.run_id = run_id
        self.thread_id = thread_id
        self.inputs = inputs
        self.forked = forked  # run from a checkpoint the caller named: a replay or fork
        self.labels = labels  # the `honed` metadata it was given: what runs inside it inherit
        self.outputs: Any = None
        self.interrupts: list[Any] = []
        # The checkpoint namespace of a graph that handed the conversation to its parent graph ->
        # (the `Command`, when): its first `ParentCommand` on the way up, by whatever raised it.
        self.handoffs: dict[str, tuple[Command, float]] = {}
        self._on_end: list[Callable[[RootRun, BaseException | None], None]] = []

    def on_end(
        self, callback: Callable[[RootRun, BaseException | None], None], *, first: bool = False
    ) -> None:
        """Call `callback` when the run ends; `first`: before those registered so far."""
        if first:
            self._on_end.insert(0, callback)
        else:
            self._on_end.append(callback)


def current_root() -> RootRun | None:
    """The root run this code executes under (nodes and tools copy their caller's context)."""
    return _current.get()


def watch_roots() -> None:
    """Start watching root runs in this process (once; there is no way to unregister a hook)."""
    global _registered
    with _register_lock:
        if _registered:
            return
        from langchain_core.tracers.context import register_configure_hook

        # The ContextVar's *default* is what new threads and asyncio tasks see.
        register_configure_hook(ContextVar("honed_roots", default=RootWatcher()), inheritable=True)  # noqa: B039
        _registered = True


class RootWatcher(BaseCallbackHandler):
    """Sees every chain start, end and error in the process and keeps only what concerns roots:
    a dict lookup per event, no I/O. Models, tools and retrievers are never sent to it."""

    run_inline = True
    raise_error = False
    ignore_llm = ignore_chat_model = ignore_retriever = ignore_agent = True
    ignore_retry = ignore_custom_event = True

    def __init__(self) -> None:
        self._roots: dict[UUID, RootRun] = {}

    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if parent_run_id is not None:
            return
        thread = (metadata or {}).get("thread_id")
        forked = bool((metadata or {}).get("checkpoint_id"))
        labels = (metadata or {}).get("honed")
        root = RootRun(run_id, None if thread is None else str(thread), inputs, forked=forked, labels=labels)
        self._roots[run_id] = root
        _current.set(root)  # in the caller's context: every node and tool of the run copies it

    def on_chain_end(
        self, outputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        if parent_run_id is None:
            root = self._roots.get(run_id)
            if root is not None:
                root.outputs = snapshot(outputs)  # the caller may change the state it gets back
            self._ended(run_id, None)

    def on_chain_error(
        self, error: BaseException, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        if parent_run_id is None:
            self._ended(run_id, error)
            return
        if isinstance(error, ParentCommand):
            _handed_on(error)
        root = self._roots.get(parent_run_id)
        if root is not None and isinstance(error, GraphInterrupt):
            root.interrupts.extend(error.args[0] if error.args else ())

    def _ended(self, run_id: UUID, error: BaseException | None) -> None:
        root = self._roots.pop(run_id, None)
        if root is None:
            return
        if _current.get() is root:
            _current.set(None)
        for callback in root._on_end:
            try:
                callback(root, error)
            except Exception:
                log.exception("honed: could not finish a capture at the end of its run")


def _handed_on(error: ParentCommand) -> None:
    """Note a handoff on the root it happens under. LangGraph rewrites the `Command`'s `graph` from
    `Command.PARENT` to the namespace of the graph that hands on before raising it further, so the
    namespace names the agent whose turn it ends (`honed.Middleware` knows its own)."""
    root = _current.get()
    command = error.args[0] if error.args else None
    if root is None or not isinstance(command, Command) or not isinstance(command.graph, str):
        return
    if command.graph != Command.PARENT:
        root.handoffs.setdefault(command.graph, (command, time.time()))
