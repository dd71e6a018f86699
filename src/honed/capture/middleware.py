"""`honed.Middleware`: capture for `create_agent` agents, with nothing else to configure.

It records each model call (the exact request: messages, system prompt, tools) and each tool
call from inside the agent loop. Which entry point captures a run when several see it: an explicit
store wins over `instrument()`'s (which then drops the run), and a middleware with no store of its
own stands aside for any honed handler that already sees the run, so nothing is recorded twice.

A run that pauses at an interrupt (human in the loop) is written as `interrupted`; the trajectory
id lives in the agent's checkpointed state, so resuming it, in this process or another, continues
the same trajectory (`honed.capture.roots` tells the middleware when the graph paused).
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Annotated, Any, NotRequired

from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ToolCallRequest
from langchain.agents.middleware.types import PrivateStateAttr
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tracers.context import register_configure_hook
from langchain_core.utils.uuid import uuid7
from langgraph.errors import GraphBubbleUp
from langgraph.types import Command

from honed.capture.callbacks import frozen_labels
from honed.capture.events import (
    CHAIN,
    CONTENTS,
    DISCARD,
    END,
    ERROR,
    INTERRUPT,
    MODEL,
    NO_VALUE,
    PENDING_ERROR,
    RESUME,
    START,
    TASK_LABELS,
    TOOL,
    ModelRanAs,
    NotRun,
    NotTheAnswer,
    RanAs,
    contents_of,
    inherited_labels,
    snapshot,
    tool_answer,
)
from honed.capture.recorder import Recorder, _flush_on_sigterm
from honed.capture.roots import RootRun, current_root, watch_roots
from honed.store import TrajectoryStore
from honed.trajectory import HANDOFF_KEY

log = logging.getLogger("honed")

# The tool step a subagent is running inside, so its steps nest in the caller's trajectory.
_enclosing_tool_step: ContextVar[str | None] = ContextVar("honed_enclosing_tool_step", default=None)


class _ToolRan(BaseCallbackHandler):
    """What a tool call ran as. A middleware further in may change the call this one saw (a
    reviewer's `edit` decision of `HumanInTheLoopMiddleware`), so the tool's own start, with the
    id of the call, says what ran: name and arguments (LangChain leaves injected ones out)."""

    run_inline = True  # called on the tool's thread, in order, also from async tools

    def __init__(self, call_id: Any) -> None:
        self.call_id = call_id
        self.name: str | None = None
        self.args: Any = None

    def on_tool_start(self, serialized: Any, input_str: str, *, inputs: Any = None, **kwargs: Any) -> None:
        if self.name is None and self.call_id is not None and kwargs.get("tool_call_id") == self.call_id:
            self.name = (serialized or {}).get("name")
            self.args = inputs


_tool_ran: ContextVar[_ToolRan | None] = ContextVar("honed_tool_ran", default=None)
register_configure_hook(_tool_ran, inheritable=True)  # the tool's callback manager adds it


class _ModelRan(BaseCallbackHandler):
    """What a model call ran as. Middlewares further in may change the request this one saw (a
    dynamic system prompt, narrowed tools, a fallback model), call other models first (a tool
    selector) or answer for a model that failed (`ModelRetryMiddleware(on_failure="continue")`
    makes up a reply): the chat models' own starts and ends inside the call say what ran, and
    whether any model answered at all."""

    run_inline = True

    def __init__(self) -> None:
        self.starts: dict[Any, tuple[list[Any], Any, str | None]] = {}
        self.answered: tuple[list[Any], Any, str | None] | None = None  # the last model that answered
        self.error: BaseException | None = None  # the last model error, if no model answered after it
        # Each answer with the call that gave it: a middleware that calls the model twice and
        # returns the first reply (best of n, a draft then a check) paired the first reply with
        # the second request (a QA pass, session 27).
        self.replies: list[tuple[Any, tuple[list[Any], Any, str | None]]] = []

    def on_chat_model_start(self, serialized: Any, messages: list[list[Any]], **kwargs: Any) -> None:
        params = kwargs.get("invocation_params") or {}
        meta = kwargs.get("metadata") or {}
        name = meta.get("ls_model_name") or params.get("model") or params.get("model_name")
        tools = params.get("tools")
        self.starts[kwargs.get("run_id")] = (
            list(messages[0]) if messages else [],
            tools if isinstance(tools, list) and tools else None,
            name if isinstance(name, str) else None,
        )

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        start = self.starts.pop(kwargs.get("run_id"), None)
        if start is not None:
            self.answered, self.error = start, None
            try:
                reply = response.generations[0][0].message
            except (AttributeError, IndexError, TypeError):
                reply = None
            if reply is not None and len(self.replies) < 16:
                self.replies.append((reply, start))

    def call_of(self, reply: Any) -> tuple[list[Any], Any, str | None] | None:
        """The call whose answer `reply` is, else the last that answered."""
        for answer, start in reversed(self.replies):
            if answer is reply:
                return start
        return self.answered

    def on_llm_error(self, error: BaseException, **kwargs: Any) -> None:
        if self.starts.pop(kwargs.get("run_id"), None) is not None:
            self.error = error


_model_ran: ContextVar[_ModelRan | None] = ContextVar("honed_model_ran", default=None)
register_configure_hook(_model_ran, inheritable=True)  # the chat model's callback manager adds it


class _Live:
    """A trajectory (or a subagent's node step) a middleware has open in this process."""

    __slots__ = (
        "ended_at",
        "failed",
        "final",
        "namespace",
        "owner",
        "root",
        "root_graph",
        "root_task",
        "whole",
    )

    def __init__(
        self,
        root: RootRun | None,
        whole: bool,
        root_graph: bool,
        owner: int = 0,
        root_task: bool = False,
        namespace: str = "",
    ) -> None:
        self.root = root  # the root run it is open under
        self.whole = whole  # a trajectory, not a subagent's step inside one
        self.root_graph = root_graph  # this agent is the root run: its output is the run's output
        self.owner = owner  # id() of the middleware that opened it
        # A turn inside the root run, with the root's task labels: the run's answer, or one step
        # towards it (a pipeline's researcher), which the root's end tells apart.
        self.root_task = root_task
        self.final: dict[str, Any] | None = None  # the state its end hook saw
        # When its turn ended (its end hook, or a tool handing the conversation on), its END
        # waiting for the root's end.
        self.ended_at: float | None = None
        self.failed: BaseException | None = None  # one of its own calls raised (not a later agent's)
        # Its graph's checkpoint namespace ("" for a root graph): a handoff another middleware's
        # hook makes names it (`RootRun.handoffs`).
        self.namespace = namespace


# A hook that finds its trajectory missing here, or open under another root run, belongs to a run
# resumed from a checkpoint (after an interrupt, in this process or another).
_live: dict[str, _Live] = {}
# A subagent's node step from before a pause -> the step it continues in after the resume.
_renamed: dict[str, str] = {}
# (root run, the trajectory id a replayed checkpoint carries) -> the replay's own trajectory.
_replayed: dict[tuple[Any, str], str] = {}
_live_lock = threading.Lock()
_MAX_RENAMED = 10_000


class HonedState(AgentState):
    # Checkpointed (not UntrackedValue): a run resumed after an interrupt continues its trajectory.
    honed_trajectory: NotRequired[Annotated[str, PrivateStateAttr]]


class Middleware(AgentMiddleware):
    """Capture this agent's runs into `store` (default: the instrumented store, else `HONED_STORE`).

    >>> agent = create_agent(model, tools, middleware=[honed.Middleware(store="sqlite:///honed.db")])
    """

    state_schema = HonedState

    def __init__(
        self,
        store: str | TrajectoryStore | None = None,
        *,
        agent: str | None = None,
        recorder: Recorder | None = None,
        **recorder_options: Any,
    ) -> None:
        super().__init__()
        _flush_on_sigterm()  # here, on the main thread: its recorder comes later, on a worker's
        self._store = store
        self._agent = agent
        self._recorder = recorder
        self._options = recorder_options
        self._structured_tools: tuple[Any, Any] = (None, None)
        watch_roots()

    @property
    def name(self) -> str:
        return "HonedMiddleware"

    @property
    def explicit(self) -> bool:
        """Whether this middleware was given its own store (or recorder, or recorder options)."""
        return self._store is not None or self._recorder is not None or bool(self._options)

    @property
    def recorder(self) -> Recorder:
        if self._recorder is None:
            from honed.capture.instrument import instrumented_handler, recorder_for

            handler = instrumented_handler()
            if not self.explicit and handler is not None:
                self._recorder = handler.recorder
            else:
                self._recorder = recorder_for(self._store, **self._options)
        return self._recorder

    # -- agent boundaries ----------------------------------------------------------------------

    def before_agent(self, state: HonedState, runtime: Any) -> dict[str, Any] | None:
        return self._open(state, runtime)

    async def abefore_agent(self, state: HonedState, runtime: Any) -> dict[str, Any] | None:
        return self._open(state, runtime)

    def after_agent(self, state: HonedState, runtime: Any) -> dict[str, Any] | None:
        self._close(state)
        return None

    async def aafter_agent(self, state: HonedState, runtime: Any) -> dict[str, Any] | None:
        self._close(state)
        return None

    def _open(self, state: HonedState, runtime: Any) -> dict[str, Any]:
        try:
            return self._open_trajectory(state, runtime)
        except Exception:
            log.exception("honed: could not start capturing this run; the agent goes on uncaptured")
            return {"honed_trajectory": ""}

    def _open_trajectory(self, state: HonedState, runtime: Any) -> dict[str, Any]:
        config = _current_config()
        if not self._claims_run(config):
            return {"honed_trajectory": ""}
        trajectory_id = str(uuid7())
        metadata = dict(config.get("metadata") or {})
        if isinstance(metadata.get("honed"), dict):
            metadata["honed"] = frozen_labels(metadata["honed"])
        name = self._agent_name(config)
        parent = _enclosing_tool_step.get()
        root = current_root()
        extra: dict[str, Any] | None = None
        root_graph = root_task = False
        if parent is not None:  # a subagent: one node step inside the caller's trajectory
            metadata = {"langgraph_node": name}
            inputs: Any = {"messages": list(state.get("messages", []))}
        else:
            asked_this = _root_asked_this(root, state)
            root_graph = _is_root_graph(root, config) and asked_this
            if root is not None and root_graph and root.inputs is not None:
                inputs = snapshot(root.inputs)
            else:  # inside another run, or `update_state(...)` then `invoke(None)`: what the state asks
                inputs = _new_messages(state)
            extra = _checkpoint_of(runtime, config)
            labels = metadata.get("honed")
            # Asked something else than the run it is inside (a `Send` worker), with that run's
            # labels: not that run's task (a team handing the request on keeps it).
            roots = root is not None and isinstance(labels, dict) and labels == root.labels
            if not asked_this and roots:
                metadata["honed"] = inherited_labels(labels)  # type: ignore[arg-type]
            root_task = (
                roots
                and asked_this
                and not root_graph
                and any(labels.get(k) is not None for k in TASK_LABELS)  # type: ignore[union-attr]
            )
        self.recorder.emit(
            (
                START,
                trajectory_id,
                parent,
                time.time(),
                (CHAIN, name, inputs, metadata, config.get("tags"), extra),
            )
        )
        live = _Live(root, parent is None, root_graph, id(self), root_task, _graph_namespace(config))
        self._track(trajectory_id, live)
        return {"honed_trajectory": trajectory_id}

    def _close(self, state: HonedState) -> None:
        trajectory_id = self._trajectory(state)
        if not trajectory_id:
            return
        outputs = snapshot({k: v for k, v in state.items() if k != "honed_trajectory"})
        with _live_lock:
            live = _live.get(trajectory_id)
            if live is not None and live.root_graph and live.root is current_root():
                # The agent is the root run: end with the run's own output (its output schema
                # leaves out other middlewares' private state), when the root run ends.
                live.final = outputs
                return
            if live is not None and live.root_task and live.root is current_root():
                # A turn with the run's task: the run's answer, or not, is known at its end.
                live.final, live.ended_at = outputs, time.time()
                return
            _live.pop(trajectory_id, None)
        self.recorder.emit((END, trajectory_id, None, time.time(), outputs))

    def _trajectory(self, state: Any) -> str | None:
        """The trajectory a hook's steps belong to; reopened when the run resumed from a
        checkpoint (after an interrupt, here or in another process)."""
        stored = state.get("honed_trajectory") if isinstance(state, dict) else None
        if not stored:
            return None
        trajectory_id = _current_id(stored)
        root = current_root()
        if root is not None:
            trajectory_id = _replayed.get((root.run_id, trajectory_id), trajectory_id)
        live = _live.get(trajectory_id)
        if live is not None and live.root is root:
            return trajectory_id
        if root is not None and _enclosing_tool_step.get() is None:
            # This run's trajectory is open already, yet its state names another: a tool rewrote
            # the private key (`Command(update={"honed_trajectory": ...})`), which split the run
            # into a paused one holding its tool calls and a new one holding its answer. In this
            # graph only: the same agent paused in parallel (`Send` workers, two branches) and
            # resumed by one call reopens each worker's own trajectory (a QA pass, session 25:
            # the second worker's steps went into the first's).
            namespace = _graph_namespace(_current_config())
            opened = [
                key
                for key, other in list(_live.items())
                if other.root is root
                and other.whole
                and other.owner == id(self)
                and other.namespace == namespace
            ]
            if opened:
                return opened[0] if len(opened) == 1 else None
        try:
            return self._reopen(trajectory_id, root)
        except Exception:
            log.exception("honed: could not continue capturing a resumed run; the agent goes on")
            return None

    def _reopen(self, trajectory_id: str, root: RootRun | None) -> str | None:
        with _live_lock:
            live = _live.get(trajectory_id)
            if live is not None and live.root is root:
                return trajectory_id  # another hook of this run got here first
            config = _current_config()
            if not self._claims_run(config):
                return None
            name, now = self._agent_name(config), time.time()
            parent = _enclosing_tool_step.get()
            if parent is not None:
                # A subagent resumed inside its caller's re-run tool call: a new node step there.
                step_id = str(uuid7())
                if len(_renamed) >= _MAX_RENAMED:
                    _renamed.clear()
                _renamed[trajectory_id] = step_id
                payload = (CHAIN, name, {"messages": []}, {"langgraph_node": name}, None, None)
                self.recorder.emit((START, step_id, parent, now, payload))
                self._track(step_id, _Live(root, False, False), locked=True)
                return step_id
            resume = root.inputs.resume if root is not None and isinstance(root.inputs, Command) else NO_VALUE
            if root is not None and resume is NO_VALUE and root.inputs is None and not root.forked:
                resume = None  # `invoke(None, config)`: LangGraph's way on past a static breakpoint
            if root is not None and resume is NO_VALUE:
                # Not a resume: a replay or fork from an earlier checkpoint (`invoke(None, config)`
                # with a `checkpoint_id`) is a run of its own, under its own labels.
                return self._replay(trajectory_id, root, config)
            metadata = dict(config.get("metadata") or {})
            if isinstance(metadata.get("honed"), dict):
                metadata["honed"] = frozen_labels(metadata["honed"])
            extra = {"thread_id": root.thread_id if root is not None else None}
            self.recorder.emit((RESUME, trajectory_id, None, now, (name, resume, metadata, extra)))
            live = _Live(
                root, True, _is_root_graph(root, config), id(self), namespace=_graph_namespace(config)
            )
            self._track(trajectory_id, live, locked=True)
            return trajectory_id

    def _replay(self, old_id: str, root: RootRun, config: dict[str, Any]) -> str:
        """A new trajectory for a run replayed from a checkpoint taken inside `old_id` (whose id
        the checkpointed state still carries: later hooks of this run map it to the new one)."""
        trajectory_id = str(uuid7())
        metadata = dict(config.get("metadata") or {})
        if isinstance(metadata.get("honed"), dict):
            metadata["honed"] = frozen_labels(metadata["honed"])
        extra = {"thread_id": root.thread_id, "replayed_from": old_id}
        payload = (CHAIN, self._agent_name(config), root.inputs, metadata, config.get("tags"), extra)
        self.recorder.emit((START, trajectory_id, None, time.time(), payload))
        key = (root.run_id, old_id)
        _replayed[key] = trajectory_id
        root.on_end(lambda run, error: _replayed.pop(key, None))
        self._track(
            trajectory_id, _Live(root, True, False, id(self), namespace=_graph_namespace(config)), locked=True
        )
        return trajectory_id

    def _track(self, trajectory_id: str, live: _Live, *, locked: bool = False) -> None:
        if locked:
            _live[trajectory_id] = live
        else:
            with _live_lock:
                _live[trajectory_id] = live
        if live.root is not None:
            # A subagent's step closes before the trajectory it is a step of.
            live.root.on_end(
                lambda run, error: self._root_ended(trajectory_id, live, run, error), first=not live.whole
            )

    def _root_ended(
        self, trajectory_id: str, live: _Live, root: RootRun, error: BaseException | None
    ) -> None:
        """The root run is over. If the agent's end hook never ran, the graph stopped with the
        agent inside it: paused at an interrupt, or ended by an error the agent never saw."""
        with _live_lock:
            if _live.get(trajectory_id) is not live:
                return  # closed already, or reopened under a later run
            del _live[trajectory_id]
        now = time.time()
        if not live.whole:
            # A subagent's step, still open: the run paused inside it (its resume runs the
            # subagent again, as a step of its own). Left open, it read as a failure.
            if live.final is not None:
                return
            if error is None and live.failed is not None and not root.interrupts:
                # Its own call raised and the code around it went on (a tool caught the error):
                # the step failed, it did not pause (a QA pass, session 25: no error shown).
                self.recorder.emit((ERROR, trajectory_id, None, now, live.failed))
            elif error is None or isinstance(error, GraphBubbleUp):
                self.recorder.emit((END, trajectory_id, None, now, None))
            else:
                # The run failed with the subagent inside it: its step failed with what raised,
                # not "incomplete" (a QA pass, session 25).
                self.recorder.emit((ERROR, trajectory_id, None, now, live.failed or error))
            return
        if (
            live.ended_at is None
            and live.final is None
            and live.namespace
            and live.namespace in root.handoffs
        ):
            self._hook_handed_on(trajectory_id, live, *root.handoffs[live.namespace])
        if (
            live.ended_at is not None
            and live.final is not None
            and HANDOFF_KEY in live.final
            and live.failed is not None
            and (error is not None and not isinstance(error, GraphBubbleUp))
        ):
            # A handoff beside a call that crashed the run: the turn failed (a review, session 23).
            self.recorder.emit((ERROR, trajectory_id, None, now, error))
        elif live.ended_at is not None:
            final: Any = live.final
            if (
                live.root_task
                and isinstance(final, dict)
                and HANDOFF_KEY not in final
                and not _gives_the_answer(final, root.outputs if error is None else None)
            ):
                final = NotTheAnswer(final)
            self.recorder.emit((END, trajectory_id, None, live.ended_at, final))
        elif live.final is not None:
            # The graph's own output (its output schema leaves out other middlewares' private
            # state): a part of the state. A root that wraps the agent (`agent | RunnableLambda`,
            # an `@chain`) returned something else, which is not the agent's answer.
            own = (
                error is None
                and isinstance(root.outputs, dict)
                and isinstance(live.final, dict)
                and root.outputs.keys() <= live.final.keys()
            )
            outputs = root.outputs if own else live.final
            self.recorder.emit((END, trajectory_id, None, now, outputs))
        elif error is None and live.failed is not None and not root.interrupts:
            # A call of its own raised and the agent stopped there, and the code around it went on
            # (a supervisor's tool caught its subagent's error): a failure, not a pause for a
            # human (a QA pass, session 25: stored `interrupted`, waiting forever, never judged).
            self.recorder.emit((ERROR, trajectory_id, None, now, live.failed))
        elif error is None or isinstance(error, GraphBubbleUp):
            self.recorder.emit((INTERRUPT, trajectory_id, None, now, (list(root.interrupts), None)))
            self.recorder.emit((END, trajectory_id, None, now, None))
        else:
            self.recorder.emit((ERROR, trajectory_id, None, now, error))

    def _hook_handed_on(self, trajectory_id: str, live: _Live, command: Command, when: float) -> None:
        """The agent's turn ended with a handoff no tool made: another middleware's hook returned
        a `Command` to the parent graph (a router after the model). Its end hook never ran, as for
        a pause, yet nothing waits to resume: it ends as a tool's handoff does, with a step that
        says where it went (`Trajectory.handed_off_to` reads it)."""
        goto = command.goto
        step_id = str(uuid7())
        handoff = {"synthesised": True, "handoff": goto[:200] if isinstance(goto, str) else None}
        payload = (CHAIN, "handoff", None, {"langgraph_node": "handoff"}, None, handoff)
        self.recorder.emit((START, step_id, trajectory_id, when, payload))
        self.recorder.emit((END, step_id, None, when, command))
        live.final, live.ended_at = {HANDOFF_KEY: goto}, when

    def _claims_run(self, config: dict[str, Any]) -> bool:
        """Whether this middleware captures the run. A honed handler may already see it: a
        middleware without a store of its own leaves it to the handler; one with its own store
        captures it there, and `instrument()` (the process-wide default) drops its copy."""
        handlers = _honed_handlers(config)
        if not handlers:
            return True
        if not self.explicit:
            return False
        mine = self.recorder.store_url
        if any(h.recorder.store_url == mine for h in handlers):
            return False  # the same store captures it already
        from honed.capture.instrument import instrumented_handler

        instrumented = instrumented_handler()
        run_id = getattr(config.get("callbacks"), "parent_run_id", None)
        if "|" in str((config.get("configurable") or {}).get("checkpoint_ns") or ""):
            # A graph inside another's node: the run `instrument()` holds is the outer one, which
            # stays there whole; this agent's own run goes to this store besides.
            return True
        for handler in handlers:
            if handler is instrumented and run_id is not None:
                handler.recorder.emit((DISCARD, run_id, None, time.time(), None))
        return True

    def _agent_name(self, config: dict[str, Any]) -> str:
        metadata = config.get("metadata") or {}
        # An unnamed `create_agent` graph is "LangGraph" (its default name), as `instrument()` stores it.
        return str(self._agent or metadata.get("lc_agent_name") or "LangGraph")

    # -- model calls -----------------------------------------------------------------------------

    # The wrap hooks run once per model or tool call, so they handle a failure with a plain
    # try/except (a context manager costs more than the rest of the hook).

    def wrap_model_call(self, request: ModelRequest, handler: Any) -> Any:
        step = self._step_start(request, self._emit_model_start, "model")
        if step is None:
            return handler(request)
        # Nothing between this and the model: what it saw is what ran, no watch needed.
        ran = None if _calls_the_model(handler) else _ModelRan()
        token = _model_ran.set(ran) if ran is not None else None
        try:
            response = handler(request)
        except BaseException as exc:
            self._failed(*step, exc)
            raise
        finally:
            if token is not None:
                _model_ran.reset(token)
        self._model_done(*step, request, response, ran)
        return response

    async def awrap_model_call(self, request: ModelRequest, handler: Any) -> Any:
        step = self._step_start(request, self._emit_model_start, "model")
        if step is None:
            return await handler(request)
        # Nothing between this and the model: what it saw is what ran, no watch needed.
        ran = None if _calls_the_model(handler) else _ModelRan()
        token = _model_ran.set(ran) if ran is not None else None
        try:
            response = await handler(request)
        except BaseException as exc:
            self._failed(*step, exc)
            raise
        finally:
            if token is not None:
                _model_ran.reset(token)
        self._model_done(*step, request, response, ran)
        return response

    def _model_done(
        self, trajectory_id: str, step_id: str, request: ModelRequest, response: Any, ran: _ModelRan | None
    ) -> None:
        try:
            self._record_model_done(trajectory_id, step_id, request, response, ran)
        except Exception:  # capture never raises into the agent (a message whose `==` raises)
            log.exception("honed: could not capture a model call's end; the agent goes on")

    def _record_model_done(
        self, trajectory_id: str, step_id: str, request: ModelRequest, response: Any, ran: _ModelRan | None
    ) -> None:
        if ran is None:
            self.recorder.emit((END, step_id, None, time.time(), _ai_message(response)))
            return
        if ran.error is not None:
            # Every model called failed and a middleware answered for them (a QA pass, session 20:
            # `ModelRetryMiddleware(on_failure="continue")`'s made-up reply was stored as the
            # model's, and trained on). The step failed; the run goes on.
            self._failed(trajectory_id, step_id, ran.error)
            return
        message = _ai_message(response)
        answered = ran.call_of(message)
        if answered is not None:
            messages, tools, name = answered
            seen = list(request.messages)
            if request.system_message is not None:
                seen.insert(0, request.system_message)
            if tools is not None and _tool_names(tools) == _tool_names(request.tools or ()):
                tools = None  # the same tools, as the provider writes them: the request's are kept
            if name == _model_name(request.model):
                name = None
            if tools is not None or name is not None or not _same_messages(messages, seen):
                message = ModelRanAs(message, messages, tools, name)
        self.recorder.emit((END, step_id, None, time.time(), message))

    def _emit_model_start(self, trajectory_id: str, request: ModelRequest) -> str:
        step_id = str(uuid7())
        messages = list(request.messages)
        if request.system_message is not None:
            messages.insert(0, request.system_message)
        name = _model_name(request.model)
        extra = {
            "tools": list(request.tools or ()),
            # `_type` names the provider, as LangChain's own invocation params do for callbacks.
            "settings": {
                "_type": getattr(request.model, "_llm_type", None),
                **(request.model_settings or {}),
            },
            "model": _model_id(request.model),
            "structured_tools": self._structured_output_tools(request.response_format),
            # A `ToolStrategy` binds its tools to every call; `AutoStrategy` only where the model
            # has no native structured output, which its reply calling one of them shows.
            "structured_offered": _is_tool_strategy(request.response_format),
            CONTENTS: contents_of(messages),
        }
        self.recorder.emit(
            (START, step_id, trajectory_id, time.time(), (MODEL, str(name), messages, None, None, extra))
        )
        return step_id

    # -- tool calls ------------------------------------------------------------------------------

    def wrap_tool_call(self, request: ToolCallRequest, handler: Any) -> Any:
        step = self._step_start(request, self._emit_tool_start, "tool")
        if step is None:
            return handler(request)
        ran = _ToolRan(request.tool_call.get("id"))
        token = _enclosing_tool_step.set(step[1])  # the step of any subagent this tool runs
        ran_token = _tool_ran.set(ran)
        try:
            result = handler(request)
        except BaseException as exc:
            self._failed(*step, exc)
            raise
        finally:
            _tool_ran.reset(ran_token)
            _enclosing_tool_step.reset(token)
        self._tool_done(*step, result, ran, request)
        return result

    async def awrap_tool_call(self, request: ToolCallRequest, handler: Any) -> Any:
        step = self._step_start(request, self._emit_tool_start, "tool")
        if step is None:
            return await handler(request)
        ran = _ToolRan(request.tool_call.get("id"))
        token = _enclosing_tool_step.set(step[1])
        ran_token = _tool_ran.set(ran)
        try:
            result = await handler(request)
        except BaseException as exc:
            self._failed(*step, exc)
            raise
        finally:
            _tool_ran.reset(ran_token)
            _enclosing_tool_step.reset(token)
        self._tool_done(*step, result, ran, request)
        return result

    def _emit_tool_start(self, trajectory_id: str, request: ToolCallRequest) -> str:
        step_id = str(uuid7())
        call = request.tool_call
        extra = {"tool_call_id": call.get("id")}
        payload = (TOOL, call.get("name"), call.get("args"), None, None, extra)
        self.recorder.emit((START, step_id, trajectory_id, time.time(), payload))
        return step_id

    # -- what model and tool calls share: start, failure -----------------------------------------

    def _step_start(
        self, request: Any, emit_start: Callable[[str, Any], str], kind: str
    ) -> tuple[str, str] | None:
        """(trajectory, step) for a call this middleware captures; None to just run the call."""
        trajectory_id = self._trajectory(request.state)
        if not trajectory_id:
            return None
        try:
            return trajectory_id, emit_start(trajectory_id, request)
        except Exception:
            log.exception("honed: could not capture a %s call; the agent goes on", kind)
            return None

    def _tool_done(
        self, trajectory_id: str, step_id: str, result: Any, ran: _ToolRan, request: ToolCallRequest
    ) -> None:
        try:
            self._record_tool_done(trajectory_id, step_id, _as_ran(result, ran, request))
        except Exception:  # capture never raises into the agent (arguments whose `==` raises)
            log.exception("honed: could not capture a tool call's end; the agent goes on")

    def _record_tool_done(self, trajectory_id: str, step_id: str, result: Any) -> None:
        now = time.time()
        self.recorder.emit((END, step_id, None, now, tool_answer(result)))
        if isinstance(result, RanAs | NotRun):
            result = result.result
        commands = result if isinstance(result, list) else [result]
        goto = [c.goto for c in commands if isinstance(c, Command) and c.graph == Command.PARENT]
        handed_on = _live.get(trajectory_id)
        if handed_on is not None and handed_on.ended_at is not None:
            handed_on.ended_at = max(handed_on.ended_at, now)  # the turn ends with its last call
        if goto:
            # A handoff (Command to the parent graph): this agent's turn ends here, and its end
            # hook never runs. Under a root run this process watches, it ends with the root: the
            # other calls of the same reply may still be running, or not yet begun (a QA pass,
            # session 23: one was stored failed, or began a trajectory of its own).
            live = _live.get(trajectory_id)
            if live is not None and live.root is not None and live.whole:
                live.final, live.ended_at = {HANDOFF_KEY: goto[0]}, now
                return
            with _live_lock:
                _live.pop(trajectory_id, None)
            self.recorder.emit((END, trajectory_id, None, now, {HANDOFF_KEY: goto[0]}))

    def _failed(self, trajectory_id: str, step_id: str, exc: BaseException) -> None:
        now = time.time()
        self.recorder.emit((ERROR, step_id, None, now, exc))
        if isinstance(exc, GraphBubbleUp):
            return  # an interrupt inside a tool: LangGraph's control flow, not a failure
        failing = _live.get(trajectory_id)
        if failing is not None:
            failing.failed = exc
        # The error may end the run, or an outer middleware may handle it (a retry). Under a
        # root run this process watches, the root's end says which (`_root_ended`); without one,
        # the trajectory ends as an error only if nothing else happens in it (see Assembler,
        # PENDING_ERROR).
        live = _live.get(trajectory_id)
        if live is None or live.root is None:
            self.recorder.emit((PENDING_ERROR, trajectory_id, None, now, exc))

    def _structured_output_tools(self, response_format: Any) -> list[dict[str, Any]] | None:
        """The tools a `ToolStrategy` response format adds for the model (the request's `tools`
        leave them out): a dataset row must offer the tool its answer calls. Once per format."""
        if response_format is None:
            return None
        cached_for, tools = self._structured_tools
        if cached_for is response_format:
            return tools
        tools = _structured_output_tools(response_format)
        self._structured_tools = (response_format, tools)
        return tools


# LangChain wraps each `wrap_*` hook in LangSmith's `traceable`, which calls `inspect.signature` on
# the hook at every model and tool call, traced or not: a precomputed signature makes that a lookup.
for _hook in (
    Middleware.wrap_model_call,
    Middleware.awrap_model_call,
    Middleware.wrap_tool_call,
    Middleware.awrap_tool_call,
):
    _hook.__signature__ = inspect.signature(_hook)  # type: ignore[attr-defined]
del _hook


def _as_ran(result: Any, ran: _ToolRan, request: ToolCallRequest) -> Any:
    """The tool's result, with the call as it ran where that differs from the call this
    middleware saw (`RanAs`: the step records what ran, and what the model asked for)."""
    call = request.tool_call
    if ran.name is None and call.get("id") is not None and isinstance(result, ToolMessage):
        return NotRun(result)  # answered further in, never run (a reviewer's rejection)
    try:
        same = ran.name is None or (ran.name == call.get("name") and bool(ran.args == call.get("args")))
    except Exception:  # arguments whose `==` raises (an array): nothing says the call changed
        same = True
    if same:
        return result
    return RanAs(result, ran.name, ran.args, call.get("name"), call.get("args"))


def _current_config() -> dict[str, Any]:
    from langgraph.config import get_config

    try:
        return get_config()
    except RuntimeError:
        return {}


def _honed_handlers(config: dict[str, Any]) -> list[Any]:
    """The enabled honed handlers that see this run (instrument()'s, or one in the config)."""
    from honed.capture.callbacks import CallbackHandler

    manager = config.get("callbacks")
    handlers = getattr(manager, "handlers", manager) or []
    return [h for h in handlers if isinstance(h, CallbackHandler) and h.enabled]


def _current_id(trajectory_id: str | None) -> str | None:
    return _renamed.get(trajectory_id, trajectory_id) if trajectory_id else trajectory_id


def _gives_the_answer(final: dict[str, Any], outputs: Any) -> bool:
    """Whether a turn's last reply is the run's (the root's output's last AI message); True where
    that cannot be told (no output, no messages in it)."""
    theirs = _last_reply(outputs.get("messages")) if isinstance(outputs, dict) else None
    if theirs is None:
        return True
    ours = _last_reply(final.get("messages"))
    if ours is None:
        return False
    if ours is theirs or (ours.id is not None and ours.id == theirs.id):
        return True
    return ours.id is None and ours.content == theirs.content


def _last_reply(messages: Any) -> Any:
    for message in reversed(messages if isinstance(messages, list) else ()):
        if isinstance(message, AIMessage):
            return message
    return None


def _checkpoint_of(runtime: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The LangGraph thread, and the checkpoint this run starts from (where there is one)."""
    info = getattr(runtime, "execution_info", None)
    configurable = config.get("configurable") or {}
    thread = getattr(info, "thread_id", None) or configurable.get("thread_id")
    checkpoint = getattr(info, "checkpoint_id", None) if thread else None
    return {"thread_id": None if thread is None else str(thread), "checkpoint_id": checkpoint}


def _graph_namespace(config: dict[str, Any]) -> str:
    """The checkpoint namespace of the graph a hook runs in, as LangGraph names it in a `Command`
    to its parent (`_checkpoint_ns_for_parent_command`): the hook's own, less its last segment
    and the numeric selectors around it ("" in a root graph)."""
    parts = str((config.get("configurable") or {}).get("checkpoint_ns") or "").split("|")
    while parts and parts[-1].isdigit():
        parts.pop()
    if parts:
        parts.pop()
    while parts and parts[-1].isdigit():
        parts.pop()
    return "|".join(parts)


def _is_root_graph(root: RootRun | None, config: dict[str, Any]) -> bool:
    """Whether this agent's graph is the root run (not a graph inside another's node, whose
    checkpoint namespace nests): then the root run's input is this turn's input."""
    namespace = str((config.get("configurable") or {}).get("checkpoint_ns") or "")
    return (
        root is not None
        and "|" not in namespace
        and isinstance(root.inputs, dict | Command)
        and (isinstance(root.inputs, Command) or "messages" in root.inputs)
    )


def _root_asked_this(root: RootRun | None, state: Any) -> bool:
    """Whether the root run's input is this agent's: its last user message is the state's. An
    agent called by code under another root (a `RunnableLambda`, a function traced as a chain)
    was handed something else, and the root's input and output are not its own."""
    if root is None or root.inputs is None or isinstance(root.inputs, Command):
        return True  # resumed (`Command(resume=...)`) or run on from its checkpoint (`invoke(None)`)
    from honed.messages import request_text

    return request_text(root.inputs) == request_text({"messages": state.get("messages")})


def _new_messages(state: Any) -> dict[str, Any]:
    """This turn's input seen from the state: the messages after the last reply (all of them in
    a conversation with no history), the same `task` `instrument()` records from the run's input.
    An agent handed a conversation that ends in a reply (a handoff) was given it from the last
    user message on."""
    messages = list(state.get("messages", []))
    last_reply = max(
        (i for i, m in enumerate(messages) if isinstance(m, AIMessage | ToolMessage)), default=-1
    )
    if last_reply == len(messages) - 1:
        last_reply = max((i for i, m in enumerate(messages) if isinstance(m, HumanMessage)), default=0) - 1
    return {"messages": messages[last_reply + 1 :]}


def _is_tool_strategy(response_format: Any) -> bool:
    if response_format is None:
        return False
    from langchain.agents.structured_output import ToolStrategy

    return isinstance(response_format, ToolStrategy)


def _structured_output_tools(response_format: Any) -> list[dict[str, Any]] | None:
    try:
        from langchain.agents.structured_output import AutoStrategy, ProviderStrategy, ToolStrategy

        if isinstance(response_format, ProviderStrategy):
            return None
        if not isinstance(response_format, ToolStrategy):
            schema = response_format.schema if isinstance(response_format, AutoStrategy) else response_format
            response_format = ToolStrategy(schema)
        return [
            {
                "type": "function",
                "function": {"name": s.name, "description": s.description or "", "parameters": s.json_schema},
            }
            for s in response_format.schema_specs
        ]
    except Exception:  # an unusual format: the dataset row just lacks that tool
        log.debug("honed: could not describe the structured-output tools", exc_info=True)
        return None


def _calls_the_model(handler: Any) -> bool:
    """Whether `handler` is LangChain's own model call (`create_agent`'s innermost handler): this
    middleware is the innermost one, and watching the model's own callbacks (a handler added to
    every call: +40% of the agent's CPU in `benchmarks/capture.py`) would tell nothing new."""
    return getattr(handler, "__name__", "") in ("_execute_model_sync", "_execute_model_async")


def _same_messages(a: list[Any], b: list[Any]) -> bool:
    """Whether the model received the messages the middleware saw; a message whose `==` raises
    (an array in its `additional_kwargs`) is taken as changed: recorded as the model received it."""
    if len(a) != len(b):
        return False
    try:
        return all(x is y or bool(x == y) for x, y in zip(a, b, strict=True))
    except Exception:
        return False


def _tool_names(tools: Any) -> list[Any]:
    names = []
    for tool in tools:
        if isinstance(tool, dict):
            function = tool.get("function")
            names.append(function.get("name") if isinstance(function, dict) else tool.get("name"))
        else:
            names.append(getattr(tool, "name", None))
    return names


def _model_name(model: Any) -> str:
    """The name `instrument()` gives the same call (LangChain's tracing parameters: the model's
    name, else its provider), so a step reads the same whichever entry point stored it."""
    return _model_id(model) or str(_traced(model).get("ls_provider") or type(model).__name__)


def _model_id(model: Any) -> str | None:
    """The model's own name, the model version of a reply that names none (as `instrument()` has
    it from the call's parameters); a provider or class name is not a version."""
    traced = _traced(model)
    name = traced.get("ls_model_name") or getattr(model, "model_name", None) or getattr(model, "model", None)
    return str(name) if name else None


def _traced(model: Any) -> dict[str, Any]:
    try:
        return model._get_ls_params() or {}
    except Exception:  # not a `BaseChatModel` (a configurable one): what it says of itself
        return {}


def _ai_message(response: Any) -> Any:
    if isinstance(response, AIMessage):
        return response
    result = getattr(response, "result", None)
    if isinstance(result, list):
        return next((m for m in reversed(result) if isinstance(m, AIMessage)), None)
    return None
