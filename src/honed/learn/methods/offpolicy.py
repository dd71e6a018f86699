"""Learning from passes and failures off-policy: the attempts already captured, not new rollouts.

Production tasks cannot be re-run on demand, so this method learns from the attempts that were
captured: several attempts at one task (a loop's samples, or production runs sharing a `task_id`)
form a group. A pass has advantage 1 (a verified pass is right whatever its group did); a failure
has minus its group's pass rate (a task the group shows to be within reach pushes its failures
down hardest; a task never passed says nothing about which tokens were wrong and is dropped:
`prepare(store, "offpolicy")`). The policy that sampled them is known token by token: honed's
`LocalChatModel` and `ServedModel` record the prompt's and the completion's token ids and each
sampled token's log-probability, so the importance ratio of the model being trained against that
policy is exact. Per sampled token `t` of an attempt with advantage `A`:

    ratio_t = exp(log p_theta(t) - log p_recorded(t))          (no gradient through it)
    loss_t  = -A * log p_theta(t)                               if A > 0
    loss_t  = -w * A * min(ratio_t, 1) * log p_theta(t)         if A < 0

averaged over the batch's sampled tokens (TRL GRPO's "dapo" normalisation), prompt and tool
results never trained. This is tapered off-policy REINFORCE (Le Roux et al. 2025, "TOPR"): passes
are learned as rejection-sampling SFT learns them, and a failure is pushed down with its ratio
truncated at 1, so its push fades as the model moves away from it, and weighted by `w`
(`failure_weight`, default 0.5: at 1 held-out pass@1 after two cycles was 0.492, at 0.5 0.556,
mean of 3 seeds on the same bases; after five cycles 0.737 against RS-SFT's 0.653 with the newest
rows counted once, 0.726 with them twice, 3 seeds on the same bases; benchmarks/README.md). PPO's clipped objective on the
same rows (ratio in [0.8, 1.2], passes clipped too) measured worse here: at the demo's rate it
pushed down the tool-call syntax failures share with passes until sampling collapsed (held-out
pass@1 0.28 -> 0.16 in two cycles), and at a tenth of it learned a third of what SFT did
(benchmarks/README.md). No reference model and no KL term.

It is TRL's `SFTTrainer` (so an `SFTConfig` configures it: learning rate, epochs, batch, LoRA ...)
whose `compute_loss` is the objective above (`offpolicy_trainer`); the batch's common prefix runs
once, as in `honed.learn.shared_prefix`. The recorded log-probabilities are the raw ones (before
temperature, top-k, top-p), as vLLM's `raw_logprobs`: at temperature 1 without truncation,
exactly the sampling policy's.
"""

from __future__ import annotations

import logging
from typing import Any

from honed.learn.datasets import TrainingData
from honed.learn.methods.base import NothingToLearn, TrlMethod

FAILURE_WEIGHT = 0.5


log = logging.getLogger("honed")


class OffPolicyMethod(TrlMethod):
    """Tapered off-policy policy gradient on captured attempts (`prepare(store, "offpolicy")`), with
    TRL's `SFTTrainer` under that loss and an `SFTConfig` (`config=` and/or its fields as keywords;
    see the module docstring). `failure_weight` scales the failures' push against the passes' pull.

        OffPolicyMethod(learning_rate=1e-5, num_train_epochs=2, failure_weight=0.5)
    """

    name = "offpolicy"
    accepts = ("offpolicy",)
    trl_classes = ("SFTConfig", "SFTTrainer")

    def __init__(self, *, failure_weight: float = FAILURE_WEIGHT, **kwargs: Any) -> None:
        if not failure_weight >= 0:
            raise ValueError(f"failure_weight must be >= 0, not {failure_weight!r}")
        self.failure_weight = float(failure_weight)
        super().__init__(**kwargs)

    def _extra_config(self) -> dict[str, Any]:
        return {"failure_weight": self.failure_weight}

    def _needs(self, data: TrainingData) -> dict[str, Any]:
        # Rows are recorded token ids; their `completion_mask` marks the sampled tokens.
        return {"completion_only_loss": True, "assistant_only_loss": False}

    def _check(self, data: TrainingData) -> None:
        if data.method in self.accepts and len(data.dataset) == 0 and data.counts.get("unpassed_groups"):
            raise NothingToLearn(
                f"offpolicy: every attempt at each of the {data.counts['unpassed_groups']} tasks attempted "
                "failed, so nothing shows what a right answer looks like: more attempts per task, or SFT "
                "on demonstrations or a teacher first"
            )
        super()._check(data)
        if data.counts.get("groups") and not data.counts.get("failed_attempts"):
            log.warning(
                "honed: offpolicy: no task here has a failed attempt beside a pass (one attempt per task?): "
                "this cycle learns from the %d passes alone, as SFT would; capture several attempts per "
                "task (`n` > 1, or runs sharing a task_id) to learn from failures",
                data.counts["groups"],
            )

    def _trainer(self, base: str, args: Any, data: TrainingData, tokenizer: Any, callbacks: list[Any]) -> Any:
        if args.packing or args.padding_free or args.truncation_mode != "keep_start":
            raise ValueError(
                "offpolicy aligns recorded logprobs with each row's tokens: it needs packing=False, "
                "padding_free=False and truncation_mode='keep_start'"
            )
        trainer = offpolicy_trainer()(
            model=base,
            args=args,
            train_dataset=data.dataset,
            processing_class=tokenizer,
            peft_config=self._peft(),
            callbacks=callbacks,
        )
        trainer.failure_weight = self.failure_weight
        return trainer

    def _metrics(self, trainer: Any, result: Any, seconds: float) -> dict[str, float]:
        metrics = super()._metrics(trainer, result, seconds)
        for key in ("tapered", "ratio_mean"):
            logged = [e[key] for e in trainer.state.log_history if key in e]
            if logged:
                metrics[key] = round(sum(logged) / len(logged), 4)
        return metrics


def offpolicy_trainer() -> type:
    """`trl.SFTTrainer` whose rows carry recorded `logprobs` and an `advantage`, and whose loss is
    the tapered off-policy objective (`offpolicy_loss`)."""
    from trl import SFTTrainer

    class OffPolicyTrainer(SFTTrainer):  # type: ignore[misc]
        failure_weight = FAILURE_WEIGHT

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.data_collator = RecordedLogprobsCollator(self.data_collator)

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, "logprobs", "advantage"]

        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            if return_outputs:
                raise NotImplementedError("offpolicy computes its loss only (no logits for compute_metrics)")
            # The shared prefix hands its KV cache to the rows' tails, which activation checkpointing
            # turns off: then the plain forward pass.
            loss, stats = offpolicy_loss(
                model, inputs, num_items_in_batch=num_items_in_batch,
                shared_prefix=not self.args.activation_checkpointing, failure_weight=self.failure_weight,
            )  # fmt: skip
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as SFTTrainer: DDP averages the gradients
            mode = "train" if model.training else "eval"
            for key, value in stats.items():
                self._metrics[mode][key].append(value)
            if mode == "train":  # TRL's `num_tokens` log, which honed's metrics read
                self._total_train_tokens += int(inputs["attention_mask"].sum())
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

    return OffPolicyTrainer


class RecordedLogprobsCollator:
    """TRL's collator, plus `old_logprobs` (each row's recorded logprobs, aligned with and padded
    like its `input_ids`; rows truncated by `max_length` keep their start) and `advantages`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        rows = [{k: v for k, v in e.items() if k not in ("logprobs", "advantage")} for e in examples]
        batch = self.inner(rows)
        old = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
        for i, e in enumerate(examples):
            recorded = list(e["logprobs"])[: len(e["input_ids"])]
            old[i, : len(recorded)] = torch.tensor(recorded, dtype=torch.float32)
        batch["old_logprobs"] = old
        batch["advantages"] = torch.tensor([float(e["advantage"]) for e in examples], dtype=torch.float32)
        return batch


def offpolicy_loss(
    model: Any,
    inputs: dict[str, Any],
    *,
    num_items_in_batch: Any = None,
    shared_prefix: bool = True,
    failure_weight: float = FAILURE_WEIGHT,
) -> tuple[Any, dict[str, float]]:
    """The tapered objective of a collated batch (`input_ids`, `attention_mask`, `labels` with -100
    off the sampled tokens, `old_logprobs`, `advantages`), over its sampled tokens; and what it saw:
    `ratio_mean`, `tapered` (the share of tokens weighted below 1: failures' tokens the model has
    already moved away from), `advantage_mean`."""
    import torch
    from trl.trainer.utils import selective_log_softmax

    from honed.learn.shared_prefix import shared_prefix_length, shared_prefix_logits

    ids, labels = inputs["input_ids"], inputs["labels"]
    start = shared_prefix_length(ids, labels != -100) if shared_prefix else 0
    logits = shared_prefix_logits(model, ids, inputs.get("attention_mask"), start)[:, :-1].float()
    targets = labels[:, start + 1 :]
    mask = (targets != -100).float()
    logps = selective_log_softmax(logits, targets.clamp(min=0))
    old = inputs["old_logprobs"][:, start + 1 :].to(logps.dtype)
    advantages = inputs["advantages"].to(logps.dtype).unsqueeze(1)
    ratio = torch.exp((logps.detach() - old) * mask)  # 1 off the sampled tokens, whatever was recorded there
    weight = torch.where(advantages > 0, torch.ones_like(ratio), failure_weight * ratio.clamp(max=1.0))
    per_token = -advantages * weight * logps
    count = num_items_in_batch if num_items_in_batch is not None else mask.sum()
    loss = (per_token * mask).sum() / torch.as_tensor(count, device=mask.device).clamp(min=1)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {
            "ratio_mean": float((ratio * mask).sum() / n),
            "tapered": float(((ratio < 1).float() * (advantages < 0).float() * mask).sum() / n),
            "advantage_mean": float((advantages * mask).sum() / n),
        }
    return loss, stats
