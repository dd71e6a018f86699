"""SFT on verified passes, and distillation from a teacher configuration (SFT on its verified
runs, or TRL's on-policy `DistillationTrainer` given the teacher's weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from honed.learn.datasets import TrainingData
from honed.learn.methods.base import TrlMethod


class SFTMethod(TrlMethod):
    """Supervised fine-tuning on verified passes (`prepare(store, "sft")`) with TRL's `SFTTrainer`
    and an `SFTConfig` (`config=` and/or its fields as keywords), loss on the model's own turns
    only: assistant turns of conversations (`assistant_only_loss`, which needs a chat template
    with `{% generation %}` markers: see `_trainer`), or the sampled tokens of pre-tokenised rows
    (`completion_only_loss` over their `completion_mask`).

        SFTMethod(num_train_epochs=1, learning_rate=1e-5)
        SFTMethod(config=SFTConfig(output_dir="unused", per_device_train_batch_size=4), lora=True)
    """

    name = "sft"
    accepts = ("sft", "distill")
    trl_classes = ("SFTConfig", "SFTTrainer")

    def _needs(self, data: TrainingData) -> dict[str, Any]:
        if data.pretokenized:
            # `completion_mask` counts only under completion_only_loss=True (its None default
            # looks for prompt/completion columns), and assistant_only_loss refuses token rows.
            return {"completion_only_loss": True, "assistant_only_loss": False}
        return {"assistant_only_loss": True}

    def _trainer(self, base: str, args: Any, data: TrainingData, tokenizer: Any, callbacks: list[Any]) -> Any:
        if args.assistant_only_loss and not data.pretokenized:
            tokenizer.chat_template = _with_generation_markers(tokenizer.chat_template)
        return super()._trainer(base, args, data, tokenizer, callbacks)

    def _trainer_class(self) -> type:
        from honed.learn.shared_prefix import shared_prefix_trainer

        # An agent's conversations share their system prompt and tools: run that prefix once a batch.
        return shared_prefix_trainer()


def _with_generation_markers(template: Any) -> Any:
    """The run-time template with `{% generation %}` markers where honed can place them (a
    Qwen3-style template: `training_template`), so training sees exactly the text the model
    reads and writes at run time. Otherwise the template as it is, and TRL's own handling
    (it swaps in a training template for the ones it knows, and refuses the rest)."""
    from trl.chat_template_utils import has_generation_markers

    from honed.learn.chat_templates import training_template

    if not isinstance(template, str) or has_generation_markers(template):
        return template
    try:
        return training_template(template)
    except ValueError:
        return template


class DistillMethod(SFTMethod):
    """Distillation from a teacher configuration's verified trajectories.

    Without `teacher`: SFT on them (`prepare(store, "distill", agent=..., model_version=...)`
    selects the teacher's attempts), configured by an `SFTConfig`. With `teacher`, a model
    folder sharing the student's vocabulary: TRL's on-policy `DistillationTrainer` on the same
    tasks' prompts, the student generating and the teacher's logits as the target, configured
    by a `DistillationConfig`."""

    name = "distill"
    accepts = ("distill", "sft")

    def __init__(self, *, teacher: str | Path | None = None, **kwargs: Any) -> None:
        self.teacher = None if teacher is None else str(teacher)
        super().__init__(**kwargs)

    def config_class(self) -> type:
        if self.teacher is None:
            return super().config_class()
        from trl import DistillationConfig

        return DistillationConfig

    def _extra_config(self) -> dict[str, Any]:
        return {"teacher": self.teacher}

    def _needs(self, data: TrainingData) -> dict[str, Any]:
        return super()._needs(data) if self.teacher is None else {}

    def _trainer(self, base: str, args: Any, data: TrainingData, tokenizer: Any, callbacks: list[Any]) -> Any:
        if self.teacher is None:
            return super()._trainer(base, args, data, tokenizer, callbacks)
        from trl import DistillationTrainer

        return DistillationTrainer(
            model=base,
            teacher_model=self.teacher,
            args=args,
            train_dataset=teacher_prompts(data),
            processing_class=tokenizer,
            peft_config=self._peft(),
            callbacks=callbacks,
        )


def teacher_prompts(data: TrainingData) -> Any:
    """The distinct task inputs (the conversation up to its last user message) of conversational
    rows: what the on-policy student answers while the teacher scores it."""
    from datasets import Dataset

    from honed.messages import split_at_last_user

    if "messages" not in data.dataset.column_names:
        raise ValueError(
            "on-policy distillation needs conversations: prepare(..., pretokenized=False) "
            "(these rows are recorded token ids)"
        )
    seen: dict[str, list[dict[str, Any]]] = {}
    for messages in data.dataset["messages"]:
        prompt = [{"role": m["role"], "content": m["content"] or ""} for m in split_at_last_user(messages)[0]]
        if prompt:
            seen.setdefault(json.dumps(prompt, sort_keys=True), prompt)
    return Dataset.from_list([{"prompt": p} for p in seen.values()])
