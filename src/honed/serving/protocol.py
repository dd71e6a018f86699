"""The OpenAI chat-completions HTTP bodies of `honed serve`: requests in, completions out.

Plain functions over dicts, no web framework: a bad request raises `BadRequest` naming the
parameter, which the app turns into an OpenAI-style 400. The messages inside are converted by
`honed.messages`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage

from honed.messages import (
    CALL_OPEN,
    MessageError,
    content_text,
    invalid_call_text,
    langchain_messages,
    openai_message,
)

_SAMPLING = {"temperature": float, "top_p": float, "top_k": int}


class BadRequest(ValueError):
    """An invalid request; `param` names the offending field as OpenAI's errors do."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class ChatRequest:
    """The parts of a chat-completions request that honed acts on (the rest is accepted and ignored)."""

    model: str
    messages: list[BaseMessage]
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    stop: list[str] | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    return_token_ids: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)


def parse_chat_request(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", "model")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise BadRequest("messages must be a non-empty array", "messages")
    request = ChatRequest(model=model, messages=_messages(raw_messages))
    kwargs = request.call_kwargs
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" for t in tools
        ):
            raise BadRequest('tools must be an array of {"type": "function", "function": {...}}', "tools")
        if tools:
            kwargs["tools"] = tools
    if body.get("tool_choice") is not None:
        kwargs["tool_choice"] = body["tool_choice"]
    for key, cast in _SAMPLING.items():
        if body.get(key) is not None:
            kwargs[key] = _number(body[key], key, cast)
    budget = body.get("max_completion_tokens") or body.get("max_tokens")
    if budget is not None:
        kwargs["max_tokens"] = _number(budget, "max_tokens", int)
        if kwargs["max_tokens"] < 1:
            raise BadRequest("max_tokens must be at least 1", "max_tokens")
    if isinstance(body.get("chat_template_kwargs"), dict):
        kwargs["chat_template_kwargs"] = body["chat_template_kwargs"]
    stop = body.get("stop")
    if isinstance(stop, str):
        request.stop = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        request.stop = stop or None
    elif stop is not None:
        raise BadRequest("stop must be a string or an array of strings", "stop")
    request.n = _number(body.get("n", 1) or 1, "n", int)
    if not 1 <= request.n <= 16:
        raise BadRequest("n must be between 1 and 16", "n")
    request.stream = bool(body.get("stream"))
    if request.stream and request.n != 1:
        raise BadRequest("streaming supports n=1 only", "n")
    request.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    request.logprobs = bool(body.get("logprobs"))
    request.return_token_ids = bool(body.get("return_token_ids"))
    if request.logprobs:
        kwargs["return_tokens"] = True
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        request.metadata.update(metadata)
    if isinstance(body.get("user"), str):
        request.metadata["user"] = body["user"]
    return request


def completion_body(messages: Sequence[AIMessage], request: ChatRequest, model_id: str) -> dict[str, Any]:
    """A `chat.completion` object for one or more replies."""
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for index, message in enumerate(messages):
        meta = message.response_metadata
        choice: dict[str, Any] = {
            "index": index,
            "message": assistant_dict(message),
            "finish_reason": finish_reason(message),
            "logprobs": logprobs_body(meta) if request.logprobs else None,
        }
        if request.return_token_ids:
            choice["token_ids"] = meta.get("token_ids")
        choices.append(choice)
        counts = message.usage_metadata or {}
        usage["completion_tokens"] += int(counts.get("output_tokens", 0))
        usage["prompt_tokens"] = int(counts.get("input_tokens", 0))
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    body: dict[str, Any] = {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": choices,
        "usage": usage,
    }
    if request.return_token_ids and messages:
        body["prompt_token_ids"] = messages[0].response_metadata.get("prompt_token_ids")
    return body


def assistant_dict(message: AIMessage) -> dict[str, Any]:
    """An assistant reply as OpenAI's API writes it: `content` is null beside tool calls; a
    malformed call, having no OpenAI form, is its raw text in the content (as vLLM's tool parsers
    do)."""
    data = openai_message(message)
    if data.get("tool_calls") and not data["content"]:
        data["content"] = None
    return data


def chunk_delta(chunk: AIMessageChunk, *, text_sent: bool = False) -> dict[str, Any]:
    """The `delta` of one streamed chunk, saying what `assistant_dict` says of the whole reply: a
    malformed call (a chunk without a name, or the raw `<tool_call>` text the local parser keeps
    for one) is the model's text, appended to the content after a newline when text came before
    (`text_sent`: earlier in the stream)."""
    delta: dict[str, Any] = {}
    text = content_text(chunk.content)
    reasoning = chunk.additional_kwargs.get("reasoning_content")
    if reasoning:
        delta["reasoning_content"] = reasoning
    calls = []
    for c in chunk.tool_call_chunks:
        raw = str(c.get("args") or "")
        if c.get("name") and not raw.startswith(CALL_OPEN):
            calls.append((c, raw))
        else:
            text += ("\n" if text or text_sent else "") + invalid_call_text({"args": raw})
    if text:
        delta["content"] = text
    if calls:
        delta["tool_calls"] = [
            {
                "index": c.get("index") or i,
                "id": c.get("id"),
                "type": "function",
                "function": {"name": c["name"], "arguments": raw},
            }
            for i, (c, raw) in enumerate(calls)
        ]
    return delta


def finish_reason(message: AIMessage) -> str:
    reason = message.response_metadata.get("finish_reason") or "stop"
    if message.tool_calls:
        return "tool_calls"
    return "length" if reason == "length" else "stop"


def logprobs_body(meta: dict[str, Any]) -> dict[str, Any]:
    tokens = meta.get("tokens") or []
    return {
        "content": [
            {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")), "top_logprobs": []}
            for token, logprob in zip(tokens, meta.get("logprobs") or [], strict=False)
        ]
    }


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _messages(raw: list[Any]) -> list[BaseMessage]:
    try:
        return langchain_messages(raw)
    except MessageError as exc:
        where = f"messages[{exc.index}]"
        raise BadRequest(f"{where}: {exc}", f"{where}.{exc.field}" if exc.field else where) from exc


def _number(value: Any, name: str, cast: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{name} must be a number", name)
    return cast(value)
