"""`base_model`: a tiny model warm-started on a suite's demonstrations, built offline and cached.

    >>> suite = load_suite("tool_use")
    >>> path = base_model(suite, seed=0)      # ~2-4 minutes on 2 cores the first time, then cached
    >>> LocalChatModel(path, temperature=1.0, max_tokens=suite.max_tokens)

The loop needs a base that is neither hopeless nor done: a sampled pass@1 that leaves room to
learn. What makes a randomly initialised 1.8M-parameter model slow to warm-start is copying: it
learns the format in a few dozen steps, then sits at ~85% token accuracy for hundreds of steps
until attention learns to find and copy numbers and names from the request. So the recipe has
two phases, each run by TRL's `SFTTrainer`:

1. **copy drills**: short synthetic conversations where the assistant repeats the user's words
   and numbers (drawn from the suite's own requests), until held-out drills are copied with 90%
   token accuracy. Cheap steps (no system prompt, no tools) buy the copying circuits.
2. **demonstrations**: the suite's demonstrations, in exactly the agent's run-time format, until
   a cheap estimate of the sampled pass@1 on a dev slice of *train* tasks reaches
   `Recipe.target`; a decaying schedule would fight that early stop, so the rate is constant.

The estimate is exact for the demonstrated route: with teacher forcing, the probability that a
T=1 sample reproduces a correct solution is the product of the probabilities of its assistant
tokens, and greedy decoding follows it when every one is the argmax. One forward pass over the
dev slice gives both, so the check runs every few steps.

Two things make each step cheap and the training faithful. Every agent conversation opens with
the same system prompt and tool schemas (most of its tokens, none trained): `shared_prefix_loss`
runs that prefix once per batch, not once per row (exact, ~3x faster on tool_use). And the
conversations are rendered with the run-time chat template plus `{% generation %}` markers
(`honed.learn.chat_templates.training_template`), not TRL's Qwen3 training variant: that one
adds an empty think block to every assistant turn, which the run-time template leaves out of
the history, so the model would be trained on contexts it never sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from honed.learn.chat_templates import QWEN3_CHAT_TEMPLATE, training_template
from honed.learn.shared_prefix import shared_prefix_length, shared_prefix_logits, shared_prefix_trainer

log = logging.getLogger("honed.demo")

RECIPE_VERSION = 2
REPORT = "honed_warmstart.json"


@dataclass(frozen=True)
class Recipe:
    """How a base model is warm-started; every field is part of the cache key.

    Copy drills (phase 1): at most `drill_steps` steps of `drill_batch_size` at `drill_lr`,
        stopping once held-out drills reach `drill_target` token accuracy.
    Demonstrations (phase 2): `demonstrations` examples, at most `max_steps` steps of
        `batch_size` at `lr`, stopping once the dev estimate of the sampled pass@1 reaches
        `target` (checked every `eval_every` steps on `dev_size` train tasks). The cap is far
        above what the bundled suites need (they stop within a few hundred steps) because a skill can
        arrive late and all at once: the calendar suite of the tests copies the person's name
        from the request into a booking made after a tool result, and that copy appeared only
        at step ~1,200 (dev estimate 0.16 -> 0.35 in 30 steps). Stopped at 900, its base booked
        the wrong person in 82% of held-out attempts, passing only by chance, and cycles at 1e-4
        and 5e-4 learned nothing from those chance passes: the loop sharpens what a base can
        sometimes do, it does not grow a missing circuit from ~50 rows a cycle.
    Both: AdamW with `adam_beta2` 0.95 (a sharper copy transition than 0.999), warmup over
        `warmup_steps`, then constant. Rates above ~1e-3 (at batch 16) never learn to copy.
    `max_seconds` optionally caps the whole warm start (the last dev checkpoint is kept); off by
        default, because a cap makes the cached model depend on how busy the machine was;
    `vocab_size` is the BPE size (a suite's text saturates it well below 1024).
    """

    drill_steps: int = 600
    drill_batch_size: int = 8
    drill_lr: float = 1e-3
    drill_target: float = 0.9
    demonstrations: int = 3000
    max_steps: int = 4000
    batch_size: int = 16
    lr: float = 5e-4
    adam_beta2: float = 0.95
    warmup_steps: int = 20
    target: float = 0.3
    eval_every: int = 15
    dev_size: int = 48
    max_seconds: float | None = None
    vocab_size: int = 512

    def key(self) -> str:
        data = json.dumps({"version": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:10]


RECIPE = Recipe()


@dataclass
class Progress:
    """One report from a warm start: `stage` is "tokenizer", "drills", "demonstrations" or "done";
    `score` is the drill token accuracy or the dev estimate of the sampled pass@1."""

    stage: str
    step: int = 0
    max_steps: int = 0
    score: float | None = None
    greedy: float | None = None
    elapsed_s: float = 0.0

    def __str__(self) -> str:
        score = "" if self.score is None else f" score {self.score:.3f}"
        greedy = "" if self.greedy is None else f" (greedy {self.greedy:.2f})"
        return f"warm start: {self.stage} {self.step}/{self.max_steps}{score}{greedy} {self.elapsed_s:.0f}s"


def base_model(
    suite: Any,
    *,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    recipe: Recipe | None = None,
) -> Path:
    """The warm-started base model for `suite` (a `Suite` or a name), built once and cached.

    The folder is `<cache>/<suite>-<seed>-<hash>`, where the cache is `cache_dir`, else
    `$HONED_CACHE`, else `~/.cache/honed/base`, and the hash covers the recipe and the
    suite's prompt, tools and demonstrations. A build goes to a temporary folder renamed into
    place at the end, so an interrupted build is never picked up. The folder's
    `honed_warmstart.json` says how the build went (seconds, steps, dev figures).
    """
    from honed.demo.suite import load_suite

    suite = load_suite(suite)
    recipe = recipe or RECIPE
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    key = hashlib.sha256(f"{recipe.key()}/{suite_fingerprint(suite)}".encode()).hexdigest()[:12]
    target = root / f"{suite.name}-{seed}-{key}"
    if (target / REPORT).exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
    try:
        warm_start(suite, building, seed=seed, recipe=recipe, on_progress=on_progress)
        try:
            building.rename(target)
        except OSError:
            if not (target / REPORT).exists():  # unless a concurrent build finished first
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def default_cache_dir() -> Path:
    """`$HONED_CACHE` when set, else `~/.cache/honed/base`."""
    env = os.environ.get("HONED_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "honed" / "base"


def suite_fingerprint(suite: Any) -> str:
    """What a model trained for `suite` depends on: its prompt, tools and demonstrations."""
    if hasattr(suite, "fingerprint"):
        return str(suite.fingerprint())
    from honed.demo.generated import tools_json

    parts = [suite.name, suite.system_prompt, tools_json(suite.tools), json.dumps(suite.demonstrations(8))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def warm_start(
    suite: Any,
    out: str | Path,
    *,
    seed: int = 0,
    recipe: Recipe | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> dict[str, Any]:
    """Build the tiny model at `out` and train it (drills, then demonstrations; see the module
    docstring); writes and returns the report."""
    recipe = recipe or RECIPE
    with _quiet():
        return _warm_start(suite, Path(out), seed, recipe, _Clock(on_progress, recipe.max_seconds))


def _warm_start(suite: Any, out: Path, seed: int, recipe: Recipe, clock: _Clock) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from honed.demo.tiny import build_tiny

    clock.report(Progress("tokenizer"))
    build_tiny(out, seed=seed, vocab_corpus=suite.vocab_corpus(), vocab_size=recipe.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = SFT_CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)

    drills = copy_drills(suite, recipe.drill_steps * recipe.drill_batch_size, seed=seed)
    drill_dev = DevSet(tokenizer, copy_drills(suite, recipe.dev_size, seed=seed + 7919))
    drilled = _train(
        model, tokenizer, drills, drill_dev, "drills", clock, seed=seed,
        steps=recipe.drill_steps, batch_size=recipe.drill_batch_size, lr=recipe.drill_lr, recipe=recipe,
        done=lambda dev: dev.token_accuracy >= recipe.drill_target,
    )  # fmt: skip
    demos = suite.demonstrations(recipe.demonstrations, seed=seed)
    dev = DevSet(tokenizer, dev_examples(suite, recipe.dev_size, seed=seed))
    trained = _train(
        model, tokenizer, demos, dev, "demonstrations", clock, seed=seed,
        steps=recipe.max_steps, batch_size=recipe.batch_size, lr=recipe.lr, recipe=recipe,
        done=lambda dev: dev.sampled >= recipe.target,
    )  # fmt: skip
    best = _nearest(trained.checkpoints, recipe.target)
    model.load_state_dict(best.state)
    model.eval()
    model.save_pretrained(out)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE  # the run-time template, which TRL recognises
    tokenizer.save_pretrained(out)
    summary = {
        "suite": suite.name,
        "seed": seed,
        "recipe": asdict(recipe),
        "recipe_key": recipe.key(),
        "seconds": round(clock.elapsed(), 1),
        "drill_steps": drilled.checkpoints[-1].step if drilled.checkpoints else 0,
        "drill_accuracy": round(drilled.checkpoints[-1].token_accuracy, 4) if drilled.checkpoints else None,
        "step": best.step,
        "epochs": round(best.step * recipe.batch_size / len(demos), 2),
        "dev_sampled": round(best.sampled, 4),
        "dev_greedy": round(best.greedy, 4),
        "history": {"drills": drilled.history, "demonstrations": trained.history},
    }
    (out / REPORT).write_text(json.dumps(summary, indent=1))
    clock.report(Progress("done", best.step, recipe.max_steps, best.sampled, best.greedy))
    return summary


def dev_examples(suite: Any, n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Solved examples for the first `n` *train* tasks (never held-out ones); a suite that cannot
    solve its own tasks (no `solution_for`) gives demonstrations of another seed instead."""
    if hasattr(suite, "solution_for"):
        return [suite.solution_for(task) for task in list(suite.train)[:n]]
    return suite.demonstrations(n, seed=10_000 + seed)


def copy_drills(suite: Any, n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """`n` conversations where the assistant repeats the user's message: 3-6 words from the
    suite's requests and numbers of 1-4 digits, so copying is all there is to learn."""
    requests = [
        m["content"]
        for d in suite.demonstrations(64, seed=seed)
        for m in d["messages"]
        if m["role"] == "user"
    ]
    words = sorted({word for text in requests for word in text.split()}) or ["word"]
    rng = random.Random(f"honed.demo/drills/{seed}")
    drills = []
    for _ in range(n):
        items = [
            str(rng.randint(0, 10 ** rng.randint(1, 4))) if rng.random() < 0.4 else rng.choice(words)
            for _ in range(rng.randint(3, 6))
        ]
        text = " ".join(items)
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": text}]
        drills.append({"messages": messages, "tools": "[]"})
    return drills


# -- training ------------------------------------------------------------------------------------


@dataclass
class _Checkpoint:
    step: int
    sampled: float
    greedy: float
    token_accuracy: float
    state: dict[str, Any]


@dataclass
class _Phase:
    history: list[tuple[int, float, float, float, float]]
    checkpoints: list[_Checkpoint]


def _train(
    model: Any,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    dev: DevSet,
    stage: str,
    clock: _Clock,
    *,
    seed: int,
    steps: int,
    batch_size: int,
    lr: float,
    recipe: Recipe,
    done: Callable[[DevSet], bool],
) -> _Phase:
    """One SFT phase, checked on `dev` every `eval_every` steps until `done` or out of time."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig

    phase = _Phase([], [])

    class Check(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **_: Any) -> Any:
            step = state.global_step
            if step % recipe.eval_every and step < steps and not clock.out_of_time():
                return control
            dev.measure(model)
            phase.history.append(
                (step, round(dev.sampled, 4), round(dev.greedy, 4), round(dev.token_accuracy, 4), round(clock.elapsed(), 1))
            )  # fmt: skip
            score = dev.token_accuracy if stage == "drills" else dev.sampled
            clock.report(Progress(stage, step, steps, score, dev.greedy))
            state_copy = {k: v.detach().clone() for k, v in model.state_dict().items()}
            checkpoint = _Checkpoint(step, dev.sampled, dev.greedy, dev.token_accuracy, state_copy)
            phase.checkpoints = [*phase.checkpoints[-1:], checkpoint]
            if done(dev) or clock.out_of_time():
                control.should_training_stop = True
            return control

    if clock.out_of_time():
        return phase
    rows = [{"messages": e["messages"], "tools": _json_text(e.get("tools"))} for e in examples]
    with tempfile.TemporaryDirectory(prefix="honed-warmstart-") as scratch:
        config = SFTConfig(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            adam_beta2=recipe.adam_beta2,
            weight_decay=0.0,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=recipe.warmup_steps,
            assistant_only_loss=True,
            max_length=None,
            seed=seed,
            data_seed=seed,
            use_cpu=True,
            bf16=False,
            activation_checkpointing=False,  # the old name, gradient_checkpointing, warns in transformers 5
            save_strategy="no",
            report_to=[],
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = shared_prefix_trainer()(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[Check()],
        )
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict to stdout
        trainer.train()
    return phase


def _nearest(checkpoints: Sequence[_Checkpoint], target: float) -> _Checkpoint:
    """The last checkpoint, or the one before when it is nearer the target (the dev estimate
    rises steeply once copying works, so the last check may overshoot)."""
    if not checkpoints:
        raise RuntimeError("the warm start ran out of time before its first dev check: raise max_seconds")
    last = checkpoints[-1]
    if last.sampled < target:
        return last
    return min(checkpoints, key=lambda c: abs(math.log(max(c.sampled, 1e-6) / target)))


class DevSet:
    """Teacher-forced dev examples. `measure(model)` sets `logprobs` (of each example's assistant
    tokens), `sampled` (mean probability that a T=1 sample reproduces an example), `greedy`
    (fraction greedy decoding reproduces) and `token_accuracy` (over assistant tokens)."""

    def __init__(self, tokenizer: Any, examples: Sequence[dict[str, Any]]) -> None:
        import torch

        rows = []
        for example in examples:
            tools = example.get("tools")
            encoded = tokenizer.apply_chat_template(
                example["messages"],
                tools=(json.loads(tools) if isinstance(tools, str) else tools) or None,
                return_assistant_tokens_mask=True,
                return_dict=True,
                tokenize=True,
            )
            rows.append((encoded["input_ids"], encoded["assistant_masks"]))
        width = max((len(ids) for ids, _ in rows), default=1)
        self.ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        self.mask = torch.zeros((len(rows), width), dtype=torch.bool)
        self.attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, mask) in enumerate(rows):
            self.ids[i, : len(ids)] = torch.tensor(ids)
            self.mask[i, : len(ids)] = torch.tensor(mask, dtype=torch.bool)
            self.attention[i, : len(ids)] = 1
        self.sampled = self.greedy = self.token_accuracy = 0.0
        self.logprobs: list[float] = []

    def measure(self, model: Any) -> DevSet:
        import torch

        was_training = model.training
        model.eval()
        start = shared_prefix_length(self.ids, self.mask)
        with torch.no_grad():
            logits = shared_prefix_logits(model, self.ids, self.attention, start)
        model.train(was_training)
        targets, scored = self.ids[:, start + 1 :], self.mask[:, start + 1 :]
        logits = logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        hits = (logits.argmax(-1) == targets) & scored
        n = max(1, len(self.ids))
        totals = (logprobs * scored).sum(-1)
        self.logprobs = [float(t) for t in totals]
        self.sampled = float(totals.exp().sum()) / n
        self.greedy = float((hits | ~scored).all(-1).sum()) / n
        self.token_accuracy = float(hits.sum()) / max(1, int(scored.sum()))
        return self


# -- the training template -----------------------------------------------------------------------

# The run-time template with `{% generation %}` markers (see `honed.learn.chat_templates`).
SFT_CHAT_TEMPLATE = training_template()


# -- helpers -------------------------------------------------------------------------------------


class _Clock:
    """Elapsed time against the recipe's cap, and progress reports."""

    def __init__(self, on_progress: Callable[[Progress], None] | None, max_seconds: float | None) -> None:
        self.on_progress, self.max_seconds = on_progress, max_seconds
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def out_of_time(self) -> bool:
        return self.max_seconds is not None and self.elapsed() > self.max_seconds

    def report(self, progress: Progress) -> None:
        progress.elapsed_s = self.elapsed()
        log.info("%s", progress)
        if self.on_progress is not None:
            self.on_progress(progress)


def _json_text(tools: Any) -> str:
    """Tools as a JSON string: `Dataset.from_list` would merge differing schemas across rows."""
    return tools if isinstance(tools, str) else json.dumps(tools or [])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """TRL and datasets log every tokenisation pass; a warm start reports through `on_progress`."""
    import datasets
    import transformers

    datasets_level = datasets.logging.get_verbosity()
    transformers_level = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    dataset_bars = datasets.utils.is_progress_bar_enabled()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(datasets_level)
        transformers.logging.set_verbosity(transformers_level)
        if dataset_bars:  # as it was: `honed demo` turned them off for good
            datasets.enable_progress_bars()
        if bars:
            transformers.utils.logging.enable_progress_bar()
