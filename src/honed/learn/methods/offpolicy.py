"""Learning from passes and failures off-policy: the attempts already captured, not new rollouts.

Production tasks cannot be re-run on demand, so this method learns from the attempts that were
captured: several attempts at one task (a loop's samples, or production runs sharing a `task_id`)
form a group, and each attempt's advantage is its verdict against the group's, as GRPO computes it
(`prepare(store, "offpolicy")`: `(r - mean) / std`, groups whose attempts all got the same verdict
dropped). The policy that sampled them is known token by token: honed's `LocalChatModel` and
`ServedModel` record the prompt's and the completion's token ids and each sampled token's
log-probability, so the importance ratio of the model being trained against that policy is exact,
and it is clipped as PPO clips it. Per sampled token `t` of an attempt with advantage `A`:

    ratio_t = exp(log p_theta(t) - log p_recorded(t))
    loss_t  = -min(ratio_t * A, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) * A)

averaged over the batch's sampled tokens (TRL GRPO's "dapo" normalisation), prompt and tool
results never trained. A pass's tokens are pushed up and a failure's down only while the ratio
stays inside the clip range: attempts the model has already moved away from stop counting, which
is what keeps older versions' attempts (a lineage) and several epochs safe. No reference model
and no KL term (TRL's GRPO default, `beta=0`).

It is TRL's `SFTTrainer` (so an `SFTConfig` configures it: learning rate, epochs, batch, LoRA ...)
whose `compute_loss` is the clipped objective above (`offpolicy_trainer`); the batch's common
prefix runs once, as in `honed.learn.shared_prefix`. The recorded log-probabilities are the raw
ones (before temperature, top-k, top-p), as vLLM's `raw_logprobs`: at temperature 1 without
truncation, exactly the sampling policy's.
"""

from __future__ import annotations

from typing import Any

from honed.learn.datasets import TrainingData
from honed.learn.methods.base import NothingToLearn, TrlMethod


class OffPolicyMethod(TrlMethod):
    """Clipped off-policy policy gradient on captured attempts (`prepare(store, "offpolicy")`), with
    TRL's `SFTTrainer` under a clipped-ratio loss and an `SFTConfig` (`config=` and/or its fields as
    keywords); `epsilon` (default 0.2, PPO's) and `epsilon_high` (default: `epsilon`) bound the
    ratio (see the module docstring).

        OffPolicyMethod(learning_rate=1e-5, num_train_epochs=2)
    """

    name = "offpolicy"
    accepts = ("offpolicy",)
    trl_classes = ("SFTConfig", "SFTTrainer")

    def __init__(self, *, epsilon: float = 0.2, epsilon_high: float | None = None, **kwargs: Any) -> None:
        if not 0 < epsilon < 1 or (epsilon_high is not None and epsilon_high <= 0):
            raise ValueError(f"epsilon in (0, 1) and epsilon_high > 0, not {epsilon}, {epsilon_high}")
        self.epsilon = epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        super().__init__(**kwargs)

    def _extra_config(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon, "epsilon_high": self.epsilon_high}

    def _needs(self, data: TrainingData) -> dict[str, Any]:
        # Rows are recorded token ids; their `completion_mask` marks the sampled tokens.
        return {"completion_only_loss": True, "assistant_only_loss": False}

    def _check(self, data: TrainingData) -> None:
        if data.method in self.accepts and len(data.dataset) == 0 and data.counts.get("zero_variance_groups"):
            raise NothingToLearn(
                f"offpolicy: in each of the {data.counts['zero_variance_groups']} tasks attempted, every "
                "attempt got the same verdict, so no advantage and no gradient: tasks all solved or all out "
                "of reach; more attempts per task, or SFT on demonstrations or a teacher first"
            )
        super()._check(data)

    def _trainer(self, base: str, args: Any, data: TrainingData, tokenizer: Any, callbacks: list[Any]) -> Any:
        if args.packing or args.padding_free or args.truncation_mode != "keep_start":
            raise ValueError(
                "offpolicy aligns recorded logprobs with each row's tokens: it needs packing=False, "
                "padding_free=False and truncation_mode='keep_start'"
            )
        return offpolicy_trainer()(
            model=base,
            args=args,
            train_dataset=data.dataset,
            processing_class=tokenizer,
            peft_config=self._peft(),
            callbacks=callbacks,
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
        )

    def _metrics(self, trainer: Any, result: Any, seconds: float) -> dict[str, float]:
        metrics = super()._metrics(trainer, result, seconds)
        for key in ("clip_ratio", "ratio_mean"):
            logged = [e[key] for e in trainer.state.log_history if key in e]
            if logged:
                metrics[key] = round(sum(logged) / len(logged), 4)
        return metrics


def offpolicy_trainer() -> type:
    """`trl.SFTTrainer` whose rows carry recorded `logprobs` and an `advantage`, and whose loss is
    the clipped off-policy objective (`offpolicy_loss`)."""
    from trl import SFTTrainer

    class OffPolicyTrainer(SFTTrainer):  # type: ignore[misc]
        def __init__(
            self, *args: Any, epsilon: float = 0.2, epsilon_high: float | None = None, **kwargs: Any
        ):
            super().__init__(*args, **kwargs)
            self.epsilon, self.epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high
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
                model, inputs, epsilon=self.epsilon, epsilon_high=self.epsilon_high,
                num_items_in_batch=num_items_in_batch,
                shared_prefix=not self.args.activation_checkpointing,
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
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    num_items_in_batch: Any = None,
    shared_prefix: bool = True,
) -> tuple[Any, dict[str, float]]:
    """The clipped objective of a collated batch (`input_ids`, `attention_mask`, `labels` with -100
    off the sampled tokens, `old_logprobs`, `advantages`), over its sampled tokens; and what it saw:
    `ratio_mean`, `clip_ratio` (the share of tokens whose ratio was clipped, so without gradient),
    `advantage_mean`."""
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
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp((logps - old) * mask)  # 1 off the sampled tokens, whatever was recorded there
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    count = num_items_in_batch if num_items_in_batch is not None else mask.sum()
    loss = (per_token * mask).sum() / torch.as_tensor(count, device=mask.device).clamp(min=1)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        cut = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + high) & (advantages > 0))
        stats = {
            "ratio_mean": float((ratio * mask).sum() / n),
            "clip_ratio": float((cut.float() * mask).sum() / n),
            "advantage_mean": float((advantages * mask).sum() / n),
        }
    return loss, stats
