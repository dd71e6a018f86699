"""Message conversion, once: LangChain messages, the stored form, OpenAI chat, chat templates.

The same conversation in four shapes:

- **LangChain** `BaseMessage`s: what agents speak.
- **stored**: what the capture layer writes into a step, close to OpenAI's shape but with
  LangChain's naming: `{"role", "content", "name"?, "tool_calls"?, "invalid_tool_calls"?,
  "tool_call_id"?, "reasoning"?, "status"?}`, tool calls `{"name", "args", "id"}` with `args` an
  object. Content is kept as captured (text blocks are joined; a list with other blocks stays).
- **OpenAI chat**: requests, responses and fine-tuning rows. Tool calls are `{"id", "type":
  "function", "function": {"name", "arguments"}}` with `arguments` a JSON string, reasoning is
  `reasoning_content`.
- **template**: what `apply_chat_template` renders: OpenAI's shape, but `content` always a
  string, `reasoning_content` a string and `arguments` an object (the Qwen3 template renders
  non-string content as "" and reads reasoning only as a string; API-NOTES).

The rules, which every conversion shares:

- roles: human → user, ai → assistant, developer → system (chat templates know no developer:
  Qwen3's drops the turn), function → tool. Any other role is an error.
- content: strings and text blocks, joined with "". Reasoning and tool-call blocks are carried by
  their own fields. Any other block (an image, audio, a file) is an error: the text forms have no
  place for it, and dropping it would change what the conversation said.
- reasoning: LangChain's `reasoning` blocks, Anthropic's `thinking` blocks, else
  `additional_kwargs["reasoning_content"]`; several parts are joined with "\\n".
- tool calls: arguments must be a JSON object (a JSON string of one is read; "" is `{}`) and the
  name a non-empty string. A call read from a client or a sampled completion that breaks this
  becomes an `invalid_tool_calls` entry (in stored or external data, an error). Written out, an
  invalid call is the raw `<tool_call>` text the model wrote, appended to the content, so the
  history (and what a trainer learns from) is what it actually said.
  Arguments are written as JSON with non-ASCII kept (`ensure_ascii=False`), which is what chat
  templates' `tojson` writes, so a row renders exactly like the live conversation did.
- a tool result answers the call its `tool_call_id` names; without one (TRL-style data), the
  earliest unanswered call before it, in the order chat templates assume; a call without an id
  gets `call_<message>_<index>`. A tool result with no call to answer is an error.

A message that breaks a rule raises `MessageError`, whose `reason` (`non_text_content`,
`unknown_role_<role>`, `malformed_tool_call`, `missing_tool_call_id`, `truncated`,
`malformed_message`) is what the dataset exporter counts skips by, and whose `field` names the
offending key (the HTTP server's error `param`).
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from honed.trajectory import STRUCTURED_KEY, Step, Trajectory, call_changed_before_running, is_truncated

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "system": "system",
    "developer": "system",
    "tool": "tool",
    "function": "tool",
}
# Blocks whose information lives in a field of its own (reasoning, tool_calls): not content.
CARRIED_BLOCKS = frozenset({"reasoning", "thinking", "redacted_thinking", "tool_use", "tool_call"})

_dumps = json.JSONEncoder(ensure_ascii=False).encode
AnyMessage = BaseMessage | Mapping[str, Any]


class MessageError(ValueError):
    """A message that cannot be converted faithfully. `reason` is a short code (see the module
    docstring), `field` the key at fault (`content`, `role`, `tool_calls`, `tool_call_id`) or None,
    `index` the position of the message at fault in a list."""

    def __init__(self, reason: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field
        self.index: int | None = None  # the message's position, when a list was converted


class NotExportable(ValueError):
    """A trajectory that cannot become a faithful chat example; `reason` names why."""

    def __init__(self, reason: str, trajectory_id: str = "") -> None:
        super().__init__(f"trajectory {trajectory_id}: {reason}")
        self.reason = reason


# -- LangChain → stored ------------------------------------------------------------------------


def stored_message(message: BaseMessage) -> dict[str, Any]:
    """A LangChain message in the stored form. Never raises (capture must not lose a step): an
    unknown role is stored as it came, content with non-text blocks is kept as it is."""
    data: dict[str, Any] = {"role": _langchain_role(message), "content": _stored_content(message.content)}
    if message.name:
        data["name"] = message.name
    if isinstance(message, AIMessage):
        if message.tool_calls:
            data["tool_calls"] = [
                {"name": c.get("name"), "args": c.get("args"), "id": c.get("id")} for c in message.tool_calls
            ]
        if message.invalid_tool_calls:
            data["invalid_tool_calls"] = [dict(c) for c in message.invalid_tool_calls]
        reasoning = reasoning_of(message)
        if reasoning:
            data["reasoning"] = reasoning
    tool_call_id = _attribute(message, "tool_call_id")
    if tool_call_id:
        data["tool_call_id"] = tool_call_id
    if _attribute(message, "status") == "error":
        data["status"] = "error"
    return data


def _attribute(message: BaseMessage, name: str) -> Any:
    """`getattr(message, name, None)`, without the AttributeError pydantic raises (~2.5 us) when a
    message type has no such field: the capture writer asks it of every message it stores."""
    extra = getattr(message, "__pydantic_extra__", None)
    if _declares(type(message), name) or (extra and name in extra):
        return getattr(message, name, None)
    return None


@functools.cache
def _declares(cls: type, name: str) -> bool:
    return name in (getattr(cls, "model_fields", None) or {}) or hasattr(cls, name)


def text_of(message: BaseMessage) -> str:
    """The plain text of a message (text blocks joined), never the reasoning: a `str`, not
    LangChain's `TextAccessor` (a capped answer's marker named that type, a QA pass, session 28)."""
    try:
        return str.__str__(message.text)
    except Exception:  # a provider's odd content shape must not lose the step
        return str(message.content)


def reasoning_of(message: BaseMessage) -> str | None:
    """Reasoning text: `reasoning` (or Anthropic `thinking`) content blocks, else
    `additional_kwargs["reasoning_content"]`; parts joined with "\\n"."""
    extra = message.additional_kwargs.get("reasoning_content")
    extra = extra if isinstance(extra, str) and extra else None
    if isinstance(message.content, str) and not message.response_metadata.get("model_provider"):
        # Fast path (content_blocks costs ~14 us a message): plain text content holds no
        # reasoning blocks, so only `reasoning_content` can carry it.
        return extra
    try:
        blocks = message.content_blocks
    except Exception:
        blocks = []
    parts = []
    for block in blocks:
        if isinstance(block, dict) and block.get("type") == "non_standard":
            block = block.get("value")  # a provider block LangChain does not translate
        kind = block.get("type") if isinstance(block, dict) else None
        if kind in ("reasoning", "thinking") and isinstance(block.get(kind), str) and block[kind]:
            parts.append(block[kind])
    return "\n".join(parts) or extra


def content_text(content: Any) -> str:
    """Message content as text: a string, or the text blocks of a list joined with "". None is
    "". Reasoning and tool-call blocks are skipped (their own fields carry them); any other block
    raises `MessageError("non_text_content")`."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if is_truncated(content):
        raise MessageError("truncated", "the content was cut by the capture size cap", "content")
    if not isinstance(content, list):
        raise MessageError(
            "non_text_content", "content must be a string or a list of content blocks", "content"
        )
    parts = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if isinstance(block, str):
            parts.append(block)
        elif kind == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif kind not in CARRIED_BLOCKS:
            raise MessageError(
                "non_text_content", f"only text content is supported ({kind or 'no type'} given)", "content"
            )
    return "".join(parts)


# -- any message → OpenAI chat or the chat template ---------------------------------------------


def openai_messages(messages: Iterable[AnyMessage], *, reasoning: bool = True) -> list[dict[str, Any]]:
    """Messages (LangChain, stored, or OpenAI-like: tool calls in either shape, arguments as text
    or objects) in the OpenAI chat format, arguments as JSON strings. `reasoning=False` leaves
    `reasoning_content` out (OpenAI's fine-tuning API does not take it). Raises `MessageError`."""
    return [
        _written(m, arguments_as_text=True, reasoning=reasoning, tool_names=False)
        for m in _read_all(messages)
    ]


def openai_message(message: AnyMessage, *, reasoning: bool = True) -> dict[str, Any]:
    """One message in the OpenAI chat format (see `openai_messages`); a tool result must name
    its call here, there being no turn before it to answer."""
    return openai_messages([message], reasoning=reasoning)[0]


def template_messages(messages: Iterable[AnyMessage]) -> list[dict[str, Any]]:
    """Messages as the dicts `apply_chat_template` renders: content and `reasoning_content`
    strings, tool-call arguments objects. Raises `MessageError`."""
    return [
        _written(m, arguments_as_text=False, reasoning=True, tool_names=True) for m in _read_all(messages)
    ]


def tool_schemas(tools: Sequence[Any] | None) -> list[dict[str, Any]] | None:
    """Tools (LangChain tools, functions, pydantic models or OpenAI dicts) as OpenAI tool
    schemas, as `bind_tools` hands them to a model; None when there are none."""
    if not tools:
        return None
    return [tool_schema(t) for t in tools]


def tool_schema(tool: Any) -> dict[str, Any]:
    """One tool as an OpenAI tool schema; a dict that already names its `type` (a function
    schema, a provider's built-in tool) is kept as it is."""
    if isinstance(tool, dict) and "type" in tool:
        return tool
    from langchain_core.utils.function_calling import convert_to_openai_tool

    return convert_to_openai_tool(tool)


# -- OpenAI chat (or stored) → LangChain ---------------------------------------------------------


def langchain_messages(messages: Iterable[Mapping[str, Any]]) -> list[BaseMessage]:
    """OpenAI chat messages (or stored ones) as LangChain messages. A tool call whose name or
    arguments break the rules becomes an `invalid_tool_calls` entry; anything else that does
    raises `MessageError`."""
    return [_langchain(m) for m in _read_all(messages, lenient_calls=True)]


def langchain_message(message: Mapping[str, Any]) -> BaseMessage:
    """One message as a LangChain message (see `langchain_messages`)."""
    return langchain_messages([message])[0]


def _langchain(m: _Message) -> BaseMessage:
    if m.role == "system":
        return SystemMessage(m.content, **m.named)
    if m.role == "user":
        return HumanMessage(m.content, **m.named)
    if m.role == "tool":
        return ToolMessage(m.content, tool_call_id=m.tool_call_id, status=m.status, **m.named)
    return AIMessage(
        content=m.content,
        tool_calls=[{"type": "tool_call", **c} for c in m.calls],
        invalid_tool_calls=m.invalid,
        additional_kwargs={"reasoning_content": m.reasoning} if m.reasoning else {},
        **m.named,
    )


# -- tool calls ----------------------------------------------------------------------------------


def tool_call(call: Any) -> dict[str, Any]:
    """A tool call in any shape (stored/LangChain `{"name", "args", "id"}`, OpenAI `{"id",
    "function": {"name", "arguments"}}`, arguments as an object or JSON text) in the stored shape.
    Raises `MessageError("malformed_tool_call")`, or `("truncated")` for a capped field."""
    if not isinstance(call, Mapping) or is_truncated(call):
        reason = "truncated" if is_truncated(call) else "malformed_tool_call"
        raise MessageError(reason, "a tool call must be an object", "tool_calls")
    name, arguments = _function(call)
    if not isinstance(name, str) or not name:
        raise MessageError("malformed_tool_call", 'a tool call needs a "name" string', "tool_calls")
    return {"name": name, "args": parse_arguments(arguments), "id": call.get("id")}


def parse_arguments(arguments: Any) -> dict[str, Any]:
    """Tool-call arguments as an object: an object as it is, JSON text of one read, None or
    blank text `{}`. Raises `MessageError("malformed_tool_call")`, or `("truncated")`."""
    if is_truncated(arguments):
        raise MessageError(
            "truncated", "the tool-call arguments were cut by the capture size cap", "tool_calls"
        )
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        if not arguments.strip():
            return {}
        try:
            arguments = json.loads(arguments)
        except ValueError as exc:
            raise MessageError(
                "malformed_tool_call", f"tool call arguments are not valid JSON: {exc}", "tool_calls"
            ) from exc
        except RecursionError:  # nested deeper than Python's parser goes
            raise MessageError(
                "malformed_tool_call", "tool call arguments are nested too deep", "tool_calls"
            ) from None
    if not isinstance(arguments, dict):
        raise MessageError("malformed_tool_call", "tool call arguments must be a JSON object", "tool_calls")
    return arguments


def dump_arguments(arguments: Mapping[str, Any]) -> str:
    """Arguments as JSON text, as the OpenAI format carries them and templates' `tojson` writes."""
    return _dumps(arguments)


def openai_tool_call(call: Any) -> dict[str, Any]:
    """A tool call in any shape (see `tool_call`) in OpenAI's, arguments as JSON text."""
    return _openai_call(tool_call(call), as_text=True)


def invalid_call_text(call: Mapping[str, Any]) -> str:
    """What the model wrote for a call it got wrong: an `invalid_tool_calls` entry's raw text,
    inside `<tool_call>` tags (the local parser keeps them; other sources get them added)."""
    raw = call.get("args")
    raw = raw if isinstance(raw, str) else "" if raw is None else _dumps(raw)
    if raw.startswith(CALL_OPEN):
        return raw
    name = call.get("name")
    if isinstance(name, str) and name:  # the call as the template writes one: its name kept
        return f'{CALL_OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {raw}}}\n{CALL_CLOSE}'
    return f"{CALL_OPEN}\n{raw}\n{CALL_CLOSE}"


# -- trajectories --------------------------------------------------------------------------------


def request_text(task: Any) -> str | None:
    """The user's request in a captured agent input: the input itself when it is text, else the
    last user message of its `messages` (role dicts, LangChain messages or `{"type": "human"}` dicts,
    `("user", text)` pairs, bare strings), or of the input itself when it is a list of messages (a
    chat model called alone, `honed serve`), its text blocks joined. None when there is none or it
    is not text."""
    if isinstance(task, str):
        return task
    messages = task.get("messages") if isinstance(task, Mapping) else task
    if isinstance(messages, str):
        return messages
    if (
        isinstance(messages, BaseMessage)
        or (
            isinstance(messages, Mapping)
            and "content" in messages
            and ("role" in messages or "type" in messages)
        )
        or (isinstance(messages, tuple) and len(messages) == 2 and isinstance(messages[0], str))
    ):
        # One message, as LangGraph's `add_messages` takes it (a QA pass, session 23: the
        # middleware lost such a run's labels, taking it for another run's worker).
        messages = [messages]
    for m in reversed(messages if isinstance(messages, list) else ()):
        if isinstance(m, Mapping):
            role, content = m.get("role") or m.get("type"), m.get("content")
        elif isinstance(m, BaseMessage):
            role, content = m.type, m.content
        elif isinstance(m, list | tuple) and len(m) == 2:
            role, content = m
        elif isinstance(m, str):
            role, content = "user", m
        else:
            continue
        if isinstance(role, str) and ROLES.get(role) == "user":
            try:
                return content_text(content)
            except MessageError:
                return None
    return None


def task_text(task: Any) -> str:
    """The user's request (`request_text`), else the whole input as JSON: for people and judges
    to read."""
    request = request_text(task)
    return request if request is not None else json.dumps(task, ensure_ascii=False, default=str)


def chat_example(trajectory: Trajectory, *, reasoning: bool = False) -> dict[str, Any]:
    """`{"messages": [...], "tools": [...]}` in the OpenAI chat fine-tuning format, from the last
    model call: its input messages plus its reply are the whole conversation, its tools the tools
    the model saw.

    Assistant tool calls are `{"id", "type": "function", "function": {"name", "arguments"}}`
    with `arguments` a JSON string, tool results `{"role": "tool", "tool_call_id", "content"}`;
    `tools` is left out when the model had none. `reasoning=True` adds `reasoning_content` to
    assistant turns (TRL's Qwen3 template trains on it; OpenAI's API does not take it).
    Raises `NotExportable`.
    """
    if call_changed_before_running(trajectory):
        raise NotExportable("call_changed_before_running", trajectory.id)
    step, calls = _last_chat_step(trajectory)
    if _context_rewritten(step, calls):
        raise NotExportable("context_rewritten", trajectory.id)
    if is_truncated(step.output):
        raise NotExportable("truncated", trajectory.id)
    if not isinstance(step.output, dict):
        raise NotExportable("no_reply", trajectory.id)
    conversation = [*step.input["messages"], {**step.output, "role": "assistant"}]
    if _holds_other_agents_turns(conversation):
        raise NotExportable("other_agents_turns", trajectory.id)
    model = model_of(step)
    if any(model_of(c) != model and _reply_in(c, step.input["messages"]) for c in calls):
        # A fallback model answered a call of this turn (`ModelFallbackMiddleware`, `with_fallbacks`):
        # its reply, in the conversation, would be trained as this model's (a QA pass, session 25).
        # (Another model's call whose reply is not in it, a guardrail's "SAFE", is no part of the row.)
        raise NotExportable("another_models_reply", trajectory.id)
    try:
        example: dict[str, Any] = {"messages": openai_messages(conversation, reasoning=reasoning)}
    except MessageError as exc:
        raise NotExportable(exc.reason, trajectory.id) from exc
    tools = step.input.get("tools")
    if isinstance(tools, list) and tools:
        if any(is_truncated(t) or not isinstance(t, dict) for t in tools):
            raise NotExportable("truncated", trajectory.id)
        example["tools"] = tools
    offered = {(t.get("function") or {}).get("name") for t in example.get("tools", ())}
    _, attempt = split_at_last_user(example["messages"])
    if offered and any(
        call["function"]["name"] not in offered for m in attempt for call in m.get("tool_calls") or ()
    ):
        # Another agent's calls in the conversation (a team sharing its messages): trained
        # against this model's tools, they would teach it tools it was never offered. (No tools
        # recorded says nothing: a model that does not report what it was bound to.)
        raise NotExportable("calls_tools_not_offered", trajectory.id)
    return example


def _holds_other_agents_turns(conversation: list[Any]) -> bool:
    """Whether this turn's attempt holds another agent's replies: in a team, the messages an agent
    reads carry its teammates' turns, named (`create_agent(name=...)` names each reply). Trained as
    the row reads, one agent's model would learn another's words, prompt and tools (a QA pass,
    session 19: a supervisor's row taught the writer's poem, the writer's the supervisor's call)."""
    roles = [ROLES.get(m.get("role")) if isinstance(m, dict) else None for m in conversation]
    start = max((i + 1 for i, role in enumerate(roles) if role == "user"), default=0)
    own = conversation[-1].get("name")
    return bool(own) and any(
        roles[i] == "assistant" and conversation[i].get("name") not in (None, own)
        for i in range(start, len(conversation) - 1)
    )


def split_at_last_user(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(messages up to and including the last user message, the rest): a run's input and its attempt."""
    cut = max((i + 1 for i, m in enumerate(messages) if m["role"] == "user"), default=0)
    return messages[:cut], messages[cut:]


def completion_trajectory(
    prompt: Any,
    completion: Any,
    *,
    task_id: str | None = None,
    metadata: str | dict[str, Any] | None = None,
    split: str | None = None,
) -> Trajectory:
    """A sampled completion (TRL's message list, or text) as the `Trajectory` verifiers read:
    one model step per assistant turn (a `<think>` block in its text becomes the reasoning, a
    malformed tool call an `invalid_tool_calls` entry), a tool step per tool result, the last
    answer as output. Calls and results are paired as `openai_messages` pairs them."""
    meta = json.loads(metadata) if isinstance(metadata, str) else dict(metadata or {})
    history = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    turns = (
        completion if isinstance(completion, list) else [{"role": "assistant", "content": str(completion)}]
    )
    request = request_text({"messages": history})
    steps: list[Step] = []
    answer = ""
    for raw, m in zip(turns, _read_all(turns, lenient_calls=True), strict=True):
        if m.role == "assistant":
            thought, answer = split_think(m.content)
            thought = m.reasoning or thought
            output: dict[str, Any] = {"role": "assistant", "content": answer, "tool_calls": m.calls}
            if m.invalid:
                output["invalid_tool_calls"] = m.invalid
            if thought:
                output["reasoning"] = thought
            steps.append(
                Step(
                    id=uuid.uuid4().hex, index=len(steps), kind="model", name="model",
                    input={"messages": list(history)}, output=output, tool_calls=m.calls, reasoning=thought,
                )
            )  # fmt: skip
        elif m.role == "tool":
            steps.append(
                Step(
                    id=uuid.uuid4().hex, index=len(steps), kind="tool", name=m.name or "tool",
                    output=m.content, extra={"tool_call_id": m.tool_call_id},
                )
            )  # fmt: skip
        history.append(raw)
    return Trajectory(
        id=f"grpo-{uuid.uuid4().hex}",
        agent="grpo",
        task=request,
        task_id=task_id,
        split=split,
        metadata=meta,
        steps=steps,
        output=answer,
    )


def split_think(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a completion's text: decoded text keeps `<think>` (not a special
    token) when TRL has no response parser for the template. Everything up to the last
    `</think>` is the reasoning."""
    if THINK_CLOSE not in text:
        return None, text.strip()
    thought, _, answer = text.rpartition(THINK_CLOSE)
    return thought.replace(THINK_OPEN, "").strip() or None, answer.strip()


# -- helpers -----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Message:
    """A message read under the rules, ready to be written in any shape."""

    role: str
    content: str
    calls: list[dict[str, Any]] = _field(default_factory=list)
    invalid: list[dict[str, Any]] = _field(default_factory=list)
    reasoning: str | None = None
    tool_call_id: str | None = None
    name: str | None = None
    status: str = "success"

    @property
    def named(self) -> dict[str, Any]:
        return {"name": self.name} if self.name else {}


def _read(message: BaseMessage | Mapping[str, Any], *, lenient_calls: bool = False) -> _Message:
    if isinstance(message, BaseMessage):
        message = stored_message(message)
    if not isinstance(message, Mapping) or is_truncated(message):
        reason = "truncated" if is_truncated(message) else "malformed_message"
        raise MessageError(reason, "a message must be an object with a role")
    raw_role = message.get("role")
    role = ROLES.get(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        raise MessageError(f"unknown_role_{raw_role}", f"unknown role {raw_role!r}", "role")
    m = _Message(role, content_text(message.get("content")))
    if isinstance(message.get("name"), str) and message["name"]:
        m.name = message["name"]
    if role == "assistant":
        if lenient_calls:
            m.calls, m.invalid = _lenient_calls(message.get("tool_calls"))
        else:
            m.calls = [tool_call(c) for c in message.get("tool_calls") or ()]
        m.invalid += [dict(c) for c in message.get("invalid_tool_calls") or () if isinstance(c, Mapping)]
        said = message.get("reasoning_content") or message.get("reasoning")
        m.reasoning = said if isinstance(said, str) and said else None
    elif role == "tool":
        call_id = message.get("tool_call_id")
        m.tool_call_id = call_id if isinstance(call_id, str) and call_id else None
        m.status = "error" if message.get("status") == "error" else "success"
    return m


def _read_all(messages: Iterable[AnyMessage], *, lenient_calls: bool = False) -> list[_Message]:
    """Messages read under the rules, tool calls and their results paired; a `MessageError`
    carries the position of the message at fault in `index`."""
    out: list[_Message] = []
    unanswered: list[str] = []
    for index, message in enumerate(messages):
        try:
            m = _read(message, lenient_calls=lenient_calls)
            if m.role == "assistant":
                for i, call in enumerate(m.calls):
                    call["id"] = call.get("id") or f"call_{index}_{i}"
                unanswered = [c["id"] for c in m.calls] + [c["id"] for c in m.invalid if c.get("id")]
            elif m.role == "tool":
                if m.tool_call_id is None and not unanswered:
                    raise MessageError(
                        "missing_tool_call_id",
                        "a tool message needs the tool_call_id it answers",
                        "tool_call_id",
                    )
                m.tool_call_id = m.tool_call_id or unanswered[0]
                if m.tool_call_id in unanswered:
                    unanswered.remove(m.tool_call_id)
        except MessageError as exc:
            exc.index = index
            raise
        out.append(m)
    return out


def _lenient_calls(calls: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(valid calls, invalid_tool_calls) of a message's `tool_calls`: a model's malformed call is
    what it said, kept as an invalid call, not an error."""
    valid, invalid = [], []
    for call in calls or ():
        try:
            valid.append(tool_call(call))
        except MessageError as exc:
            call_id = call.get("id") if isinstance(call, Mapping) else None
            name, raw = _function(call) if isinstance(call, Mapping) else (None, None)
            invalid.append(
                {
                    "type": "invalid_tool_call",
                    "name": name if isinstance(name, str) else None,
                    "args": raw if isinstance(raw, str) or raw is None else _dumps(raw),
                    "id": call_id,
                    "error": str(exc),
                }
            )
    return valid, invalid


def _function(call: Mapping[str, Any]) -> tuple[Any, Any]:
    """(name, arguments) of a tool call in OpenAI's shape or LangChain's."""
    function = call.get("function")
    function = function if isinstance(function, Mapping) else call
    return function.get("name"), function.get("arguments", function.get("args"))


def _written(m: _Message, *, arguments_as_text: bool, reasoning: bool, tool_names: bool) -> dict[str, Any]:
    if m.role == "tool":
        out: dict[str, Any] = {"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content}
        if tool_names and m.name:
            out["name"] = m.name
        return out
    if m.role != "assistant":
        return {"role": m.role, "content": m.content}
    content = m.content
    for bad in m.invalid:
        content += ("\n" if content else "") + invalid_call_text(bad)
    out = {"role": "assistant", "content": content}
    if reasoning and m.reasoning:
        out["reasoning_content"] = m.reasoning
    if m.calls:
        out["tool_calls"] = [_openai_call(c, as_text=arguments_as_text) for c in m.calls]
    return out


def _openai_call(call: Mapping[str, Any], *, as_text: bool) -> dict[str, Any]:
    args = call["args"]
    return {
        "id": "" if call.get("id") is None else str(call["id"]),
        "type": "function",
        "function": {"name": call["name"], "arguments": _dumps(args) if as_text else dict(args)},
    }


def _langchain_role(message: BaseMessage) -> str:
    raw = message.role if isinstance(message, ChatMessage) else message.type
    # A streamed reply summed up (`AIMessageChunk`, `type` "AIMessageChunk") is the assistant's.
    return ROLES.get(raw) or ROLES.get(raw.removesuffix("MessageChunk").lower(), raw)


def _stored_content(content: Any) -> Any:
    if isinstance(content, list) and all(
        isinstance(b, str) or (isinstance(b, dict) and b.get("type") == "text") for b in content
    ):
        return "".join(b if isinstance(b, str) else str(b.get("text", "")) for b in content)
    return content


def _subagent_test(trajectory: Trajectory) -> Any:
    """`in_subagent(step)`: whether a step runs under a tool step (a subagent's call, whose
    conversation, tools and system prompt are the subagent's, not the agent's)."""
    kinds = {step.id: (step.kind, step.parent_id) for step in trajectory.steps}

    def in_subagent(step: Step) -> bool:
        parent, seen = step.parent_id, 0
        while parent is not None and parent in kinds and seen < len(kinds):
            kind, parent = kinds[parent]
            if kind == "tool":
                return True
            seen += 1
        return False

    return in_subagent


def model_of(step: Step) -> str | None:
    """Which model made a call: its version where honed served it, else the name it reported."""
    name = step.extra.get("model") if isinstance(step.extra, dict) else None
    return step.model_version or (str(name) if name else None) or step.name


def own_model_steps(trajectory: Trajectory) -> list[Step]:
    """The agent's own model calls, by the model that gave its answer: not a subagent's, nor
    another model's (a fallback's, a summariser's). What token-level training trains: it trained
    every call of the run under its verdict, another agent's and another model's tokens, and
    their logprobs, as the agent's (a QA pass, session 25)."""
    in_subagent = _subagent_test(trajectory)
    calls = [s for s in trajectory.steps if s.kind == "model" and not in_subagent(s)]
    if not calls:
        return []
    answering = _answering_call(trajectory, calls)
    model = model_of(answering)
    # ... and turns of the conversation it answered: the same model asked aside (a guard checking
    # the reply, a router choosing the path) trained its prompt and "SAFE" under the answer's
    # verdict, where the chat rows train the conversation alone (a QA pass, session 27).
    said = [*((answering.input or {}).get("messages") or ()), answering.output]
    return [s for s in calls if model_of(s) == model and (s is answering or _reply_in(s, said))]


def _answering_call(trajectory: Trajectory, calls: list[Step]) -> Step:
    """The call whose reply is the run's answer, else the last: a middleware asking another model
    to check the reply (a guardrail) made the last call the guard's, its prompt and its "SAFE".
    A structured answer is the call that gave it: its tool call's arguments (`ToolStrategy`), or
    its JSON text (a provider's own structured output) (a QA pass, session 27: matched by text
    only, a guarded agent's structured answer was the guard's, its version and its row)."""
    output = trajectory.output
    structured = output.get(STRUCTURED_KEY) if isinstance(output, dict) else None
    at = answering_reply([s.output for s in calls], trajectory.answer, structured)
    return calls[-1] if at is None else calls[at]


def answering_reply(replies: Sequence[Any], answer: Any, structured: Any) -> int | None:
    """Which of a run's model replies (in call order) gave its answer: a structured answer's tool
    call first (a guard may echo its JSON after it), then, last first, the reply whose text is
    the answer or holds the structured answer as JSON. None: none of them. Capture (the run's
    model version) and training (the agent's own calls) decide it alike."""
    order = [i for i in reversed(range(len(replies))) if isinstance(replies[i], dict)]
    if structured is not None:
        for i in order:
            if gives_structured(replies[i], structured, as_text=False):
                return i
    for i in order:
        if isinstance(answer, str) and answer and content_text(replies[i].get("content")) == answer:
            return i
        if structured is not None and gives_structured(replies[i], structured):
            return i
    return None


def gives_structured(reply: dict[str, Any], structured: Any, *, as_text: bool = True) -> bool:
    """Whether a reply holds `structured`: as a tool call's arguments, or (`as_text`) as its JSON
    text. Compared as JSON (`1` is not `true`)."""
    want = _json_key(structured)
    for call in reply.get("tool_calls") or ():
        if isinstance(call, dict) and _json_key(call.get("args")) == want:
            return True
    text = content_text(reply.get("content")) if as_text else ""
    if text and text.lstrip()[:1] in ("{", "["):
        try:
            return _json_key(json.loads(text)) == want
        except ValueError:
            return False
    return False


def _json_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _reply_in(call: Step, messages: list[Any]) -> bool:
    """Whether `call`'s reply is one of the assistant turns of `messages` (by its tool calls' ids,
    else its text)."""
    reply = call.output
    if not isinstance(reply, dict):
        return False
    ids = {c.get("id") for c in reply.get("tool_calls") or () if isinstance(c, dict) and c.get("id")}
    text = content_text(reply.get("content"))
    for m in messages:
        if not isinstance(m, dict) or m.get("role") != "assistant":
            continue
        if ids and any(isinstance(c, dict) and c.get("id") in ids for c in m.get("tool_calls") or ()):
            return True
        if not ids and text and content_text(m.get("content")) == text:
            return True
    return False


def _last_chat_step(trajectory: Trajectory) -> tuple[Step, list[Step]]:
    """The agent's own last model call: not one of a subagent's (a step under a tool step),
    whose conversation, tools and system prompt are the subagent's, not the agent's. And all of
    the agent's own calls, in order."""
    in_subagent = _subagent_test(trajectory)
    calls = [
        step
        for step in trajectory.steps
        if step.kind == "model"
        and not in_subagent(step)
        and (
            is_truncated(step.input)
            or (isinstance(step.input, dict) and isinstance(step.input.get("messages"), list))
        )
    ]
    if not calls:
        raise NotExportable("no_chat_model_step", trajectory.id)
    step = _answering_call(trajectory, calls)
    if is_truncated(step.input):
        raise NotExportable("truncated", trajectory.id)
    return step, calls


def _context_rewritten(last: Step, calls: list[Step]) -> bool:
    """Whether an earlier call's reply is in the last call's conversation after other messages
    than those it was produced from: a middleware cleared tool results, summarised or trimmed the
    history between the calls. Trained as the row reads, the reply would be taught from a context
    the model never saw (`fetch(code="code-7731")` after a cleared `[cleared]`). System messages
    are left out of the comparison (a dynamic prompt may change them call by call)."""
    final = [m for m in last.input["messages"] if not (isinstance(m, dict) and m.get("role") == "system")]
    made_at = {
        call.get("id"): j
        for j, m in enumerate(final)
        if isinstance(m, dict) and m.get("role") == "assistant"
        for call in m.get("tool_calls") or ()
        if isinstance(call, dict) and call.get("id")
    }
    for step in calls:
        if step is last or not isinstance(step.output, dict) or not isinstance(step.input, dict):
            continue
        ids = [c.get("id") for c in step.output.get("tool_calls") or () if isinstance(c, dict)]
        where = next((made_at[i] for i in ids if i in made_at), None)
        if where is None:  # its reply is not in the last call's conversation (summarised away)
            continue
        seen = [
            m
            for m in step.input.get("messages") or ()
            if not (isinstance(m, dict) and m.get("role") == "system")
        ]
        if final[:where] != seen:
            return True
    return False
