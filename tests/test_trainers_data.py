"""Trajectories → TRL datasets: trusted labels, the held-out wall, dedupe, caps, external data, the
format of each method, recorded token ids, and the curriculum."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import honed
from honed import Step, Trajectory, Verdict
from honed.learn.datasets import (
    _ids_say_the_text,
    build_dataset,
    curriculum_weights,
    prepare,
    task_pass_rates,
)
from honed.store import TrajectoryNotFound, TrajectoryStore
from honed.store.select import HeldOutLeak, is_heldout, request_key, task_hash
from honed.trajectory import label

SYSTEM = "You are a calculator. Use the tools."
ADD_SCHEMA = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
ECHO_SCHEMA = {
    "type": "function",
    "function": {
        "name": "echo",
        "description": "Echo text.",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
    },
}
_T0 = datetime(2025, 1, 1, tzinfo=UTC)
_serial = Counter[str]()


def question(task_id: str) -> str:
    return f"What is 2 plus 3? (task {task_id})"


def make_trajectory(
    task_id: str | None,
    *,
    answer: str = "The sum is 5.",
    split: str | None = "train",
    system: str = SYSTEM,
    user: str | None = None,
    a: int = 2,
    token_ids: tuple[list[int], list[int], list[int], list[int]] | None = None,
    tools: list[dict[str, Any]] | None = None,
    agent: str = "calc",
    model_version: str = "calc@v1",
    metadata: dict[str, Any] | None = None,
    reasoning: str | None = None,
    history: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> Trajectory:
    """A captured run as the recorder stores it: model call → `add` → model call → answer.

    `token_ids` = (prompt 1, completion 1, prompt 2, completion 2), as LocalChatModel records them;
    `history`: earlier turns of the conversation (this run is a later turn on its thread).
    """
    _serial["n"] += 1
    n = _serial["n"]
    tools = [ADD_SCHEMA] if tools is None else tools
    call = {"name": "add", "args": {"a": a, "b": 3}, "id": f"call_{n}"}
    first_in = [
        {"role": "system", "content": system},
        *history,
        {"role": "user", "content": user or question(str(task_id))},
    ]
    first_out: dict[str, Any] = {"role": "assistant", "content": "", "tool_calls": [call]}
    if reasoning:
        first_out["reasoning"] = reasoning
    tool_message = {"role": "tool", "content": str(a + 3), "tool_call_id": call["id"]}
    second_in = [*first_in, first_out, tool_message]
    second_out = {"role": "assistant", "content": answer}
    extras: list[dict[str, Any]] = [{"finish_reason": "tool_calls"}, {"finish_reason": "stop"}]
    if token_ids is not None:
        p1, c1, p2, c2 = token_ids
        extras[0].update(prompt_token_ids=p1, token_ids=c1, logprobs=[-0.5] * len(c1))
        extras[1].update(prompt_token_ids=p2, token_ids=c2, logprobs=[-0.5] * len(c2))
    started = _T0 + timedelta(seconds=n)
    steps = [
        Step(id=f"s{n}-0", index=0, kind="model", name="model", input={"messages": first_in, "tools": tools},
             output=first_out, tool_calls=[call], reasoning=reasoning, model_version=model_version,
             extra=extras[0]),
        Step(id=f"s{n}-1", index=1, kind="tool", name="add", input={"a": a, "b": 3}, output=str(a + 3),
             extra={"tool_call_id": call["id"]}),
        Step(id=f"s{n}-2", index=2, kind="model", name="model", input={"messages": second_in, "tools": tools},
             output=second_out, model_version=model_version, extra=extras[1]),
    ]  # fmt: skip
    return Trajectory(
        id=f"traj-{n:05d}",
        agent=agent,
        task=user or question(str(task_id)),
        task_id=task_id,
        split=split,
        metadata={"expected": "5", **(metadata or {})},
        steps=steps,
        output=answer,
        model_version=model_version,
        started_at=started,
        ended_at=started + timedelta(seconds=1),
    )


def add(store: TrajectoryStore, t: Trajectory, *verdicts: Verdict | bool | None) -> Trajectory:
    """Save `t` with verdicts (a bool is the trusted `reference` verifier's judgement)."""
    store.save(t)
    for v in verdicts:
        verdict = v if isinstance(v, Verdict) else Verdict(passed=v, verifier="reference")
        store.add_verdict(t.id, verdict)
    return t


def error_verdict(verifier: str = "reference") -> Verdict:
    return Verdict(passed=None, reason="error: Timeout", evidence={"error": "Timeout"}, verifier=verifier)


@pytest.fixture
def store(sqlite_url: str) -> TrajectoryStore:
    return honed.open_store(sqlite_url)


@pytest.fixture
def any_store(store_url: str) -> TrajectoryStore:
    """SQLite and PostgreSQL: the selection's queries run on both."""
    return honed.open_store(store_url)


# -- labels ------------------------------------------------------------------------------------


def test_only_trusted_non_error_verdicts_label_training_data(any_store: TrajectoryStore) -> None:
    store = any_store
    store.set_min_precision("judge", 0.9)  # never audited: its verdicts count for nothing
    assert store.untrusted_verifiers() == {"judge"}
    judge = Verdict(passed=True, verifier="judge")
    judge_fail = Verdict(passed=False, verifier="judge")
    cases = {
        "pass": add(store, make_trajectory("t-pass"), True),
        "fail": add(store, make_trajectory("t-fail"), False),
        "judge-only": add(store, make_trajectory("t-judge"), judge),
        "error-only": add(store, make_trajectory("t-error"), error_verdict()),
        "pass+error": add(store, make_trajectory("t-pe"), True, error_verdict("schema")),
        "pass+judge-fail": add(store, make_trajectory("t-pjf"), True, judge_fail),
        "pass+fail": add(store, make_trajectory("t-pf"), True, Verdict(passed=False, verifier="schema")),
        "unlabeled": add(store, make_trajectory("t-none")),
    }
    untrusted = store.untrusted_verifiers()
    labels = {name: label(store.get(t.id).verdicts, untrusted=untrusted) for name, t in cases.items()}
    assert labels == {
        "pass": True,
        "fail": False,
        "judge-only": None,
        "error-only": None,
        # A verifier's error leaves the run undecided, whatever another verifier said: the run's own
        # code can make the test-suite verifier err (a QA pass, session 19: it killed the sandbox's
        # process, and another verifier's pass made the wrong code the only training row).
        "pass+error": None,
        # An untrusted verifier's passes count for nothing, its fails still fail a run: an audit
        # measures false passes (a QA pass, session 19: a wrong answer became a pass through a weak
        # second verifier once `reference` was untrusted).
        "pass+judge-fail": False,
        "pass+fail": False,
        "unlabeled": None,
    }
    data = prepare(store, "sft")
    assert sorted(data.dataset["task_id"]) == ["t-pass"]
    # The store's own filter is the same rule, in SQL.
    assert sorted(t.task_id for t in store.trajectories(verdict="pass")) == ["t-pass"]
    assert sorted(t.task_id for t in store.trajectories(verdict="fail")) == ["t-fail", "t-pf", "t-pjf"]
    assert sorted(data.trajectory_ids) == [cases["pass"].id]
    assert data.counts["passed"] == 1 and data.counts["failed"] == 3
    assert data.counts["rows"] == 1 and data.counts["pretokenized"] == 0
    # Only the named verifiers label: here `schema`, which failed one and erred on another.
    assert prepare(store, "sft", verifiers=["schema"]).counts["failed"] == 1
    assert prepare(store, "sft", verifiers=["schema"]).counts["passed"] == 0
    assert task_pass_rates(store, verifiers=["schema"]) == {"t-pf": (0, 1)}
    # Unverified: every attempt, whatever its verdicts (the benchmark's control arm).
    assert len(prepare(store, "sft", verified=False).dataset) == len(cases)
    assert build_dataset(store, "sft")["task_id"] == data.dataset["task_id"]


def test_sft_rows_are_the_conversation_with_tools_as_objects_and_arguments_as_text(
    store: TrajectoryStore,
) -> None:
    add(store, make_trajectory("t1", reasoning="Add them."), True)
    add(store, make_trajectory("t2", tools=[ECHO_SCHEMA, ADD_SCHEMA]), True)
    rows = {row["task_id"]: row for row in prepare(store, "sft").dataset}
    messages = rows["t1"]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[2]["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'}
    assert messages[2]["reasoning_content"] == "Add them."
    assert messages[3]["tool_call_id"] == messages[2]["tool_calls"][0]["id"]
    assert messages[4]["content"] == "The sum is 5."
    # Each row keeps its own tool schema whole: no keys merged in from the other row.
    assert rows["t1"]["tools"] == [ADD_SCHEMA]
    assert rows["t2"]["tools"] == [ECHO_SCHEMA, ADD_SCHEMA]


# -- the held-out wall -------------------------------------------------------------------------


def test_heldout_tasks_never_reach_a_dataset(any_store: TrajectoryStore) -> None:
    store = any_store
    add(store, make_trajectory("train-1"), True)
    add(store, make_trajectory("held-1", split="heldout"), True)
    # Same task captured once without a split: still held out, as a whole task.
    add(store, make_trajectory("held-1", split=None), True)
    add(store, make_trajectory("held-1", split="train"), False)
    for method in ("sft", "kto", "dpo", "grpo", "distill"):
        data = prepare(store, method, verified=method != "grpo")
        assert "held-1" not in set(data.dataset["task_id"]), method
        assert data.counts["heldout_excluded"] >= 2, method
        assert "held-1" not in data.tasks
    assert "held-1" not in task_pass_rates(store)


def test_hash_heldout_fraction_splits_tasks_without_a_split(store: TrajectoryStore) -> None:
    ids = [f"task-{i}" for i in range(40)]
    for task_id in ids:
        add(store, make_trajectory(task_id, split=None), True)
    data = prepare(store, "sft", heldout_fraction=0.3)
    kept = set(data.dataset["task_id"])
    held = {t for t in ids if task_hash(t) < 0.3}
    assert kept == set(ids) - held and 4 <= len(held) <= 20
    assert data.counts["heldout_excluded"] == len(held)
    # Stable: the same tasks every time, and held out whole: a run of a hashed-out task captured
    # with split="train" is held out too (the task's other runs are, so training on it would leak).
    assert all(is_heldout((t, None), heldout_fraction=0.3) for t in held)
    assert all(is_heldout((t, "train"), heldout_fraction=0.3) for t in held)
    for task_id in sorted(held)[:2]:
        add(store, make_trajectory(task_id, split="train"), True)
    assert set(prepare(store, "sft", heldout_fraction=0.3).dataset["task_id"]) == set(ids) - held
    assert not is_heldout((None, None), heldout_fraction=1.0)
    assert is_heldout({"task_id": "x", "split": "heldout"})
    # A split written another way is the same split: a typo must not send held-out runs to training.
    assert all(is_heldout({"task_id": "x", "split": s}) for s in ("HeldOut", "held-out", "held_out"))
    add(store, make_trajectory("typo-1", split="Held-Out"), True)
    add(store, make_trajectory("typo-1", split=None), True)
    assert "typo-1" not in set(prepare(store, "sft", heldout_fraction=0.3).dataset["task_id"])
    assert set(task_pass_rates(store, heldout_fraction=0.3)) == set(ids) - held


def test_runs_labelled_test_eval_or_validation_are_held_out_too(store: TrajectoryStore) -> None:
    """A QA pass (session 18): a user whose evaluation set is called "test" (or "eval",
    "validation", "val", "dev") trained on it: only spellings of "heldout" were held out, and
    `honed export` wrote those runs as training data. Every evaluation split is held out now,
    its tasks' runs in other splits too."""
    from honed.store.select import select_trajectories

    for i, split in enumerate(("test", "Eval", "evaluation", "validation", "val", "dev", "holdout")):
        add(store, make_trajectory(f"eval-{i}", split=split), True)
        assert is_heldout({"task_id": "x", "split": split})
    add(store, make_trajectory("eval-0", split="train"), True)  # a test task's run, labelled train
    kept = add(store, make_trajectory("train-1", split="train"), True)
    assert set(prepare(store, "sft").trajectory_ids) == {kept.id}
    assert [t.id for t in select_trajectories(store, verdict="pass")] == [kept.id]
    assert len(list(select_trajectories(store, split="test"))) == 1  # asked for by name, it is there
    # The store's `split="heldout"` is every evaluation split too (a QA pass, session 19: it found
    # none of them, so `honed runs --split heldout` said the evaluation set was empty).
    assert store.count(split="heldout") == 7 and store.count(split="Held-Out") == 7
    assert len(store.trajectories(split="heldout", limit=None)) == 7 and store.count(split="train") == 2
    assert store.count(split="eval") == 1 and store.count(split="EVAL") == 1  # stored as "Eval"
    # Its stored spellings are looked up once per read, not once per page (a QA pass, session 19).
    from sqlalchemy import event

    distinct: list[str] = []
    count = lambda *a: distinct.append(a[2]) if "DISTINCT" in a[2] else None  # noqa: E731
    event.listen(store.engine, "before_cursor_execute", count)
    try:
        assert len(list(select_trajectories(store, split="heldout", page_size=2))) == 7
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    assert len(distinct) == 1, distinct  # 4 pages, one lookup
    assert not is_heldout({"task_id": "x", "split": "train"}) and not is_heldout(
        {"task_id": "x", "split": "prod"}
    )


def test_a_heldout_request_never_trains_under_another_task_id_or_none(any_store: TrajectoryStore) -> None:
    """A task is its request as much as its id: the held-out question captured again under
    another task id, without one, in an external dataset, or asked by a task held out by hash or
    handed to the gate is the gate's question; training on it grades a candidate on what it
    memorised. Case and spacing do not make it another question."""
    from honed.store.select import count_selected, select_trajectories
    from honed.trajectory import Task

    store = any_store
    held = "What is 7 plus 3?"
    add(store, make_trajectory("held-1", split="heldout", user=held), True)
    add(store, make_trajectory("copy-1", user=held), True)
    add(store, make_trajectory(None, user="  what is 7\n PLUS 3? "), True)
    kept = add(store, make_trajectory("train-1"), True)
    for method in ("sft", "kto", "grpo", "distill"):
        data = prepare(store, method, verified=method != "grpo")
        assert set(data.trajectory_ids) == {kept.id}, method
        assert data.counts["heldout_excluded"] >= 3, method
    assert [t.id for t in select_trajectories(store, verdict="pass")] == [kept.id]  # export too
    # ... and what `honed status` and the progress bars count (a QA pass, session 15: 3, not 1)
    assert count_selected(store, verdict="pass") == 1
    # A gate's task, not in the store yet: its request under any id stays out.
    gate = add(store, make_trajectory("other-1", user="What is 9 plus 3?"), True)
    data = prepare(store, "sft", heldout_tasks=[Task("gate-1", "what is 9 plus 3?")])
    assert gate.id not in data.trajectory_ids and kept.id in data.trajectory_ids
    # A task held out by its hash holds its request: the same request under an id the hash keeps.
    hashed = next(f"h{i}" for i in range(200) if task_hash(f"h{i}") < 0.3)
    free = next(f"f{i}" for i in range(200) if task_hash(f"f{i}") >= 0.3)
    add(store, make_trajectory(hashed, user="What is 4 plus 3?"), True)
    twin = add(store, make_trajectory(free, user="What is 4 plus 3?"), True)
    data = prepare(store, "sft", heldout_fraction=0.3)
    assert twin.id not in data.trajectory_ids and kept.id in data.trajectory_ids
    # An external dataset that happens to hold the held-out question is decontaminated, counted.
    leaky = {"messages": [{"role": "user", "content": held}, {"role": "assistant", "content": "10"}]}
    data = prepare(store, "sft", external=[leaky, chat_demo(1)], external_ratio=1.0)
    assert len(data) == 1 and data.counts["external"] == 1 and data.counts["heldout_excluded"] >= 1


def test_a_heldout_request_inside_another_prompt_never_trains(any_store: TrajectoryStore) -> None:
    """A QA pass (session 20, an attacker): the gate's question in a system prompt, a developer
    message or split over two user messages reached SFT rows (only whole user messages were
    compared). A longer question that merely begins like a held-out one still trains."""
    from honed.store.select import select_trajectories

    store = any_store
    held = "Write `def step(x)` that returns x times 2, and explain each line."
    add(store, make_trajectory("held-1", split="heldout", user=held), True)
    leaks = [
        add(store, make_trajectory("sys-1", system=f"Solve this: {held}", user="answer 5"), True),
        add(
            store,
            make_trajectory("split-1", history=[{"role": "user", "content": held[:19]}], user=held[19:]),
            True,
        ),
        add(store, make_trajectory("dev-1", history=[{"role": "developer", "content": held.upper()}]), True),
    ]
    similar = add(store, make_trajectory("train-24", user=held.replace("times 2,", "times 24,")), True)
    kept = add(store, make_trajectory("train-1"), True)
    assert set(prepare(store, "sft").trajectory_ids) == {similar.id, kept.id}
    assert {t.id for t in select_trajectories(store, verdict="pass")} == {similar.id, kept.id}
    assert not {t.id for t in leaks} & {t.id for t in select_trajectories(store, verdict="pass")}
    leaky = {"messages": [{"role": "system", "content": held}, {"role": "user", "content": "go"},
                          {"role": "assistant", "content": "done"}]}  # fmt: skip
    data = prepare(store, "sft", external=[leaky, chat_demo(1)], external_ratio=1.0)
    assert data.counts["external"] == 1


def test_evaluation_splits_are_held_out_however_they_are_suffixed() -> None:
    """A QA pass (session 20): `test_set`, `heldout_v2`, `evals` ... were trained on."""
    for split in (
        "test_set",
        "eval-set",
        "testset",
        "heldout_v2",
        "holdout2",
        "validation_set",
        "tests",
        "evals",
        # ... and one word of several (an operator's QA pass, session 21: each trained on).
        "heldout_hard",
        "test_ood",
        "eval-2024-q1",
        "ood_test",
        "private_test",
        "held_out_hard",
        "heldOutHard",
        # ... and benchmarks' own names (a second review, session 21: the first word rule trained on them)
        "gsm8k_test",
        "math500_test",
        "test_1k",
        "test_v2_hard",
        "dev-other",
        "testA",
        "test_cross_domain",
        "benchmark",
    ):
        assert is_heldout({"task_id": "x", "split": split}), split
    for split in (
        "train",
        "train_v2",
        "trainset",
        "contest",
        "latest",
        "prod",
        "values",
        "interval",
        "devops",
        # ... nor one whose evaluation-like word also names training data (a review, session 21)
        "unit_tests",
        "test_generation",
        "dev_tools",
        "web_dev",
        "DevOpsTasks",
        "valid_requests",
        "benchmark_generation",
        # A review (session 22): production traffic and kinds of work, held out by the word rule.
        "ab_test",
        "AB-Test",
        "load_test",
        "smoke_test",
        "canary_test",
        "data_validation",
        "schema_validation",
    ):
        assert not is_heldout({"task_id": "x", "split": split}), split
    for split in (
        "golden_set", "leaderboard", "private_leaderboard", "validation_hard",
        # ... and a second review of that (session 22): sets the first fix let train.
        "test_b", "testB", "val_b", "qa_test", "squad_qa_test", "regression_test", "agent_benchmark",
        "user_test", "prod_test", "integration_test",
    ):  # fmt: skip
        assert is_heldout({"task_id": "x", "split": split}), split


def test_a_heldout_graph_input_or_a_task_held_out_by_id_never_trains_whatever_the_filters(
    any_store: TrajectoryStore,
) -> None:
    """A QA pass (session 16): a graph's input with no chat request (`{"question": ...}`) gave
    the held-out check nothing to compare, so the same question under another task id trained;
    and the request of a task held out by id was read only from the runs the filters selected
    (`agent="prod"` left the held-out run out, and its twin trained)."""
    import dataclasses

    from honed.store.select import select_trajectories

    store = any_store
    graph_input = {"question": "Capital of France?"}
    add(
        store,
        dataclasses.replace(make_trajectory("h1", split="heldout", agent="harness"), task=graph_input),
        True,
    )
    twin = add(store, dataclasses.replace(make_trajectory("t7", agent="prod"), task=dict(graph_input)), True)
    kept = add(store, make_trajectory("train-1", agent="prod"), True)
    assert [t.id for t in select_trajectories(store, verdict="pass")] == [kept.id]
    assert set(prepare(store, "sft", agent="prod").trajectory_ids) == {kept.id} and twin.id
    add(store, make_trajectory("h2", split=None, agent="harness", user="What is 8 plus 3?"), True)
    copy = add(store, make_trajectory("t8", agent="prod", user="what is 8 plus 3"), True)
    for filters in ({}, {"agent": "prod"}):
        data = prepare(store, "sft", heldout_tasks=["h2"], **filters)
        assert copy.id not in data.trajectory_ids and kept.id in data.trajectory_ids, filters


def test_a_heldout_request_served_as_a_bare_message_list_holds_its_variants_out(
    any_store: TrajectoryStore,
) -> None:
    """A QA pass (session 17): `honed serve` stores a task as the bare list of messages it was
    sent, which the request reader did not read, so the held-out key was that list's raw JSON:
    the same question with a system prompt, without its "?" or in capitals trained."""
    import dataclasses

    from honed.store.select import select_trajectories

    store = any_store
    asked = [{"role": "user", "content": "What is the capital of Heldoutland?"}]
    add(store, dataclasses.replace(make_trajectory("H1", split="heldout"), task=asked), True)
    variants = [
        [{"role": "system", "content": "Be brief."}, *asked],
        [{"role": "user", "content": "what is the capital of heldoutland"}],
        [{"role": "user", "content": "  WHAT IS THE CAPITAL   OF HELDOUTLAND? "}],
    ]
    leaks = [add(store, dataclasses.replace(make_trajectory(None), task=v), True) for v in variants]
    kept = add(store, make_trajectory("train-1"), True)
    assert [t.id for t in select_trajectories(store, verdict="pass")] == [kept.id], leaks
    assert set(prepare(store, "sft").trajectory_ids) == {kept.id}


def test_a_run_whose_call_a_reviewer_changed_is_not_trained_as_the_models(any_store: TrajectoryStore) -> None:
    """A QA pass (session 16): a reviewer edited the model's `add(2, 3)` to `add(2, 4)` and the run
    passed on the edit; both the token rows and the chat rows then trained `add(2, 3)` for the
    question, the very mistake the reviewer fixed."""
    store = any_store
    edited = make_trajectory("t1")
    tool = edited.steps[1]
    tool.extra = {**tool.extra, "asked": {"name": "add", "args": {"a": 2, "b": 4}}}
    add(store, edited, True)
    kept = add(store, make_trajectory("t2"), True)
    for method in ("sft", "kto"):
        data = prepare(store, method)
        assert set(data.trajectory_ids) == {kept.id}, method
        assert data.counts["calls_changed_before_running"] == 1


def test_a_heldout_request_in_disguise_or_an_earlier_turn_never_trains(any_store: TrajectoryStore) -> None:
    """What an attacker tried (session 14): the held-out question with a zero-width space, in
    full-width letters, with a trailing full stop, as an earlier turn of a thread (the trained
    conversation holds it and its answer), or a held-out split spelled "HELDOUT\\r\\n"."""
    from honed.store.select import select_trajectories

    store = any_store
    held = "What is 7 plus 3"
    add(store, make_trajectory("held-1", split="heldout", user=held), True)
    add(store, make_trajectory("zwsp", user="What is 7\u200b plus 3"), True)
    add(store, make_trajectory("nfkc", user="Ｗｈａｔ ｉｓ ７ ｐｌｕｓ ３"), True)
    add(store, make_trajectory("punct", user="What is 7 plus 3?!"), True)
    turn1 = [{"role": "user", "content": held}, {"role": "assistant", "content": "10"}]
    add(store, make_trajectory("turn2", user="thanks", history=turn1), True)
    add(store, make_trajectory("held-2", split="HELDOUT\r\n", user="What is 8 plus 3?"), True)
    add(store, make_trajectory("held-3", split="held.out"), True)
    kept = add(store, make_trajectory("train-1"), True)
    for method in ("sft", "kto", "grpo"):
        data = prepare(store, method, verified=method != "grpo")
        assert set(data.trajectory_ids) == {kept.id}, method
    assert [t.id for t in select_trajectories(store, verdict="pass")] == [kept.id]  # export too
    # Internal punctuation still tells questions apart: "2+3" is not "2-3".
    assert request_key("What is 2+3?") == "what is 2+3" != request_key("What is 2-3?")


def test_a_hashed_out_request_stays_out_whatever_is_selected_and_gate_runs_stay_out_of_any_split(
    store: TrajectoryStore,
) -> None:
    """Two leaks a QA pass found (session 14): a task held out by its hash held its request only
    when its own run was in the same selection (unlabeled, or another agent's, it was not), and a
    custom held-out split stopped holding `heldout`, where the gate's own runs are captured."""
    hashed = next(f"h{i}" for i in range(200) if task_hash(f"h{i}") < 0.3)
    free = next(f"f{i}" for i in range(200) if task_hash(f"f{i}") >= 0.3)
    add(store, make_trajectory(hashed, user="What is 6 plus 3?", agent="other"))  # unlabeled, elsewhere
    twin = add(store, make_trajectory(free, user="What is 6 plus 3?"), True)
    kept = add(store, make_trajectory("train-1"), True)
    data = prepare(store, "sft", heldout_fraction=0.3, agent="calc")
    assert twin.id not in data.trajectory_ids and kept.id in data.trajectory_ids
    gate_run = add(store, make_trajectory("gate-1", split="heldout", user="What is 9 plus 9?"), True)
    data = prepare(store, "sft", heldout_split="test")
    assert gate_run.id not in data.trajectory_ids and kept.id in data.trajectory_ids


def test_a_new_unaudited_version_a_pass_that_erred_and_a_paused_run_never_train(
    any_store: TrajectoryStore,
) -> None:
    """An audit vouches for the version it audited: passes of a newer, unaudited version of a
    verifier with a minimum precision count for nothing. A "pass" reporting an error failed to
    judge. A run paused at an interrupt is no outcome, asked for by id or not."""
    from honed.store.verification import verdict_row

    store = any_store
    store.set_min_precision("ref2", 0.9)
    for i in range(3):
        add(store, make_trajectory(f"gold-{i}", split="heldout"),
            Verdict(passed=True, verifier="ref2", version="1"), Verdict(passed=True, verifier="human"))  # fmt: skip
    assert store.audit_verifier("ref2", version="1", gold="human").precision.value == 1.0
    old = add(store, make_trajectory("t-v1"), Verdict(passed=True, verifier="ref2", version="1"))
    assert "ref2" not in store.untrusted_verifiers()
    assert prepare(store, "sft").trajectory_ids == [old.id]
    add(
        store,
        make_trajectory("t-v2", answer="The sum is 6."),
        Verdict(passed=True, verifier="ref2", version="2"),
    )
    assert "ref2" in store.untrusted_verifiers()  # v2 labels now, and nobody audited it
    assert len(prepare(store, "sft").dataset) == 0

    erred = Verdict(passed=True, verifier="reference", evidence={"error": "Timeout"})
    t = add(store, make_trajectory("t-erred"))
    with pytest.raises(ValueError, match="passes and reports an error"):
        store.add_verdict(t.id, erred)
    assert verdict_row(t.id, erred, datetime.now(UTC))["passed"] is None  # what a Worker stores

    paused = make_trajectory("t-paused")
    paused.status = "interrupted"
    add(store, paused, True)
    with pytest.raises(ValueError, match="paused at an interrupt"):
        prepare(store, "sft", ids=[paused.id])


def test_explicit_requests_for_heldout_data_raise(store: TrajectoryStore) -> None:
    train = add(store, make_trajectory("train-1"), True)
    held = add(store, make_trajectory("held-1", split="heldout"), True)
    unsplit = add(store, make_trajectory("held-1", split=None), True)
    with pytest.raises(HeldOutLeak, match="held-out split"):
        prepare(store, "sft", split="heldout")
    with pytest.raises(HeldOutLeak, match="held-1"):
        prepare(store, "sft", ids=[train.id, held.id])
    with pytest.raises(HeldOutLeak):
        prepare(store, "sft", ids=[unsplit.id])  # its task is held out, whatever its own split
    with pytest.raises(HeldOutLeak):
        prepare(store, "sft", task_ids=["train-1", "held-1"])
    hashed = next(f"h{i}" for i in range(100) if task_hash(f"h{i}") < 0.5)
    with pytest.raises(HeldOutLeak):
        prepare(store, "sft", task_ids=[hashed], heldout_fraction=0.5)
    demo = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "5"}]}
    for leaked in ({**demo, "task_id": "held-1"}, {**demo, "split": "heldout"}):
        with pytest.raises(HeldOutLeak):
            prepare(store, "sft", external=[demo, leaked], external_ratio=0.5)
    with pytest.raises(TrajectoryNotFound):
        prepare(store, "sft", ids=["no-such-id"])
    assert prepare(store, "sft", ids=[train.id]).trajectory_ids == [train.id]
    assert prepare(store, "sft", task_ids=["train-1"]).dataset["task_id"] == ["train-1"]


# -- dedupe, caps, external data ---------------------------------------------------------------


def test_duplicates_are_dropped_and_tasks_capped_deterministically(store: TrajectoryStore) -> None:
    for _ in range(3):
        add(store, make_trajectory("same"), True)  # identical conversations (ids differ)
    for a in range(10):
        add(store, make_trajectory("many", a=a), True)
    data = prepare(store, "sft", max_per_task=4)
    assert Counter(data.dataset["task_id"]) == {"same": 1, "many": 4}
    assert data.counts["duplicates"] == 2 and data.counts["capped"] == 6
    assert prepare(store, "sft", max_per_task=4).trajectory_ids == data.trajectory_ids
    picks = {tuple(prepare(store, "sft", max_per_task=4, seed=s).trajectory_ids) for s in range(5)}
    assert len(picks) > 1
    assert len(prepare(store, "sft", max_per_task=None).dataset) == 11
    assert len(prepare(store, "sft", limit=5).dataset) == 5  # the newest five


def test_external_rows_make_up_the_requested_ratio(store: TrajectoryStore) -> None:
    for i in range(4):
        add(store, make_trajectory(f"t{i}"), True)
    demos = [
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"What is {i} plus 1?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "type": "function",
                            "function": {"name": "add", "arguments": f'{{"a": {i}, "b": 1}}'},
                        }
                    ],
                },
                {"role": "tool", "content": str(i + 1)},
                {"role": "assistant", "content": f"It is {i + 1}."},
            ],
            "tools": json.dumps([ADD_SCHEMA]),  # the suites' demonstrations carry tools as text
            "task_id": f"demo-{i}",
        }
        for i in range(10)
    ]
    data = prepare(store, "sft", external=demos, external_ratio=0.5)
    assert data.counts["external"] == 4 and len(data.dataset) == 8
    external = [row for row in data.dataset if row["trajectory_id"] is None]
    assert len(external) == 4 and all(row["tools"] == [ADD_SCHEMA] for row in external)
    assert external[0]["messages"][2]["tool_calls"][0]["function"]["name"] == "add"
    assert data.counts["pretokenized"] == 0
    # More than there are: drawn with replacement.
    few = prepare(store, "sft", external=demos[:2], external_ratio=0.8)
    assert few.counts["external"] == 16 and len(few.dataset) == 20
    # Only demonstrations (a warm start): every external row once.
    warm = prepare(store, "sft", external=demos, external_ratio=1.0)
    assert sorted(warm.dataset["task_id"]) == sorted(f"demo-{i}" for i in range(10))
    assert warm.trajectory_ids == [] and warm.counts["external"] == 10
    # From a datasets.Dataset too; in KTO they are desirable completions.
    from datasets import Dataset

    kto = prepare(store, "kto", external=Dataset.from_list(demos), external_ratio=0.5)
    assert Counter(kto.dataset["label"]) == {True: 8}
    with pytest.raises(ValueError, match="external"):
        prepare(store, "dpo", external=demos, external_ratio=0.5)


def test_targeted_external_rows_help_only_the_tasks_that_never_pass(store: TrajectoryStore) -> None:
    add(store, make_trajectory("solved"), True)
    add(store, make_trajectory("solved", answer="The sum is 6."), False)
    for answer in ("The sum is 6.", "The sum is 7."):
        add(store, make_trajectory("stuck", answer=answer), False)
    add(store, make_trajectory("h1", split="heldout"), False)
    demo = chat_demo(1)
    demos = [{**demo, "task_id": task} for task in ("solved", "stuck", "unseen")]
    data = prepare(store, "sft", external=demos, external_for="stuck")
    assert data.counts["external"] == 1 and data.counts["external_stuck_tasks"] == 1
    assert sorted(data.dataset["task_id"]) == ["solved", "stuck"]  # its own pass, the stuck task's demo
    # The untargeted mix at the same ratio draws from every demonstration.
    mixed = prepare(store, "sft", external=demos, external_ratio=0.5)
    assert mixed.counts["external"] == 1 and "external_stuck_tasks" not in mixed.counts
    # Nothing stuck: no external row at all; held-out tasks never count as stuck.
    add(store, make_trajectory("stuck"), True)
    assert prepare(store, "sft", external=demos, external_for="stuck").counts["external"] == 0
    with pytest.raises(ValueError, match="external_for"):
        prepare(store, "sft", external=demos, external_for="some")
    with pytest.raises(ValueError, match="external data mixes"):
        prepare(store, "dpo", external=demos, external_for="stuck")


def chat_demo(i: int) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"What is {i} plus 1?"},
            {"role": "assistant", "content": f"It is {i + 1}."},
        ],
        "tools": json.dumps([ADD_SCHEMA]),
    }


# -- method formats ----------------------------------------------------------------------------


def test_kto_rows_are_prompt_completion_label(store: TrajectoryStore) -> None:
    add(store, make_trajectory("t1"), True)
    add(store, make_trajectory("t1", answer="The sum is 6."), False)
    add(store, make_trajectory("t2"))  # unlabeled: not in a verified KTO set
    data = prepare(store, "kto")
    rows = sorted(data.dataset, key=lambda r: not r["label"])
    assert [(r["task_id"], r["label"]) for r in rows] == [("t1", True), ("t1", False)]
    assert [m["role"] for m in rows[0]["prompt"]] == ["system", "user"]
    assert [m["role"] for m in rows[0]["completion"]] == ["assistant", "tool", "assistant"]
    assert rows[1]["completion"][-1]["content"] == "The sum is 6."
    assert rows[0]["tools"] == [ADD_SCHEMA]
    unverified = prepare(store, "kto", verified=False)
    assert Counter(unverified.dataset["label"]) == {True: 3}


def test_a_later_turns_earlier_turns_are_prompt_never_completion(store: TrajectoryStore) -> None:
    earlier = [
        {"role": "user", "content": "What is 1 plus 1?"},
        {"role": "assistant", "content": "It is 11."},
    ]
    add(store, make_trajectory("t1", history=earlier), True)
    add(store, make_trajectory("t1", history=earlier, answer="The sum is 6."), False)
    for method, completion in (("kto", "completion"), ("dpo", "chosen"), ("dpo", "rejected")):
        row = prepare(store, method).dataset[0]
        # The verdict judged this turn: the earlier answer is input, not something to push up or down.
        assert [m["role"] for m in row["prompt"]] == ["system", "user", "assistant", "user"], method
        assert row["prompt"][-1]["content"] == question("t1")
        assert [m["role"] for m in row[completion]] == ["assistant", "tool", "assistant"], method
    prompt = prepare(store, "grpo").dataset["prompt"][0]
    assert [m["content"] for m in prompt][1:] == ["What is 1 plus 1?", "It is 11.", question("t1")]


def test_dpo_pairs_a_pass_with_a_failure_of_the_same_task_input(store: TrajectoryStore) -> None:
    add(store, make_trajectory("t1"), True)
    add(store, make_trajectory("t1", answer="The sum is 6."), False)
    add(store, make_trajectory("t1", answer="The sum is 7."), False)
    add(store, make_trajectory("t2"), True)  # no failure to pair with
    add(store, make_trajectory("t3", answer="no"), False)  # no pass
    # Same task, another system prompt: a different input, never paired across.
    add(store, make_trajectory("t4", system="Be brief."), True)
    add(store, make_trajectory("t4", answer="The sum is 9."), False)
    data = prepare(store, "dpo")
    rows = list(data.dataset)
    assert Counter(r["task_id"] for r in rows) == {"t1": 2}
    for r in rows:
        assert r["prompt"][1]["content"] == question("t1")
        assert r["chosen"][-1]["content"] == "The sum is 5."
        assert r["rejected"][-1]["content"] in ("The sum is 6.", "The sum is 7.")
    assert {r["rejected"][-1]["content"] for r in rows} == {"The sum is 6.", "The sum is 7."}
    assert len(data.trajectory_ids) == 3
    assert len(prepare(store, "dpo", max_per_task=1).dataset) == 1


def test_grpo_rows_are_train_tasks_weighted_by_curriculum(store: TrajectoryStore) -> None:
    for passed in (True, False, True, False):  # learnable: p = 0.5
        add(store, make_trajectory("mid", metadata={"expected": "5", "slice": "add"}), passed)
    for _ in range(2):
        add(store, make_trajectory("solved", a=1), True)
    for _ in range(2):
        add(store, make_trajectory("stuck", a=4), False)
    add(store, make_trajectory("new", a=7))  # no verdict yet
    add(store, make_trajectory("held", split="heldout"), True)
    data = prepare(store, "grpo")
    counts = Counter(data.dataset["task_id"])
    assert counts == {"mid": 4, "new": 4, "solved": 1, "stuck": 1}
    assert data.stuck == ["stuck"]
    assert data.weights["mid"] > data.weights["solved"] and data.weights["mid"] > data.weights["stuck"]
    row = next(r for r in data.dataset if r["task_id"] == "mid")
    assert json.loads(row["metadata"]) == {"expected": "5", "slice": "add"}
    assert row["split"] == "train"
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]


def test_curriculum_weights_and_pass_rates(store: TrajectoryStore) -> None:
    weights, stuck = curriculum_weights({"a": (1, 2), "b": (3, 3), "c": (0, 4), "d": (1, 4)})
    assert stuck == ["c"]
    assert abs(sum(weights.values()) - 1.0) < 1e-9
    assert weights["a"] > weights["d"] > weights["b"] == weights["c"] > 0
    assert curriculum_weights({}) == ({}, [])
    add(store, make_trajectory("x"), True)
    add(store, make_trajectory("x", a=1), False)
    add(store, make_trajectory("x", a=2), error_verdict())  # not an attempt with a label
    add(store, make_trajectory("y", agent="other"), True)
    assert task_pass_rates(store) == {"x": (1, 2), "y": (1, 1)}
    assert task_pass_rates(store, agent="other") == {"y": (1, 1)}


# -- recorded token ids ------------------------------------------------------------------------

IDS_A = ([5, 6, 7], [8, 9, 2], [5, 6, 7, 8, 9, 2, 10, 11], [12, 13, 2])
IDS_B = ([5, 6, 7], [8, 14, 2], [5, 6, 7, 8, 14, 2, 10, 15], [16, 2])


def test_recorded_token_ids_become_rows_verbatim(store: TrajectoryStore) -> None:
    a = add(store, make_trajectory("t1", token_ids=IDS_A), True)
    b = add(store, make_trajectory("t2", a=4, token_ids=IDS_B), True)
    data = prepare(store, "sft")
    assert data.pretokenized and data.counts["pretokenized"] == 1
    assert set(data.dataset.column_names) == {"input_ids", "completion_mask", "trajectory_id", "task_id"}
    rows = [(r["trajectory_id"], r["input_ids"], r["completion_mask"]) for r in data.dataset]
    expected = []
    for t, ids in ((a, IDS_A), (b, IDS_B)):
        for prompt, completion in ((ids[0], ids[1]), (ids[2], ids[3])):
            expected.append((t.id, prompt + completion, [0] * len(prompt) + [1] * len(completion)))
    assert rows == expected
    assert prepare(store, "distill").pretokenized
    assert not prepare(store, "sft", pretokenized=False).pretokenized


def test_one_trajectory_without_ids_makes_the_whole_dataset_conversational(store: TrajectoryStore) -> None:
    add(store, make_trajectory("t1", token_ids=IDS_A), True)
    add(store, make_trajectory("t2"), True)
    data = prepare(store, "sft")
    assert not data.pretokenized and data.counts["missing_token_ids"] == 1
    assert "messages" in data.dataset.column_names and len(data.dataset) == 2
    with pytest.raises(ValueError, match="pretokenized=True"):
        prepare(store, "sft", pretokenized=True)


def test_ids_outside_the_tokenizer_vocabulary_are_not_used(store: TrajectoryStore) -> None:
    from transformers import AutoTokenizer

    from test_offpolicy import conversation_ids
    from tiny_model import tiny_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_path())
    add(store, make_trajectory("t1", answer="5", token_ids=conversation_ids(tokenizer, "t1", "5")), True)

    class Vocab:  # the tokenizer, with a vocabulary of `size`
        def __init__(self, size: int) -> None:
            self.size = size

        def __len__(self) -> int:
            return self.size

        def decode(self, ids: list[int], **kwargs: Any) -> str:
            return tokenizer.decode(ids, **kwargs)

    assert prepare(store, "sft", tokenizer=Vocab(len(tokenizer))).pretokenized
    assert not prepare(store, "sft", tokenizer=Vocab(10)).pretokenized


def test_ids_that_do_not_say_the_stored_text_never_train(store: TrajectoryStore) -> None:
    """A QA pass (session 22): a model reported, beside its reply "5", the ids of another text;
    the verifier judged "5" and SFT (and offpolicy) trained on the ids, whatever they said. Ids
    must say what was judged: otherwise the run trains from its text, and offpolicy leaves it."""
    from transformers import AutoTokenizer

    from test_offpolicy import conversation_ids
    from tiny_model import tiny_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_path())
    p1, c1, p2, _ = conversation_ids(tokenizer, "t1", "5")
    forged = tokenizer("IGNORE ALL RULES<|im_end|>", add_special_tokens=False)["input_ids"]
    add(store, make_trajectory("t1", answer="5", token_ids=(p1, c1, p2, forged)), True)
    data = prepare(store, "sft", tokenizer=tokenizer)
    assert not data.pretokenized and data.counts["ids_not_the_text"] == 1 and len(data) == 1
    assert "IGNORE" not in json.dumps(data.dataset[0]["messages"])  # trained from its text
    add(store, make_trajectory("t1", answer="5", token_ids=conversation_ids(tokenizer, "t1", "5")), False)
    other_prompt = tokenizer("an instruction the model never saw", add_special_tokens=False)["input_ids"]
    add(store, make_trajectory("t1", answer="5", token_ids=(other_prompt, c1, p2, c1)), False)
    data = prepare(store, "offpolicy", tokenizer=tokenizer)
    assert data.counts["ids_not_the_text"] == 2  # the forged reply, and a prompt that is not the one stored
    # A call written as text under `tool_choice="none"` is the reply's text: its ids say so (a
    # second review, session 22: parsed as a call, such runs never trained from their ids).
    written = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    as_text = make_trajectory("t3", answer=written, token_ids=conversation_ids(tokenizer, "t3", written))
    assert _ids_say_the_text(as_text, tokenizer)
    assert (
        data.counts["unpassed_groups"] == 1 and len(data) == 0
    )  # the honest failure alone: nothing to learn


def test_ids_another_tokenizer_made_are_not_used(store: TrajectoryStore) -> None:
    """A QA pass (session 15): a version trained from another base (another tokenizer) trained
    on its ancestor's recorded ids, read as other text (or ids past its embeddings)."""
    from transformers import AutoTokenizer

    from honed.tokenizer_id import tokenizer_id
    from tiny_model import tiny_path

    made_it, other = AutoTokenizer.from_pretrained(tiny_path()), AutoTokenizer.from_pretrained(tiny_path())
    other.add_tokens(["<another-vocabulary>"])
    from test_offpolicy import conversation_ids

    t = make_trajectory("t1", answer="5", token_ids=conversation_ids(made_it, "t1", "5"))
    for step in t.model_steps():
        step.extra["tokenizer"] = tokenizer_id(made_it)
    add(store, t, True)
    assert prepare(store, "sft", tokenizer=made_it).pretokenized
    data = prepare(store, "sft", tokenizer=other)
    assert not data.pretokenized and data.counts["missing_token_ids"] == 1 and len(data) == 1
    assert tokenizer_id(other) != tokenizer_id(made_it)


def test_empty_selection_gives_an_empty_dataset(store: TrajectoryStore) -> None:
    add(store, make_trajectory("t1"), False)
    for method in ("sft", "kto", "dpo", "grpo", "distill"):
        data = prepare(store, method, agent="nobody")
        assert len(data) == 0 and data.counts["rows"] == 0
    with pytest.raises(ValueError, match="unknown training method"):
        prepare(store, "ppo")


def test_export_and_training_take_the_same_verified_rows(any_store: TrajectoryStore, tmp_path: Any) -> None:
    """One rule for "verified training data": `honed export --verdict pass` and `prepare(store,
    "sft")` keep the same runs. Built to make them differ before the rule had one home: a run
    passed only by a low-trust verifier, and an attempt of a held-out task captured without a
    split (the store's filter and the exporter kept both; the trainer kept neither)."""
    from honed.exporters import select_trajectories, write_jsonl

    store = any_store
    store.register_verifiers({"judge": "low"})  # a model judge: its passes are never training data
    add(store, make_trajectory("t-ok"), True)
    add(store, make_trajectory("t-judged"), Verdict(passed=True, verifier="judge"))
    add(store, make_trajectory("t-held", split="heldout"), True)
    add(store, make_trajectory("t-held", split=None), True)  # same task, captured without a split
    add(store, make_trajectory("t-failed"), False)
    add(store, make_trajectory("t-mixed"), True, Verdict(passed=False, verifier="judge"))

    out = tmp_path / "train.jsonl"
    result = write_jsonl(select_trajectories(store, verdict="pass"), out)
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    exported_users = sorted(m["content"] for row in exported for m in row["messages"] if m["role"] == "user")

    data = prepare(store, "sft", max_per_task=None)
    trained_users = sorted(
        m["content"] for row in data.dataset["messages"] for m in row if m["role"] == "user"
    )

    # `t-mixed`: the low-trust judge's fail fails it (its passes count for nothing, its fails do).
    assert exported_users == trained_users == [question("t-ok")]
    assert result.written == len(data) == 1


def test_a_cycle_learns_from_its_whole_lineage_newest_first(store: TrajectoryStore, tmp_path: Any) -> None:
    """Experience accumulates across versions (the live one and its ancestors, not a sibling), the
    per-task cap keeps the newest versions' attempts first, and the newest can be weighted up."""
    from collections import Counter

    from honed.learn.cycle import DataConfig, lineage
    from test_registry import fake_model

    folder = fake_model(tmp_path / "model")
    v1 = store.register_model("calc", folder, reason="base")
    v2 = store.register_model("calc", folder, parent=v1)
    sibling = store.register_model("calc", folder, parent=v1)  # v3: trained from v1, never promoted
    v4 = store.register_model("calc", folder, parent=v2)
    chain = lineage(store, v4)
    assert [v.ref for v in chain] == ["calc@v4", "calc@v2", "calc@v1"]
    by_id = {}
    for version, n in ((v1, 3), (v2, 3), (sibling, 2), (v4, 2)):
        for i in range(n):
            t = add(store, make_trajectory("t1", model_version=version.ref, a=10 * version.version + i), True)
            by_id[t.id] = version.ref

    def versions_of(data: Any) -> Counter[str]:
        return Counter(by_id[i] for i in data.trajectory_ids)

    accumulated = prepare(store, "sft", **DataConfig(max_per_task=4).filters(v4, chain))
    assert versions_of(accumulated) == {"calc@v4": 2, "calc@v2": 2}  # newest first under the cap
    assert accumulated.versions["calc@v4"] == {"n": 2, "passed": 2, "failed": 0}
    # By default the live version's own rows count twice against its ancestors' (the measured default).
    assert len(accumulated) == 4 + 2 and accumulated.counts["weighted_up"] == 2
    assert Counter(accumulated.dataset["trajectory_id"]) == {
        i: 2 if v == "calc@v4" else 1 for i, v in by_id.items() if i in accumulated.trajectory_ids
    }
    everything = prepare(store, "sft", **DataConfig(max_per_task=None).filters(v4, chain))
    assert versions_of(everything) == {"calc@v4": 2, "calc@v2": 3, "calc@v1": 3}  # not the sibling
    live_only = prepare(store, "sft", **DataConfig(versions="live").filters(v4, chain))
    assert versions_of(live_only) == {"calc@v4": 2}
    once = prepare(store, "sft", **DataConfig(max_per_task=4, newest_weight=1).filters(v4, chain))
    assert len(once) == 4 and once.counts["weighted_up"] == 0
    weighted = prepare(store, "sft", **DataConfig(max_per_task=4, newest_weight=3).filters(v4, chain))
    assert len(weighted) == 4 + 2 * 2 and weighted.counts["weighted_up"] == 4
    rows = Counter(weighted.dataset["trajectory_id"])
    assert all(rows[i] == 3 for i, v in by_id.items() if v == "calc@v4")
    # The live version passing exactly as an ancestor did: its copy is the one kept, and weighted up
    # (the oldest copy was kept, counted once and credited to the ancestor).
    add(store, make_trajectory("t2", model_version=v1.ref, a=7), True)
    repeat = add(store, make_trajectory("t2", model_version=v4.ref, a=7), True)
    data = prepare(store, "sft", **DataConfig(max_per_task=4).filters(v4, chain))
    assert repeat.id in data.trajectory_ids and Counter(data.dataset["trajectory_id"])[repeat.id] == 2


def test_a_heldout_question_asked_another_way_or_quoted_in_an_answer_never_trains(
    any_store: TrajectoryStore,
) -> None:
    """An operator's QA pass (session 21): a held-out graph input `{"question": Q}` and a chat run
    asking Q; an answer quoting a held-out question with its answer; "2+3" against "2 + 3"."""
    import dataclasses

    from honed.store.select import select_trajectories

    store = any_store
    q = "Which city is the capital of the fictional land of Sylvania?"
    add(store, dataclasses.replace(make_trajectory("h1", split="heldout"), task={"question": q}), True)
    add(store, make_trajectory("h2", split="heldout", user="What is 2+3?"), True)
    leaks = [
        add(store, make_trajectory("t1", user=q.lower()), True),
        add(store, make_trajectory("t2", user="Quiz me.", answer=f"Q: {q} A: Sylvania City."), True),
        add(store, make_trajectory("t3", user="what is 2 + 3"), True),
    ]
    kept = add(store, make_trajectory("t4", user="what is 2 + 4"), True)
    # A field many tasks share is context, not the question (a review, session 21: held out too).
    shared_context = {"question": "first held-out one?", "format": "markdown please"}
    add(store, dataclasses.replace(make_trajectory("h3", split="heldout"), task=shared_context), True)
    shared = add(store, make_trajectory("t5", user="markdown please"), True)
    # ... and so is a question field's value that several held-out tasks share (a second review, session
    # 21: a shared `task` instruction held every training run asking it out); one task's `problem` is its question.
    tutor = "You are a patient tutor; answer step by step."
    for i in (4, 5):
        add(store, dataclasses.replace(make_trajectory(f"h{i}", split="heldout"),
                                       task={"task": tutor, "question": f"held-out question number {i}?"}), True)  # fmt: skip
    add(store, dataclasses.replace(make_trajectory("h6", split="heldout"),
                                   task={"problem": "Find x when 3x + 1 = 10, exactly."}), True)  # fmt: skip
    tutored = add(store, make_trajectory("t6", user=tutor), True)
    problem = add(store, make_trajectory("t7", user="find x when 3x+1=10, exactly"), True)
    assert set(prepare(store, "sft").trajectory_ids) == {kept.id, shared.id, tutored.id}
    assert {t.id for t in select_trajectories(store, verdict="pass")} == {kept.id, shared.id, tutored.id}
    assert problem.id
    assert all(t.id for t in leaks)
    # ... but the same question two held-out tasks ask in two formats is their question, not
    # context (a review, session 22: the rule above trained a chat run asking it, and export had it).
    sylvania = "Which city is the capital of the fictional land of Sylvania?"
    for i, style in ((8, "json"), (9, "plain text")):
        add(store, dataclasses.replace(make_trajectory(f"h{i}", split="heldout"),
                                       task={"question": sylvania, "format": style}), True)  # fmt: skip
    add(store, make_trajectory("t8", user=sylvania), True)
    capital = "What is the capital city of Australia, and why was it built?"
    for i, style in (
        (10, "answer in json"),
        (11, "answer in one word"),
    ):  # the format in a field that may ask
        add(store, dataclasses.replace(make_trajectory(f"h{i}", split="heldout"),
                                       task={"question": capital, "instruction": style}), True)  # fmt: skip
    add(store, make_trajectory("t10", user=capital), True)
    add(
        store, dataclasses.replace(make_trajectory("t9"), task={"question": sylvania, "format": "yaml"}), True
    )
    assert set(prepare(store, "sft").trajectory_ids) == {kept.id, shared.id, tutored.id}
    assert {t.id for t in select_trajectories(store, verdict="pass")} == {kept.id, shared.id, tutored.id}


def test_a_heldout_question_in_reasoning_tool_arguments_lookalike_letters_or_one_sentence_never_trains(
    any_store: TrajectoryStore,
) -> None:
    """A QA pass (session 23): a training run whose model wrote a held-out question and its answer
    in a tool call's arguments or in its reasoning; the question in Cyrillic letters that look
    Latin; a short held-out question asked as one sentence of a longer request."""
    from honed.store.select import select_trajectories

    store = any_store
    q = "What is the boiling point of ethanol at sea level in kelvin"
    add(store, make_trajectory("h1", split="heldout", user=q), True)
    add(store, make_trajectory("h2", split="heldout", user="What is 17*23?"), True)
    in_arguments = make_trajectory("t1", user="save a chemistry note")
    in_arguments.steps[0].output["tool_calls"][0]["args"] = {"a": 2, "b": 3, "note": f"{q}? 351.4 K"}
    lookalike = q.translate(str.maketrans("aeoc", "\u0430\u0435\u043e\u0441"))
    assert lookalike != q
    leaks = [
        add(store, in_arguments, True),
        add(store, make_trajectory("t2", user="save a note", reasoning=f"Recall: {q}? It is 351.4 K."), True),
        add(store, make_trajectory("t3", user=lookalike), True),
        add(store, make_trajectory("t4", user="Quick quiz for you. What is 17*23?"), True),
    ]
    kept = add(store, make_trajectory("t5", user="Quick quiz for you. What is 17*24?"), True)
    assert all(t.id for t in leaks)
    assert set(prepare(store, "sft").trajectory_ids) == {kept.id}
    assert {t.id for t in select_trajectories(store, verdict="pass")} == {kept.id}


def test_greetings_shared_with_a_heldout_run_hold_nothing_out_but_its_question_in_capitals_or_a_tool_does(
    any_store: TrajectoryStore,
) -> None:
    """A review (session 23): a held-out chat opening "Hi!" held out every training run opening
    so (each request's sentences were compared); its question in Cyrillic or Greek capitals, or
    with its answer in a tool's description, still trained."""
    import dataclasses

    store = any_store
    q = "How many moons does Mars have"
    add(store, make_trajectory("h1", split="heldout", user="Hi!"), True)
    add(store, make_trajectory("h2", split="heldout", user=q), True)
    greeted = add(
        store, make_trajectory("t1", user="Hi! Can you help me plan a 3-day trip to Lisbon in May?"), True
    )
    thanked = add(store, make_trajectory("t2", user="Thanks. Now convert the table to CSV please."), True)
    capitals = add(
        store, make_trajectory("t3", user=q.upper().translate(str.maketrans("HMAO", "НМΑΟ"))), True
    )
    tool = {**ADD_SCHEMA, "function": {**ADD_SCHEMA["function"], "description": f"{q}? Two: Phobos, Deimos."}}
    described = add(store, make_trajectory("t4", user="add two numbers", tools=[tool]), True)
    assert capitals.id and described.id
    assert set(prepare(store, "sft").trajectory_ids) == {greeted.id, thanked.id}
    assert dataclasses.is_dataclass(greeted)


def test_a_short_heldout_question_after_a_greeting_is_held_out(any_store: TrajectoryStore) -> None:
    """A second review (session 23): after the greeting rule, "Hi there! What's 2+2?" trained."""
    store = any_store
    for i, q in enumerate(("What's 2+2?", "Who is Ada?")):
        add(store, make_trajectory(f"h{i}", split="heldout", user=q), True)
    leaks = [
        add(store, make_trajectory(f"t{i}", user=f"Hi there! {q}"), True)
        for i, q in enumerate(("What's 2+2?", "Who is Ada?"))
    ]
    kept = add(store, make_trajectory("t9", user="Hi there! Who is Bob?"), True)
    assert all(t.id for t in leaks)
    assert set(prepare(store, "sft").trajectory_ids) == {kept.id}


def test_a_short_heldout_question_mid_sentence_or_after_a_long_document_is_held_out(
    any_store: TrajectoryStore,
) -> None:
    """A QA pass (session 23): a short held-out question ("What is 17*23?", too short to be looked
    for inside other text as the long ones are) trained in the middle of a sentence, or after a
    document of 4 KB (whose sentences are not split). A specific one is now looked for as whole
    words anywhere; a generic one ("Summarize this.") still holds out nothing but itself."""
    store = any_store
    for i, q in enumerate(("What is 17*23?", "What is the capital of Peru?", "Summarize this.")):
        add(store, make_trajectory(f"h{i}", split="heldout", user=q), True)
    document = "The quarterly report lists revenue, costs and staff by region. " * 80
    leaks = [
        add(store, make_trajectory("t1", user="Quick one: what is 17*23, thanks"), True),
        add(store, make_trajectory("t2", user=f"{document}\nNow, what is 17 * 23?"), True),
        add(store, make_trajectory("t3", user=f"{document} And what is the capital of Peru"), True),
    ]
    kept = [
        add(store, make_trajectory("t4", user="Quick one: what is 17*234, thanks"), True),
        add(store, make_trajectory("t5", user=f"{document}\nSummarize this. Then what is 17+23?"), True),
        add(store, make_trajectory("t6", user="What is the capital of Peruvian cooking, Lima?"), True),
    ]
    assert len(document) > 4096 and all(t.id for t in leaks)
    assert set(prepare(store, "sft").trajectory_ids) == {t.id for t in kept}


def test_a_heldout_question_behind_variation_selectors_small_capitals_underscores_or_entities_never_trains(
    any_store: TrajectoryStore,
) -> None:
    """A QA pass (session 25): a held-out question identical on screen (variation selectors after
    its letters, an Armenian "օ", a small-capital "ɪ"), written with `_` between its words or with
    HTML's `&nbsp;`, trained."""
    store = any_store
    q = "What is the boiling point of ethanol at sea level in kelvin"
    add(store, make_trajectory("h1", split="heldout", user=q), True)
    leaks = [
        add(store, make_trajectory("t1", user="\ufe0f".join(q)), True),
        add(store, make_trajectory("t2", user=q.replace("o", "\u0585")), True),
        add(store, make_trajectory("t3", user=q.replace("i", "\u026a")), True),
        add(store, make_trajectory("t4", user=q.replace(" ", "_")), True),
        add(store, make_trajectory("t5", user=q.replace(" ", "&nbsp;")), True),
    ]
    kept = add(
        store, make_trajectory("t6", user="What is the boiling point of water at sea level in kelvin"), True
    )
    assert all(t.id for t in leaks)
    assert set(prepare(store, "sft").trajectory_ids) == {kept.id}


def test_a_heldout_question_in_an_anthropic_tool_result_block_is_read() -> None:
    """... and in an Anthropic `tool_result` block, whose text sits in blocks of its own."""
    from honed.store.select import conversation_key, request_key

    q = "What is the boiling point of ethanol at sea level in kelvin"
    block = {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": f"{q}? 351 K"}]}
    assert request_key(q) in conversation_key({"messages": [{"role": "user", "content": [block]}]})


def test_token_rows_are_the_agents_own_model_calls_only(store: TrajectoryStore) -> None:
    """A QA pass (session 25): token-level rows were built from every model call of the run: a
    subagent's calls (under a tool step, another model) and a summariser's were trained under the
    run's verdict as the agent's own, their logprobs another model's."""
    t = make_trajectory("t1", token_ids=IDS_A)
    ids = {"prompt_token_ids": [5, 6], "token_ids": [30, 31, 2], "logprobs": [-1.0] * 3}
    subagent = Step(
        id="sub-0",
        index=1,
        kind="model",
        name="writer-llm",
        parent_id="s-tool",
        input={"messages": [{"role": "user", "content": "write"}]},
        output={"role": "assistant", "content": "poem"},
        model_version="writer@v1",
        extra=dict(ids),
    )
    summary = Step(
        id="sum-0",
        index=2,
        kind="model",
        name="summarizer",
        input={"messages": [{"role": "user", "content": "sum"}]},
        output={"role": "assistant", "content": "short"},
        model_version="summarizer@v1",
        extra=dict(ids),
    )
    tool = dataclasses.replace(t.steps[1], id="s-tool")
    steps = [t.steps[0], tool, subagent, summary, t.steps[2]]
    t = dataclasses.replace(t, steps=[dataclasses.replace(s, index=i) for i, s in enumerate(steps)])
    add(store, t, True)
    data = prepare(store, "sft")
    assert data.pretokenized
    assert [r["input_ids"] for r in data.dataset] == [IDS_A[0] + IDS_A[1], IDS_A[2] + IDS_A[3]]


def test_a_reply_a_fallback_model_made_is_not_trained_as_the_agents(store: TrajectoryStore) -> None:
    """A QA pass (session 25): the primary model failed, `ModelFallbackMiddleware`'s fallback
    made the tool call, the primary answered: the row trained the fallback's call as the
    primary's, even selected by the primary's version."""
    from honed.messages import NotExportable, chat_example

    t = make_trajectory("t1")
    first = dataclasses.replace(t.steps[0], name="fallback-big", model_version="fallback@v1")
    t = dataclasses.replace(t, steps=[first, *t.steps[1:]])
    with pytest.raises(NotExportable, match="another_models_reply"):
        chat_example(t)
    assert chat_example(make_trajectory("t2"))["messages"][-1]["content"] == "The sum is 5."


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_one_attempt_judged_both_ways_makes_no_pair_and_no_row(store: TrajectoryStore, method: str) -> None:
    """A QA pass (session 25): three identical attempts judged pass, fail, fail (a flaky
    verifier) made a DPO pair of one text against itself and KTO rows of the same completion
    labelled both ways."""
    for passed in (True, False, False):
        add(store, make_trajectory("t1"), passed)
    add(store, make_trajectory("t2", a=4), True)
    add(store, make_trajectory("t2", a=4, answer="The sum is 6."), False)
    data = prepare(store, method)
    assert data.counts["contradictory"] == 2
    if method == "dpo":
        assert len(data.dataset) == 1 and data.dataset[0]["chosen"] != data.dataset[0]["rejected"]
    else:
        assert len(data.dataset) == 2 and sorted(r["label"] for r in data.dataset) == [False, True]


def test_the_held_out_check_reads_a_conversations_words_once_however_many_tasks_are_held_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Session 26 (`benchmarks/export.py`): with 500 held-out tasks, each run's words were made
    again for every held-out request: JSONL export at 120 trajectories/s, its target 2,000."""
    import honed.store.select as select_module
    from honed.store.select import HeldOut

    requests = frozenset(request_key(f"Where is order {i:06d}? It was due on Monday.") for i in range(500))
    policy = HeldOut(task_ids=frozenset(), requests=requests)
    calls = 0
    real_core = select_module.core

    def counted(text: str) -> str:
        nonlocal calls
        calls += 1
        return real_core(text)

    assert len(policy._request_cores) == 500 and policy._short_requests is None  # made before counting
    monkeypatch.setattr(select_module, "core", counted)
    run = Trajectory(
        id="r", agent="a", task={"messages": [{"role": "user", "content": "Where is order 999999?"}]}
    )
    assert policy.holds(run) is False
    assert calls == 1
    leak = Trajectory(
        id="l",
        agent="a",
        task={"messages": [{"role": "user", "content": "Where is order 000007? It was due on Monday."}]},
    )
    assert policy.holds(leak) is True


def test_a_guarded_agents_structured_answer_is_the_agents_and_trains_the_agents_calls(
    sqlite_url: str,
) -> None:
    """A QA pass (session 27): a `response_format` agent whose middleware asks a judge model
    after each reply. The answer (a tool call's arguments) matched no call's text, so the last
    call, the judge's, was the run's version and its training row: "You are a guard" -> "SAFE"."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import AgentMiddleware
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult
    from pydantic import BaseModel

    from honed.messages import chat_example, own_model_steps
    from honed.testing import ScriptedChatModel

    judge = ScriptedChatModel(model_name="judge-model")

    class Ticket(BaseModel):
        title: str
        priority: int

    class Filer(ScriptedChatModel):
        def _generate(
            self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any
        ) -> ChatResult:
            args = {"title": "printer", "priority": 2}
            message = AIMessage(content="", tool_calls=[{"name": "Ticket", "args": args, "id": "c_ticket"}])
            message.response_metadata = {"model_name": self.model_name}
            return ChatResult(generations=[ChatGeneration(message=message)])

    class Guard(AgentMiddleware):
        def after_model(self, state: Any, runtime: Any) -> None:
            judge.invoke([("system", "You are a guard. Reply SAFE or UNSAFE."), ("user", "answer SAFE")])

    store = honed.open_store(sqlite_url)
    honed.instrument(store=sqlite_url)
    try:
        agent = create_agent(
            Filer(model_name="agent-model"), [], system_prompt="File tickets.", response_format=Ticket,
            middleware=[Guard()],
        )  # fmt: skip
        expected = {"title": "printer", "priority": 2}
        agent.invoke(
            {"messages": [("user", "file a ticket for the printer")]},
            {"metadata": {"honed": {"task_id": "t1", "expected": expected}}},
        )
        assert honed.flush()
    finally:
        honed.uninstrument()
    (t,) = store.trajectories()
    assert t.model_version == "agent-model"
    assert [s.model_version for s in own_model_steps(t)] == ["agent-model"]
    row = chat_example(t)["messages"]
    assert row[0]["content"] == "File tickets." and row[-1]["tool_calls"][0]["function"]["name"] == "Ticket"


def test_the_same_model_asked_aside_is_not_trained_as_the_agents_turns() -> None:
    """A QA pass (session 27): the agent's own model also served as a guard (asked about each
    reply) and as a router: token-level rows trained its "SAFE" and its route under the answer's
    verdict, where the chat rows train the conversation alone."""
    from honed.messages import own_model_steps

    ask = {"role": "user", "content": "what is 2 plus 3?"}
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "c1", "name": "add", "args": {"a": 2, "b": 3}}],
    }
    result = {"role": "tool", "content": "5", "tool_call_id": "c1"}
    answer = {"role": "assistant", "content": "the sum is 5"}
    guard_in = [
        {"role": "system", "content": "You are a guard."},
        {"role": "user", "content": "is this safe?"},
    ]
    steps = [
        Step(id="route", index=0, kind="model", name="m", model_version="m@v1",
             input={"messages": [{"role": "system", "content": "Route: math or other."}, ask]},
             output={"role": "assistant", "content": "math"}),
        Step(id="a1", index=1, kind="model", name="m", model_version="m@v1", input={"messages": [ask]}, output=call),
        Step(id="g1", index=2, kind="model", name="m", model_version="m@v1", input={"messages": guard_in},
             output={"role": "assistant", "content": "SAFE"}),
        Step(id="a2", index=3, kind="model", name="m", model_version="m@v1",
             input={"messages": [ask, call, result]}, output=answer),
        Step(id="g2", index=4, kind="model", name="m", model_version="m@v1", input={"messages": guard_in},
             output={"role": "assistant", "content": "SAFE"}),
    ]  # fmt: skip
    t = Trajectory(id="r", agent="a", task={"messages": [ask]}, steps=steps, output="the sum is 5")
    assert [s.id for s in own_model_steps(t)] == ["a1", "a2"]


def test_a_guard_echoing_the_structured_answer_is_not_the_call_that_gave_it() -> None:
    """A QA pass (session 27): a guard model returning the agent's JSON unchanged, after it, was
    taken for the call that answered (its JSON text matched); and `{"ok": 1}` "gave" `{"ok": true}`."""
    from honed.messages import gives_structured, own_model_steps
    from honed.trajectory import STRUCTURED_KEY

    answer = {"city": "Paris", "ok": True}
    ask = {"role": "user", "content": "capital of France as JSON"}
    agent = Step(id="a", index=0, kind="model", name="agent", model_version="agent-v3", input={"messages": [ask]},
                 output={"role": "assistant", "content": "", "tool_calls": [{"name": "Answer", "args": answer, "id": "c1"}]})  # fmt: skip
    guard = Step(id="g", index=1, kind="model", name="guard", model_version="guard-v1",
                 input={"messages": [{"role": "user", "content": json.dumps(answer)}]},
                 output={"role": "assistant", "content": json.dumps(answer)})  # fmt: skip
    t = Trajectory(
        id="t", agent="bot", task={"messages": [ask]}, output={STRUCTURED_KEY: answer}, steps=[agent, guard]
    )
    assert [s.id for s in own_model_steps(t)] == ["a"]
    one = {"content": "", "tool_calls": [{"name": "Answer", "args": {"city": "Paris", "ok": 1}, "id": "c"}]}
    assert not gives_structured(one, answer)
