"""LangChain messages as the compact role-format dicts honed stores.

One shape for every model step, close to the OpenAI chat format that trainers and exporters speak:
`{"role", "content", "tool_calls"?, "tool_call_id"?, "name"?, "reasoning"?, "status"?}` with tool
calls as `{"name", "args", "id"}` (LangChain's own naming). Runs on the writer thread.
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage, BaseMessage

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "tool"}


def message_to_dict(message: BaseMessage) -> dict[str, Any]:
    """A message as a role-format dict; content blocks other than text are kept as they are."""
    role = _ROLES.get(message.type, message.type)
    data: dict[str, Any] = {"role": role, "content": _content(message.content)}
    if message.name:
        data["name"] = message.name
    if isinstance(message, AIMessage):
        if message.tool_calls:
            data["tool_calls"] = [_tool_call(tc) for tc in message.tool_calls]
        if message.invalid_tool_calls:
            data["invalid_tool_calls"] = [dict(tc) for tc in message.invalid_tool_calls]
        reasoning = reasoning_of(message)
        if reasoning:
            data["reasoning"] = reasoning
    tool_call_id = getattr(message, "tool_call_id", None)
    if tool_call_id:
        data["tool_call_id"] = tool_call_id
    status = getattr(message, "status", None)
    if status == "error":
        data["status"] = "error"
    return data


def text_of(message: BaseMessage) -> str:
    """The plain text of a message (text blocks joined), never the reasoning."""
    try:
        return message.text
    except Exception:  # a provider's odd content shape must not lose the step
        return str(message.content)


def reasoning_of(message: BaseMessage) -> str | None:
    """Reasoning/thinking text: `reasoning` content blocks or `additional_kwargs["reasoning_content"]`."""
    if isinstance(message.content, str) and not message.response_metadata.get("model_provider"):
        # Fast path (content_blocks costs ~14 us a message): plain text content holds no
        # reasoning blocks, so only `reasoning_content` can carry it.
        extra = message.additional_kwargs.get("reasoning_content")
        return extra if isinstance(extra, str) and extra else None
    parts: list[str] = []
    try:
        blocks = message.content_blocks
    except Exception:
        blocks = []
    for block in blocks:
        if isinstance(block, dict) and block.get("type") == "reasoning" and block.get("reasoning"):
            parts.append(str(block["reasoning"]))
    if not parts:
        extra = message.additional_kwargs.get("reasoning_content")
        if isinstance(extra, str) and extra:
            parts.append(extra)
    return "\n".join(parts) or None


def _tool_call(tool_call: Any) -> dict[str, Any]:
    return {"name": tool_call.get("name"), "args": tool_call.get("args"), "id": tool_call.get("id")}


def _content(content: Any) -> Any:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(b, str) or (isinstance(b, dict) and b.get("type") == "text") for b in content
    ):
        return "".join(b if isinstance(b, str) else str(b.get("text", "")) for b in content)
    return content
