"""`coding`: write a one-line Python function; its pytest tests run in the bubblewrap sandbox.

    >>> task = CodingSuite().heldout[0]
    >>> task.prompt                 # e.g. "Write `def scale(x)` that returns x times 7."
    >>> task.metadata["tests"]      # pytest source: `from solution import scale` ...

The answer is the code itself, no fence (`TestSuite` takes the whole answer when there is no
fenced block): `def scale(x):\\n    return x * 7`. Slices: `multiply`, `offset` (plus or minus a
constant) and `clamp` (the larger or smaller of x and a constant, via max/min). The function
name is drawn from a list, so the model must copy it from the request, as well as the constant.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from honed.demo.generated import GeneratedSuite, Problem, Solution

SYSTEM_PROMPT = "Reply with the Python function only."

# fmt: off
FUNCTION_NAMES = (
    "scale", "shift", "bump", "grow", "adjust", "boost", "lift", "nudge", "warp", "tweak",
    "stretch", "offset", "raise", "lower", "tune", "twist", "pad", "trim", "limit", "cap",
    "floor", "level", "bend", "push", "pull", "slide", "step", "skew", "tilt", "turn",
)
# fmt: on

# slice -> (request wording, expression, reference implementation)
OPERATIONS: dict[str, tuple[tuple[str, str, Callable[[int, int], int]], ...]] = {
    "multiply": (("x times {k}", "x * {k}", lambda x, k: x * k),),
    "offset": (
        ("x plus {k}", "x + {k}", lambda x, k: x + k),
        ("x minus {k}", "x - {k}", lambda x, k: x - k),
    ),
    "clamp": (
        ("the larger of x and {k}", "max(x, {k})", max),
        ("the smaller of x and {k}", "min(x, {k})", min),
    ),
}
PROBES = (-7, -1, 0, 3, 12, 50)


class CodingSuite(GeneratedSuite):
    """See the module docstring; `TestSuite()` runs `metadata["tests"]` against the answer."""

    name = "coding"
    system_prompt = SYSTEM_PROMPT
    max_tokens = 40

    def verifiers(self) -> list[Any]:
        from honed.verifiers import TestSuite

        return [TestSuite()]

    def draw(self, rng: random.Random) -> Problem:
        kind = rng.choice(list(OPERATIONS))
        wording, expression, reference = rng.choice(OPERATIONS[kind])
        name, k = rng.choice(FUNCTION_NAMES), rng.randint(2, 40)
        code = f"def {name}(x):\n    return {expression.format(k=k)}"
        asserts = "".join(f"    assert {name}({x}) == {reference(x, k)}\n" for x in PROBES)
        tests = f"from solution import {name}\n\n\ndef test_{name}():\n{asserts}"
        prompt = f"Write `def {name}(x)` that returns {wording.format(k=k)}."
        return Problem(prompt, kind, {"tests": tests}, Solution(answer=code))
