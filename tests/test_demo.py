"""`honed demo` end to end on a suite the user brings (`--suite module:SUITE`), through the CLI."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import honed
from honed.cli import app
from tiny_model import tool_model_path

FIELDS = {"cycle", "heldout_pass_at_1", "pass_at_8", "train_pass_rate", "trajectories", "promoted", "reason"}


def test_demo_runs_the_loop_on_a_user_suite_and_writes_the_report(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    report = tmp_path / "report.html"
    args = ["demo", "--suite", "adder_suite:Adder", "--base", str(tool_model_path()), "--cycles", "1",
            "--attempts", "2", "--workdir", str(tmp_path / "work"), "--report", str(report), "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [line["cycle"] for line in lines] == [0, 1]
    # Off a terminal a bar draws nothing: each phase says it started, on stderr (stdout is JSON).
    assert "cycle 1: attempts ..." in result.stderr and "cycle 1: attempts" not in result.stdout
    assert all(line.keys() >= FIELDS for line in lines)
    base, first = lines
    assert (
        base["promoted"] is None and base["train_pass_rate"] is None and base["version"] == "adder-agent@v1"
    )
    assert first["trajectories"] == 8 and 0.0 <= first["train_pass_rate"] <= 1.0
    assert isinstance(first["promoted"], bool) and first["reason"]

    store = honed.open_store(f"sqlite:///{tmp_path / 'work' / 'demo.db'}")
    run = store.training_runs("adder-agent")[0]
    recipe = run.config["method"]["settings"]  # the demo's own recipe, not TRL's defaults
    assert recipe["learning_rate"] == 1e-4 and recipe["lr_scheduler_type"] == "constant"
    assert recipe["num_train_epochs"] == 4 and recipe["activation_checkpointing"] is False
    # At temperature 1 the memorised answer is rare: the cycle may rightly find nothing to learn.
    assert run.reason == first["reason"]
    assert run.status == "promoted" if first["promoted"] else run.status in ("rejected", "nothing_to_learn")
    assert store.live_version("adder-agent").version == (2 if first["promoted"] else 1) and first[
        "version"
    ] == (store.live_version("adder-agent").ref)
    evals = store.eval_runs("adder-agent", split="heldout")
    assert evals[0].metrics["samples"] == 8 and evals[0].metrics["tasks"] == 6
    page = report.read_text()
    assert "adder-agent@v1" in page and html.escape(first["reason"][:40]) in page and "<svg" in page


@pytest.mark.parametrize("method", ["dpo", "offpolicy"])
def test_demo_with_a_method_that_takes_no_demonstrations(method: str, tmp_path: Path) -> None:
    """DPO, GRPO and off-policy rows cannot be external demonstrations: the loop leaves them out
    for such a method rather than failing every cycle. Off-policy learns from the attempts the
    served model captured, with the logprobs it recorded."""
    torch.set_num_threads(1)
    args = ["demo", "--suite", "adder_suite:Adder", "--base", str(tool_model_path()), "--cycles", "1",
            "--attempts", "2", "--method", method, "--workdir", str(tmp_path / "work"),
            "--report", str(tmp_path / "report.html"), "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    store = honed.open_store(f"sqlite:///{tmp_path / 'work' / 'demo.db'}")
    (run,) = store.training_runs("adder-agent")
    assert run.method == method and run.status != "failed", run.reason
    assert "external" not in run.reason
    if method == "offpolicy":  # the demo's recipe; every attempt carried its recorded logprobs
        assert run.config["method"]["settings"]["learning_rate"] == 1e-4
        assert run.config["method"]["settings"]["num_train_epochs"] == 4
        assert "logprobs" not in run.reason


def test_a_workdir_whose_models_no_demo_made_is_refused_not_emptied(tmp_path: Path) -> None:
    """A QA pass (session 20, a new user): `honed demo --workdir .` deleted the project's own
    `models` folder. Only an earlier demo's store and models are replaced."""
    from honed.demo.loop import fresh_store_url

    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "models" / "mine.safetensors").write_bytes(b"weights")
    with pytest.raises(FileExistsError, match="was not made by `honed demo`"):
        fresh_store_url(project)
    assert (project / "models" / "mine.safetensors").read_bytes() == b"weights"
    result = CliRunner().invoke(app, ["demo", "--workdir", str(project), "--cycles", "0"])
    assert result.exit_code == 1 and "not made by `honed demo`" in result.output
    work = tmp_path / "work"
    url = fresh_store_url(work)  # a new folder: made, marked
    (work / "models" / "agent").mkdir(parents=True)
    assert fresh_store_url(work) == url and not (work / "models").exists()  # an earlier demo's: replaced
