"""Run an agent on tasks, label the attempts with verifiers, and score them: pass@1, pass@k, slices.

Everything goes through the production path: the agent is captured by `honed.Middleware` into
the store, the verifier `Worker` labels what was captured, and scores are read back from the
store. The trainers' gate, the demo and the learning benchmark all measure with this one module,
so a number in a report means the same thing everywhere.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

from honed.trajectory import Task, Trajectory, is_verifier_error, label

# An agent run that loops on tool calls is a failed attempt, not a hang: cap the graph's steps.
RECURSION_LIMIT = 16


def suite_agent(suite: Any, model: Any, *, store: Any, name: str | None = None) -> Any:
    """The suite's agent: `create_agent` with its tools and system prompt, captured into `store`."""
    from langchain.agents import create_agent

    from honed.capture.middleware import Middleware

    return create_agent(
        model,
        list(suite.tools),
        system_prompt=suite.system_prompt,
        middleware=[Middleware(store=store)],
        name=name or suite.name,
    )


def attempt(
    agent: Any,
    tasks: Sequence[Task],
    *,
    samples: int = 1,
    concurrency: int = 64,
    metadata: dict[str, Any] | None = None,
    on_done: Callable[[int], None] | None = None,
) -> str:
    """Run `agent` `samples` times on every task, concurrently; returns the round's tag.

    Each attempt's `metadata["honed"]` holds the task's metadata plus `round` (the returned tag)
    and `sample`, so the round's trajectories can be found in the store. Agent errors are
    attempts too (captured as failed runs), never exceptions here.
    """
    round_tag = uuid.uuid4().hex[:12]
    jobs = [(task, s) for task in tasks for s in range(samples)]
    extra = dict(metadata or {})
    for start in range(0, len(jobs), max(1, concurrency)):
        chunk = jobs[start : start + concurrency]
        agent.batch(
            [{"messages": [{"role": "user", "content": task.prompt}]} for task, _ in chunk],
            config=[
                {
                    "metadata": {"honed": task.honed_metadata(**extra, round=round_tag, sample=s)},
                    "recursion_limit": RECURSION_LIMIT,
                }
                for task, s in chunk
            ],
            return_exceptions=True,
            max_concurrency=concurrency,
        )
        if on_done:
            on_done(len(chunk))
    return round_tag


def round_trajectories(store: Any, round_tag: str, *, since: datetime | None = None) -> list[Trajectory]:
    """The trajectories captured for one `attempt` round (oldest first)."""
    found = store.trajectories(None, since=since, oldest_first=True)
    return [t for t in found if (t.metadata or {}).get("round") == round_tag]


NOTHING_CAPTURED_S = 30.0  # flushed, and not one attempt of the round in the store: stop waiting


def verify_round(
    store: Any,
    verifiers: Iterable[Any],
    round_tag: str,
    *,
    expected: int,
    since: datetime | None = None,
    concurrency: int = 2,
    timeout_s: float = 600.0,
    work: bool = True,
) -> list[Trajectory]:
    """Label the round with `verifiers` and return its trajectories once all `expected` of them
    carry those verifiers' verdicts (or errors). `work=False` leaves the labelling to a background
    worker on the same verifiers and only waits."""
    from honed.capture.instrument import flush
    from honed.verifiers.worker import Worker

    verifiers = list(verifiers)
    flush()
    started = time.monotonic()
    deadline = started + timeout_s
    # The round's own attempts only: other runs in the store are not the gate's to label.
    worker = Worker(store, verifiers, concurrency=concurrency, backoff_s=0.2, max_backoff_s=2.0, only=())
    with worker:
        while True:
            found = round_trajectories(store, round_tag, since=since)
            todo = [t.id for t in found if not _settled(t, verifiers)]
            if work and todo:
                worker.only = todo
                worker.run_once()
                found = round_trajectories(store, round_tag, since=since)
            if len(found) >= expected and all(_settled(t, verifiers) for t in found):
                return found
            if time.monotonic() > deadline:
                return found
            if not found and time.monotonic() - started > NOTHING_CAPTURED_S:
                # The attempts ran here and were flushed: none in the store means the agent does
                # not capture into it (no `honed.Middleware`, or another store). Waiting the whole
                # timeout held the trainer's lock 10 minutes a round for nothing.
                return found
            flush()
            time.sleep(0.2)


def _settled(t: Trajectory, verifiers: list[Any]) -> bool:
    """Every applicable verifier of ours has written a verdict (or an error) for `t`."""
    from honed.verifiers.protocol import verifier_key
    from honed.verifiers.routing import applicable

    have = {(v.verifier, v.version) for v in t.verdicts}
    return all(verifier_key(v) in have for v in applicable(verifiers, t))


@dataclass
class Scores:
    """What one evaluation round measured; `per_task` maps task id -> outcome of each sample."""

    per_task: dict[str, list[bool | None]] = field(default_factory=dict)
    slices: dict[str, str] = field(default_factory=dict)
    diversity: dict[str, float] = field(default_factory=dict)
    trajectories: int = 0
    round: str = ""
    # Each verifier's pass rate over the round's attempts, the watched ones' too (`honed.learn.watch`).
    by_verifier: dict[str, float] = field(default_factory=dict)
    # Attempts whose model call raised (a model or backend that failed, not the agent's own tool
    # errors or step limit): a round with any says more about the setup than about the version.
    errors: int = 0
    # Attempts no scoring verifier judged (it raised, timed out, or the attempt never arrived):
    # scored as fails, they say nothing about the version either.
    unjudged: int = 0

    @property
    def measured(self) -> bool:
        """Every attempt ran and was judged: the score is the version's, not the setup's."""
        return self.errors == 0 and self.unjudged == 0

    @property
    def samples(self) -> int:
        return max((len(v) for v in self.per_task.values()), default=0)

    @property
    def pass_at_1(self) -> float:
        """Mean over tasks of the fraction of samples that passed (a sampled pass@1)."""
        return pass_at_k(self.per_task, 1)

    def pass_at(self, k: int) -> float:
        return pass_at_k(self.per_task, k)

    def slice_of(self, task_id: str) -> str:
        """The slice a task is scored in ("all" for an untagged task)."""
        return self.slices.get(task_id) or "all"

    def per_slice(self) -> dict[str, float]:
        groups: dict[str, dict[str, list[bool | None]]] = defaultdict(dict)
        for task_id, results in self.per_task.items():
            groups[self.slice_of(task_id)][task_id] = results
        return {name: pass_at_k(results, 1) for name, results in sorted(groups.items())}

    def task_rates(self) -> dict[str, float]:
        return {t: sum(bool(r) for r in rs) / len(rs) for t, rs in self.per_task.items() if rs}

    def records(self) -> dict[str, Any]:
        """What `from_metrics` needs besides `to_dict`: every sample's result per task, the slices."""
        per_task = {t: [1 if r else 0 for r in rs] for t, rs in self.per_task.items()}
        return {"per_task": per_task, "task_slices": dict(self.slices)}

    @staticmethod
    def measured_in(metrics: dict[str, Any]) -> bool:
        """Whether a stored evaluation is a score: attempts were stored, each ran and was judged. A
        round that measured nothing (its attempts went to another store) read as 0.0% in `honed
        status` and the report (a QA pass, session 19)."""
        return (
            int(metrics.get("trajectories", 1)) > 0
            and not metrics.get("errors")
            and not metrics.get("unjudged")
        )

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any]) -> Scores:
        """Scores from a stored evaluation's metrics (`to_dict() | records()`)."""
        return cls(
            per_task={t: [bool(r) for r in rs] for t, rs in metrics["per_task"].items()},
            slices=dict(metrics.get("task_slices") or {}),
            diversity=dict(metrics.get("diversity") or {}),
            trajectories=int(metrics.get("trajectories", 0)),
            round=str(metrics.get("round", "")),
            by_verifier=dict(metrics.get("by_verifier") or {}),
            errors=int(metrics.get("errors", 0)),
            unjudged=int(metrics.get("unjudged", 0)),
        )

    def to_dict(self) -> dict[str, Any]:
        k = self.samples
        return {
            "pass_at_1": round(self.pass_at_1, 4),
            f"pass_at_{k}": round(self.pass_at(k), 4) if k else 0.0,
            "samples": k,
            "tasks": len(self.per_task),
            "trajectories": self.trajectories,
            "slices": {s: round(v, 4) for s, v in self.per_slice().items()},
            "diversity": self.diversity,
            "round": self.round,
            "by_verifier": self.by_verifier,
            "errors": self.errors,
            "unjudged": self.unjudged,
        }


def pass_at_k(per_task: dict[str, list[bool | None]], k: int) -> float:
    """The unbiased pass@k estimator (Chen et al. 2021) averaged over tasks; undecided = failed."""
    if not per_task:
        return 0.0
    total = 0.0
    for results in per_task.values():
        n, c = len(results), sum(bool(r) for r in results)
        if n == 0:
            continue
        k_ = min(k, n)
        total += 1.0 if n - c < k_ else 1.0 - math.comb(n - c, k_) / math.comb(n, k_)
    return total / len(per_task)


def score(
    trajectories: Sequence[Trajectory],
    tasks: Sequence[Task],
    *,
    samples: int,
    untrusted: Iterable[str] = (),
    verifiers: Iterable[str] | None = None,
    round_tag: str = "",
) -> Scores:
    """Score a labelled round: every task gets `samples` outcomes (a missing attempt is a failure).

    `verifiers` (names) limits the judgement to those verifiers' verdicts: other workers may label
    the same trajectories with other verifiers, and a score must mean one thing.
    """
    skip = set(untrusted)
    only = None if verifiers is None else set(verifiers)
    per_task: dict[str, list[bool | None]] = {t.id: [] for t in tasks}
    unjudged = 0
    for t in trajectories:
        if t.task_id in per_task:
            verdicts = t.verdicts if only is None else [v for v in t.verdicts if v.verifier in only]
            per_task[t.task_id].append(label(verdicts, untrusted=skip))
            if not any(not is_verifier_error(v) and v.verifier not in skip for v in verdicts):
                # every scoring verifier raised, none got to it, or only untrusted ones did (their
                # passes count for nothing: every attempt would score a fail, a QA pass, session 20)
                unjudged += 1
    for results in per_task.values():
        unjudged += max(0, samples - len(results))  # an attempt that never arrived
        results.extend([False] * max(0, samples - len(results)))
    return Scores(
        per_task=per_task,
        slices={t.id: t.slice for t in tasks if t.slice},
        diversity=diversity(trajectories),
        trajectories=len(trajectories),
        round=round_tag,
        by_verifier=pass_rates(trajectories),
        errors=sum(1 for t in trajectories if t.task_id in per_task and _failed_to_run(t)),
        unjudged=unjudged,
    )


def _failed_to_run(t: Trajectory) -> bool:
    """An attempt whose model call raised: the setup failed, whatever the version would do."""
    return t.status == "error" and any(s.kind == "model" and s.error for s in t.steps)


def pass_rates(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Each verifier's passes over the attempts it judged."""
    judged: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for t in trajectories:
        for v in t.verdicts:
            if v.passed is not None:
                judged[v.verifier][0] += bool(v.passed)
                judged[v.verifier][1] += 1
    return {name: round(p / n, 4) for name, (p, n) in sorted(judged.items())}


def evaluate(
    store: Any,
    agent: Any,
    tasks: Sequence[Task],
    verifiers: Iterable[Any],
    *,
    samples: int = 1,
    concurrency: int = 64,
    metadata: dict[str, Any] | None = None,
    on_done: Callable[[int], None] | None = None,
    watched: Iterable[Any] = (),
) -> Scores:
    """Attempt every task `samples` times with `agent`, label the attempts, score them with
    `verifiers`. `watched` verifiers label the same attempts too (their pass rates land in
    `Scores.by_verifier`) without counting for the score: the reward-hacking watch."""
    from honed.verifiers.protocol import verifier_name

    verifiers = list(verifiers)
    since = datetime.now(UTC) - timedelta(seconds=5)
    tag = attempt(agent, tasks, samples=samples, concurrency=concurrency, metadata=metadata, on_done=on_done)
    found = verify_round(store, [*verifiers, *watched], tag, expected=len(tasks) * samples, since=since)
    untrusted = store.untrusted_verifiers() if hasattr(store, "untrusted_verifiers") else ()
    names = [verifier_name(v) for v in verifiers]
    return score(found, tasks, samples=samples, untrusted=untrusted, verifiers=names, round_tag=tag)


def diversity(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Collapse signals, measured across tasks so that a model that gets *better* does not look
    collapsed (the right answers to different tasks differ; 8 samples of one task should agree):

    - `distinct_answers`: distinct final answers among different tasks, per sample index;
    - `distinct_tool_calls`: distinct tool-call sequences (names and arguments) likewise;
    - `distinct_1`/`distinct_2` over all answers' words, `distinct_tool_sequences` (tool names
      only) and `mean_length`: recorded for the report; they also fall as answers become templated.

    A model trained on its own unverified output ends up saying the same thing whatever it is asked.
    """
    if not trajectories:
        return {}
    by_sample: dict[Any, list[Trajectory]] = defaultdict(list)
    for t in trajectories:
        by_sample[(t.metadata or {}).get("sample", 0)].append(t)

    def across_tasks(key: Callable[[Trajectory], Any]) -> float:
        ratios = [len({key(t) for t in group}) / len(group) for group in by_sample.values()]
        return round(sum(ratios) / len(ratios), 4)

    answers = [t.answer or "" for t in trajectories]
    tokens = [a.split() for a in answers]
    unigrams = Counter(w for ws in tokens for w in ws)
    bigrams = Counter(pair for ws in tokens for pair in pairwise(ws))
    n_uni, n_bi = sum(unigrams.values()), sum(bigrams.values())
    plans = {tuple(s.name for s in t.tool_steps()) for t in trajectories}
    return {
        "distinct_answers": across_tasks(lambda t: (t.answer or "").strip()),
        "distinct_tool_calls": across_tasks(lambda t: tuple((s.name, repr(s.input)) for s in t.tool_steps())),
        "distinct_1": round(len(unigrams) / n_uni, 4) if n_uni else 0.0,
        "distinct_2": round(len(bigrams) / n_bi, 4) if n_bi else 0.0,
        "distinct_tool_sequences": round(len(plans) / len(trajectories), 4),
        "mean_length": round(sum(map(len, answers)) / len(answers), 2),
    }
