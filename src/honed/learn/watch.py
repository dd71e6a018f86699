"""The reward-hacking watch: a training verifier the model learns to game.

Training data is labelled by the training verifiers; the gate may judge with others (hidden
tests, a stronger judge). Each gate evaluation also runs the training verifiers on the same
held-out attempts, without counting them (`Scores.by_verifier`). When a candidate's pass rate under
a training verifier rises by `rise` or more over the live version's while the gate's independent
held-out pass@1 falls by `fall` or more, that verifier is flagged (Rubric Dropout-style divergence:
the training judge's score rises while an independent one falls). The gate rejects such a
candidate anyway; the flag says which verifier to audit (`honed verify --audit`) before its labels
teach the next candidate the same trick. `honed status` and the report show the flags.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from honed.trajectory import HELDOUT

RISE, FALL = 0.05, 0.02


@dataclass(frozen=True)
class Divergence:
    """In training run `run`, `verifier` passed `train_from` -> `train_to` of the held-out attempts
    (live -> candidate) while the gate's held-out pass@1 went `gate_from` -> `gate_to`."""

    run: int
    verifier: str
    live: str
    candidate: str
    train_from: float
    train_to: float
    gate_from: float
    gate_to: float

    def __str__(self) -> str:
        return (
            f"{self.verifier} may be gamed: it passed {self.train_from:.0%} -> {self.train_to:.0%} of the "
            f"held-out attempts ({self.live} -> {self.candidate}, run {self.run}) while the gate's "
            f"independent pass@1 fell {self.gate_from:.3f} -> {self.gate_to:.3f}; audit it"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"message": str(self)}


def divergences(store: Any, model: str, *, rise: float = RISE, fall: float = FALL) -> list[Divergence]:
    """Flags over the model's training runs, oldest first (see the module docstring)."""
    evals: dict[str, dict[str, Any]] = {}
    for e in store.eval_runs(model, split=HELDOUT):
        evals[e.version] = e.metrics  # the latest evaluation of each version
    flags = []
    for run in reversed(store.training_runs(model, limit=None)):
        live, candidate = evals.get(run.parent or ""), evals.get(run.candidate or "")
        gate = set((run.data or {}).get("gate_verifiers") or ())
        if not live or not candidate or not gate:
            continue
        gate_from, gate_to = live.get("pass_at_1"), candidate.get("pass_at_1")
        if gate_from is None or gate_to is None or gate_from - gate_to < fall:
            continue
        before, after = live.get("by_verifier") or {}, candidate.get("by_verifier") or {}
        for verifier in sorted(set(before) & set(after) - gate):
            if after[verifier] - before[verifier] >= rise:
                rates = (before[verifier], after[verifier], gate_from, gate_to)
                flags.append(Divergence(run.id, verifier, run.parent, run.candidate, *rates))
    return flags
