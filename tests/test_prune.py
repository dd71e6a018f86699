"""`honed prune` / `TrajectoryStore.prune`: retention and erasure. A deleted run takes its steps,
verdicts and queue rows with it, held-out runs stay unless asked for, lineage keeps the ids, and on
SQLite an erased secret is gone from the file's bytes. Real SQLite and PostgreSQL, the real CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from typer.testing import CliRunner

import honed
from honed.cli import app
from honed.store.schema import StepRow, TrajectoryRow, VerdictRow
from honed.store.verification_tables import VerificationClaimRow
from honed.trajectory import Step, Trajectory, Verdict

NOW = datetime.now(UTC)
SECRET = "PRUNE-ME-7f3a9c0e5b1d4e2f"


def _run(
    run_id: str, *, days_ago: float, agent: str = "support", split: str | None = "train", **kw
) -> Trajectory:
    started = NOW - timedelta(days=days_ago)
    return Trajectory(
        id=run_id,
        agent=agent,
        task={"messages": [{"role": "user", "content": f"question {run_id}"}]},
        task_id=kw.pop("task_id", f"task-{run_id}"),
        split=split,
        steps=[
            Step(id=f"{run_id}-0", index=0, kind="model", name="m", output={"role": "assistant", "content": "?"}),
            Step(id=f"{run_id}-1", index=1, kind="tool", name="lookup", input={"q": run_id}, output=kw.pop("tool_output", "fine")),
        ],
        output="done",
        started_at=started,
        ended_at=started + timedelta(seconds=1),
        **kw,
    )  # fmt: skip


def _count(store: honed.TrajectoryStore, table: type, run_ids: list[str]) -> int:
    with store.engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(table).where(table.trajectory_id.in_(run_ids)))


@pytest.fixture
def store(store_url: str) -> honed.TrajectoryStore:
    s = honed.open_store(store_url)
    for run in (
        _run("old-1", days_ago=100, tool_output=f"the customer's card is {SECRET}"),
        _run("old-2", days_ago=95, agent="billing"),
        _run("old-held", days_ago=120, split="heldout", task_id="gate-1"),
        _run("old-held-task", days_ago=110, task_id="gate-1"),  # a held-out task's run under no eval split
        _run("new-1", days_ago=1),
        _run("thread-a", days_ago=2, thread_id="conv-7"),
        _run("thread-b", days_ago=1, thread_id="conv-7"),
    ):
        s.save(run)
    with s.engine.begin() as conn:  # stored when they started (retention goes by when a run was stored)
        conn.execute(update(TrajectoryRow).values(created_at=TrajectoryRow.started_at))
    s.save(_run("dated-back", days_ago=3650))  # says it started ten years ago, stored now
    for run_id in ("old-1", "old-2", "new-1"):
        s.add_verdict(run_id, Verdict(verifier="ref", version="1", passed=True, score=1.0))
    s.enqueue_verification("ref@1")
    training = s.start_training_run("support-agent", "sft", parent=None, config={})
    s.add_training_examples(training.id, ["old-1", "new-1"])
    yield s
    s.close()


def test_retention_deletes_old_runs_with_their_rows_and_keeps_held_out_ones(
    store: honed.TrajectoryStore,
) -> None:
    pruned = store.prune(until=NOW - timedelta(days=90))
    assert sorted(pruned.deleted) == ["old-1", "old-2"]
    assert pruned.kept_heldout == 2  # the held-out split's run and its task's other run
    assert pruned.learned_from == 1
    left = sorted(t.id for t in store.trajectories(limit=None))
    # A run dated back by the process that captured it is not old: a capture role dated its paused
    # run to 2000, and retention deleted it with the verdict that failed it (a QA pass, session 28).
    assert left == ["dated-back", "new-1", "old-held", "old-held-task", "thread-a", "thread-b"]
    for table in (StepRow, VerdictRow, VerificationClaimRow):
        assert _count(store, table, ["old-1", "old-2"]) == 0, table.__tablename__
        assert _count(store, table, ["new-1"]) > 0, table.__tablename__
    run = store.training_runs("support-agent")[0]
    assert sorted(store.training_examples(run.id)) == ["new-1", "old-1"]  # lineage keeps what it learned from
    assert store.prune(until=NOW - timedelta(days=90), include_heldout=True).deleted == [
        "old-held",
        "old-held-task",
    ]


def test_filters_combine_and_a_dry_run_deletes_nothing(store: honed.TrajectoryStore) -> None:
    assert store.prune(until=NOW - timedelta(days=90), agent="billing", dry_run=True).deleted == ["old-2"]
    assert store.count() == 8
    assert store.prune(thread_id="conv-7").deleted == ["thread-a", "thread-b"]
    assert store.prune(ids=["new-1", "no-such-run"]).deleted == ["new-1"]
    assert store.count() == 5
    with pytest.raises(ValueError, match="say what to delete"):
        store.prune()


def test_an_erased_secret_is_gone_from_the_sqlite_files(tmp_path: Path) -> None:
    path = tmp_path / "erase.db"
    with honed.open_store(f"sqlite:///{path}") as s:
        s.save(_run("old-1", days_ago=100, tool_output=f"the customer's card is {SECRET}"))
        s.save(_run("new-1", days_ago=1))
        assert s.prune(ids=["old-1"]).deleted == ["old-1"]

        def on_disk() -> bytes:
            return b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("erase.db"))

        assert SECRET.encode() not in on_disk()  # not in free pages, nor in the write-ahead log
        assert b"new-1" in on_disk()


def test_a_reader_holding_the_old_pages_is_said_and_waited_for(tmp_path: Path) -> None:
    """A QA pass (session 28): with another process in a read transaction, the checkpoint could
    not copy the overwritten pages, and prune said "deleted" with the secret still in the file."""
    import sqlite3
    import threading

    path = tmp_path / "erase.db"
    with honed.open_store(f"sqlite:///{path}") as s:
        s.save(_run("old-1", days_ago=100, tool_output=f"the customer's card is {SECRET}"))
        reader = sqlite3.connect(path, check_same_thread=False)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM steps").fetchone()
        result = CliRunner().invoke(app, ["prune", "--store", f"sqlite:///{path}", "--run", "old-1", "--yes"])
        assert result.exit_code == 0 and "deleted 1 trajectory" in result.output, result.output
        assert "another process is reading the store" in " ".join(result.output.split())
        threading.Timer(0.5, reader.rollback).start()  # the reader done meanwhile: waited for
        s.save(_run("old-2", days_ago=100))
        assert s.prune(ids=["old-2"]).erased is True
        reader.close()
        on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("erase.db"))
        assert SECRET.encode() not in on_disk


def test_the_cli_asks_says_what_it_kept_and_deletes_by_short_id(
    store_url: str, store: honed.TrajectoryStore
) -> None:
    runner = CliRunner()
    base = ["prune", "--store", store_url]
    refused = runner.invoke(app, [*base, "--before", "90d"])
    assert refused.exit_code == 2 and "give --yes" in refused.output
    assert store.count() == 8
    dry = runner.invoke(app, [*base, "--before", "90d", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would delete 2 trajectories" in dry.output
    assert "kept 2 held-out runs" in dry.output and "--include-heldout" in dry.output
    assert "1 of them trained a version" in dry.output
    assert store.count() == 8
    done = runner.invoke(app, [*base, "--before", "90d", "--yes", "--json"])
    assert json.loads(done.output) == {
        "deleted": 2, "matched": 2, "kept_heldout": 2, "learned_from": 1, "dry_run": False, "erased": True,
    }  # fmt: skip
    assert store.count() == 6
    short = runner.invoke(app, [*base, "--run", "new-", "--yes"])  # the start of an id
    assert short.exit_code == 0 and "deleted 1 trajectory" in short.output, short.output
    missing = runner.invoke(app, [*base, "--run", "nope", "--yes"])
    assert missing.exit_code == 1 and "no trajectory" in missing.output
    nothing = runner.invoke(app, base)
    assert nothing.exit_code == 2 and "say what to delete" in nothing.output
    assert store.count() == 5


def test_the_capture_role_cannot_prune(capture_role: tuple[str, str]) -> None:
    """The agent's process deleting the runs that failed it would be a label by omission."""
    owner_url, agent_url = capture_role
    with honed.open_store(owner_url) as owner:
        owner.save(_run("failed-run", days_ago=1))
        owner.grant_capture(agent_url.split("//")[1].split("@")[0])
    result = CliRunner().invoke(app, ["prune", "--store", agent_url, "--run", "failed-run", "--yes"])
    assert result.exit_code == 1 and "only captures" in result.output, result.output
    with honed.open_store(owner_url) as owner:
        assert owner.count() == 1


def test_what_a_version_learned_from_is_read_back_for_an_erasure(
    store_url: str, store: honed.TrajectoryStore
) -> None:
    """A QA pass (session 28): prune said lineage keeps the ids "(`honed versions`)", which showed
    none. `honed show ID` names the versions a run trained; `versions --learned-from` lists runs."""
    training = store.training_runs("support-agent")[0]
    version = store.register_model("support-agent", "s3://models/support-agent/v1", training_run=training.id)
    store.update_training_run(training.id, candidate=version.ref, status="promoted")
    runner = CliRunner(env={"COLUMNS": "200"})
    shown = runner.invoke(app, ["show", "old-1", "--store", store_url])
    assert shown.exit_code == 0 and "trained support-agent@v1 (promoted, training run" in shown.output, (
        shown.output
    )
    assert "trained" not in runner.invoke(app, ["show", "old-2", "--store", store_url]).output
    assert json.loads(runner.invoke(app, ["show", "old-1", "--store", store_url, "--json"]).output)[
        "trained"
    ] == [{"training_run": training.id, "candidate": "support-agent@v1", "status": "promoted"}]
    listed = runner.invoke(app, ["versions", "support-agent", "--learned-from", "--store", store_url])
    assert "support-agent@v1 learned from 2 runs:" in listed.output and "new-1" in listed.output, (
        listed.output
    )
    dry = runner.invoke(app, ["prune", "--store", store_url, "--run", "old-1", "--dry-run"])
    assert "honed show ID" in " ".join(dry.output.split())


def test_an_erasure_of_a_mistyped_conversation_is_refused_and_a_pruned_run_says_what_it_trained(
    store_url: str, store: honed.TrajectoryStore
) -> None:
    """A QA pass (session 28): `--thread nosuch` said "would delete 0" and exited 0, read as done;
    and once pruned, `honed show ID`, which the advice names, said only "no trajectory"."""
    runner = CliRunner(env={"COLUMNS": "200"})
    typo = runner.invoke(app, ["prune", "--store", store_url, "--thread", "conv-8", "--yes"])
    assert typo.exit_code == 1 and "no stored runs have thread id 'conv-8'" in typo.output, typo.output
    training = store.training_runs("support-agent")[0]
    version = store.register_model("support-agent", "s3://models/support-agent/v1", training_run=training.id)
    store.update_training_run(training.id, candidate=version.ref)
    asked = runner.invoke(app, ["prune", "--store", store_url, "--run", "old-1", "--yes"])
    assert asked.output.index("trained a version") < asked.output.index("deleted 1 trajectory"), asked.output
    gone = runner.invoke(app, ["show", "old-1", "--store", store_url])
    assert gone.exit_code == 1 and "pruned?); it trained support-agent@v1" in " ".join(gone.output.split())
    none = runner.invoke(app, ["versions", "support-agent", "--learned-from", "--store", store_url])
    assert "support-agent@v1 learned from 2 runs" in none.output
