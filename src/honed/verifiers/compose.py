"""Composition: several verifiers judged as one.

    >>> all_of(ReferenceMatch(), JsonSchema(Booking))           # every part must pass
    >>> any_of(ReferenceMatch("regex"), Judge(model, rubric))   # one pass is enough
    >>> weighted({TestSuite(): 0.7, Judge(model, style): 0.3}, threshold=0.6)

Undecided parts (`passed=None`) never turn a composite into a pass: `all_of` is undecided when no
part failed but one could not tell, `any_of` when none passed but one could not tell, and `weighted`
scores only the decided parts (undecided when none decided). A composite is low-trust as soon as one
part is; parts that raise make the whole composite an error, retried like any verifier's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from honed.trajectory import Trajectory, Verdict
from honed.verifiers.protocol import BaseVerifier, trust_of, verdict, verifier_name, verifier_version

_MAX_VERSION = 64


class Composite(BaseVerifier):
    """Runs its parts that apply and combines their verdicts; subclasses say how."""

    kind = "composite"

    def __init__(self, parts: Iterable[Any], *, name: str | None = None, version: str | None = None) -> None:
        self.parts = list(parts)
        if not self.parts:
            raise ValueError(f"{self.kind} needs at least one verifier")
        self.name = name or f"{self.kind}({','.join(verifier_name(p) for p in self.parts)})"
        self.version = version or _combined_version(self.parts)
        self.trust = "low" if any(trust_of(p) == "low" for p in self.parts) else "high"
        timeouts = [getattr(p, "timeout_s", None) for p in self.parts]
        self.timeout_s = sum(timeouts) if all(isinstance(x, int | float) for x in timeouts) else None

    def applies_to(self, trajectory: Trajectory) -> bool:
        return any(_applies(p, trajectory) for p in self.parts)

    def check(self, t: Trajectory) -> Verdict:
        verdicts = [p.verify(t) for p in self.parts if _applies(p, t)]
        result = self.combine(verdicts)
        result.evidence["parts"] = [
            {
                "verifier": v.verifier,
                "version": v.version,
                "passed": v.passed,
                "score": v.score,
                "reason": v.reason,
            }
            for v in verdicts
        ]
        return result

    def combine(self, verdicts: list[Verdict]) -> Verdict:
        raise NotImplementedError

    def prepare(self, store: Any) -> None:
        for part in self.parts:
            if hasattr(part, "prepare"):
                part.prepare(store)

    def close(self) -> None:
        for part in self.parts:
            if hasattr(part, "close"):
                part.close()


class AllOf(Composite):
    kind = "all_of"

    def combine(self, verdicts: list[Verdict]) -> Verdict:
        failed = [v for v in verdicts if v.passed is False]
        unknown = [v for v in verdicts if v.passed is None]
        score = min((v.score for v in verdicts), default=0.0)
        if failed:
            return verdict(False, "; ".join(f"{v.verifier}: {v.reason}" for v in failed), score)
        if unknown:
            return verdict(None, "; ".join(f"{v.verifier}: {v.reason}" for v in unknown), score)
        return verdict(True, f"all {len(verdicts)} checks passed", score)


class AnyOf(Composite):
    kind = "any_of"

    def combine(self, verdicts: list[Verdict]) -> Verdict:
        passed = [v for v in verdicts if v.passed is True]
        score = max((v.score for v in verdicts), default=0.0)
        if passed:
            return verdict(True, f"{passed[0].verifier}: {passed[0].reason}", score)
        if any(v.passed is None for v in verdicts):
            return verdict(None, "no check passed and some could not tell", score)
        return verdict(False, "; ".join(f"{v.verifier}: {v.reason}" for v in verdicts), score)


class Weighted(Composite):
    kind = "weighted"

    def __init__(
        self,
        weights: Mapping[Any, float] | Iterable[tuple[Any, float]],
        *,
        threshold: float = 0.5,
        name: str | None = None,
        version: str | None = None,
    ) -> None:
        pairs = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        if any(w < 0 for _, w in pairs) or not any(w > 0 for _, w in pairs):
            raise ValueError("weights must be non-negative and not all zero")
        self.weights = {id(p): float(w) for p, w in pairs}
        self.threshold = threshold
        super().__init__((p for p, _ in pairs), name=name, version=version)
        if version is None:
            self.version = _combined_version(self.parts, [w for _, w in pairs], threshold)

    def check(self, t: Trajectory) -> Verdict:
        verdicts, weights = [], []
        for part in self.parts:
            if _applies(part, t):
                verdicts.append(part.verify(t))
                weights.append(self.weights[id(part)])
        decided = [(v, w) for v, w in zip(verdicts, weights, strict=True) if v.passed is not None]
        total = sum(w for _, w in decided)
        if not decided or total <= 0:
            result = verdict(None, "no weighted check could decide")
        else:
            score = sum(v.score * w for v, w in decided) / total
            result = verdict(
                score >= self.threshold, f"weighted score {score:.3f} (threshold {self.threshold:g})", score
            )
        result.evidence["parts"] = [
            {"verifier": v.verifier, "version": v.version, "passed": v.passed, "score": v.score, "weight": w}
            for v, w in zip(verdicts, weights, strict=True)
        ]
        return result


def all_of(*verifiers: Any, name: str | None = None, version: str | None = None) -> AllOf:
    """Passes when every applicable part passes."""
    return AllOf(verifiers, name=name, version=version)


def any_of(*verifiers: Any, name: str | None = None, version: str | None = None) -> AnyOf:
    """Passes when at least one applicable part passes."""
    return AnyOf(verifiers, name=name, version=version)


def weighted(
    weights: Mapping[Any, float] | Iterable[tuple[Any, float]],
    *,
    threshold: float = 0.5,
    name: str | None = None,
    version: str | None = None,
) -> Weighted:
    """Passes when the weighted mean score of the decided parts reaches `threshold`."""
    return Weighted(weights, threshold=threshold, name=name, version=version)


def _applies(part: Any, t: Trajectory) -> bool:
    applies = getattr(part, "applies_to", None)
    return True if applies is None else bool(applies(t))


def _combined_version(parts: list[Any], *extra: Any) -> str:
    text = "+".join(f"{verifier_name(p)}@{verifier_version(p)}" for p in parts)
    if extra:
        text += f";{extra}"
    if len(text) <= _MAX_VERSION and not extra:
        return "+".join(verifier_version(p) for p in parts)
    return "h" + hashlib.sha256(text.encode()).hexdigest()[:16]
