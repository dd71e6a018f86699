"""A trajectory's conversation, stored once: model-step inputs as references into it.

Every model call resends the whole conversation, so storing each step's input as it came stores
a run of n model calls with ~n²/2 message copies (a 50-step run, ~1,250). The store keeps instead,
per trajectory, the distinct messages its model steps saw (`trajectories.messages`, in order of
first appearance) and the distinct tool lists (`trajectories.tools`); a model step's stored input
names them:

    {"messages": [m0, m1, m2], "tools": [t]}   ->   {"messages_ref": [[0, 3]], "tools_ref": 0}

`messages_ref` is a list of half-open `[start, end)` ranges into `trajectories.messages` (one range
for a linear conversation; more where a subagent's conversation or a trimmed history differs);
`tools_ref` indexes `trajectories.tools`. Any other key of the input is kept as it was. Readers
never see this form: the store expands it on read (`expand`), so `Step.input` is what was captured.
Expanded inputs of one trajectory share their message dicts: treat them as read-only.

Messages are the same when their JSON is (keys sorted); a message sent twice in one conversation
is stored once and referenced twice. Migration 0006 converts stores written before.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

MESSAGES_REF, TOOLS_REF = "messages_ref", "tools_ref"
_sorted_std = json.JSONEncoder(ensure_ascii=False, sort_keys=True).encode


def compact(inputs: Iterable[Any]) -> tuple[list[Any] | None, list[Any] | None, list[Any]]:
    """`(messages, tools, inputs)`: a trajectory's model-step inputs (in step order) as references
    into its distinct `messages` and `tools`. `messages` is None when no input was a chat model's
    (`{"messages": [...], ...}`; others come back unchanged), `tools` when none had tools. Nothing
    given is mutated."""
    messages, tools = _Pool(), _Pool()
    out, chats = [], 0
    for value in inputs:
        if not _is_chat_input(value):
            out.append(value)
            continue
        chats += 1
        ref: dict[str, Any] = {MESSAGES_REF: _ranges([messages.add(m) for m in value["messages"]])}
        if isinstance(value.get("tools"), list):
            ref[TOOLS_REF] = tools.add(value["tools"])
        out.append(ref | {k: v for k, v in value.items() if k not in ("messages", "tools")})
    # An empty list, not None, when the only conversation was empty: the pool's presence is what
    # says this trajectory's inputs are references.
    return messages.values if chats else None, tools.values or None, out


def expand(value: Any, messages: Sequence[Any] | None, tools: Sequence[Any] | None) -> Any:
    """A stored model-step input as it was captured (anything else as it is). `messages` None:
    the trajectory stored no conversation, so its inputs are as captured."""
    if type(value) is not dict or MESSAGES_REF not in value or messages is None:
        return value
    ranges = value[MESSAGES_REF]
    if len(ranges) == 1:  # a linear conversation: one slice
        listed = list(messages[ranges[0][0] : ranges[0][1]])
    else:
        listed = [m for start, end in ranges for m in messages[start:end]]
    full: dict[str, Any] = {"messages": listed}
    if TOOLS_REF in value and tools is not None:
        full["tools"] = tools[value[TOOLS_REF]]
    for key, item in value.items():
        if key != MESSAGES_REF and key != TOOLS_REF:
            full[key] = item
    return full


def is_compacted(value: Any) -> bool:
    """Whether a stored model-step input is in the reference form."""
    return type(value) is dict and MESSAGES_REF in value


def _is_chat_input(value: Any) -> bool:
    return (
        type(value) is dict
        and isinstance(value.get("messages"), list)
        and MESSAGES_REF not in value
        and TOOLS_REF not in value
    )


class _Pool:
    """Distinct JSON values in order of first appearance. The capture writer hands the same
    message object to every step that saw it, so identity is tried before the JSON text."""

    __slots__ = ("by_id", "by_text", "values")

    def __init__(self) -> None:
        self.values: list[Any] = []
        self.by_text: dict[bytes | str, int] = {}
        self.by_id: dict[int, tuple[Any, int]] = {}  # holds the object: its id cannot be reused

    def add(self, value: Any) -> int:
        seen = self.by_id.get(id(value))
        if seen is not None and seen[0] is value:
            return seen[1]
        text = _canonical(value)
        index = self.by_text.get(text)
        if index is None:
            index = self.by_text[text] = len(self.values)
            self.values.append(value)
        self.by_id[id(value)] = (value, index)
        return index


def _canonical(value: Any) -> bytes | str:
    """The value's JSON with sorted keys: equal text, equal value (bytes from orjson, str from the
    standard encoder for what orjson refuses; the two types never compare equal)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return _sorted_std(value)


def _ranges(indices: list[int]) -> list[list[int]]:
    """`[0, 1, 2, 5, 6]` -> `[[0, 3], [5, 7]]`."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out
