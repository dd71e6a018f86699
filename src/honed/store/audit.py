"""How reliable is a verifier? Its verdicts against gold labels (human, by default) on the same trajectories.

A pass is the positive class, because a pass is what becomes training data:
- precision = gold passes among the verifier's passes (what a trainer relies on),
- recall = the verifier's passes among gold passes (how much good data it finds),
- false-positive rate = the verifier's passes among gold fails (how much bad data slips in),
each with a Wilson score 95% interval, which stays honest for small samples and rates near 0 or 1.
Verdicts where either side could not tell (or the verifier erred) are counted as `undecided`, not
guessed. `TrajectoryStore.audit_verifier` runs this on stored verdicts and keeps the result.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

Z_95 = 1.959963984540054


@dataclass(frozen=True, slots=True)
class Rate:
    """A proportion `k/n` with its Wilson 95% interval."""

    k: int
    n: int
    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.k}/{self.n})"


@dataclass(slots=True)
class AuditResult:
    """A verifier's confusion matrix against gold labels, and the rates it implies."""

    verifier: str
    version: str | None
    gold: str
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    undecided: int = 0
    id: int | None = None
    created_at: datetime | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        """Trajectories where both sides decided."""
        return self.tp + self.fp + self.tn + self.fn

    @property
    def precision(self) -> Rate | None:
        return wilson(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> Rate | None:
        return wilson(self.tp, self.tp + self.fn)

    @property
    def false_positive_rate(self) -> Rate | None:
        return wilson(self.fp, self.fp + self.tn)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["n"] = self.n
        for name in ("precision", "recall", "false_positive_rate"):
            rate = getattr(self, name)
            data[name] = None if rate is None else asdict(rate)
        if isinstance(self.created_at, datetime):
            data["created_at"] = self.created_at.isoformat()
        return data


def wilson(k: int, n: int, z: float = Z_95) -> Rate | None:
    """The Wilson score interval for `k` successes in `n` trials; None when `n` is 0."""
    if n <= 0:
        return None
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exact at the edges, where rounding drifts
    high = 1.0 if k == n else min(1.0, centre + half)
    return Rate(k, n, p, low, high)


def confusion(
    pairs: Iterable[tuple[bool | None, bool | None]], *, verifier: str, version: str | None, gold: str
) -> AuditResult:
    """Count (verifier says, gold says) pairs into an `AuditResult`."""
    result = AuditResult(verifier=verifier, version=version, gold=gold)
    for said, truth in pairs:
        if said is None or truth is None:
            result.undecided += 1
        elif said and truth:
            result.tp += 1
        elif said:
            result.fp += 1
        elif truth:
            result.fn += 1
        else:
            result.tn += 1
    return result
