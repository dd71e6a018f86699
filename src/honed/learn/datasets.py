"""Trajectories → TRL datasets: which trajectories a trainer may learn from, and in what format.

`prepare(store, method)` selects trajectories, labels each with its *trusted* outcome (verifiers
under their audited precision and verifier errors count for nothing), leaves held-out tasks out
(and refuses explicit requests for them), deduplicates, caps attempts per task, mixes in external
data, and builds the dataset in the format of the method's TRL trainer:

    sft, distill  `messages`, `tools`                 (or `input_ids`, `completion_mask`: see below)
    kto           `prompt`, `completion`, `label`, `tools`
    dpo           `prompt`, `chosen`, `rejected`, `tools`
    grpo          `prompt`, `task_id`, `metadata`, `split`, `weight` (rows repeated by curriculum)
    offpolicy     `input_ids`, `completion_mask`, `logprobs`, `advantage` (one row per model call)

SFT rows use the token ids recorded at generation when every model step carries them, so the
model learns exactly what it sampled, with no retokenisation drift; otherwise TRL renders the
conversations with the model's own chat template. One dataset never mixes the two.

Off-policy rows are always the recorded ids, with the log-probability each sampled token had
when it was generated (`logprobs`, 0 on prompt tokens) and the attempt's advantage: 1 for a pass
(a verified pass is right whatever its group did, as rejection sampling keeps it), minus the
group's pass rate for a failure (pushed down as hard as the task is shown to be within reach); a
task never passed says nothing about which tokens were wrong and is dropped (`unpassed_groups`).
"""

from __future__ import annotations

import functools
import json
import random
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from honed.exporters.datasets import dataset_features
from honed.messages import (
    MessageError,
    NotExportable,
    chat_example,
    openai_messages,
    own_model_steps,
    split_at_last_user,
)
from honed.store import TrajectoryNotFound
from honed.store.select import HeldOut, HeldOutLeak, request_key, requests_of, same_split
from honed.tokenizer_id import tokenizer_id
from honed.trajectory import HELDOUT, INTERRUPTED, Task, Trajectory, call_changed_before_running, label

if TYPE_CHECKING:
    import datasets

    from honed.store import TrajectoryStore

METHODS = ("sft", "kto", "dpo", "grpo", "distill", "offpolicy")
# Methods whose rows an external example can be: DPO needs a paired failure, GRPO a live rollout.
EXTERNAL_METHODS = ("sft", "distill", "kto")
PAGE_SIZE = 500
CURRICULUM_FLOOR = 0.05  # weight a solved or stuck task keeps, as a fraction of the most informative's
CURRICULUM_MAX_REPEATS = 4  # GRPO rows of the most informative task; the least informative get one
_UNKNOWN_RATE = 0.5  # a task with no trusted verdict yet is treated as the most informative

_dumps = json.JSONEncoder(ensure_ascii=False, sort_keys=True).encode


@dataclass
class TrainingData:
    """A dataset for one method, and where it came from.

    `trajectory_ids` is the lineage (every trajectory that produced a row), recorded with the
    training run. `counts` says what the selection kept and dropped (selected, passed, failed,
    unlabeled, heldout_excluded, duplicates, contradictory (one attempt judged both ways: left
    out of labelled methods), capped, skipped, external, rows, pretokenized, missing_token_ids,
    weighted_up). `tasks` is per task `{"n", "passed", "failed"}` over the
    selection, `versions` the same per model version;
    `weights` and `stuck` are the curriculum (GRPO fills them).
    """

    dataset: datasets.Dataset
    method: str
    trajectory_ids: list[str]
    counts: dict[str, int]
    tasks: dict[str, dict[str, int]] = field(default_factory=dict)
    versions: dict[str, dict[str, int]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    stuck: list[str] = field(default_factory=list)
    # Whether each verifier the store has a policy for may label training data (`VerifierPolicy.usable`):
    # what a method that scores with verifiers itself (GRPO's reward) must honour too.
    usable_verifiers: dict[str, bool] = field(default_factory=dict)

    @property
    def pretokenized(self) -> bool:
        """Rows are the recorded token ids (`input_ids`, `completion_mask`), not conversations."""
        return bool(self.counts.get("pretokenized"))

    def __len__(self) -> int:
        return len(self.dataset)


def build_dataset(store: TrajectoryStore, method: str, **filters: Any) -> datasets.Dataset:
    """The dataset `prepare` builds, without the bookkeeping: `build_dataset(store, "sft")`."""
    return prepare(store, method, **filters).dataset


def prepare(
    store: TrajectoryStore,
    method: str,
    *,
    agent: str | None = None,
    model_version: str | Sequence[str] | None = None,
    since: datetime | None = None,
    ids: Iterable[str] | None = None,
    task_ids: Iterable[str] | None = None,
    split: str | None = None,
    heldout_split: str = HELDOUT,
    heldout_fraction: float = 0.0,
    max_per_task: int | None = 8,
    external: datasets.Dataset | Sequence[Mapping[str, Any]] | None = None,
    external_ratio: float = 0.0,
    external_for: str = "all",
    verified: bool = True,
    seed: int = 0,
    tokenizer: Any = None,
    limit: int | None = None,
    untrusted: Iterable[str] | None = None,
    verifiers: Iterable[str] | None = None,
    pretokenized: bool | None = None,
    newest_weight: int = 1,
    heldout_tasks: Iterable[str | Task] = (),
) -> TrainingData:
    """Select trajectories from `store` and build `method`'s TRL dataset (see the module docstring).

    Filters: `agent`, `model_version` (one version, or several: a lineage, newest first), `since`,
    `split`, `task_ids`, `ids` (exactly these trajectories), `limit` (the newest that many). With
    several versions, the per-task cap keeps the newest versions' attempts first, and
    `newest_weight` repeats the first version's rows that many times (SFT, distill). Held-out tasks are left out: split equal to
    `heldout_split`, any task that has a trajectory in that split, or a task (every run of it) whose
    stable hash falls under `heldout_fraction`, and `heldout_tasks` (a gate's tasks or their ids,
    whether or not the store has seen them held out yet); so is any run or external row whose
    user request is a held-out task's (`honed.store.select.request_key`: the same question under
    another task id, or none). Asking for one by split, id or task raises `HeldOutLeak`. `verified=False` trains on every attempt regardless of verdicts (SFT, KTO).
    `external` chat examples `{"messages", "tools"}` make up `external_ratio` of the rows (SFT,
    distill, KTO as desirable; 1.0: external rows only, each once, e.g. a warm start).
    `external_for="stuck"` targets them instead: only external rows whose `task_id` is a task the
    selection attempted and never passed are used, each once (`external_ratio` is then ignored);
    `external_stuck_tasks` counts the tasks they are for.
    `verifiers` names the only verifiers whose verdicts label (default: every trusted one).
    `pretokenized`: None uses recorded token ids when every selected trajectory has them, False
    never, True requires them. `tokenizer`, when given, must cover the recorded ids (ids from
    another vocabulary fall back to conversations).
    """
    method = _check_method(method)
    if not 0.0 <= external_ratio <= 1.0:
        raise ValueError(f"external_ratio is a fraction of the rows, in [0, 1], not {external_ratio}")
    if external_for not in ("all", "stuck"):
        raise ValueError(f"external_for is 'all' or 'stuck', not {external_for!r}")
    targeted = external_for == "stuck" and bool(external)
    if (external_ratio > 0 or targeted) and method not in EXTERNAL_METHODS:
        raise ValueError(f"external data mixes into {', '.join(EXTERNAL_METHODS)}, not {method}")
    if method in ("dpo", "offpolicy") and not verified:
        raise ValueError(
            f"{method} learns from verified passes against verified failures: it needs verified=True"
        )
    if split is not None and same_split(split, heldout_split):
        raise HeldOutLeak(f"split={split!r} asks for the held-out split")
    if untrusted is None:
        usable = {p.verifier: p.usable for p in store.verifier_policies()}
    else:
        usable = dict.fromkeys(untrusted, False)
    untrusted_names = {name for name, ok in usable.items() if not ok}
    given = list(heldout_tasks or ())
    named = {t.id if isinstance(t, Task) else str(t) for t in given}
    heldout = HeldOut.of(store, split=heldout_split, fraction=heldout_fraction, task_ids=named)
    asked = {request_key(t.prompt) for t in given if isinstance(t, Task)} - {None}
    if asked:
        heldout = replace(heldout, requests=heldout.requests | asked)
    counts: Counter[str] = Counter()
    labeled_only = verified and method != "grpo"
    selected = _select(
        store, heldout, counts, agent=agent, model_version=model_version, since=since, ids=ids,
        task_ids=task_ids, split=split, limit=limit, labeled_only=labeled_only,
    )  # fmt: skip
    # A run whose tool call a person (or a middleware) changed before it ran passed on their
    # call, not the model's: trained on, the model learned the very call the reviewer fixed.
    edited = [t for t in selected if call_changed_before_running(t)]
    if edited:
        counts["calls_changed_before_running"] = len(edited)
        selected = [t for t in selected if not call_changed_before_running(t)]
    only = None if verifiers is None else set(verifiers)
    labels = {t.id: label(t.verdicts, untrusted=untrusted_names, only=only) for t in selected}
    counts["selected"] = len(selected)
    counts["passed"] = sum(1 for v in labels.values() if v is True)
    counts["failed"] = sum(1 for v in labels.values() if v is False)
    counts["unlabeled"] = sum(1 for v in labels.values() if v is None)
    tasks = _task_summary(selected, labels)

    ext = _external_examples(external, heldout, counts) if external is not None else []
    ratio: float | None = external_ratio
    if external_for == "stuck":
        stuck = {task for task, n in tasks.items() if not n["passed"] and n["failed"]}
        ext = [ex for ex in ext if ex["task_id"] in stuck]
        counts["external_stuck_tasks"] = len({ex["task_id"] for ex in ext})
        ratio = None  # each targeted row once
    versions = [model_version] if isinstance(model_version, str) else list(model_version or ())
    build = _Build(method, counts, seed, max_per_task, rank={v: i for i, v in enumerate(versions)})
    if method in ("sft", "distill"):
        keep = [t for t in selected if labels[t.id] is True or not verified]
        data = build.sft(keep, ext, ratio, tokenizer, pretokenized)
        if newest_weight > 1 and versions:
            newest = {t.id for t in keep if t.model_version == versions[0]}
            data = build.weigh(data, newest, newest_weight)
    elif method == "kto":
        keep = [t for t in selected if labels[t.id] is not None or not verified]
        desirable = {t.id: labels[t.id] is not False or not verified for t in keep}
        data = build.kto(keep, desirable, ext, ratio)
    elif method == "dpo":
        data = build.dpo(selected, labels)
    elif method == "offpolicy":
        data = build.offpolicy(selected, labels, tokenizer)
    else:
        data = build.grpo(selected, labels)
    data.tasks = tasks
    data.usable_verifiers = usable
    data.versions = _version_summary(selected, labels)
    data.counts = {**dict.fromkeys(_COUNT_KEYS, 0), **counts, "rows": len(data.dataset)}
    return data


# -- curriculum --------------------------------------------------------------------------------


def task_pass_rates(
    store: TrajectoryStore,
    *,
    agent: str | None = None,
    model_version: str | None = None,
    since: datetime | None = None,
    heldout_split: str = HELDOUT,
    heldout_fraction: float = 0.0,
    untrusted: Iterable[str] | None = None,
    verifiers: Iterable[str] | None = None,
) -> dict[str, tuple[int, int]]:
    """`{task_id: (passes, attempts)}` over training tasks, counting attempts with a trusted label
    (with a verdict key, read with their steps: a verdict counts only while its run is as judged)."""
    untrusted_names = set(store.untrusted_verifiers() if untrusted is None else untrusted)
    heldout = HeldOut.of(store, split=heldout_split, fraction=heldout_fraction)
    only = None if verifiers is None else set(verifiers)
    rates: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    filters = {"agent": agent, "model_version": model_version, "since": since, "verdict": "labeled"}
    for t in _pages(store, None, with_steps=store.signer is not None, **filters):
        if t.task_id is None or heldout.holds(t):
            continue
        passed = label(t.verdicts, untrusted=untrusted_names, only=only)
        if passed is not None:
            rates[t.task_id][0] += int(passed)
            rates[t.task_id][1] += 1
    return {task: (p, n) for task, (p, n) in sorted(rates.items())}


def curriculum_weights(
    rates: Mapping[str, tuple[int, int]], *, floor: float = CURRICULUM_FLOOR
) -> tuple[dict[str, float], list[str]]:
    """Weights (summing to 1) that favour tasks the model sometimes solves: `p(1-p)`, the reward
    variance a GRPO group can learn from, with `floor` of the top weight for solved tasks (little
    left to learn) and never-solved ones. Those are returned as `stuck`: reward-driven training
    cannot reach them, they need outside data (demonstrations, a teacher)."""
    raw: dict[str, float] = {}
    stuck = []
    for task, (passes, attempts) in rates.items():
        p = passes / attempts if attempts else _UNKNOWN_RATE
        if attempts and passes == 0:
            stuck.append(task)
        raw[task] = max(p * (1.0 - p), floor * 0.25)
    total = sum(raw.values())
    weights = {task: w / total for task, w in raw.items()} if total else {}
    return weights, sorted(stuck)


# -- selection ---------------------------------------------------------------------------------

_COUNT_KEYS = (
    "selected", "passed", "failed", "unlabeled", "heldout_excluded", "duplicates", "contradictory",
    "capped", "skipped", "external", "rows", "pretokenized", "missing_token_ids", "weighted_up",
)  # fmt: skip


def _select(
    store: TrajectoryStore,
    heldout: HeldOut,
    counts: Counter[str],
    *,
    agent: str | None,
    model_version: str | Sequence[str] | None,
    since: datetime | None,
    ids: Iterable[str] | None,
    task_ids: Iterable[str] | None,
    split: str | None,
    limit: int | None,
    labeled_only: bool,
) -> list[Trajectory]:
    if ids is not None:
        chosen = _explicit(store, list(dict.fromkeys(ids)), heldout)
        keep = [
            t
            for t in chosen
            if (agent is None or t.agent == agent)
            and (model_version is None or t.model_version in _as_list(model_version))
            and (since is None or (t.started_at is not None and t.started_at >= since))
            and (split is None or t.split == split)
        ]
        return sorted(keep, key=_age)
    wanted: list[str | None] = [None]
    if task_ids is not None:
        wanted = list(dict.fromkeys(str(t) for t in task_ids))
        leaked = [t for t in wanted if heldout.holds({"task_id": t})]
        if leaked:
            raise HeldOutLeak("task_ids name held-out tasks", leaked)
    filters = {
        "agent": agent,
        "model_version": model_version,
        "since": since,
        "split": split,
        "verdict": "labeled" if labeled_only else None,
        "finished": True,  # a run paused at an interrupt is no outcome to learn from
    }
    found: dict[str, Trajectory] = {}
    excluded: set[str] = set()
    for task_id in wanted:
        for t in _pages(store, limit, task_id=task_id, **filters):
            if heldout.holds(t):
                counts["heldout_excluded"] += 1
                excluded |= requests_of(t, sentences=False)
            else:
                found[t.id] = t
    # A task held out by its id alone (a hash, a gate's task run in the train split) holds its
    # request too: the same request under another task id is left out as well.
    leaked = [i for i, t in found.items() if not excluded.isdisjoint(requests_of(t))]
    for i in leaked:
        del found[i]
    counts["heldout_excluded"] += len(leaked)
    return sorted(found.values(), key=_age)


def _explicit(store: TrajectoryStore, ids: list[str], heldout: HeldOut) -> list[Trajectory]:
    chosen: list[Trajectory] = []
    for start in range(0, len(ids), PAGE_SIZE):
        chosen.extend(store.trajectories(limit=None, ids=ids[start : start + PAGE_SIZE]))
    missing = set(ids) - {t.id for t in chosen}
    if missing:
        raise TrajectoryNotFound(f"no trajectory with id {', '.join(sorted(missing)[:5])}")
    leaked = [t for t in chosen if heldout.holds(t)]
    if leaked:
        raise HeldOutLeak(
            f"{len(leaked)} of the requested trajectories are held out", [t.task_id for t in leaked]
        )
    paused = [t.id for t in chosen if t.status == INTERRUPTED]
    if paused:
        raise ValueError(
            f"{len(paused)} of the requested trajectories are paused at an interrupt, not finished: "
            f"no outcome to learn from ({', '.join(paused[:5])})"
        )
    return chosen


def _pages(store: TrajectoryStore, limit: int | None, **filters: Any) -> Iterator[Trajectory]:
    """Oldest first in pages (stable while new captures arrive); with a `limit`, the newest."""
    read, last = 0, None
    while limit is None or read < limit:
        size = PAGE_SIZE if limit is None else min(PAGE_SIZE, limit - read)
        page = store.trajectories(limit=size, after=last, oldest_first=limit is None, **filters)
        yield from page
        read += len(page)
        last = page[-1] if page else last
        if len(page) < size:
            return


def _age(t: Trajectory) -> tuple[str, str]:
    return (t.started_at.isoformat() if t.started_at else "", t.id)


def _version_summary(selected: list[Trajectory], labels: dict[str, bool | None]) -> dict[str, dict[str, int]]:
    """Per model version `{"n", "passed", "failed"}` over the selection (a lineage has several)."""
    versions: dict[str, dict[str, int]] = {}
    for t in selected:
        entry = versions.setdefault(t.model_version or "", {"n": 0, "passed": 0, "failed": 0})
        entry["n"] += 1
        entry["passed"] += labels[t.id] is True
        entry["failed"] += labels[t.id] is False
    return versions


def _task_summary(selected: list[Trajectory], labels: dict[str, bool | None]) -> dict[str, dict[str, int]]:
    tasks: dict[str, dict[str, int]] = {}
    for t in selected:
        if t.task_id is None:
            continue
        entry = tasks.setdefault(t.task_id, {"n": 0, "passed": 0, "failed": 0})
        entry["n"] += 1
        entry["passed"] += labels[t.id] is True
        entry["failed"] += labels[t.id] is False
    return dict(sorted(tasks.items()))


# -- building rows -----------------------------------------------------------------------------


@dataclass
class _Example:
    """A trajectory as a chat example, with the keys dedupe and pairing need."""

    trajectory: Trajectory
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]

    @property
    def group(self) -> str:
        return self.trajectory.task_id or f"trajectory:{self.trajectory.id}"

    @property
    def content(self) -> str:
        """What makes two attempts the same: the conversation and tools, with tool-call ids
        (random per run) replaced by their order of appearance."""
        ids: dict[str, str] = {}

        def alias(call_id: Any) -> str:
            return ids.setdefault(str(call_id), f"call-{len(ids)}")

        messages = []
        for m in self.messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "id": alias(c.get("id"))} for c in m["tool_calls"]]
            if m.get("tool_call_id"):
                m["tool_call_id"] = alias(m["tool_call_id"])
            messages.append(m)
        return _dumps({"messages": messages, "tools": self.tools})

    def split_prompt(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(the conversation up to its last user message, everything after): the task input and
        the attempt. In a later turn of a conversation the earlier turns are input: they were
        judged by their own runs' verdicts, not this one's."""
        return split_at_last_user(self.messages)


class _Build:
    """Row builders for each method; they share the counters, the seed and the per-task cap."""

    def __init__(
        self, method: str, counts: Counter[str], seed: int, max_per_task: int | None, rank: dict[str, int]
    ) -> None:
        self.method, self.counts, self.seed, self.max_per_task = method, counts, seed, max_per_task
        self.rank = rank  # version ref -> 0 for the newest of a lineage; newer attempts are kept first

    def sft(
        self,
        keep: list[Trajectory],
        external: list[dict[str, Any]],
        ratio: float | None,
        tokenizer: Any,
        pretokenized: bool | None,
    ) -> TrainingData:
        own = self._cap(self._dedupe(self._examples(keep, need_chat=False))) if _own_rows(ratio) else []
        n_external = _external_count(len(own), len(external), ratio)
        with_ids = [e for e in own if _has_token_ids(e.trajectory, tokenizer)]
        self.counts["missing_token_ids"] = len(own) - len(with_ids)
        if tokenizer is not None:
            checked = [e for e in with_ids if _ids_say_the_text(e.trajectory, tokenizer)]
            self.counts["ids_not_the_text"] = len(with_ids) - len(checked)
            with_ids = checked
        can = bool(own) and len(with_ids) == len(own) and n_external == 0
        if pretokenized and own and not can:
            raise ValueError(
                "pretokenized=True needs recorded token ids on every model step of every selected "
                f"trajectory and no external rows ({len(own) - len(with_ids)} lack ids, or ids that say their stored text, "
                f"{n_external} external rows)"
            )
        if can and pretokenized is not False:
            self.counts["pretokenized"] = 1
            rows = [row for e in own for row in _token_rows(e.trajectory)]
            return self._data(rows, own, _features("tokens"))
        own = [e for e in own if e.messages or self._skip()]
        rows = [_chat_row(e.messages, e.tools, e.trajectory) for e in own]
        rows += self._sample_external(external, _external_count(len(own), len(external), ratio))
        return self._data(rows, own, _features("chat"))

    def kto(
        self,
        keep: list[Trajectory],
        desirable: dict[str, bool],
        external: list[dict[str, Any]],
        ratio: float | None,
    ) -> TrainingData:
        keep = keep if _own_rows(ratio) else []
        examples = self._dedupe(self._examples(keep), label=lambda e: desirable[e.trajectory.id])
        examples = self._cap(examples, label=lambda e: desirable[e.trajectory.id])
        rows, used = [], []
        for e in examples:
            prompt, completion = e.split_prompt()
            if not prompt or not completion:
                self._skip()
                continue
            used.append(e)
            rows.append(_kto_row(prompt, completion, desirable[e.trajectory.id], e.tools, e.trajectory))
        for ex in self._sample_external(external, _external_count(len(rows), len(external), ratio)):
            prompt, completion = _Example(_NO_TRAJECTORY, ex["messages"], ex["tools"]).split_prompt()
            if prompt and completion:
                rows.append(
                    {**_kto_row(prompt, completion, True, ex["tools"], None), "task_id": ex["task_id"]}
                )
        return self._data(rows, used, _features("kto"))

    def dpo(self, selected: list[Trajectory], labels: dict[str, bool | None]) -> TrainingData:
        judged = [t for t in selected if labels[t.id] is not None]
        examples = self._dedupe(self._examples(judged), label=lambda e: labels[e.trajectory.id])
        groups: dict[tuple[str, str], tuple[list[_Example], list[_Example]]] = defaultdict(lambda: ([], []))
        for e in examples:
            prompt, completion = e.split_prompt()
            if e.trajectory.task_id is None or not prompt or not completion:
                self._skip()
                continue
            key = (e.trajectory.task_id, _dumps({"prompt": prompt, "tools": e.tools}))
            groups[key][0 if labels[e.trajectory.id] else 1].append(e)
        rows, used = [], []
        for (task_id, _), (chosen, rejected) in sorted(groups.items()):
            if not chosen or not rejected:
                continue
            rng = random.Random(f"{self.seed}:{task_id}")
            rng.shuffle(chosen)
            rng.shuffle(rejected)
            n = max(len(chosen), len(rejected))
            if self.max_per_task is not None and n > self.max_per_task:
                self.counts["capped"] += n - self.max_per_task
                n = self.max_per_task
            for i in range(n):
                good, bad = chosen[i % len(chosen)], rejected[i % len(rejected)]
                prompt, chosen_turns = good.split_prompt()
                rows.append(
                    {
                        "prompt": prompt,
                        "chosen": chosen_turns,
                        "rejected": bad.split_prompt()[1],
                        "tools": _tools_value(good.tools),
                        "task_id": task_id,
                        "trajectory_id": good.trajectory.id,
                        "rejected_trajectory_id": bad.trajectory.id,
                    }
                )
                used += [good, bad]
        return self._data(rows, list({e.trajectory.id: e for e in used}.values()), _features("dpo"))

    def grpo(self, selected: list[Trajectory], labels: dict[str, bool | None]) -> TrainingData:
        newest: dict[str, _Example] = {}
        rates: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for t in selected:
            if t.task_id is None:
                self._skip()
                continue
            if labels[t.id] is not None:
                rates[t.task_id][0] += int(bool(labels[t.id]))
                rates[t.task_id][1] += 1
        for e in self._examples([t for t in selected if t.task_id is not None]):
            newest[e.trajectory.task_id or ""] = e  # oldest first: the last one wins
        weights, stuck = curriculum_weights({task: (rates[task][0], rates[task][1]) for task in newest})
        top = max(weights.values(), default=1.0)
        rows, used = [], []
        for task_id, e in sorted(newest.items()):
            prompt, _ = e.split_prompt()
            if not prompt:
                self._skip()
                continue
            used.append(e)
            row = {
                "prompt": prompt,
                "task_id": task_id,
                "metadata": json.dumps(e.trajectory.metadata or {}, ensure_ascii=False, sort_keys=True),
                "split": e.trajectory.split,
                "weight": weights[task_id],
                "trajectory_id": e.trajectory.id,
            }
            repeats = max(1, round(CURRICULUM_MAX_REPEATS * weights[task_id] / top))
            rows += [row] * repeats
        data = self._data(rows, used, _features("grpo"))
        data.weights, data.stuck = weights, stuck
        return data

    def offpolicy(
        self, selected: list[Trajectory], labels: dict[str, bool | None], tokenizer: Any
    ) -> TrainingData:
        """Each judged attempt's recorded model calls, with the log-probabilities they were sampled
        with and the attempt's advantage (newest versions first under the per-task cap): 1 for a
        pass, minus its group's pass rate for a failure; groups never passed are dropped. Not
        deduplicated: two equal attempts are two draws of the policy. (Deduplicating, which drops
        the repeated passes of a likely answer and few of the failures, which rarely repeat,
        tilts the estimate toward the failures: with SFT's deduplicated passes and demonstrations
        instead, held-out pass@1 after two cycles fell from 0.554 to 0.465, mean of 3 seeds.
        Sparing a failure's tokens before it diverged from every pass of its group, as KTO here
        does, measured no better: 0.476 against 0.492 after two cycles, same bases, 3 seeds;
        benchmarks/README.md.)"""
        judged = [t for t in selected if labels[t.id] is not None and (t.task_id is not None or self._skip())]
        examples = self._cap([_Example(t, [], []) for t in judged])
        mine = (
            examples
            if tokenizer is None
            else [e for e in examples if not _made_by_another(e.trajectory, tokenizer)]
        )
        self.counts["other_tokenizer"] = len(examples) - len(mine)  # their ratios mean nothing here
        if tokenizer is not None:  # ids that are not the judged text: their verdict says nothing of them
            checked = [
                e
                for e in mine
                if not _has_token_ids(e.trajectory, tokenizer) or _ids_say_the_text(e.trajectory, tokenizer)
            ]
            self.counts["ids_not_the_text"] = len(mine) - len(checked)
            mine = checked
        groups: dict[str, list[Trajectory]] = defaultdict(list)
        for e in mine:
            groups[e.group].append(e.trajectory)
        self.counts["groups"] = self.counts["unpassed_groups"] = 0
        # A group that never passed teaches nothing (no advantage): left out before the check
        # below, as is an attempt whose model never replied (it raised: a prompt over the
        # window), which has no tokens to learn from. One such attempt refused every cycle.
        kept: dict[str, list[Trajectory]] = {}
        for key, members in groups.items():
            if not any(labels[t.id] for t in members):
                self.counts["unpassed_groups"] += 1
                continue
            replied = [
                t
                for t in members
                if t.status != "error" or any(s.extra.get("token_ids") for s in t.model_steps())
            ]
            self.counts["no_reply"] += len(members) - len(replied)
            if replied:
                kept[key] = replied
        missing = [t.id for members in kept.values() for t in members if not _has_logprobs(t, tokenizer)]
        if missing:
            raise MissingLogprobs(missing, sum(map(len, kept.values())))
        rows, used = [], []
        # Failures beside a pass of their task: what this method learns from beyond SFT (none when
        # each task was attempted once, as in most production captures: a QA pass, session 28).
        self.counts["failed_attempts"] = sum(not labels[t.id] for members in kept.values() for t in members)
        for members in kept.values():
            rate = statistics.fmean(1.0 if labels[t.id] else 0.0 for t in members)
            self.counts["groups"] += 1
            for t in members:
                advantage = 1.0 if labels[t.id] else -rate
                for row, logprobs in zip(_token_rows(t), _logprobs_of(t), strict=True):
                    prompt = len(row["input_ids"]) - len(logprobs)
                    rows.append({**row, "logprobs": [0.0] * prompt + logprobs, "advantage": advantage})
                used.append(_Example(t, [], []))
        self.counts["pretokenized"] = 1
        return self._data(rows, used, _features("offpolicy"))

    # -- shared steps ------------------------------------------------------------------------

    def _examples(self, trajectories: list[Trajectory], *, need_chat: bool = True) -> list[_Example]:
        """Chat examples (reasoning kept: the training template renders it); a trajectory that is
        not exportable is skipped, unless its recorded token ids can stand in (`need_chat=False`)."""
        out = []
        for t in trajectories:
            try:
                example = chat_example(t, reasoning=True)
            except NotExportable:
                if not need_chat and _has_token_ids(t, None):
                    out.append(_Example(t, [], []))
                else:
                    self._skip()
                continue
            out.append(_Example(t, example["messages"], example.get("tools") or []))
        return out

    def _dedupe(self, examples: list[_Example], label: Any = None) -> list[_Example]:
        """One example per (label, content), the newest version's copy kept: the live version's
        rows are the ones `newest_weight` counts up, and lineage names the version that did it."""
        seen: set[tuple[Any, str]] = set()
        keep: set[int] = set()
        labels_of: dict[str, set[Any]] = defaultdict(set)
        contents: dict[int, str] = {}
        newest_first = sorted(
            range(len(examples)), key=lambda i: self.rank.get(examples[i].trajectory.model_version or "", 0)
        )  # stable: oldest first within a version
        for i in newest_first:
            e = examples[i]
            content = contents[i] = e.content if e.messages else _dumps(_token_ids_of(e.trajectory))
            key = (label(e) if label else None, content)
            labels_of[content].add(key[0])
            if key in seen:
                self.counts["duplicates"] += 1
                continue
            seen.add(key)
            keep.add(i)
        if label is not None:
            # The same attempt judged both ways (a flaky verifier or environment): a DPO pair of
            # one text against itself, a KTO row pulled up and down at once. Neither is kept
            # (a QA pass, session 25).
            contradicted = {i for i in keep if len(labels_of[contents[i]]) > 1}
            self.counts["contradictory"] += len(contradicted)
            keep -= contradicted
        return [e for i, e in enumerate(examples) if i in keep]

    def _cap(self, examples: list[_Example], label: Any = None) -> list[_Example]:
        """At most `max_per_task` per task (and label), drawn with `seed`, so one easy task
        attempted a hundred times cannot dominate the data."""
        if self.max_per_task is None:
            return examples
        groups: dict[tuple[str, Any], list[_Example]] = defaultdict(list)
        for e in examples:
            groups[(e.group, label(e) if label else None)].append(e)
        keep: set[str] = set()
        for (group, lab), members in groups.items():
            if len(members) > self.max_per_task:
                self.counts["capped"] += len(members) - self.max_per_task
                rng = random.Random(f"{self.seed}:{group}:{lab}")
                shuffled = rng.sample(members, len(members))
                newest_first = sorted(
                    shuffled, key=lambda e: self.rank.get(e.trajectory.model_version or "", 0)
                )
                members = newest_first[: self.max_per_task]
            keep.update(e.trajectory.id for e in members)
        return [e for e in examples if e.trajectory.id in keep]

    def weigh(self, data: TrainingData, trajectory_ids: set[str], weight: int) -> TrainingData:
        """Repeat the rows of `trajectory_ids` `weight` times in all: the live version's experience
        counts more than its ancestors' (SFT has no per-row weights; repetition is the weight)."""
        ids = data.dataset["trajectory_id"] if "trajectory_id" in data.dataset.column_names else []
        extra = [i for i, tid in enumerate(ids) if tid in trajectory_ids]
        if not extra or weight <= 1:
            return data
        from datasets import concatenate_datasets

        repeated = data.dataset.select([i for i in extra for _ in range(weight - 1)])
        data.dataset = concatenate_datasets([data.dataset, repeated]).shuffle(seed=self.seed)
        self.counts["weighted_up"] = len(repeated)
        return data

    def _sample_external(self, external: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
        if n <= 0 or not external:
            return []
        rng = random.Random(f"{self.seed}:external")
        picked = rng.sample(external, n) if n <= len(external) else rng.choices(external, k=n)
        self.counts["external"] += len(picked)
        return [_chat_row(ex["messages"], ex["tools"], None, task_id=ex["task_id"]) for ex in picked]

    def _skip(self) -> bool:
        self.counts["skipped"] += 1
        return False

    def _data(self, rows: list[dict[str, Any]], used: list[_Example], features: Any) -> TrainingData:
        from datasets import Dataset

        # `from_list([], features=...)` raises in datasets 5.2; an empty dict of columns does not.
        dataset = (
            Dataset.from_list(rows, features=features)
            if rows
            else Dataset.from_dict({name: [] for name in features}, features=features)
        )
        return TrainingData(
            dataset=dataset,
            method=self.method,
            trajectory_ids=[e.trajectory.id for e in used],
            counts={},
        )


_NO_TRAJECTORY = Trajectory(id="", agent="external")


class MissingLogprobs(ValueError):
    """Off-policy training needs, on every model step of every attempt it learns from, the token
    ids and the log-probabilities recorded when the model generated them: `trajectory_ids` lack
    them."""

    def __init__(self, trajectory_ids: list[str], selected: int) -> None:
        shown = ", ".join(trajectory_ids[:5]) + (" ..." if len(trajectory_ids) > 5 else "")
        super().__init__(
            f"offpolicy: {len(trajectory_ids)} of {selected} selected trajectories lack the token ids and "
            f"logprobs recorded at generation (steps' extra prompt_token_ids, token_ids, logprobs): {shown}. "
            "Serve the model through honed (LocalChatModel, ServedModel, `honed serve` with logprobs) so "
            "captures carry them, select only such runs, or train with sft, kto or dpo"
        )
        self.trajectory_ids = trajectory_ids


def _own_rows(ratio: float | None) -> bool:
    """Whether the selection's own rows train too (external ratio 1: external rows alone)."""
    return ratio is None or ratio < 1


def _external_count(own: int, available: int, ratio: float | None) -> int:
    """External rows so that they are `ratio` of all rows; ratio 1 is every external row, alone;
    None (targeted rows) every one of them, beside the own rows."""
    if available == 0 or (ratio is not None and ratio <= 0):
        return 0
    if ratio is None or ratio >= 1:
        return available
    return round(ratio * own / (1.0 - ratio))


def _external_examples(external: Any, heldout: HeldOut, counts: Counter[str]) -> list[dict[str, Any]]:
    """External rows in the dataset's shape. One that names a held-out task (by id or split) is
    a mistake and raises; one that merely asks a held-out question (a public dataset that holds
    it) is decontaminated: left out, counted in `heldout_excluded`."""
    examples = [_normalised_example(dict(row), i) for i, row in enumerate(external)]
    named = HeldOut(heldout.task_ids, heldout.split, heldout.fraction)
    leaked = [ex["task_id"] for ex in examples if named.holds(ex)]
    if leaked:
        raise HeldOutLeak("external rows belong to held-out tasks", leaked)
    kept = [ex for ex in examples if not heldout.holds(ex)]
    counts["heldout_excluded"] += len(examples) - len(kept)
    return kept


def _normalised_example(row: dict[str, Any], index: int) -> dict[str, Any]:
    """An external chat example in the dataset's shape (`honed.messages.openai_messages`: tool
    arguments and schemas may come as JSON text or as objects; the suites' demonstrations use
    text). Raises ValueError naming the row when a message breaks the conversion rules."""
    tools = row.get("tools") or []
    if isinstance(tools, str):
        tools = json.loads(tools) if tools.strip() else []
    try:
        messages = openai_messages(row["messages"])
    except MessageError as exc:
        raise ValueError(f"external example {index}, message {exc.index}: {exc}") from exc
    task_id = row.get("task_id")
    return {
        "messages": messages,
        "tools": list(tools),
        "task_id": None if task_id is None else str(task_id),
        "split": row.get("split"),
    }


def _has_token_ids(t: Trajectory, tokenizer: Any) -> bool:
    """Whether every model step recorded its ids, and (with `tokenizer`) they are this tokenizer's:
    made by it (`honed.tokenizer_id`, where recorded) and within its vocabulary."""
    steps = own_model_steps(t)
    if not steps:
        return False
    vocab = len(tokenizer) if tokenizer is not None else None
    for step in steps:
        prompt, completion = step.extra.get("prompt_token_ids"), step.extra.get("token_ids")
        if not _is_ids(prompt) or not _is_ids(completion) or not completion:
            return False
        made_by = step.extra.get("tokenizer")
        if tokenizer is not None and made_by is not None and made_by != tokenizer_id(tokenizer):
            return False  # another tokenizer's ids: other text, or ids past the embeddings
        if vocab is not None and max(max(prompt, default=0), max(completion)) >= vocab:
            return False
    return True


def _ids_say_the_text(t: Trajectory, tokenizer: Any) -> bool:
    """Whether each model step's recorded ids say what the step stored: the reply's, decoded and
    parsed as honed's models parse them, are its text, reasoning and tool calls, and the prompt's
    hold every message's text. The ids come from the model's own report (`response_metadata`), so
    a model (or a server) that reported other ids than the text it answered with trained, under a
    verdict on that text, whatever the ids said (a QA pass, session 22). A reply cut at a stop
    string decodes to more than its text: such a run trains from its conversation instead."""
    for step in own_model_steps(t):
        out = step.output if isinstance(step.output, dict) else None
        if out is None:
            return False
        try:
            reply = _decode(tokenizer, step.extra["token_ids"])
            prompt = _decode(tokenizer, step.extra["prompt_token_ids"])
        except Exception:  # ids a tokenizer cannot decode say nothing it can check
            return False
        stored = (
            _plain_text(out.get("content")),
            out.get("reasoning") or "",
            [(c.get("name"), c.get("args")) for c in out.get("tool_calls") or ()],
            [(c.get("name"), c.get("args")) for c in out.get("invalid_tool_calls") or ()],
        )
        # (With `tool_choice="none"` a `<tool_call>` the model wrote anyway is its text.)
        if stored != _said(reply, calls=True) and (stored[2] or stored != _said(reply, calls=False)):
            return False
        messages = step.input.get("messages") if isinstance(step.input, dict) else None
        for message in messages or ():
            text = _plain_text(message.get("content")) if isinstance(message, dict) else None
            if text is None or text.strip() not in prompt:
                return False
    return True


def _said(text: str, *, calls: bool) -> tuple[Any, ...]:
    """A reply's text as honed's models parse it: content, reasoning, tool calls, invalid ones."""
    from honed.serving.toolcalls import parse_completion

    said = parse_completion(text, calls=calls)
    return (
        said.content,
        said.reasoning,
        [(c["name"], c["args"]) for c in said.tool_calls],
        [(c.get("name"), c.get("args")) for c in said.invalid_tool_calls],
    )


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _plain_text(content: Any) -> str | None:
    """A stored message content as text (text blocks joined); None for any other block."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        else:
            return None
    return "".join(parts)


def _made_by_another(t: Trajectory, tokenizer: Any) -> bool:
    """Whether a model step of `t` recorded ids of a tokenizer other than `tokenizer`."""
    mine = tokenizer_id(tokenizer)
    return any(s.extra.get("tokenizer") not in (None, mine) for s in own_model_steps(t))


def _is_ids(value: Any) -> bool:
    """Token ids: a list of non-negative ints (checked in C: an element at a time in Python was a
    sixth of building a token-id dataset)."""
    if not isinstance(value, list):
        return False
    return not value or ({*map(type, value)} == {int} and min(value) >= 0)


def _has_logprobs(t: Trajectory, tokenizer: Any) -> bool:
    """Token ids as `_has_token_ids` wants them, and one finite float logprob per sampled token."""
    if not _has_token_ids(t, tokenizer):
        return False
    for step in own_model_steps(t):
        logprobs, completion = step.extra.get("logprobs"), step.extra["token_ids"]
        if not isinstance(logprobs, list) or len(logprobs) != len(completion):
            return False
        if not all(
            isinstance(x, int | float) and not isinstance(x, bool) and -1e30 < x <= 0 for x in logprobs
        ):
            return False
    return True


def _logprobs_of(t: Trajectory) -> list[list[float]]:
    return [[float(x) for x in s.extra["logprobs"]] for s in own_model_steps(t)]


def _token_ids_of(t: Trajectory) -> list[list[list[int]]]:
    return [[s.extra["prompt_token_ids"], s.extra["token_ids"]] for s in own_model_steps(t)]


def _token_rows(t: Trajectory) -> Iterator[dict[str, Any]]:
    """One row per model call: the prompt it saw and the tokens it sampled, verbatim; the loss
    falls on the sampled tokens only (EOS included: it is the model's own stop)."""
    for prompt, completion in _token_ids_of(t):
        yield {
            "input_ids": [*prompt, *completion],
            "completion_mask": [0] * len(prompt) + [1] * len(completion),
            "trajectory_id": t.id,
            "task_id": t.task_id,
        }


def _chat_row(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    t: Trajectory | None,
    *,
    task_id: str | None = None,
) -> dict[str, Any]:
    return {
        "messages": messages,
        "tools": _tools_value(tools),
        "trajectory_id": t.id if t is not None else None,
        "task_id": t.task_id if t is not None else task_id,
    }


def _kto_row(
    prompt: list[dict[str, Any]],
    completion: list[dict[str, Any]],
    label: bool,
    tools: list[dict[str, Any]],
    t: Trajectory | None,
) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "completion": completion,
        "label": label,
        "tools": _tools_value(tools),
        "trajectory_id": t.id if t is not None else None,
        "task_id": t.task_id if t is not None else None,
    }


# -- features: explicit, so rows never merge each other's keys (API-NOTES) --------------------


def _features(kind: str) -> Any:
    from datasets import Features, List, Value

    # Arguments as the text the model wrote: what the chat template renders at serving is what
    # trains (an export for TRL gives objects, as third-party templates expect).
    messages = dataset_features(reasoning=True, ids=False, arguments_as_text=True)["messages"]
    tools, text = _tools_feature(), Value("string")
    columns = {
        "chat": {"messages": messages, "tools": tools},
        "tokens": {"input_ids": List(Value("int64")), "completion_mask": List(Value("int8"))},
        "kto": {"prompt": messages, "completion": messages, "label": Value("bool"), "tools": tools},
        "dpo": {"prompt": messages, "chosen": messages, "rejected": messages, "tools": tools},
        "grpo": {"prompt": messages, "metadata": text, "split": text, "weight": Value("float64")},
        "offpolicy": {
            "input_ids": List(Value("int64")),
            "completion_mask": List(Value("int8")),
            "logprobs": List(Value("float32")),
            "advantage": Value("float32"),
        },
    }[kind]
    extra = {"rejected_trajectory_id": text} if kind == "dpo" else {}
    return Features({**columns, "trajectory_id": text, "task_id": text, **extra})


@functools.cache
def _tools_feature() -> Any:
    return dataset_features(ids=False)["tools"]


def _tools_value(tools: list[dict[str, Any]]) -> Any:
    """Tool schemas as the tools feature holds them: objects under `datasets.Json`, else text."""
    from datasets import Value

    return json.dumps(tools, ensure_ascii=False) if isinstance(_tools_feature(), Value) else tools


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def _as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)
