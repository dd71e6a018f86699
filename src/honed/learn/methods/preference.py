"""Learning from failures too: KTO on passes and failures, DPO on (pass, failure) pairs."""

from __future__ import annotations

from typing import Any

from honed.learn.datasets import TrainingData
from honed.learn.methods.base import TrlMethod


class KTOMethod(TrlMethod):
    """KTO on verified passes (desirable) and failures (undesirable), with TRL's `KTOTrainer` and a
    `KTOConfig`: learns from failures without needing them paired. Its KL estimate needs a batch
    of at least 2."""

    name = "kto"
    accepts = ("kto",)
    trl_classes = ("KTOConfig", "KTOTrainer")

    def _needs(self, data: TrainingData) -> dict[str, Any]:
        """Weights that balance passes against failures, as TRL advises (desirable x passes over
        undesirable x failures within [1, 4/3]), unless the user set either weight. A loop's
        attempts fail more often than they pass; unbalanced (and at 1e-4) the failures' push-down
        took the tool-use model to 0 held-out passes in one cycle (`benchmarks/learning.py`, arm d)."""
        if {"desirable_weight", "undesirable_weight"} & self.chosen.keys():
            return {}
        labels = list(data.dataset["label"])
        passes, failures = sum(labels), len(labels) - sum(labels)
        if passes and failures > passes:
            return {"undesirable_weight": passes / failures}
        if failures and passes > failures * 4 / 3:
            return {"desirable_weight": failures / passes}
        return {}


class DPOMethod(TrlMethod):
    """DPO on (pass, failure) pairs of the same task input, with TRL's `DPOTrainer` and a
    `DPOConfig`. The completion is the whole attempt after the user's request, tool results
    included: TRL scores every completion token."""

    name = "dpo"
    accepts = ("dpo",)
    trl_classes = ("DPOConfig", "DPOTrainer")
