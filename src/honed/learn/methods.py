"""Training methods: each one is a TRL trainer with honed's defaults, and nothing more.

    result = SFTMethod(epochs=2).train("./live-model", prepare(store, "sft"), "./candidate")
    result.path, result.metrics   # a complete model folder; train_loss, steps, tokens, seconds ...

A method turns a `TrainingData` into a trained model folder that `AutoModelForCausalLM` and
`LocalChatModel` load (LoRA merged, tokenizer, generation config). There is no training loop here:
`SFTTrainer`, `KTOTrainer`, `DPOTrainer`, `GRPOTrainer` and `DistillationTrainer` do the work, and
`args` reaches their config unchanged, so anything TRL can do (DeepSpeed, FSDP, other losses) a
user asks for there. Defaults suit a CPU or one GPU: real learning rates, no bf16 or activation
checkpointing on CPU, no checkpoints, no reporting.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from honed.learn.datasets import TrainingData
from honed.messages import completion_trajectory
from honed.trajectory import Trajectory
from honed.trajectory import label as trajectory_label
from honed.verifiers.protocol import verifier_name

log = logging.getLogger("honed")

TINY_MANIFEST = "honed_tiny.json"


class NothingToLearn(RuntimeError):
    """Training cannot change the model for the better: no rows, or (GRPO) no group of attempts
    whose rewards differ. Not a failure of the run; `metrics` holds what was measured, if anything."""

    def __init__(self, reason: str, *, metrics: dict[str, float] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.metrics = dict(metrics or {})


@dataclass
class TrainResult:
    """The trained model folder and what training measured: `train_loss`, `steps`, `samples`,
    `tokens`, `seconds`, `tokens_per_s` (GRPO adds `reward`, `zero_variance_groups`)."""

    path: Path
    metrics: dict[str, float]


class _TrlMethod:
    """What every method shares: defaults → TRL config, LoRA, training, saving, metrics."""

    name: ClassVar[str] = ""
    accepts: ClassVar[tuple[str, ...]] = ()
    default_learning_rate: ClassVar[float] = 5e-4

    def __init__(
        self,
        *,
        lora: bool = False,
        epochs: float = 2,
        max_steps: int | None = None,
        learning_rate: float | None = None,
        batch_size: int = 16,
        max_length: int | None = 1024,
        args: dict[str, Any] | None = None,
        peft_config: Any = None,
    ) -> None:
        self.lora = lora or peft_config is not None
        self.epochs = epochs
        self.max_steps = max_steps
        self.learning_rate = self.default_learning_rate if learning_rate is None else learning_rate
        self.batch_size = batch_size
        self.max_length = max_length
        self.args = dict(args or {})
        self.peft_config = peft_config

    def config(self) -> dict[str, Any]:
        """The settings to record with a training run (JSON-able)."""
        peft = self._peft()
        return _jsonable(
            {
                "method": self.name,
                "lora": self.lora,
                "epochs": self.epochs,
                "max_steps": self.max_steps,
                "learning_rate": self.learning_rate,
                "batch_size": self.batch_size,
                "max_length": self.max_length,
                "args": self.args,
                "peft": peft.to_dict() if peft is not None else None,
                **self._extra_config(),
            }
        )

    def train(
        self,
        base: str | Path,
        data: TrainingData,
        out: str | Path,
        *,
        seed: int = 0,
        callbacks: Sequence[Any] = (),
    ) -> TrainResult:
        """Train from the model folder `base` on `data`; save the result at `out`.

        Raises `NothingToLearn` when `data` has no rows (before loading anything)."""
        self._check(data)
        out = Path(out)
        with tempfile.TemporaryDirectory(prefix="honed-train-") as scratch:
            trainer = self.build_trainer(base, data, scratch, seed=seed, callbacks=callbacks)
            started = time.perf_counter()
            result = trainer.train()
            seconds = time.perf_counter() - started
            metrics = self._metrics(trainer, result, seconds)
            self._verify_learned(trainer, metrics)
            _save(trainer, Path(base), out)
        log.info("%s: trained %s in %.1fs → %s", self.name, base, seconds, out)
        return TrainResult(path=out, metrics=metrics)

    def build_trainer(
        self,
        base: str | Path,
        data: TrainingData,
        output_dir: str | Path,
        *,
        seed: int = 0,
        callbacks: Sequence[Any] = (),
    ) -> Any:
        """The configured TRL trainer, untrained (to inspect its data, or to drive it yourself)."""
        from transformers import AutoTokenizer

        self._check(data)
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        args = self._trl_config(_merged(self._defaults(str(output_dir), seed, data), self.args))
        trainer = self._trainer(str(base), args, data, tokenizer, list(callbacks))
        # transformers prints every log dict to stdout when tqdm is off: honed's callers own stdout
        # (`honed demo --json`); the metrics reach them through TrainResult and the logger instead.
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        return trainer

    # -- per method --------------------------------------------------------------------------

    # TRL's config and trainer class names: `_trl_config` and `_trainer` build them by default.
    trl_classes: ClassVar[tuple[str, str]] = ("", "")

    def _trl_config(self, fields: dict[str, Any]) -> Any:
        import trl

        return getattr(trl, self.trl_classes[0])(**fields)

    def _trainer_class(self) -> type:
        import trl

        return getattr(trl, self.trl_classes[1])

    def _trainer(self, base: str, args: Any, data: TrainingData, tokenizer: Any, callbacks: list[Any]) -> Any:
        return self._trainer_class()(
            model=base,
            args=args,
            train_dataset=data.dataset,
            processing_class=tokenizer,
            peft_config=self._peft(),
            callbacks=callbacks,
        )

    def _method_defaults(self, data: TrainingData) -> dict[str, Any]:
        return {"max_length": self.max_length}

    def _extra_config(self) -> dict[str, Any]:
        return {}

    def _verify_learned(self, trainer: Any, metrics: dict[str, float]) -> None:
        """Raise `NothingToLearn` when training could not have changed the model."""

    # -- shared ------------------------------------------------------------------------------

    def _check(self, data: TrainingData) -> None:
        if data.method not in self.accepts:
            raise ValueError(
                f"{type(self).__name__} trains on prepare(store, {self.accepts[0]!r}) data, "
                f"not on {data.method!r} rows"
            )
        if len(data.dataset) == 0:
            counts = ", ".join(f"{k}={v}" for k, v in data.counts.items() if v)
            raise NothingToLearn(f"{self.name}: the dataset has no rows ({counts or 'nothing selected'})")

    def _defaults(self, output_dir: str, seed: int, data: TrainingData) -> dict[str, Any]:
        import torch

        cuda = torch.cuda.is_available()
        return {
            "output_dir": output_dir,
            "seed": seed,
            "num_train_epochs": self.epochs,
            "max_steps": -1 if self.max_steps is None else self.max_steps,  # set: it wins over epochs
            "learning_rate": self.learning_rate,
            "per_device_train_batch_size": self.batch_size,
            "use_cpu": not cuda,
            "bf16": cuda and torch.cuda.is_bf16_supported(),
            # TRL defaults `gradient_checkpointing=True`, a deprecated alias in transformers 5 that
            # warns when set: the new name turns it off quietly.
            "activation_checkpointing": False,
            "report_to": [],
            "save_strategy": "no",
            "logging_steps": 1,
            "disable_tqdm": True,
            **self._method_defaults(data),
        }

    def _peft(self) -> Any:
        if self.peft_config is not None or not self.lora:
            return self.peft_config
        from peft import LoraConfig

        return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")

    def _metrics(self, trainer: Any, result: Any, seconds: float) -> dict[str, float]:
        args, state = trainer.args, trainer.state
        history = state.log_history
        tokens = next((float(e["num_tokens"]) for e in reversed(history) if "num_tokens" in e), 0.0)
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        samples = state.global_step * batch
        if args.max_steps <= 0 and trainer.train_dataset is not None:
            samples = min(samples, math.ceil(len(trainer.train_dataset) * args.num_train_epochs))
        return {
            "train_loss": float(result.training_loss),
            "steps": float(state.global_step),
            "samples": float(samples),
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else 0.0,
        }


class SFTMethod(_TrlMethod):
    """Supervised fine-tuning on verified passes (`prepare(store, "sft")`), loss on the model's
    own turns only: assistant turns of conversations (`assistant_only_loss`, which needs a chat
    template TRL knows or one with `{% generation %}` markers), or the sampled tokens of
    pre-tokenised rows (`completion_mask`)."""

    name = "sft"
    accepts = ("sft", "distill")
    trl_classes = ("SFTConfig", "SFTTrainer")

    def _method_defaults(self, data: TrainingData) -> dict[str, Any]:
        if data.pretokenized:
            # `completion_mask` counts only under completion_only_loss=True (its None default
            # looks for prompt/completion columns), and assistant_only_loss refuses token rows.
            return {"max_length": self.max_length, "completion_only_loss": True, "assistant_only_loss": False}
        return {"max_length": self.max_length, "assistant_only_loss": True}

    def _trainer(self, base: str, args: Any, data: TrainingData, tokenizer: Any, callbacks: list[Any]) -> Any:
        from honed.learn.chat_templates import QWEN3_CHAT_TEMPLATE, training_template

        if not data.pretokenized and tokenizer.chat_template == QWEN3_CHAT_TEMPLATE:
            # Train on the text the model reads and writes at run time (see `training_template`).
            tokenizer.chat_template = training_template()
        return super()._trainer(base, args, data, tokenizer, callbacks)

    def _trainer_class(self) -> type:
        from honed.learn.shared_prefix import shared_prefix_trainer

        # An agent's conversations share their system prompt and tools: run that prefix once a batch.
        return shared_prefix_trainer()


class KTOMethod(_TrlMethod):
    """KTO on verified passes (desirable) and failures (undesirable): learns from failures too,
    without needing them paired. `batch_size` must be at least 2 (its KL estimate)."""

    name = "kto"
    accepts = ("kto",)
    default_learning_rate = 1e-5
    trl_classes = ("KTOConfig", "KTOTrainer")

    def _method_defaults(self, data: TrainingData) -> dict[str, Any]:
        """Weights that balance passes against failures, as TRL advises (desirable x passes over
        undesirable x failures within [1, 4/3]). A loop's attempts fail more often than they pass;
        unbalanced (and at 1e-4) the failures' push-down took the tool-use model to 0 held-out
        passes in one cycle (`benchmarks/learning.py`, arm d)."""
        labels = list(data.dataset["label"])
        passes, failures = sum(labels), len(labels) - sum(labels)
        weights: dict[str, float] = {}
        if passes and failures > passes:
            weights["undesirable_weight"] = passes / failures
        elif failures and passes > failures * 4 / 3:
            weights["desirable_weight"] = failures / passes
        return {"max_length": self.max_length, **weights}


class DPOMethod(_TrlMethod):
    """DPO on (pass, failure) pairs of the same task input. The completion is the whole attempt
    after the user's request, tool results included: TRL scores every completion token."""

    name = "dpo"
    accepts = ("dpo",)
    default_learning_rate = 1e-4
    trl_classes = ("DPOConfig", "DPOTrainer")


class GRPOMethod(_TrlMethod):
    """GRPO on training tasks (`prepare(store, "grpo")`): TRL samples `num_generations`
    completions per task (calling `tools`, plain callables, when given) and the `verifiers` score
    each one, 1 pass / 0 fail / None when they cannot tell. `tools` may be LangChain tools
    (see `trl_tool`). A group whose completions all score
    the same teaches nothing; when every group did, `train` raises `NothingToLearn`."""

    name = "grpo"
    accepts = ("grpo",)
    default_learning_rate = 1e-4

    def __init__(
        self,
        verifiers: Sequence[Any],
        *,
        tools: Sequence[Any] | None = None,
        num_generations: int = 4,
        max_completion_length: int = 256,
        temperature: float = 1.0,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not verifiers:
            raise ValueError("GRPO needs at least one verifier to score completions")
        super().__init__(batch_size=batch_size or 2 * num_generations, **kwargs)
        self.verifiers = list(verifiers)
        self.tools = [trl_tool(t) for t in tools or ()]
        self.num_generations = num_generations
        self.max_completion_length = max_completion_length
        self.temperature = temperature

    def _extra_config(self) -> dict[str, Any]:
        return {
            "verifiers": [verifier_name(v) for v in self.verifiers],
            "tools": [getattr(t, "__name__", type(t).__name__) for t in self.tools],
            "num_generations": self.num_generations,
            "max_completion_length": self.max_completion_length,
            "temperature": self.temperature,
        }

    def _method_defaults(self, data: TrainingData) -> dict[str, Any]:
        return {
            "num_generations": self.num_generations,
            "max_completion_length": self.max_completion_length,
            "temperature": self.temperature,
        }

    def _trl_config(self, fields: dict[str, Any]) -> Any:
        from trl import GRPOConfig

        return GRPOConfig(**fields)

    def _trainer(self, base: str, args: Any, data: TrainingData, tokenizer: Any, callbacks: list[Any]) -> Any:
        from trl import GRPOTrainer

        return GRPOTrainer(
            model=base,
            reward_funcs=[VerifierReward(self.verifiers)],
            args=args,
            train_dataset=data.dataset,
            processing_class=tokenizer,
            peft_config=self._peft(),
            callbacks=callbacks,
            tools=self.tools or None,
        )

    def _metrics(self, trainer: Any, result: Any, seconds: float) -> dict[str, float]:
        metrics = super()._metrics(trainer, result, seconds)
        logged = [e for e in trainer.state.log_history if e.get("frac_reward_zero_std") is not None]
        if logged:
            metrics["zero_variance_groups"] = sum(e["frac_reward_zero_std"] for e in logged) / len(logged)
            rewards = [e["reward"] for e in logged if e.get("reward") is not None]
            if rewards:
                metrics["reward"] = sum(rewards) / len(rewards)
        return metrics

    def _verify_learned(self, trainer: Any, metrics: dict[str, float]) -> None:
        logged = [e for e in trainer.state.log_history if "frac_reward_zero_std" in e]
        if logged and all(e.get("reward") is None for e in logged):
            raise NothingToLearn(
                "grpo: no verifier could tell on any completion (every reward None): check that the "
                "tasks' metadata carries what the verifiers read",
                metrics=metrics,
            )
        if metrics.get("zero_variance_groups") == 1.0:
            raise NothingToLearn(
                f"grpo: in every group of {self.num_generations} completions all got the same reward "
                f"(mean {metrics.get('reward', float('nan')):.2f}), so no advantage and no gradient: "
                "tasks are all solved or all out of reach; SFT on demonstrations or a teacher first",
                metrics=metrics,
            )


class DistillMethod(SFTMethod):
    """Distillation from a teacher configuration's verified trajectories.

    Without `teacher`: SFT on them (`prepare(store, "distill", agent=..., model_version=...)`
    selects the teacher's attempts). With `teacher`, a model folder sharing the student's
    vocabulary: TRL's on-policy `DistillationTrainer` on the same tasks' prompts, the student
    generating and the teacher's logits as the target."""

    name = "distill"
    accepts = ("distill", "sft")

    def __init__(
        self, *, teacher: str | Path | None = None, max_completion_length: int = 256, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.teacher = None if teacher is None else str(teacher)
        self.max_completion_length = max_completion_length

    def _extra_config(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "max_completion_length": self.max_completion_length}

    def _method_defaults(self, data: TrainingData) -> dict[str, Any]:
        if self.teacher is None:
            return super()._method_defaults(data)
        return {"max_completion_length": self.max_completion_length}

    def _trl_config(self, fields: dict[str, Any]) -> Any:
        if self.teacher is None:
            return super()._trl_config(fields)
        from trl import DistillationConfig

        return DistillationConfig(**fields)

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
    """The distinct task inputs (system and first user message) of conversational rows: what the
    on-policy student answers while the teacher scores it."""
    from datasets import Dataset

    if "messages" not in data.dataset.column_names:
        raise ValueError(
            "on-policy distillation needs conversations: prepare(..., pretokenized=False) "
            "(these rows are recorded token ids)"
        )
    seen: dict[str, list[dict[str, Any]]] = {}
    for messages in data.dataset["messages"]:
        cut = next((i + 1 for i, m in enumerate(messages) if m["role"] == "user"), 0)
        prompt = [{"role": m["role"], "content": m["content"] or ""} for m in messages[:cut]]
        if prompt:
            seen.setdefault(json.dumps(prompt, sort_keys=True), prompt)
    return Dataset.from_list([{"prompt": p} for p in seen.values()])


# -- GRPO's reward -----------------------------------------------------------------------------


class VerifierReward:
    """A TRL reward function that judges each completion with honed verifiers.

    Each completion becomes a minimal `Trajectory` (the task's id, split and metadata, one model
    step per assistant turn, a tool step per tool result, the final text as output), so the same
    verifiers that label production trajectories score the rollouts. The label is `honed.trajectory.label` of
    their verdicts: 1.0 pass, 0.0 fail, None (no signal) when none could tell or all raised."""

    __name__ = "verifiers"

    def __init__(self, verifiers: Iterable[Any]) -> None:
        self.verifiers = list(verifiers)

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        task_id: list[str | None] | None = None,
        metadata: list[str | None] | None = None,
        split: list[str | None] | None = None,
        **_: Any,
    ) -> list[float | None]:
        n = len(completions)
        task_ids, metas, splits = task_id or [None] * n, metadata or [None] * n, split or [None] * n
        return [
            self.score(completion_trajectory(p, c, task_id=t, metadata=m, split=s))
            for p, c, t, m, s in zip(prompts, completions, task_ids, metas, splits, strict=True)
        ]

    def score(self, trajectory: Trajectory) -> float | None:
        verdicts = []
        for verifier in self.verifiers:
            applies = getattr(verifier, "applies_to", None)
            try:
                if applies is not None and not applies(trajectory):
                    continue
                verdicts.append(verifier.verify(trajectory))
            except Exception:
                log.warning("verifier %s raised on a GRPO completion", verifier_name(verifier), exc_info=True)
        label = trajectory_label(verdicts)
        return None if label is None else float(label)


_JSON_TYPES: dict[str, type] = {
    "integer": int, "number": float, "string": str, "boolean": bool, "array": list, "object": dict,
}  # fmt: skip


def trl_tool(tool: Any) -> Callable[..., Any]:
    """A tool as TRL's trainers take it: a plain function with type hints and a Google-style
    docstring, from which transformers builds the schema the prompt shows. Functions pass
    through; a LangChain tool is wrapped (an argument without a description is described by its
    name, since transformers requires one; so the prompt's schema carries descriptions the
    agent's own schema may lack)."""
    if inspect.isfunction(tool) or inspect.ismethod(tool):
        return tool
    from langchain_core.tools import BaseTool
    from langchain_core.utils.function_calling import convert_to_openai_tool

    if not isinstance(tool, BaseTool):
        raise TypeError(f"GRPO tools are functions or LangChain tools, not {type(tool).__name__}")
    schema = convert_to_openai_tool(tool)["function"]
    parameters = schema.get("parameters") or {}
    properties: dict[str, Any] = parameters.get("properties") or {}
    required = set(parameters.get("required") or ())

    def call(**kwargs: Any) -> Any:
        result = tool.invoke(kwargs)
        return getattr(result, "content", result)

    hints = {name: _JSON_TYPES.get(p.get("type"), str) for name, p in properties.items()}
    call.__name__ = call.__qualname__ = schema["name"]
    call.__doc__ = "\n".join(
        [schema.get("description") or schema["name"], "", "Args:"]
        + [f"    {name}: {p.get('description') or name}" for name, p in properties.items()]
    )
    call.__annotations__ = dict(hints)
    call.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=inspect.Parameter.empty if name in required else None,
                annotation=hint,
            )
            for name, hint in hints.items()
        ]
    )
    return call


# -- saving ------------------------------------------------------------------------------------


def _save(trainer: Any, base: Path, out: Path) -> None:
    """A complete model folder: weights (LoRA merged in), and the base's tokenizer and generation
    config byte for byte (trainers patch their copies: chat templates, response schemas)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        if trainer.is_world_process_zero():
            model.merge_and_unload().save_pretrained(out)
    else:
        trainer.save_model(str(out))  # gathers DeepSpeed / FSDP shards on every process
    if not trainer.is_world_process_zero():
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "training_args.bin").unlink(missing_ok=True)
    if (base / "tokenizer_config.json").exists():
        for name in _COPIED_FILES:
            (out / name).unlink(missing_ok=True)
            if (base / name).exists():
                shutil.copy2(base / name, out / name)
    else:  # a hub id: its tokenizer as loaded
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(base)).save_pretrained(out)


_COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
    "generation_config.json", TINY_MANIFEST,
)  # fmt: skip


def _merged(defaults: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """The user's `args` over honed's defaults, dropping a default the user's choice conflicts
    with: the deprecated `gradient_checkpointing` counts only when the new name is unset, and
    fp16 excludes bf16."""
    fields = dict(defaults)
    if "gradient_checkpointing" in args and "activation_checkpointing" not in args:
        fields.pop("activation_checkpointing", None)
    if args.get("fp16") and "bf16" not in args:
        fields["bf16"] = False
    return fields | args


def _jsonable(value: Any) -> Any:
    return json.loads(
        json.dumps(value, default=lambda v: sorted(v) if isinstance(v, set | frozenset) else str(v))
    )
