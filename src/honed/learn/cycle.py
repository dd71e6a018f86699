"""One training cycle: select verified experience -> build a dataset -> train -> gate -> promote.

    cycle = Cycle(store, model="support-agent", method=SFTMethod(), agent=make_agent,
                  verifiers=[ReferenceMatch()], heldout="heldout", min_new_verified=200)
    report = cycle.run()

Safeguards, in the order they act:
- one trainer per model: a lock row in the store (`TrainerBusy` otherwise);
- learn only from verified outcomes of the live version (`prepare` drops held-out tasks, errors and
  untrusted verifiers), and say so loudly when there is nothing new to learn;
- train on a copy: the candidate is registered as a new version, the live one is never touched;
- gate on held-out tasks with the real agent and the same verifiers (`gate.decide`);
- promote with a compare-and-set on the live version it was evaluated against, so a cycle that
  dies or races leaves no half-promoted state. Every phase lands in `training_runs`/`eval_runs`.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from honed.learn.evaluate import Scores, evaluate
from honed.learn.gate import GateDecision, decide
from honed.messages import request_text
from honed.store.training import TrainingRun
from honed.trajectory import HELDOUT, ModelVersion, Task

AgentFactory = Callable[[Any], Any]
ChatModelFactory = Callable[[ModelVersion, float], Any]
Progress = Callable[[str, int, int], None]


@dataclass
class CycleReport:
    """What one cycle did and why: `status` is promoted, rejected, failed or nothing_to_learn."""

    status: str
    reason: str
    run: TrainingRun | None = None
    live: ModelVersion | None = None
    candidate: ModelVersion | None = None
    decision: GateDecision | None = None
    live_scores: Scores | None = None
    candidate_scores: Scores | None = None
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    stuck: list[str] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)

    @property
    def promoted(self) -> bool:
        return self.status == "promoted"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "run": self.run.id if self.run else None,
            "live": self.live.ref if self.live else None,
            "candidate": self.candidate.ref if self.candidate else None,
            "live_scores": self.live_scores.to_dict() if self.live_scores else None,
            "candidate_scores": self.candidate_scores.to_dict() if self.candidate_scores else None,
            "data": self.data,
            "metrics": self.metrics,
            "stuck": self.stuck,
            "durations": self.durations,
        }


def local_chat_model(**settings: Any) -> ChatModelFactory:
    """The default way to run a version under evaluation: honed's local model on its folder."""

    def make(version: ModelVersion, temperature: float) -> Any:
        from honed.serving.local import LocalChatModel

        return LocalChatModel(version.path, model_version=version.ref, temperature=temperature, **settings)

    return make


class Cycle:
    """One model's training loop; `run()` does one cycle (see the module docstring).

    Args:
        model: the registry name; its live version is what trains and what the candidate must beat.
        method: an `SFTMethod`, `KTOMethod`, `DPOMethod`, `GRPOMethod` or `DistillMethod`.
        agent: builds the real agent around a chat model (captured into `store`); the gate runs it.
        verifiers: label the gate's held-out attempts (the same ones that label production runs).
        heldout: the held-out split's name (its tasks are read from the store) or the tasks.
        min_new_verified: fewer verified passes of the live version than this: nothing to learn.
        gate_margin, confidence, gate: see `gate.decide`; `enforce_gate=False` promotes every
            candidate and records what the gate would have decided (for measuring, never production).
        samples: attempts per held-out task at `temperature` (pass@1 is their mean; pass@k too).
        data: extra filters for `prepare` (`agent`, `external`, `external_ratio`, `max_per_task`,
            `heldout_fraction`, `verified`...).
        output_dir: where candidates are written (one folder per training run).
    """

    def __init__(
        self,
        store: Any,
        *,
        model: str,
        method: Any,
        agent: AgentFactory,
        verifiers: Sequence[Any],
        heldout: str | Sequence[Task] = HELDOUT,
        min_new_verified: int = 1,
        gate_margin: float = 0.02,
        confidence: float = 0.95,
        samples: int = 8,
        temperature: float = 1.0,
        chat_model: ChatModelFactory | None = None,
        data: dict[str, Any] | None = None,
        output_dir: str | Path = "honed-models",
        seed: int = 0,
        lock_ttl_s: float = 6 * 3600.0,
        gate: dict[str, Any] | None = None,
        enforce_gate: bool = True,
        on_progress: Progress | None = None,
        callbacks: Sequence[Any] = (),
    ) -> None:
        self.store, self.model, self.method = store, model, method
        self.agent, self.verifiers = agent, list(verifiers)
        self.heldout = heldout
        self.min_new_verified = min_new_verified
        self.gate_margin, self.confidence = gate_margin, confidence
        self.samples, self.temperature = samples, temperature
        self.chat_model = chat_model or local_chat_model()
        self.data = dict(data or {})
        self.output_dir = Path(output_dir)
        self.seed, self.lock_ttl_s = seed, lock_ttl_s
        self.gate = dict(gate or {})
        self.enforce_gate = enforce_gate
        self.on_progress = on_progress
        self.callbacks = list(callbacks)

    # -- the cycle -------------------------------------------------------------------------------

    def run(self) -> CycleReport:
        """One cycle under the model's trainer lock; raises `TrainerBusy` if another one runs."""
        with self.store.trainer_lock(self.model, ttl_s=self.lock_ttl_s) as owner:
            return self._run(owner)

    def evaluate_version(self, version: ModelVersion, *, training_run: int | None = None) -> Scores:
        """Score `version` on the held-out tasks (reusing a stored evaluation of the same tasks,
        samples and temperature: a version's weights never change) and record it."""
        tasks = self.heldout_tasks()
        key = self._eval_key(tasks)
        for past in reversed(self.store.eval_runs(self.model, version=version.ref, split=HELDOUT)):
            if past.metrics.get("eval_key") == key and "per_task" in past.metrics:
                return _scores_from_metrics(past.metrics)
        started = time.monotonic()
        chat = self.chat_model(version, self.temperature)
        try:
            scores = evaluate(
                self.store,
                self.agent(chat),
                tasks,
                self.verifiers,
                samples=self.samples,
                metadata={"purpose": "gate", "evaluated": version.ref},
                on_done=self._counter(f"evaluate {version.ref}", len(tasks) * self.samples),
            )
        finally:
            _close(chat)
        metrics = {
            **scores.to_dict(),
            "eval_key": key,
            "per_task": _per_task(scores),
            "task_slices": scores.slices,
        }
        self.store.record_eval(
            self.model,
            version.ref,
            HELDOUT,
            metrics,
            training_run=training_run,
            duration_s=time.monotonic() - started,
        )
        return scores

    def heldout_tasks(self) -> list[Task]:
        """The gate's tasks: given ones, or every held-out task seen in the store (its first
        attempt's request and metadata)."""
        if not isinstance(self.heldout, str):
            return list(self.heldout)
        return tasks_from_store(self.store, self.heldout, agent=self.data.get("agent"))

    # -- phases ----------------------------------------------------------------------------------

    def _run(self, owner: str) -> CycleReport:
        from honed.learn.datasets import prepare
        from honed.learn.methods import NothingToLearn

        durations: dict[str, float] = {}
        live = self.store.live_version(self.model)
        if live is None:
            raise LookupError(f"{self.model}: no live version; register and promote a base version first")
        config = {
            "method": _config_of(self.method),
            "min_new_verified": self.min_new_verified,
            "gate_margin": self.gate_margin,
            "confidence": self.confidence,
            "samples": self.samples,
            "temperature": self.temperature,
            "seed": self.seed,
            "data": {k: v for k, v in self.data.items() if k != "external"},
            "gate": self.gate,
        }
        run = self.store.start_training_run(
            self.model, self.method.name, parent=live.ref, config=_jsonable(config), owner=owner
        )
        report = CycleReport(status="running", reason="", run=run, live=live, durations=durations)
        try:
            # 1. what the live version verifiably did right (and wrong), held-out tasks excluded
            started = time.monotonic()
            self._phase("select", 0, 1)
            filters = {"model_version": live.ref, **self.data}
            data = prepare(self.store, self.method.name, seed=self.seed, **filters)
            attempts = sum(t.get("n", 0) for t in data.tasks.values())
            passes = sum(t.get("passed", 0) for t in data.tasks.values())
            report.stuck = data.stuck or sorted(k for k, t in data.tasks.items() if not t.get("passed"))
            report.data = {
                **data.counts,
                "train_pass_rate": round(passes / attempts, 4) if attempts else None,
                "trajectories": attempts,
                "stuck_tasks": len(report.stuck),
                "learnable_tasks": sum(
                    1 for t in data.tasks.values() if 0 < t.get("passed", 0) < t.get("n", 0)
                ),
            }
            self.store.add_training_examples(run.id, data.trajectory_ids)
            self.store.update_training_run(run.id, data=report.data)
            durations["select"] = time.monotonic() - started
            self._phase("select", 1, 1)
            verified = self.data.get("verified", True)
            short = data.counts.get("passed", 0) < self.min_new_verified if verified else len(data) == 0
            if short and self.method.name != "grpo":
                return self._finish(
                    report,
                    "nothing_to_learn",
                    f"NOTHING TO LEARN: {data.counts.get('passed', 0)} verified passes of {live.ref} "
                    f"(min_new_verified={self.min_new_verified}); {len(report.stuck)} tasks never pass "
                    "and need outside data",
                )

            # 2. train a candidate from the live weights (a new folder; the live one is untouched)
            started = time.monotonic()
            out = self.output_dir / f"{self.model}-run{run.id}"
            self._phase("train", 0, 1)
            result = self.method.train(live.path, data, out, seed=self.seed, callbacks=self.callbacks)
            report.metrics = dict(result.metrics)
            durations["train"] = time.monotonic() - started
            candidate = self.store.register_model(
                self.model,
                result.path,
                parent=live,
                metrics=report.metrics,
                training_run=run.id,
                reason=f"training run {run.id} ({self.method.name})",
            )
            report.candidate = candidate
            self.store.update_training_run(run.id, candidate=candidate.ref, metrics=report.metrics)
            self._phase("train", 1, 1)

            # 3. the gate: both versions on the held-out tasks, same agent, same verifiers
            started = time.monotonic()
            report.live_scores = self.evaluate_version(live)
            report.candidate_scores = self.evaluate_version(candidate, training_run=run.id)
            durations["gate"] = time.monotonic() - started
            decision = decide(
                report.candidate_scores,
                report.live_scores,
                margin=self.gate_margin,
                confidence=self.confidence,
                **self.gate,
            )
            report.decision = decision
            self.store.update_training_run(
                run.id, metrics={"gate": decision.to_dict(), "heldout": report.candidate_scores.to_dict()}
            )
            if decision.promote or not self.enforce_gate:
                reason = decision.reason
                if not decision.promote:
                    reason = f"gate not enforced (it would reject: {decision.reason})"
                self.store.promote(self.model, candidate.version, expected_live=live.version, reason=reason)
                return self._finish(report, "promoted", reason)
            self.store.reject(self.model, candidate.version, reason=decision.reason)
            return self._finish(report, "rejected", decision.reason)
        except NothingToLearn as exc:
            return self._finish(report, "nothing_to_learn", f"NOTHING TO LEARN: {exc}")
        except Exception as exc:
            report.status = "failed"
            report.reason = f"training run failed: {type(exc).__name__}: {exc}"[:2000]
            self.store.update_training_run(
                run.id, status="failed", reason=report.reason, error=traceback.format_exc()[-8000:]
            )
            return report
        except BaseException:
            # Ctrl-C or a kill: nothing was promoted; record it so `honed status` tells the truth.
            self.store.update_training_run(
                run.id, status="interrupted", reason="interrupted; the live version was not changed"
            )
            raise

    def _finish(self, report: CycleReport, status: str, reason: str) -> CycleReport:
        report.status, report.reason = status, reason
        assert report.run is not None
        report.run = self.store.update_training_run(report.run.id, status=status, reason=reason)
        return report

    def _phase(self, name: str, done: int, total: int) -> None:
        if self.on_progress:
            self.on_progress(name, done, total)

    def _counter(self, name: str, total: int) -> Callable[[int], None]:
        done = 0
        self._phase(name, 0, total)

        def advance(n: int) -> None:
            nonlocal done
            done += n
            self._phase(name, done, total)

        return advance

    def _eval_key(self, tasks: Sequence[Task]) -> str:
        ids = sorted(t.id for t in tasks)
        raw = json.dumps(
            [ids, self.samples, self.temperature, [getattr(v, "name", str(v)) for v in self.verifiers]]
        )
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


def tasks_from_store(store: Any, split: str, *, agent: str | None = None) -> list[Task]:
    """Every distinct task of `split` in the store, rebuilt from its oldest attempt: the user's
    request and the metadata its verifiers read."""
    tasks: dict[str, Task] = {}
    for t in store.trajectories(None, split=split, agent=agent, with_steps=False, oldest_first=True):
        if not t.task_id or t.task_id in tasks:
            continue
        prompt = request_text(t.task)
        if prompt is None:
            continue
        meta = {k: v for k, v in (t.metadata or {}).items() if k not in _ATTEMPT_KEYS}
        tasks[t.task_id] = Task(id=t.task_id, prompt=prompt, split=split, metadata=meta)
    return list(tasks.values())


_ATTEMPT_KEYS = frozenset({"task_id", "split", "round", "sample", "purpose", "evaluated"})


def _per_task(scores: Scores) -> dict[str, list[int]]:
    return {t: [1 if r else 0 for r in rs] for t, rs in scores.per_task.items()}


def _scores_from_metrics(metrics: dict[str, Any]) -> Scores:
    return Scores(
        per_task={t: [bool(r) for r in rs] for t, rs in metrics["per_task"].items()},
        slices=dict(metrics.get("task_slices") or {}),
        diversity=dict(metrics.get("diversity") or {}),
        trajectories=int(metrics.get("trajectories", 0)),
        round=str(metrics.get("round", "")),
    )


def _config_of(method: Any) -> Any:
    config = getattr(method, "config", None)
    return config() if callable(config) else {"name": getattr(method, "name", type(method).__name__)}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _close(chat: Any) -> None:
    close = getattr(chat, "close", None)
    if callable(close):
        close()
