"""Verifier benchmarks: verdicts per second including store I/O (claim, load, verify, write).

    .venv/bin/python benchmarks/verifiers.py [--quick] [--no-postgres]

1. reference + schema verifiers through one `Worker` (concurrency 2) on SQLite and PostgreSQL;
   every trajectory meets both, so each one settled is two verdicts. Target >= 500 verdicts/s.
2. the sandboxed `TestSuite` (bubblewrap, pytest, half the solutions wrong) on SQLite with 2
   sandboxes, which is what 2 cores allow. Target >= 10 verdicts/s.
3. 1 vs 2 vs 4 worker *processes* on one PostgreSQL, started together: reference + schema
   (CPU-bound; on a 2-core machine more processes cannot add CPU), and a 20 ms I/O-bound verifier
   (what a remote judge looks like), where more workers should scale. Every run checks that no
   trajectory was verified twice and no verdict row is duplicated.

Prints figures measured in this run next to their targets; asserts nothing (machines are noisy).
Worker processes are this script re-invoked with `--worker`, and print one JSON line back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

PG_ADMIN_URL = os.environ.get("HONED_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RESULT_PREFIX = "BENCH-RESULT "
TARGET_SIMPLE = 500.0
TARGET_SANDBOX = 10.0

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "nights": {"type": "integer", "minimum": 1}},
    "required": ["city", "nights"],
}
ADD_TESTS = "from solution import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n\n\ndef test_neg():\n    assert add(-1, 1) == 0\n"


# -- data ------------------------------------------------------------------------------------------


def seed_simple(store: Any, n: int) -> None:
    """Trajectories shaped like captured runs (model, tool, model steps) with a reference and a schema."""
    from honed.store import trajectory_to_record

    records = []
    for i in range(n):
        answer = json.dumps({"city": "Oslo" if i % 4 else "Bergen", "nights": 1 + i % 5})
        records.append(
            trajectory_to_record(_trajectory(f"b{i:06d}", answer, expected={"city": "Oslo"}, schema=SCHEMA))
        )
        if len(records) == 1000:
            store.save_records(records)
            records = []
    store.save_records(records)


def seed_code(store: Any, n: int) -> None:
    from honed.store import trajectory_to_record

    good = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a * b\n```"
    store.save_records(
        [
            trajectory_to_record(_trajectory(f"c{i:05d}", good if i % 2 else bad, tests=ADD_TESTS))
            for i in range(n)
        ]
    )


def _trajectory(tid: str, answer: str, **metadata: Any) -> Any:
    from datetime import UTC, datetime

    from honed import Step, Trajectory

    now = datetime.now(UTC)
    steps = [
        Step(id=f"{tid}-0", index=0, kind="model", name="m", tool_calls=[{"name": "lookup", "args": {"q": tid}, "id": "c1"}],
             usage={"input_tokens": 120, "output_tokens": 12, "total_tokens": 132}, started_at=now, ended_at=now),
        Step(id=f"{tid}-1", index=1, kind="tool", name="lookup", input={"q": tid}, output="Oslo, 3 nights", started_at=now, ended_at=now),
        Step(id=f"{tid}-2", index=2, kind="model", name="m", output={"role": "assistant", "content": answer}, started_at=now, ended_at=now),
    ]  # fmt: skip
    return Trajectory(id=tid, agent="bench", task={"messages": [{"role": "user", "content": f"book {tid}"}]},
                      metadata=metadata, steps=steps, output=answer, started_at=now, ended_at=now)  # fmt: skip


# -- stores ----------------------------------------------------------------------------------------


class PgSchema:
    """A fresh PostgreSQL schema for one measurement, dropped afterwards."""

    def __enter__(self) -> str:
        self.name = f"honed_bench_{uuid.uuid4().hex[:8]}"
        self.admin = create_engine(PG_ADMIN_URL)
        with self.admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{self.name}"'))
        return f"{PG_ADMIN_URL}?options=-csearch_path%3D{self.name}"

    def __exit__(self, *exc: object) -> None:
        with self.admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{self.name}" CASCADE'))
        self.admin.dispose()


def pg_available() -> bool:
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


def duplicates(store: Any) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT COUNT(*) FROM (SELECT 1 FROM verdicts GROUP BY trajectory_id, verifier, version HAVING COUNT(*) > 1) d"
        )).scalar() or 0)  # fmt: skip


# -- measurements ----------------------------------------------------------------------------------


def simple_verifiers() -> list[Any]:
    from honed.verifiers import JsonSchema, ReferenceMatch

    return [ReferenceMatch("json"), JsonSchema()]


def bench_simple(url: str, n: int) -> dict[str, Any]:
    import honed
    from honed.verifiers import Worker

    store = honed.open_store(url)
    seed_simple(store, n)
    worker = Worker(store, simple_verifiers(), concurrency=2, batch_size=64)
    start = time.perf_counter()
    settled = worker.run_once()
    elapsed = time.perf_counter() - start
    worker.close()
    result = {"trajectories": settled, "verdicts": worker.stats.verdicts, "seconds": elapsed,
              "verdicts_per_s": worker.stats.verdicts / elapsed, "duplicates": duplicates(store)}  # fmt: skip
    store.close()
    return result


def bench_sandbox(url: str, n: int) -> dict[str, Any]:
    import honed
    from honed.verifiers import Limits, Sandbox, TestSuite, Worker

    store = honed.open_store(url)
    seed_code(store, n)
    sandbox = Sandbox(Limits(wall_s=10, memory_mb=512), size=2)
    start = time.perf_counter()
    sandbox.run_pytest(
        {"solution.py": "def add(a, b):\n    return a + b\n", "test_solution.py": ADD_TESTS}
    )  # warm
    warm = time.perf_counter() - start
    worker = Worker(store, [TestSuite(sandbox=sandbox)], concurrency=2, batch_size=16)
    start = time.perf_counter()
    settled = worker.run_once()
    elapsed = time.perf_counter() - start
    sandbox.close()
    passed = store.count(verdict="pass")
    store.close()
    return {"trajectories": settled, "verdicts": worker.stats.verdicts, "seconds": elapsed, "first_sandbox_s": warm,
            "verdicts_per_s": worker.stats.verdicts / elapsed, "passed": passed, "errors": worker.stats.errors}  # fmt: skip


def bench_workers(n_workers: int, n: int, kind: str) -> dict[str, Any]:
    import honed

    with PgSchema() as url:
        store = honed.open_store(url)
        seed_simple(store, n)
        command = [sys.executable, __file__, "--worker", url, "--kind", kind]
        procs = [
            subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(n_workers)
        ]
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "ready", line
        start = time.time()
        for proc in procs:  # all at once: each child starts on its "go"
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=600)
            results.extend(
                json.loads(line[len(RESULT_PREFIX) :])
                for line in out.splitlines()
                if line.startswith(RESULT_PREFIX)
            )
        end = max(r["end"] for r in results)
        calls = [tid for r in results for tid in r["calls"]]
        verdicts = sum(r["verdicts"] for r in results)
        dup = duplicates(store)
        store.close()
    return {
        "workers": n_workers,
        "verdicts": verdicts,
        "seconds": end - start,
        "verdicts_per_s": verdicts / (end - start),
        "per_worker": [r["settled"] for r in results],
        "verified_twice": len(calls) - len(set(calls)),
        "duplicate_rows": dup,
    }


def worker_main(url: str, kind: str) -> None:
    """A child of `bench_workers`: one worker process, started on "go"."""
    import honed
    from honed.trajectory import Trajectory
    from honed.verifiers import BaseVerifier, Worker
    from honed.verifiers.protocol import verdict

    calls: list[str] = []
    lock = threading.Lock()

    class Recorded(BaseVerifier):
        """Wraps a verifier and records which trajectories it was called on."""

        def __init__(self, inner: Any) -> None:
            self.inner, self.name, self.version = inner, inner.name, inner.version

        def applies_to(self, t: Trajectory) -> bool:
            return self.inner.applies_to(t)

        def verify(self, t: Trajectory) -> Any:
            with lock:
                calls.append(f"{self.name}:{t.id}")
            return self.inner.verify(t)

    class RemoteJudge(BaseVerifier):
        """Stands for an I/O-bound verifier (a hosted judge): 20 ms of waiting, no CPU."""

        name = "remote"

        def check(self, t: Trajectory) -> Any:
            time.sleep(0.02)
            return verdict(True, "ok")

    verifiers = simple_verifiers() if kind == "simple" else [RemoteJudge()]
    store = honed.open_store(url)
    concurrency = 2 if kind == "simple" else 8
    worker = Worker(store, [Recorded(v) for v in verifiers], concurrency=concurrency, batch_size=64)
    worker._prepare()  # registration and sandbox set-up are not part of the timed run
    print("ready", flush=True)
    sys.stdin.readline()
    settled = worker.run_once()
    end = time.time()
    worker.close()
    print(
        RESULT_PREFIX
        + json.dumps({"settled": settled, "verdicts": worker.stats.verdicts, "calls": calls, "end": end}),
        flush=True,
    )


# -- report ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller runs")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="simple", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.kind)
        return
    n_simple, n_code, n_multi = (1000, 60, 1000) if args.quick else (4000, 200, 4000)
    n_remote = 200 if args.quick else 800
    use_pg = not args.no_postgres and pg_available()
    print(f"honed verifier benchmarks ({os.cpu_count()} cores{'' if use_pg else ', no PostgreSQL'})\n")

    with tempfile.TemporaryDirectory() as tmp:
        r = bench_simple(f"sqlite:///{Path(tmp) / 'simple.db'}", n_simple)
        _line("reference+schema, SQLite", r, TARGET_SIMPLE)
    if use_pg:
        with PgSchema() as url:
            r = bench_simple(url, n_simple)
        _line("reference+schema, PostgreSQL", r, TARGET_SIMPLE)
    with tempfile.TemporaryDirectory() as tmp:
        r = bench_sandbox(f"sqlite:///{Path(tmp) / 'code.db'}", n_code)
        _line("sandboxed TestSuite, SQLite, 2 sandboxes", r, TARGET_SANDBOX)
        print(f"    first sandbox ready in {r['first_sandbox_s']:.2f}s; {r['passed']} of {r['trajectories']} passed "
              f"(half are wrong on purpose), {r['errors']} errors")  # fmt: skip
    if use_pg:
        for kind, n in (("simple", n_multi), ("remote", n_remote)):
            label = "reference+schema" if kind == "simple" else "20 ms I/O-bound verifier"
            print(f"\n  {label}: worker processes on PostgreSQL, {n} trajectories")
            base = None
            for workers in (1, 2, 4):
                r = bench_workers(workers, n, kind)
                base = base or r["verdicts_per_s"]
                print(f"    {workers} worker(s): {r['verdicts_per_s']:8.0f} verdicts/s  x{r['verdicts_per_s'] / base:.2f}  "
                      f"({r['verdicts']} verdicts in {r['seconds']:.2f}s, settled per worker {r['per_worker']}; "
                      f"verified twice: {r['verified_twice']}, duplicate rows: {r['duplicate_rows']})")  # fmt: skip


def _line(label: str, r: dict[str, Any], target: float) -> None:
    ok = "meets" if r["verdicts_per_s"] >= target else "BELOW"
    print(f"  {label:42s} {r['verdicts_per_s']:8.1f} verdicts/s  ({r['verdicts']} in {r['seconds']:.2f}s; "
          f"target >= {target:g}: {ok})")  # fmt: skip


if __name__ == "__main__":
    main()
