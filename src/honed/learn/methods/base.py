"""What every method shares: the one way a TRL config is built, training, saving, metrics.

A method's TRL config is its TRL config class filled in four layers, each over the one before:

1. TRL's own defaults (the class's documented field defaults);
2. honed's logistics, which never change what is learned: `report_to="none"`,
   `save_strategy="no"` (the scratch folder is deleted; `train` saves the model itself),
   `disable_tqdm=True` and `logging_steps=1` (honed reads TRL's log for its metrics);
   `activation_checkpointing` at TRL's `gradient_checkpointing` default under transformers 5's name
   (the old one warns); and `bf16=False` only where TRL's default `bf16=True` would fail
   (transformers refuses bf16 without a GPU that has it, unless `use_cpu=True`);
3. what honed's data needs (`_needs`: SFT's loss masks, KTO's pass/fail weights);
4. the user's: the fields of `config=` that differ from TRL's defaults, then keyword fields.

Last, `output_dir` is always honed's scratch folder, and `seed` is the one `train` gets unless
the user chose one (a `config=` whose seed is TRL's default 42 chose none).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from honed.learn.datasets import TrainingData

log = logging.getLogger("honed")

# Recorded by `config()` at their effective values, when the method's config class has them.
RECORDED = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim",
    "bf16", "activation_checkpointing", "max_length", "beta", "loss_type", "num_generations",
    "max_completion_length", "temperature",
)  # fmt: skip

# `__post_init__` fills these in from other fields: a config's value says nothing of the user's choice.
_DERIVED = frozenset(
    {"output_dir", "disable_tqdm", "pad_to_multiple_of", "generation_batch_size", "gradient_checkpointing"}
)


class NothingToLearn(RuntimeError):
    """Training cannot change the model for the better: no rows, or (GRPO) no group of attempts
    whose rewards differ. Not a failure of the run; `metrics` holds what was measured, if anything."""

    def __init__(self, reason: str, *, metrics: dict[str, float] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.metrics = dict(metrics or {})


@dataclasses.dataclass
class TrainResult:
    """The trained model folder and what training measured: `train_loss`, `steps`, `samples`,
    `tokens`, `seconds`, `tokens_per_s` (GRPO adds `reward`, `zero_variance_groups`)."""

    path: Path
    metrics: dict[str, float]


class TrlMethod:
    """A TRL trainer and its config: `config=` an instance of the method's TRL config class
    and/or its fields as keywords; `lora=True` (a default LoRA) or `peft_config=`."""

    name: ClassVar[str] = ""
    accepts: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[str] = ""  # what its rows need, said when there are none
    # TRL's config and trainer class names.
    trl_classes: ClassVar[tuple[str, str]] = ("", "")

    def __init__(
        self, *, config: Any = None, lora: bool = False, peft_config: Any = None, **fields: Any
    ) -> None:
        cls = self.config_class()
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"{type(self).__name__} takes a trl.{cls.__name__}, not {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(f"{type(self).__name__}: {', '.join(unknown)} not fields of trl.{cls.__name__}")
        self.chosen: dict[str, Any] = {**_chosen(config), **fields}
        self.chosen.pop("output_dir", None)  # honed's scratch folder; the model goes to train(out=)
        self.lora = lora or peft_config is not None
        self.peft_config = peft_config

    def config(self) -> dict[str, Any]:
        """The settings to record with a training run (JSON-able): the effective values of the
        usual knobs and of every field honed or the user set (`settings`), what the user chose
        (`chosen`), LoRA. The data-dependent fields (`_needs`) are left out: they follow the rows."""
        cls = self.config_class()
        names = {f.name for f in dataclasses.fields(cls)}
        settings = {n: _declared(cls, n) for n in RECORDED if n in names} | self._logistics() | self.chosen
        if settings.get("bf16") is None:  # as `__post_init__` resolves them
            settings["bf16"] = not settings.get("fp16", False)
        if settings.get("activation_checkpointing") is None:
            settings["activation_checkpointing"] = bool(settings.get("gradient_checkpointing"))
        peft = self._peft()
        from honed.redaction.redact import Redactor

        # Recorded in the store: a `hub_token` (any setting named like a secret) goes as it would
        # in a captured step.
        return Redactor().redact(
            _jsonable(
                {
                    "method": self.name,
                    "trl_config": cls.__name__,
                    "settings": dict(sorted(settings.items())),
                    "chosen": self.chosen,
                    "lora": self.lora,
                    "peft": peft.to_dict() if peft is not None else None,
                    **self._extra_config(),
                }
            )
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
            if data.counts.get("too_long"):
                metrics["rows_too_long"] = float(data.counts["too_long"])  # dropped by the trainer
            self._verify_learned(trainer, metrics)
            _save(trainer, Path(base), out)
        log.info("%s: trained %s in %.1fs → %s", self.name, base, seconds, out)
        return TrainResult(path=out, metrics=metrics)

    def after_rejections(self, rejections: int) -> tuple[TrlMethod, list[str]]:
        """This method as the next cycle runs it after `rejections` setbacks (candidates that
        measured worse) among the rejections in a row from the same live version, and what
        changed: its learning rate halved for each (a step that overshot, or learned the training
        tasks at the held-out tasks' expense, is tried smaller). A copy; this one is unchanged."""
        if rejections <= 0:
            return self, []
        lr = self.chosen.get("learning_rate", _declared(self.config_class(), "learning_rate"))
        if not isinstance(lr, int | float) or lr <= 0:
            return self, []
        lower = lr * 0.5**rejections
        adapted = copy.copy(self)
        adapted.chosen = {**self.chosen, "learning_rate": lower}
        return adapted, [f"learning_rate {lr:g} -> {lower:g}"]

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
        args = self.training_args(output_dir, data, seed=seed)
        if "max_length" not in self.chosen and getattr(args, "max_length", None) is not None:
            # TRL's default (1024) cut an agent's conversation, its tool schemas alone often longer,
            # before the reply it was to learn, and dropped the row: the model's own window instead.
            args.max_length = _context_window(base) or args.max_length
        trainer = self._trainer(str(base), args, data, tokenizer, list(callbacks))
        self._check_kept(trainer, data, args)
        # transformers prints every log dict to stdout when tqdm is off: honed's callers own stdout
        # (`honed demo --json`); the metrics reach them through TrainResult and the logger instead.
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        return trainer

    def training_args(self, output_dir: str | Path, data: TrainingData, *, seed: int = 0) -> Any:
        """The TRL config a trainer gets (see the module docstring for the layers)."""
        fields = {"seed": seed, **self._logistics(), **self._needs(data), **self.chosen}
        return self.config_class()(**fields, output_dir=str(output_dir))

    def config_class(self) -> type:
        import trl

        return getattr(trl, self.trl_classes[0])

    # -- per method --------------------------------------------------------------------------

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

    def _needs(self, data: TrainingData) -> dict[str, Any]:
        """Fields honed's rows require of this method (the user's choice still wins)."""
        return {}

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
            needs = f"; it needs {self.needs}" if self.needs else ""
            raise NothingToLearn(
                f"{self.name}: the dataset has no rows ({counts or 'nothing selected'}){needs}"
            )

    def _check_kept(self, trainer: Any, data: TrainingData, args: Any) -> None:
        """Raise `NothingToLearn` when the trainer dropped every row (TRL drops a row its
        `max_length` cut before any trained token); log the ones it dropped otherwise."""
        kept = getattr(trainer, "train_dataset", None)
        if kept is None or not hasattr(kept, "__len__") or getattr(args, "packing", False):
            return
        dropped = len(data.dataset) - len(kept)
        if dropped <= 0:
            return
        limit = getattr(args, "max_length", None)
        if len(kept) == 0:
            raise NothingToLearn(
                f"{self.name}: every one of the {dropped} rows is longer than max_length={limit} tokens "
                "before its first trained token: raise max_length (the model's context window) or shorten "
                "the conversations (system prompt, tool schemas)"
            )
        log.warning(
            "%s: %d of %d rows dropped: longer than max_length=%s before their first trained token",
            self.name, dropped, len(data.dataset), limit,
        )  # fmt: skip
        data.counts["too_long"] = dropped

    def _logistics(self) -> dict[str, Any]:
        chosen = self.chosen
        fields: dict[str, Any] = {
            "report_to": "none",
            "save_strategy": "no",
            "disable_tqdm": True,
            "logging_steps": 1,
        }
        if "activation_checkpointing" not in chosen and "gradient_checkpointing" not in chosen:
            fields["activation_checkpointing"] = _declared(self.config_class(), "gradient_checkpointing")
        if not ({"bf16", "fp16", "use_cpu"} & chosen.keys()) and not _bf16_available():
            fields["bf16"] = False
        return fields

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


# -- the user's config -------------------------------------------------------------------------


def _chosen(config: Any) -> dict[str, Any]:
    """The fields of a TRL config instance that differ from its class's defaults: what its
    author chose. Fields `__post_init__` derives count only where they differ from what it
    derives from the defaults."""
    if config is None:
        return {}
    chosen = {}
    for f in dataclasses.fields(config):
        if not f.init or f.name in _DERIVED:
            continue
        value = getattr(config, f.name)
        if not _is_default(config, f.name, value):
            chosen[f.name] = value
    return chosen


def _is_default(config: Any, name: str, value: Any) -> bool:
    cls = type(config)
    if name == "bf16":
        return value == (not config.fp16)
    if name == "activation_checkpointing":
        return value == _declared(cls, "gradient_checkpointing")
    if name == "report_to":
        return value in ("none", [], ["none"])
    if name == "debug":
        return not value
    if name == "steps_per_generation":  # GRPO derives it from gradient accumulation
        return value == config.gradient_accumulation_steps
    if name == "accelerator_config":
        from transformers.trainer_pt_utils import AcceleratorConfig

        return value is None or value == AcceleratorConfig()
    try:
        return bool(value == _declared(cls, name))
    except Exception:  # a value that does not compare (a tensor, say) was set by hand
        return False


def _declared(cls: type, name: str) -> Any:
    """A config class's documented default for a field (before `__post_init__`)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _bf16_available() -> bool:
    """transformers' own test for refusing `bf16=True` without `use_cpu`."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return is_torch_bf16_gpu_available() or is_torch_xla_available()


# -- saving ------------------------------------------------------------------------------------

# The trained model's own files: its weights (any format, shards and their index) and config.json.
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".index.json")


def _context_window(base: str | Path) -> int | None:
    """The model's context window (`max_position_embeddings`), or None when its config does not say."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(base))
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        window = getattr(text, "max_position_embeddings", None)
    except Exception:  # no readable config (a hub id offline): TRL's default stands
        return None
    return int(window) if isinstance(window, int) and window > 0 else None


def _is_model_file(name: str) -> bool:
    return name == "config.json" or name.endswith(_WEIGHTS)


def _save(trainer: Any, base: Path, out: Path) -> None:
    """A complete model folder: the trained weights (LoRA merged in) and config.json, and every
    other file of the base folder byte for byte (tokenizer, chat template, generation config, a
    manifest, anything else): trainers patch their copies (chat templates, response schemas),
    so what they wrote besides the model is replaced."""
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
    if not base.is_dir():  # a hub id: its tokenizer as loaded
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(base)).save_pretrained(out)
        return
    for path in out.iterdir():
        if path.is_file() and not _is_model_file(path.name):
            path.unlink()
    for path in base.iterdir():
        if path.is_file() and not _is_model_file(path.name):
            shutil.copy2(path, out / path.name)


def _jsonable(value: Any) -> Any:
    return json.loads(
        json.dumps(value, default=lambda v: sorted(v) if isinstance(v, set | frozenset) else str(v))
    )
