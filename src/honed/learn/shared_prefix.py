"""The SFT loss of agent conversations, computing their common prefix once per batch.

Every conversation of one agent opens with the same system prompt and tool schemas: most of its
tokens, none of them trained. `shared_prefix_loss` runs that prefix at batch size 1, repeats its
keys and values for the batch, and runs only the rows' own tails at full batch size. It is exact
(causal attention never looks ahead) and ~3x faster on the tool-use suite's conversations, but
needs the KV cache that activation checkpointing turns off (then TRL's own loss runs). The warm
start (`honed.demo.base_model`) and `SFTMethod` both train through `shared_prefix_trainer`.
"""

from __future__ import annotations

from typing import Any


def shared_prefix_trainer() -> type:
    """`trl.SFTTrainer` whose loss runs the batch's common prefix once (`shared_prefix_loss`)."""
    from trl import SFTTrainer

    class SharedPrefixSFTTrainer(SFTTrainer):  # type: ignore[misc]
        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            # Activation checkpointing recomputes each layer without a KV cache, which the shared
            # prefix hands to the rows' tails: with it on (TRL's default), TRL's own loss.
            plain = return_outputs or self.args.activation_checkpointing
            loss = None if plain else shared_prefix_loss(model, inputs, num_items_in_batch)
            if loss is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # As TRL's and transformers' own losses: `num_items_in_batch` counts every rank's
                # tokens, and DDP averages the ranks' gradients.
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            if model.training and "attention_mask" in inputs:  # keep TRL's `num_tokens` log honest
                tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum()
                self._total_train_tokens += int(tokens) // self.get_tp_size()
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

    return SharedPrefixSFTTrainer


def shared_prefix_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
    """The SFT loss of a batch whose rows start with the same tokens, computing that prefix once.

    Agent conversations all open with the same system prompt and tool schemas, most of their
    tokens and none of them trained. The prefix runs at batch size 1, its keys and values are
    repeated for the batch, and only the rows' own tails run at full batch size. Exact (causal
    attention never looks ahead); None when the batch shares too short a prefix to bother.
    """
    import torch

    ids, labels = inputs["input_ids"], inputs["labels"]
    start = shared_prefix_length(ids, labels != -100)
    if not start:
        return None
    logits = shared_prefix_logits(model, ids, inputs.get("attention_mask"), start)[:, :-1].float()
    targets = labels[:, start + 1 :]
    total = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    return total / torch.as_tensor(count).clamp(min=1)


MIN_SHARED_PREFIX = 16


def shared_prefix_length(ids: Any, trained: Any) -> int:
    """How many leading tokens all rows share, stopping before the first trained position (the
    prefix's own logits are never needed); 0 when that is under `MIN_SHARED_PREFIX` or one row."""
    if ids.shape[0] < 2:
        return 0
    start = int((ids == ids[:1]).all(0).long().cumprod(0).sum())
    first = trained.any(0).nonzero()
    if len(first):
        start = min(start, int(first[0]) - 1)
    return start if start >= MIN_SHARED_PREFIX else 0


def shared_prefix_logits(model: Any, ids: Any, attention: Any, start: int) -> Any:
    """Logits for positions `start..` of `ids`, running the shared `ids[:, :start]` once."""
    import torch

    if not start:
        return model(input_ids=ids, attention_mask=attention).logits
    head = model(input_ids=ids[:1, :start], use_cache=True)
    cache = head.cache
    cache.batch_repeat_interleave(ids.shape[0])
    tail = model(
        input_ids=ids[:, start:],
        attention_mask=attention if attention is not None else torch.ones_like(ids),
        cache=cache,
        use_cache=True,
    )
    return tail.logits
