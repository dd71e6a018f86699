"""The whole loop on one suite, in one process: serve -> attempt -> verify -> train -> gate -> promote.

This is what `honed demo` shows and what `benchmarks/learning.py` measures. Nothing here knows
which suite it runs: everything suite-specific comes through `honed.demo.Suite`.

- A warm-started base model (`honed.demo.base_model`) is registered and promoted as v1.
- A real `create_agent` agent with `honed.Middleware` and `honed.ServedModel` attempts training
  tasks concurrently (the local model batches their calls); a background verifier `Worker` labels
  what was captured.
- A `Cycle` trains a candidate from the live version's verified passes (rejection-sampling SFT by
  default, with the suite's demonstrations mixed in), gates it on held-out tasks and promotes it;
  the same agent object then continues on the new version (the served model follows the store).
- Attempts are spread by curriculum: tasks the agent sometimes passes get more of them.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from honed.demo.suite import Suite, gate_verifiers
from honed.learn.cycle import CycleResult
from honed.learn.evaluate import attempt, suite_agent, verify_round
from honed.trajectory import Task, Trajectory, label

Progress = Callable[[str, int, int], None]


def default_method() -> Any:
    """Rejection-sampling SFT on the live version's verified passes, 4 epochs at a constant 1e-4.

    The warm-started base is a checkpoint picked mid-training, where its pass rate still swings:
    at 5e-4 (API-NOTES' feasibility run) a cycle's candidate lost 8-10 held-out points. Over 3
    cycles (80 train tasks x 4 attempts, 50 held-out, seed 0) 2 epochs at 1e-4 gained 12.8
    points, 3 at 2e-4 13.5, 4 at 1e-4 14.3 (benchmarks/README.md)."""
    return demo_method("sft")


# The demo's recipes, tuned on the 1.8M-parameter tiny model on a CPU; TRL's defaults (what
# `honed train` uses) are made for pretrained models and would barely move it.
RECIPES: dict[str, dict[str, Any]] = {
    "sft": {"num_train_epochs": 4, "learning_rate": 1e-4, "lr_scheduler_type": "constant"},
    "distill": {"num_train_epochs": 2, "learning_rate": 5e-4},  # SFT on a teacher's verified runs
    "kto": {"num_train_epochs": 2, "learning_rate": 1e-5},
    "dpo": {"num_train_epochs": 2, "learning_rate": 1e-4},
    # Tapered off-policy policy gradient on the captured attempts: passes as SFT, failures down.
    "offpolicy": {"num_train_epochs": 4, "learning_rate": 1e-4, "lr_scheduler_type": "constant"},
    "grpo": {
        "num_train_epochs": 2,
        "learning_rate": 1e-4,
        "per_device_train_batch_size": 8,  # two groups of 4 a step
        "num_generations": 4,
        "max_completion_length": 256,
    },
}


def demo_method(name: str, suite: Suite | None = None, **fields: Any) -> Any:
    """The demo's method `name` (sft, kto, dpo, grpo, distill, offpolicy) with its tuned recipe, `fields`
    (TRL config fields) over it. GRPO takes the suite's verifiers and tools."""
    from honed.learn import methods

    if name not in RECIPES:
        raise ValueError(f"unknown method {name!r}: {', '.join(RECIPES)}")
    settings = {"per_device_train_batch_size": 16, **cpu_settings(), **RECIPES[name], **fields}
    if name == "grpo":
        if suite is None:
            raise ValueError("grpo needs a suite (its verifiers are the reward)")
        return methods.GRPOMethod(suite.verifiers(), tools=list(suite.tools), **settings)
    classes = {
        "sft": methods.SFTMethod,
        "distill": methods.DistillMethod,
        "kto": methods.KTOMethod,
        "dpo": methods.DPOMethod,
        "offpolicy": methods.OffPolicyMethod,
    }
    return classes[name](**settings)


def cpu_settings() -> dict[str, Any]:
    """Where the demo trains: the GPU if there is one (bf16 if it has it), else the CPU, without
    activation checkpointing (a tiny model's activations are cheap; recomputing them is not)."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "use_cpu": not cuda,
        "bf16": cuda and torch.cuda.is_bf16_supported(),
        "activation_checkpointing": False,
    }


class LearningLoop:
    """K cycles of the loop on `suite` against `store`; iterate it for one `CycleResult` per cycle
    (cycle 0 is the base model before any training).

    Args:
        attempts: samples per training task per cycle (spread by curriculum after cycle 1).
        train_tasks / heldout_tasks: how many of the suite's tasks to use (None: all).
        samples: held-out samples per task (pass@1 is their mean at temperature 1; pass@8 the ceiling).
        external_ratio: share of the suite's demonstrations in each training set (the external data);
            with `data={"external_for": "stuck"}`, the suite's solutions of the train tasks that
            never pass instead (`solution_for(task)`), each once.
        training_verifiers: label the training attempts (default: the suite's); the gate and the
            held-out figures always use the suite's own verifiers.
        data: `DataConfig` fields over the loop's (`verified=False` trains on everything).
        greedy: also measure held-out greedy pass@1 each cycle.
        start: the weights each candidate trains from ("live" or "base": `Cycle`'s `start`).
    """

    def __init__(
        self,
        suite: Suite,
        store: Any,
        *,
        cycles: int = 3,
        seed: int = 0,
        method: Any = None,
        attempts: int = 4,
        train_tasks: int | None = None,
        heldout_tasks: int | None = None,
        samples: int = 8,
        concurrency: int = 64,
        external_ratio: float = 0.25,
        training_verifiers: Sequence[Any] | None = None,
        data: dict[str, Any] | None = None,
        greedy: bool = False,
        start: str = "live",
        workdir: str | Path = ".honed",
        name: str | None = None,
        base: str | Path | None = None,
        on_progress: Progress | None = None,
    ) -> None:
        self.suite, self.store = suite, store
        self.cycles, self.seed = cycles, seed
        self.method = method or default_method()
        self.attempts, self.samples, self.concurrency = attempts, samples, concurrency
        self.train = list(suite.train)[:train_tasks] if train_tasks else list(suite.train)
        self.heldout = list(suite.heldout)[:heldout_tasks] if heldout_tasks else list(suite.heldout)
        self.external_ratio = external_ratio
        self.training_verifiers = list(training_verifiers) if training_verifiers else suite.verifiers()
        self.data = dict(data or {})
        self.greedy, self.start_from = greedy, start
        self.workdir = Path(workdir)
        self.name = name or f"{suite.name}-agent"
        self.base = base
        self.on_progress = on_progress
        self._rng = random.Random(seed)
        self._rates: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._worker_thread: threading.Thread | None = None
        self._served: Any = None

    # -- running ---------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[CycleResult]:
        self.start()
        try:
            yield self.baseline()
            for k in range(1, self.cycles + 1):
                yield self.step(k)
        finally:
            self.close()

    def start(self) -> None:
        """Build (or reuse) the base model, make it live, start serving and verifying."""
        from honed.demo.warmstart import base_model
        from honed.learn.cycle import Cycle, DataConfig, GateConfig, local_chat_model
        from honed.learn.datasets import EXTERNAL_METHODS
        from honed.serving.served import ServedModel
        from honed.verifiers.worker import Worker

        def warm(p: Any) -> None:
            self._progress(f"base model: warm start ({p.stage})", p.step, p.max_steps)

        base = Path(self.base) if self.base else base_model(self.suite, seed=self.seed, on_progress=warm)
        if self.store.live_version(self.name) is None:
            v1 = self.store.register_model(self.name, base, reason="warm-started base model")
            self.store.promote(self.name, v1.version, expected_live=None, reason="the base model")
        # A suite may cap replies (`max_tokens`): its answers are short, and a rambling sample costs time.
        max_tokens = getattr(self.suite, "max_tokens", None)
        settings = {"max_tokens": max_tokens} if max_tokens else {}
        self._served = ServedModel(self.store, self.name, temperature=1.0, poll_interval=0.2, **settings)
        self.agent = suite_agent(self.suite, self._served, store=self.store, name=self.name)
        data: dict[str, Any] = {"agent": self.name}
        # DPO and GRPO rows cannot be demonstrations: those methods train on the loop's own runs only.
        if self.external_ratio > 0 and set(self.method.accepts) & set(EXTERNAL_METHODS):
            if self.data.get("external_for") == "stuck":
                external = self._solutions()
            else:
                external = self.suite.demonstrations(max(64, len(self.train)), seed=self.seed)
            data |= {"external": external, "external_ratio": self.external_ratio}
        data |= self.data
        gate_agent = lambda model: suite_agent(self.suite, model, store=self.store, name=self.name)  # noqa: E731
        common = dict(
            model=self.name,
            method=self.method,
            agent=gate_agent,
            verifiers=gate_verifiers(self.suite),
            watched=self.training_verifiers,
            heldout=self.heldout,
            chat_model=local_chat_model(**settings),
            output_dir=self.workdir / "models",
            seed=self.seed,
            on_progress=self.on_progress,
            data=DataConfig(**data),
            start=self.start_from,
        )
        self.cycle = Cycle(self.store, gate=GateConfig(samples=self.samples), **common)
        self.greedy_eval = Cycle(self.store, gate=GateConfig(samples=1, temperature=0.0), **common)
        worker = Worker(self.store, self.training_verifiers, concurrency=2, poll_s=0.2, backoff_s=0.2)
        self._worker = worker
        self._worker_thread = threading.Thread(
            target=worker.run_forever,
            kwargs={"install_signal_handlers": False},
            name="honed-verifier",
            daemon=True,
        )
        self._worker_thread.start()

    def baseline(self) -> CycleResult:
        """Cycle 0: the live (base) version on the held-out tasks, before any training."""
        started = time.monotonic()
        live = self.store.live_version(self.name)
        scores = self.cycle.evaluate_version(live)
        return CycleResult(
            "base",
            "the base model, before any training",
            cycle=0,
            live=live.ref,
            version=live.ref,
            heldout=scores.to_dict(),
            seconds=round(time.monotonic() - started, 1),
            extra={"greedy_pass_at_1": self._greedy(live)},
        )

    def step(self, k: int) -> CycleResult:
        """One cycle: attempts by the live version, labels, then train -> gate -> promote."""
        started = time.monotonic()
        self._served.refresh()
        tasks = self._curriculum()
        since = datetime.now(UTC) - timedelta(seconds=5)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            self._progress(f"cycle {k}: attempts", done, len(tasks))

        tag = attempt(self.agent, tasks, samples=1, concurrency=self.concurrency, on_done=advance)
        self._progress(f"cycle {k}: verify", 0, len(tasks))
        found = verify_round(
            self.store, self.training_verifiers, tag, expected=len(tasks), since=since, work=False
        )
        self._progress(f"cycle {k}: verify", len(tasks), len(tasks))
        self._count_passes(found)
        result = self.cycle.run()
        result.cycle = k
        live = self.store.live_version(self.name)
        result.extra["greedy_pass_at_1"] = self._greedy(live)
        result.extra["attempts"] = len(found)
        result.seconds = round(time.monotonic() - started, 1)
        return result

    def close(self) -> None:
        if self._worker_thread is not None:
            self._worker.stop()
            self._worker_thread.join(timeout=30)
            self._worker.close()
            self._worker_thread = None
        if self._served is not None:
            self._served.close()
            self._served = None
        from honed.capture.instrument import flush

        flush()

    # -- helpers ---------------------------------------------------------------------------------

    def _solutions(self) -> list[dict[str, Any]]:
        """A demonstration for each train task (`DataConfig(external_for="stuck")` uses those of the
        tasks that never pass): outside help, as a person solving the tasks the agent cannot."""
        solve = getattr(self.suite, "solution_for", None)
        if not callable(solve):
            raise ValueError(
                f"suite {self.suite.name!r} has no solution_for(task): demonstrations for stuck tasks need one"
            )
        return [{**solve(task), "task_id": task.id} for task in self.train]

    def _curriculum(self) -> list[Task]:
        """`attempts` x tasks attempts, spread toward tasks with something to learn: a task seen
        passing sometimes (0 < rate < 1) gets twice the share of one always passed or never."""
        budget = self.attempts * len(self.train)
        if not self._rates:
            return [t for t in self.train for _ in range(self.attempts)]
        weights = []
        for t in self.train:
            passes, n = self._rates.get(t.id, (0, 0))
            weights.append(2.0 if n == 0 or 0 < passes < n else 1.0)
        picked = list(self.train)  # every task at least once
        picked += self._rng.choices(self.train, weights=weights, k=max(0, budget - len(picked)))
        return picked

    def _count_passes(self, found: Sequence[Trajectory]) -> None:
        """Per-task passes of this round by the training verifiers (for the curriculum)."""
        names = [getattr(v, "name", type(v).__name__) for v in self.training_verifiers]
        for t in found:
            if t.task_id is None:
                continue
            passed = label(t.verdicts, only=names)
            passes, n = self._rates.get(t.task_id, (0, 0))
            self._rates[t.task_id] = (passes + bool(passed), n + 1)

    def _greedy(self, live: Any) -> float | None:
        if not self.greedy:
            return None
        return round(self.greedy_eval.evaluate_version(live).pass_at_1, 4)

    def _progress(self, phase: str, done: int, total: int) -> None:
        if self.on_progress:
            self.on_progress(phase, done, total)


def fresh_store_url(workdir: str | Path, name: str = "demo.db") -> str:
    """A new SQLite store in `workdir` (an earlier demo's is removed, its models too). A `models`
    folder no demo made is refused, not deleted (a QA pass, session 20: `--workdir .` removed a
    project's own models)."""
    root = Path(workdir)
    marker = root / DEMO_MARKER
    if (root / "models").exists() and not (marker.exists() or (root / name).exists()):
        raise FileExistsError(
            f"{root / 'models'} was not made by `honed demo`: give --workdir a new or empty folder"
        )
    for path in (root / name, root / f"{name}-wal", root / f"{name}-shm"):
        path.unlink(missing_ok=True)
    shutil.rmtree(root / "models", ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by `honed demo`: its store and models here are replaced by the next demo\n")
    return f"sqlite:///{(root / name).resolve()}"


DEMO_MARKER = ".honed-demo"
