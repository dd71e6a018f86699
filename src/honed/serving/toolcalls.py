"""Completion text → content, reasoning and tool calls, in the `<think>` / `<tool_call>{json}</tool_call>`
form that Qwen and Hermes models (and the tiny model) emit.

One incremental parser serves both paths, so a streamed reply and a whole one always agree:
`feed` returns the content and reasoning text that is safe to show so far (tags and tool-call
bodies are held back), `finish` parses the tool calls. A malformed call never raises: it becomes
an `invalid_tool_calls` entry, which LangChain agents report back to the model.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from honed.messages import CALL_CLOSE, CALL_OPEN, THINK_CLOSE, THINK_OPEN, MessageError, parse_arguments

_TAGS = (THINK_OPEN, THINK_CLOSE, CALL_OPEN, CALL_CLOSE)

Kind = Literal["content", "reasoning"]


@dataclass(slots=True)
class ParsedCompletion:
    """What a completion says: visible text, reasoning, tool calls (LangChain's dict shapes)."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    invalid_tool_calls: list[dict[str, Any]] = field(default_factory=list)


def parse_completion(text: str, *, calls: bool = True) -> ParsedCompletion:
    """Parse a whole completion (special tokens already removed); `calls=False`: a `<tool_call>`
    in it is text (`tool_choice="none"`)."""
    parser = CompletionParser(calls=calls)
    parsed = ParsedCompletion()
    for kind, piece in [*parser.feed(text), *parser.flush()]:
        if kind == "content":
            parsed.content += piece
        else:
            parsed.reasoning += piece
    parsed.tool_calls, parsed.invalid_tool_calls = parser.tool_calls()
    return parsed


class CompletionParser:
    """Incremental: `feed(delta)` → [(kind, text)] ready to show; `flush()` at the end; then
    `tool_calls()`. Leading and trailing whitespace of each part is dropped, as chat templates
    add it around tags."""

    def __init__(self, *, calls: bool = True) -> None:
        # `calls=False` (`tool_choice="none"`, no tools): a `<tool_call>` the model writes anyway
        # is text, in its place; taken out, an unclosed one and all after it were lost.
        self._calls_on = calls
        self._mode: Literal["start", "reasoning", "content", "call"] = "start"
        self._buffer = ""
        self._pending_ws = ""  # whitespace held back: shown only if more text of the same kind follows
        self._started: dict[str, bool] = {"content": False, "reasoning": False}
        self._calls: list[str] = []  # raw bodies of tool calls
        self._unterminated: str | None = None

    def feed(self, delta: str) -> list[tuple[Kind, str]]:
        self._buffer += delta
        out: list[tuple[Kind, str]] = []
        while self._buffer:
            if self._mode == "start":
                stripped = self._buffer.lstrip()
                if not stripped:
                    return out
                if THINK_OPEN.startswith(stripped) and len(stripped) < len(THINK_OPEN):
                    return out  # maybe the start of <think>
                if stripped.startswith(THINK_OPEN):
                    self._buffer = stripped[len(THINK_OPEN) :]
                    self._mode = "reasoning"
                else:
                    self._mode = "content"
                continue
            if self._mode == "call":
                end = self._buffer.find(CALL_CLOSE)
                if end < 0:
                    return out
                self._calls.append(self._buffer[:end])
                self._buffer = self._buffer[end + len(CALL_CLOSE) :]
                self._mode = "content"
                continue
            kind: Kind = "reasoning" if self._mode == "reasoning" else "content"
            call = (CALL_OPEN,) if self._calls_on else ()
            closers = (THINK_CLOSE, *call) if kind == "reasoning" else call
            hit = min(
                ((i, tag) for tag in closers if (i := self._buffer.find(tag)) >= 0),
                default=None,
            )
            if hit is None:
                keep = _partial_tag_suffix(self._buffer, closers)
                ready, self._buffer = (
                    self._buffer[: len(self._buffer) - keep],
                    self._buffer[len(self._buffer) - keep :],
                )
                self._emit(kind, ready, out)
                return out
            index, tag = hit
            self._emit(kind, self._buffer[:index], out)
            self._pending_ws = ""
            self._buffer = self._buffer[index + len(tag) :]
            self._mode = "call" if tag == CALL_OPEN else "content"
        return out

    def flush(self) -> list[tuple[Kind, str]]:
        """The end of the completion: whatever text is still held, an unterminated call."""
        out: list[tuple[Kind, str]] = []
        if self._mode == "call":
            self._unterminated = self._buffer
        elif self._mode == "start":
            self._emit("content", self._buffer, out)
        else:
            self._emit("reasoning" if self._mode == "reasoning" else "content", self._buffer, out)
        self._buffer = ""
        self._pending_ws = ""
        return out

    def tool_calls(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(tool_calls, invalid_tool_calls) in LangChain's shapes, each with a fresh id."""
        valid: list[dict[str, Any]] = []
        invalid: list[dict[str, Any]] = []
        for body in self._calls:
            call, error = _parse_call(body)
            (valid if error is None else invalid).append(_shape(call, CALL_OPEN + body + CALL_CLOSE, error))
        if self._unterminated is not None:
            invalid.append(
                _shape(
                    None,
                    CALL_OPEN + self._unterminated,
                    "unterminated <tool_call>: the completion ended inside it",
                )
            )
        return valid, invalid

    def _emit(self, kind: Kind, text: str, out: list[tuple[Kind, str]]) -> None:
        if not text:
            return
        if not self._started[kind]:
            text = text.lstrip()
            if not text:
                return
        body = text.rstrip()
        tail = text[len(body) :]
        if body:
            out.append((kind, self._pending_ws + body))
            self._started[kind] = True
            self._pending_ws = tail
        else:
            self._pending_ws += tail


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_tag_suffix(text: str, tags: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could be the start of one of `tags`."""
    for size in range(min(len(text), max((len(t) for t in tags), default=0) - 1), 0, -1):
        suffix = text[-size:]
        if any(tag.startswith(suffix) for tag in tags):
            return size
    return 0


def _parse_call(body: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        return None, f"tool call is not valid JSON: {exc}"
    except RecursionError:  # a model can be asked to write "[[[[..."
        return None, "tool call is nested too deep"
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None, 'tool call must be a JSON object with a "name" string'
    try:
        args = parse_arguments(data.get("arguments", data.get("parameters")))
    except MessageError as exc:
        return data, str(exc)
    return {"name": data["name"], "args": args}, None


def _shape(call: dict[str, Any] | None, raw: str, error: str | None) -> dict[str, Any]:
    """A valid call in LangChain's `tool_call` shape; an invalid one keeps the raw text the model
    wrote, tags included (so it never parses as JSON by accident, streamed or not, and can be
    written back into the history verbatim)."""
    if error is None and call is not None:
        return {"type": "tool_call", "name": call["name"], "args": call["args"], "id": new_tool_call_id()}
    name = call.get("name") if isinstance(call, dict) and isinstance(call.get("name"), str) else None
    return {
        "type": "invalid_tool_call",
        "name": name,
        "args": raw,
        "id": new_tool_call_id(),
        "error": error,
    }
