"""The reward-hacking watch: a training verifier gamed while the gate's independent verdicts fall."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

import honed
from honed.cli import app
from honed.learn.watch import divergences
from honed.report import render_report
from verifier_helpers import traj

MODEL = "coder"


def _cycle(store: Any, live: str, candidate: str, before: dict[str, Any], after: dict[str, Any]) -> None:
    """One training run as the cycle records it: the gate's verifiers, both versions' evaluations."""
    run = store.start_training_run(MODEL, "sft", parent=live, config={})
    store.update_training_run(run.id, candidate=candidate, data={"gate_verifiers": ["hidden-tests"]})
    for version, metrics in ((live, before), (candidate, after)):
        store.record_eval(MODEL, version, "heldout", metrics, training_run=run.id)
    store.update_training_run(run.id, status="rejected", reason="held-out pass@1 fell")


def test_a_gamed_training_verifier_is_flagged_in_status_and_the_report(
    store_url: str, tmp_path: Path
) -> None:
    store = honed.open_store(store_url)
    # Honest progress: both the training verifier and the gate go up -> nothing to flag.
    _cycle(
        store, "coder@v1", "coder@v2",
        {"pass_at_1": 0.40, "by_verifier": {"tests": 0.50, "hidden-tests": 0.40}},
        {"pass_at_1": 0.55, "by_verifier": {"tests": 0.70, "hidden-tests": 0.55}},
    )  # fmt: skip
    assert divergences(store, MODEL) == []
    # The candidate passes the visible tests more and the hidden ones less: the verifier is gamed.
    _cycle(
        store, "coder@v2", "coder@v3",
        {"pass_at_1": 0.55, "by_verifier": {"tests": 0.70, "hidden-tests": 0.55}},
        {"pass_at_1": 0.30, "by_verifier": {"tests": 0.95, "hidden-tests": 0.30}},
    )  # fmt: skip
    [flag] = divergences(store, MODEL)
    assert (flag.verifier, flag.live, flag.candidate) == ("tests", "coder@v2", "coder@v3")
    assert (flag.train_from, flag.train_to, flag.gate_from, flag.gate_to) == (0.70, 0.95, 0.55, 0.30)

    result = CliRunner().invoke(app, ["status", MODEL, "--store", store_url, "--json"])
    assert result.exit_code == 0, result.output
    [model] = json.loads(result.output)["models"]
    assert [f["verifier"] for f in model["reward_hacking"]] == ["tests"]
    shown = CliRunner().invoke(app, ["status", MODEL, "--store", store_url], env={"COLUMNS": "300"})
    assert "reward-hacking watch" in shown.output and "tests may be gamed" in shown.output
    page = render_report(store, model=MODEL)
    assert 'id="watch"' in page and "tests may be gamed" in page
    store.close()


def test_the_gates_own_verifier_is_never_its_own_witness(store_url: str) -> None:
    """Only an independent gate can say a verifier is gamed: a gate that uses the training
    verifier itself (no hidden tests) flags nothing."""
    store = honed.open_store(store_url)
    run = store.start_training_run(MODEL, "sft", parent="coder@v1", config={})
    store.update_training_run(run.id, candidate="coder@v2", data={"gate_verifiers": ["tests"]})
    store.record_eval(MODEL, "coder@v1", "heldout", {"pass_at_1": 0.6, "by_verifier": {"tests": 0.6}})
    store.record_eval(MODEL, "coder@v2", "heldout", {"pass_at_1": 0.3, "by_verifier": {"tests": 0.3}})
    assert divergences(store, MODEL) == []
    store.close()


def test_the_coding_suite_gates_on_hidden_tests_a_visible_only_solution_fails() -> None:
    """Training's visible tests check two probes; the gate's hidden ones every probe. Code that
    special-cases the visible probes passes training's verifier and fails the gate's."""
    from honed.demo import CodingSuite
    from honed.demo.coding import VISIBLE
    from honed.demo.suite import gate_verifiers

    suite = CodingSuite(train_size=5, heldout_size=5)
    task = suite.train[0]
    name = task.prompt.split("`def ")[1].split("(")[0]
    table = {}
    for line in task.metadata["tests"].splitlines():
        if line.strip().startswith("assert"):
            call, expected = line.split("==")
            table[int(call.split("(")[1].split(")")[0])] = int(expected)
    assert sorted(table) == sorted(VISIBLE)
    gamed = f"def {name}(x):\n    return {table!r}.get(x, 0)"
    attempt = traj("gamed", gamed, **task.honed_metadata())
    [training] = suite.verifiers()
    [gate] = gate_verifiers(suite)
    assert gate.name == "hidden-tests" and training.name != gate.name
    assert training.verify(attempt).passed is True
    assert gate.verify(attempt).passed is False
