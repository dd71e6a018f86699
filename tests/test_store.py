"""The store on both backends: migrations, idempotent writes, filters, verdicts, concurrent opens."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from sqlalchemy import inspect, text

import honed
from fakes import ToolScriptModel, make_tools
from honed import Step, Trajectory, Verdict
from honed.store import (
    InvalidStoreURL,
    StoreNotFound,
    TrajectoryNotFound,
    TrajectoryStore,
    resolve_store_url,
    trajectory_to_record,
)


def make(i: int, **fields) -> Trajectory:
    start = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=i)
    steps = [
        Step(id=f"s{i}-0", index=0, kind="model", name="m", output={"role": "assistant", "content": "hi"},
             tool_calls=[{"name": "add", "args": {"a": i}, "id": "c1"}], usage={"input_tokens": 3, "output_tokens": 1},
             started_at=start, ended_at=start + timedelta(seconds=1)),
        Step(id=f"s{i}-1", index=1, kind="tool", name="add", input={"a": i}, output=str(i),
             started_at=start + timedelta(seconds=1), ended_at=start + timedelta(seconds=2)),
    ]  # fmt: skip
    defaults = dict(id=f"t{i}", agent="calc", task={"messages": [{"role": "user", "content": f"task {i}"}]},
                    task_id=f"task-{i % 3}", split="train", steps=steps, output=str(i), started_at=start,
                    ended_at=start + timedelta(seconds=2), model_version="m@v1")  # fmt: skip
    return Trajectory(**{**defaults, **fields})


def test_round_trip_and_idempotent_writes(store_url: str) -> None:
    store = honed.open_store(store_url)
    # 2**70 + 1 is beyond orjson (it writes it with the standard library, and would read a float).
    original = make(1, metadata={"expected": "1", "nested": {"ü": [1, 2.5, None]}, "big": 2**70 + 1})
    store.save(original)
    store.save(original)  # a replayed spool writes the same record again: skipped
    assert store.save_records([]) == 0
    (loaded,) = store.trajectories()
    assert loaded.to_dict() == original.to_dict()
    assert loaded.steps[1].duration_s == 1.0 and loaded.duration_s == 2.0


def test_text_no_database_takes_is_stored_replaced_and_never_costs_the_batch(store_url: str) -> None:
    """NUL (PostgreSQL refuses it in text and JSONB) and lone surrogates (UTF-8 cannot encode
    them) arrive from hostile clients and broken tools. One such run must not fail the batch it
    is written with, on every retry: it is stored with U+FFFD in their place, the others as they are."""
    store = honed.open_store(store_url)
    bad = make(2, output="a\x00b\ud800c", error="boom\x00", status="error",
               metadata={"note\udc00": ["x\x00"]}, task={"messages": [{"role": "user", "content": "q\ud83d"}]})  # fmt: skip
    bad.steps[1].output = "tool\x00out"
    good = [make(1), make(3, output="naïve 😀")]
    assert store.save_records([trajectory_to_record(t) for t in (good[0], bad, good[1])]) == 3
    runs = {t.id: t for t in store.trajectories()}
    assert runs["t1"].to_dict() == good[0].to_dict() and runs["t3"].output == "naïve 😀"
    stored = runs["t2"]
    assert (stored.output, stored.error) == ("a\ufffdb\ufffdc", "boom\ufffd")
    assert stored.metadata["note\ufffd"] == ["x\ufffd"] and stored.steps[1].output == "tool\ufffdout"
    assert stored.task == {"messages": [{"role": "user", "content": "q\ufffd"}]}


def test_times_with_an_offset_keep_their_instant_and_filter_by_it(store_url: str) -> None:
    """SQLite stored 12:00+02:00 as 12:00 and read it back as 12:00Z, two hours off, and `since`
    compared wall times: `export --since 11:30+02:00` kept a run of 10:00Z. PostgreSQL was right."""
    from datetime import timezone

    plus2 = timezone(timedelta(hours=2))
    store = honed.open_store(store_url)
    store.save(
        Trajectory(id="east", agent="a", task="t", started_at=datetime(2025, 1, 1, 12, 0, tzinfo=plus2))
    )
    store.save(Trajectory(id="utc", agent="a", task="t", started_at=datetime(2025, 1, 1, 10, 30, tzinfo=UTC)))
    assert store.get("east").started_at == datetime(2025, 1, 1, 10, 0, tzinfo=UTC)
    since = datetime(2025, 1, 1, 12, 15, tzinfo=plus2)  # 10:15Z
    assert [t.id for t in store.trajectories(since=since)] == ["utc"]


def test_a_run_stored_mid_export_never_makes_another_read_twice(store_url: str) -> None:
    """Pages were read by OFFSET over (started_at, id): a long run that started earlier and
    finished mid-export shifted every later page by one, and one trajectory was exported twice
    (a duplicated training example)."""
    from honed.store.select import select_trajectories

    store = honed.open_store(store_url)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    for i in range(30):
        store.save(Trajectory(id=f"run-{i:02d}", agent="a", task="t", started_at=t0 + timedelta(minutes=i)))
    seen = []
    for t in select_trajectories(store, page_size=10):
        seen.append(t.id)
        if len(seen) == 15:  # mid-export, a run that started before all of them ends
            store.save(Trajectory(id="long", agent="a", task="t", started_at=t0 - timedelta(hours=1)))
    assert len(seen) == len(set(seen)) == 30


@pytest.mark.parametrize("value", [0.1 + 0.2, 2**63 + 7, 2.0, -1e-300, 17])
def test_a_bare_number_as_output_reads_back_as_it_was(store_url: str, value: float) -> None:
    """SQLite's numeric affinity (a column declared JSON) turned a bare number's JSON text into a
    REAL: 0.1 + 0.2 came back 0.3, 2**63 + 7 a float, 2.0 the int 2, before any verifier read it."""
    store = honed.open_store(store_url)
    step = Step(id="s", index=0, kind="tool", name="calc", output=value)
    store.save(Trajectory(id="n", agent="a", task="t", output=value, steps=[step]))
    for read in (store.get("n"), store.trajectories()[0]):
        assert (read.output, type(read.output)) == (value, type(value))
        assert (read.steps[0].output, type(read.steps[0].output)) == (value, type(value))


def test_json_columns_hold_json_text_and_none_is_sql_null(store_url: str) -> None:
    """The writer hands the database JSON it encoded itself: a string is stored as a JSON string
    (not bare text), None as SQL NULL (not JSON null), on both backends."""
    store = honed.open_store(store_url)
    store.save(make(1, output=None))
    with store.engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT id, CAST(input AS TEXT), CAST(output AS TEXT), CAST(usage AS TEXT) FROM steps ORDER BY id"
            )
        ).all()
        (output,) = conn.execute(text("SELECT CAST(output AS TEXT) FROM trajectories")).one()
    (model_id, model_input, model_output, usage), (tool_id, tool_input, tool_output, tool_usage) = rows
    assert (model_id, tool_id) == ("s1-0", "s1-1")
    assert model_input is None and tool_usage is None and output is None
    assert json.loads(model_output) == {"role": "assistant", "content": "hi"}
    assert json.loads(usage) == {"input_tokens": 3, "output_tokens": 1}
    assert json.loads(tool_input) == {"a": 1} and json.loads(tool_output) == "1"


def test_filters_and_verdicts(store_url: str) -> None:
    store = honed.open_store(store_url)
    for i in range(6):
        store.save(make(i, split="heldout" if i == 5 else "train", status="error" if i == 4 else "ok"))
    assert [t.id for t in store.trajectories(limit=3)] == ["t5", "t4", "t3"]
    assert [t.id for t in store.trajectories(limit=2, offset=1, oldest_first=True)] == ["t1", "t2"]
    assert (
        store.count(task_id="task-0") == 2
        and store.count(split="heldout") == 1
        and store.count(status="error") == 1
    )
    assert store.count(since=datetime(2026, 1, 1, 0, 3, tzinfo=UTC)) == 3
    assert store.count(until=datetime(2026, 1, 1, 0, 3, tzinfo=UTC)) == 3
    assert store.count(model_version="m@v1") == 6 and store.count(agent="other") == 0

    store.add_verdict("t0", Verdict(passed=True, score=1.0, verifier="ref", reason="match"))
    store.add_verdict("t1", Verdict(passed=True, verifier="ref"))
    store.add_verdict("t1", Verdict(passed=False, verifier="judge", evidence={"why": "rude"}))
    store.add_verdict("t2", Verdict(passed=None, verifier="ref", reason="no expected answer"))
    store.add_verdict(
        "t0", Verdict(passed=True, score=0.9, verifier="ref", reason="again")
    )  # replaces, same version
    assert [t.id for t in store.trajectories(verdict="pass")] == ["t0"]
    assert [t.id for t in store.trajectories(verdict="fail")] == ["t1"]
    assert store.count(verdict="labeled") == 3 and store.count(verdict="unlabeled") == 3
    (v,) = store.get("t0").verdicts
    assert (v.passed, v.score, v.reason, v.verifier, v.trajectory_id) == (True, 0.9, "again", "ref", "t0")
    with pytest.raises(ValueError, match="verdict filter"):
        store.trajectories(verdict="maybe")  # type: ignore[arg-type]
    # A QA pass (session 26): SQLAlchemy's error with the query in it; a status matching nothing.
    with pytest.raises(TypeError, match="since must be a datetime, not str '1d'"):
        store.trajectories(since="1d")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="status must be one of ok, error, interrupted, not 'weird'"):
        store.count(status="weird")
    with pytest.raises(TrajectoryNotFound):
        store.add_verdict("nope", Verdict(passed=True, verifier="ref"))


def test_get_by_prefix(sqlite_url: str) -> None:
    store = honed.open_store(sqlite_url)
    store.save(make(1, id="abc-1"))
    store.save(make(2, id="abc-2"))
    assert store.get("abc-1").id == "abc-1"
    with pytest.raises(TrajectoryNotFound, match="several"):
        store.get("abc")
    with pytest.raises(TrajectoryNotFound):
        store.get("zzz")


def test_get_by_the_head_of_the_short_id_the_cli_shows(store_url: str) -> None:
    """`honed runs` shows an id's last 12 characters; a new user typed the start of that (a QA
    pass, session 27: `honed show 180e` of `...-180e0894884d` was "no trajectory")."""
    store = honed.open_store(store_url)
    store.save(make(1, id="01a25136-0000-7000-8000-180e0894884d"))
    store.save(make(2, id="01a25136-0000-7000-8000-99990894884d"))
    assert store.get("180e").id.endswith("180e0894884d")
    with pytest.raises(TrajectoryNotFound, match="several"):
        store.get("0894884d")


def test_migrations_create_the_indexes_the_loop_queries(store_url: str) -> None:
    store = honed.open_store(store_url)
    inspector = inspect(store.engine)
    assert {"trajectories", "steps", "verdicts", "alembic_version"} <= set(inspector.get_table_names())
    indexed = {tuple(ix["column_names"]) for ix in inspector.get_indexes("trajectories")}
    for columns in [
        ("started_at",),
        ("agent", "started_at"),
        ("task_id",),
        ("split", "started_at"),
        ("status",),
        ("model_version",),
    ]:
        assert columns in indexed
    assert ("passed", "trajectory_id") in {
        tuple(ix["column_names"]) for ix in inspector.get_indexes("verdicts")
    }
    from alembic.script import ScriptDirectory

    from honed.store.store import SCHEMA_HEAD, _alembic_config

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head == SCHEMA_HEAD, "a new migration moves SCHEMA_HEAD too (opening a store skips alembic at it)"
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head


def test_alembic_downgrade_and_upgrade_round_trip(sqlite_url: str) -> None:
    from alembic import command

    from honed.store.store import _alembic_config

    store = honed.open_store(sqlite_url)
    config = _alembic_config()
    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "base")
    assert "trajectories" not in inspect(store.engine).get_table_names()
    store = honed.open_store(sqlite_url)  # open migrates back to head
    assert "trajectories" in inspect(store.engine).get_table_names()


def test_concurrent_first_opens_of_a_fresh_postgres_schema(pg_url: str) -> None:
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            TrajectoryStore(pg_url).close()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


_OPEN_AT = """
import sys, time
from honed.store import TrajectoryStore
while time.time() < float(sys.argv[2]):
    time.sleep(0.001)
try:
    TrajectoryStore(sys.argv[1]).close()
    print("ok")
except Exception as exc:
    print(type(exc).__name__, str(exc)[:200])
"""


def test_processes_opening_a_new_sqlite_store_at_once_all_open_it(tmp_path: Path) -> None:
    """A fleet (agents, `honed verify --watch`, `honed serve`) starting together on a new store:
    in-process locks do not reach other processes, and some failed with "table ... already
    exists" (3 rounds of 4 in a QA run)."""
    for round_ in range(3):
        url = f"sqlite:///{tmp_path}/fleet{round_}.db"
        start = str(time.time() + 2.5)  # after every interpreter has imported honed
        fleet = [
            subprocess.Popen([sys.executable, "-c", _OPEN_AT, url, start], stdout=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        assert sorted(p.communicate(timeout=120)[0].strip() for p in fleet) == ["ok"] * 4
        assert TrajectoryStore(url).count() == 0


def test_unreachable_postgres_is_a_clear_error() -> None:
    with pytest.raises(honed.StoreUnavailable, match=r"127\.0\.0\.1:1/") as caught:
        TrajectoryStore("postgresql+psycopg://nobody:secret@127.0.0.1:1/none")
    assert "secret" not in str(caught.value)


def test_an_agent_captured_into_postgres(pg_url: str) -> None:
    agent = create_agent(
        ToolScriptModel(), make_tools(), name="calc", middleware=[honed.Middleware(store=pg_url)]
    )
    agent.invoke({"messages": [("user", 'call mul {"a": 6, "b": 7}; answer {result}')]},
                 config={"metadata": {"honed": {"task_id": "pg", "split": "heldout"}}})  # fmt: skip
    honed.flush()
    (t,) = honed.open_store(pg_url).trajectories(split="heldout")
    assert t.task_id == "pg" and t.answer == "42" and [s.kind for s in t.steps] == ["model", "tool", "model"]
    assert t.steps[0].tool_calls == [{"name": "mul", "args": {"a": 6, "b": 7}, "id": "call_0_mul"}]


# -- store URLs: reading never creates; a URL that cannot work is one clear error ------------------


def test_opening_to_read_creates_nothing_where_there_is_no_store(tmp_path: Path, pg_url: str) -> None:
    typo = tmp_path / "typo" / "honed.db"
    with pytest.raises(StoreNotFound, match=r"no honed store at sqlite:///.*typo/honed\.db; create one with"):
        honed.open_store(f"sqlite:///{typo}", create=False)
    assert not typo.parent.exists()  # neither the file nor its folder

    other = tmp_path / "other.db"  # somebody else's SQLite file
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (x)")
    from honed.store import StoreSchemaUnknown

    with pytest.raises(StoreSchemaUnknown, match=r"another application's SQLite database \(tables: notes\)"):
        honed.open_store(f"sqlite:///{other}", create=False)
    with sqlite3.connect(other) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("notes",)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # not even switched to WAL

    with pytest.raises(StoreNotFound):  # an empty PostgreSQL schema stays empty
        honed.open_store(pg_url, create=False)
    engine = honed.open_store(pg_url).engine  # capturing (create=True) makes the store ...
    assert "trajectories" in inspect(engine).get_table_names()
    assert honed.open_store(pg_url, create=False).count() == 0  # ... then reading finds it


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("notaurl", "'notaurl' is not a store URL"),
        ("mysql://x", "unsupported store URL mysql://x"),
        # `sqlite:///$UNSET_VARIABLE`: was a store in memory, every run lost (a QA pass, session 15)
        ("sqlite:///", "sqlite:/// names no file"),
        ("mongodb://u:secret@host/db", "unsupported store URL mongodb://u:\\*\\*\\*@host/db"),
    ],
)
def test_a_malformed_or_unsupported_url_is_one_clear_error(url: str, message: str) -> None:
    with pytest.raises(InvalidStoreURL, match=message) as caught:
        TrajectoryStore(url)
    text = str(caught.value)
    assert "sqlite:///PATH" in text and "postgresql://USER@HOST/DB" in text
    assert "\n" not in text and "secret" not in text


def test_postgres_urls_mean_psycopg(pg_url: str) -> None:
    alias = pg_url.replace("postgresql+psycopg://", "postgres://")
    assert resolve_store_url(alias) == pg_url
    assert resolve_store_url(pg_url.replace("postgresql+psycopg://", "postgresql://")) == pg_url
    honed.open_store(alias).save(make(1))
    assert honed.open_store(pg_url).count() == 1


# -- conversations and resumed runs ------------------------------------------------------------------


def _resumed_part(i: int, thread_id: str = "th-1") -> dict:
    """What another process writes when it resumes a paused run: its own steps, numbered from 0."""
    start = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=i)
    steps = [Step(id=f"r{i}-{n}", index=n, kind="tool", name="add", output=str(n), started_at=start,
                  ended_at=start) for n in range(2)]  # fmt: skip
    record = trajectory_to_record(
        Trajectory(
            id=f"resume-run-{i}",
            agent="calc",
            task={"resume": {"decisions": [{"type": "approve"}]}},
            steps=steps,
            output="done",
            started_at=start,
            ended_at=start + timedelta(seconds=1),
            thread_id=thread_id,
        )
    )
    return {**record, "resumes": True}


def test_a_resumed_run_continues_the_interrupted_trajectory_of_its_thread(store_url: str) -> None:
    store = honed.open_store(store_url)
    store.save(make(0, thread_id="th-0", status="interrupted", output=None))
    store.save(make(1, thread_id="th-1", status="interrupted", output=None, checkpoint_id="ck-1"))
    assert store.count(finished=False) == 2 and store.count(status="interrupted", thread_id="th-1") == 1
    assert store.save_records([_resumed_part(5)]) == 0  # joined, not a new trajectory
    assert store.save_records([_resumed_part(5)]) == 0  # replayed from a spool: no change

    t = store.get("t1")
    assert (t.status, t.output, t.thread_id, t.checkpoint_id) == ("ok", "done", "th-1", "ck-1")
    assert t.task == make(1).task  # the request, not the resume command
    assert [(s.id, s.index) for s in t.steps] == [("s1-0", 0), ("s1-1", 1), ("r5-0", 2), ("r5-1", 3)]
    assert store.get("t0").status == "interrupted"  # another thread's pause is untouched
    assert [x.id for x in store.trajectories(thread_id="th-1")] == ["t1"]
    assert store.count(finished=True) == 1

    # Nothing paused on the thread (its first half never reached this store): stored on its own.
    assert store.save_records([_resumed_part(9, thread_id="th-new")]) == 1
    assert store.get("resume-run-9").task == {"resume": {"decisions": [{"type": "approve"}]}}


def test_a_resume_never_continues_a_pause_from_after_it(store_url: str) -> None:
    """A QA pass (session 26, as the capture role): a run planted paused on the victim's thread,
    ten years ahead, was "the newest paused run" and took the victim's resume: the victim's own
    run stayed paused for good, and the planted step sat inside the pass the worker then signed."""
    store = honed.open_store(store_url)
    store.save(make(1, thread_id="th-1", status="interrupted", output=None))  # the victim, paused
    planted = make(2, thread_id="th-1", status="interrupted", output=None)
    planted.id, planted.started_at = "planted", datetime(2036, 1, 1, tzinfo=UTC)
    planted.steps = [
        Step(id="planted-s0", index=0, kind="model", name="m", output={"role": "assistant", "content": "x"})
    ]
    store.save(planted)
    assert store.save_records([_resumed_part(5)]) == 0
    assert store.get("t1").status == "ok" and store.get("planted").status == "interrupted"
    assert [s.id for s in store.get("t1").steps] == ["s1-0", "s1-1", "r5-0", "r5-1"]


# -- messages once per trajectory ------------------------------------------------------------------


def conversation_run(n_model_steps: int, *, tid: str = "conv") -> Trajectory:
    """A tool loop whose model steps each see the whole conversation so far, plus a subagent whose
    model sees a conversation of its own, a repeated message, and inputs that are not chats."""
    system = {"role": "system", "content": "Be brief."}
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages: list[dict] = [system, {"role": "user", "content": "add things"}]
    steps: list[Step] = []
    for k in range(n_model_steps):
        reply = {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "add", "args": {"a": k}, "id": f"c{k}"}],
        }
        steps.append(Step(id=f"{tid}-m{k}", index=len(steps), kind="model", name="m",
                          input={"messages": list(messages), "tools": tools}, output=reply))  # fmt: skip
        steps.append(
            Step(id=f"{tid}-t{k}", index=len(steps), kind="tool", name="add", input={"a": k}, output="ok")
        )
        messages += [reply, {"role": "tool", "content": "ok", "tool_call_id": f"c{k}"}]
    messages.append({"role": "user", "content": "add things"})  # the same text again, later
    extra = [
        Step(id=f"{tid}-last", index=len(steps), kind="model", name="m",
             input={"messages": list(messages), "tools": tools, "settings": {"temperature": 0}}),
        Step(id=f"{tid}-sub", index=len(steps) + 1, kind="model", name="sub",
             input={"messages": [system, {"role": "user", "content": "a subtask"}]}),
        Step(id=f"{tid}-llm", index=len(steps) + 2, kind="model", name="llm", input={"prompts": ["raw text"]}),
        Step(id=f"{tid}-cut", index=len(steps) + 3, kind="model", name="m",
             input={"__truncated__": True, "type": "dict", "size": 10**6, "sha256": "0" * 64}),
    ]  # fmt: skip
    when = datetime(2026, 1, 1, tzinfo=UTC)
    return Trajectory(
        id=tid, agent="calc", task_id="conv", steps=steps + extra, started_at=when, ended_at=when
    )


def test_messages_are_stored_once_per_trajectory_and_read_back_whole(store_url: str) -> None:
    store = honed.open_store(store_url)
    original = conversation_run(6)
    store.save(original)
    assert store.get("conv").to_dict() == original.to_dict()
    (listed,) = store.trajectories()
    assert listed.to_dict() == original.to_dict()
    assert [s.input for s in listed.steps] == [s.input for s in original.steps]

    with store.engine.connect() as conn:
        stored = conn.execute(text("SELECT messages, tools FROM trajectories")).one()
        inputs = dict(conn.execute(text("SELECT id, input FROM steps WHERE kind = 'model'")).all())
    pool, tool_lists = (json.loads(v) if isinstance(v, str) else v for v in stored)
    inputs = {k: json.loads(v) if isinstance(v, str) else v for k, v in inputs.items()}
    # system, user, 6 x (assistant, tool result), the subagent's user message: once each
    assert len(pool) == 2 + 12 + 1 and len(tool_lists) == 1
    assert inputs["conv-m0"] == {"messages_ref": [[0, 2]], "tools_ref": 0}
    assert inputs["conv-m5"] == {"messages_ref": [[0, 12]], "tools_ref": 0}
    assert inputs["conv-last"] == {
        "messages_ref": [[0, 14], [1, 2]],
        "tools_ref": 0,
        "settings": {"temperature": 0},
    }
    assert inputs["conv-sub"] == {"messages_ref": [[0, 1], [14, 15]]}
    assert inputs["conv-llm"] == {"prompts": ["raw text"]} and inputs["conv-cut"]["__truncated__"] is True

    # Without step content (a span export that carries none): the same runs, inputs and outputs None.
    (bare,) = store.trajectories(step_content=False)
    expected = dataclasses.replace(
        original, steps=[dataclasses.replace(s, input=None, output=None) for s in original.steps]
    )
    assert bare.to_dict() == expected.to_dict()


def test_a_reading_command_never_upgrades_an_older_store(store_url: str) -> None:
    """A QA pass (session 28): `honed status` upgraded a store an older honed agent still captured
    into (0004 -> 0008), and from then on all its runs went to its spool. Reading commands now say
    how to upgrade and change nothing; `honed init` upgrades."""
    from alembic import command
    from typer.testing import CliRunner

    from honed.cli import app
    from honed.store import StoreSchemaOld
    from honed.store.store import SCHEMA_HEAD, _alembic_config, _revision

    store = TrajectoryStore(store_url, migrate=False)
    config = _alembic_config()
    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0004")
    with pytest.raises(StoreSchemaOld, match=r"schema 0004.*honed init --store"):
        honed.open_store(store_url, create=False)
    for command_line in (["runs"], ["status"], ["show", "x"]):
        result = CliRunner().invoke(app, [*command_line, "--store", store_url])
        assert result.exit_code == 2 and "honed init --store" in result.output, (command_line, result.output)
    assert _revision(store.engine) == "0004"
    assert CliRunner().invoke(app, ["init", "--store", store_url]).exit_code == 0
    assert _revision(store.engine) == SCHEMA_HEAD
    assert CliRunner().invoke(app, ["runs", "--store", store_url]).exit_code == 0
    store.close()


def test_migration_0006_converts_a_store_written_before_and_back(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from alembic import command
    from sqlalchemy import MetaData, insert

    from honed.store.store import (
        SCHEMA_HEAD,
        _alembic_config,
        _step_row,
        _trajectory_row,
        trajectory_to_record,
    )

    store = TrajectoryStore(store_url, migrate=False)
    config = _alembic_config()
    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0004")
    runs = [conversation_run(n, tid=f"old-{n}") for n in (1, 3)]
    runs.append(make(9))  # no conversation at all
    tables = MetaData()
    tables.reflect(store.engine, only=["trajectories", "steps"])
    with store.engine.begin() as conn:  # the layout before 0006: every model step's full input
        for t in runs:
            record = trajectory_to_record(t)
            row = _trajectory_row(record)
            row["metadata"], row["created_at"] = row.pop("meta"), t.started_at  # column names, not ORM's
            conn.execute(insert(tables.tables["trajectories"]), row)
            conn.execute(insert(tables.tables["steps"]), [_step_row(t.id, s) for s in record["steps"]])
    store.close()

    with caplog.at_level("WARNING", logger="honed"):
        store = honed.open_store(store_url)  # migrates to head, and says so
    assert f"from schema 0004 to {SCHEMA_HEAD}" in caplog.text
    for t in runs:
        assert store.get(t.id).to_dict() == t.to_dict()
    with store.engine.connect() as conn:  # 0007: no jsonb left to reorder keys
        types = {
            str(c["type"])
            for n in ("trajectories", "steps", "verdicts")
            for c in inspect(conn).get_columns(n)
        }
        assert "JSONB" not in types and "JSON" in types, types
    with store.engine.connect() as conn:
        raw = conn.execute(text("SELECT input FROM steps WHERE id = 'old-3-m2'")).scalar()
    assert (json.loads(raw) if isinstance(raw, str) else raw) == {"messages_ref": [[0, 6]], "tools_ref": 0}

    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0004")
    with store.engine.connect() as conn:
        raw = conn.execute(text("SELECT input FROM steps WHERE id = 'old-3-m2'")).scalar()
        assert "messages" not in {c["name"] for c in inspect(conn).get_columns("trajectories")}
    assert (json.loads(raw) if isinstance(raw, str) else raw) == runs[1].steps[4].input
    store.close()


def test_a_store_of_a_newer_honed_or_another_application_is_one_clear_error(tmp_path) -> None:
    """A QA pass (session 15): every command dumped alembic's ~270-line traceback."""
    import sqlite3

    from honed.store import StoreSchemaUnknown

    path = tmp_path / "newer.db"
    honed.open_store(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0099'")
    for create in (True, False):
        with pytest.raises(StoreSchemaUnknown, match=r"revision '0099'.*upgrade honed") as caught:
            honed.open_store(f"sqlite:///{path}", create=create)
        assert "\n" not in str(caught.value)
    with sqlite3.connect(path) as conn:  # nothing was changed
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("0099",)
    # Another application's SQLite file (no honed schema, tables of its own): refused, untouched
    # (a QA pass, session 20: `honed init` added honed's tables to it and switched it to WAL).
    other = tmp_path / "other_app.db"
    with closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
        conn.commit()
    before = other.read_bytes()
    for create in (True, False):
        with pytest.raises(
            StoreSchemaUnknown, match=r"another application's SQLite database \(tables: users\)"
        ):
            honed.open_store(f"sqlite:///{other}", create=create)
    assert other.read_bytes() == before and not Path(f"{other}-wal").exists()
    from typer.testing import CliRunner

    from honed.cli import app

    result = CliRunner().invoke(app, ["init", "--store", f"sqlite:///{other}"])
    assert result.exit_code == 2 and "nothing was changed" in result.output and other.read_bytes() == before
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()  # a file with no tables at all is a new store
    honed.open_store(f"sqlite:///{empty}").close()


def test_a_verifier_upgraded_judges_again_and_its_old_versions_verdicts_stop_counting(store_url: str) -> None:
    """A verifier fixed (too strict) and upgraded re-judges every run; its old version's fails
    kept every one of them a fail forever. A new version's error or "could not tell" supersedes
    nothing (an agent that can crash the new version must not shed the old one's fail), and every
    person's label counts: two labellers who disagree make a fail."""
    from honed.trajectory import label

    store = honed.open_store(store_url)
    for i in range(5):
        store.save(make(i))
    for i in range(4):
        store.add_verdict(f"t{i}", Verdict(passed=False, verifier="ref", version="1"))
    store.add_verdict("t0", Verdict(passed=True, verifier="ref", version="2"))  # the fix: a pass
    store.add_verdict("t1", Verdict(passed=None, verifier="ref", version="2", evidence={"error": "boom"}))
    store.add_verdict("t2", Verdict(passed=None, verifier="ref", version="2"))  # could not tell
    store.add_verdict("t3", Verdict(passed=True, verifier="ref", version="2"))
    store.add_verdict("t3", Verdict(passed=False, verifier="ref", version="3"))  # judged again, later
    store.add_verdict(
        "t4", Verdict(passed=True, verifier="human", version="alice", evidence={"labeler": "alice"})
    )
    store.add_verdict(
        "t4", Verdict(passed=False, verifier="human", version="bob", evidence={"labeler": "bob"})
    )
    # v1 (audited untrusted) passed t5; v2 (audited good) erred on it: v1's pass no longer counts
    store.save(make(5))
    store.add_verdict("t5", Verdict(passed=True, verifier="ref", version="1"))
    store.add_verdict("t5", Verdict(passed=None, verifier="ref", version="2", evidence={"error": "timeout"}))
    expected = {"t0": True, "t1": False, "t2": False, "t3": False, "t4": False, "t5": None}
    assert {t.id: label(t.verdicts) for t in store.trajectories()} == expected
    assert [t.id for t in store.trajectories(verdict="pass")] == ["t0"]  # the same label in SQL
    assert sorted(t.id for t in store.trajectories(verdict="fail")) == ["t1", "t2", "t3", "t4"]
    assert store.count(verdict="pass") == 1 and store.count(verdict="labeled") == 6


def test_a_malformed_store_url_is_refused_without_showing_its_password() -> None:
    """A QA pass (session 16): a typo in the port made the URL unreadable to SQLAlchemy, and the
    error (logged by capture, printed by every command) showed it whole, password and all."""
    from honed.store.store import InvalidStoreURL

    for url in (
        "postgresql://alice:S3cretPassw0rd@db.example:54x32/prod",
        "postgresql://db.example:54x32/prod?password=S3cretPassw0rd&sslmode=require",
    ):
        with pytest.raises(InvalidStoreURL) as error:
            honed.open_store(url)
        assert "S3cretPassw0rd" not in str(error.value) and "***" in str(error.value), str(error.value)


def test_a_sqlite_url_under_the_home_folder_opens_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A QA pass (session 16): `sqlite:///~/honed.db` made the folder and checked the file with
    `~` expanded, but handed SQLite the raw path: `init` failed, and capture spooled forever."""
    monkeypatch.setenv("HOME", str(tmp_path))
    with honed.open_store("sqlite:///~/honed.db") as store:
        store.save(Trajectory(id="t1", agent="a", task="hi", output="ok"))
    assert (tmp_path / "honed.db").is_file()
    assert honed.open_store("sqlite:///~/honed.db", create=False).get("t1").output == "ok"


def test_a_role_that_may_not_read_the_store_is_told_so(pg_url: str) -> None:
    """A QA pass (session 16): a PostgreSQL role without rights on the tables was told there was
    no store at all, and to run `honed init`."""
    import uuid

    from sqlalchemy import create_engine, make_url, text

    from honed.store.store import StoreUnavailable

    honed.open_store(pg_url).close()
    role = f"reader_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    schema = pg_url.rsplit("search_path%3D", 1)[1]
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(text(f'GRANT USAGE ON SCHEMA "{schema}" TO {role}'))  # the tables: no rights
    try:
        url = make_url(pg_url).set(username=role, password=None).render_as_string(hide_password=False)
        with pytest.raises(StoreUnavailable, match="refuses this user") as refused:
            honed.open_store(url, create=False)
        assert "honed init" not in str(refused.value)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
        admin.dispose()


def test_json_reads_back_with_its_keys_in_the_order_written(store_url: str) -> None:
    """PostgreSQL's jsonb sorted keys shortest first: a tool call's arguments and a tool's schema
    came back reordered, so training learned another order than the model wrote or saw."""
    args = {"query": "q", "k": 3, "b": {"zz": 1, "a": 2}}
    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object",
              "properties": {"query": {"type": "string"}, "k": {"type": "integer"}}}}}]  # fmt: skip
    messages = [{"role": "user", "content": "find"}]
    base = make(1)
    steps = [
        dataclasses.replace(base.steps[0], input={"messages": messages, "tools": tools},
                tool_calls=[{"name": "search", "args": args, "id": "c1"}]),
        dataclasses.replace(base.steps[1], name="search", input=args),
    ]  # fmt: skip
    run = dataclasses.replace(base, steps=steps, metadata={"zeta": 1, "alpha": 2})
    with honed.open_store(store_url) as store:
        store.save(run)
        back = store.get(run.id)
        assert list(back.steps[0].tool_calls[0]["args"]) == ["query", "k", "b"]
        assert list(back.steps[0].tool_calls[0]["args"]["b"]) == ["zz", "a"]
        assert list(back.steps[1].input) == ["query", "k", "b"]
        schema = back.steps[0].input["tools"][0]["function"]["parameters"]
        assert list(schema) == ["type", "properties"] and list(schema["properties"]) == ["query", "k"]
        assert list(back.metadata) == list(run.metadata)
        (listed,) = store.trajectories(limit=1)
        assert list(listed.steps[1].input) == ["query", "k", "b"]


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Any:
    """A folder on a file system of its own, remounted read-only by `make_read_only()`: what a
    snapshot or a backup mounted for reading is. Needs root (CI and this machine are)."""
    folder = tmp_path / "mounted"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a file system here: {mounted.stderr.decode().strip()}")

    def make_read_only() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)

    try:
        yield folder, make_read_only
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_store_on_a_read_only_file_system_is_read_as_it_is(read_only_mount: Any) -> None:
    """A QA pass (session 23): a store copied to a read-only mount could not be read at all
    ("unable to open database file": a WAL-mode file needs its `-shm` made beside it). It is read
    now, by the API and the CLI, and a write says the store is read-only."""
    folder, make_read_only = read_only_mount
    url = f"sqlite:///{folder / 'runs.db'}"
    with honed.open_store(url) as store:
        store.save(Trajectory(id="run-1", agent="calc", task="what is 2 plus 2?", output="4"))
    make_read_only()
    with honed.open_store(url, create=False) as store:
        [run] = store.trajectories()
        assert (run.id, run.output) == ("run-1", "4")
        with pytest.raises(Exception, match=r"readonly|read-only"):
            store.save(Trajectory(id="run-2", agent="calc", task="what is 3 plus 3?"))
    listed = subprocess.run(
        [sys.executable, "-m", "honed.cli", "runs", "--store", url], capture_output=True, text=True
    )
    assert listed.returncode == 0 and "run-1" in listed.stdout, listed.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["runs.db"]  # nothing made beside it
