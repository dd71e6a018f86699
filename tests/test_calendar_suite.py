"""A suite a user writes (tests/calendar_suite.py: the README's protocol, a `GoalCheck` on the
calendar the run leaves behind) runs through the whole loop like a bundled one."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from typer.testing import CliRunner

import honed
from calendar_suite import SUITE, CalendarSuite, calendar_after
from honed.cli import app
from honed.demo import HELDOUT, TRAIN, Suite, load_suite
from honed.demo.warmstart import RECIPE
from test_tasks import replay
from tiny_model import tiny_path


def test_the_calendar_suite_keeps_the_protocol() -> None:
    suite = load_suite("calendar_suite:SUITE")
    assert isinstance(suite, Suite) and suite is SUITE
    assert {t.split for t in suite.train} == {TRAIN} and {t.split for t in suite.heldout} == {HELDOUT}
    train, heldout = {t.prompt for t in suite.train}, {t.prompt for t in suite.heldout}
    assert len(train) == 120 and len(heldout) == 40 and not train & heldout
    demos = suite.demonstrations(50, seed=1)
    assert not {d["messages"][1]["content"] for d in demos} & (train | heldout)
    assert demos == CalendarSuite().demonstrations(50, seed=1)  # deterministic
    # As many as the warm start asks for, though the world has fewer distinct requests.
    many = suite.demonstrations(RECIPE.demonstrations, seed=0)
    prompts = {d["messages"][1]["content"] for d in many}
    assert len(many) == RECIPE.demonstrations and len(prompts) < len(many) and not prompts & (train | heldout)
    assert isinstance(demos[0]["tools"], str) and suite.vocab_corpus()


def test_the_goal_check_passes_the_requested_booking_only(tmp_path: Path) -> None:
    tasks = SUITE.train[:6]
    solved = [(task, solution(task)) for task in tasks]
    scores, store = replay(SUITE, solved, tmp_path)
    assert scores.pass_at_1 == 1.0, scores.to_dict()
    booked = store.trajectories(limit=1)[0]
    assert calendar_after(booked) == [{k: booked.metadata[k] for k in ("day", "hour", "person")}]

    def wrong_hour(task, example):  # a free hour, but not the first one from the asked hour
        bad = copy.deepcopy(example)
        call = bad["messages"][4]["tool_calls"][0]["function"]
        args = json.loads(call["arguments"])
        free = [int(h) for h in bad["messages"][3]["content"].split(", ")]
        args["hour"] = next(h for h in reversed(free) if h != args["hour"])
        call["arguments"] = json.dumps(args)
        return bad

    def twice(task, example):  # the right meeting, and another one nobody asked for
        bad = copy.deepcopy(example)
        extra = copy.deepcopy(bad["messages"][4:6])
        args = json.loads(extra[0]["tool_calls"][0]["function"]["arguments"])
        free = [int(h) for h in bad["messages"][3]["content"].split(", ")]
        args["hour"] = next(h for h in free if h != args["hour"])
        extra[0]["tool_calls"][0]["function"]["arguments"] = json.dumps(args)
        extra[0]["tool_calls"][0]["id"] = extra[1]["tool_call_id"] = "call_9"
        bad["messages"][6:6] = extra
        return bad

    bad = [(task, wrong_hour(task, ex)) for task, ex in solved[:3]] + [
        (t, twice(t, ex)) for t, ex in solved[3:]
    ]
    bad_scores, _ = replay(SUITE, bad, tmp_path / "bad")
    assert bad_scores.pass_at_1 == 0.0, bad_scores.to_dict()


def solution(task):
    """The correct run for one of the suite's own tasks (its demonstrations' shape)."""
    meta = task.metadata
    after = int(task.prompt.rsplit("from ", 1)[1].split(":")[0])
    return SUITE._solved({"prompt": task.prompt, "day": meta["day"], "person": meta["person"],
                          "after": after, "hour": meta["hour"]})  # fmt: skip


def test_honed_demo_runs_the_loop_on_the_user_suite(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    args = ["demo", "--suite", "calendar_suite:SUITE", "--base", str(tiny_path()), "--cycles", "1",
            "--attempts", "1", "--train-tasks", "6", "--heldout-tasks", "3",
            "--workdir", str(tmp_path / "work"), "--report", str(tmp_path / "report.html"), "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [line["cycle"] for line in lines] == [0, 1]
    store = honed.open_store(f"sqlite:///{tmp_path / 'work' / 'demo.db'}")
    (run,) = store.training_runs("calendar-agent")
    assert run.status in ("promoted", "rejected", "nothing_to_learn"), run.reason
    attempts = store.trajectories(None, split="train", with_steps=False)
    assert len(attempts) == 6 and all(t.verdicts for t in attempts)
    assert all(v.verifier == "calendar-goal" for t in attempts for v in t.verdicts)
    assert (tmp_path / "report.html").exists()
