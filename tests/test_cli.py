"""`honed runs` and `honed show` on a store holding real captured runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from langchain.agents import create_agent
from typer.testing import CliRunner

import honed
from fakes import ToolScriptModel, make_tools
from honed.cli import app

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture
def captured(sqlite_url: str) -> str:
    agent = create_agent(ToolScriptModel(reasoning="Use the add tool."), make_tools(), name="calc",
                         middleware=[honed.Middleware(store=sqlite_url)])  # fmt: skip
    agent.invoke({"messages": [("user", 'call add {"a": 2, "b": 3}; answer it is {result}')]},
                 config={"metadata": {"honed": {"task_id": "ok-task", "split": "train"}}})  # fmt: skip
    with pytest.raises(ValueError):
        agent.invoke({"messages": [("user", 'call explode {"reason": "kaboom"}; answer no')]},
                     config={"metadata": {"honed": {"task_id": "bad-task"}}})  # fmt: skip
    honed.flush()
    return sqlite_url


def test_runs_table_and_json(captured: str) -> None:
    result = runner.invoke(app, ["runs", "--store", captured])
    assert result.exit_code == 0, result.output
    assert "2 trajectories" in result.output and "ok-task" in result.output and "bad-task" in result.output

    result = runner.invoke(app, ["runs", "--store", captured, "--json", "--status", "error"])
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [(r["task_id"], r["status"], r["n_steps"]) for r in rows] == [("bad-task", "error", 2)]
    assert "ValueError: exploded: kaboom" in rows[0]["error"]

    result = runner.invoke(app, ["runs", "--store", captured, "--json", "-n", "1"])
    assert len(result.output.splitlines()) == 1


def test_show_is_a_readable_timeline(captured: str) -> None:
    good = honed.open_store(captured).trajectories(task_id="ok-task")[0]
    result = runner.invoke(app, ["show", good.id[-12:], "--store", captured])
    assert result.exit_code == 0, result.output
    for expected in [
        "calc",
        "ok-task",
        "thinking: Use the add tool.",
        "add",
        '{"a": 2, "b": 3}',
        "= 5",
        "answer it is 5",
    ]:
        assert expected in result.output, expected

    bad = honed.open_store(captured).trajectories(task_id="bad-task")[0]
    result = runner.invoke(app, ["show", bad.id, "--store", captured])
    assert "error: ValueError: exploded: kaboom" in result.output

    result = runner.invoke(app, ["show", good.id, "--store", captured, "--json"])
    data = json.loads(result.output)
    assert [s["kind"] for s in data["steps"]] == ["model", "tool", "model"]


def test_show_unknown_id_and_unreachable_store(captured: str) -> None:
    result = runner.invoke(app, ["show", "no-such-id", "--store", captured])
    assert result.exit_code == 1 and "no trajectory" in result.output
    result = runner.invoke(app, ["runs", "--store", "postgresql+psycopg://x:pw@127.0.0.1:1/none"])
    assert result.exit_code == 2 and "cannot open the store" in result.output


def test_the_installed_command_reads_HONED_STORE(captured: str, tmp_path: Path) -> None:
    honed_bin = Path(sys.executable).parent / "honed"
    out = subprocess.run([str(honed_bin), "runs", "--json"], env={"HONED_STORE": captured, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert sorted(json.loads(line)["task_id"] for line in out.stdout.splitlines()) == ["bad-task", "ok-task"]
