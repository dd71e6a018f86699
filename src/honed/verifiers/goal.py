"""`GoalCheck`: your own predicate on the agent's final state, e.g. a simulator saying the goal was reached.

    >>> GoalCheck(lambda state: state["answer"].endswith("booked"), name="booking")
    >>> GoalCheck(lambda state, trajectory: simulator.reached(trajectory.task_id, state))

The callable receives the final state as a dict: the captured output when it is one (message agents
with extra state keys give `{"answer": <last assistant text>, <key>: ...}`), else
`{"answer": <output>}`; with a second parameter it also receives the `Trajectory`. It may return a
bool, None (could not tell), a score in [0, 1] (passes at `threshold`), a `(passed, reason)` pair,
a dict of `Verdict` fields, or a `Verdict`. Truncated or empty captures never reach it, nor a
run that raised before it answered: that fails, as every verifier judges it.

It runs in the worker's process, under the worker's deadline: a check that may hang for real (a
remote simulator) should carry its own timeout too, because a Python thread cannot be killed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

from honed.trajectory import Trajectory, Verdict
from honed.verifiers.outcome import agent_failed, final_state
from honed.verifiers.protocol import BaseVerifier, verdict


class GoalCheck(BaseVerifier):
    """Wraps a user callable on the final state; see the module docstring for what it may return."""

    def __init__(
        self,
        check: Callable[..., Any],
        *,
        name: str = "goal",
        version: str = "1",
        threshold: float = 1.0,
        when: Callable[[Trajectory], bool] | None = None,
        tags: Iterable[str] = (),
        timeout_s: float | None = None,
    ) -> None:
        self.fn, self.threshold, self.when = check, threshold, when
        self.name, self.version, self.tags, self.timeout_s = name, version, frozenset(tags), timeout_s
        self._wants_trajectory = _positional_arity(check) >= 2

    def applies_to(self, trajectory: Trajectory) -> bool:
        return self.when is None or bool(self.when(trajectory))

    def check(self, t: Trajectory) -> Verdict:
        failed = agent_failed(t)
        if failed is not None:  # as every verifier has it: "could not tell" let another's pass decide
            return verdict(False, f"the agent run failed: {failed}"[:500], agent_error=failed[:2000])
        state = final_state(t)
        result = self.fn(state, t) if self._wants_trajectory else self.fn(state)
        return self._as_verdict(result)

    def _as_verdict(self, result: Any) -> Verdict:
        if isinstance(result, Verdict):
            return result
        if result is None:
            return verdict(None, "the goal check could not tell")
        if isinstance(result, bool):
            return verdict(result, "goal reached" if result else "goal not reached")
        if isinstance(result, int | float):
            score = float(result)
            if math.isnan(score):
                raise ValueError(f"goal check {self.name!r} scored NaN (a 0/0 metric?): no verdict from that")
            return verdict(
                score >= self.threshold, f"goal score {score:.3g} (threshold {self.threshold:g})", score=score
            )
        if isinstance(result, tuple) and len(result) == 2:
            passed, reason = result
            return verdict(_passed(passed), str(reason))
        if isinstance(result, dict):
            passed = result.get("passed")
            return verdict(
                _passed(passed),
                str(result.get("reason", "")),
                result.get("score"),
                **dict(result.get("evidence") or {}),
            )
        raise TypeError(
            f"goal check {self.name!r} returned {type(result).__name__}; return a bool, None, a score, "
            "(passed, reason), a dict or a Verdict"
        )


def _positional_arity(fn: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return 2
    return sum(1 for p in params if p.kind in kinds)


def _passed(value: Any) -> bool | None:
    """A check's own pass/fail: True, False or None; "false" from a simulator's JSON is an error,
    not a truthy string made into a pass."""
    if value is None or type(value) is bool:
        return value
    raise TypeError(f"a goal check's passed must be True, False or None, not {value!r}")
