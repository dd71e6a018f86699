"""The OpenAI chat-completions HTTP bodies of `honed serve`: requests in, completions out.

Plain functions over dicts, no web framework: a bad request raises `BadRequest` naming the
parameter, which the app turns into an OpenAI-style 400 (`{"error": {"message", "type":
"invalid_request_error", "param", "code"}}`).

Everything a client sends is checked here, before any of it reaches the model: the body is JSON
without `NaN`/`Infinity`, at most `MAX_DEPTH` levels deep and `MAX_CONTAINERS` arrays and objects
(`loads` checks both on the text, before parsing), and so is tool-call `arguments` sent as JSON
text (its arrays and objects counted across the request); `check_fits` refuses, by counting, a
conversation that cannot fit the model's context window before it is converted; every sampling
parameter has its type and range (`temperature` 0..2, `top_p` (0, 1], `top_k` -1.., `max_tokens`
1..`MAX_TOKENS_LIMIT`, `n` 1..16, `stop` up to `MAX_STOP` strings, `seed` a 64-bit integer,
`top_logprobs` 0 only); messages, tool calls and tools have their OpenAI shapes; `chat_template_kwargs` may only set the variables
in `TEMPLATE_KWARGS` (the chat template is the operator's: a client never supplies template text,
nor variables the template was not written to take). Accepted but not applied: `seed`,
`parallel_tool_calls`. The legacy `functions`/`function_call` are read as `tools`/`tool_choice`,
and such a request's reply says its call as that API did (`function_call`, finish_reason
"function_call"); a history's `function_call` and `function` messages are read too. `tool_choice` `"required"` or a named function (one of `tools`) makes the
reply open with a call (the call's head written for the model); `"none"`, or no tools, makes a
call the model writes anyway text. Checked, and refused unless neutral, since this server does not apply
them: `presence_penalty`/`frequency_penalty` (-2..2; only 0), vLLM's `repetition_penalty` (only
1), `logit_bias` (only empty), `top_logprobs` (only 0), `response_format` (only text), and those in
`NOT_APPLIED` (vLLM's guided decoding, `min_tokens`, `ignore_eos`, `best_of`, `echo`, ...). The messages
inside are converted by `honed.messages`.
"""

from __future__ import annotations

import json
import math
import re
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

MAX_DEPTH = 64  # nesting of the JSON body (tool schemas nest; nothing legitimate nests deeper)
MAX_CONTAINERS = 100_000  # arrays and objects in one body (a long agent conversation has thousands)
MAX_TOKENS_LIMIT = 1 << 20  # a completion budget beyond any context window is a mistake
MAX_MESSAGES = 10_000
MAX_TOOLS = 128
MAX_STOP = 16
MAX_STOP_CHARS = 512
MAX_N = 16
MAX_IDENTIFIER_CHARS = 256  # a message's name, a tool call's id, a function's name
MAX_CLIENT_METADATA_BYTES = 16 * 1024  # untrusted metadata a client may attach (OpenAI's is ~9 KB)
# Template variables a client may set, with their type: the qwen3-style templates' thinking
# switch. Anything else (above all `chat_template`, template text) is refused.
TEMPLATE_KWARGS: dict[str, type] = {"enable_thinking": bool}
TOOL_CHOICES = ("none", "auto", "required")


class BadRequest(ValueError):
    """An invalid request; `param` names the offending field as OpenAI's errors do."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class ChatRequest:
    """The parts of a chat-completions request that honed acts on (the rest is accepted and ignored).
    `metadata` and `user` are what the client said, unjudged: the app decides whether they label
    the captured run (see `honed.serving.app`)."""

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
    user: str | None = None
    legacy_functions: bool = False  # asked with `functions`: a call is answered as `function_call`


def loads(raw: bytes | str) -> Any:
    """The request body as JSON, or `BadRequest`: malformed, `NaN`/`Infinity` (not JSON; Python
    reads them by default), or nested beyond `MAX_DEPTH` (deeper, Python's parser recurses until
    RecursionError, and whatever walks the objects later would too)."""

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    if isinstance(raw, bytes) and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 with a byte-order mark: UTF-8
    if isinstance(raw, bytes) and json.detect_encoding(raw) != "utf-8":
        # The shape check reads UTF-8; `json.loads` reads UTF-16 and -32 too, whose bytes it
        # misreads (a review, session 23: a UTF-16 body of 1.3 million arrays counted none and
        # held the GIL 10 s). OpenAI's API takes UTF-8.
        raise BadRequest("the JSON body must be UTF-8", code="invalid_encoding")
    _check_shape(raw.encode() if isinstance(raw, str) else raw)
    try:
        body = json.loads(raw, parse_constant=constant)
    except RecursionError:
        raise BadRequest(
            f"the JSON body is nested more than {MAX_DEPTH} levels deep", code="too_deep"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        reason = str(exc)[:200]
        raise BadRequest(
            f"We could not parse the JSON body of your request ({reason}). The OpenAI API expects a JSON payload."
        ) from None
    if _SURROGATE_ESCAPE.search(raw.encode() if isinstance(raw, str) else raw) and _holds_lone_surrogate(
        body
    ):
        # JSON lets `\ud800` through; no tokenizer, store or UTF-8 encoder takes it.
        raise BadRequest(
            "the JSON body holds an unpaired UTF-16 surrogate escape (\\uD800-\\uDFFF): not text"
        )
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _lenient_json(text: str) -> Any:
    """`text` decoded as JSON, or the text itself when it is not JSON (checked for surrogates alike)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _holds_lone_surrogate(value: Any) -> bool:
    """Whether any string (or key) in a decoded body holds a surrogate code point: a pair of
    escapes decodes to one character, so any left is unpaired."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            todo += item.keys()
            todo += item.values()
        elif isinstance(item, list):
            todo += item
    return False


def check_fits(
    body: Any, context_window: int | None, message_tokens: int = 1, max_chars: int | None = None
) -> None:
    """Refuse, before converting anything, a decoded request that cannot fit a context window of
    `context_window` tokens (None: unknown, nothing refused): every message costs the prompt at
    least `message_tokens` (its template's turn head and end), every tool call at least one.
    Cheap (it counts), where converting what it refuses is not (9,000 messages of three tool
    calls each took 1.2 s; 2,040 one-letter messages 0.6 s of rendering). Anything malformed is
    left to `parse_chat_request`."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if context_window is None or not isinstance(messages, list):
        return
    tools = body.get("tools")
    if max_chars is not None and isinstance(tools, list) and tools:
        # The tools' schemas are rendered into the prompt: 128 tools of 40 properties (255 KB)
        # were parsed, converted, bound and captured before the prompt's length refused them, and
        # four clients sending them held others past a second (a QA pass, session 25).
        chars = len(json.dumps(tools, default=str))
        if chars > max_chars:
            raise BadRequest(
                f"the request's tools are {chars} characters of schema, more than the model's context "
                f"window ({context_window} tokens) can hold: offer fewer tools",
                "tools",
                "context_length_exceeded",
            )
    calls = sum(
        len(m["tool_calls"])
        for m in messages
        if isinstance(m, dict) and isinstance(m.get("tool_calls"), list)
    )
    if len(messages) * message_tokens + calls >= context_window:
        raise BadRequest(
            f"the request holds {len(messages)} messages ({message_tokens} tokens each at least) and "
            f"{calls} tool calls, but the model's context window is {context_window} tokens: shorten "
            "the conversation",
            "messages",
            "context_length_exceeded",
        )


# Parameters of OpenAI's API or vLLM's that would change the reply, which this server cannot apply:
# refused unless neutral (the values listed). Constrained decoding above all: a client asking for
# JSON by schema got free text and broke later.
NOT_APPLIED: dict[str, tuple[Any, ...]] = {
    **dict.fromkeys(
        (
            "guided_json",
            "guided_regex",
            "guided_choice",
            "guided_grammar",
            "structured_outputs",
            "prompt_logprobs",
            "prediction",
            "audio",
            "chat_template",  # template text: the operator's, never a client's
        ),
        (None,),
    ),
    "min_tokens": (None, 0),
    "ignore_eos": (None, False),
    "best_of": (None, 1),
    "echo": (None, False),
    "modalities": (None, ["text"]),
}


def parse_chat_request(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise BadRequest("you must provide a model parameter", "model")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise BadRequest("messages must be a non-empty array", "messages")
    if len(raw_messages) > MAX_MESSAGES:
        raise BadRequest(
            f"messages holds at most {MAX_MESSAGES} messages", "messages", "array_above_max_length"
        )
    request = ChatRequest(model=model, messages=_messages(raw_messages))
    kwargs = request.call_kwargs
    choice_param = "tool_choice"  # the field a refused choice is said to be in: the one the client sent
    if body.get("functions") is not None and body.get("tools") is None:
        # The legacy form (before `tools`): the same functions, the same choice, one call a reply
        # written back as `function_call` (its client reads nothing else).
        body = {**body, "tools": _legacy_functions(body["functions"])}
        request.legacy_functions = True
        if body.get("tool_choice") is None and body.get("function_call") is not None:
            choice, choice_param = body["function_call"], "function_call"
            body["tool_choice"] = (
                {"type": "function", "function": {"name": choice.get("name")}}
                if isinstance(choice, dict)
                else choice
            )
    tools = _tools(body.get("tools"))
    if tools:
        kwargs["tools"] = tools
    tool_choice = _tool_choice(body.get("tool_choice"))
    if isinstance(tool_choice, dict) or tool_choice == "required":
        names = {t["function"]["name"] for t in tools or ()}
        if not names:
            raise BadRequest(f"{choice_param} requires tools: none were given", choice_param)
        if isinstance(tool_choice, dict) and tool_choice["function"]["name"] not in names:
            raise BadRequest(
                f"{choice_param} names {tool_choice['function']['name'][:80]!r}, which is not one of the tools",
                choice_param,
            )
    _bool(body, "parallel_tool_calls")  # accepted (calls are made one a reply or several), but typed
    if tool_choice is not None:
        kwargs["tool_choice"] = tool_choice
    if not tools:  # no tools offered, nothing to call: a tool call the model writes is text
        kwargs["tool_choice"] = "none"
    temperature = _float(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        kwargs["temperature"] = temperature
    top_p = _float(body, "top_p", 0.0, 1.0, low_open=True)
    if top_p is not None:
        kwargs["top_p"] = top_p
    top_k = _int(body, "top_k", -1, MAX_TOKENS_LIMIT)  # vLLM's extension; -1 and 0 mean off
    if top_k is not None:
        kwargs["top_k"] = max(0, top_k)
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        low, high, neutral = (0.0, 2.0, 1.0) if name == "repetition_penalty" else (-2.0, 2.0, 0.0)
        value = _float(body, name, low, high, low_open=name == "repetition_penalty")
        if value is not None and value != neutral:
            raise BadRequest(
                f"{name} is not supported by this server (only {neutral:g})", name, "unsupported_value"
            )
    for name, neutral in NOT_APPLIED.items():
        if name in body and body[name] not in neutral:
            raise BadRequest(f"{name} is not supported by this server", name, "unsupported_value")
    if body.get("function_call") is not None and body.get("functions") is None:
        raise BadRequest(
            "function_call names a function of `functions`, which were not given", "function_call"
        )
    bias = body.get("logit_bias")
    if bias is not None and (not isinstance(bias, dict) or bias):
        raise BadRequest("logit_bias is not supported by this server", "logit_bias", "unsupported_value")
    _int(body, "seed", -(1 << 63), (1 << 64) - 1)  # accepted, not applied
    if _int(body, "top_logprobs", 0, 20):  # the alternatives are not computed: not an empty list
        raise BadRequest(
            "top_logprobs is not supported by this server (only 0): logprobs gives each sampled token's "
            "own log-probability, without alternatives",
            "top_logprobs", "unsupported_value",
        )  # fmt: skip
    wanted = body.get("response_format")
    if wanted is not None and not (isinstance(wanted, dict) and wanted.get("type") == "text"):
        # Decoding is not constrained here: a 200 with text that is not JSON broke the client later.
        raise BadRequest(
            'response_format is not supported by this server (only {"type": "text"}): ask for the '
            "shape in the prompt, or use tools",
            "response_format", "unsupported_value",
        )  # fmt: skip
    for name in ("max_completion_tokens", "max_tokens"):
        budget = _int(body, name, 1, MAX_TOKENS_LIMIT)
        if budget is not None:
            kwargs["max_tokens"] = budget
            break
    template = body.get("chat_template_kwargs")
    if template is not None:
        kwargs["chat_template_kwargs"] = _template_kwargs(template)
    request.stop = _stop(body.get("stop"))
    n = _int(body, "n", 1, MAX_N)
    request.n = 1 if n is None else n
    request.stream = _bool(body, "stream")
    if request.stream and request.n != 1:
        raise BadRequest("streaming supports n=1 only", "n")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", "stream_options", "invalid_type")
    if options is not None and not request.stream:  # OpenAI's rule
        raise BadRequest("stream_options is only allowed when stream is true", "stream_options")
    request.include_usage = _bool(options or {}, "include_usage", "stream_options.include_usage")
    request.logprobs = _bool(body, "logprobs")
    request.return_token_ids = _bool(body, "return_token_ids")
    if request.logprobs:
        kwargs["return_tokens"] = True
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise BadRequest("metadata must be an object", "metadata", "invalid_type")
        request.metadata.update(metadata)
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str) or len(user) > 512:
            raise BadRequest("user must be a string of at most 512 characters", "user", "invalid_type")
        request.user = user
    return request


def completion_body(
    messages: Sequence[AIMessage], request: ChatRequest, model_id: str, *, completion: str | None = None
) -> dict[str, Any]:
    """A `chat.completion` object for one or more replies (`completion`: its id, made here if None)."""
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for index, message in enumerate(messages):
        meta = message.response_metadata
        choice: dict[str, Any] = {
            "index": index,
            "message": assistant_dict(message),
            "finish_reason": finish_reason(message),
            "logprobs": logprobs_body(meta) if request.logprobs else None,
        }
        if request.legacy_functions:
            choice = as_function_call(choice)
        if request.return_token_ids:
            choice["token_ids"] = meta.get("token_ids")
        choices.append(choice)
        counts = message.usage_metadata or {}
        usage["completion_tokens"] += int(counts.get("output_tokens", 0))
        usage["prompt_tokens"] = int(counts.get("input_tokens", 0))
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    body: dict[str, Any] = {
        "id": completion or completion_id(),
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


def as_function_call(choice: dict[str, Any]) -> dict[str, Any]:
    """A choice in the legacy shape: its first tool call as `function_call` (that API has one
    call a reply), finish_reason "function_call"."""
    message = dict(choice["message"])
    calls = message.pop("tool_calls", None)
    if not calls:
        return choice
    message["function_call"] = calls[0]["function"]
    return {**choice, "message": message, "finish_reason": "function_call"}


def legacy_delta(delta: dict[str, Any]) -> dict[str, Any]:
    """A streamed delta in the legacy shape: the first call's pieces as `function_call`."""
    calls = delta.pop("tool_calls", None)
    first = [c for c in calls or () if c.get("index", 0) == 0]
    if first:
        function = first[0]["function"]
        delta["function_call"] = {"name": function.get("name"), "arguments": function.get("arguments") or ""}
    return delta


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
    """A request's messages as LangChain messages: their JSON shapes are checked here (each
    field's type, named in the 400), the conversion is `honed.messages`'."""
    containers = 0  # in the JSON text of tool-call arguments, all messages together
    raw = [_modern(message) for message in raw]
    calls: list[Any] | None = None  # the tool calls of the last assistant message
    for index, message in enumerate(raw):
        containers += _check_message(message, f"messages[{index}]")
        if message["role"] == "assistant":
            calls = message.get("tool_calls") or []
        elif message["role"] == "tool":
            _check_answers(message.get("tool_call_id"), calls, f"messages[{index}]")
        if containers > MAX_CONTAINERS:
            raise BadRequest(
                f"the tool-call arguments hold more than {MAX_CONTAINERS} arrays and objects",
                f"messages[{index}]",
                "too_large",
            )
    try:
        return langchain_messages(raw)
    except MessageError as exc:
        where = f"messages[{exc.index}]"
        raise BadRequest(f"{where}: {exc}", f"{where}.{exc.field}" if exc.field else where) from exc


def _check_answers(call_id: str | None, calls: list[Any] | None, where: str) -> None:
    """A tool message answers a call of the assistant message before it, as OpenAI requires (a
    result for a call never made was accepted, and stored as the run's tool result). Without an
    id, the conversion pairs it with the call before it, or names the missing id."""
    if call_id is None:
        return
    if not calls:
        raise BadRequest(
            f"{where}: a tool message must answer a tool call of an assistant message before it",
            f"{where}.role",
        )
    ids = [c.get("id") for c in calls]
    if call_id is not None and None not in ids and call_id not in ids:
        raise BadRequest(
            f"{where}.tool_call_id {call_id!r} answers none of the tool calls before it ({', '.join(ids)})",
            f"{where}.tool_call_id",
        )


def _modern(message: Any) -> Any:
    """An assistant message of the legacy API (`function_call`, answered by a `function` message,
    which reads as the tool result of the call before it) with that call as its one tool call."""
    if not isinstance(message, dict) or message.get("function_call") is None or message.get("tool_calls"):
        return message
    rest = {k: v for k, v in message.items() if k != "function_call"}
    return {**rest, "tool_calls": [{"type": "function", "function": message["function_call"]}]}


def _check_message(message: Any, where: str) -> int:
    """Check one message's JSON shape; the number of arrays and objects in its tool calls'
    argument text (JSON inside a string: the body's limits hold for it too)."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadRequest(f"{where} must be an object with a role", where)
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(part, dict) for part in content):
            raise BadRequest(f"{where}.content: each part must be an object", f"{where}.content")
    elif content is not None and not isinstance(content, str):
        raise BadRequest(f"{where}.content must be a string or an array of parts", f"{where}.content")
    for key in ("name", "tool_call_id"):
        _identifier(message.get(key), f"{where}.{key}")
    calls = message.get("tool_calls")
    if calls is None:
        return 0
    if not isinstance(calls, list):
        raise BadRequest(f"{where}.tool_calls must be an array", f"{where}.tool_calls", "invalid_type")
    containers = 0
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(
                f'{at} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}', at
            )
        _identifier(call.get("id"), f"{at}.id")
        _identifier(function["name"], f"{at}.function.name")
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, str | dict):
            raise BadRequest(f"{at}.function.arguments must be a JSON string", f"{at}.function.arguments")
        if isinstance(arguments, str):
            param = f"{at}.function.arguments"
            text = arguments.encode("utf-8", "surrogatepass")
            containers += _check_shape(text, param, param)
            if _SURROGATE_ESCAPE.search(text) and _holds_lone_surrogate(_lenient_json(arguments)):
                raise BadRequest(
                    f"{at}.function.arguments holds an unpaired UTF-16 surrogate escape: not text", param
                )
    return containers


def _identifier(value: Any, param: str) -> None:
    """A name or id (a message's `name`, a call's `id`, a function's name): a string of at most
    `MAX_IDENTIFIER_CHARS`. Never rendered, they were never counted either: 80 messages each named
    with 95,000 characters (7.6 MB) were accepted as a 572-token prompt, and held an honest client's
    replies at 1.4 s (a QA pass, session 28). OpenAI allows 64 characters for a function's name."""
    if value is None:
        return
    if not isinstance(value, str):
        raise BadRequest(f"{param} must be a string", param, "invalid_type")
    if len(value) > MAX_IDENTIFIER_CHARS:
        raise BadRequest(
            f"{param} holds at most {MAX_IDENTIFIER_CHARS} characters", param, "string_above_max_length"
        )


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    shape = 'tools must be an array of {"type": "function", "function": {"name", "parameters"}}'
    if not isinstance(value, list):
        raise BadRequest(shape, "tools", "invalid_type")
    if len(value) > MAX_TOOLS:
        raise BadRequest(f"tools holds at most {MAX_TOOLS} tools", "tools", "array_above_max_length")
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
            or len(function["name"]) > MAX_IDENTIFIER_CHARS
            or not isinstance(function.get("parameters", {}), dict)
            or not isinstance(function.get("description", ""), str)
        ):
            raise BadRequest(shape, f"tools[{i}]")
    return value


def _legacy_functions(value: Any) -> Any:
    if not isinstance(value, list):
        raise BadRequest("functions must be an array of function definitions", "functions", "invalid_type")
    return [{"type": "function", "function": f} for f in value]


def _tool_choice(value: Any) -> Any:
    if value is None or value in TOOL_CHOICES:
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return value
    raise BadRequest(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name"}}',
        "tool_choice",
    )


def _template_kwargs(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest("chat_template_kwargs must be an object", "chat_template_kwargs", "invalid_type")
    allowed = ", ".join(sorted(TEMPLATE_KWARGS))
    for key, item in value.items():
        kind = TEMPLATE_KWARGS.get(key)
        if kind is None:
            raise BadRequest(
                f"chat_template_kwargs may set only {allowed} ({str(key)[:40]!r} given): the chat template is the server's",
                f"chat_template_kwargs.{str(key)[:40]}",
                "unsupported_parameter",
            )
        if not isinstance(item, kind):
            raise BadRequest(
                f"chat_template_kwargs.{key} must be a {kind.__name__}",
                f"chat_template_kwargs.{key}",
                "invalid_type",
            )
    return dict(value)


def _stop(value: Any) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest("stop must be a string or an array of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise BadRequest(f"stop holds at most {MAX_STOP} strings of {MAX_STOP_CHARS} characters", "stop")
    return [s for s in stops if s] or None


def _bool(body: dict[str, Any], key: str, param: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{param or key} must be a boolean", param or key, "invalid_type")
    return value


def _float(
    body: dict[str, Any], key: str, low: float, high: float, *, low_open: bool = False
) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{key} must be a number", key, "invalid_type")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float (400 digits)
        number = math.inf
    if not math.isfinite(number):
        raise BadRequest(f"{key} must be a finite number", key, "invalid_value")
    if number < low or (low_open and number == low) or number > high:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise BadRequest(f"{key} must be in {bounds} ({number:g} given)", key, "invalid_value")
    return number


def _int(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer", key, "invalid_type")
    if not low <= value <= high:
        shown = str(value) if abs(value) < 10**30 else f"{str(value)[:12]}..."
        raise BadRequest(f"{key} must be between {low} and {high} ({shown} given)", key, "invalid_value")
    return value


# A string, or one never closed, to the end (a QA pass, session 23: required to close, an unclosed
# one was rescanned from each quote: a 48 KB body held the GIL 10 s, 8 MB would for hours).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?')
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def _check_shape(raw: bytes, what: str = "the request", param: str | None = None) -> int:
    """The number of arrays and objects in JSON text `raw`; `BadRequest` (naming `what` and
    `param`) for more than `MAX_CONTAINERS` or nesting beyond `MAX_DEPTH`, from its text at C
    speed, before parsing: drop the strings, keep the brackets, peel the innermost pairs once per
    level. (Python's parser holds the GIL throughout: a body of a million tiny arrays froze the
    event loop for seconds; walking the objects afterwards cost more.)"""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    containers = len(brackets) // 2
    if containers > MAX_CONTAINERS:
        raise BadRequest(f"{what} holds more than {MAX_CONTAINERS} arrays and objects", param, "too_large")
    for _level in range(MAX_DEPTH):
        if not brackets:
            return containers
        brackets = brackets.replace(b"[]", b"").replace(b"{}", b"")
    if len(brackets.replace(b"[]", b"").replace(b"{}", b"")) < len(brackets):  # still peeling: deep
        raise BadRequest(f"{what} is nested more than {MAX_DEPTH} levels deep", param, "too_deep")
    return containers
