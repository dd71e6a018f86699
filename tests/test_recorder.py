"""The writer side: flush, exit, stats, a bounded queue, and a store that goes down and comes back."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from sqlalchemy.engine import make_url

import honed
from fakes import ToolScriptModel, make_tools
from honed.capture.recorder import Recorder
from tcpproxy import TcpProxy


def add_task(a: int, b: int) -> str:
    return f'call add {{"a": {a}, "b": {b}}}; answer the sum is {{result}}'


def invoke(agent, i: int) -> str:
    out = agent.invoke(
        {"messages": [("user", add_task(i, 1))]}, config={"metadata": {"honed": {"task_id": f"t{i}"}}}
    )
    return out["messages"][-1].content


def wait_until_replayed(recorder: Recorder, written: int = 0, timeout: float = 40.0) -> dict:
    """Until the spool is empty and `written` trajectories are counted: the store's process
    replays on its own timer and reports its counts with its next answer, a moment after the
    spool file is emptied."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recorder.flush()
        stats = recorder.stats()
        if stats["spool_pending"] == 0 and stats["trajectories_written"] >= written:
            return stats
        time.sleep(0.2)
    raise AssertionError(f"spool never drained: {recorder.stats()}")


def test_stats_count_what_was_captured_and_written(sqlite_url: str, writer: str) -> None:
    recorder = Recorder(sqlite_url)
    assert recorder.writer == writer
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(recorder=recorder)])
    for i in range(4):
        invoke(agent, i)
    assert recorder.flush()
    stats = recorder.stats()
    assert stats["trajectories_captured"] == stats["trajectories_written"] == 4 and stats["writer"] == writer
    assert stats["steps_written"] == 4 * 3
    assert stats["events_captured"] == stats["events_processed"] > 0
    assert stats["events_dropped"] == stats["trajectories_spooled"] == stats["spool_pending"] == 0
    assert honed.stats()["stores"][sqlite_url]["trajectories_written"] == 4


def test_sqlite_store_down_then_back_spools_and_replays_in_order(tmp_path: Path, writer: str) -> None:
    blocker = tmp_path / "db"
    blocker.write_text("a file where the store's folder should be: the store cannot open")
    recorder = Recorder(f"sqlite:///{blocker / 'honed.db'}", spool_path=tmp_path / "spool.jsonl")
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(recorder=recorder)])

    answers = [invoke(agent, i) for i in range(5)]  # the agent never notices
    assert answers == [f"the sum is {i + 1}" for i in range(5)]
    assert recorder.flush()
    stats = recorder.stats()
    assert (
        stats["trajectories_spooled"] == 5
        and stats["spool_pending"] == 5
        and stats["trajectories_written"] == 0
    )
    assert stats["store_error"]

    blocker.unlink()  # the store comes back
    for i in range(5, 8):
        invoke(agent, i)
    stats = wait_until_replayed(recorder, written=8)
    assert stats["trajectories_written"] == 8 and stats["trajectories_replayed"] >= 5
    store = honed.open_store(f"sqlite:///{blocker / 'honed.db'}")
    oldest_first = store.trajectories(limit=None, oldest_first=True)
    assert [t.task_id for t in oldest_first] == [f"t{i}" for i in range(8)]
    assert all(len(t.steps) == 3 for t in oldest_first)


def test_a_sqlite_file_read_only_when_first_opened_is_written_once_it_is_writable(
    tmp_path: Path, writer: str
) -> None:
    """A QA pass (session 28): a store file read-only when the agent started (`chattr +i`, a
    snapshot being taken) was opened read-only, and stayed so: with the file writable again,
    every run went on to the spool until a restart."""
    path = tmp_path / "honed.db"
    honed.open_store(f"sqlite:///{path}").close()
    files = sorted(str(p) for p in tmp_path.glob("honed.db*"))
    if subprocess.run(["chattr", "+i", *files], capture_output=True).returncode != 0:
        pytest.skip("chattr +i needs root on a file system that has it")
    try:
        recorder = Recorder(f"sqlite:///{path}", spool_path=tmp_path / "spool.jsonl")
        agent = create_agent(
            ToolScriptModel(), make_tools(), middleware=[honed.Middleware(recorder=recorder)]
        )
        invoke(agent, 0)
        assert recorder.flush()
        assert recorder.stats()["trajectories_spooled"] == 1
    finally:
        subprocess.run(["chattr", "-i", *files], check=True)
    for i in range(1, 3):
        invoke(agent, i)
    stats = wait_until_replayed(recorder, written=3)
    assert stats["trajectories_written"] == 3
    assert sorted(t.task_id for t in honed.open_store(f"sqlite:///{path}").trajectories()) == [
        "t0",
        "t1",
        "t2",
    ]
    recorder.close()


def test_postgres_outage_spools_and_replays(pg_url: str, tmp_path: Path, writer: str) -> None:
    url = make_url(pg_url)
    proxy = TcpProxy(url.port or 5432)
    proxy.up()
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    recorder = Recorder(proxied, spool_path=tmp_path / "spool.jsonl")
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(recorder=recorder)])
    try:
        invoke(agent, 0)
        assert recorder.flush() and recorder.stats()["trajectories_written"] == 1

        proxy.down()
        for i in range(1, 4):
            invoke(agent, i)
        assert recorder.flush(timeout=60)
        assert recorder.stats()["spool_pending"] == 3, recorder.stats()

        proxy.up()
        invoke(agent, 4)
        stats = wait_until_replayed(recorder, written=5)
    finally:
        proxy.down()
    assert stats["trajectories_written"] == 5
    store = honed.open_store(pg_url)
    assert [t.task_id for t in store.trajectories(limit=None, oldest_first=True)] == [
        f"t{i}" for i in range(5)
    ]


def test_a_process_whose_store_hangs_exits_promptly_and_keeps_its_runs(pg_url: str, tmp_path: Path) -> None:
    """A QA pass (session 17): with PostgreSQL hung (connections open, nothing answered), a
    process took about a minute to exit (the store's process waited 30 s, was killed, and its
    batches were written again from here into the same hung store). Now the process exits within
    seconds and what the store never acknowledged is in the spool, replayed once it is back."""
    url = make_url(pg_url)
    proxy = TcpProxy(url.port or 5432)
    proxy.up()
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    spool = tmp_path / "spool.jsonl"
    recorder = Recorder(proxied, spool_path=spool, writer="process")
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(recorder=recorder)])
    try:
        invoke(agent, 0)
        assert recorder.flush() and recorder.stats()["trajectories_written"] == 1
        proxy.freeze()
        for i in (1, 2):
            invoke(agent, i)
        assert not recorder.flush(timeout=2)
        assert recorder.stats()["lag_s"] >= 1.5  # waiting in the store's process counts (it said 0)
        started = time.monotonic()
        recorder.close(timeout=2)
        took = time.monotonic() - started
    finally:
        proxy.down()
    assert took < 15, f"closing took {took:.0f} s"
    from honed.capture.spool import Spool

    store = honed.open_store(pg_url)
    Spool(spool).replay(store.save_records)
    assert sorted(t.task_id for t in store.trajectories(limit=None)) == ["t0", "t1", "t2"]


def test_a_pipe_full_of_batches_for_a_hung_store_still_lets_the_process_exit(
    pg_url: str, tmp_path: Path
) -> None:
    """A QA pass (session 20): with PostgreSQL hung long enough for the batches to fill the pipe to
    the store's process, the writer blocked in a write and closing waited for ever on the pipe's
    lock (SIGTERM could not end it); nothing reached the spool. Now closing ends within seconds,
    every run in the spool, the ones still queued here too."""
    import threading

    from langchain_core.tools import tool

    @tool
    def report(n: int) -> str:
        """A long report."""
        return f"line {n} " * 6000  # ~50 KB a run: the pipe fills within a few dozen runs

    url = make_url(pg_url)
    proxy = TcpProxy(url.port or 5432)
    proxy.up()
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    spool = tmp_path / "spool.jsonl"
    recorder = Recorder(proxied, spool_path=spool, writer="process")
    agent = create_agent(ToolScriptModel(), [report], middleware=[honed.Middleware(recorder=recorder)])
    runs = 80
    try:
        invoke_report = {"messages": [("user", 'call report {"n": -1}; answer done')]}
        agent.invoke(invoke_report)
        assert recorder.flush(timeout=30)  # connected: the freeze hangs an open connection
        proxy.freeze()
        for i in range(runs):
            agent.invoke({"messages": [("user", f'call report {{"n": {i}}}; answer done')]})
        closing = threading.Thread(target=recorder.close, kwargs={"timeout": 2}, daemon=True)
        started = time.monotonic()
        closing.start()
        closing.join(60)
        took = time.monotonic() - started
    finally:
        proxy.down()
    assert not closing.is_alive() and took < 30, f"closing took {took:.0f} s"
    from honed.capture.spool import Spool

    assert Spool(spool).pending() == runs  # the first run is in the store


def test_a_store_password_lands_nowhere_at_rest_or_in_logs(
    tmp_path: Path, writer: str, caplog: pytest.LogCaptureFixture
) -> None:
    """libpq takes a password in the URL's query too (`?password=`, `?sslpassword=`): the spool's
    label file, the outage warning and `honed.stats()` showed it (only `user:pw@` was hidden)."""
    secrets = ("UserPw1x", "QueryPw2x", "SslPw3x")
    url = "postgresql+psycopg://app:UserPw1x@127.0.0.1:1/db?password=QueryPw2x&sslpassword=SslPw3x&sslmode=disable"
    recorder = Recorder(url, spool_path=tmp_path / "spool")
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(recorder=recorder)])
    with caplog.at_level(logging.WARNING):
        assert invoke(agent, 1) == "the sum is 2"
        recorder.flush()
    stats = recorder.stats()
    assert stats["spool_pending"] == 1 and "sslmode=disable" in stats["store"]
    written = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    for shown in (
        written,
        caplog.text,
        json.dumps(stats, default=str),
        json.dumps(honed.stats(), default=str),
    ):
        assert not any(secret in shown for secret in secrets), shown[:2000]
    recorder.close()


def test_an_unusable_store_url_never_breaks_the_agent(tmp_path: Path, writer: str) -> None:
    recorder = Recorder("nosuchdialect://nowhere/db", spool_path=tmp_path / "spool.jsonl")
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(recorder=recorder)])
    assert invoke(agent, 1) == "the sum is 2"
    recorder.flush()
    assert recorder.stats()["spool_pending"] == 1  # kept, not lost


def test_a_spool_folder_that_cannot_be_read_never_stops_capture(sqlite_url: str, tmp_path: Path) -> None:
    """A QA pass (session 20): with the spool's folder under a file (or unreadable), `instrument()`
    raised at start and `Middleware` stored nothing, though the store was fine."""
    (tmp_path / "a_file").write_text("")
    recorder = Recorder(sqlite_url, spool_path=tmp_path / "a_file" / "spool.jsonl")
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(recorder=recorder)])
    assert invoke(agent, 1) == "the sum is 2"
    assert recorder.flush() and recorder.stats()["trajectories_written"] == 1


def test_labels_that_cannot_be_copied_or_printed_keep_the_run(sqlite_url: str) -> None:
    """A QA pass (session 20): a label holding a lock (no deep copy) whose `repr` raises made the
    run's start raise inside LangChain: the run was stored under its node's name."""
    import threading

    class Ref:
        def __init__(self) -> None:
            self.lock = threading.Lock()

        def __repr__(self) -> str:
            raise RuntimeError("no repr")

    honed.instrument(store=sqlite_url)
    try:
        agent = create_agent(ToolScriptModel(), make_tools(), name="calc")
        agent.invoke(
            {"messages": [("user", "answer 42")]}, {"metadata": {"honed": {"task_id": "t", "ref": Ref()}}}
        )
        assert honed.flush()
    finally:
        honed.uninstrument()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert (t.agent, t.task_id, t.answer) == ("calc", "t", "42")


def test_a_full_queue_drops_and_counts_but_the_agent_runs_on(sqlite_url: str) -> None:
    recorder = Recorder(sqlite_url, max_queue=3, flush_interval=5.0)
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(recorder=recorder)])
    assert [invoke(agent, i) for i in range(3)] == [f"the sum is {i + 1}" for i in range(3)]
    assert recorder.stats()["events_dropped"] > 0


def test_trajectories_are_written_at_interpreter_exit(tmp_path: Path, writer: str) -> None:
    db = tmp_path / "exit.db"
    script = textwrap.dedent(
        f"""
        import honed
        from langchain.agents import create_agent
        from honed.testing import ScriptedChatModel
        honed.instrument(store="sqlite:///{db}")
        agent = create_agent(ScriptedChatModel(), [], name="exiting")
        for i in range(3):
            agent.invoke({{"messages": [("user", "answer bye")]}})
        # no honed.flush(): the atexit hook must write them
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=120)
    store = honed.open_store(f"sqlite:///{db}")
    assert [t.answer for t in store.trajectories()] == ["bye"] * 3


@pytest.mark.parametrize("n_threads", [4])
def test_flush_from_many_threads_returns_when_everything_before_it_is_written(
    sqlite_url: str, n_threads: int, writer: str
) -> None:
    import threading

    recorder = Recorder(sqlite_url)
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(recorder=recorder)])
    seen: list[int] = []

    def worker(w: int) -> None:
        invoke(agent, w)
        assert recorder.flush()
        seen.append(honed.open_store(sqlite_url).count(task_id=f"t{w}"))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert seen == [1] * n_threads


def test_a_stream_abandoned_under_middleware_is_written_when_the_run_ends(sqlite_url: str) -> None:
    recorder = Recorder(sqlite_url)
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(recorder=recorder)])
    stream = agent.stream({"messages": [("user", add_task(1, 2))]}, stream_mode="updates")
    next(stream)
    stream.close()  # no after_agent hook runs, but the root run ends: honed.capture.roots sees it
    recorder.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert t.status == "error" and "abandoned (the caller stopped consuming the stream)" in t.error


def test_a_run_that_never_ends_is_written_after_the_open_timeout(sqlite_url: str) -> None:
    recorder = Recorder(sqlite_url, open_timeout_s=1)
    payload = ("chain", "agent", {"messages": []}, {}, None, None)
    recorder.emit((0, "never-ends", None, time.time(), payload))  # a START, then silence
    time.sleep(1.5)
    recorder.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert t.status == "error" and "incomplete" in t.error


def test_capture_imports_no_training_stack() -> None:
    code = (
        "import sys, honed; from honed.capture import middleware, callbacks; "
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_instrument_again_switches_the_store(tmp_path: Path) -> None:
    first, second = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    agent = create_agent(ToolScriptModel(), make_tools(), name="calc")
    try:
        honed.instrument(store=first)
        invoke(agent, 1)
        honed.instrument(store=second)
        invoke(agent, 2)
    finally:
        honed.uninstrument()
    invoke(agent, 3)  # not captured any more
    honed.flush()
    assert [t.task_id for t in honed.open_store(first).trajectories()] == ["t1"]
    assert [t.task_id for t in honed.open_store(second).trajectories()] == ["t2"]


def test_flush_after_a_recorder_was_closed_does_not_wait(sqlite_url: str) -> None:
    closed = Recorder(sqlite_url)
    closed.emit((99, "x", None, 0.0, None))  # starts its writer
    closed.close()
    started = time.monotonic()
    assert closed.flush(timeout=5) and honed.flush(timeout=5)
    assert time.monotonic() - started < 1


def test_a_store_url_that_can_never_work_is_reported_once_not_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, writer: str
) -> None:
    recorder = Recorder("notaurl", spool_path=tmp_path / "spool.jsonl", flush_interval=0.05)
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(recorder=recorder)])
    with caplog.at_level("WARNING", logger="honed"):
        assert [invoke(agent, i) for i in range(2)] == ["the sum is 1", "the sum is 2"]
        assert recorder.flush()
        time.sleep(0.6)  # many idle ticks of the writer: a store that is only down would be retried
        invoke(agent, 2)
        assert recorder.flush()
    stats = recorder.stats()
    assert stats["store_error"].startswith("configuration error: 'notaurl' is not a store URL")
    assert stats["spool_pending"] == 3 and stats["trajectories_written"] == 0  # kept for a fixed URL
    reports = [r for r in caplog.records if "notaurl" in r.getMessage()]
    assert [r.levelname for r in reports] == ["ERROR"] and "honed spool --replay" in reports[0].getMessage()


def test_a_spool_left_by_an_earlier_process_is_replayed_without_a_new_capture(
    tmp_path: Path, writer: str
) -> None:
    blocker = tmp_path / "db"
    blocker.write_text("a file where the store's folder should be: the store cannot open")
    url = f"sqlite:///{blocker / 'honed.db'}"
    earlier = Recorder(url)
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(recorder=earlier)])
    invoke(agent, 1)
    earlier.close()  # the process that spooled it is gone
    assert earlier.spool.pending() == 1

    blocker.unlink()  # the store is back
    later = Recorder(url)  # e.g. the application restarts; it captures nothing yet
    deadline = time.monotonic() + 20
    while later.spool.pending() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [t.task_id for t in honed.open_store(url).trajectories()] == ["t1"]
    later.close()


def test_instrument_takes_a_postgres_url(pg_url: str) -> None:
    alias = pg_url.replace("postgresql+psycopg://", "postgres://")
    agent = create_agent(ToolScriptModel(), make_tools(), name="calc")
    try:
        honed.instrument(store=alias)
        invoke(agent, 1)
    finally:
        honed.uninstrument()
    assert honed.flush()
    assert honed.stats()["stores"][pg_url]["store_error"] is None
    assert [t.task_id for t in honed.open_store(pg_url).trajectories()] == ["t1"]


def test_a_run_holding_unstorable_text_is_spooled_and_replayed_with_the_rest(
    tmp_path: Path, writer: str
) -> None:
    """A tool's output with a lone surrogate (a hostile client's text, a broken decoder) while
    the store is down: the spool (UTF-8) must still take it, and its replay must not stall the
    runs queued behind it once the store is back."""
    from langchain_core.tools import tool

    @tool
    def echo(text: str) -> str:
        """Echo, with a lone surrogate."""
        return text + "\ud800"

    blocker = tmp_path / "db"
    blocker.write_text("a file where the store's folder should be")
    recorder = Recorder(f"sqlite:///{blocker / 'honed.db'}", spool_path=tmp_path / "spool.jsonl")
    agent = create_agent(ToolScriptModel(), [echo], middleware=[honed.Middleware(recorder=recorder)])
    for i in range(3):
        agent.invoke({"messages": [("user", f'call echo {{"text": "x{i}"}}; answer {{result}}')]})
    assert recorder.flush() and recorder.stats()["spool_pending"] == 3
    blocker.unlink()
    stats = wait_until_replayed(recorder, written=3)
    assert stats["trajectories_written"] == 3 and stats["write_errors"] == 0
    runs = honed.open_store(f"sqlite:///{blocker / 'honed.db'}").trajectories(oldest_first=True)
    assert [t.tool_steps()[0].output for t in runs] == [f"x{i}\ufffd" for i in range(3)]


def test_a_torn_last_spool_line_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    """A QA pass (session 16): after a crash cut an append short, the next (complete, fsynced)
    record was written on the torn line and lost with it at replay."""
    from honed.capture.spool import Spool

    path = tmp_path / "spool.jsonl"
    spool = Spool(path)

    def record(i: int) -> dict[str, Any]:
        return {"id": f"run-{i}", "started_at": 1.0, "agent": "a", "steps": []}

    spool.append([record(0), record(1)])
    path.write_bytes(path.read_bytes()[:-15])  # the append of run-1 cut short
    spool.append([record(2), record(3)])
    replayed: list[str] = []
    spool.replay(lambda chunk: replayed.extend(r["id"] for r in chunk))
    assert replayed == ["run-0", "run-2", "run-3"]


@pytest.mark.parametrize(
    ("value", "writer"), [("bogus", "process"), ("Thread", "thread"), (" process", "process")]
)
def test_a_mistyped_writer_in_the_environment_is_warned_of_and_capture_goes_on(
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    value: str,
    writer: str,
) -> None:
    """A QA pass (session 25): `HONED_WRITER=bogus` (or `Thread`) raised in every run, which the
    agent survived uncaptured: nothing was stored, and the process exited 0."""
    monkeypatch.setenv("HONED_WRITER", value)
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(store=sqlite_url)])
    with caplog.at_level(logging.WARNING, logger="honed"):
        agent.invoke({"messages": [("user", 'call add {"a": 1, "b": 2}; answer {result}')]})
    assert honed.flush()
    assert [t.answer for t in honed.open_store(sqlite_url).trajectories()] == ["3"]
    assert Recorder(sqlite_url).writer == writer
    assert ("HONED_WRITER" in caplog.text) == (value == "bogus")


def test_a_spool_is_for_its_user_alone(tmp_path: Path) -> None:
    """A QA pass (session 27, production setup): spooled conversations were 0644 in a 0755 folder
    under a 022 umask: any account on the host could read them."""
    import os
    import stat

    from honed.capture.spool import Spool

    old = os.umask(0o022)
    try:
        path = tmp_path / "spool" / "x.jsonl"
        Spool(path).append([{"id": "run-0", "started_at": 1.0, "agent": "a", "steps": []}])
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_every_counter_is_there_before_the_first_capture() -> None:
    """A QA pass (session 27): in a process using `Middleware` alone, `honed.stats()` held only
    `lag_s` and `stores` until a run was captured: `stats()["trajectories_written"]` raised."""
    import subprocess
    import sys

    code = "import honed; s = honed.stats(); print(s['trajectories_written'], s['spool_pending'], s['events_dropped'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["0", "0", "0"], out


def test_a_flush_tries_the_store_again_for_what_the_spool_holds(tmp_path: Path, writer: str) -> None:
    """A QA pass (session 27, production setup): runs spooled during an outage stayed in the spool
    at exit although the store had been back for seconds: the next retry was due in 30 s, and
    `flush()` (what a normal exit runs) did not try. On a host whose disk is thrown away, lost."""
    blocker = tmp_path / "db"
    blocker.write_text("a file where the store's folder should be: the store cannot open")
    recorder = Recorder(f"sqlite:///{blocker / 'honed.db'}", spool_path=tmp_path / "spool.jsonl")
    agent = create_agent(ToolScriptModel(), make_tools(), middleware=[honed.Middleware(recorder=recorder)])
    for i in range(3):
        invoke(agent, i)
    assert recorder.flush() and recorder.stats()["spool_pending"] == 3
    blocker.unlink()  # back, long before the next retry
    assert recorder.flush()
    stats = recorder.stats()
    assert stats["spool_pending"] == 0 and stats["trajectories_written"] == 3, stats
    recorder.close()
