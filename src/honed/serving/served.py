"""`ServedModel`: one chat model object for the agent's whole life, over whichever version is live.

The agent is built once with `ServedModel(store, name="support-agent")`; promotions (`honed
promote support-agent@v3`, from any process or machine sharing the store) swap the weights under
it. A background follower watches the name's live pointer (polling, plus LISTEN/NOTIFY on
PostgreSQL), loads the new version *beside* the old one and then swaps one reference: a call
takes that reference once when it starts, so calls in flight finish on the weights they started
on, new calls get the new ones, and the old weights are released when their last call ends.
Each reply's `response_metadata["model_version"]` is the version that produced it
(`support-agent@v3`), which is what the captured step records.

Backends: `"local"` (a `LocalChatModel` per version, in this process), `"openai"` (any
OpenAI-compatible server: `honed serve` follows the store itself and reports the version it
answered with; for vLLM set `load_adapters=True` and each promotion loads the version's LoRA
adapter through `/v1/load_lora_adapter` and switches the request's model name to `NAME@vN`),
or a callable `ModelVersion -> BaseChatModel`.

Importing this module loads no torch; the local backend loads it with the first version.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import Field, PrivateAttr

from honed.store import TrajectoryStore, open_store
from honed.store.registry import NOTIFY_CHANNEL, NoLiveVersion
from honed.trajectory import ModelVersion

log = logging.getLogger("honed")

DEFAULT_POLL_S = float(os.environ.get("HONED_POLL_INTERVAL", "2.0"))
RETRY_FAILED_LOAD_S = 30.0  # a live version that failed to load is tried again this often
Backend = Callable[[ModelVersion], BaseChatModel]


class ServedModel(BaseChatModel):
    """A LangChain chat model that follows the live version of `name` in the store.

    >>> model = ServedModel(store, name="support-agent")             # the local backend
    >>> model = ServedModel(store, name="support-agent", backend="openai", base_url="http://gpu:8000/v1")
    >>> agent = create_agent(model, tools, middleware=[honed.Middleware(store=store)])

    `poll_interval` (s, `HONED_POLL_INTERVAL`) bounds how late a promotion is noticed without
    NOTIFY. `wait_for_live` (s) lets the first calls wait for a first promotion instead of raising
    `NoLiveVersion`. `temperature`, `max_tokens`, `top_p` and `model_kwargs` configure each
    version's backend. `close()` stops following and frees the weights.
    """

    store: Any = Field(exclude=True)
    name: str
    backend: Any = "local"
    poll_interval: float = DEFAULT_POLL_S
    wait_for_live: float = 0.0
    temperature: float | None = None
    max_tokens: int | None = None
    top_p: float | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    base_url: str | None = None
    api_key: str | None = Field(default=None, repr=False)
    load_adapters: bool = False
    token_ids: bool = True

    _follower: _Follower = PrivateAttr()

    def __init__(
        self, store: TrajectoryStore | str | None = None, name: str | None = None, /, **kwargs: Any
    ) -> None:
        if store is not None:
            kwargs["store"] = store
        if name is not None:
            kwargs["name"] = name
        super().__init__(**kwargs)

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        if not self.poll_interval > 0:  # 0 or less polled the store in a busy loop
            raise ValueError(f"poll_interval must be above 0 seconds, not {self.poll_interval!r}")
        if isinstance(self.store, str) or self.store is None:
            self.store = open_store(self.store, verdict_key=False)  # it writes no label
        make = self.backend if callable(self.backend) else _BACKENDS.get(self.backend)
        if make is None:
            raise ValueError(f"backend must be 'local', 'openai' or a callable, not {self.backend!r}")
        settings = {
            k: v
            for k, v in (
                ("temperature", self.temperature),
                ("max_tokens", self.max_tokens),
                ("top_p", self.top_p),
            )
            if v is not None
        }
        if not callable(self.backend):
            make = _bind_backend(make, self, {**settings, **self.model_kwargs})
        self._follower = _Follower(self.store, self.name, make, self.poll_interval)
        self._follower.start()
        weakref.finalize(self, self._follower.close)

    # -- what the agent sees ----------------------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "honed-served"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend if isinstance(self.backend, str) else "custom"}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "honed"
        params["ls_model_name"] = self.name
        return params

    @property
    def live(self) -> ModelVersion | None:
        """The version new calls go to (None before the first promotion)."""
        return self._follower.version

    @asynccontextmanager
    async def pinned(self) -> AsyncIterator[ModelVersion]:
        """Every call of this model inside the block (and in tasks it starts) goes to one version,
        whatever is promoted meanwhile: the `n` choices of one request come from one model.

            async with model.pinned() as version:
                replies = await asyncio.gather(*(model.ainvoke(messages) for _ in range(n)))
        """
        slot = await self._follower.aacquire(self.wait_for_live)
        token = _pinned.set((self._follower, slot))
        try:
            yield slot.version
        finally:
            _pinned.reset(token)
            self._follower.release(slot)

    @property
    def context_window(self) -> int | None:
        """Tokens the live version's context holds, where its backend knows (the local one
        does); None otherwise, or before the first promotion."""
        slot = self._follower._slot
        return getattr(slot.backend, "context_window", None) if slot is not None else None

    @property
    def message_tokens(self) -> int:
        """Tokens each message costs at least in the live version's chat template (1 if unknown)."""
        slot = self._follower._slot
        return getattr(slot.backend, "message_tokens", 1) if slot is not None else 1

    @property
    def max_prompt_chars(self) -> int | None:
        """Prompt characters past which the live version's context cannot hold it (None: unknown)."""
        slot = self._follower._slot
        return getattr(slot.backend, "max_prompt_chars", None) if slot is not None else None

    def refresh(self) -> ModelVersion | None:
        """Check the store now (rather than at the next poll) and swap if the live version moved."""
        self._follower.check()
        return self.live

    def close(self) -> None:
        """Stop following; the weights are released once calls in flight finish."""
        self._follower.close()

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | Any],
        *,
        tool_choice: str | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Tools as OpenAI schemas, understood by every backend; `tool_choice` as OpenAI spells it."""
        from langchain_core.utils.function_calling import convert_to_openai_tool

        schemas = [convert_to_openai_tool(t) for t in tools]
        if tool_choice in ("any", "required"):
            tool_choice = "required"
        elif isinstance(tool_choice, str) and tool_choice not in ("auto", "none"):
            tool_choice = {"type": "function", "function": {"name": tool_choice}}
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=schemas, **kwargs)

    # -- calls: take the live backend once, give it back at the end --------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        slot = self._follower.acquire(self.wait_for_live)
        try:
            result = slot.backend._generate(messages, stop=stop, run_manager=run_manager, **kwargs)
        finally:
            self._follower.release(slot)
        return self._stamp(result, slot.version)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        slot = await self._follower.aacquire(self.wait_for_live)
        try:
            result = await slot.backend._agenerate(messages, stop=stop, run_manager=run_manager, **kwargs)
        finally:
            self._follower.release(slot)
        return self._stamp(result, slot.version)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        slot = self._follower.acquire(self.wait_for_live)
        try:
            stamp = _Stamp(self, slot.version, reports=self.backend == "openai")
            for chunk in slot.backend._stream(messages, stop=stop, run_manager=run_manager, **kwargs):
                yield stamp(chunk)
            if not stamp.done:
                yield stamp.last()
        finally:
            self._follower.release(slot)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        slot = await self._follower.aacquire(self.wait_for_live)
        try:
            stamp = _Stamp(self, slot.version, reports=self.backend == "openai")
            async for chunk in slot.backend._astream(messages, stop=stop, run_manager=run_manager, **kwargs):
                yield stamp(chunk)
            if not stamp.done:
                yield stamp.last()
        finally:
            self._follower.release(slot)

    def _stamp(self, result: ChatResult, version: ModelVersion) -> ChatResult:
        # A server that follows the store itself (`honed serve`) says which version answered: in
        # the response's `model` (LangChain keeps it in `llm_output` until after this returns).
        answered = str((result.llm_output or {}).get("model_name") or "")
        for generation in result.generations:
            meta = generation.message.response_metadata
            reported = str(meta.get("model_name") or answered)
            meta["model_version"] = reported if self._a_version(reported) else version.ref
        return result

    def _a_version(self, name: str) -> bool:
        return re.fullmatch(rf"{re.escape(self.name)}@v\d+", name) is not None


class _Stamp:
    """Puts `model_version` on one chunk of a stream (chunk metadata is merged by concatenating
    strings): the first, with the version this client follows, or, from a server that reports
    which version answered (`reports`: `honed serve`'s `model`, on its last chunk), that chunk
    with the version it names; `last()` when none did."""

    def __init__(self, model: ServedModel, version: ModelVersion, *, reports: bool) -> None:
        self.model, self.version, self.reports, self.done = model, version, reports, False

    def __call__(self, chunk: ChatGenerationChunk) -> ChatGenerationChunk:
        meta = chunk.message.response_metadata
        meta.pop("model_version", None)
        if self.done:
            return chunk
        reported = str(meta.get("model_name") or (chunk.generation_info or {}).get("model_name") or "")
        if self.model._a_version(reported):
            meta["model_version"], self.done = reported, True
        elif not self.reports:
            meta["model_version"], self.done = self.version.ref, True
        return chunk

    def last(self) -> ChatGenerationChunk:
        from langchain_core.messages import AIMessageChunk

        self.done = True
        meta = {"model_version": self.version.ref}
        return ChatGenerationChunk(message=AIMessageChunk(content="", response_metadata=meta))


# -- following the live pointer ---------------------------------------------------------------------


def _shutting_down(exc: BaseException) -> bool:
    """An error that says the interpreter is exiting (its thread pools refuse work)."""
    return sys.is_finalizing() or (isinstance(exc, RuntimeError) and "interpreter shutdown" in str(exc))


# The slot `ServedModel.pinned()` holds for the calls inside it, with the follower it came from.
_pinned: ContextVar[tuple[_Follower, _Slot] | None] = ContextVar("honed_pinned_slot", default=None)


@dataclass(eq=False)
class _Slot:
    version: ModelVersion
    backend: BaseChatModel
    inflight: int = 0
    retired: bool = False
    closed: bool = False


@dataclass(eq=False)
class _Follower:
    """Owns the current slot; a daemon thread polls (or LISTENs) and swaps. Holds no reference
    to the ServedModel, so a model the agent dropped is collected and its follower closed."""

    store: TrajectoryStore
    name: str
    make_backend: Backend
    poll_interval: float
    version: ModelVersion | None = None
    load_error: str | None = None
    _slot: _Slot | None = None
    _pointer: tuple[int | None, int] | None = None
    _failed_at: float = 0.0
    _lock: threading.Condition = field(default_factory=threading.Condition)
    _check_lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self.check()
        except Exception:
            log.exception("honed: could not read the live version of %s; will retry", self.name)
        self._thread = threading.Thread(target=self._follow, name=f"honed-follow[{self.name}]", daemon=True)
        self._thread.start()

    def acquire(self, wait: float) -> _Slot:
        with self._lock:
            pinned = _pinned.get()
            if pinned is not None and pinned[0] is self:  # inside `ServedModel.pinned()`
                pinned[1].inflight += 1
                return pinned[1]
            if self._slot is None and wait > 0:
                self._lock.wait_for(lambda: self._slot is not None or self._stop.is_set(), timeout=wait)
            slot = self._slot
            if slot is None:
                raise NoLiveVersion(self._no_live_message())
            slot.inflight += 1
            return slot

    async def aacquire(self, wait: float) -> _Slot:
        if wait > 0 and self._slot is None and _pinned.get() is None:
            import asyncio

            return await asyncio.to_thread(self.acquire, wait)
        return self.acquire(0)

    def release(self, slot: _Slot) -> None:
        with self._lock:
            slot.inflight -= 1
            done = slot.retired and slot.inflight == 0 and not slot.closed
            if done:
                slot.closed = True
        if done:
            _close_backend(slot)

    def check(self) -> None:
        """Swap to the live version if it moved; loading happens outside the swap lock."""
        with self._check_lock:
            pointer = self.store.live_pointer(self.name)
            retry = self.load_error is not None and time.monotonic() - self._failed_at > RETRY_FAILED_LOAD_S
            if (pointer == self._pointer and not retry) or pointer[0] is None:
                return
            current = self._slot.version.id if self._slot is not None else None
            if pointer[0] == current:
                self._pointer, self.load_error = pointer, None
                return
            version = self.store.live_version(self.name)
            if version is None:
                return
            try:
                backend = self.make_backend(version)
            except Exception as exc:  # keep serving what we have; retry on the next move, or later
                if _shutting_down(exc):
                    # The interpreter is exiting (a promotion or rollback seen meanwhile): nothing
                    # to load for. It printed "could not be loaded ... still serving" and a
                    # traceback after the README's snippet had ended well (a QA pass, session 25).
                    self._stop.set()
                    return
                self._pointer, self._failed_at = pointer, time.monotonic()
                said = str(exc) if isinstance(exc, FileNotFoundError) else f"{type(exc).__name__}: {exc}"
                self.load_error = f"{version.ref} could not be loaded: {said}"
                serving = self.version.ref if self.version is not None else "nothing"
                # A missing folder needs no traceback; anything else, the operator debugs from it.
                log.log(logging.ERROR, "honed: %s; still serving %s", self.load_error, serving,
                        exc_info=not isinstance(exc, FileNotFoundError))  # fmt: skip
                return
            self._pointer = pointer
            self._swap(_Slot(version=version, backend=backend))

    def _swap(self, new: _Slot) -> None:
        with self._lock:
            old, self._slot = self._slot, new
            self.version, self.load_error = new.version, None
            done = False
            if old is not None:
                old.retired = True
                done = old.inflight == 0 and not old.closed
                if done:
                    old.closed = True
            self._lock.notify_all()
        log.info(
            "honed: %s now serves %s%s",
            self.name,
            new.version.ref,
            f" (was {old.version.ref})" if old else "",
        )
        if old is not None and done:
            _close_backend(old)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
            slot, self._slot = self._slot, None
            done = slot is not None and slot.inflight == 0 and not slot.closed
            if slot is not None:
                slot.retired = True
                if done:
                    slot.closed = True
        if slot is not None and done:
            _close_backend(slot)

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                if self.store.dialect == "postgresql":
                    self._listen()  # returns only when stopped or the connection fails
                else:
                    self._stop.wait(self.poll_interval)
                    if not self._stop.is_set():
                        self.check()
            except Exception:
                log.warning("honed: following %s failed; retrying", self.name, exc_info=True)
                self._stop.wait(self.poll_interval)

    def _listen(self) -> None:
        """Wait on NOTIFY (checking at least every poll interval) until stopped or notified."""
        with self.store.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql(f"LISTEN {NOTIFY_CHANNEL}")
            driver = conn.connection.driver_connection
            while not self._stop.is_set():
                # Any name's promotion wakes us (one channel per database); the check is one row.
                for _notice in driver.notifies(timeout=self.poll_interval, stop_after=1):  # type: ignore[union-attr]
                    pass
                if not self._stop.is_set():
                    self.check()

    def _no_live_message(self) -> str:
        if self.load_error:
            return f"{self.name}: {self.load_error}"
        return f"{self.name} has no live version: register one and promote it (honed promote {self.name}@v1)"


def _close_backend(slot: _Slot) -> None:
    close = getattr(slot.backend, "close", None)
    try:
        if callable(close):
            close()
    except Exception:
        log.warning("honed: releasing %s failed", slot.version.ref, exc_info=True)


# -- backends ------------------------------------------------------------------------------------


def _bind_backend(
    make: Callable[..., BaseChatModel], served: ServedModel, settings: dict[str, Any]
) -> Backend:
    config = {
        "base_url": served.base_url,
        "api_key": served.api_key,
        "load_adapters": served.load_adapters,
        "token_ids": served.token_ids,
        "name": served.name,
    }
    return lambda version: make(version, settings, config)


def _local_backend(version: ModelVersion, settings: dict[str, Any], config: dict[str, Any]) -> BaseChatModel:
    from honed.serving.local import LocalChatModel

    return LocalChatModel(version.path, model_version=version.ref, **settings)


def _openai_backend(version: ModelVersion, settings: dict[str, Any], config: dict[str, Any]) -> BaseChatModel:
    from honed.serving.openai_backend import openai_chat_model

    return openai_chat_model(version, settings, config)


_BACKENDS: dict[str, Callable[..., BaseChatModel]] = {"local": _local_backend, "openai": _openai_backend}
