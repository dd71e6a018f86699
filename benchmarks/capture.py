"""Capture benchmarks: agent overhead, hot-path cost per event, sustained ingest.

    .venv/bin/python benchmarks/capture.py [--quick] [--no-postgres]

Prints figures and ratios measured in this one run, next to their targets; it asserts nothing
(machines are noisy) and is not part of the test suite. Every measurement runs in its own
subprocess (this script re-invoked with `--arm NAME`), because the instrumentors patch process
globals and `honed.instrument()` cannot be unregistered; a child prints one JSON line back.

Vocabulary: a *step* is one model call or one tool call (what honed stores as a `model` or a
`tool` Step). The benchmark agent makes 5 tool calls, one per model turn, then answers: 6 model
calls + 5 tool calls = 11 steps per invocation (10 steps of tool loop plus the final answer).
`instrument()` also stores the graph's 11 node runs as `node` steps; they are counted apart.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOOL_CALLS = 5
MODEL_CALLS = TOOL_CALLS + 1
STEPS_PER_RUN = MODEL_CALLS + TOOL_CALLS
RESULT_PREFIX = "BENCH-RESULT "
HOT_CHUNK = 10_000  # calls per timed chunk; the queue is cleared between chunks
PG_ADMIN_URL = os.environ.get("HONED_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

AGENT_ARMS = ("none", "honed-instrument", "honed-middleware", "openinference")
# Diagnostics (full runs only), not ways to deploy. honed-deferred: instrument() with a writer that sleeps
# through the timed loop (flush_interval=3600 s) and writes everything at the end: what the agent's thread
# pays for capture alone, without the writer competing for the GIL. noop-middleware: a middleware with the
# same hooks and state as honed.Middleware that does nothing: what LangChain's middleware machinery costs.
# noop-callback: a do-nothing callback handler installed like instrument() installs honed's: what
# LangChain's callback dispatch costs any callback-based capture. noop-wrap and noop-nodes split
# noop-middleware in two: its `wrap_model_call`/`wrap_tool_call` hooks alone (LangChain wraps each in
# `langsmith.traceable`, which sets up a run context on every call even with tracing off), and its
# `before_agent`/`after_agent` hooks and state alone (two graph nodes per run).
DIAGNOSTIC_ARMS = ("honed-deferred", "noop-callback", "noop-middleware", "noop-wrap", "noop-nodes")


def _other_writer() -> str:
    """Where the default does not put the store's inserts (`Recorder(writer=)`: the writer thread
    or a child process); ARM@WRITER runs ARM with it, side by side with the default."""
    from honed.capture.recorder import DEFAULT_WRITER

    return "process" if DEFAULT_WRITER == "thread" else "thread"


TARGET_OVERHEAD = 1.10
TARGET_EMIT_US = 20.0
TARGET_INGEST_STEPS_S = {"sqlite": 10_000.0, "postgresql": 5_000.0}


@dataclass(frozen=True)
class Sizes:
    """How much work each benchmark does (`--quick` shrinks everything)."""

    rounds: int  # agent arms run this many times, interleaved, to spread machine noise over arms
    warmup: int  # agent invocations per round before timing (captured too, not timed)
    invocations: int  # timed agent invocations per round
    emit_calls: int  # calls per hot-path timing
    emit_repeats: int  # hot-path timings; the median is reported
    ingest_steps: int  # steps fed to the recorder by the ingest benchmark


FULL = Sizes(rounds=5, warmup=20, invocations=60, emit_calls=200_000, emit_repeats=5, ingest_steps=20_000)
QUICK = Sizes(rounds=1, warmup=5, invocations=40, emit_calls=50_000, emit_repeats=3, ingest_steps=3_300)


# -- shared pieces --------------------------------------------------------------------------------


def _quantile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _fresh_env(workdir: Path) -> None:
    """Keep the child's spool and default store inside its temporary folder."""
    os.environ["HONED_SPOOL_DIR"] = str(workdir / "spool")
    os.environ["HONED_STORE"] = f"sqlite:///{workdir / 'default.db'}"


def _agent_task(seed: int) -> str:
    calls = [
        f"call {'add' if i % 2 == 0 else 'mul'} {json.dumps({'a': seed + i, 'b': i + 2})}"
        for i in range(TOOL_CALLS)
    ]
    return "; ".join([*calls, "answer the result is {result}"])


def _build_agent(middleware: list[Any]) -> Any:
    from langchain.agents import create_agent
    from langchain_core.tools import tool

    from honed.testing import ScriptedChatModel

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @tool
    def mul(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    return create_agent(ScriptedChatModel(), [add, mul], name="calc", middleware=middleware)


def _step_counts(url: str) -> dict[str, Any]:
    from sqlalchemy import text

    import honed

    store = honed.open_store(url)
    try:
        with store.engine.connect() as conn:
            trajectories = conn.execute(text("SELECT COUNT(*) FROM trajectories")).scalar_one()
            not_ok = conn.execute(text("SELECT COUNT(*) FROM trajectories WHERE status != 'ok'")).scalar_one()
            by_kind = dict(conn.execute(text("SELECT kind, COUNT(*) FROM steps GROUP BY kind")).all())
            per_run = conn.execute(
                text(
                    "SELECT COUNT(*) FROM (SELECT trajectory_id FROM steps WHERE kind IN ('model', 'tool')"
                    " GROUP BY trajectory_id HAVING COUNT(*) = :n) AS t"
                ),
                {"n": STEPS_PER_RUN},
            ).scalar_one()
    finally:
        store.close()
    return {
        "trajectories": int(trajectories),
        "not_ok": int(not_ok),
        "steps_by_kind": {str(k): int(v) for k, v in by_kind.items()},
        "runs_with_exact_steps": int(per_run),
    }


# -- child: one agent arm -------------------------------------------------------------------------


@dataclass
class _Arm:
    agent: Any
    drain: Callable[[], bool]  # pushes out everything captured so far; True when it finished
    extra: Callable[[], dict[str, Any]]  # what the arm checks after its run


def _agent_arm(arm: str, sizes: Sizes) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="honed-bench-") as tmp:
        workdir = Path(tmp)
        _fresh_env(workdir)
        setup = _setup_arm(arm, f"sqlite:///{workdir / 'capture.db'}")
        invoke = _invoker(setup.agent)
        for i in range(sizes.warmup):
            invoke(i)
        setup.drain()  # the warm-up's backlog must not weigh on the timed loop
        times: list[float] = []
        thread_cpu: list[float] = []
        cpu0, child0 = time.process_time(), _store_process_cpu()
        for i in range(sizes.invocations):
            t0, c0 = time.perf_counter(), time.thread_time()
            invoke(sizes.warmup + i)
            times.append(time.perf_counter() - t0)
            thread_cpu.append(time.thread_time() - c0)
        t0 = time.perf_counter()
        flushed = setup.drain()
        flush_s = time.perf_counter() - t0
        cpu_s = time.process_time() - cpu0 + _store_process_cpu() - child0  # every core's work
        return {
            "arm": arm,
            "times": times,
            "thread_cpu": thread_cpu,
            "flush_s": flush_s,
            "cpu_per_invocation_s": cpu_s / sizes.invocations,
            "expected_runs": sizes.warmup + sizes.invocations,
            "flushed": flushed,
            **setup.extra(),
        }


def _store_processes() -> list[int]:
    """The pids of this process's store processes (`writer="process"`)."""
    if "honed.capture.recorder" not in sys.modules:
        return []
    from honed.capture.recorder import live_recorders
    from honed.capture.store_process import ProcessStoreSink

    sinks = [r._store_sink for r in live_recorders()]
    return [s._child.pid for s in sinks if isinstance(s, ProcessStoreSink) and s._child is not None]


def _store_process_peak_rss_mib() -> float | None:
    """The store processes' peak RSS (VmHWM: from their exec, not the fork that started them)."""
    peaks = []
    for pid in _store_processes():
        with open(f"/proc/{pid}/status") as handle:
            peaks += [int(line.split()[1]) / 1024 for line in handle if line.startswith("VmHWM:")]
    return sum(peaks) if peaks else None


def _store_process_cpu() -> float:
    """CPU seconds of the store processes (`writer="process"`) so far."""
    total = 0.0
    for pid in _store_processes():
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def _setup_arm(arm: str, url: str) -> _Arm:
    import honed

    def stored() -> dict[str, Any]:
        return {"stored": _step_counts(url), "events_dropped": honed.stats().get("events_dropped", 0)}

    if arm == "none":
        return _Arm(_build_agent([]), lambda: True, dict)
    if arm == "honed-instrument":
        honed.instrument(store=url)
        return _Arm(_build_agent([]), honed.flush, stored)
    if arm == "honed-deferred":
        honed.instrument(store=url, flush_interval=3600.0)
        return _Arm(_build_agent([]), honed.flush, stored)
    if arm == "honed-middleware":
        return _Arm(_build_agent([honed.Middleware(store=url)]), honed.flush, stored)
    if arm == "openinference":
        return _openinference_arm()
    if arm in ("noop-middleware", "noop-wrap", "noop-nodes"):
        return _Arm(_build_agent([_noop_middleware(arm.removeprefix("noop-"))]), lambda: True, dict)
    if arm == "noop-callback":
        _install_noop_callback()
        return _Arm(_build_agent([]), lambda: True, dict)
    raise SystemExit(f"unknown arm {arm!r}")


def _noop_middleware(hooks: str = "middleware") -> Any:
    """A middleware that does nothing, with honed.Middleware's hooks: all of them ("middleware"),
    only the wrap hooks ("wrap"), or only the agent-boundary hooks and state ("nodes")."""
    from langchain.agents.middleware import AgentMiddleware

    from honed.capture.middleware import HonedState

    class Wrap(AgentMiddleware):
        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            return handler(request)

        def wrap_tool_call(self, request: Any, handler: Any) -> Any:
            return handler(request)

    class Nodes(AgentMiddleware):
        state_schema = HonedState

        def before_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
            return {"honed_trajectory": ""}

        def after_agent(self, state: Any, runtime: Any) -> dict[str, Any] | None:
            return None

    class NoopMiddleware(Nodes, Wrap):
        pass

    return {"middleware": NoopMiddleware, "wrap": Wrap, "nodes": Nodes}[hooks]()


def _install_noop_callback() -> None:
    from contextvars import ContextVar

    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.tracers.context import register_configure_hook

    class NoopHandler(BaseCallbackHandler):
        run_inline = True

    handler = NoopHandler()  # the default, as honed does it, so new threads see the handler too
    register_configure_hook(ContextVar("bench_noop", default=handler), inheritable=True)


def _openinference_arm() -> _Arm:
    from openinference.instrumentation.langchain import LangChainInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    LangChainInstrumentor().instrument(tracer_provider=provider)
    return _Arm(
        _build_agent([]),
        lambda: provider.force_flush(),
        lambda: {"spans": len(exporter.get_finished_spans())},
    )


def _invoker(agent: Any) -> Callable[[int], Any]:
    def invoke(i: int) -> Any:
        config = {"metadata": {"honed": {"task_id": f"t{i}", "split": "train"}}}
        return agent.invoke({"messages": [("user", _agent_task(i))]}, config=config)

    return invoke


# -- child: hot path ------------------------------------------------------------------------------


def _hotpath_arm(sizes: Sizes) -> dict[str, Any]:
    """Time `Recorder.emit` and `CallbackHandler` methods in tight loops on prebuilt arguments.

    No concurrent drain: the recorder's writer sleeps for `flush_interval` (an hour here) unless
    woken, and `emit` never wakes it (checked: after each chunk the queue holds exactly that
    chunk's events). Timings run in chunks of `HOT_CHUNK` calls and the queue is cleared between
    chunks, outside the clock, so it stays as small as a writer draining every 200 ms keeps it:
    a queue grown to millions of tracked objects would bill the garbage collector to emit. Each
    figure is the median over `emit_repeats` passes, with the garbage collector on (what the
    agent's thread pays) and off (honed's own code alone).
    """
    import honed
    from honed.capture.recorder import Recorder

    with tempfile.TemporaryDirectory(prefix="honed-bench-") as tmp:
        workdir = Path(tmp)
        _fresh_env(workdir)
        recorder = Recorder(f"sqlite:///{workdir / 'hot.db'}", max_queue=HOT_CHUNK * 2, flush_interval=3600.0)
        queue = recorder._queue  # read and cleared by the timing loop only
        handler = honed.CallbackHandler(recorder=recorder)
        events = _sample_events()
        chunk_events = (events * (HOT_CHUNK // len(events) + 1))[:HOT_CHUNK]
        recorder.emit(events[0])  # starts the (sleeping) writer thread outside the timings
        queue.clear()

        def emit_chunk() -> None:
            emit = recorder.emit
            for event in chunk_events:
                emit(event)

        loops = {"Recorder.emit": emit_chunk}
        loops |= {name: _repeat(call, HOT_CHUNK) for name, call in _handler_calls(handler).items()}
        figures: dict[str, dict[str, float]] = {}
        intact = True
        for name, loop in loops.items():
            figures[name] = {}
            for label, gc_on in (("gc_on", True), ("gc_off", False)):
                samples = []
                for _ in range(sizes.emit_repeats):
                    us, ok = _time_chunks(loop, sizes.emit_calls // HOT_CHUNK, queue, gc_on)
                    samples.append(us)
                    intact = intact and ok
                figures[name][label] = statistics.median(samples)
        recorder.close()
        calls = sizes.emit_calls // HOT_CHUNK * HOT_CHUNK
        return {"us_per_call": figures, "no_concurrent_drain": intact, "calls": calls}


def _time_chunks(loop: Callable[[], None], chunks: int, queue: Any, gc_on: bool) -> tuple[float, bool]:
    """Microseconds per call over `chunks` runs of `loop`; whether each left exactly its events queued."""
    total, intact = 0.0, True
    if not gc_on:
        gc.disable()
    try:
        for _ in range(chunks):
            t0 = time.perf_counter()
            loop()
            total += time.perf_counter() - t0
            intact = intact and len(queue) == HOT_CHUNK
            queue.clear()
    finally:
        gc.enable()
    return total / (chunks * HOT_CHUNK) * 1e6, intact


def _repeat(call: Callable[[], None], n: int) -> Callable[[], None]:
    def loop() -> None:
        for _ in range(n):
            call()

    return loop


def _sample_events() -> list[tuple[Any, ...]]:
    """Event tuples as the callback handler builds them for one agent turn."""
    from honed.capture.events import CHAIN, END, MODEL, START, TOOL

    root, model, tool = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    payloads = _payloads(0)
    now = time.time()
    return [
        (
            START,
            root,
            None,
            now,
            (CHAIN, "calc", {"messages": payloads.history[:2]}, {"honed": {}}, [], None),
        ),
        (START, model, root, now, (MODEL, "ChatOpenAI", payloads.history[:2], {}, [], payloads.extra)),
        (END, model, None, now, payloads.llm_results[0]),
        (START, tool, root, now, (TOOL, "search", payloads.tool_args[0], {}, [], {"tool_call_id": "c0"})),
        (END, tool, None, now, payloads.tool_messages[0]),
        (END, root, None, now, {"messages": payloads.history}),
    ]


def _handler_calls(handler: Any) -> dict[str, Callable[[], None]]:
    payloads = _payloads(0)
    root, child = uuid.uuid4(), uuid.uuid4()
    tool_input, serialized_tool = json.dumps(payloads.tool_args[0]), {"name": "search"}
    model_messages = [payloads.history[:2]]
    inputs = {"messages": payloads.history[:2]}
    meta = {"langgraph_node": "model", "langgraph_step": 1, "honed": {"task_id": "t1"}}
    params = {"invocation_params": payloads.extra["settings"], "name": "ChatOpenAI"}
    return {
        "on_chain_start (root)": lambda: handler.on_chain_start(
            None, inputs, run_id=root, parent_run_id=None, tags=[], metadata=meta, name="calc"
        ),
        "on_chain_start (node)": lambda: handler.on_chain_start(
            None, inputs, run_id=child, parent_run_id=root, tags=["graph:step:1"], metadata=meta, name="model"
        ),
        "on_chain_end": lambda: handler.on_chain_end(inputs, run_id=child, parent_run_id=root),
        "on_chat_model_start": lambda: handler.on_chat_model_start(
            None, model_messages, run_id=child, parent_run_id=root, tags=[], metadata=meta, **params
        ),
        "on_llm_end": lambda: handler.on_llm_end(payloads.llm_results[0], run_id=child, parent_run_id=root),
        "on_tool_start": lambda: handler.on_tool_start(
            serialized_tool,
            tool_input,
            run_id=child,
            parent_run_id=root,
            tags=[],
            metadata=meta,
            inputs=payloads.tool_args[0],
            tool_call_id="call_0",
        ),
    }


# -- synthetic trajectories -----------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You are a research assistant for an online bookshop. Answer the customer's question using the "
    "search and lookup tools; cite the catalogue ids you used, never invent prices, and say so when "
    "the catalogue has no answer. Keep answers under 120 words and in the customer's language."
)
TOOL_SCHEMAS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} the catalogue by a free-text query; returns up to five matches.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                "required": ["query"],
            },
        },
    }
    for name in ("search", "lookup")
]


@dataclass
class _Payloads:
    """One trajectory's objects, as a LangChain chat model and tools would hand them over."""

    history: list[Any]  # system, user, then (AIMessage, ToolMessage) pairs, then the answer
    llm_results: list[Any]  # one LLMResult per model call
    tool_args: list[dict[str, Any]]
    tool_messages: list[Any]
    extra: dict[str, Any]


def _payloads(seed: int) -> _Payloads:
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
    from langchain_core.outputs import ChatGeneration, LLMResult

    history: list[Any] = [
        SystemMessage(SYSTEM_PROMPT),
        HumanMessage(
            f"Order #{seed}: I am looking for a second-hand copy of a 1970s science-fiction novel about a "
            "desert planet, ideally a hardback first edition under 200 euros, shipped to Lyon before Friday."
        ),
    ]
    llm_results, tool_args, tool_messages = [], [], []
    for turn in range(MODEL_CALLS):
        usage = {"input_tokens": 180 + 60 * turn, "output_tokens": 40, "total_tokens": 220 + 60 * turn}
        if turn < TOOL_CALLS:
            args = {
                "query": f"desert planet novel hardback first edition, attempt {turn} for #{seed}",
                "limit": 5,
            }
            call_id = f"call_{seed}_{turn}"
            ai = AIMessage(
                content=f"Searching the catalogue (attempt {turn + 1}) for matching editions.",
                tool_calls=[{"name": "search" if turn % 2 == 0 else "lookup", "args": args, "id": call_id}],
                usage_metadata=usage,
                response_metadata={"model_name": "gpt-4o-mini-2024-07-18", "finish_reason": "tool_calls"},
            )
            result = ToolMessage(
                content=json.dumps(
                    [
                        {
                            "id": f"BK-{seed}-{turn}-{k}",
                            "title": "Dune",
                            "year": 1965 + k,
                            "price_eur": 150 + k,
                        }
                        for k in range(3)
                    ]
                ),
                tool_call_id=call_id,
                name=ai.tool_calls[0]["name"],
            )
            history += [ai, result]
            tool_args.append(args)
            tool_messages.append(result)
        else:
            ai = AIMessage(
                content="I found three hardback copies of Dune (BK-1, BK-2, BK-3) under 200 euros; "
                "BK-2 is a 1966 first edition at 151 euros and ships to Lyon in two days.",
                usage_metadata=usage,
                response_metadata={"model_name": "gpt-4o-mini-2024-07-18", "finish_reason": "stop"},
            )
            history.append(ai)
        llm_results.append(LLMResult(generations=[[ChatGeneration(message=ai)]]))
    settings = {"model": "gpt-4o-mini", "temperature": 0.0, "tools": TOOL_SCHEMAS, "stream": False}
    extra = {"tools": TOOL_SCHEMAS, "settings": settings, "model": "gpt-4o-mini"}
    return _Payloads(history, llm_results, tool_args, tool_messages, extra)


def _feed_trajectory(handler: Any, payloads: _Payloads, seed: int) -> None:
    """Drive a real CallbackHandler through one agent run: root chain, model and tool calls."""
    root = uuid.uuid4()
    params = {"invocation_params": payloads.extra["settings"], "name": "ChatOpenAI"}
    handler.on_chain_start(
        None,
        {"messages": payloads.history[1:2]},
        run_id=root,
        metadata={"honed": {"task_id": f"task-{seed}", "split": "train"}},
        tags=[],
        name="bookshop",
    )
    seen = 2  # messages the next model call sees
    for turn in range(MODEL_CALLS):
        model_run = uuid.uuid4()
        handler.on_chat_model_start(
            None, [payloads.history[:seen]], run_id=model_run, parent_run_id=root, metadata={}, **params
        )
        handler.on_llm_end(payloads.llm_results[turn], run_id=model_run, parent_run_id=root)
        if turn == TOOL_CALLS:
            break
        tool_run = uuid.uuid4()
        args = payloads.tool_args[turn]
        handler.on_tool_start(
            {"name": payloads.tool_messages[turn].name},
            json.dumps(args),
            run_id=tool_run,
            parent_run_id=root,
            inputs=args,
            tool_call_id=payloads.tool_messages[turn].tool_call_id,
        )
        handler.on_tool_end(payloads.tool_messages[turn], run_id=tool_run, parent_run_id=root)
        seen += 2
    handler.on_chain_end({"messages": payloads.history}, run_id=root)


# -- child: sustained ingest ----------------------------------------------------------------------


def _ingest_arm(backend: str, sizes: Sizes) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="honed-bench-") as tmp:
        workdir = Path(tmp)
        _fresh_env(workdir)
        if backend == "sqlite":
            return _ingest(f"sqlite:///{workdir / 'ingest.db'}", sizes)
        return _with_pg_schema(lambda url: _ingest(url, sizes))


def _with_pg_schema(run: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    from sqlalchemy import create_engine, text

    schema = f"honed_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 5})
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:
        admin.dispose()
        return {"skipped": f"PostgreSQL unreachable at {PG_ADMIN_URL}: {type(exc).__name__}"}
    try:
        return run(f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}")
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _ingest(url: str, sizes: Sizes) -> dict[str, Any]:
    """One producer thread emits `ingest_steps` steps as fast as it can, then flushes; the figure
    is what the store holds afterwards over the time from first emit to flush complete."""
    import honed
    from honed.capture.recorder import Recorder

    store = honed.open_store(url)  # migrations run here, outside the timing
    recorder = Recorder(store)
    handler = honed.CallbackHandler(recorder=recorder)
    n_trajectories = -(-sizes.ingest_steps // STEPS_PER_RUN)
    rss0 = _maxrss_mib()
    t0 = time.perf_counter()
    for seed in range(n_trajectories):
        _feed_trajectory(handler, _payloads(seed), seed)
    produced_s = time.perf_counter() - t0
    flushed = recorder.flush(timeout=600)
    elapsed = time.perf_counter() - t0
    rss_delta = _maxrss_mib() - rss0
    stats = recorder.stats()
    child_rss = _store_process_peak_rss_mib()
    recorder.close()
    store.close()
    counts = _step_counts(url)
    stored_steps = sum(counts["steps_by_kind"].values())
    payload = _stored_payload_bytes(url)
    return {
        "backend": store.dialect,
        "trajectories_fed": n_trajectories,
        "steps_fed": n_trajectories * STEPS_PER_RUN,
        "stored": counts,
        "stored_steps": stored_steps,
        "produce_s": produced_s,
        "elapsed_s": elapsed,
        "steps_per_s": stored_steps / elapsed,
        "flushed": flushed,
        "events_dropped": stats["events_dropped"],
        "peak_rss_delta_mib": rss_delta,
        "store_process_peak_rss_mib": child_rss,  # its whole peak, from its start (~50 MiB) on
        "spooled": stats["trajectories_spooled"],
        "payload_bytes_per_step": payload,
    }


def _stored_payload_bytes(url: str) -> dict[str, float]:
    """Mean stored JSON size of a step's input and output, by kind (what each step costs to write)."""
    from sqlalchemy import text

    import honed

    store = honed.open_store(url)
    query = text(
        "SELECT kind, AVG(COALESCE(LENGTH(CAST(input AS TEXT)), 0)), AVG(COALESCE(LENGTH(CAST(output AS TEXT)), 0))"
        " FROM steps GROUP BY kind"
    )
    try:
        with store.engine.connect() as conn:
            rows = conn.execute(query).all()
    finally:
        store.close()
    return {
        f"{kind}_{part}": round(float(v), 1)
        for kind, i, o in rows
        for part, v in (("input", i), ("output", o))
    }


# -- parent: orchestration ------------------------------------------------------------------------


def _run_child(arm: str, quick: bool, timeout: float = 900) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; also measure how busy the rest of the machine was."""
    command = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, *(["--quick"] if quick else [])]
    machine0, children0, t0 = _machine_cpu(), _children_cpu(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.perf_counter() - t0
    machine1, children1 = _machine_cpu(), _children_cpu()
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            busy, steal = (b - a for a, b in zip(machine0, machine1, strict=True))
            result["other_cores"] = max(0.0, busy - (children1 - children0)) / wall
            result["steal_cores"] = steal / wall
            return result
    tail = (done.stderr or done.stdout)[-2000:]
    raise RuntimeError(f"arm {arm!r} exited {done.returncode} without a result:\n{tail}")


def _machine_cpu() -> tuple[float, float]:
    """CPU seconds the whole machine has been busy (all processes) and stolen by the hypervisor."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0.0] * 8)[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def _agent_overhead(quick: bool, sizes: Sizes) -> dict[str, dict[str, Any]]:
    other = _other_writer()
    arms = (*AGENT_ARMS, f"honed-instrument@{other}", f"honed-middleware@{other}")
    arms = arms if quick else arms + DIAGNOSTIC_ARMS
    rounds: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for r in range(sizes.rounds):
        for arm in arms if r % 2 == 0 else tuple(reversed(arms)):
            _progress(f"agent arm {arm}, round {r + 1}/{sizes.rounds}")
            rounds[arm].append(_run_child(arm, quick))
    baseline = [t for x in rounds["none"] for t in x["times"]]
    round_baselines = [statistics.median(x["times"]) for x in rounds["none"]]
    summary: dict[str, dict[str, Any]] = {}
    for arm, results in rounds.items():
        times = [t for x in results for t in x["times"]]
        median, p90 = statistics.median(times), _quantile(times, 0.9)
        per_round = [statistics.median(x["times"]) / b for x, b in zip(results, round_baselines, strict=True)]
        row: dict[str, Any] = {
            "median_ms": median * 1e3,
            "p90_ms": p90 * 1e3,
            "ratio_median": median / statistics.median(baseline),
            "ratio_p90": p90 / _quantile(baseline, 0.9),
            "ratio_rounds": statistics.median(per_round),
            "ratio_rounds_max": max(per_round),
            "cpu_ms_per_invocation": statistics.median(x["cpu_per_invocation_s"] for x in results) * 1e3,
            "agent_thread_cpu_ms": statistics.median(c for x in results for c in x["thread_cpu"]) * 1e3,
            "other_cores": statistics.mean(x["other_cores"] for x in results),
            "other_cores_max": max(x["other_cores"] for x in results),
            "steal_cores": statistics.mean(x["steal_cores"] for x in results),
            "flush_ms_max": max(x["flush_s"] for x in results) * 1e3,
            "invocations": len(times),
        }
        if arm.startswith("honed"):
            row |= _verify_honed(results)
        if arm == "openinference":
            row["spans"] = sum(x["spans"] for x in results)
        summary[arm] = row
    return summary


def _verify_honed(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    expected = sum(x["expected_runs"] for x in rounds)
    stored = sum(x["stored"]["trajectories"] for x in rounds)
    exact = sum(x["stored"]["runs_with_exact_steps"] for x in rounds)
    kinds: dict[str, int] = {}
    for x in rounds:
        for kind, n in x["stored"]["steps_by_kind"].items():
            kinds[kind] = kinds.get(kind, 0) + n
    ok = (
        stored == expected
        and exact == expected
        and kinds.get("model") == MODEL_CALLS * expected
        and kinds.get("tool") == TOOL_CALLS * expected
        and all(x["stored"]["not_ok"] == 0 and x["flushed"] for x in rounds)
        and sum(x["events_dropped"] for x in rounds) == 0
    )
    return {
        "expected_trajectories": expected,
        "stored_trajectories": stored,
        "steps_by_kind": kinds,
        "verified": ok,
    }


def _verdict(ok: bool) -> str:
    return "[green]met[/]" if ok else "[bold red]MISSED[/]"


def _report(results: dict[str, Any], sizes: Sizes) -> None:
    from rich.console import Console

    console = Console(width=180)
    _report_agent(console, results["agent"])
    _report_hotpath(console, results["hotpath"], sizes)
    _report_ingest(console, results["ingest"])


def _report_agent(console: Any, agent: dict[str, dict[str, Any]]) -> None:
    from rich.table import Table

    title = f"Agent overhead: {STEPS_PER_RUN}-step agent ({MODEL_CALLS} model + {TOOL_CALLS} tool calls), per invocation"
    table = Table(title=title)
    columns = (
        "arm",
        "median ms",
        "p90 ms",
        "x median",
        "x rounds",
        "x p90",
        "agent cpu ms",
        "all cpu ms",
        "x all cpu",
        "flush ms",
        "other load",
        "stored",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("arm", "stored") else "right")
    base_cpu = agent["none"]["cpu_ms_per_invocation"]
    for arm, row in agent.items():
        stored = ""
        if "verified" in row:
            kinds = " + ".join(f"{v} {k}" for k, v in sorted(row["steps_by_kind"].items()))
            mark = "ok" if row["verified"] else "[bold red]MISMATCH[/]"
            stored = f"{row['stored_trajectories']}/{row['expected_trajectories']} runs, {kinds}: {mark}"
        elif "spans" in row:
            stored = f"{row['spans']} spans exported (in memory)"
        table.add_row(
            arm,
            f"{row['median_ms']:.2f}",
            f"{row['p90_ms']:.2f}",
            f"{row['ratio_median']:.3f}",
            f"{row['ratio_rounds']:.3f}",
            f"{row['ratio_p90']:.3f}",
            f"{row['agent_thread_cpu_ms']:.2f}",
            f"{row['cpu_ms_per_invocation']:.2f}",
            f"{row['cpu_ms_per_invocation'] / base_cpu:.3f}",
            f"{row['flush_ms_max']:.1f}" if arm != "none" else "",
            f"{row['other_cores']:.2f}",
            stored,
        )
    console.print(table)
    console.print(
        "  agent cpu ms: median CPU time of the agent's thread per invocation (honed's callbacks included, "
        "its writer not); all cpu ms: process CPU of all threads (agent, honed writer, OTel exporter) per "
        "timed invocation, final flush included; flush ms: the slowest end-of-round flush; other load: CPU "
        "cores that other processes on the machine kept busy meanwhile (mean over rounds)"
    )
    console.print(
        "  x median, x p90: pooled over rounds, over no capture; x rounds: median over rounds of "
        "(arm median / no-capture median of the same round), which discounts drift between rounds"
    )
    other = max(row["other_cores_max"] for row in agent.values())
    steal = max(row["steal_cores"] for row in agent.values())
    if other > 0.2 or steal > 0.1:
        console.print(
            f"  [bold yellow]the machine was busy[/]: other processes used up to {other:.2f} cores "
            f"(steal up to {steal:.2f}) during an arm: wall-time ratios are unreliable, CPU ratios less so"
        )
    oi = agent["openinference"]["median_ms"]
    other_writer = _other_writer()
    for arm in (
        "honed-instrument",
        "honed-middleware",
        *(f"{a}@{other_writer}" for a in ("honed-instrument", "honed-middleware")),
    ):
        ratio, median = agent[arm]["ratio_median"], agent[arm]["median_ms"]
        console.print(
            f"  {arm}: {ratio:.3f}x no capture, median ({agent[arm]['ratio_rounds']:.3f}x by rounds, "
            f"{agent[arm]['ratio_rounds_max']:.3f}x in the worst round; "
            f"target <= {TARGET_OVERHEAD:.2f}x: {_verdict(ratio <= TARGET_OVERHEAD)}); "
            f"{median / oi:.2f}x OpenInference (target < 1: {_verdict(median < oi)})"
        )


def _report_hotpath(console: Any, hot: dict[str, Any], sizes: Sizes) -> None:
    from rich.table import Table

    table = Table(
        title=f"Hot path on the agent's thread (median of {sizes.emit_repeats} x {hot['calls']:,} calls)"
    )
    table.add_column("call")
    table.add_column("us/call, GC on", justify="right")
    table.add_column("us/call, GC off", justify="right")
    table.add_column(f"target <= {TARGET_EMIT_US:.0f} us")
    for name, us in hot["us_per_call"].items():
        table.add_row(
            name, f"{us['gc_on']:.3f}", f"{us['gc_off']:.3f}", _verdict(us["gc_on"] <= TARGET_EMIT_US)
        )
    console.print(table)
    drained = "none (each chunk left all its events queued)" if hot["no_concurrent_drain"] else "[red]YES[/]"
    console.print(f"  concurrent drain during the timings: {drained}")
    console.print(
        f"  wall-clock timings; other processes kept {hot.get('other_cores', 0.0):.2f} cores busy meanwhile "
        f"(figures inflate when that nears {os.cpu_count()})"
    )


def _report_ingest(console: Any, ingest: dict[str, dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="Sustained ingest: one producer thread -> CallbackHandler -> Recorder -> store")
    columns = (
        "store",
        "steps fed",
        "steps stored",
        "elapsed s",
        "steps/s",
        "produce s",
        "peak RSS +MiB",
        "JSON B/step in+out: model; tool",
        "other load",
        "target",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("store", "target") else "right")
    for backend, row in ingest.items():
        if "skipped" in row:
            table.add_row(backend, "", "", "", "", "", "", "", "", row["skipped"])
            continue
        goal = TARGET_INGEST_STEPS_S[backend.split("@")[0]]
        target = f">= {goal:,.0f}/s: {_verdict(row['steps_per_s'] >= goal)}"
        if row["events_dropped"] or not row["flushed"]:
            target += f" [red]dropped {row['events_dropped']}, flushed {row['flushed']}[/]"
        table.add_row(
            backend,
            f"{row['steps_fed']:,}",
            f"{row['stored_steps']:,}",
            f"{row['elapsed_s']:.2f}",
            f"{row['steps_per_s']:,.0f}",
            f"{row['produce_s']:.2f}",
            f"{row['peak_rss_delta_mib']:.0f}"
            + (
                f" (+ store process {row['store_process_peak_rss_mib']:.0f})"
                if row["store_process_peak_rss_mib"]
                else ""
            ),
            _payload_text(row["payload_bytes_per_step"]),
            f"{row['other_cores']:.2f}",
            target,
        )
    console.print(table)
    console.print(
        "  elapsed = first emit to flush complete; steps/s = COUNT(*) of the steps table / elapsed; "
        "peak RSS = growth of ru_maxrss (process peak) over the run"
    )


def _payload_text(payload: dict[str, float]) -> str:
    parts = [
        f"{payload.get(kind + '_input', 0):,.0f}+{payload.get(kind + '_output', 0):,.0f}"
        for kind in ("model", "tool")
    ]
    return "; ".join(parts)


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    agent, hot = results["agent"], results["hotpath"]["us_per_call"]
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count()}
    base_cpu = agent["none"]["cpu_ms_per_invocation"]
    out["other_cores_max"] = round(max(row["other_cores_max"] for row in agent.values()), 2)
    for arm, row in agent.items():
        out[f"agent_{arm}_median_ms"] = round(row["median_ms"], 3)
        out[f"agent_{arm}_p90_ms"] = round(row["p90_ms"], 3)
        out[f"agent_{arm}_ratio"] = round(row["ratio_median"], 4)
        out[f"agent_{arm}_ratio_rounds"] = round(row["ratio_rounds"], 4)
        out[f"agent_{arm}_ratio_worst_round"] = round(row["ratio_rounds_max"], 4)
        out[f"agent_{arm}_cpu_ratio"] = round(row["cpu_ms_per_invocation"] / base_cpu, 4)
        if "verified" in row:
            out[f"agent_{arm}_verified"] = row["verified"]
            out[f"agent_{arm}_flush_ms"] = round(row["flush_ms_max"], 1)
    out["hotpath_other_cores"] = round(results["hotpath"].get("other_cores", 0.0), 2)
    out["emit_us"] = round(hot["Recorder.emit"]["gc_on"], 4)
    out["handler_us_max"] = round(max(v["gc_on"] for k, v in hot.items() if k != "Recorder.emit"), 4)
    for backend, row in results["ingest"].items():
        if "steps_per_s" in row:
            out[f"ingest_{backend}_steps_per_s"] = round(row["steps_per_s"])
            out[f"ingest_{backend}_peak_rss_mib"] = round(row["peak_rss_delta_mib"], 1)
            if row["store_process_peak_rss_mib"]:
                out[f"ingest_{backend}_store_process_peak_rss_mib"] = round(
                    row["store_process_peak_rss_mib"], 1
                )
            out[f"ingest_{backend}_other_cores"] = round(row["other_cores"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (under a minute)")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL ingest run")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one measurement, print JSON
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL

    if args.arm:
        if "@" in args.arm:  # ARM@WRITER
            args.arm, os.environ["HONED_WRITER"] = args.arm.split("@")
        if args.arm == "hotpath":
            result = _hotpath_arm(sizes)
        elif args.arm.startswith("ingest-"):
            result = _ingest_arm(args.arm.removeprefix("ingest-"), sizes)
        else:
            result = _agent_arm(args.arm, sizes)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    started = time.perf_counter()
    results: dict[str, Any] = {"agent": _agent_overhead(args.quick, sizes)}
    _progress("hot path")
    results["hotpath"] = _run_child("hotpath", args.quick)
    results["ingest"] = {}
    for backend in ("sqlite", *(() if args.no_postgres else ("postgresql",))):
        for name in (backend, f"{backend}@{_other_writer()}"):
            _progress(f"ingest {name}")
            results["ingest"][name] = _run_child(f"ingest-{name}", args.quick)
    _report(results, sizes)
    print(f"total {time.perf_counter() - started:.0f} s on {os.cpu_count()} cores")
    print(json.dumps(_summary(results), separators=(",", ":")))


if __name__ == "__main__":
    main()
