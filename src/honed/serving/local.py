"""`LocalChatModel`: a LangChain chat model over a transformers causal LM in a local folder.

It speaks the tokenizer's own chat template with tools, parses `<think>` and `<tool_call>` output,
and batches concurrent calls (see `batching`), so many agents share one model efficiently. Every
reply carries what a trainer needs to learn from exactly what was sampled: in `response_metadata`,
`prompt_token_ids`, `token_ids` (the completion, its EOS included), `logprobs` (raw, per sampled
token), `finish_reason` and `model_version`; the capture layer stores them in the step.

Under asyncio (an agent's `ainvoke`, `honed serve`) the prompt is rendered and tokenised on a
small thread pool, not on the event loop, within `prepare_timeout_s`; text that cannot fit the
context window is refused on its length in characters before either (see `engine`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import queue
import threading
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import Field, PrivateAttr

from honed.messages import CALL_OPEN, dump_arguments, template_messages, tool_schemas
from honed.serving.batching import (
    DEFAULT_MAX_BATCH,
    DEFAULT_WINDOW_S,
    GenerationRequest,
    GenerationResult,
    PerClient,
    current_client,
)
from honed.serving.engine import Engine, PromptTooSlow, acquire_engine, release_engine
from honed.serving.toolcalls import CompletionParser, parse_completion

_DONE = object()
PREPARE_TIMEOUT_S = float(os.environ.get("HONED_PREPARE_TIMEOUT_S", "30"))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


_PREPARE_THREADS = min(4, os.cpu_count() or 1)
# One client (of `honed serve`) renders at most this many prompts at once, leaving a thread of the
# pool to the others (a QA pass, session 23: 16 connections of 2,040-message requests, refused only
# once rendered, kept an honest one-line request waiting 5 s).
_PREPARES = PerClient(max(1, _PREPARE_THREADS - 1))


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # a loop closed meanwhile: nothing left to release
        loop.call_soon_threadsafe(callback, *args)


def _prepare_pool() -> ThreadPoolExecutor:
    """Threads that render and tokenise prompts for async callers, off their event loop."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_PREPARE_THREADS, thread_name_prefix="honed-prepare")
        return _pool


class LocalChatModel(BaseChatModel):
    """A chat model over a local transformers folder (weights + tokenizer with a chat template).

    >>> model = LocalChatModel("./tiny", temperature=0)
    >>> agent = create_agent(model, tools)      # bind_tools, tool calls, reasoning, usage

    Sampling: `temperature` (0 = greedy), `top_p`, `top_k`, `max_tokens`, `stop`; unset ones come
    from the folder's `generation_config.json`; any can be given per call. Concurrent calls are
    batched (up to `max_batch` rows decoded together; callers arriving within `batch_window_ms`
    start together, later ones join between steps). `model_version` labels the replies (default:
    the folder path). Prompts longer than the context window raise `ContextWindowExceeded`.
    """

    path: str
    model_version: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int = 512
    stop: list[str] | None = None
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    max_batch: int = DEFAULT_MAX_BATCH
    batch_window_ms: float = DEFAULT_WINDOW_S * 1000.0
    device: str = "cpu"
    dtype: str | None = None
    prepare_timeout_s: float = PREPARE_TIMEOUT_S

    _engine: Engine | None = PrivateAttr(default=None)
    _release: Any = PrivateAttr(default=None)
    # Preparations under way, shared by the `n` choices of one request (see `_arequest`).
    _preparing: dict[Any, Any] = PrivateAttr(default_factory=dict)

    def __init__(self, path: str | Path | None = None, /, **kwargs: Any) -> None:
        if path is not None:
            kwargs["path"] = str(path)
        super().__init__(**kwargs)

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        engine = acquire_engine(
            self.path,
            device=self.device,
            dtype=self.dtype,
            max_batch=self.max_batch,
            window_s=self.batch_window_ms / 1000.0,
        )
        self._engine = engine
        # Weights are shared per process and freed when the last user lets go (or is collected).
        self._release = weakref.finalize(self, release_engine, engine)

    @property
    def engine(self) -> Engine:
        if self._engine is None or self._engine.model is None:
            raise RuntimeError(f"LocalChatModel({self.path!r}) is closed")
        return self._engine

    @property
    def version_label(self) -> str:
        return self.model_version or self.path

    @property
    def context_window(self) -> int | None:
        """Tokens the model's context holds, prompt and completion together (None once closed)."""
        engine = self._engine
        return engine.max_context if engine is not None and engine.model is not None else None

    @property
    def message_tokens(self) -> int:
        """Tokens each message costs at least in the model's chat template (`Engine.message_tokens`)."""
        engine = self._engine
        return engine.message_tokens if engine is not None and engine.model is not None else 1

    @property
    def max_prompt_chars(self) -> int | None:
        """More prompt characters than this cannot fit the context window (`Engine.max_prompt_chars`)."""
        engine = self._engine
        return engine.max_prompt_chars if engine is not None and engine.model is not None else None

    def close(self) -> None:
        """Release the weights (shared with other chat models on the same folder, freed with the last)."""
        if self._release is not None:
            self._release()

    @property
    def _llm_type(self) -> str:
        return "honed-local"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"path": self.path, "model_version": self.version_label}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "honed"
        params["ls_model_name"] = self.version_label
        return params

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Any],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Tools are rendered by the chat template; `tool_choice="none"` hides them, `"required"`
        (LangChain's `"any"`, `True`) or a tool's name makes the reply open with that call: its
        first tokens are written for the model (`forced_opening`), which goes on from there."""
        return self.bind(tools=tool_schemas(tools), tool_choice=tool_choice, **kwargs)

    # -- calls -----------------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request = self._request(messages, stop, kwargs)
        result = self.engine.submit(request).result()
        message = self._message(request, result, tokens=bool(kwargs.get("return_tokens")))
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request = await self._arequest(messages, stop, kwargs)
        future = self.engine.submit(request)
        try:
            result = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            request.cancelled = True
            raise
        message = self._message(request, result, tokens=bool(kwargs.get("return_tokens")))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        tokens: queue.SimpleQueue[Any] = queue.SimpleQueue()
        request.on_token = lambda token, _logprob: tokens.put(token)
        future = self.engine.submit(request)
        future.add_done_callback(lambda _f: tokens.put(_DONE))
        stream = _TextStream(self.engine, request.stop, calls=not request.tools_off)
        try:
            for token in request.forced:
                yield from _chunks(stream.add(token))
            while (token := tokens.get()) is not _DONE:
                yield from _chunks(stream.add(token))
            yield from _chunks(stream.finish())
            yield self._last_chunk(request, future.result(), stream, tokens=bool(kwargs.get("return_tokens")))
        finally:
            request.cancelled = True  # a consumer that stopped early frees its row

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        request = await self._arequest(messages, stop, kwargs)
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[Any] = asyncio.Queue()
        request.on_token = lambda token, _logprob: loop.call_soon_threadsafe(tokens.put_nowait, token)
        future = self.engine.submit(request)
        future.add_done_callback(lambda _f: loop.call_soon_threadsafe(tokens.put_nowait, _DONE))
        stream = _TextStream(self.engine, request.stop, calls=not request.tools_off)
        try:
            for token in request.forced:
                for chunk in _chunks(stream.add(token)):
                    yield chunk
            while (token := await tokens.get()) is not _DONE:
                for chunk in _chunks(stream.add(token)):
                    yield chunk
            for chunk in _chunks(stream.finish()):
                yield chunk
            result = await asyncio.wrap_future(future)
            yield self._last_chunk(request, result, stream, tokens=bool(kwargs.get("return_tokens")))
        finally:
            request.cancelled = True

    # -- building requests and replies -----------------------------------------------------------

    async def _arequest(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> GenerationRequest:
        """`_prepare`, shared by the calls that ask the same thing at the same time: the `n`
        choices of one request (the very same message objects, stop strings and settings).
        Rendered and tokenised once each, 16 choices of a long prompt held the prepare pool, and
        every other client, for 96 s. Another request's messages are other objects: never shared."""
        loop = asyncio.get_running_loop()
        key = (id(loop), tuple(map(id, messages)), tuple(stop or ()))
        shared = self._preparing.get(key)
        if (
            shared is not None
            and shared[1] == kwargs
            and all(a is b for a, b in zip(shared[0], messages, strict=True))
        ):
            request = await asyncio.shield(shared[2])
            return dataclasses.replace(request, client=current_client.get(), on_token=None, cancelled=False)
        future = asyncio.ensure_future(self._prepare(messages, stop, kwargs))
        entry = (list(messages), dict(kwargs), future)  # holds the messages: their ids stay theirs
        self._preparing[key] = entry
        future.add_done_callback(
            lambda _f: self._preparing.pop(key, None) if self._preparing.get(key) is entry else None
        )
        return await future

    async def _prepare(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> GenerationRequest:
        """`_request` on the prepare pool, within `prepare_timeout_s` of its start (time queued
        behind other prompts does not count). A render or tokenisation that overruns keeps its
        thread until it ends; its caller hears `PromptTooSlow` at once."""
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        client = current_client.get()  # the pool's threads do not see this task's context

        def job() -> GenerationRequest:
            loop.call_soon_threadsafe(started.set)
            request = self._request(messages, stop, kwargs)
            request.client = client
            return request

        if client is not None:
            await _PREPARES.acquire(client)
        try:
            submitted = _prepare_pool().submit(job)
        except BaseException:
            if client is not None:
                _PREPARES.release(client)
            raise
        if client is not None:
            # The turn ends with the job, not with its waiter: a client hanging up once its
            # render began held the pool's every thread (a review, session 23).
            submitted.add_done_callback(lambda _f: _call_soon(loop, _PREPARES.release, client))
        done = asyncio.wrap_future(submitted, loop=loop)
        waiting = asyncio.ensure_future(started.wait())
        try:
            await asyncio.wait({done, waiting}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            done.cancel()  # the caller went away: a job still queued never runs
            raise
        finally:
            waiting.cancel()
        try:
            return await asyncio.wait_for(done, self.prepare_timeout_s)
        except TimeoutError:
            raise PromptTooSlow(self.prepare_timeout_s) from None

    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> GenerationRequest:
        engine = self.engine
        tools = kwargs.get("tools")
        if kwargs.get("tool_choice") == "none":
            tools = None
        template = {**self.chat_template_kwargs, **(kwargs.get("chat_template_kwargs") or {})}
        plain, schemas = template_messages(messages), tool_schemas(tools)
        engine.check_chars(_chars(plain, schemas))  # before paying for rendering and tokenising
        prompt_ids = engine.prompt_ids(plain, schemas, **template)
        opening = forced_opening(kwargs.get("tool_choice"), schemas)
        if opening:
            opening = engine.before_calls(**template) + opening
        forced = tuple(engine.encode(opening)) if opening else ()
        prompt_ids = [*prompt_ids, *forced]
        budget = next(
            (kwargs[k] for k in ("max_tokens", "max_completion_tokens", "max_new_tokens") if kwargs.get(k)),
            self.max_tokens,
        )
        # The forced opening is the reply's first tokens: it counts against the client's
        # `max_tokens` (a new user asked for 30 and got 48 back: a QA pass, session 27).
        budget = max(1, min(int(budget) - len(forced), engine.max_context - len(prompt_ids)))
        temperature = _first(kwargs.get("temperature"), self.temperature, engine.defaults["temperature"])
        return GenerationRequest(
            prompt_ids=prompt_ids,
            max_new_tokens=budget,
            temperature=float(temperature),
            top_p=float(_first(kwargs.get("top_p"), self.top_p, engine.defaults["top_p"])),
            top_k=int(_first(kwargs.get("top_k"), self.top_k, engine.defaults["top_k"])),
            stop=tuple(s for s in (stop or self.stop or ()) if s),
            client=current_client.get(),
            tools_off=kwargs.get("tool_choice") == "none",
            forced=forced,
        )

    def _message(
        self, request: GenerationRequest, result: GenerationResult, *, tokens: bool = False
    ) -> AIMessage:
        result = _reply(request, result)
        text = _cut_at_stop(self.engine.decode(result.token_ids), request.stop)
        parsed = parse_completion(text, calls=not request.tools_off)
        return AIMessage(
            content=parsed.content,
            tool_calls=parsed.tool_calls,
            invalid_tool_calls=parsed.invalid_tool_calls,
            additional_kwargs={"reasoning_content": parsed.reasoning} if parsed.reasoning else {},
            usage_metadata=_usage(request, result),
            response_metadata=self._metadata(request, result, bool(parsed.tool_calls), tokens=tokens),
        )

    def _last_chunk(
        self,
        request: GenerationRequest,
        result: GenerationResult,
        stream: _TextStream,
        *,
        tokens: bool = False,
    ) -> ChatGenerationChunk:
        result = _reply(request, result)
        valid, invalid = stream.parser.tool_calls()
        text = ""
        chunks = [
            {
                "type": "tool_call_chunk",
                "name": c["name"],
                "args": dump_arguments(c["args"]),
                "id": c["id"],
                "index": i,
            }
            for i, c in enumerate(valid)
        ] + [
            {
                "type": "tool_call_chunk",
                "name": c["name"],
                "args": c["args"],
                "id": c["id"],
                "index": len(valid) + i,
            }
            for i, c in enumerate(invalid)
        ]
        message = AIMessageChunk(
            content=text,
            tool_call_chunks=chunks,
            usage_metadata=_usage(request, result),
            response_metadata=self._metadata(request, result, bool(valid), tokens=tokens),
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message)

    def _metadata(
        self,
        request: GenerationRequest,
        result: GenerationResult,
        called_tools: bool,
        *,
        tokens: bool = False,
    ) -> dict[str, Any]:
        finish = "tool_calls" if called_tools and result.finish_reason == "stop" else result.finish_reason
        extra = {"tokens": [self.engine.decode([t]) for t in result.token_ids]} if tokens else {}
        return {
            **extra,
            "model_name": self.version_label,
            "model_version": self.version_label,
            "model_provider": "honed",
            "finish_reason": finish,
            "tokenizer": self.engine.tokenizer_id,  # whose ids these are
            "prompt_token_ids": _prompt(request),
            "token_ids": list(result.token_ids),
            "logprobs": [round(lp, 6) for lp in result.logprobs],
            "batch_size": result.batch_size,
        }


class _TextStream:
    """Sampled token ids → text that is safe to show: no half UTF-8 character, nothing that could
    still turn out to be the start of a stop string, nothing after one; parsed as it grows.

    Decoded incrementally, as vLLM does: each token decodes the ids since the last complete text
    with the ids of that text as context, and keeps what the new ones add. Decoding every id again
    at every token made a stream quadratic in its length, on the server's event loop: 8,000 tokens
    cost 5.8 s of it (0.01 s now)."""

    def __init__(self, engine: Engine, stops: tuple[str, ...], *, calls: bool = True) -> None:
        self.engine = engine
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=1)
        self.hold = self.longest - 1
        self.ids: list[int] = []
        self.text = ""  # the complete characters decoded so far
        self.context = 0  # ids[context:read] decoded to the end of `text`: the next piece's context
        self.read = 0
        self.sent = 0
        self.stopped = False
        self.parser = CompletionParser(calls=calls)

    def add(self, token: int) -> list[tuple[str, str]]:
        if self.stopped:
            return []
        self.ids.append(token)
        new = self._new_text()
        if not new or new.endswith("\ufffd"):
            return []  # no character complete yet
        self._append(new)
        return self._release(self.text, len(self.text) if self.stopped else len(self.text) - self.hold)

    def finish(self) -> list[tuple[str, str]]:
        if not self.stopped:
            self._append(self._new_text())  # what is left, half characters included
        return [*self._release(self.text, len(self.text)), *self.parser.flush()]

    def _new_text(self) -> str:
        context = self.engine.decode(self.ids[self.context : self.read])
        text = self.engine.decode(self.ids[self.context :])
        if text.startswith(context):
            return text[len(context) :]
        whole = self.engine.decode(self.ids)  # a tokenizer whose ids decode otherwise in context
        return whole[len(self.text) :] if whole.startswith(self.text) else ""

    def _append(self, new: str) -> None:
        """`text` grown by `new`, cut at the first stop string it now holds (only its end is
        searched: the text before held none)."""
        searched = max(0, len(self.text) - self.longest + 1)
        self.text += new
        self.context, self.read = self.read, len(self.ids)
        cut = _cut_at_stop(self.text[searched:], self.stops)
        if searched + len(cut) < len(self.text):
            self.text, self.stopped = self.text[: searched + len(cut)], True

    def _release(self, text: str, upto: int) -> list[tuple[str, str]]:
        if upto <= self.sent:
            return []
        delta, self.sent = text[self.sent : upto], upto
        return list(self.parser.feed(delta))


def _chunks(pieces: list[tuple[str, str]]) -> Iterator[ChatGenerationChunk]:
    for kind, text in pieces:
        if kind == "content":
            yield ChatGenerationChunk(message=AIMessageChunk(content=text))
        else:
            yield ChatGenerationChunk(
                message=AIMessageChunk(content="", additional_kwargs={"reasoning_content": text})
            )


def forced_opening(tool_choice: Any, tools: list[dict[str, Any]] | None) -> str:
    """The text a reply must open with for `tool_choice`, in the `<tool_call>` form the chat
    template writes calls in: the call's head for `"required"` (`"any"`, `True`), the head and
    the name for a named tool (or the only tool); "" for `"auto"`, `"none"`, nothing, or no tools to call."""
    if not tools or tool_choice in (None, False, "auto", "none"):
        return ""
    head = f'{CALL_OPEN}\n{{"name": "'
    names = {(t.get("function") or t).get("name") for t in tools if isinstance(t, dict)}
    name = tool_choice
    if tool_choice in (True, "any", "required"):
        if len(names) != 1:
            return head
        [name] = names  # one tool to call: the choice is made
    elif isinstance(tool_choice, dict):  # OpenAI's {"type": "function", "function": {"name": ...}}
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    if not isinstance(name, str) or name not in names:
        raise ValueError(
            f"tool_choice names {name!r}, which is not one of the tools ({sorted(map(str, names))})"
        )
    # No space after the colon: the model's own token there is ` {"` (a space alone, forced, put
    # it off its path, and it wrote broken arguments).
    return f'{head}{name}", "arguments":'


def _reply(request: GenerationRequest, result: GenerationResult) -> GenerationResult:
    """The whole reply: the forced opening (certain: logprob 0) and what was sampled after it."""
    if not request.forced:
        return result
    return dataclasses.replace(
        result,
        token_ids=[*request.forced, *result.token_ids],
        logprobs=[0.0] * len(request.forced) + list(result.logprobs),
    )


def _prompt(request: GenerationRequest) -> list[int]:
    """The conversation's tokens, without the forced opening of the reply."""
    return list(request.prompt_ids[: len(request.prompt_ids) - len(request.forced)])


def _usage(request: GenerationRequest, result: GenerationResult) -> Any:
    n_in, n_out = len(_prompt(request)), len(result.token_ids)
    return {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out}


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """Text up to the earliest stop string (not included), as OpenAI's `stop` does."""
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def _chars(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """Characters the rendered prompt holds at least: contents, tool-call arguments, tool schemas
    (reasoning is left out: templates drop it from earlier turns)."""
    total = len(json.dumps(tools, default=str)) if tools else 0
    for message in messages:
        content = message.get("content")
        total += len(content) if isinstance(content, str) else 0
        for call in message.get("tool_calls") or ():
            total += len(
                json.dumps(call.get("function", {}).get("arguments"), ensure_ascii=False, default=str)
            )
    return total


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)
