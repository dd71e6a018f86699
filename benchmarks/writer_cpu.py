"""The capture writer's CPU per stored step, split into assembly and the store write.

    .venv/bin/python benchmarks/writer_cpu.py [--trajectories 400] [--repeats 3] [--postgres]

The ingest benchmark (`capture.py`) times a producer and the writer together, on a shared machine;
this one isolates the writer. It feeds the synthetic runs of `capture.py` (11 steps each) through a
real `CallbackHandler` into a `Recorder` whose writer sleeps, then drains the queue on this thread
and reads the thread's CPU time (`time.thread_time`), so other processes' load barely moves the
figure. `assemble` is everything but the sinks' write (assembly, serialisation, redaction, the
drain loop, garbage collection); `write` is the store's `save_records`, including the database's
own work on this thread. The best of `--repeats` fresh recorders is reported, with every repeat.

`--writer process` measures the writer whose inserts run in a child process
(`honed.capture.store_process`): `agent process` is this process's CPU (every thread: the drain,
the hand-off, the acknowledgements) until the child has acknowledged every batch, which is what
the agent's process pays; `child` is the child's CPU (its start-up included), paid on another core.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import capture  # the ingest benchmark's payloads and feed


def measure(url: str, trajectories: int, repeats: int, writer: str = "thread") -> dict[str, Any]:
    import honed
    from honed.capture.recorder import Recorder

    store = honed.open_store(url)
    payloads = [capture._payloads(seed) for seed in range(trajectories)]
    steps = trajectories * capture.STEPS_PER_RUN
    runs = []
    for repeat in range(repeats):
        # its writer sleeps: this thread drains
        recorder = Recorder(store, flush_interval=3600, writer=writer)
        handler = honed.CallbackHandler(recorder=recorder)
        for seed, payload in enumerate(payloads):
            capture._feed_trajectory(handler, payload, seed + repeat * trajectories)
        if writer == "process":
            recorder._store_sink._start()  # the child's start-up is not the writer's work per step
            children = _children_cpu()
            started = time.process_time()
            recorder._drain()
            recorder._store_sink.wait()
            drain = time.process_time() - started
            stored = recorder.stats()["steps_written"]
            recorder.close()
            runs.append(
                {"drain_us": drain / steps * 1e6, "child_us": (_children_cpu() - children) / steps * 1e6}
            )
        else:
            written = [0.0]
            write = recorder._write

            def timed_write(
                records: list[dict[str, Any]], write: Any = write, written: list[float] = written
            ) -> None:
                started = time.thread_time()
                write(records)
                written[0] += time.thread_time() - started

            recorder._write = timed_write  # type: ignore[method-assign]
            started = time.thread_time()
            recorder._drain()
            drain = time.thread_time() - started
            stored = recorder.stats()["steps_written"]
            recorder.close()
            runs.append({"drain_us": drain / steps * 1e6, "write_us": written[0] / steps * 1e6})
        if stored != steps:
            raise RuntimeError(f"stored {stored} steps of {steps}")
    store.close()
    best = min(runs, key=lambda r: r["drain_us"])
    if writer == "process":
        return {
            "backend": store.dialect,
            "writer": writer,
            "steps": steps,
            "drain_us_per_step": round(best["drain_us"], 1),
            "child_us_per_step": round(best["child_us"], 1),
            "repeats": [[round(r["drain_us"], 1), round(r["child_us"], 1)] for r in runs],
        }
    return {
        "backend": store.dialect,
        "writer": writer,
        "steps": steps,
        "drain_us_per_step": round(best["drain_us"], 1),
        "assemble_us_per_step": round(best["drain_us"] - best["write_us"], 1),
        "write_us_per_step": round(best["write_us"], 1),
        "repeats": [[round(r["drain_us"], 1), round(r["write_us"], 1)] for r in runs],
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # children that have exited
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trajectories", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL (capture.py's server) too")
    parser.add_argument("--writer", choices=("thread", "process"), default="thread")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="honed-writer-") as tmp:
        capture._fresh_env(Path(tmp))
        results = [measure(f"sqlite:///{tmp}/writer.db", args.trajectories, args.repeats, args.writer)]
        if args.postgres:
            results.append(
                capture._with_pg_schema(
                    lambda url: measure(url, args.trajectories, args.repeats, args.writer)
                )
            )
    for r in results:
        if "skipped" in r:
            print(r["skipped"])
            continue
        if r["writer"] == "process":
            print(
                f"{r['backend']:10} {r['steps']} steps, inserts in a child process: agent process CPU "
                f"{r['drain_us_per_step']} us/step, child {r['child_us_per_step']} us/step "
                f"(repeats agent/child: {r['repeats']})"
            )
            continue
        print(
            f"{r['backend']:10} {r['steps']} steps: writer CPU {r['drain_us_per_step']} us/step = "
            f"assemble {r['assemble_us_per_step']} + write {r['write_us_per_step']} "
            f"(repeats drain/write: {r['repeats']})"
        )
    print(json.dumps(results, separators=(",", ":")))


if __name__ == "__main__":
    main()
