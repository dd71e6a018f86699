"""`honed serve`: an OpenAI-compatible HTTP endpoint over the live local version of one or more names.

Clients outside LangChain (the `openai` package, any OpenAI-compatible SDK, other languages) use
the improving model through `/v1/chat/completions` (tools, `stream: true` as server-sent events,
`logprobs`, and vLLM's `return_token_ids`) and `/v1/models`. Each name is a `ServedModel`, so a
promotion swaps the weights under the running server; the `model` of every response is the
version that answered (`support-agent@v3`). Every request served is captured as a trajectory
(one model step with token ids and logprobs); a client's `metadata` (`task_id`, `split`, ...)
labels it, as `config["metadata"]["honed"]` does for an agent.

Errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`) and never take the
server down: malformed JSON and bad parameters are 400, a missing or wrong key 401, an unknown
model 404, a prompt beyond the context window 400 `context_length_exceeded`, no live version 503.
A client that disconnects mid-stream frees its row of the batch at the next token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from langchain_core.messages import AIMessage, AIMessageChunk
from starlette.exceptions import HTTPException as StarletteHTTPException

from honed.serving import protocol
from honed.serving.engine import ContextWindowExceeded
from honed.serving.protocol import BadRequest, ChatRequest, error_body
from honed.serving.served import ServedModel
from honed.store import TrajectoryStore, open_store
from honed.store.registry import NoLiveVersion

log = logging.getLogger("honed")

MAX_BODY_BYTES = 32 * 1024 * 1024


class _HTTPError(Exception):
    def __init__(
        self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


def create_app(
    store: TrajectoryStore | str,
    names: Sequence[str],
    *,
    api_key: str | None = None,
    capture: bool = True,
    poll_interval: float | None = None,
    **model_settings: Any,
) -> FastAPI:
    """The FastAPI app serving `names` from `store`. `api_key` enables bearer auth (as vLLM's
    `--api-key`); `capture=False` stores nothing; `model_settings` go to each `ServedModel`
    (`temperature`, `max_tokens`, `model_kwargs` ...)."""
    store = open_store(store) if isinstance(store, str) else store
    if not names:
        raise ValueError("serve at least one model name")
    settings = dict(model_settings)
    if poll_interval is not None:
        settings["poll_interval"] = poll_interval
    served = {name: ServedModel(store, name, backend="local", **settings) for name in names}
    handler = None
    if capture:
        from honed.capture.callbacks import CallbackHandler

        handler = CallbackHandler(store=store)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        for model in served.values():
            model.close()
        if handler is not None:
            from honed.capture.instrument import flush

            flush(10)

    app = FastAPI(title="honed", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.served = served
    app.state.store = store

    @app.exception_handler(_HTTPError)
    async def _http_error(_request: Request, exc: _HTTPError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), exc.kind, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(exc.errors()[:3])), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("honed serve: request failed")
        return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": {n: (m.live.ref if m.live else None) for n, m in served.items()}}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorize(request, api_key)
        data = []
        for name, model in served.items():
            live = model.live
            created = int(live.created_at.timestamp()) if live and live.created_at else int(time.time())
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "honed",
                    "root": live.ref if live else None,
                }
            )
            if live is not None:
                data.append(
                    {
                        "id": live.ref,
                        "object": "model",
                        "created": created,
                        "owned_by": "honed",
                        "parent": name,
                    }
                )
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        _authorize(request, api_key)
        body = await _json_body(request)
        try:
            chat = protocol.parse_chat_request(body)
        except BadRequest as exc:
            raise _HTTPError(400, str(exc), "invalid_request_error", exc.param, exc.code) from exc
        model = _resolve(served, chat.model)
        config = _run_config(model.name, chat, handler)
        call = model.bind(stop=chat.stop, **chat.call_kwargs) if chat.stop else model.bind(**chat.call_kwargs)
        if chat.stream:
            return await _stream(call, chat, config)
        try:
            replies = await asyncio.gather(
                *(call.ainvoke(chat.messages, config=config) for _ in range(chat.n))
            )
        except Exception as exc:
            raise _as_http_error(exc) from exc
        messages = [r for r in replies if isinstance(r, AIMessage)]
        model_id = messages[0].response_metadata.get("model_version") or model.name
        return JSONResponse(protocol.completion_body(messages, chat, model_id))

    return app


def serve(
    store: str | None,
    names: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    capture: bool = True,
    poll_interval: float | None = None,
    log_level: str = "info",
    **model_settings: Any,
) -> None:
    """Run the server until interrupted (what `honed serve` does)."""
    import uvicorn

    app = create_app(
        open_store(store),
        names,
        api_key=api_key,
        capture=capture,
        poll_interval=poll_interval,
        **model_settings,
    )
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


# -- request handling ----------------------------------------------------------------------------


def _authorize(request: Request, api_key: str | None) -> None:
    if not api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise _HTTPError(
            401,
            "Incorrect API key provided: pass it as 'Authorization: Bearer <key>' (honed serve --api-key / HONED_API_KEY)",
            "invalid_request_error",
            code="invalid_api_key",
        )


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise _HTTPError(413, f"the request body is over {MAX_BODY_BYTES} bytes", "invalid_request_error")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _HTTPError(
            400,
            f"We could not parse the JSON body of your request ({exc}). The OpenAI API expects a JSON payload.",
            "invalid_request_error",
        ) from exc


def _resolve(served: dict[str, ServedModel], requested: str) -> ServedModel:
    if requested in served:
        return served[requested]
    name = requested.partition("@")[0]
    model = served.get(name)
    if model is not None and model.live is not None and requested == model.live.ref:
        return model
    if model is not None:
        live = model.live.ref if model.live else "none yet"
        message = f"only the live version of {name} is served (now {live}); ask for model {name!r}"
    else:
        message = f"The model {requested!r} does not exist; this server serves {', '.join(sorted(served))}"
    raise _HTTPError(404, message, "invalid_request_error", "model", "model_not_found")


def _run_config(name: str, chat: ChatRequest, handler: Any) -> dict[str, Any]:
    labels = {"agent": name, "source": "honed serve", **chat.metadata}
    config: dict[str, Any] = {"run_name": name, "metadata": {"honed": labels}}
    if handler is not None:
        config["callbacks"] = [handler]
    return config


def _as_http_error(exc: BaseException) -> _HTTPError:
    if isinstance(exc, ContextWindowExceeded):
        return _HTTPError(400, str(exc), "invalid_request_error", "messages", "context_length_exceeded")
    if isinstance(exc, NoLiveVersion):
        return _HTTPError(503, str(exc), "server_error", "model", "model_not_ready")
    if isinstance(exc, BadRequest):
        return _HTTPError(400, str(exc), "invalid_request_error", exc.param, exc.code)
    log.error("honed serve: generation failed", exc_info=exc)
    return _HTTPError(500, f"{type(exc).__name__}: {exc}", "server_error")


async def _stream(call: Any, chat: ChatRequest, config: dict[str, Any]) -> StreamingResponse:
    """Start generating before answering, so errors that come first (context window, no live
    version) are plain HTTP errors; then stream the rest as server-sent events."""
    chunks = call.astream(chat.messages, config=config).__aiter__()
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = AIMessageChunk(content="")
    except Exception as exc:
        await chunks.aclose()
        raise _as_http_error(exc) from exc
    return StreamingResponse(
        _events(first, chunks, chat),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(first: AIMessageChunk, chunks: Any, chat: ChatRequest) -> AsyncIterator[str]:
    completion_id, created = protocol.completion_id(), int(time.time())
    model_id = first.response_metadata.get("model_version") or chat.model
    usage, finish, seen_calls = None, "stop", False

    def event(delta: dict[str, Any], reason: str | None = None, **extra: Any) -> str:
        choice = {
            "index": 0,
            "delta": delta,
            "finish_reason": reason,
            "logprobs": extra.pop("logprobs", None),
        }
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "choices": [choice],
            **extra,
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield event({"role": "assistant", "content": ""})
        chunk: AIMessageChunk | None = first
        text_sent = False
        while chunk is not None:
            delta = protocol.chunk_delta(chunk, text_sent=text_sent)
            text_sent = text_sent or bool(delta.get("content"))
            seen_calls = seen_calls or bool(delta.get("tool_calls"))
            meta = chunk.response_metadata
            logprobs = None
            if meta.get("finish_reason"):
                finish = meta["finish_reason"]
                usage = chunk.usage_metadata
                if chat.logprobs:
                    logprobs = protocol.logprobs_body(meta)
            if delta or logprobs:
                yield event(delta, logprobs=logprobs)
            chunk = await _next(chunks)
        reason = "tool_calls" if seen_calls else ("length" if finish == "length" else "stop")
        yield event({}, reason)
        if chat.include_usage and usage:
            n_in, n_out = int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
            body = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_id,
                "choices": [],
                "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
            }
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as exc:  # mid-stream: the status is sent already, so the error is an event
        error = _as_http_error(exc)
        yield f"data: {json.dumps(error_body(str(error), error.kind, error.param, error.code))}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await chunks.aclose()  # a client that went away frees its row of the batch


async def _next(chunks: Any) -> AIMessageChunk | None:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None
