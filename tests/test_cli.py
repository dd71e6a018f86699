"""`honed runs` and `honed show` on a store holding real captured runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    # A list cut by --limit says so (a QA pass, session 17: "20 trajectories" of 330).
    result = runner.invoke(app, ["runs", "--store", captured, "--limit", "1"], env={"COLUMNS": "200"})
    assert "1 of 2 trajectories" in result.output, result.output

    result = runner.invoke(app, ["runs", "--store", captured, "--json", "--status", "error"])
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [(r["task_id"], r["status"], r["n_steps"]) for r in rows] == [("bad-task", "error", 2)]
    assert "ValueError: exploded: kaboom" in rows[0]["error"]

    result = runner.invoke(app, ["runs", "--store", captured, "--json", "-n", "1"])
    assert len(result.output.splitlines()) == 1
    # A name no run has printed an empty table (a QA pass, session 26): said, as export says it.
    for typo, said in (
        (["--split", "bogus"], "no stored runs have split 'bogus'"),
        (["--task-id", "nope"], "task id 'nope'"),
    ):
        result = runner.invoke(app, ["runs", "--store", captured, *typo])
        assert result.exit_code == 1 and said in result.output, result.output
    result = runner.invoke(app, ["runs", "--store", captured, "--status", "interrupted"])  # a filter, no name
    assert result.exit_code == 0, result.output
    # `--from` without `--replay` listed every spool and said nothing of it.
    result = runner.invoke(app, ["spool", "--from", captured.removeprefix("sqlite:///")])
    assert result.exit_code == 2 and "give --replay too" in result.output, result.output


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
    # Piped or logged (no COLUMNS), a line was cut at 80 columns: the run's status and error went
    # (a QA pass, session 22).
    piped = CliRunner().invoke(app, ["show", bad.id, "--store", captured], env={"COLUMNS": None})
    header = next(line for line in piped.output.splitlines() if "bad-task" in line)
    assert len(header) > 80 and header.endswith("error: ValueError: exploded: kaboom"), piped.output

    result = runner.invoke(app, ["show", good.id, "--store", captured, "--json"])
    data = json.loads(result.output)
    assert [s["kind"] for s in data["steps"]] == ["model", "tool", "model"]


def test_control_characters_a_user_typed_never_reach_the_operators_terminal(sqlite_url: str) -> None:
    """A QA pass (session 15): `honed show` and `honed runs` printed a captured message's ESC
    sequences raw (set the terminal's title, clear the screen)."""
    hostile = "hi \x1b]0;owned\x07\x1b[2J\x9b31m there"
    agent = create_agent(
        ToolScriptModel(), make_tools(), name="calc\x1b[5m", middleware=[honed.Middleware(store=sqlite_url)]
    )
    agent.invoke(
        {"messages": [("user", f"answer {hostile}")]}, config={"metadata": {"honed": {"task_id": "t\x1b[1m"}}}
    )
    honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    for command in (["show", t.id], ["runs"]):
        output = runner.invoke(app, [*command, "--store", sqlite_url]).output
        assert not any(c in output for c in "\x1b\x07\x9b"), (command, output)
        assert "\\x1b" in output


def test_show_unknown_id_and_unreachable_store(captured: str) -> None:
    result = runner.invoke(app, ["show", "no-such-id", "--store", captured])
    assert result.exit_code == 1 and result.output.strip() == "no trajectory no-such-id"
    # An error is no data: under --json, stdout stays empty (a QA pass, session 20)
    result = runner.invoke(app, ["show", "no-such-id", "--store", captured, "--json"])
    assert result.exit_code == 1 and result.stdout == "" and "no trajectory" in result.stderr
    first, second = (t.id for t in honed.open_store(captured).trajectories())
    shared = next(first[:n] for n in range(len(first), 0, -1) if second.startswith(first[:n]))
    result = runner.invoke(app, ["show", shared, "--store", captured])
    assert result.exit_code == 1
    assert result.output.strip() == f"{shared!r} matches several trajectories; give more of the id"
    result = runner.invoke(app, ["runs", "--store", "postgresql+psycopg://x:pw@127.0.0.1:1/none"])
    assert result.exit_code == 2 and "cannot open the store" in result.output


def test_the_installed_command_reads_HONED_STORE(captured: str, tmp_path: Path) -> None:
    honed_bin = Path(sys.executable).parent / "honed"
    out = subprocess.run([str(honed_bin), "runs", "--json"], env={"HONED_STORE": captured, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert sorted(json.loads(line)["task_id"] for line in out.stdout.splitlines()) == ["bad-task", "ok-task"]


# -- store URLs, the spool, and output off a terminal ------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["runs"], ["show", "abc"], ["status"], ["report"], ["export", "jsonl", "x.jsonl"], ["verify", "--once"]],
)
def test_reading_commands_never_create_a_store(command: list[str], tmp_path: Path) -> None:
    typo = tmp_path / "tyop" / "honed.db"
    result = runner.invoke(app, [*command, "--store", f"sqlite:///{typo}"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"no honed store at sqlite:///{typo}; create one with `honed init")
    assert len(result.output.splitlines()) == 1 and not typo.parent.exists()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("notaurl", "'notaurl' is not a store URL"),
        ("mysql://x", "unsupported store URL"),
        ("sqlite:///", "sqlite:/// names no file"),
        # Told to `honed init` them, which said "ready" of a store in memory, or failed (a QA
        # pass, session 25).
        ("sqlite://", "sqlite:// is a store in memory, gone when this command ends"),
        ("sqlite://x.db", "sqlite://x.db names a host, not a file: a store's file is sqlite:///x.db"),
    ],
)
def test_a_bad_store_url_is_one_line_not_a_traceback(url: str, message: str) -> None:
    for command in (["runs"], ["init"], ["status"]):
        result = runner.invoke(app, [*command, "--store", url])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit)  # not a traceback
        assert result.output.startswith(message) and len(result.output.splitlines()) == 1, result.output
        assert "sqlite:///PATH or postgresql://USER@HOST/DB" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "jsonl", "no/such/dir/train.jsonl"], "no/such/dir is not a folder"),
        (["train", "student", "--suite", "nosuch"], "unknown suite 'nosuch'"),
        (["train", "student", "--agent", "no_such_module:agent"], "No module named 'no_such_module'"),
        # Each a traceback before (a QA pass, session 14).
        (["train", "student", "--agent", "json"], "give module:factory"),
        (["train", "student", "--agent", "json:no_such_factory"], "json has no callable 'no_such_factory'"),
        (["register", "agent", "{tmp}", "--metrics", "[1, 2]"], "--metrics must be a JSON object"),
        # A suite that does not follow the protocol (a QA pass, session 15: a 25-line traceback).
        (
            ["train", "student", "--suite", "json:JSONDecoder"],
            "json:JSONDecoder is not a honed.demo.Suite: it lacks",
        ),
        (["train", "student", "--suite", "json:no_such_suite"], "json has no 'no_such_suite'"),
    ],
)
def test_a_user_mistake_is_one_line_not_a_traceback(
    captured: str, args: list[str], message: str, tmp_path: Path
) -> None:
    result = runner.invoke(app, [*(a.format(tmp=tmp_path) for a in args), "--store", captured])
    assert result.exit_code == 1 and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2
    # a sentence, not an exception's class name before it (a QA pass, session 28: "LookupError: ...")
    assert not re.match(r"\w+(Error|Exception):", result.output), result.output


def test_a_read_only_store_is_read_and_a_write_to_it_is_one_line(captured: str, tmp_path: Path) -> None:
    """A backup copy (rollback journal) could not even be read (switching it to WAL is a write),
    and writing to a read-only store was a 170-line traceback."""
    import os
    import shutil
    import sqlite3

    copy = tmp_path / "backup.db"
    source, target = sqlite3.connect(captured.removeprefix("sqlite:///")), sqlite3.connect(copy)
    source.backup(target)
    target.execute("PRAGMA journal_mode=DELETE")
    source.close(), target.close()
    copy.chmod(0o444)
    tmp_path.chmod(0o555)  # no journal file can be made beside it either
    # root reads and writes anything: drop the capabilities that let it (util-linux's setpriv)
    as_user = (
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"] if os.geteuid() == 0 else []
    )
    if as_user and shutil.which("setpriv") is None:
        pytest.skip("setpriv is needed to make a file read-only for root")
    honed_bin, url = str(Path(sys.executable).parent / "honed"), f"sqlite:///{copy}"
    try:
        runs = subprocess.run(
            [*as_user, honed_bin, "runs", "--json", "--store", url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert runs.returncode == 0, runs.stdout + runs.stderr
        trajectory_id = json.loads(runs.stdout.splitlines()[0])["id"]
        label = subprocess.run(
            [*as_user, honed_bin, "label", trajectory_id, "pass", "--store", url],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        tmp_path.chmod(0o755)
    assert label.returncode == 1 and "read-only" in label.stderr, label.stdout + label.stderr
    assert "Traceback" not in label.stdout + label.stderr


def test_verify_fails_when_every_verification_errored(captured: str) -> None:
    """A QA pass (session 21): a broken verifier exited 0 (`verify --once && train` carried on),
    and its errors took every run out of training without a word. Another (session 23): so it
    did when the store also held a crashed run, which the verifier could not tell without running."""
    from langchain.agents import create_agent

    from honed.testing import ScriptedChatModel

    crashing = create_agent(
        ScriptedChatModel(fail_on="CRASH"), [], name="a", middleware=[honed.Middleware(store=captured)]
    )
    with pytest.raises(Exception):  # noqa: B017 (the fake model's own failure)
        crashing.invoke({"messages": [("user", "CRASH")]})
    assert honed.flush()
    result = runner.invoke(
        app, ["verify", "--once", "-v", "verifier_helpers:broken_goal", "--store", captured]
    )
    said = " ".join(result.output.split())
    assert (
        result.exit_code == 1
        and "no run was judged (1 errors, 0 could not tell, 2 runs that raised failed)" in said
    ), result.output
    status = runner.invoke(app, ["status", "--store", captured])
    assert status.exit_code == 0 and "verifier errors: broken (1)" in status.output, status.output
    info = json.loads(runner.invoke(app, ["status", "--store", captured, "--json"]).output)
    assert [(r["verifier"], r["errors"]) for r in info["verifiers"]] == [("broken", 1)]
    fine = runner.invoke(app, ["verify", "--once", "-v", "reference", "--store", captured])
    assert fine.exit_code == 0, fine.output


def test_a_verifier_that_is_not_a_factory_is_one_line(captured: str) -> None:
    result = runner.invoke(app, ["verify", "--once", "-v", "json:loads", "--store", captured])
    assert result.exit_code == 2 and "cannot build verifier 'json:loads' with no arguments" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 2


@pytest.mark.parametrize(
    "args",
    [
        ["runs", "--status", "bogus"],
        ["runs", "--verdict", "bogus"],
        ["runs", "--limit", "-5"],
        ["export", "jsonl", "{tmp}/out.jsonl", "--status", "bogus"],
        ["export", "otlp", "--protocol", "bogus"],
        ["demo", "--cycles", "-1"],
        ["serve", "agent", "--port", "99999"],
        ["export", "otlp", "--endpoint", "not-a-url"],
        ["verifiers", "audit", "reference", "--min-precision", "1.7"],
        ["verifiers", "policy", "reference", "--min-precision", "-0.2"],
        # A QA pass (session 19): each was accepted. `--samples 0` trained a candidate, scored
        # nothing and halved every later learning rate; `--every 0` stored 1,300 runs in 2 minutes;
        # `--poll 0` spun a core; `--limit-concurrency 0` refused every request.
        ["train", "agent", "--suite", "tool_use", "--samples", "0"],
        ["train", "agent", "--suite", "tool_use", "--margin", "-5"],
        ["train", "agent", "--suite", "tool_use", "--min-new-verified", "-1"],
        ["train", "agent", "--suite", "tool_use", "--every", "0"],
        ["serve", "agent", "--poll", "0"],
        ["serve", "agent", "--max-tokens", "-5"],
        ["serve", "agent", "--max-body-mb", "-1"],
        ["serve", "agent", "--limit-concurrency", "0"],
        ["report", "--examples", "-3"],
        ["demo", "--attempts", "0"],
    ],
)
def test_an_option_out_of_range_is_refused_not_ignored(
    captured: str, args: list[str], tmp_path: Path
) -> None:
    result = runner.invoke(app, [*(a.format(tmp=tmp_path) for a in args), "--store", captured])
    assert result.exit_code == 2 and "Invalid value" in result.output, result.output


def test_a_held_out_split_given_with_a_suite_is_refused_not_ignored(captured: str) -> None:
    """A QA pass (session 20): `--heldout NAME` was read only with `--agent`; with a suite it was ignored."""
    result = runner.invoke(
        app, ["train", "agent", "--suite", "tool_use", "--heldout", "exam", "--store", captured]
    )
    assert result.exit_code == 2 and "a --suite has its own held-out tasks" in result.output, result.output


def test_the_runs_table_shows_the_label_its_verdict_filter_uses(captured: str) -> None:
    """An untrusted verifier's pass is no pass: `honed runs` says "?", as `--verdict pass` leaves it out."""
    store = honed.open_store(captured)
    ok = next(t for t in store.trajectories() if t.task_id == "ok-task")
    store.set_min_precision("judge", 0.9)  # never audited: untrusted
    store.add_verdict(ok.id, honed.Verdict(passed=True, verifier="judge"))
    assert runner.invoke(app, ["runs", "--verdict", "pass", "--store", captured]).output.count("ok-task") == 0
    row = next(
        line
        for line in runner.invoke(app, ["runs", "--store", captured]).output.splitlines()
        if ok.id[-12:] in line
    )
    assert "pass" not in row and "?" in row


def test_honed_init_creates_a_store_the_readers_then_find(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'honed.db'}"
    assert runner.invoke(app, ["init", "--store", url]).exit_code == 0
    result = runner.invoke(app, ["runs", "--store", url])
    assert result.exit_code == 0 and "0 trajectories" in result.output


def test_honed_spool_shows_what_waits_and_replays_it(tmp_path: Path) -> None:
    from honed.capture.recorder import Recorder

    blocker = tmp_path / "db"
    blocker.write_text("not a folder: the store cannot open")
    url = f"sqlite:///{blocker / 'honed.db'}"
    recorder = Recorder(url)
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(recorder=recorder)])
    for i in range(2):
        agent.invoke({"messages": [("user", f"answer {i}")]})
    recorder.close()

    (row,) = [
        json.loads(line)
        for line in runner.invoke(app, ["spool", "--json", "--store", url]).output.splitlines()
    ]
    assert (row["store"], row["pending"], row["this_store"]) == (url, 2, True) and row["oldest"] <= row[
        "newest"
    ]
    table = runner.invoke(app, ["spool", "--store", url]).output
    assert (
        "2 trajectories waiting in 1 spool" in table
        and "spools" not in table
        and "honed spool --replay" in table
    )

    blocker.unlink()
    # The store failing mid-way (a full disk): one line, and the spool kept whole (a QA pass,
    # session 17: a 200-line traceback).
    from sqlalchemy.exc import OperationalError

    from honed.store.store import TrajectoryStore

    def full(self: Any, records: Any) -> int:
        raise OperationalError("INSERT", {}, Exception("database or disk is full"))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TrajectoryStore, "save_records", full)
        failed = runner.invoke(app, ["spool", "--replay", "--store", url])
    assert failed.exit_code == 1 and "Traceback" not in failed.output, failed.output
    assert "spool is kept" in failed.output and "disk is full" in failed.output
    result = runner.invoke(app, ["spool", "--replay", "--store", url, "--json"])
    assert json.loads(result.output) | {"spool": None} == {
        "store": url,
        "spool": None,
        "waiting": 2,
        "replayed": 2,
    }
    assert sorted(t.answer for t in honed.open_store(url).trajectories()) == ["0", "1"]
    assert json.loads(runner.invoke(app, ["spool", "--json", "--store", url]).output)["pending"] == 0


def test_replaying_a_file_that_is_not_a_spool_refuses_and_leaves_it_whole(tmp_path: Path) -> None:
    """A QA pass (session 15): `honed spool --replay --from FILE` emptied whatever file it was
    given (a note, a spool's .url sidecar, a training export), replaying nothing."""
    url = f"sqlite:///{tmp_path / 'honed.db'}"
    note = tmp_path / "notes.txt"
    note.write_text("remember the milk\nand eggs\n")
    export = tmp_path / "train.jsonl"
    export.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    # A QA pass (session 16): `honed runs --json` lines have an id and a start too (no steps).
    listing = tmp_path / "runs.jsonl"
    listing.write_text(json.dumps({"id": "r1", "started_at": "2026-01-01T00:00:00", "n_steps": 2}) + "\n")
    for given in (note, export, listing):
        before = given.read_text()
        result = runner.invoke(app, ["spool", "--replay", "--from", str(given), "--store", url])
        assert result.exit_code != 0 and "not a spool file" in result.output, result.output
        assert given.read_text() == before


def test_runs_captured_under_a_mistyped_store_url_are_moved_to_the_right_store(tmp_path: Path) -> None:
    """A URL no store can have (a misconfiguration, not an outage) leaves the runs in its spool,
    and the log says how to move them: `honed spool --replay --from SPOOL --store URL`."""
    import logging

    from honed.capture.recorder import Recorder

    wrong = "mysql://user@host/db"
    recorder = Recorder(wrong)
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(recorder=recorder)])
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("honed").addHandler(handler)
    try:
        agent.invoke({"messages": [("user", "answer kept")]})
        recorder.close()
    finally:
        logging.getLogger("honed").removeHandler(handler)
    (advice,) = [m for m in records if "--from" in m]
    spool = advice.split("--from ", 1)[1].split(" ", 1)[0]
    right = f"sqlite:///{tmp_path / 'right.db'}"
    kept = Path(spool).read_text()
    result = runner.invoke(app, ["spool", "--replay", "--from", spool, "--store", right])
    assert "replayed 1 trajectory from" in result.output, result.output  # "1 trajectories" before
    assert [t.answer for t in honed.open_store(right).trajectories()] == ["kept"]
    # A copy of a spool replayed again writes nothing, and says so (it counted 1, a QA pass, session 27).
    Path(spool).write_text(kept)
    again = runner.invoke(app, ["spool", "--replay", "--from", spool, "--store", right])
    assert "replayed 0 trajectories" in again.output and "(1 already stored there)" in again.output, (
        again.output
    )
    missing = runner.invoke(app, ["spool", "--replay", "--from", str(tmp_path / "none"), "--store", right])
    assert missing.exit_code == 1 and "no spool file" in missing.output


def test_the_demo_table_keeps_its_reasons_readable_off_a_terminal() -> None:
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from honed.cli.loop import _cycle_row, _cycle_table, print_table

    reason = "held-out pass@1 0.250 -> 0.375 (gain +0.125, 95% CI [+0.031, +0.219]): clears the margin"
    result = SimpleNamespace(cycle=1, version="tool_use-agent@v2", trajectories=96, train_pass_rate=0.5,
                             heldout_pass_at_1=0.375, pass_at=lambda k: 0.6, status="promoted", reason=reason)  # fmt: skip
    table = _cycle_table()
    table.add_row(*_cycle_row(result))
    out = io.StringIO()
    print_table(Console(file=out), table)  # a pipe or a log file: no terminal, rich assumes 80 columns
    rows = [line for line in out.getvalue().splitlines() if "tool_use-agent@v2" in line or "clears" in line]
    assert "held-out pass@1 0.250 -> 0.375" in rows[0]  # at least 30 characters of reason a line


def test_a_command_refused_or_with_nothing_to_do_leaves_no_store_behind(tmp_path: Path) -> None:
    """A QA pass (session 15): `honed demo --method bogus` made the demo's store before refusing
    it; `honed spool --replay` with nothing waiting created an empty store at a mistyped --store."""
    result = runner.invoke(app, ["demo", "--method", "bogus", "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2 and "unknown method 'bogus'" in result.output
    assert not (tmp_path / "w").exists()
    mistyped = tmp_path / "typo" / "honed.db"
    result = runner.invoke(app, ["spool", "--replay", "--store", f"sqlite:///{mistyped}", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["replayed"] == 0
    assert not mistyped.parent.exists()


def test_errors_go_to_stderr_so_json_and_exported_data_stay_data(tmp_path: Path) -> None:
    """A QA pass (session 16): `honed export jsonl - > train.jsonl` wrote the error into the
    training file, and `honed runs --json` into the JSON a script parses."""
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    for args in (["runs", "--json", "--store", missing], ["export", "jsonl", "-", "--store", missing]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.stdout == "", result.stdout
        assert "no honed store" in result.stderr


def test_a_module_named_on_the_command_line_is_found_in_the_current_folder(tmp_path: Path) -> None:
    """A QA pass (session 16): the README's `--verifier mychecks:judge` failed with "No module
    named 'mychecks'" from the folder holding it: the `honed` script (unlike `python -m`) does
    not put the current folder on the path."""
    import subprocess
    import sys

    (tmp_path / "mychecks.py").write_text(
        "from honed.verifiers import GoalCheck\njudge = GoalCheck(lambda state: True, name='mine')\n"
    )
    url = "sqlite:///x.db"
    honed_bin = str(Path(sys.executable).parent / "honed")
    subprocess.run([honed_bin, "init", "--store", url], cwd=tmp_path, check=True, capture_output=True)
    done = subprocess.run(
        [honed_bin, "verify", "--once", "--verifier", "mychecks:judge", "--store", url],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "mine@1" in done.stdout + done.stderr, done.stdout + done.stderr


def test_the_demo_with_a_store_that_is_down_says_so_in_one_line(tmp_path: Path) -> None:
    """A QA pass (session 16): `honed demo --store` with the database down printed a 509-line
    traceback (every other command: one line, status 2)."""
    result = runner.invoke(
        app,
        [
            "demo",
            "--store",
            "postgresql://nobody@127.0.0.1:1/none",
            "--workdir",
            str(tmp_path),
            "--cycles",
            "0",
        ],
    )
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_tables_off_a_terminal_keep_their_column_names_whole(tmp_path: Path) -> None:
    """A QA pass (session 16): piped (cron, CI, a log), `honed verifiers list` cut every column
    name and verifier name to a few letters ("refe…"); only the demo's table had room."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'h.db'}"
    honed_bin = str(Path(sys.executable).parent / "honed")
    subprocess.run([honed_bin, "init", "--store", url], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    listed = subprocess.run(
        [honed_bin, "verifiers", "list", "--store", url], capture_output=True, text=True, env=env
    )
    assert "audited precision" in listed.stdout and "…" not in listed.stdout, listed.stdout


def test_a_reader_that_stops_early_ends_the_command_quietly(sqlite_url: str) -> None:
    """A QA pass (session 20): `honed runs --json | head -1` printed `BrokenPipeError: [Errno 32]`."""
    from honed import Trajectory

    store = honed.open_store(sqlite_url)
    for i in range(1500):  # ~400 KB of lines: more than a pipe holds
        store.save(Trajectory(id=f"run-{i:05d}", agent="calc", task=f"question {i} " + "x" * 100))
    honed_bin = str(Path(sys.executable).parent / "honed")
    command = subprocess.Popen(
        [honed_bin, "runs", "--json", "--limit", "1500", "--store", sqlite_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert command.stdout is not None and command.stdout.read(10)
    command.stdout.close()  # as `head` does once it has its line
    _, err = command.communicate(timeout=120)
    assert command.returncode == 1 and b"BrokenPipe" not in err and b"Traceback" not in err, err


def test_a_command_missing_its_extra_names_the_extra_to_install(tmp_path: Path) -> None:
    """A QA pass (session 22): `honed serve` told a capture-only install to `pip install 'honed'`
    (rich took `[serve,train]` for markup), and `honed export hf` named no extra at all."""
    import subprocess
    import sys

    for module in ("fastapi", "datasets"):  # stand-ins for extras that are not installed
        (tmp_path / module).mkdir()
        (tmp_path / module / "__init__.py").write_text(
            f"raise ModuleNotFoundError('no {module}', name='{module}')"
        )
    honed_cli = [sys.executable, "-m", "honed.cli"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    url = f"sqlite:///{tmp_path / 'x.db'}"
    subprocess.run([*honed_cli, "init", "--store", url], env=env, check=True, capture_output=True)
    served = subprocess.run(
        [*honed_cli, "serve", "m", "--store", url], env=env, capture_output=True, text=True
    )
    assert served.returncode == 2 and "pip install 'honed[serve,train]'" in served.stderr, served.stderr
    exported = subprocess.run(
        [*honed_cli, "export", "hf", str(tmp_path / "out.parquet"), "--store", url],
        env=env,
        capture_output=True,
        text=True,
    )
    assert exported.returncode == 1 and "pip install 'honed[train]'" in exported.stderr, exported.stderr


def test_serve_on_a_port_in_use_is_one_line_before_anything_loads(captured: str) -> None:
    """A QA pass (session 23): `honed serve` said "serving ...", loaded the weights, then died on
    uvicorn's "address already in use" with exit code 3."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", "agent", "--port", str(port), "--store", captured])
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.output, result.output
    assert "serving" not in result.output


def test_a_damaged_store_file_is_one_line_that_says_how_to_recover(sqlite_url: str, tmp_path: Path) -> None:
    """A QA pass (session 25): pages of the store overwritten (a disk fault, a copy taken
    mid-write) gave a 260-line traceback holding the query."""
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(store=sqlite_url)])
    for i in range(40):
        agent.invoke(
            {"messages": [("user", f'call add {{"a": {i}, "b": 2}}; answer {{result}} ' + "x" * 2000)]}
        )
    assert honed.flush()
    path = tmp_path / "honed.db"
    import sqlite3

    with sqlite3.connect(path) as db:  # everything in the file itself, none in its WAL
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(path, "r+b") as db:
        db.seek(4096 * 9)  # pages 10 to 14 (a QA pass's `dd`): the runs' rows, not the schema
        db.write(b"\xa5" * 4096 * 5)
    result = CliRunner().invoke(app, ["runs", "--store", sqlite_url])
    assert result.exit_code == 2, result.output
    assert "damaged" in result.output and ".recover" in result.output and "Traceback" not in result.output


def test_a_name_with_no_model_but_captured_runs_says_where_its_runs_are(captured: str) -> None:
    """A QA pass (session 25): `honed status calc` said "calc has no versions or runs" of an
    agent with captured runs ("runs" meant training runs)."""
    for command in (["status", "calc"], ["report", "--model", "calc"]):
        result = runner.invoke(app, [*command, "--store", captured])
        assert result.exit_code == 1, result.output
        assert "no model versions or training runs" in result.output, result.output
        assert "its 2 captured runs: honed runs --agent calc" in result.output, result.output


def test_one_run_is_counted_in_the_singular(sqlite_url: str) -> None:
    """A new user's QA pass (session 25): "1 trajectories checked"."""
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(store=sqlite_url)])
    agent.invoke({"messages": [("user", 'call add {"a": 2, "b": 3}; answer {result}')]},
                 config={"metadata": {"honed": {"expected": "5"}}})  # fmt: skip
    assert honed.flush()
    result = runner.invoke(app, ["verify", "--store", sqlite_url])
    assert result.exit_code == 0, result.output
    assert "1 trajectory checked: 1 new verdict (1 pass" in result.output, result.output


def test_a_rejected_cycle_names_the_candidate_it_rejected_not_the_live_version() -> None:
    """A new user (a QA pass, session 27) read "cycle 3: tool_use-agent@v3 held-out pass@1 61.6% —
    rejected" as v3 rejected: v4, the candidate at 65.6%, was; v3 stayed live."""
    from honed.cli.loop import _cycle_line, _cycle_row
    from honed.learn.cycle import CycleResult

    r = CycleResult(
        status="rejected", reason="lower bound -0.012", cycle=3, version="agent@v3", candidate="agent@v4",
        heldout={"pass_at_1": 0.616, "pass_at_8": 0.925}, candidate_heldout={"pass_at_1": 0.656}, seconds=126,
    )  # fmt: skip
    line = _cycle_line(r)
    assert line.startswith(
        "cycle 3: candidate agent@v4 held-out pass@1 65.6% — rejected; agent@v3 stays live at 61.6%"
    )
    assert "v4 rejected" in _cycle_row(r)[6]
    promoted = CycleResult(status="promoted", reason="", cycle=1, version="agent@v2", candidate="agent@v2",
                           heldout={"pass_at_1": 0.4}, seconds=3)  # fmt: skip
    assert _cycle_line(promoted) == "cycle 1: agent@v2 held-out pass@1 40.0% (pass@8 -) — promoted [3s]"


def test_one_run_and_an_unsupported_option_are_said_whole(sqlite_url: str) -> None:
    """A new user (a QA pass, session 27): `honed status` said "1 trajectories captured", and the
    server's refusal of `top_logprobs` stopped mid-sentence ("logprobs gives each sampled token's")."""
    from honed.serving.protocol import BadRequest, parse_chat_request
    from verifier_helpers import traj

    honed.open_store(sqlite_url).save(traj("only"))
    shown = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["status", "--store", sqlite_url])
    assert "1 trajectory captured" in shown.output, shown.output
    with pytest.raises(BadRequest) as refused:
        parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 5})
    assert str(refused.value).rstrip().endswith("without alternatives"), str(refused.value)


def test_replaying_as_the_owner_names_what_waits_for_the_same_database_as_another_user() -> None:
    """A QA pass (session 27, production setup): 79 runs waited for the database as the agent's
    capture role; `honed spool --replay` as its owner said "replayed 0 trajectories", and nothing
    more: each URL has its own spool."""
    from honed.capture.spool import Spool, default_spool_path
    from honed.store.store import safe_url

    role = "postgresql+psycopg://agent:secret@db.example:5432/honed"
    Spool(default_spool_path(role), store=safe_url(role)).append(
        [{"id": f"run-{i}", "started_at": 1.0, "agent": "a", "steps": []} for i in range(2)]
    )
    said = CliRunner(env={"COLUMNS": "300"}).invoke(
        app, ["spool", "--replay", "--store", "postgresql+psycopg://owner@db.example:5432/honed"]
    )
    text = " ".join(said.output.split())
    assert said.exit_code == 0 and "nothing waits in the spool for" in text, said.output
    assert (
        "2 trajectories wait for this database as postgresql+psycopg://agent:***@db.example:5432/honed"
        in text
    )
    assert "secret" not in text
