"""Serving benchmarks: LocalChatModel throughput under concurrency, promote-to-first-call, ServedModel overhead.

    .venv/bin/python benchmarks/serving.py [--quick] [--no-postgres]

Prints figures measured in this one run next to their targets; asserts nothing (machines are
noisy) and is not part of the test suite. Everything runs on the tiny model (`build_tiny`, ~1.8M
parameters, random weights) in a temporary folder.

- throughput: N concurrent `create_agent` agents (threads; no tools, so one model call per
  invocation) on one `LocalChatModel`, sampling at T=1 with a 64-token budget; completion tokens
  per second over the run, and the mean rows decoded together per step. Target: 64 agents >= 10x
  one agent. Then the same through the batching engine alone (token ids in, no LangChain): the
  gap between the two is the agents' own Python competing with generation for the GIL and cores.
- promote -> first call: a caller invokes a `ServedModel` back to back; the time from `promote()`
  returning to the first reply from the new version (noticing it, loading its weights, swapping).
  SQLite is polled (`poll_interval` 0.1 s); PostgreSQL is notified (poll 30 s, so NOTIFY is all).
- ServedModel overhead: the same weights called directly (`LocalChatModel`) and through a
  `ServedModel`, interleaved, greedy, 32 tokens; the median latency difference. Target <= 2%.
  Also the wrapper's own cost per call over an instant backend, which no generation noise hides.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

PG_ADMIN_URL = os.environ.get("HONED_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TARGET_SPEEDUP = 10.0
TARGET_OVERHEAD = 0.02


def throughput(path: Path, agents: int, seconds: float) -> dict[str, float]:
    from langchain.agents import create_agent

    from honed.serving import LocalChatModel

    model = LocalChatModel(path, temperature=1.0, max_tokens=64)
    agent = create_agent(model, tools=[])
    agent.invoke({"messages": [("user", "warm up")]})
    generator = model.engine.generator
    generator.stats.update(steps=0, rows=0, tokens=0)
    tokens, calls, lock, stop = [0], [0], threading.Lock(), time.monotonic() + seconds

    def work(i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            out = agent.invoke({"messages": [("user", f"agent {i} asks question {n}: what is 12 plus 30?")]})
            with lock:
                tokens[0] += len(out["messages"][-1].response_metadata["token_ids"])
                calls[0] += 1
            n += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(agents)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    result = {
        "tokens_per_s": tokens[0] / elapsed,
        "calls_per_s": calls[0] / elapsed,
        "rows_per_step": generator.rows_per_step,
    }
    model.close()
    return result


def engine_throughput(path: Path, callers: int, seconds: float) -> float:
    """Tokens/s of the batching engine alone: callers submit token ids, no LangChain, no agent."""
    from honed.serving import LocalChatModel
    from honed.serving.batching import GenerationRequest

    model = LocalChatModel(path)
    engine = model.engine
    prompt = engine.encode(engine.render([{"role": "user", "content": "what is 12 plus 30?"}], None))
    tokens, lock, stop = [0], threading.Lock(), time.monotonic() + seconds

    def work() -> None:
        while time.monotonic() < stop:
            result = engine.submit(
                GenerationRequest(prompt_ids=prompt, max_new_tokens=64, temperature=1.0)
            ).result()
            with lock:
                tokens[0] += len(result.token_ids)

    threads = [threading.Thread(target=work) for _ in range(callers)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    model.close()
    return tokens[0] / (time.monotonic() - started)


def promote_latency(url: str, paths: list[Path], repeats: int, poll: float) -> list[float]:
    import honed
    from honed.serving.served import ServedModel

    store = honed.open_store(url)
    for path in paths:
        store.register_model("bench", path)
    store.promote("bench", 1)
    served = ServedModel(store, name="bench", poll_interval=poll, temperature=0, max_tokens=1)
    time.sleep(0.5)
    seen: list[tuple[float, str]] = []
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            ref = served.invoke("ping").response_metadata["model_version"]
            seen.append((time.perf_counter(), ref))

    thread = threading.Thread(target=caller)
    thread.start()
    delays = []
    for i in range(repeats):
        time.sleep(0.5)
        target = 2 if i % 2 == 0 else 1
        promoted = store.promote("bench", target)
        at = time.perf_counter()
        deadline = at + 30
        while not any(t >= at and ref == promoted.ref for t, ref in seen[-50:]):
            if time.perf_counter() > deadline:
                break
            time.sleep(0.001)
        first = next((t for t, ref in reversed(seen) if ref == promoted.ref and t >= at), None)
        if first is not None:
            delays.append(first - at)
    stop.set()
    thread.join()
    served.close()
    store.close()
    return delays


def served_overhead(url: str, path: Path, rounds: int) -> dict[str, float]:
    import honed
    from honed.serving import LocalChatModel
    from honed.serving.served import ServedModel

    store = honed.open_store(url)
    store.register_model("overhead", path)
    store.promote("overhead", 1)
    direct = LocalChatModel(path, temperature=0, max_tokens=32)
    served = ServedModel(store, name="overhead", poll_interval=60, temperature=0, max_tokens=32)
    for model in (direct, served):
        model.invoke("warm up")
    times: dict[str, list[float]] = {"direct": [], "served": []}
    for i in range(rounds):
        order = (
            (("direct", direct), ("served", served))
            if i % 2 == 0
            else (("served", served), ("direct", direct))
        )
        for label, model in order:
            started = time.perf_counter()
            model.invoke(f"the same question {i}")
            times[label].append(time.perf_counter() - started)
    direct_ms = statistics.median(times["direct"]) * 1000
    served_ms = statistics.median(times["served"]) * 1000
    # Each round calls both on the same prompt (same greedy tokens): compare within rounds.
    paired = statistics.median(s / d - 1 for s, d in zip(times["served"], times["direct"], strict=True))
    direct.close()
    served.close()
    store.close()
    return {"direct_ms": direct_ms, "served_ms": served_ms, "overhead": paired}


def wrapper_cost(url: str, path: Path, calls: int) -> float:
    """Microseconds a ServedModel adds per call over its backend, with an instant backend."""
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    import honed
    from honed.serving.served import ServedModel

    store = honed.open_store(url)
    store.register_model("wrapper", path)
    store.promote("wrapper", 1)
    backend = FakeListChatModel(responses=["ok"])
    served = ServedModel(store, name="wrapper", backend=lambda _version: backend, poll_interval=60)
    timings = {}
    for label, model in (("direct", backend), ("served", served), ("direct2", backend), ("served2", served)):
        started = time.perf_counter()
        for _ in range(calls):
            model.invoke("x")
        timings[label] = (time.perf_counter() - started) / calls
    served.close()
    store.close()
    return (min(timings["served"], timings["served2"]) - min(timings["direct"], timings["direct2"])) * 1e6


def _pg_url(schema: str) -> str | None:
    try:
        from sqlalchemy import create_engine, text

        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        engine.dispose()
        return f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    except Exception:
        return None


def _drop_pg(schema: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_ADMIN_URL)
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (about a minute)")
    parser.add_argument("--no-postgres", action="store_true", help="skip the NOTIFY measurement")
    args = parser.parse_args()
    seconds, passes, repeats, rounds = (3.0, 1, 4, 20) if args.quick else (5.0, 3, 8, 60)

    from honed.demo import build_tiny

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="honed-bench-") as tmp:
        root = Path(tmp)
        os.environ.setdefault("HONED_SPOOL_DIR", str(root / "spool"))
        paths = [build_tiny(root / f"tiny-{seed}", seed=seed) for seed in (1, 2)]

        print(
            f"LocalChatModel throughput on the tiny model (T=1, 64-token budget; {passes} interleaved "
            f"passes of {seconds:.0f} s each, medians; load average {os.getloadavg()[0]:.1f} at start)"
        )
        runs: dict[int, list[dict[str, float]]] = {1: [], 8: [], 64: []}
        for _ in range(passes):  # interleaved, so a busy spell on the machine hits every row alike
            for agents in runs:
                runs[agents].append(throughput(paths[0], agents, seconds))
        median = {a: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for a, rs in runs.items()}
        for agents, r in median.items():
            print(
                f"  {agents:>3} agents: {r['tokens_per_s']:7.0f} tokens/s  {r['calls_per_s']:6.1f} calls/s  "
                f"{r['rows_per_step']:5.1f} rows per decoding step"
            )
        speedup = median[64]["tokens_per_s"] / median[1]["tokens_per_s"]
        print(f"  64 agents / 1 agent: {speedup:.1f}x   (target >= {TARGET_SPEEDUP:.0f}x)")
        alone = {
            n: statistics.median(engine_throughput(paths[0], n, seconds) for _ in range(passes))
            for n in (1, 64)
        }
        print(
            f"  the batching engine alone (no LangChain): {alone[1]:.0f} tokens/s for 1 caller, "
            f"{alone[64]:.0f} for 64: {alone[64] / alone[1]:.1f}x"
        )

        print("promote -> first call served by the new version")
        sqlite_delays = promote_latency(f"sqlite:///{root / 'promote.db'}", paths, repeats, poll=0.1)
        print(
            f"  SQLite, polled every 0.1 s: median {statistics.median(sqlite_delays) * 1000:.0f} ms, max {max(sqlite_delays) * 1000:.0f} ms over {len(sqlite_delays)} promotions"
        )
        if not args.no_postgres and (pg := _pg_url("honed_bench_serving")):
            try:
                pg_delays = promote_latency(pg, paths, repeats, poll=30.0)
                print(
                    f"  PostgreSQL, LISTEN/NOTIFY: median {statistics.median(pg_delays) * 1000:.0f} ms, max {max(pg_delays) * 1000:.0f} ms over {len(pg_delays)} promotions"
                )
            finally:
                _drop_pg("honed_bench_serving")

        print("ServedModel overhead over calling the model directly")
        over = served_overhead(f"sqlite:///{root / 'overhead.db'}", paths[0], rounds)
        print(
            f"  median latency, greedy 32 tokens: direct {over['direct_ms']:.1f} ms, served {over['served_ms']:.1f} ms; "
            f"median paired difference {over['overhead'] * 100:+.1f}%   (target <= {TARGET_OVERHEAD * 100:.0f}%)"
        )
        cost = wrapper_cost(f"sqlite:///{root / 'wrapper.db'}", paths[0], 2000 if not args.quick else 500)
        print(f"  the wrapper itself: {cost:+.0f} us per call over an instant backend")
    print(
        f"total {time.perf_counter() - started:.0f} s on {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end"
    )


if __name__ == "__main__":
    main()
