"""Learning from failures too: KTO on passes and failures, DPO on (pass, failure) pairs."""

from __future__ import annotations

from typing import Any

from honed.learn.datasets import TrainingData
from honed.learn.methods.base import TrlMethod


class KTOMethod(TrlMethod):
    """KTO on verified passes (desirable) and failures (undesirable), with TRL's `KTOTrainer` and a
    `KTOConfig`: learns from failures without needing them paired. Its KL estimate needs a batch
    of at least 2.

    `after_divergence` (default True): a failure's loss falls only on its tokens after it diverged
    from every pass of the same task input; the tokens it shares with a pass (tool-call syntax, an
    answer's opening) move into its prompt. TRL's KTO scores the whole completion, so each failure
    pushed down the syntax the passes use too (`divergence_kto_trainer`)."""

    name = "kto"
    accepts = ("kto",)
    trl_classes = ("KTOConfig", "KTOTrainer")

    def __init__(self, *, after_divergence: bool = True, **kwargs: Any) -> None:
        self.after_divergence = after_divergence
        super().__init__(**kwargs)

    def _extra_config(self) -> dict[str, Any]:
        return {"after_divergence": self.after_divergence}

    def _trainer_class(self) -> type:
        return divergence_kto_trainer() if self.after_divergence else super()._trainer_class()

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


def divergence_kto_trainer() -> type:
    """`trl.KTOTrainer` whose undesirable rows are trained only after their first divergence from
    a desirable row with the same prompt: the common completion prefix joins the prompt."""
    from trl import KTOTrainer

    class DivergenceKTOTrainer(KTOTrainer):  # type: ignore[misc]
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if not hasattr(dataset, "column_names") or "prompt_ids" not in (dataset.column_names or ()):
                return dataset
            passes: dict[tuple[int, ...], list[list[int]]] = {}
            for prompt, completion, label in zip(
                dataset["prompt_ids"], dataset["completion_ids"], dataset["label"], strict=True
            ):
                if label:
                    passes.setdefault(tuple(prompt), []).append(completion)

            def after_divergence(example: dict[str, Any]) -> dict[str, Any]:
                prompt, completion = example["prompt_ids"], example["completion_ids"]
                if example["label"] or not completion:
                    return {"prompt_ids": prompt, "completion_ids": completion}
                shared = max(
                    (_common_prefix(c, completion) for c in passes.get(tuple(prompt), ())), default=0
                )
                shared = min(shared, len(completion) - 1)  # keep at least one token to push down
                return {"prompt_ids": prompt + completion[:shared], "completion_ids": completion[shared:]}

            return dataset.map(after_divergence)

    return DivergenceKTOTrainer


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class DPOMethod(TrlMethod):
    """DPO on (pass, failure) pairs of the same task input, with TRL's `DPOTrainer` and a
    `DPOConfig`. The completion is the whole attempt after the user's request, tool results
    included: TRL scores every completion token."""

    name = "dpo"
    accepts = ("dpo",)
    needs = (
        "a pass and a failure of the same task (task_id) to pair: with one attempt per task, there is none"
    )
    trl_classes = ("DPOConfig", "DPOTrainer")
