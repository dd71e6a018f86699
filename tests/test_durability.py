"""What a killed agent process loses: nothing on SIGTERM, at most its last `lag_s` on kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import honed

AGENT = textwrap.dedent(
    """
    import sys, time
    import honed
    from langchain.agents import create_agent
    from honed.testing import ScriptedChatModel

    class Model(ScriptedChatModel):
        latency: float = 0.0

        def _generate(self, *args, **kwargs):
            time.sleep(self.latency)  # a model that answers in `latency` seconds
            return super()._generate(*args, **kwargs)

    honed.instrument(store=sys.argv[1])
    agent = create_agent(Model(latency=float(sys.argv[3])), tools=[])
    for i in range(int(sys.argv[2])):
        agent.invoke({"messages": [("user", f"answer {i}")]}, config={"metadata": {"honed": {"task_id": f"t{i}"}}})
        print(i, time.time(), honed.stats().get("lag_s"), flush=True)
    time.sleep(120)
    """
)


def _run_and_kill(
    tmp_path: Path, sig: int, *, runs: int, latency: float
) -> tuple[dict[int, float], float, set[str]]:
    """Start the agent, let it finish `runs` runs, send `sig`; (end time per run, kill time, stored task ids)."""
    url = f"sqlite:///{tmp_path / 'kill.db'}"
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    env = {**os.environ, "HONED_SPOOL_DIR": str(tmp_path / "spool")}
    proc = subprocess.Popen(
        [sys.executable, str(script), url, str(runs + 100), str(latency)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    ends: dict[int, float] = {}
    lag = 0.0
    assert proc.stdout is not None
    for line in proc.stdout:
        index, ended, printed = line.split()
        ends[int(index)], lag = float(ended), float(printed) if printed != "None" else 0.0
        if len(ends) == runs:
            break
    killed = time.time()
    proc.send_signal(sig)
    proc.wait(timeout=60)
    with honed.open_store(url) as store:
        stored = {t.task_id for t in store.trajectories(None, with_steps=False) if t.task_id}
    return ends, killed, lag, stored


def test_sigterm_loses_no_finished_run(tmp_path: Path, writer: str) -> None:
    """A burst faster than the writer (a zero-latency model) leaves runs queued; SIGTERM flushes
    them before the process dies of it."""
    ends, _, _, stored = _run_and_kill(tmp_path, signal.SIGTERM, runs=150, latency=0.0)
    assert {f"t{i}" for i in ends} <= stored


def test_kill_9_loses_at_most_the_runs_that_ended_within_the_lag(tmp_path: Path, writer: str) -> None:
    """kill -9 cannot be caught: it loses what was still in memory, the runs that ended within
    `honed.stats()["lag_s"]` of it (a fraction of a second while the writer keeps up with a model
    that takes 20 ms a call, more on a loaded machine); everything older is in the store."""
    ends, killed, lag, stored = _run_and_kill(tmp_path, signal.SIGKILL, runs=100, latency=0.02)
    old = {f"t{i}" for i, ended in ends.items() if ended < killed - lag - 0.5}
    assert old and old <= stored, (lag, sorted(old - stored))


SERVED = textwrap.dedent(
    """
    import signal, sys, time
    from concurrent.futures import ThreadPoolExecutor
    import honed
    from langchain.agents import create_agent
    from honed.testing import ScriptedChatModel

    # An app's own SIGTERM handler, installed before honed (a server's graceful shutdown): it
    # still runs, after honed flushed.
    def graceful(signum, frame):
        print("graceful", flush=True)
        sys.exit(0)

    if sys.argv[2] == "app-handler":
        signal.signal(signal.SIGTERM, graceful)
    agent = create_agent(ScriptedChatModel(), tools=[], middleware=[honed.Middleware(store=sys.argv[1])])

    def serve(i):  # each request on a worker thread, as a served app runs them
        agent.invoke({"messages": [("user", f"answer {i}")]}, config={"metadata": {"honed": {"task_id": f"t{i}"}}})
        return i

    with ThreadPoolExecutor(4) as pool:
        for i in pool.map(serve, range(200)):
            print(i, flush=True)
    time.sleep(120)
    """
)


def test_sigterm_loses_no_run_a_middleware_captured_on_worker_threads(tmp_path: Path) -> None:
    """A QA pass (session 17): `Middleware` builds its recorder at its first request, on a worker
    thread, where no signal handler can be set: a served app (uvicorn, a thread pool, a forked
    Pool) stored 0 of 20 answered runs on SIGTERM. The handler is set when the middleware is
    built, and an application's own handler still runs after the flush."""
    for mode in ("default", "app-handler"):
        url = f"sqlite:///{tmp_path / (mode + '.db')}"
        script = tmp_path / "served.py"
        script.write_text(SERVED)
        env = {**os.environ, "HONED_SPOOL_DIR": str(tmp_path / "spool")}
        proc = subprocess.Popen(
            [sys.executable, str(script), url, mode], stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout is not None
        answered = set()
        for line in proc.stdout:
            answered.add(f"t{line.strip()}")
            if len(answered) == 200:
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == (0 if mode == "app-handler" else -signal.SIGTERM), mode
        assert ("graceful" in rest) is (mode == "app-handler")
        with honed.open_store(url) as store:
            stored = {t.task_id for t in store.trajectories(None, with_steps=False)}
        assert answered <= stored, (mode, len(answered - stored))


HUNG = textwrap.dedent(
    """
    import sys, time
    import honed
    from langchain.agents import create_agent
    from honed.testing import ScriptedChatModel

    honed.instrument(store=sys.argv[1])
    agent = create_agent(ScriptedChatModel(), tools=[])
    agent.invoke({"messages": [("user", "answer first")]}, {"metadata": {"honed": {"task_id": "first"}}})
    assert honed.flush(30)
    print("connected", flush=True)
    sys.stdin.readline()  # the store hangs now
    for i in range(20):
        agent.invoke({"messages": [("user", f"answer {i}")]}, {"metadata": {"honed": {"task_id": f"t{i}"}}})
    print("captured", flush=True)
    time.sleep(120)
    """
)


def test_sigterm_while_the_store_hangs_spools_every_run(pg_url: str, tmp_path: Path) -> None:
    """A QA pass (session 20): on SIGTERM honed flushed in vain for 10 s and the process died with
    every unacknowledged run in its store's process, which then died too: 0 of 20 spooled. A
    SIGTERM that ends the process now closes as exit does: what the store never took is spooled."""
    from sqlalchemy.engine import make_url

    from honed.capture.spool import Spool
    from tcpproxy import TcpProxy

    url = make_url(pg_url)
    proxy = TcpProxy(url.port or 5432)
    proxy.up()
    proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
    script = tmp_path / "hung.py"
    script.write_text(HUNG)
    env = {**os.environ, "HONED_SPOOL_DIR": str(tmp_path / "spool")}
    proc = subprocess.Popen(
        [sys.executable, str(script), proxied],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == "connected"
        proxy.freeze()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "captured"
        time.sleep(1.0)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        proc.kill()
        proxy.down()
    assert took < 15, f"the process took {took:.0f} s to end"
    spooled = sum(Spool(p).pending() for p in (tmp_path / "spool").glob("*.jsonl"))
    assert spooled == 20
