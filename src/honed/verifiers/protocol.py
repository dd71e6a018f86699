"""The verifier protocol, `verify(trajectory) -> Verdict`, and what every built-in shares.

A verifier is anything with a `name`, a `version` and a `verify` method. Optional attributes refine
how the worker treats it: `applies_to(trajectory)` (its requirements are met: routing calls this),
`trust` ("high" for deterministic checks, "low" for model judges), `tags` (only trajectories with one
of these tags), `timeout_s` (its own deadline) and `close()`.

Verifiers decide between three outcomes: pass, fail, and "could not tell" (`passed=None`: no
reference, a malformed or truncated reference). `CannotTell` raised anywhere inside `check` becomes
the third; `Unreadable` (what the agent produced cannot be read: cut at the field cap, or carrying
the cap's marker) a fail; every other exception is the worker's business (an error verdict with its
traceback).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Literal, Protocol, runtime_checkable

from honed.trajectory import ERROR_KEY, Trajectory, Verdict

Trust = Literal["high", "low"]


class VerifierError(RuntimeError):
    """A verifier could not run (as opposed to running and failing the trajectory)."""


class VerifierTimeout(VerifierError):
    """A verifier ran past its deadline; recorded as an error verdict, never as a pass."""

    def __init__(self, verifier: str, trajectory_id: str, timeout_s: float) -> None:
        super().__init__(
            f"verifier {verifier!r} took longer than {timeout_s:g}s on trajectory {trajectory_id}; "
            "raise its timeout_s or make it faster"
        )
        self.verifier, self.trajectory_id, self.timeout_s = verifier, trajectory_id, timeout_s


class UnknownVerifier(VerifierError, ValueError):
    """A verifier named on the command line or in metadata that nobody registered."""


class CannotTell(Exception):
    """Raised inside a verifier when the trajectory cannot be judged; becomes `passed=None`."""

    def __init__(self, reason: str, **evidence: Any) -> None:
        super().__init__(reason)
        self.reason, self.evidence = reason, evidence


class Unreadable(Exception):
    """Raised inside a verifier when what the agent produced cannot be judged (its answer or a
    tool call's arguments were over the field cap, or hold the cap's marker, which the agent can
    write itself); becomes a fail: "could not tell" is never counted by `label`, so an agent that
    could pick it beside a passing verifier would pass."""

    def __init__(self, reason: str, **evidence: Any) -> None:
        super().__init__(reason)
        self.reason, self.evidence = reason, evidence


@runtime_checkable
class Verifier(Protocol):
    """What the worker needs: a stable name and version, and a verdict for one trajectory."""

    name: str
    version: str

    def verify(self, trajectory: Trajectory) -> Verdict: ...


class BaseVerifier:
    """Convenience base: times `check`, stamps name and version, turns `CannotTell` into None
    and `Unreadable` into a fail.

    Subclasses implement `check(trajectory) -> Verdict` and, when they need something from the
    trajectory (a reference answer, tests), `applies_to`.
    """

    name: str = "verifier"
    version: str = "1"
    trust: Trust = "high"
    tags: frozenset[str] = frozenset()
    timeout_s: float | None = None

    def verify(self, trajectory: Trajectory) -> Verdict:
        start = time.perf_counter()
        try:
            if not trajectory.finished:  # the worker never queues these; a direct call gets told
                raise CannotTell("the run is paused at an interrupt, waiting for a human: no outcome yet")
            verdict = self.check(trajectory)
        except CannotTell as exc:
            verdict = Verdict(passed=None, reason=exc.reason, evidence=dict(exc.evidence))
        except Unreadable as exc:
            verdict = Verdict(passed=False, score=0.0, reason=exc.reason, evidence=dict(exc.evidence))
        verdict.verifier, verdict.version = self.name, self.version
        verdict.trajectory_id = trajectory.id
        verdict.duration_s = time.perf_counter() - start
        if self.trust != "high":
            verdict.evidence.setdefault("trust", self.trust)
        return verdict

    def check(self, trajectory: Trajectory) -> Verdict:
        raise NotImplementedError

    def applies_to(self, trajectory: Trajectory) -> bool:
        return True

    def close(self) -> None:
        """Release what the verifier holds (sandboxes, clients); the worker calls it on exit."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r})"


def verdict(passed: bool | None, reason: str, score: float | None = None, **evidence: Any) -> Verdict:
    """A verdict with the conventional score (1 pass, 0 otherwise) unless one is given."""
    if score is None:
        score = 1.0 if passed else 0.0
    if score != score:  # NaN: max/min made it 1.0
        raise ValueError("a verdict's score is NaN")
    return Verdict(passed=passed, score=max(0.0, min(1.0, float(score))), reason=reason, evidence=evidence)


def error_verdict(
    verifier: Any, trajectory_id: str, error: BaseException, trace: str, attempt: int
) -> Verdict:
    """What the worker records when a verifier raises or times out: undecided, with the traceback."""
    return Verdict(
        passed=None,
        score=0.0,
        reason=f"error: {type(error).__name__}: {error}"[:2000],
        evidence={ERROR_KEY: type(error).__name__, "traceback": trace[-8000:], "attempt": attempt},
        verifier=verifier_name(verifier),
        version=verifier_version(verifier),
        trajectory_id=trajectory_id,
    )


def verifier_name(v: Any) -> str:
    return str(getattr(v, "name", None) or type(v).__name__)


def verifier_version(v: Any) -> str:
    return str(getattr(v, "version", None) or "1")


def verifier_key(v: Any) -> tuple[str, str]:
    return verifier_name(v), verifier_version(v)


def trust_of(v: Any) -> Trust:
    return "low" if getattr(v, "trust", "high") == "low" else "high"


def names(verifiers: Iterable[Any]) -> list[str]:
    return [f"{verifier_name(v)}@{verifier_version(v)}" for v in verifiers]
