"""One training cycle, top to bottom: select -> dataset -> train -> evaluate -> gate -> promote.

    cycle = Cycle(store, model="support-agent", method=SFTMethod(), agent=make_agent,
                  verifiers=[ReferenceMatch()], data=DataConfig(min_new_verified=200))
    result = cycle.run()          # a CycleResult: promoted, rejected, nothing_to_learn or failed

Safeguards, in the order they act:
- one trainer per model: a lock row in the store (`TrainerBusy` otherwise), renewed while the
  cycle runs (`lock_ttl_s`, 10 minutes: a trainer killed on another machine frees it that soon;
  one killed on this machine, at once);
- learn only from verified outcomes (`prepare` drops held-out tasks, verifier errors and untrusted
  verifiers), and say so loudly when there is nothing new to learn;
- train on a copy: the candidate is registered as a new version, the live one is never touched;
- gate on held-out tasks with the real agent and the same verifiers (`gate.decide`);
- promote with a compare-and-set on the live version it was evaluated against, so a cycle that
  dies or races leaves no half-promoted state. Every phase lands in `training_runs`/`eval_runs`;
- never repeat a rejected cycle unchanged: when the cycles before this one were rejected from the
  same live version (read from the store, so it holds across processes), this one changes what it
  learns from (`DataConfig.after_rejections`) and how (the method's own `after_rejections`, a
  lower learning rate), records the change with the run and says so in its reason.

Under a distributed launcher (`torchrun`, `accelerate launch`) every rank runs the cycle: the main
process does all of the above, the others receive its dataset and train with it, nothing more
(`honed.learn.distributed`).

The machinery lives elsewhere: `datasets.prepare` (rows), `methods` (TRL), `evaluate` (attempts
and scores), `gate.decide`; this module only puts them in order.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import time
import traceback
import types
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from honed.learn.distributed import Ranks
from honed.learn.evaluate import Scores, evaluate
from honed.learn.gate import GateDecision, decide
from honed.messages import request_text
from honed.store.registry import ModelVersionInvalid, PromotionConflict, validate_model_files
from honed.trajectory import HELDOUT, ModelVersion, Task, Trajectory
from honed.verifiers.protocol import verifier_name

AgentFactory = Callable[[Any], Any]
ChatModelFactory = Callable[[ModelVersion, float], Any]
Progress = Callable[[str, int, int], None]

log = logging.getLogger("honed")


@dataclass(frozen=True)
class DataConfig:
    """What a cycle learns from (the arguments of `honed.learn.datasets.prepare`).

    `min_new_verified`: fewer verified passes than this and the cycle has nothing to learn.
    `versions`: "lineage" (the default) learns from the runs of the live version and every version
    it descends from, newest first under the per-task cap (experience accumulates across cycles
    instead of being replaced: Gerstgrasser et al. 2024); `window` keeps only the newest that many
    versions of it; `newest_weight` counts the live version's own rows that many times (default 2:
    over 5 cycles, 3 seeds, held-out pass@1 0.726 against 0.653 with 1, benchmarks/README.md). "live" learns from the live
    version's runs only; "all" from every run (including runs no version served, e.g. a teacher
    configuration's). `agent`: only this agent's runs. `max_per_task`: attempts kept per task. `external` chat
    examples make up `external_ratio` of the rows (SFT, distill, KTO); with `external_for="stuck"`
    only the external rows whose `task_id` is a task the selection attempted and never passed are
    used, each once, and `external_ratio` is ignored (outside help where the model's own runs
    cannot reach).
    `heldout_fraction`: that fraction of task ids is held out by a stable hash, every run of
    them. `verified=False` trains on every
    attempt (a measurement arm, never production). `verifiers`: only these label.
    """

    min_new_verified: int = 1
    versions: Literal["lineage", "live", "all"] = "lineage"
    window: int | None = None
    newest_weight: int = 2
    agent: str | None = None
    max_per_task: int | None = 8
    external: Sequence[Any] | None = None
    external_ratio: float = 0.0
    external_for: Literal["all", "stuck"] = "all"
    heldout_fraction: float = 0.0
    verified: bool = True
    verifiers: tuple[str, ...] | None = None

    def filters(self, live: ModelVersion, lineage: Sequence[ModelVersion]) -> dict[str, Any]:
        """`prepare`'s keyword arguments for a cycle training `live` (`lineage`: live, its parent,
        ... back to the base)."""
        own = ("min_new_verified", "versions", "window")
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in own}
        fields = {k: v for k, v in fields.items() if v is not None or k == "max_per_task"}
        if self.versions == "live":
            fields["model_version"] = live.ref
        elif self.versions == "lineage":
            fields["model_version"] = [v.ref for v in lineage[: self.window]]
        return fields

    def after_rejections(self, rejections: int) -> tuple[DataConfig, list[str]]:
        """What the next cycle learns from after `rejections` rejected cycles in a row from one live
        version, and what changed: more data, the live version's ancestors' runs too ("live"
        becomes a lineage of `1 + rejections` versions; a lineage `window` widens by `rejections`)."""
        if rejections <= 0:
            return self, []
        if self.versions == "live":
            return replace(self, versions="lineage", window=1 + rejections), [
                f"versions live -> lineage (window {1 + rejections})"
            ]
        if self.versions == "lineage" and self.window is not None:
            return replace(self, window=self.window + rejections), [
                f"lineage window {self.window} -> {self.window + rejections}"
            ]
        return self, []

    def record(self) -> dict[str, Any]:
        """JSON-able, for the training run (external rows are counted, not copied)."""
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        if self.external is not None:
            fields["external"] = len(self.external)
        return fields


@dataclass(frozen=True)
class GateConfig:
    """How candidates are judged (see `honed.learn.gate.decide`): `samples` attempts per held-out
    task at `temperature`; promote only on a gain of at least `margin` whose `confidence` lower
    bound is above 0, no slice confidently down more than `slice_tolerance`, diversity kept."""

    margin: float = 0.02
    confidence: float = 0.95
    slice_tolerance: float = 0.05
    min_diversity_ratio: float = 0.5
    samples: int = 8
    temperature: float = 1.0

    def __post_init__(self) -> None:
        # A round of 0 samples scores nothing: it was stored as a rejected setback, halving the
        # next cycles' learning rate (a QA pass, session 19: `honed train --samples 0`).
        if not (isinstance(self.samples, int) and self.samples >= 1):
            raise ValueError(
                f"samples must be an integer >= 1 (attempts per held-out task), not {self.samples!r}"
            )
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be between 0 and 1, not {self.confidence!r}")
        for name in ("margin", "slice_tolerance", "min_diversity_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1, not {getattr(self, name)!r}")


@dataclass
class CycleResult:
    """What one cycle did and why: the one record `Cycle.run` returns, the demo prints a row of,
    `honed train --json` and `honed demo --json` write as a line, and the report plots (rebuilt
    from the store by `from_records`).

    `status`: base (cycle 0 of a loop: no training), promoted, rejected, nothing_to_learn, failed,
    interrupted; on ranks other than the main process of a distributed launch, worker (it trained
    with the main process, or had nothing to train; the main process's result says what came of
    it). `live` is the version that trained, `candidate` the one it produced, `version` the
    one live after the cycle; `heldout`/`candidate_heldout` their held-out metrics (pass_at_1,
    pass_at_k, slices, diversity). `data` is the selection's counts (train_pass_rate,
    trajectories, passed, duplicates...), `metrics` training's.
    """

    status: str
    reason: str
    method: str = ""
    run_id: int | None = None
    cycle: int | None = None
    live: str | None = None
    candidate: str | None = None
    version: str | None = None
    heldout: dict[str, Any] = field(default_factory=dict)
    candidate_heldout: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    decision: dict[str, Any] | None = None
    stuck: list[str] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)
    started_at: datetime | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    # The gate's scores in full (per task), when the cycle ran here; not part of the record.
    live_scores: Scores | None = field(default=None, repr=False, compare=False)
    candidate_scores: Scores | None = field(default=None, repr=False, compare=False)

    @property
    def promoted(self) -> bool | None:
        """None for cycle 0 (the base) and a worker rank, else whether the cycle's candidate went live."""
        return None if self.status in ("base", "worker") else self.status == "promoted"

    @property
    def heldout_pass_at_1(self) -> float | None:
        return _number(self.heldout.get("pass_at_1"))

    @property
    def candidate_pass_at_1(self) -> float | None:
        return _number(self.candidate_heldout.get("pass_at_1"))

    def pass_at(self, k: int, *, candidate: bool = False) -> float | None:
        return _number((self.candidate_heldout if candidate else self.heldout).get(f"pass_at_{k}"))

    @property
    def train_pass_rate(self) -> float | None:
        """Verified passes over the live version's attempts in what the cycle selected; None
        where it made none (a distillation learns from a teacher's runs: a QA pass, session 23,
        read 1.000 from the selection's passes alone). Records from before the field: the
        selection's passes over its labelled runs."""
        if "train_pass_rate" in self.data:
            return _number(self.data["train_pass_rate"])
        passed, failed = self.data.get("passed"), self.data.get("failed")
        return (
            passed / (passed + failed)
            if isinstance(passed, int) and isinstance(failed, int) and passed + failed
            else None
        )

    @property
    def trajectories(self) -> int | None:
        value = self.data.get("trajectories")
        return int(value) if isinstance(value, int | float) else None

    def to_dict(self) -> dict[str, Any]:
        record = {k: v for k, v in asdict(self).items() if k not in ("live_scores", "candidate_scores")}
        record["started_at"] = self.started_at.isoformat() if self.started_at else None
        return {
            "cycle": self.cycle,
            "heldout_pass_at_1": self.heldout_pass_at_1,
            "pass_at_8": self.pass_at(8),
            "train_pass_rate": self.train_pass_rate,
            "trajectories": self.trajectories,
            "promoted": self.promoted,
            "candidate_pass_at_1": self.candidate_pass_at_1,
            **record,
        }

    @classmethod
    def from_records(
        cls, cycle: int, run: Any, heldout: dict[str, Any], candidate: dict[str, Any]
    ) -> CycleResult:
        """A stored training run as a result: `heldout` is the evaluation of the version live after
        it, `candidate` its candidate's (metrics of `eval_runs`)."""
        promoted = run.status == "promoted"
        return cls(
            status=run.status,
            reason=run.reason or (run.metrics.get("gate") or {}).get("reason", ""),
            method=run.method,
            run_id=run.id,
            cycle=cycle,
            live=run.parent,
            candidate=run.candidate,
            version=run.candidate if promoted else run.parent,
            heldout=dict(heldout),
            candidate_heldout=dict(candidate),
            data=dict(run.data or {}),
            metrics={k: v for k, v in (run.metrics or {}).items() if k not in ("gate", "heldout")},
            decision=(run.metrics or {}).get("gate"),
            started_at=run.started_at,
        )


def local_chat_model(**settings: Any) -> ChatModelFactory:
    """The default way to run a version under evaluation: honed's local model on its folder."""

    def make(version: ModelVersion, temperature: float) -> Any:
        from honed.serving.local import LocalChatModel

        return LocalChatModel(version.path, model_version=version.ref, temperature=temperature, **settings)

    return make


class Cycle:
    """One model's training cycle; `run()` does one (see the module docstring).

    Args:
        model: the registry name; its live version trains and is what the candidate must beat.
        method: an `SFTMethod`, `KTOMethod`, `DPOMethod`, `GRPOMethod` or `DistillMethod`.
        agent: builds the real agent around a chat model (captured into `store`); the gate runs it.
        verifiers: label the gate's held-out attempts. They may differ from the verifiers that label
            training data (hidden tests, a stronger judge): then `honed.learn.watch` can tell a
            verifier being gamed (its training pass rate up, the gate's verdicts down).
        watched: the training verifiers, when they differ from `verifiers`: they label the gate's
            held-out attempts too, uncounted, for `honed.learn.watch`.
        heldout: the held-out split's name (its tasks are read from the store) or the tasks.
        data: what to learn from (`DataConfig`); gate: how to judge (`GateConfig`).
        chat_model: runs a version for the gate (default: `local_chat_model()`).
        output_dir: where candidates are written (one folder per training run).
        adapt: after rejected cycles from the same live version, change the data and the method
            before training again (see the module docstring); False repeats them as configured.
        start: the weights a candidate trains from. "live" continues the live version; "base"
            restarts from the lineage's first version on the accumulated data each cycle (as STaR
            does, Zelikman et al. 2022): later rounds' data does not stack onto weights that already
            fit the earlier rounds', and a cycle cannot drift further than one training from the base.
            Either way the candidate must beat the live version, and descends from it.
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
        watched: Sequence[Any] = (),
        data: DataConfig | None = None,
        gate: GateConfig | None = None,
        chat_model: ChatModelFactory | None = None,
        output_dir: str | Path = "honed-models",
        seed: int = 0,
        lock_ttl_s: float = 600.0,
        on_progress: Progress | None = None,
        callbacks: Sequence[Any] = (),
        adapt: bool = True,
        start: Literal["live", "base"] = "live",
    ) -> None:
        if start not in ("live", "base"):
            raise ValueError(f"start is 'live' or 'base', not {start!r}")
        self.store, self.model, self.method = store, model, method
        self.adapt, self.start = adapt, start
        self.agent, self.verifiers = agent, list(verifiers)
        gate_names = {verifier_name(v) for v in self.verifiers}
        self.watched = [v for v in watched if verifier_name(v) not in gate_names]
        self.heldout = heldout
        self.data = data or DataConfig()
        self.gate = gate or GateConfig()
        self.chat_model = chat_model or local_chat_model()
        self.output_dir = Path(output_dir)
        self.seed, self.lock_ttl_s = seed, lock_ttl_s
        self.on_progress = on_progress
        self.callbacks = list(callbacks)

    def run(self) -> CycleResult:
        """One cycle under the model's trainer lock; raises `TrainerBusy` if another one runs.

        Under a distributed launcher, call it on every rank: the main process runs the cycle, the
        others train with it and return a `worker` result."""
        ranks = Ranks.start(getattr(self.method, "chosen", None))
        if not ranks.is_main:
            return self._train_with_main(ranks)
        handoff = _Handoff(ranks)
        try:
            with self.store.trainer_lock(self.model, ttl_s=self.lock_ttl_s) as owner:
                return self._run(owner, handoff)
        finally:
            handoff.release()

    def _train_with_main(self, ranks: Ranks) -> CycleResult:
        """A rank other than the main process: train on what the main process selected, if it trains."""
        where = f"rank {ranks.rank} of {ranks.size}"
        job = ranks.share()
        if job is None:
            return CycleResult(
                "worker", f"{where}: the main process trained nothing", method=self.method.name
            )
        from honed.learn.methods import NothingToLearn

        base, data, out, seed, run_id, method = job
        try:
            trained = method.train(base, data, out, seed=seed, callbacks=self.callbacks)
        except NothingToLearn as exc:  # every rank finds it; the main process records it
            return CycleResult("worker", f"{where}: {exc}", method=self.method.name, run_id=run_id)
        return CycleResult(
            "worker", f"{where}: trained with the main process, which gates and promotes",
            method=self.method.name, run_id=run_id, metrics=dict(trained.metrics),
        )  # fmt: skip

    def _run(self, owner: str, handoff: _Handoff) -> CycleResult:
        from honed.learn.datasets import prepare
        from honed.learn.methods import NothingToLearn
        from honed.store.select import unmatched_names

        live = self.store.live_version(self.model)
        if live is None:
            raise LookupError(f"{self.model}: no live version; register and promote a base version first")
        trained_from = [live] if self.start == "live" else [live, lineage(self.store, live)[-1]]
        gone = [v for v in trained_from if not Path(v.path).is_dir()]
        if gone:  # said before any work (it was a model hub's "Repo id must be ..." after selecting)
            where = ", ".join(f"{v.ref} at {v.path}" for v in gone)
            return CycleResult(
                "failed", f"the weights' folder is missing: {where}", live=live.ref, version=live.ref
            )
        for version in trained_from:  # damaged since it was promoted: said with its file, before any work
            try:
                validate_model_files(version.path, version.ref)
            except ModelVersionInvalid as exc:
                return CycleResult(
                    "failed", f"the weights are damaged: {exc}", live=live.ref, version=live.ref
                )
        if not self.heldout_tasks():  # nothing could judge a candidate: train none
            agent = f" of agent {self.data.agent!r}" if self.data.agent else ""
            why = (
                f"NOT MEASURED: no held-out tasks{agent} in split {self.heldout_split!r} for the gate to score; "
                "capture some runs with split='heldout' (or give heldout=[Task(...)]). Nothing was trained"
            )
            others = sorted(
                {
                    t.agent
                    for t in self.store.trajectories(split=self.heldout_split, limit=500, with_steps=False)
                }
                - {self.data.agent}
            )
            if self.data.agent and others:  # a QA pass (session 20): the factory's agent had no name
                why += (
                    f" (held-out runs are stored for agent(s) {', '.join(map(repr, others[:5]))}: name the agent "
                    f"{self.data.agent!r}, e.g. create_agent(..., name={self.data.agent!r}))"
                )
            return CycleResult("failed", why, live=live.ref, version=live.ref)
        method, config, adapted = self._adapted(live)
        run = self.store.start_training_run(
            self.model,
            method.name,
            parent=live.ref,
            config=self._record(method, config, adapted),
            owner=owner,
        )
        result = CycleResult(
            "running", "", method=method.name, run_id=run.id, live=live.ref, version=live.ref,
            started_at=run.started_at,
        )  # fmt: skip
        if adapted:
            result.extra["adapted"] = adapted
        try:
            # 1. select: what was verifiably done right (and wrong), held-out tasks excluded
            with self._timed(result, "select"):
                filters = config.filters(live, lineage(self.store, live))
                weights = live if self.start == "live" else lineage(self.store, live)[-1]
                data = prepare(
                    self.store, method.name, seed=self.seed, heldout_split=self.heldout_split,
                    heldout_tasks=self.heldout_tasks(), tokenizer=_tokenizer(weights.path), **filters,
                )  # fmt: skip
                result.data, result.stuck = _selection_summary(data, live)
                result.data["gate_verifiers"] = sorted({verifier_name(v) for v in self.verifiers})
                result.data["rows_sha256"] = _rows_fingerprint(data.dataset)
                self.store.add_training_examples(run.id, data.trajectory_ids)
                self.store.update_training_run(run.id, data=result.data)
            # New experience is the live version's own (with "all", whatever was selected).
            own = data.versions.get(live.ref, {}) if config.versions != "all" else data.counts
            passes = own.get("passed", 0)
            short = passes < config.min_new_verified if config.verified else len(data) == 0
            if short and method.name != "grpo":
                why = (
                    f"NOTHING TO LEARN: {passes} new verified passes of {live.ref} (min_new_verified="
                    f"{config.min_new_verified}); {len(result.stuck)} tasks never pass and need outside data"
                )
                missing = unmatched_names(self.store, agent=config.agent)  # runs stored under another name
                why += f"; {missing}" if missing else ""
                return self._finish(result, "nothing_to_learn", why, live)
            same = self._same_as_rejected(live, run, data, result.data["rows_sha256"])
            if same is not None:  # the same candidate again: only the gate's sample would change
                why = (
                    f"NOTHING TO LEARN: the same {len(data.trajectory_ids)} examples and method as rejected run "
                    f"{same} of {live.ref}; new verified experience, or another method, changes that"
                )
                return self._finish(result, "nothing_to_learn", why, live)

            # 2. train a candidate from the live (or the base) weights, into a new folder
            with self._timed(result, "train"):
                out = _fresh_folder(self.output_dir / f"{self.model}-run{run.id}")
                result.extra["trained_from"] = weights.ref
                # The other ranks train with us, with the same method (after a rejection, the adjusted one).
                handoff.send((weights.path, data, out, self.seed, run.id, method))
                trained = method.train(weights.path, data, out, seed=self.seed, callbacks=self.callbacks)
                result.metrics = dict(trained.metrics)
                candidate = self.store.register_model(
                    self.model, trained.path, parent=live, metrics=result.metrics, training_run=run.id,
                    reason=f"training run {run.id} ({method.name})",
                )  # fmt: skip
                result.candidate = candidate.ref
                self.store.update_training_run(run.id, candidate=candidate.ref, metrics=result.metrics)

            # 3. evaluate both versions on the held-out tasks: same agent, same verifiers
            with self._timed(result, "gate"):
                result.live_scores = self.evaluate_version(live)
                result.candidate_scores = self.evaluate_version(candidate, training_run=run.id)
                result.heldout = result.live_scores.to_dict()
                result.candidate_heldout = result.candidate_scores.to_dict()

            # 4. gate, then promote (compare-and-set on the live version evaluated) or reject. A live
            # score from attempts that failed to run or be judged is the setup's, scored as fails: any
            # candidate would beat it. So would one whose own judging failed, wrongly, lose; its
            # attempts that failed to run are its own (a candidate that cannot run is worse).
            unmeasured = _unmeasured(result.live_scores, result.candidate_scores)
            if unmeasured:
                self.store.reject(self.model, candidate.version, reason=unmeasured)
                return self._finish(result, "failed", unmeasured, live)
            decision = self._decide(result.candidate_scores, result.live_scores)
            result.decision = decision.to_dict()
            self.store.update_training_run(
                run.id, metrics={"gate": result.decision, "heldout": result.candidate_heldout}
            )
            if decision.promote and self.store.trainer_lock_holder(self.model) != owner:
                lost = f"{decision.reason}; not promoted: another trainer holds {self.model}'s lock now"
                self.store.reject(self.model, candidate.version, reason=lost)
                return self._finish(result, "failed", lost, live)
            if decision.promote:
                try:
                    self.store.promote(
                        self.model, candidate.version, expected_live=live.version, reason=decision.reason
                    )
                except PromotionConflict as exc:  # a person promoted or rolled back during the gate
                    moved = (
                        f"{decision.reason}; not promoted: the live version changed during the gate ({exc})"
                    )
                    self.store.reject(self.model, candidate.version, reason=moved)
                    return self._finish(result, "rejected", moved, live)
                result.version, result.heldout = candidate.ref, result.candidate_heldout
                return self._finish(result, "promoted", decision.reason, live)
            self.store.reject(self.model, candidate.version, reason=decision.reason)
            return self._finish(result, "rejected", decision.reason, live)
        except NothingToLearn as exc:
            return self._finish(result, "nothing_to_learn", f"NOTHING TO LEARN: {exc}", live)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if self._went_live(result.candidate):
                # The promotion committed, then recording it failed (a dropped connection): the
                # candidate serves, so the run is what made it live (a QA pass, session 20: it was
                # recorded "failed" beside the live candidate, and the operator told nothing changed).
                result.status = "promoted"
                result.reason = f"promoted {result.candidate}; recording the cycle then failed: {error}"[
                    :2000
                ]
                self.store.update_training_run(run.id, status="promoted", reason=result.reason)
                return result
            result.status = "failed"
            result.reason = f"training run failed: {error}"[:2000]
            if result.candidate:  # registered, never promoted: left `candidate` it sat there forever
                with contextlib.suppress(Exception):
                    self.store.reject(self.model, result.candidate, reason=result.reason[:500])
            self.store.update_training_run(
                run.id, status="failed", reason=result.reason, error=traceback.format_exc()[-8000:]
            )
            return result
        except BaseException:
            # Ctrl-C or a kill: record what is true, so `honed status` tells it. Past the promotion
            # the candidate is live (it was recorded "not changed"); before it, the candidate it
            # registered is rejected (left `candidate` forever, a later rollback could reach it).
            made = result.candidate
            promoted = self._went_live(made)
            with contextlib.suppress(Exception):
                if made and not promoted:
                    self.store.reject(
                        self.model, made, reason="its training run was interrupted before the gate decided"
                    )
            if promoted:
                self.store.update_training_run(
                    run.id, status="promoted", reason=f"promoted {made}; interrupted while recording it"
                )
            else:
                self.store.update_training_run(
                    run.id, status="interrupted", reason="interrupted; the live version was not changed"
                )
            raise

    # -- the pieces the cycle calls ----------------------------------------------------------------

    def evaluate_version(self, version: ModelVersion, *, training_run: int | None = None) -> Scores:
        """Score `version` on the held-out tasks (reusing a stored evaluation of the same tasks,
        samples, temperature and verifier versions in which no attempt failed to run: a version's
        weights never change, but a setup that failed must not become its baseline) and record it."""
        tasks = self.heldout_tasks()
        key = self._eval_key(tasks)
        for past in reversed(self.store.eval_runs(self.model, version=version.ref, split=HELDOUT)):
            if past.metrics.get("eval_key") == key and "per_task" in past.metrics:
                if Scores.from_metrics(past.metrics).measured:
                    return Scores.from_metrics(past.metrics)
                break  # the latest such evaluation had attempts that failed to run or be judged
        started = time.monotonic()
        chat = self.chat_model(version, self.gate.temperature)
        try:
            scores = evaluate(
                self.store,
                self.agent(chat),
                tasks,
                self.verifiers,
                samples=self.gate.samples,
                metadata={"purpose": "gate", "evaluated": version.ref},
                on_done=self._counter(f"evaluate {version.ref}", len(tasks) * self.gate.samples),
                watched=self.watched,
            )
        finally:
            close = getattr(chat, "close", None)
            if callable(close):
                close()
        metrics = {**scores.to_dict(), **scores.records(), "eval_key": key}
        duration = time.monotonic() - started
        self.store.record_eval(
            self.model, version.ref, HELDOUT, metrics, training_run=training_run, duration_s=duration
        )
        return scores

    @property
    def heldout_split(self) -> str:
        """The split the gate's tasks are captured in, and which training leaves out."""
        return self.heldout if isinstance(self.heldout, str) else HELDOUT

    def heldout_tasks(self) -> list[Task]:
        """The gate's tasks: given ones (captured in the held-out split whatever split they were
        given: `Task` defaults to train), or every held-out task seen in the store."""
        if not isinstance(self.heldout, str):
            return [t if t.split == HELDOUT else replace(t, split=HELDOUT) for t in self.heldout]
        return tasks_from_store(self.store, self.heldout, agent=self.data.agent)

    def _decide(self, candidate: Scores, live: Scores) -> GateDecision:
        g = self.gate
        return decide(
            candidate, live, margin=g.margin, confidence=g.confidence,
            slice_tolerance=g.slice_tolerance, min_diversity_ratio=g.min_diversity_ratio,
        )  # fmt: skip

    def _adapted(self, live: ModelVersion) -> tuple[Any, DataConfig, dict[str, Any] | None]:
        """The method and data this cycle uses: as configured, unless the cycles before it were
        rejected from the same live version; then changed by their own rules, and what changed.
        The data's rule (more data) follows every rejection; the method's (a smaller step) only
        the setbacks, candidates that measured worse. A candidate that measured better without
        the evidence to promote it took a step in the right direction: halving the next one would
        make its gain still harder to show (the calendar suite, seed 1: +0.037, then +0.025 at half
        the rate, +0.019 at a quarter, all rejected), so the next learns from more attempts at
        the same rate."""
        rejected = self._rejected_runs(live)
        if not self.adapt or not rejected:
            return self.method, self.data, None
        config, changes = self.data.after_rejections(len(rejected))
        setbacks = [r for r in rejected if _setback(r)]
        method, rule = self.method, getattr(self.method, "after_rejections", None)
        if callable(rule):
            method, more = rule(len(setbacks))
            changes = [*changes, *more]
        if len(setbacks) < len(rejected):
            short = len(rejected) - len(setbacks)
            changes.append(
                f"{short} rejected candidate(s) measured no worse, not confidently better: same step, more attempts"
            )
        return method, config, {"rejected_runs": [r.id for r in rejected], "changes": changes}

    def _same_as_rejected(self, live: ModelVersion, run: Any, data: Any, rows: str) -> int | None:
        """The rejected run of `live` this one would repeat (the same rows, the same method
        configuration, so the same candidate, measured the same way), or None. Re-gating it re-rolls the gate's sample
        against the same live score: an equal candidate promoted within 10 such cycles 27-36% of
        the time (a QA pass's simulation, session 14). The rows are compared whole (`rows`, their
        fingerprint): new external demonstrations or another mix make another candidate."""
        rejected = self._rejected_runs(live)
        if not rejected:
            return None
        last, now = rejected[0], run.config or {}
        if any((last.config or {}).get(k) != now.get(k) for k in ("method", "eval_key", "start")):
            return None  # another method, or another way of measuring: not a repeat
        before = (last.data or {}).get("rows_sha256")
        if before is not None:
            return last.id if before == rows else None
        return last.id if set(self.store.training_examples(last.id)) == set(data.trajectory_ids) else None

    def _rejected_runs(self, live: ModelVersion) -> list[Any]:
        """The rejected training runs of `live` since it went live, newest first (failed,
        interrupted and nothing-to-learn runs neither count nor break the streak). A run whose
        candidate was promoted, then rolled back to `live` by a person, counts as rejected: the
        next cycle would train the same rows and promote the same candidate again, undoing the
        rollback (made for a regression the gate cannot see)."""
        rejected = []
        # Only the runs that made or refused a candidate: a night of `--every` ticks with nothing
        # new to learn pushed the rejected run out of the newest 100, and the 101st tick trained
        # the same rows again, undoing a person's rollback (a QA pass, session 20).
        for run in self.store.training_runs(self.model, limit=100, statuses=("rejected", "promoted")):
            if run.parent != live.ref or (run.status != "rejected" and not self._rolled_back(run)):
                break
            rejected.append(run)
        return rejected

    def _went_live(self, candidate: str | None) -> bool:
        """Whether `candidate` is the live version now (False where the store cannot say)."""
        try:
            live_now = self.store.live_version(self.model)
        except Exception:
            return False
        return bool(candidate) and live_now is not None and live_now.ref == candidate

    def _rolled_back(self, run: Any) -> bool:
        if run.status != "promoted" or not run.candidate:
            return False
        try:
            return self.store.model_version(run.candidate).status == "rejected"
        except Exception:  # the version is gone: nothing to repeat
            return False

    def _finish(self, result: CycleResult, status: str, reason: str, live: ModelVersion) -> CycleResult:
        adapted = result.extra.get("adapted")
        if adapted:
            runs = ", ".join(str(r) for r in adapted["rejected_runs"])
            changed = "; ".join(adapted["changes"]) or "nothing left to change"
            reason = f"{reason} [after rejected run(s) {runs} of {live.ref}: {changed}]"
        result.status, result.reason = status, reason
        if not result.heldout and status != "promoted":
            result.heldout = self._stored_heldout(live)
        assert result.run_id is not None
        self.store.update_training_run(result.run_id, status=status, reason=reason)
        return result

    def _stored_heldout(self, version: ModelVersion) -> dict[str, Any]:
        """The last recorded held-out evaluation of `version` (what "live after" scores, without
        evaluating again), or {}."""
        key = self._eval_key(self.heldout_tasks())
        for past in reversed(self.store.eval_runs(self.model, version=version.ref, split=HELDOUT)):
            if past.metrics.get("eval_key") == key:
                return dict(past.metrics)
        return {}

    def _record(self, method: Any, data: DataConfig, adapted: dict[str, Any] | None) -> dict[str, Any]:
        config = getattr(method, "config", None)
        return json.loads(
            json.dumps(
                {
                    "method": config() if callable(config) else {"name": method.name},
                    "data": data.record(),
                    "gate": asdict(self.gate),
                    "seed": self.seed,
                    "start": self.start,
                    "adapted": adapted,
                    "eval_key": self._eval_key(self.heldout_tasks()),  # how the gate measures
                },
                default=str,
            )
        )

    def _timed(self, result: CycleResult, phase: str) -> Any:
        return _Phase(self, result, phase)

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
        """What an evaluation measured: each task's request and what judges it, the sampling, each
        verifier's name, version and settings (`ReferenceMatch("exact")` and `("contains")` are both
        `reference@1`), and which verifiers count (the trust policy when it was measured): a stored
        score is reused only under the same key."""
        content = sorted(([t.id, t.prompt, t.honed_metadata()] for t in tasks), key=lambda c: c[0])
        names = [_verifier_fingerprint(v) for v in self.verifiers]
        watched = [_verifier_fingerprint(v) for v in self.watched]
        names.append(sorted(self.store.untrusted_verifiers()))
        # How a version is run, too: a score under max_tokens=4 is no baseline for max_tokens=48.
        setup = [_fingerprint(self.chat_model), _fingerprint(self.agent)]
        raw = json.dumps(
            [
                content,
                self.gate.samples,
                self.gate.temperature,
                names,
                *([watched] if watched else []),
                setup,
            ],
            sort_keys=True,
            default=repr,
        )
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _verifier_fingerprint(verifier: Any) -> Any:
    """A verifier's name, version, class and public settings (callables by their code)."""
    settings = {
        key: _fingerprint(value)
        if callable(value)
        else repr(sorted(value) if isinstance(value, (set, frozenset)) else value)
        for key, value in sorted(vars(verifier).items() if hasattr(verifier, "__dict__") else ())
        if not key.startswith("_")
    }
    kind = type(verifier)
    return [
        getattr(verifier, "name", str(verifier)),
        str(getattr(verifier, "version", "")),
        kind.__module__,
        kind.__qualname__,
        settings,
    ]


def _fingerprint(factory: Any, depth: int = 0) -> Any:
    """What a factory is, as far as it can be told: its code, the values it closes over (the
    settings of `local_chat_model(max_tokens=48)`) and the module globals it reads (a `TOOLS`
    list, a `SYSTEM_PROMPT` edited between runs), or a partial's function and arguments. Objects
    are told by their type and attributes, never by a default repr (it holds an address that
    differs in every process, and the stored score was never reused across restarts)."""
    if depth > 3:
        return _shape(factory)
    if isinstance(factory, functools.partial):
        return [
            _fingerprint(factory.func, depth + 1),
            _value(list(factory.args), depth + 1),
            _value(dict(factory.keywords), depth + 1),
        ]
    code = getattr(factory, "__code__", None)
    if code is None:
        return _value(factory, depth)
    cells = []
    for cell in getattr(factory, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            value = None
        cells.append(_value(value, depth + 1))
    scope = getattr(factory, "__globals__", None) or {}
    read = {name: _value(scope[name], depth + 1) for name in sorted(_names(code)) if name in scope}
    return [factory.__module__, factory.__qualname__, _code(code), cells, read]


def _code(code: Any) -> Any:
    """A code object by its content: its bytecode and constants, the code objects among them by
    theirs (their repr holds an address), sets sorted (their order is the hash seed's)."""

    def const(value: Any) -> Any:
        if hasattr(value, "co_code"):
            return _code(value)
        if isinstance(value, frozenset | set):
            return sorted(repr(item) for item in value)
        if isinstance(value, tuple):
            return [const(item) for item in value]
        return repr(value)

    return [code.co_name, code.co_code.hex(), [const(c) for c in code.co_consts]]


def _names(code: Any) -> set[str]:
    """The global names a function's code (and the functions and lambdas inside it) reads."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _names(const)
    return names


_PLAIN = (str, int, float, bool, type(None), bytes)


def _value(value: Any, depth: int) -> Any:
    """A value as the fingerprint holds it: plain values as they are, containers item by item,
    functions by `_fingerprint`, modules and classes by name, other objects by type and
    attributes (at most 4 levels down, 64 items a container)."""
    if isinstance(value, _PLAIN):
        return repr(value)
    if depth > 3:
        return _shape(value)
    if isinstance(value, types.ModuleType):
        return f"module {value.__name__}"
    if isinstance(value, type):
        return f"class {value.__module__}.{value.__qualname__}"
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=repr) if isinstance(value, set | frozenset) else list(value)
        return [_value(item, depth + 1) for item in items[:64]]
    if isinstance(value, dict):
        return [[repr(k), _value(v, depth + 1)] for k, v in list(value.items())[:64]]
    if (callable(value) and hasattr(value, "__code__")) or isinstance(value, functools.partial):
        return _fingerprint(value, depth + 1)
    if isinstance(getattr(value, "safe_url", None), str):  # a store: which one, not its pools
        return f"store {value.safe_url}"
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict):  # settings are public; `_` attributes are caches and state
        public = {k: v for k, v in attributes.items() if not str(k).startswith("_")}
        return [_shape(value), _value(public, depth + 1)]
    text = repr(value)
    return _shape(value) if " at 0x" in text else text


def _shape(value: Any) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _tokenizer(path: str) -> Any:
    """The tokenizer of the weights a cycle trains: recorded token ids are used only where it
    made them (a lineage that changed base must not train on its ancestors' ids). None where
    it cannot be loaded (a hub id offline): then only their range is checked."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except Exception:
        log.warning("honed: could not load the tokenizer of %s to check recorded token ids", path)
        return None


def _rows_fingerprint(dataset: Any) -> str:
    """A hash of the training rows, whatever their order: what decides the candidate, with the
    method's configuration and the weights it starts from."""
    import hashlib

    from honed._json import dumps

    rows = sorted(hashlib.sha256(dumps(row).encode()).digest() for row in dataset)
    return hashlib.sha256(b"".join(rows)).hexdigest()


def _unmeasured(live: Scores, candidate: Scores) -> str:
    """Why the gate cannot compare these two rounds, or ""."""
    if any(not x.trajectories and x.unjudged for x in (live, candidate)):
        return (
            "NOT MEASURED: none of a round's attempts reached the store: the agent factory must capture "
            "into the cycle's store (`honed.Middleware(store=store)` in its middleware, or "
            "`honed.instrument(store=...)`): fix it and run again"
        )
    said = []
    if not live.measured:
        said.append(
            f"the live version's round had {live.errors} attempts that failed to run and {live.unjudged} "
            "no trusted verifier judged"
        )
    if candidate.unjudged:
        said.append(f"the candidate's round had {candidate.unjudged} attempts no trusted verifier judged")
    if not said:
        return ""
    return f"NOT MEASURED: {'; '.join(said)} (scored as fails, they measure the setup): fix it and run again"


def tasks_from_store(store: Any, split: str, *, agent: str | None = None) -> list[Task]:
    """Every distinct task of `split` in the store, rebuilt from its attempt stored first
    (`store.first_stored`): the user's request and the metadata its verifiers read. By when the
    database stored it, not when the run says it started: a run the agent's process inserted
    dated 2000-01-01 redefined a held-out task, its prompt and expected answer, and the gate
    promoted a worse model (a QA pass, session 27). Later attempts that ask otherwise are logged."""
    first = store.first_stored(split=split, agent=agent)
    chosen = set(first.values())
    tasks: dict[str, Task] = {}
    others: dict[str, list[Task]] = defaultdict(list)
    for t in store.trajectories(None, split=split, agent=agent, with_steps=False, oldest_first=True):
        task = _task_of(t, split)
        if task is None or t.task_id not in first:
            continue
        if t.id in chosen:
            tasks[task.id] = task
        else:
            others[task.id].append(task)
    for task_id, tried in others.items():  # a first attempt that asked nothing: the next that did
        tasks.setdefault(task_id, tried[0])
    differing = sorted(
        task_id for task_id, tried in others.items() if any(t != tasks[task_id] for t in tried)
    )
    if differing:
        log.warning(
            "honed: %d %s task(s) have attempts that ask otherwise than the first stored, which defines "
            "them (e.g. %s): check who writes runs in that split",
            len(differing), split, ", ".join(differing[:3]),
        )  # fmt: skip
    return [task for task_id in first if (task := tasks.get(task_id)) is not None]


def _task_of(t: Trajectory, split: str) -> Task | None:
    prompt = request_text(t.task)
    if prompt is None or not t.task_id:
        return None
    meta = {k: v for k, v in (t.metadata or {}).items() if k not in _ATTEMPT_KEYS}
    return Task(id=t.task_id, prompt=prompt, split=split, metadata=meta)


_ATTEMPT_KEYS = frozenset({"task_id", "split", "round", "sample", "purpose", "evaluated"})


class _Handoff:
    """What the main process tells the other ranks, once: what to train on, or (`release` without
    a `send`) that this cycle trains nothing, so they stop waiting."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks, self.sent = ranks, False

    def send(self, job: Any) -> None:
        self.sent = True
        self.ranks.share(job)

    def release(self) -> None:
        if not self.sent:
            self.send(None)


class _Phase:
    """Times a phase into `result.durations` and shows it as a 0/1 -> 1/1 progress step."""

    def __init__(self, cycle: Cycle, result: CycleResult, name: str) -> None:
        self.cycle, self.result, self.name = cycle, result, name

    def __enter__(self) -> None:
        self.started = time.monotonic()
        self.cycle._phase(self.name, 0, 1)

    def __exit__(self, kind: Any, *_: Any) -> None:
        self.result.durations[self.name] = round(time.monotonic() - self.started, 3)
        if kind is None:
            self.cycle._phase(self.name, 1, 1)


def lineage(store: Any, version: ModelVersion) -> list[ModelVersion]:
    """`version`, the version it was trained from, and so on back to the base: newest first."""
    by_id = {v.id: v for v in store.versions(version.name)}
    chain, seen = [version], {version.id}
    while chain[-1].parent is not None and chain[-1].parent in by_id and chain[-1].parent not in seen:
        chain.append(by_id[chain[-1].parent])
        seen.add(chain[-1].id)
    return chain


def _selection_summary(data: Any, live: ModelVersion) -> tuple[dict[str, Any], list[str]]:
    """The selection's counts plus the attempt-level figures a cycle reports (the live version's
    attempts: what it did since the last cycle), and the tasks that never passed."""
    own = data.versions.get(live.ref, {})
    attempts, passes = own.get("n", 0), own.get("passed", 0)
    stuck = data.stuck or sorted(k for k, t in data.tasks.items() if not t.get("passed"))
    summary = {
        **data.counts,
        "train_pass_rate": round(passes / attempts, 4) if attempts else None,
        "trajectories": attempts,
        "versions": {v: n["n"] for v, n in data.versions.items()},
        "stuck_tasks": len(stuck),
        "learnable_tasks": sum(1 for t in data.tasks.values() if 0 < t.get("passed", 0) < t.get("n", 0)),
    }
    return summary, stuck


def _setback(run: Any) -> bool:
    """Whether a rejected run's candidate measured worse (`GateDecision.setback`); a run recorded
    before the flag existed counts as one unless its gain was positive."""
    gate = (run.metrics or {}).get("gate") or {}
    if "setback" in gate:
        return bool(gate["setback"])
    gain = gate.get("gain")
    return not (isinstance(gain, int | float) and gain > 0)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _fresh_folder(path: Path) -> Path:
    """`path`, else `path-2`, `path-3`, ...: a folder made here, that nothing else holds. Two stores
    training into one `--output-dir` both had a run 1: one store's rejected candidate was written
    over the other's live weights, which its registry still called live (a QA pass, session 19)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        folder = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"no free folder for a candidate beside {path}")
