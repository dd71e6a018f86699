"""LangChain messages and tools → the plain dicts a chat template renders.

Chat templates are strict about shapes (API-NOTES): the Qwen3 template renders non-string
`content` as "" and reads `reasoning_content` only as a string, and tool-call `arguments` must
stay a dict (a JSON string would be encoded twice by some templates). So content blocks are
flattened to text here, reasoning is lifted out of blocks and `additional_kwargs`, and a call the
model got wrong is written back as the raw `<tool_call>` text it produced, so the history the
model sees (and a trainer learns from) is what it actually said.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from honed.serving.toolcalls import CALL_CLOSE, CALL_OPEN

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "developer": "system"}


def to_template_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """Messages as `{"role", "content", ...}` dicts for `apply_chat_template`."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if isinstance(message, AIMessage):
            out.append(_assistant(message))
        elif isinstance(message, ToolMessage):
            out.append(
                {
                    "role": "tool",
                    "content": content_text(message.content),
                    "tool_call_id": message.tool_call_id,
                    **({"name": message.name} if message.name else {}),
                }
            )
        elif isinstance(message, SystemMessage):
            out.append({"role": "system", "content": content_text(message.content)})
        elif isinstance(message, HumanMessage):
            out.append({"role": "user", "content": content_text(message.content)})
        elif isinstance(message, ChatMessage):
            out.append(
                {"role": _ROLES.get(message.role, message.role), "content": content_text(message.content)}
            )
        else:
            out.append({"role": _ROLES.get(message.type, "user"), "content": content_text(message.content)})
    return out


def tool_schemas(tools: Sequence[Any] | None) -> list[dict[str, Any]] | None:
    """Tools (LangChain tools, functions, pydantic models or OpenAI dicts) as OpenAI tool schemas."""
    if not tools:
        return None
    from langchain_core.utils.function_calling import convert_to_openai_tool

    return [convert_to_openai_tool(t) for t in tools]


def content_text(content: Any) -> str:
    """Text of a message's content: a string, or the text blocks of a list joined."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content or ():
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
    return "".join(parts)


def _assistant(message: AIMessage) -> dict[str, Any]:
    content = content_text(message.content)
    for bad in message.invalid_tool_calls:
        raw = bad.get("args") or ""
        if not raw.startswith(CALL_OPEN):
            raw = f"{CALL_OPEN}\n{raw}\n{CALL_CLOSE}"
        content += ("\n" if content else "") + raw
    data: dict[str, Any] = {"role": "assistant", "content": content}
    reasoning = _reasoning(message)
    if reasoning:
        data["reasoning_content"] = reasoning
    if message.tool_calls:
        data["tool_calls"] = [
            {
                "id": call.get("id"),
                "type": "function",
                "function": {"name": call["name"], "arguments": dict(call.get("args") or {})},
            }
            for call in message.tool_calls
        ]
    return data


def _reasoning(message: AIMessage) -> str:
    value = message.additional_kwargs.get("reasoning_content")
    if isinstance(value, str) and value:
        return value
    if isinstance(message.content, list):
        texts = [
            b.get("reasoning") or b.get("thinking") or ""
            for b in message.content
            if isinstance(b, dict) and b.get("type") in ("reasoning", "thinking")
        ]
        return "".join(t if isinstance(t, str) else "" for t in texts)
    return ""
