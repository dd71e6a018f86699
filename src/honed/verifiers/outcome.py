"""What a trajectory produced, read defensively: the final answer, the final state, tool-call
arguments, and the reference it should be compared with.

Each reader raises `CannotTell` for the cases no verifier can judge (nothing captured, no
reference, a truncated reference), so every built-in answers them the same way: `passed=None` with
a reason that says what to fix; and `Unreadable` where the agent's own answer or tool arguments were
cut at the field cap (or carry its marker, which an agent can write): a fail, since whatever the
agent can bring about must not be "could not tell" (`label` skips it, so a second verifier's pass
would decide).
"""

from __future__ import annotations

import json
import re
from typing import Any

from honed.trajectory import REDACTED_MARK, STRUCTURED_KEY, Trajectory, is_truncated
from honed.verifiers.protocol import CannotTell, Unreadable

# Possessive: the info string's `[\w+.-]*` then `[^\n]*` backtracked quadratically over a
# fence with no line break after it (64 KB: 3 s holding the GIL). And no backtick in the info
# string (CommonMark's rule): a run of 60,000 backticks scanned to its end from each one (3 s).
_FENCE = re.compile(r"```[ \t]*+([\w+.-]*+)[^\n`]*+\n(.*?)```", re.S)


def agent_failed(t: Trajectory) -> str | None:
    """The error of a run that ended without an output (the agent raised), else None."""
    if t.status == "error" and t.output is None:
        return t.error or "the agent run ended with an error"
    return None


def final_output(t: Trajectory) -> Any:
    """The captured final output, or `CannotTell` when there is none to judge."""
    if t.output is None:
        if not t.steps:
            raise CannotTell("empty trajectory: nothing was captured for this run")
        raise CannotTell("the trajectory has no final output", status=t.status)
    if is_truncated(t.output):
        raise Unreadable(_truncated_reason("final output", t.output), truncated=_marker(t.output))
    return t.output


def final_answer(t: Trajectory) -> str:
    """The final answer as text (`Trajectory.answer`), refusing truncated or missing captures."""
    output = final_output(t)
    for key in ("answer", STRUCTURED_KEY):
        if isinstance(output, dict) and is_truncated(output.get(key)):
            raise Unreadable(_truncated_reason(key, output[key]), truncated=_marker(output[key]))
    return t.answer


def final_state(t: Trajectory) -> dict[str, Any]:
    """The final agent state as a dict: the captured output when it is one (message agents give
    `{"answer", ...other state keys}`), else `{"answer": output}`. Always has "answer"."""
    output = final_output(t)
    if isinstance(output, dict):
        state = dict(output)
        state.setdefault("answer", t.answer)
        return state
    return {"answer": output}


def reference(t: Trajectory, key: str = "expected") -> Any:
    """`t.metadata[key]`, or `CannotTell` when the task carries no usable reference."""
    if key not in (t.metadata or {}) or t.metadata[key] is None:
        raise CannotTell(f"no reference: metadata[{key!r}] is missing", missing=key)
    value = t.metadata[key]
    if is_truncated(value):
        raise CannotTell(_truncated_reason(f"metadata[{key!r}]", value), truncated=_marker(value))
    if REDACTED_MARK in (value if isinstance(value, str) else json.dumps(value, default=str)):
        # Every secret of a kind is the same marker at rest: any made-up password, or the marker
        # written by the agent itself, would match it.
        raise CannotTell(
            f"metadata[{key!r}] holds a secret that capture redacted ([REDACTED:...]): no answer can be "
            "compared with it; keep secrets out of references (or redact=False for such tasks)",
            redacted=key,
        )
    return value


def tool_call_args(t: Trajectory, tool: str) -> dict[str, Any] | None:
    """Arguments of the last call of `tool` the model made (or, failing that, the last tool step
    named `tool`); None when the agent never called it."""
    for step in reversed(t.steps):
        for call in reversed(step.tool_calls or []):
            if call.get("name") == tool:
                return _args(call.get("args"), tool)
    for step in reversed(t.steps):
        if step.kind == "tool" and step.name == tool:
            return _args(step.input, tool)
    return None


def last_code_block(text: str, languages: tuple[str, ...] = ("", "py", "python", "python3")) -> str | None:
    """The body of the last fenced code block whose language is one of `languages`."""
    blocks = [body for lang, body in _FENCE.findall(text) if lang.lower() in languages]
    return blocks[-1] if blocks else None


def _args(value: Any, tool: str) -> dict[str, Any]:
    if is_truncated(value):
        raise Unreadable(_truncated_reason(f"arguments of {tool!r}", value), truncated=_marker(value))
    return value if isinstance(value, dict) else {"input": value}


def _marker(value: dict[str, Any]) -> dict[str, Any]:
    return {k: value.get(k) for k in ("type", "size", "sha256")}


def _truncated_reason(what: str, marker: dict[str, Any]) -> str:
    return (
        f"the captured {what} was truncated ({marker.get('size', '?')} bytes over the field cap): "
        "raise HONED_MAX_FIELD_BYTES (or max_field_bytes=) for this agent to verify it"
    )
