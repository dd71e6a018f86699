"""`honed serve`: an OpenAI-compatible HTTP endpoint over the live local version of one or more names.

Clients outside LangChain (the `openai` package, any OpenAI-compatible SDK, other languages) use
the improving model through `/v1/chat/completions` (tools, `stream: true` as server-sent events,
`logprobs`, and vLLM's `return_token_ids`) and `/v1/models`. Each name is a `ServedModel`, so a
promotion swaps the weights under the running server; the `model` of every response is the
version that answered (`support-agent@v3`). Every request served is captured as a trajectory
(one model step with token ids and logprobs); a request refused before generating (beyond the
context window, refused by the template, no live version) only as a stub: its error, its labels
and `metadata.refused`, the counts and size of what was sent, never the conversation itself.

Label provenance. What judges a captured run (`expected`, `tests`, `schema`, `match`,
`tolerance`, `verifier`, `tags`, `task_id`, `split`, `model_version`, `source`, `agent`: every
top-level key of the trajectory's metadata, which verifiers, exports and the held-out policy
read) comes only from places the operator trusts:
- the server: `agent` (the served name) and `source` ("honed serve");
- the operator's `labels` (`honed serve --label split=train --label verifier=tests`), on every
  request, over the server's;
- the metadata of a request made with a label key (`label_keys`; `honed serve --label-key KEY`,
  `HONED_LABEL_KEY`), over both: a harness that owns its tasks sends `task_id`, `expected`,
  `split` as `metadata`, exactly as `config["metadata"]["honed"]` labels an agent.
Anything else a client says (its `metadata`, `user`) is kept, untrusted, under
`metadata["client"]`, where nothing that judges a run looks: a client cannot mark its own run
held-out, supply the tests that judge it, or claim a task. `metadata["labels_from"]` says which
applied ("label key" or "operator"), set after the merge so no one can forge it. A label key is
also an API key: with `api_key` set, requests need one or the other; without, the server is open
and only label keys label.

Errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`) and never take the
server down nor carry an exception's text: malformed JSON and bad parameters are 400 naming the
field (see `protocol`), a missing or wrong key 401, an unknown model 404, a body over
`max_body_bytes` 413 (from `Content-Length`, or counted while reading, before the rest is read), a
body not received within `body_timeout_s` 408, a prompt beyond the context window 400
`context_length_exceeded` (refused on its length in characters before tokenising), no live
version 503, anything unexpected 500 with a reference to the server's log.

Holding the server. Request bodies are decoded, checked and converted on a worker thread, and
one whose messages and tool calls outnumber the tokens of the model's context window is refused
(400 `context_length_exceeded`) before it is converted; prompts are rendered and tokenised off
the event loop too (see `honed.serving.local`); `serve` runs uvicorn's h11 protocol with limits
uvicorn leaves open: a request's headers must arrive within `header_timeout_s` of the connection
opening (or of the previous response), at most `max_header_bytes` of them in `MAX_HEADER_LINES` lines
(431; trailers too), a chunked body in at most `MAX_BODY_CHUNKS` chunks averaging `MIN_CHUNK_BYTES`
past the first 256 (400: h11 parses each line and chunk in Python on the event loop); idle keep-alive
connections close after `keep_alive_s`; beyond `limit_concurrency` requests in flight, new
requests get a JSON 503, and beyond as many connections a new one closes an idle one of the
address holding the most; one client address (an IPv6 client: its /64) holds at most
`MAX_CONNECTIONS_PER_CLIENT` connections at once (more are closed as they open), has at most
`ARRIVING_BODIES_PER_CLIENT` request bodies still arriving after `ARRIVING_GRACE_S` (more get 429), and parses at most
`BODY_READS_PER_CLIENT` request bodies at once. So a client trickling headers or a body
(slowloris) holds a connection for seconds, not forever, and a few requests, not the server's, and a client opening idle connections by the thousand (each
reopened as it times out) holds a quarter of the server's, not all of them. A client that hangs up
on a request, streamed or not, frees its rows of the batch at once (its runs end as cancelled).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hmac
import ipaddress
import json
import logging
import os
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from langchain_core.messages import AIMessage, AIMessageChunk
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from honed.capture.events import ERROR, START
from honed.serving import protocol
from honed.serving.batching import InvalidGeneration, PerClient, current_client
from honed.serving.engine import ContextWindowExceeded, PromptTooSlow
from honed.serving.protocol import BadRequest, ChatRequest, error_body
from honed.serving.served import ServedModel
from honed.store import TrajectoryStore, open_store
from honed.store.registry import NoLiveVersion

log = logging.getLogger("honed")

MAX_BODY_BYTES = 8 * 1024 * 1024  # a 128k-token conversation is ~0.5 MB of text
BODY_TIMEOUT_S = 30.0
HEADER_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5.0
LIMIT_CONCURRENCY = 1000
# Behind a reverse proxy every connection is the proxy's: its pool must stay under this.
MAX_CONNECTIONS_PER_CLIENT = 256
DISCONNECT_POLL_S = 0.25  # how soon a hung-up client's generation stops
# On SIGTERM (every deploy) the requests being generated may finish this long before they are
# cut off: at 5 s, clients got a bare 500 and their runs were lost. Under Kubernetes' default
# 30 s grace period.
GRACEFUL_SHUTDOWN_S = 25
MAX_HEADER_BYTES = 64 * 1024
# Header lines of a request, and chunks of a chunked body: h11 parses each in Python on the event
# loop, and 6,000 `a:b` lines (30 KB) cost 29 ms a request, 1-byte chunks ~7 us each; a client
# sending either stalled everyone else's requests for 7-37 s (a QA pass, session 22).
MAX_HEADER_LINES = 128
MAX_BODY_CHUNKS = 4_096  # (16,384 chunks of 256 bytes a request: honest requests 0.75 s, a review)
# ... and a body's chunks past the first 256 average at least this many bytes (a client streaming
# its body sends kilobytes a chunk): 16,384 1-byte chunks a request, reconnecting, still held the
# loop (honest requests 4.6 s, `benchmarks/server_floods.py`).
MIN_CHUNK_BYTES = 256
TRIM_AFTER_BYTES = 1024 * 1024  # after a body this large, hand freed memory back to the OS
# A response's part the client has not taken within this long: the client stopped reading, and
# its connection is closed (a QA pass, session 23: a stalled stream held its request slot, and the
# version that served it, weights and all, through any number of promotions).
# (Two minutes: uvicorn's send waits for its buffer to drain from 64 to 16 KiB, 48 s for a reader
# taking 1 KiB/s, a second review, session 23.)
STALLED_SEND_S = float(os.environ.get("HONED_STALLED_SEND_S", "120"))


BODY_READS_PER_CLIENT = 2  # a client's requests reading and parsing their bodies at once
# A client's request bodies still arriving `ARRIVING_GRACE_S` after their headers, at once: beyond,
# 429. Four addresses trickling 255 bodies each held every request slot (all others got 503), and
# 100 bodies of 8 MB held back by their last byte took 0.9 GB (a QA pass). A body that arrives
# within the grace never counts: counting every body sent in more than one piece refused half of
# 16 agents on one host sending 200 KB conversations at LAN speed (a QA pass, session 20).
ARRIVING_BODIES_PER_CLIENT = 8
ARRIVING_GRACE_S = 0.5
ARRIVING_AT_ONCE_PER_CLIENT = 64  # ... and arriving at all, slow or not (a quarter of its connections)


def client_key(host: str) -> str:
    """Whom limits per client count together: an IPv4 address, or an IPv6 address's /64 (one
    host holds a whole /64: counted by address, it would open connections without end)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address.ipv4_mapped or address) if isinstance(address, ipaddress.IPv6Address) else host


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
    label_keys: Sequence[str] | str | None = None,
    labels: Mapping[str, Any] | None = None,
    capture: bool = True,
    poll_interval: float | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout_s: float = BODY_TIMEOUT_S,
    **model_settings: Any,
) -> FastAPI:
    """The FastAPI app serving `names` from `store`. `api_key` enables bearer auth (as vLLM's
    `--api-key`); `label_keys` are keys whose requests' metadata labels the captured run and
    `labels` the operator's labels for every run (see the module docstring); `capture=False`
    stores nothing; `model_settings` go to each `ServedModel` (`temperature`, `max_tokens`,
    `model_kwargs` ...)."""
    store = open_store(store, verdict_key=False) if isinstance(store, str) else store
    if not names:
        raise ValueError("serve at least one model name")
    keys = _Keys(api_key, label_keys)
    operator_labels = dict(labels or {})
    settings = dict(model_settings)
    if poll_interval is not None:
        settings["poll_interval"] = poll_interval
    served = {name: ServedModel(store, name, backend="local", **settings) for name in names}
    handler = None
    if capture:
        from honed.capture.callbacks import CallbackHandler

        own = sorted({k for k in (api_key, *_as_list(label_keys)) if k}, key=len, reverse=True)
        handler = CallbackHandler(store=store, redact=_without(own)) if own else CallbackHandler(store=store)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        for model in served.values():
            model.close()
        if handler is not None:
            from honed.capture.instrument import flush

            flush(10)

    readers = PerClient(BODY_READS_PER_CLIENT)
    app = FastAPI(title="honed", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.served = served
    app.state.store = store
    app.add_middleware(_BodyGuard, max_bytes=max_body_bytes, timeout_s=body_timeout_s)

    @app.exception_handler(_HTTPError)
    async def _http_error(_request: Request, exc: _HTTPError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), exc.kind, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("the request is not valid"), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        error = _internal(exc)
        return JSONResponse(error_body(str(error), error.kind), status_code=error.status)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health(request: Request) -> dict[str, Any]:
        """Up or not, for anyone (a load balancer has no key, and may ask with HEAD: 405 before, a
        QA pass, session 25); what it serves only with the key (a QA pass, session 20: names and
        live versions went to whoever asked)."""
        try:
            keys.authorize(request)
        except _HTTPError:
            return {"status": "ok"}
        return {"status": "ok", "models": {n: (m.live.ref if m.live else None) for n, m in served.items()}}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        keys.authorize(request)
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

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        """One entry of `/v1/models` (`client.models.retrieve`), or 404."""
        listed = await models(request)
        found = next((m for m in listed["data"] if m["id"] == model_id), None)
        if found is None:
            raise _HTTPError(
                404, f"no model {model_id!r} is served here", "not_found_error", "model", "model_not_found"
            )
        return found

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        can_label = keys.authorize(request)
        # Whose rows these are, for the batch's per-client cap (this request's task only).
        client = client_key(request.client.host) if request.client is not None else None
        current_client.set(client)

        def read() -> tuple[ChatRequest, ServedModel, dict[str, Any]]:
            # Off the event loop, all of it: a body of 3.7 million numbers in `metadata` took
            # 0.35 s to parse and as long again to measure for the metadata cap.
            chat = _read_chat(raw, served)
            model = _resolve(served, chat.model)
            return chat, model, _labels(model.name, chat, operator_labels, can_label=can_label)

        try:
            async with readers.turn(client):  # one client's 8 MB bodies parse a few at a time
                raw = await request.body()
                chat, model, run_labels = await run_in_threadpool(read)
        except BadRequest as exc:
            raise _HTTPError(400, str(exc), "invalid_request_error", exc.param, exc.code) from exc
        capture = None if handler is None else _request_capture(handler, chat, len(raw))
        config = _run_config(model.name, run_labels, capture)
        call = model.bind(stop=chat.stop, **chat.call_kwargs) if chat.stop else model.bind(**chat.call_kwargs)
        if chat.stream:
            return await _stream(request, call, chat, config, capture)
        completion = protocol.completion_id()
        # Each choice is a run of its own, labelled with the completion and its index: the n
        # attempts at one request are a group (`n` samples of the same task).
        configs = [
            _run_config(model.name, {**run_labels, "completion_id": completion, "choice": i}, capture)
            for i in range(chat.n)
        ] if chat.n > 1 else [config]  # fmt: skip
        answers: asyncio.Future[Any] | None = None
        try:
            async with model.pinned():  # the n choices come from one version, whatever is promoted
                answers = asyncio.gather(*(call.ainvoke(chat.messages, config=c) for c in configs))
                replies = await _unless_client_leaves(request, answers)
        except NoLiveVersion as exc:
            # Refused before any run began (pinning found no version): run once, unpinned, so the
            # refusal is stored as a stub like a streamed request's (it raises the same at once).
            with contextlib.suppress(Exception):
                await call.ainvoke(chat.messages, config=configs[0])
            raise _as_http_error(exc) from exc
        except Exception as exc:
            if answers is not None:  # the other choices: one refused, all are (the same prompt)
                answers.cancel()
            raise _as_http_error(exc) from exc
        except asyncio.CancelledError:
            # The server stopped past its grace period: the runs end as cancelled, and are stored.
            if capture is not None:
                capture.recorder.abandon(asyncio.CancelledError("the server stopped before the reply"))
            raise
        if replies is None:  # nobody to answer: the runs end as cancelled (LangChain says nothing)
            if capture is not None:
                capture.recorder.abandon(asyncio.CancelledError("the client closed the request"))
            return JSONResponse(
                error_body("the client closed the request", code="client_closed"), status_code=499
            )
        messages = [r for r in replies if isinstance(r, AIMessage)]
        model_id = messages[0].response_metadata.get("model_version") or model.name
        return JSONResponse(protocol.completion_body(messages, chat, model_id, completion=completion))

    return app


def serve(
    store: str | None,
    names: Sequence[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    label_keys: Sequence[str] | str | None = None,
    labels: Mapping[str, Any] | None = None,
    capture: bool = True,
    poll_interval: float | None = None,
    log_level: str = "info",
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout_s: float = BODY_TIMEOUT_S,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    keep_alive_s: float = KEEP_ALIVE_S,
    limit_concurrency: int | None = LIMIT_CONCURRENCY,
    announce: Callable[[str], None] | None = None,
    **model_settings: Any,
) -> None:
    """Run the server until interrupted (what `honed serve` does). `announce` gets the base URL
    once the socket is bound: with `port=0` only then is the port known."""
    import uvicorn

    app = create_app(
        open_store(store, verdict_key=False),
        names,
        api_key=api_key,
        label_keys=label_keys,
        labels=labels,
        capture=capture,
        poll_interval=poll_interval,
        max_body_bytes=max_body_bytes,
        body_timeout_s=body_timeout_s,
        **model_settings,
    )
    config = server_config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        header_timeout_s=header_timeout_s,
        keep_alive_s=keep_alive_s,
        limit_concurrency=limit_concurrency,
    )
    logging.getLogger("uvicorn.access").addFilter(_no_query_strings)  # after uvicorn set its logging up
    server = uvicorn.Server(config)
    if announce is not None:
        startup = server.startup

        async def startup_then_announce(sockets: Any = None) -> None:
            await startup(sockets=sockets)
            if server.started and server.servers:
                announce(endpoint_url(*server.servers[0].sockets[0].getsockname()[:2]))

        server.startup = startup_then_announce  # type: ignore[method-assign]
    server.run()


def endpoint_url(host: str, port: int) -> str:
    """The URL a client on this machine uses: a server bound to every interface (0.0.0.0, ::) is
    reached at loopback (`http://0.0.0.0:8000/v1` is no address to connect to)."""
    if host in ("0.0.0.0", "::", ""):
        host = "::1" if ":" in host else "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"


def _no_query_strings(record: logging.LogRecord) -> bool:
    """uvicorn's access log line without the request's query string: a client putting its key
    there (`?api_key=...`) had it written to the log, refused or not."""
    args = record.args
    if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
        record.args = (*args[:2], args[2].split("?", 1)[0] + "?…", *args[3:])
    return True


def server_config(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    header_timeout_s: float = HEADER_TIMEOUT_S,
    keep_alive_s: float = KEEP_ALIVE_S,
    limit_concurrency: int | None = LIMIT_CONCURRENCY,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> Any:
    """The uvicorn configuration `serve` runs: h11 with a deadline for headers (see the module
    docstring), bounded header size, keep-alive and concurrency."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=_guarded_h11(header_timeout_s),
        timeout_keep_alive=max(1, round(keep_alive_s)),
        h11_max_incomplete_event_size=max_header_bytes,
        limit_concurrency=limit_concurrency,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        lifespan="on",
        # No route speaks WebSocket: an upgrade is a plain request. Upgraded, a connection left
        # the guarded protocol uncounted-down (a QA pass, session 23: 256 upgrades from one
        # address locked it out until a restart).
        ws="none",
    )


# -- request handling ----------------------------------------------------------------------------


def _as_list(keys: Sequence[str] | str | None) -> list[str]:
    return [keys] if isinstance(keys, str) else list(keys or ())


def _without(keys: Sequence[str]) -> Callable[[str], str]:
    """A redaction hook taking the server's own keys out of what is stored, however they are
    written around: a client pasting them (or a tool printing them) must not land them at rest."""

    def hook(text: str) -> str:
        for key in keys:
            if key in text:
                text = text.replace(key, "[REDACTED:api_key]")
        return text

    return hook


class _Keys:
    """Who may call (`api_key`, or any label key) and who may label (a label key)."""

    def __init__(self, api_key: str | None, label_keys: Sequence[str] | str | None) -> None:
        self.api_key = api_key.encode() if api_key else None
        self.label_keys = [k.encode() for k in _as_list(label_keys) if k]

    def authorize(self, request: Request) -> bool:
        """Whether the request may label its run; 401 when a key is required and not given."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        # every key is compared, in constant time, whichever matches
        labels = any([hmac.compare_digest(given, key) for key in self.label_keys]) if given else False
        if labels or self.api_key is None or (given and hmac.compare_digest(given, self.api_key)):
            return labels
        raise _HTTPError(
            401,
            "Incorrect API key provided: pass it as 'Authorization: Bearer <key>' (honed serve --api-key / HONED_API_KEY)",
            "invalid_request_error",
            code="invalid_api_key",
        )


def _read_chat(raw: bytes, served: dict[str, ServedModel]) -> ChatRequest:
    """The request, decoded, checked and converted: run on a worker thread, since a long
    conversation is a second of Python, during which the event loop would serve no one else.
    What cannot fit the model's context window is refused before it is converted."""
    body = protocol.loads(raw)
    requested = body.get("model") if isinstance(body, dict) else None
    model = served.get(requested.partition("@")[0]) if isinstance(requested, str) else None
    protocol.check_fits(
        body,
        model.context_window if model is not None else None,
        model.message_tokens if model is not None else 1,
        model.max_prompt_chars if model is not None else None,
    )
    return protocol.parse_chat_request(body)


def _labels(name: str, chat: ChatRequest, operator: dict[str, Any], *, can_label: bool) -> dict[str, Any]:
    """The captured run's metadata: server, then operator labels; the client's own metadata on
    top only from a label key, else kept apart under `client` (see the module docstring)."""
    labels: dict[str, Any] = {"agent": name, "source": "honed serve", **operator}
    said = dict(chat.metadata)
    if chat.user is not None:
        said["user"] = chat.user
    if can_label:
        labels.update(said)
        labels["labels_from"] = "label key"
        return labels
    if said:
        if len(json.dumps(said, default=str)) > protocol.MAX_CLIENT_METADATA_BYTES:
            raise BadRequest(
                f"metadata is over {protocol.MAX_CLIENT_METADATA_BYTES} bytes", "metadata", "too_large"
            )
        labels["client"] = said
    labels["labels_from"] = "operator"
    return labels


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


def _run_config(name: str, labels: dict[str, Any], handler: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"run_name": name, "metadata": {"honed": labels}}
    if handler is not None:
        config["callbacks"] = [handler]
    return config


def _request_capture(handler: Any, chat: ChatRequest, body_bytes: int) -> Any:
    """The capture handler of one request: `handler`'s, with its runs' starts held by
    `_RefusalStubs` until the model answers or fails."""
    from honed.capture.callbacks import CallbackHandler

    calls = sum(
        len(m.tool_calls) + len(m.invalid_tool_calls) for m in chat.messages if isinstance(m, AIMessage)
    )
    sent = {
        "messages": len(chat.messages),
        "tool_calls": calls,
        "tools": len(chat.call_kwargs.get("tools") or ()),
        "body_bytes": body_bytes,
    }
    return CallbackHandler(recorder=_RefusalStubs(handler.recorder, sent))


class _RefusalStubs:
    """Between a request's capture handler and the recorder: holds the start of each run the
    request makes until it ends. A run refused before generating (beyond the context window,
    too slow to prepare, refused by the template, no live version) is stored as a stub: its
    error, its labels and `metadata.refused`, the counts and size of what was sent, not the
    conversation (8 MB refused conversations, stored whole, put everyone's capture tens of
    seconds behind and grew the store by hundreds of MB). Any other run is stored whole."""

    def __init__(self, recorder: Any, sent: dict[str, int]) -> None:
        self.recorder, self.sent = recorder, sent
        self.held: dict[Any, tuple[Any, ...]] = {}

    def emit(self, event: tuple[Any, ...]) -> None:
        kind, run_id, parent_id = event[0], event[1], event[2]
        if kind == START and parent_id is None:
            self.held[run_id] = event
            return
        start = self.held.pop(run_id, None)
        if start is not None:
            if kind == ERROR and _refused_before_generating(event[4]):
                start = self._stub(start)
            self.recorder.emit(start)
        self.recorder.emit(event)

    def abandon(self, error: BaseException) -> None:
        """End every run still open with `error`: a cancelled `ainvoke` (the client hung up)
        never reports its end, so without this the runs would not be stored at all."""
        for run_id in list(self.held):
            self.emit((ERROR, run_id, None, time.time(), error))

    def _stub(self, start: tuple[Any, ...]) -> tuple[Any, ...]:
        run_kind, name, _inputs, metadata, tags, extra = start[4]
        metadata = dict(metadata or {})
        metadata["honed"] = {**(metadata.get("honed") or {}), "refused": dict(self.sent)}
        extra = dict(extra or {})
        extra["tools"] = None
        settings = extra.get("settings")
        if isinstance(settings, dict):
            extra["settings"] = {k: v for k, v in settings.items() if k not in ("tools", "tool_choice")}
        return (*start[:4], (run_kind, name, [], metadata, tags, extra))


def _refused_before_generating(error: BaseException) -> bool:
    refusals = (ContextWindowExceeded, PromptTooSlow, InvalidGeneration, BadRequest, NoLiveVersion)
    return isinstance(error, refusals) or _is_template_error(error)


def _as_http_error(exc: BaseException) -> _HTTPError:
    if isinstance(exc, ContextWindowExceeded):
        return _HTTPError(400, str(exc), "invalid_request_error", "messages", "context_length_exceeded")
    if isinstance(exc, NoLiveVersion):
        return _HTTPError(503, str(exc), "server_error", "model", "model_not_ready")
    if isinstance(exc, BadRequest):
        return _HTTPError(400, str(exc), "invalid_request_error", exc.param, exc.code)
    if isinstance(exc, InvalidGeneration):
        return _HTTPError(400, str(exc), "invalid_request_error", None, "invalid_value")
    if isinstance(exc, PromptTooSlow):
        return _HTTPError(400, str(exc), "invalid_request_error", "messages", "prompt_too_slow")
    if _is_template_error(exc):  # the operator's template refused the conversation (its own words)
        return _HTTPError(
            400,
            f"the chat template refused these messages: {str(exc)[:300]}",
            "invalid_request_error",
            "messages",
        )
    return _internal(exc)


def _internal(exc: BaseException) -> _HTTPError:
    """A 500 that names a log entry, never the exception (its text may hold anything)."""
    reference = uuid.uuid4().hex[:12]
    log.error("honed serve: request failed (ref %s)", reference, exc_info=exc)
    return _HTTPError(
        500, f"the server failed to answer this request (ref {reference} in its log)", "server_error"
    )


def _is_template_error(exc: BaseException) -> bool:
    jinja = sys.modules.get("jinja2.exceptions")
    return jinja is not None and isinstance(exc, jinja.TemplateError)


async def _unless_client_leaves(request: Request, work: asyncio.Future[Any]) -> Any:
    """`work`'s result; None, `work` cancelled, when the client hangs up first, as a stream is, so its rows
    leave the batch at once (an abandoned `n=16, max_tokens=2000` request held every other
    client's request for minutes) and its run is stored as cancelled, not as delivered."""
    while True:
        try:
            done, _ = await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
        except asyncio.CancelledError:  # the server is stopping (past its grace period): so is the work
            work.cancel()
            raise
        if done:
            return work.result()
        if await request.is_disconnected():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            return None


async def _stream(
    request: Request, call: Any, chat: ChatRequest, config: dict[str, Any], capture: Any
) -> StreamingResponse | JSONResponse:
    """Start generating before answering, so errors that come first (context window, no live
    version) are plain HTTP errors; then stream the rest as server-sent events. A client that
    hangs up before the first chunk stops the work at once (its prompt was still rendered,
    tokenised and prefilled: 24 such requests held another client's for 11 s)."""
    chunks = call.astream(chat.messages, config=config).__aiter__()
    try:
        first = await _unless_client_leaves(request, asyncio.ensure_future(chunks.__anext__()))
    except StopAsyncIteration:
        first = AIMessageChunk(content="")
    except Exception as exc:
        await chunks.aclose()
        raise _as_http_error(exc) from exc
    if first is None:
        with contextlib.suppress(Exception):
            await chunks.aclose()
        if capture is not None:
            capture.recorder.abandon(asyncio.CancelledError("the client closed the request"))
        return JSONResponse(
            error_body("the client closed the request", code="client_closed"), status_code=499
        )
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
        if "token_ids" in extra:  # asked for (`return_token_ids`, vLLM's): this chunk's sampled ids
            choice["token_ids"] = extra.pop("token_ids")
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
            if chat.legacy_functions:
                delta = protocol.legacy_delta(delta)
            meta = chunk.response_metadata
            logprobs, ids = None, {}
            if meta.get("finish_reason"):
                finish = meta["finish_reason"]
                usage = chunk.usage_metadata
                if chat.logprobs:
                    logprobs = protocol.logprobs_body(meta)
                if chat.return_token_ids:  # all of them with the last chunk, as the local model gives them
                    ids = {
                        "token_ids": meta.get("token_ids"),
                        "prompt_token_ids": meta.get("prompt_token_ids"),
                    }
            if delta or logprobs or ids:
                yield event(delta, logprobs=logprobs, **ids)
            # Let the loop in between chunks: with the tokens queued ahead (a busy server), neither
            # the next chunk nor uvicorn's send would, so the hang-up went unseen (and the run was
            # stored as delivered) until the whole reply had been generated.
            await asyncio.sleep(0)
            chunk = await _next(chunks)
        reason = "tool_calls" if seen_calls else ("length" if finish == "length" else "stop")
        if seen_calls and chat.legacy_functions:
            reason = "function_call"
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


def _within_limit(app: Any, in_flight: list[int], limit: int) -> Any:
    """`app`, answering a JSON 503 when the server has `limit` requests in flight (`in_flight`,
    counted here: uvicorn's tasks include those of a burst not started yet, so a burst of 80
    requests under a limit of 60 refused all of them). Idle connections are not counted: at the
    limit, a new connection closes one."""

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        if in_flight[0] >= limit:
            log.warning("at the limit of %d connections and requests: 503", limit)
            body = json.dumps(
                error_body(
                    f"the server is at its limit of {limit} connections and requests; retry shortly",
                    "server_error",
                    code="server_busy",
                )
            ).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
                (b"connection", b"close"),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        in_flight[0] += 1
        try:
            await app(scope, receive, send)
        finally:
            in_flight[0] -= 1

    return guarded


async def _next(chunks: Any) -> AIMessageChunk | None:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None


# -- transport limits --------------------------------------------------------------------------------


class _ClientNotReading(Exception):
    """The client took no part of its response within `STALLED_SEND_S`."""


class _BodyGuard:
    """Reads a request's body before the app does, within `max_bytes` and `timeout_s`: 413 from
    `Content-Length` before reading any of it, or as soon as the bytes read pass the limit; 408
    when the body has not all arrived in time (a client trickling it); 429 when the client has
    `ARRIVING_BODIES_PER_CLIENT` bodies still arriving already. All close the connection. The app
    then reads the body from memory. A pure ASGI middleware: streamed responses and disconnects
    pass through untouched."""

    def __init__(self, app: Any, *, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self.arriving: Counter[str | None] = Counter()  # bodies still arriving, by client
        self.slow: Counter[str | None] = Counter()  # ... of them, still after `ARRIVING_GRACE_S`

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _refuse(send, 400, "the Content-Length header is not a number")
                return
            if declared > self.max_bytes:
                await _refuse(send, 413, f"the request body is over {self.max_bytes} bytes")
                return
        peer = scope.get("client")
        client = client_key(str(peer[0])) if peer else None
        body = await self._read(receive, send, client)
        if body is None:
            return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def within_deadline(message: dict[str, Any]) -> None:
            if message["type"] != "http.response.body":
                await send(message)
                return
            # `asyncio.timeout`, not `wait_for`: on Python 3.11 `wait_for` runs the send as a task
            # of its own and returns its result when a cancellation arrives as it ends, so the
            # cancellation Starlette sends a stream whose client hung up was swallowed.
            try:
                async with asyncio.timeout(STALLED_SEND_S):
                    await send(message)
            except TimeoutError:
                raise _ClientNotReading from None

        try:
            await self.app(scope, replay, within_deadline)
        except _ClientNotReading:
            # The response stops here; uvicorn closes a connection whose response is unfinished.
            log.warning(
                "honed: a client took no part of its response for %g s: its connection is closed",
                STALLED_SEND_S,
            )
        finally:
            if len(body) > TRIM_AFTER_BYTES:
                del body
                await asyncio.to_thread(_trim_memory)

    async def _read(
        self, receive: Callable[[], Awaitable[Any]], send: Any, client: str | None
    ) -> bytes | None:
        """The whole body, or None once refused (413, 408, 429) or the client went away."""
        chunks: list[bytes] = []
        total, more, arriving, slow = 0, True, False, False
        now = asyncio.get_running_loop().time()
        deadline, slow_at = now + self.timeout_s, now + ARRIVING_GRACE_S
        try:
            while more:
                try:
                    async with asyncio.timeout_at(
                        deadline if slow or not arriving else min(deadline, slow_at)
                    ):
                        message = await receive()
                except TimeoutError:
                    if slow or slow_at >= deadline:
                        await _refuse(
                            send, 408, f"the request body did not arrive within {self.timeout_s:g} s"
                        )
                        return None
                    # Still arriving after the grace: it counts against its client's slow bodies now.
                    slow = await _counted(
                        self.slow, client, ARRIVING_BODIES_PER_CLIENT, "arriving slowly", send
                    )
                    if not slow:
                        return None
                    continue
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > self.max_bytes:
                    await _refuse(send, 413, f"the request body is over {self.max_bytes} bytes")
                    return None
                chunks.append(chunk)
                more = message.get("more_body", False)
                if more and not arriving:  # not all of it came with the headers
                    arriving = await _counted(
                        self.arriving, client, ARRIVING_AT_ONCE_PER_CLIENT, "arriving", send
                    )
                    if not arriving:
                        return None
        finally:
            for counted, counter in ((arriving, self.arriving), (slow, self.slow)):
                if counted:
                    counter[client] -= 1
                    if counter[client] <= 0:
                        del counter[client]
        return b"".join(chunks)


async def _counted(
    counter: Counter[str | None], client: str | None, limit: int, what: str, send: Any
) -> bool:
    """Count one more of the client's bodies in `counter`, or answer 429 at its `limit`."""
    if counter[client] >= limit:
        await _refuse(send, 429, f"this client has {limit} request bodies {what}; send the rest first")
        return False
    counter[client] += 1
    return True


async def _refuse(send: Any, status: int, message: str) -> None:
    code = {408: "request_timeout", 413: "request_too_large", 429: "too_many_requests"}.get(
        status, "invalid_content_length"
    )
    payload = json.dumps(error_body(message, "invalid_request_error", code=code)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close"),
    ]
    if status == 429:  # what a client's retry waits (the `openai` client reads it)
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


_libc: Any = None


def _trim_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc keeps them after a large request)."""
    global _libc
    if not sys.platform.startswith("linux"):
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _guarded_h11(header_timeout_s: float, max_per_client: int = MAX_CONNECTIONS_PER_CLIENT) -> type:
    """uvicorn's h11 protocol with a deadline for a request's headers, counted from the
    connection's start or the end of the previous response: uvicorn has none (its keep-alive
    timer stops at the first byte), so a client sending a byte of headers now and then held its
    connection forever. The connection is closed at the deadline. And at most `max_per_client`
    connections from one address: uvicorn's `limit_concurrency` counts idle connections, so
    one client reopening 1,000 idle ones answered everyone else 503. At the server's limit, a new
    connection closes an idle one (waiting for its next request) of the address holding the most:
    a few addresses' idle connections fill no server. Beyond the limit of requests in flight, a
    request gets an OpenAI-style JSON 503 with `Retry-After` (uvicorn's is plain text, which
    OpenAI clients cannot read)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    per_client: dict[str, int] = {}  # open connections by client address, for this server
    in_flight = [0]  # requests being answered, for this server

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _client: str | None = None
        _refusal: str | None = None  # why a request is refused (400), said to its client
        _idle_since = 0.0

        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            self._limit = self.limit_concurrency
            self.limit_concurrency = None  # checked by `_within_limit`, answered in JSON
            if self._limit is not None:
                self.app = _within_limit(self.app, in_flight, self._limit)

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._idle_since = self.loop.time()
            self._header_lines = self._chunks = self._chunk_bytes = 0
            self._chunked, self._tail = False, b""
            self.conn.next_event = _counting(self.conn.next_event, self)
            peer = transport.get_extra_info("peername")
            address = client_key(str(peer[0])) if isinstance(peer, tuple) and peer else None
            if address is not None and per_client.get(address, 0) >= max_per_client:
                transport.close()  # one address holding every connection would lock out the rest
                return
            if address is not None:
                self._client = address
                per_client[address] = per_client.get(address, 0) + 1
            if self._limit is not None and len(self.connections) > self._limit:
                self._close_an_idle_one()
            self._watch_headers()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._idle_since = self.loop.time()

        def _idle(self) -> bool:
            """Waiting for its next request for a second or more: no request begun, none being
            answered (a connection just opened has its chance to send its request)."""
            return (
                self.conn.their_state is h11.IDLE
                and (self.cycle is None or self.cycle.response_complete)
                and not self.transport.is_closing()
                and self.loop.time() - self._idle_since >= 1.0
            )

        def _close_an_idle_one(self) -> None:
            idle = [
                c
                for c in self.connections
                if c is not self and isinstance(c, GuardedH11Protocol) and c._idle()
            ]
            if idle:  # the address holding the most; of its connections, the longest idle
                victim = max(idle, key=lambda c: (per_client.get(c._client or "", 0), -c._idle_since))
                victim.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.conn.their_state is h11.IDLE:  # headers arriving: their lines, counted in C
                seen = self._tail + data  # (the blank line ending them may straddle two reads)
                blank = _BLANK_LINE.search(seen)  # (CRLF or a bare LF, as h11 reads them)
                end, start = (blank.start() if blank else -1), len(self._tail)
                self._header_lines += seen.count(b"\n", start, len(seen) if end < 0 else max(end, start))
                self._tail = seen[-3:] if end < 0 else b""
                if self._header_lines > MAX_HEADER_LINES:
                    self.transport.write(_TOO_MANY_HEADERS)
                    self.transport.close()
                    return
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            self._watch_headers()

        def send_400_response(self, msg: str) -> None:
            """uvicorn's refusal of a request h11 (or the counts above) refused, in OpenAI's JSON."""
            said = self._refusal or msg
            body = json.dumps({"error": {"message": said, "type": "invalid_request_error", "param": None,
                                         "code": "invalid_request"}}).encode()  # fmt: skip
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            try:
                response = h11.Response(status_code=400, headers=headers, reason=b"Bad Request")
                self.transport.write(self.conn.send(response) or b"")
                self.transport.write(self.conn.send(h11.Data(data=body)) or b"")
                self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
            except h11.LocalProtocolError:
                pass  # no response can be sent on this connection any more: closed all the same
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_watching()
            if self._client is not None:
                left = per_client.get(self._client, 1) - 1
                if left > 0:
                    per_client[self._client] = left
                else:
                    per_client.pop(self._client, None)
                self._client = None
            super().connection_lost(exc)

        def _watch_headers(self) -> None:
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if not waiting:
                self._stop_watching()
            elif self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _stop_watching(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    def _counting(next_event: Callable[[], Any], protocol: Any) -> Callable[[], Any]:
        """h11's `next_event`, refusing (400, closed) a request with more than `MAX_HEADER_LINES`
        headers (sent behind another, past `data_received`'s count), more than `MAX_BODY_CHUNKS`
        chunks, or chunks under `MIN_CHUNK_BYTES` on average past the first 256."""

        def counted() -> Any:
            event = next_event()
            kind = type(event)
            if kind is h11.Data and protocol._chunked:  # (a sized body's reads are not chunks)
                protocol._chunks += 1
                protocol._chunk_bytes += len(event.data)
                if protocol._chunks > MAX_BODY_CHUNKS or (
                    protocol._chunks > 256 and protocol._chunk_bytes < MIN_CHUNK_BYTES * protocol._chunks
                ):
                    protocol._refusal = (
                        f"a chunked body in more than {MAX_BODY_CHUNKS} chunks, or past 256 chunks "
                        f"under {MIN_CHUNK_BYTES} bytes on average: send it in larger chunks, or with a Content-Length"
                    )
                    raise h11.RemoteProtocolError(protocol._refusal)
            elif kind is h11.EndOfMessage and len(event.headers) > MAX_HEADER_LINES:
                # a chunked body's trailers: header lines too (a review, session 22: 12,000 of them)
                protocol._refusal = f"more than {MAX_HEADER_LINES} trailer lines"
                raise h11.RemoteProtocolError(protocol._refusal)
            elif kind is h11.Request:
                protocol._chunks = protocol._chunk_bytes = protocol._header_lines = 0
                protocol._tail = b""
                protocol._chunked = any(
                    k.lower() == b"transfer-encoding" and b"chunked" in v.lower() for k, v in event.headers
                )
                if len(event.headers) > MAX_HEADER_LINES:
                    protocol._refusal = f"more than {MAX_HEADER_LINES} header lines"
                    raise h11.RemoteProtocolError(protocol._refusal)
            return event

        return counted

    return GuardedH11Protocol


_BLANK_LINE = re.compile(rb"\n\r?\n")
_TOO_MANY_HEADERS_BODY = json.dumps(
    {
        "error": {
            "message": "too many header lines",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }
    }
).encode()
_TOO_MANY_HEADERS = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
    % (len(_TOO_MANY_HEADERS_BODY), _TOO_MANY_HEADERS_BODY)
)
