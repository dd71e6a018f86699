"""`tool_use`: arithmetic and unit conversions that must go through tools, checked numerically.

    >>> suite = ToolUseSuite()
    >>> suite.heldout[0].prompt, suite.heldout[0].metadata["expected"]

Slices: `one_step` (one of add, sub, mul), `two_step` (an operation on the first one's result,
so the model must carry a tool result into the next call) and `convert` (a unit conversion).
The answer is the bare number, the last tool result: a 1.8M-parameter model learns to copy it.
"""

from __future__ import annotations

import random
from typing import Any

from langchain_core.tools import StructuredTool

from honed.demo.generated import GeneratedSuite, Problem, Solution

SYSTEM_PROMPT = "Use the tools. Reply with the number only."

# How many of the unit on the right one unit on the left is: conversions go to the smaller unit,
# so every result is an integer.
FACTORS: dict[tuple[str, str], int] = {
    ("km", "m"): 1000,
    ("m", "cm"): 100,
    ("kg", "g"): 1000,
    ("h", "min"): 60,
    ("min", "s"): 60,
    ("day", "h"): 24,
}


def add(a: int, b: int) -> int:
    """Add a and b."""
    return a + b


def sub(a: int, b: int) -> int:
    """Subtract b from a."""
    return a - b


def mul(a: int, b: int) -> int:
    """Multiply a by b."""
    return a * b


def convert(value: int, unit: str, to: str) -> int:
    """Convert value from unit to another unit."""
    factor = FACTORS.get((unit, to))
    if factor is None:
        known = ", ".join(f"{a}->{b}" for a, b in FACTORS)
        raise ValueError(f"cannot convert {unit} to {to}; known: {known}")
    return value * factor


def tools() -> list[Any]:
    """Fresh LangChain tools; a wrong conversion is an error result the agent sees, not a crash."""
    return [
        StructuredTool.from_function(add),
        StructuredTool.from_function(sub),
        StructuredTool.from_function(mul),
        StructuredTool.from_function(convert, handle_tool_error=True),
    ]


_OPS = {"add": ("plus", add), "sub": ("minus", sub), "mul": ("times", mul)}


class ToolUseSuite(GeneratedSuite):
    """See the module docstring; `ReferenceMatch("numeric")` against `metadata["expected"]`."""

    name = "tool_use"
    system_prompt = SYSTEM_PROMPT
    max_tokens = 48

    def __init__(self, *, train_size: int = 300, heldout_size: int = 100) -> None:
        super().__init__(train_size=train_size, heldout_size=heldout_size)
        self.tools = tools()

    def verifiers(self) -> list[Any]:
        from honed.verifiers import ReferenceMatch

        return [ReferenceMatch("numeric")]

    def draw(self, rng: random.Random) -> Problem:
        kind = rng.choices(("one_step", "two_step", "convert"), weights=(3, 4, 3))[0]
        if kind == "convert":
            unit, to = rng.choice(list(FACTORS))
            value = rng.randint(2, 99)
            return _problem(
                f"Convert {value} {unit} to {to}.",
                kind,
                [("convert", {"value": value, "unit": unit, "to": to})],
            )
        op = rng.choice(list(_OPS))
        a, b = _operands(rng, op)
        if kind == "one_step":
            return _problem(f"What is {a} {_OPS[op][0]} {b}?", kind, [(op, {"a": a, "b": b})])
        first = _OPS[op][1](a, b)
        op2 = rng.choice([o for o in _OPS if o != "mul"] if first > 200 else list(_OPS))
        c = rng.randint(2, 9) if op2 == "mul" else rng.randint(2, 99)
        if op2 == "sub" and c > first:
            op2 = "add"
        return _problem(
            f"What is {a} {_OPS[op][0]} {b}, then {_OPS[op2][0]} {c}?",
            kind,
            [(op, {"a": a, "b": b}), (op2, {"a": first, "b": c})],
        )


def _operands(rng: random.Random, op: str) -> tuple[int, int]:
    if op == "mul":
        return rng.randint(2, 99), rng.randint(2, 9)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return (max(a, b), min(a, b)) if op == "sub" else (a, b)


def _problem(prompt: str, kind: str, calls: list[tuple[str, dict[str, Any]]]) -> Problem:
    result = 0
    for name, args in calls:
        result = convert(**args) if name == "convert" else _OPS[name][1](**args)
    return Problem(prompt, kind, {"expected": result}, Solution(tuple(calls), str(result)))
