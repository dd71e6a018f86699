"""`honed.Middleware`: capture for `create_agent` agents, with nothing else to configure.

It records each model call (the exact request: messages, system prompt, tools) and each tool
call from inside the agent loop. When process-wide capture (`instrument()`) or a honed callback
handler already sees the run, the middleware stands aside so nothing is recorded twice.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from typing import Annotated, Any, NotRequired

from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ToolCallRequest
from langchain.agents.middleware.types import PrivateStateAttr
from langchain_core.messages import AIMessage
from langchain_core.utils.uuid import uuid7
from langgraph.channels.untracked_value import UntrackedValue

from honed.capture.assembler import CHAIN, END, ERROR, MODEL, PENDING_ERROR, START, TOOL
from honed.capture.recorder import Recorder
from honed.store import TrajectoryStore

log = logging.getLogger("honed")

# The tool step a subagent is running inside, so its steps nest in the caller's trajectory.
_enclosing_tool_step: ContextVar[str | None] = ContextVar("honed_enclosing_tool_step", default=None)


class HonedState(AgentState):
    honed_trajectory: NotRequired[Annotated[str, UntrackedValue, PrivateStateAttr]]


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
        self._store = store
        self._agent = agent
        self._recorder = recorder
        self._options = recorder_options

    @property
    def name(self) -> str:
        return "HonedMiddleware"

    @property
    def recorder(self) -> Recorder:
        if self._recorder is None:
            from honed.capture.instrument import instrumented_handler, recorder_for

            handler = instrumented_handler()
            if self._store is None and not self._options and handler is not None:
                self._recorder = handler.recorder
            else:
                self._recorder = recorder_for(self._store, **self._options)
        return self._recorder

    # -- agent boundaries ----------------------------------------------------------------------

    def before_agent(self, state: HonedState, runtime: Any) -> dict[str, Any] | None:
        return self._open(state)

    async def abefore_agent(self, state: HonedState, runtime: Any) -> dict[str, Any] | None:
        return self._open(state)

    def after_agent(self, state: HonedState, runtime: Any) -> dict[str, Any] | None:
        self._close(state)
        return None

    async def aafter_agent(self, state: HonedState, runtime: Any) -> dict[str, Any] | None:
        self._close(state)
        return None

    def _open(self, state: HonedState) -> dict[str, Any]:
        try:
            return self._open_trajectory(state)
        except Exception:
            log.exception("honed: could not start capturing this run; the agent goes on uncaptured")
            return {"honed_trajectory": ""}

    def _open_trajectory(self, state: HonedState) -> dict[str, Any]:
        config = _current_config()
        if _handler_sees_run(config):
            return {"honed_trajectory": ""}
        trajectory_id = str(uuid7())
        metadata = dict(config.get("metadata") or {})
        if isinstance(metadata.get("honed"), dict):
            metadata["honed"] = dict(metadata["honed"])
        name = self._agent or metadata.get("lc_agent_name") or config.get("run_name") or "agent"
        parent = _enclosing_tool_step.get()
        inputs = {"messages": list(state.get("messages", []))}
        if parent is not None:  # a subagent: one node step inside the caller's trajectory
            metadata = {"langgraph_node": name}
        self.recorder.emit(
            (
                START,
                trajectory_id,
                parent,
                time.time(),
                (CHAIN, name, inputs, metadata, config.get("tags"), None),
            )
        )
        return {"honed_trajectory": trajectory_id}

    def _close(self, state: HonedState) -> None:
        trajectory_id = state.get("honed_trajectory")
        if trajectory_id:
            outputs = {k: v for k, v in state.items() if k != "honed_trajectory"}
            self.recorder.emit((END, trajectory_id, None, time.time(), outputs))

    # -- model calls -----------------------------------------------------------------------------

    def wrap_model_call(self, request: ModelRequest, handler: Any) -> Any:
        trajectory_id = request.state.get("honed_trajectory")
        if not trajectory_id:
            return handler(request)
        step_id = self._model_start(trajectory_id, request)
        if step_id is None:
            return handler(request)
        try:
            response = handler(request)
        except BaseException as exc:
            self._failed(trajectory_id, step_id, exc)
            raise
        self.recorder.emit((END, step_id, None, time.time(), _ai_message(response)))
        return response

    async def awrap_model_call(self, request: ModelRequest, handler: Any) -> Any:
        trajectory_id = request.state.get("honed_trajectory")
        if not trajectory_id:
            return await handler(request)
        step_id = self._model_start(trajectory_id, request)
        if step_id is None:
            return await handler(request)
        try:
            response = await handler(request)
        except BaseException as exc:
            self._failed(trajectory_id, step_id, exc)
            raise
        self.recorder.emit((END, step_id, None, time.time(), _ai_message(response)))
        return response

    def _model_start(self, trajectory_id: str, request: ModelRequest) -> str | None:
        try:
            return self._emit_model_start(trajectory_id, request)
        except Exception:
            log.exception("honed: could not capture a model call; the agent goes on")
            return None

    def _emit_model_start(self, trajectory_id: str, request: ModelRequest) -> str:
        step_id = str(uuid7())
        messages = list(request.messages)
        if request.system_message is not None:
            messages.insert(0, request.system_message)
        model = request.model
        name = getattr(model, "model_name", None) or getattr(model, "model", None) or type(model).__name__
        extra = {
            "tools": list(request.tools or ()),
            "settings": dict(request.model_settings or {}),
            "model": name,
        }
        self.recorder.emit(
            (START, step_id, trajectory_id, time.time(), (MODEL, str(name), messages, None, None, extra))
        )
        return step_id

    # -- tool calls ------------------------------------------------------------------------------

    def wrap_tool_call(self, request: ToolCallRequest, handler: Any) -> Any:
        trajectory_id = request.state.get("honed_trajectory") if isinstance(request.state, dict) else None
        if not trajectory_id:
            return handler(request)
        step_id = self._tool_start(trajectory_id, request)
        if step_id is None:
            return handler(request)
        token = _enclosing_tool_step.set(step_id)
        try:
            result = handler(request)
        except BaseException as exc:
            self._failed(trajectory_id, step_id, exc)
            raise
        finally:
            _enclosing_tool_step.reset(token)
        self.recorder.emit((END, step_id, None, time.time(), result))
        return result

    async def awrap_tool_call(self, request: ToolCallRequest, handler: Any) -> Any:
        trajectory_id = request.state.get("honed_trajectory") if isinstance(request.state, dict) else None
        if not trajectory_id:
            return await handler(request)
        step_id = self._tool_start(trajectory_id, request)
        if step_id is None:
            return await handler(request)
        token = _enclosing_tool_step.set(step_id)
        try:
            result = await handler(request)
        except BaseException as exc:
            self._failed(trajectory_id, step_id, exc)
            raise
        finally:
            _enclosing_tool_step.reset(token)
        self.recorder.emit((END, step_id, None, time.time(), result))
        return result

    def _tool_start(self, trajectory_id: str, request: ToolCallRequest) -> str | None:
        try:
            return self._emit_tool_start(trajectory_id, request)
        except Exception:
            log.exception("honed: could not capture a tool call; the agent goes on")
            return None

    def _emit_tool_start(self, trajectory_id: str, request: ToolCallRequest) -> str:
        step_id = str(uuid7())
        call = request.tool_call
        extra = {"tool_call_id": call.get("id")}
        payload = (TOOL, call.get("name"), call.get("args"), None, None, extra)
        self.recorder.emit((START, step_id, trajectory_id, time.time(), payload))
        return step_id

    def _failed(self, trajectory_id: str, step_id: str, exc: BaseException) -> None:
        now = time.time()
        self.recorder.emit((ERROR, step_id, None, now, exc))
        # The error may end the run, or an outer middleware may handle it: the trajectory ends
        # as an error only if nothing else happens in it (see Assembler, PENDING_ERROR).
        self.recorder.emit((PENDING_ERROR, trajectory_id, None, now, exc))


def _current_config() -> dict[str, Any]:
    from langgraph.config import get_config

    try:
        return get_config()
    except RuntimeError:
        return {}


def _handler_sees_run(config: dict[str, Any]) -> bool:
    from honed.capture.callbacks import CallbackHandler

    manager = config.get("callbacks")
    handlers = getattr(manager, "handlers", manager) or []
    return any(isinstance(h, CallbackHandler) and h.enabled for h in handlers)


def _ai_message(response: Any) -> Any:
    if isinstance(response, AIMessage):
        return response
    result = getattr(response, "result", None)
    if isinstance(result, list):
        return next((m for m in reversed(result) if isinstance(m, AIMessage)), None)
    return None
