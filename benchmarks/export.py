"""Export benchmarks: spans/s to Arize Phoenix over OTLP/HTTP, trajectories/s to JSONL and parquet.

    .venv/bin/python benchmarks/export.py [--trajectories 10000] [--keep-store PATH] [--no-otlp | --no-phoenix] [--signed]

Builds a SQLite store of N synthetic trajectories shaped like a captured tool-calling agent run
(`instrument()`: 3 model calls and 2 tool calls, each under its graph node = 10 steps, 11 spans with
the root), 80% judged pass and 20% fail, then times each export from the store, reading included.
Phoenix runs on loopback as a subprocess of this script, so on a small machine it competes with the
exporter for the same cores (`--no-otlp` measures reading and the datasets only: no Phoenix, no
network; `--no-phoenix` adds the replay into a receiver that discards). Replays read as
`honed export otlp` does with content off (`step_content=False`). Prints figures measured in this
one run; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from sqlalchemy import delete, insert

import honed
from honed.exporters.datasets import write_jsonl, write_parquet
from honed.exporters.otel import LiveExporter, make_resource, replay
from honed.exporters.spans import SpanMapper
from honed.store.schema import VerdictRow
from honed.store.select import select_trajectories
from honed.store.signing import Signer, content_digest
from honed.store.verification import verdict_row
from honed.store.verification_tables import VerifierPolicyRow
from phoenix_server import PhoenixServer, free_port

SYSTEM = "You are a support agent for ACME. Use the tools to look things up; answer in one sentence."
TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"{name} a record by id.",
     "parameters": {"type": "object", "properties": {"id": {"type": "string"}, "limit": {"type": "integer"}},
                    "required": ["id"]}}}
    for name in ("lookup_order", "lookup_customer", "refund", "escalate")
]  # fmt: skip


def build_record(i: int, t0: float) -> dict[str, Any]:
    """One trajectory record (the writer's format): model → tool → model → tool → model, nodes around."""
    start = t0 + i * 2.0
    user = {
        "role": "user",
        "content": f"Where is order {i:06d}? It was due on Monday and I have heard nothing.",
    }
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, user]
    steps: list[dict[str, Any]] = []
    clock = start

    def step(kind: str, name: str, parent: str | None, duration: float, **fields: Any) -> str:
        nonlocal clock
        step_id = str(uuid.uuid4())
        steps.append({"id": step_id, "index": len(steps), "parent_id": parent, "kind": kind, "name": name,
                      "started_at": clock, "ended_at": clock + duration, "extra": {}, **fields})  # fmt: skip
        clock += duration
        return step_id

    for turn in range(3):
        node = step("node", "model", None, 0.0)
        if turn < 2:
            call = {
                "name": TOOLS[turn]["function"]["name"],
                "args": {"id": f"{i:06d}", "limit": 5},
                "id": f"call_{turn}",
            }
            output = {"role": "assistant", "content": "", "tool_calls": [call]}
        else:
            output = {
                "role": "assistant",
                "content": f"Order {i:06d} ships tomorrow; you will get a tracking link.",
            }
        step("model", "gpt-4o-mini", node, 0.4,
             input={"messages": list(messages), "tools": TOOLS}, output=output,
             tool_calls=output.get("tool_calls", []), usage={"input_tokens": 310 + 60 * turn, "output_tokens": 24},
             model_version="support@v3",
             extra={"finish_reason": "stop", "settings": {"_type": "openai-chat", "model": "gpt-4o-mini", "temperature": 0.0}})  # fmt: skip
        steps[-2]["ended_at"] = clock
        messages.append(output)
        if turn < 2:
            tools_node = step("node", "tools", None, 0.0)
            result = json.dumps(
                {"order": f"{i:06d}", "status": "in transit", "carrier": "DHL", "eta": "tomorrow"}
            )
            step("tool", call["name"], tools_node, 0.05, input=call["args"], output=result,
                 extra={"tool_call_id": call["id"]})  # fmt: skip
            steps[-2]["ended_at"] = clock
            messages.append(
                {"role": "tool", "content": result, "tool_call_id": call["id"], "name": call["name"]}
            )
    return {
        "id": str(uuid.uuid4()), "agent": "support", "task": {"messages": [user]}, "task_id": f"task-{i % 500}",
        "split": "heldout" if i % 10 == 9 else "train", "metadata": {}, "output": messages[-1]["content"],
        "status": "ok", "error": None, "model_version": "support@v3", "started_at": start, "ended_at": clock,
        "steps": steps,
    }  # fmt: skip


def build_store(url: str, n: int) -> None:
    store = honed.open_store(url)
    t0 = time.time() - n * 2.0 - 3600
    for offset in range(0, n, 500):
        records = [build_record(i, t0) for i in range(offset, min(n, offset + 500))]
        store.save_records(records)
        verdicts = [
            {"trajectory_id": r["id"], "verifier": "reference", "version": "1", "passed": (offset + k) % 5 != 4,
             "score": 1.0 if (offset + k) % 5 != 4 else 0.0, "reason": "compared with the expected answer",
             "evidence": {}, "duration_s": 0.001}
            for k, r in enumerate(records)
        ]  # fmt: skip
        with store._sessions.begin() as session:  # bulk: add_verdict is one transaction per verdict
            session.execute(insert(VerdictRow), verdicts)
    store.close()


def sign_verdicts(url: str, key: str) -> None:
    """`--signed`: every verdict written again as a worker holding the key writes it (signed, with
    the digest of the run it judged), so the reads below check signatures and content."""
    signer = Signer(key)
    store = honed.open_store(url)
    now = datetime.now(UTC)
    rows = [
        verdict_row(t.id, v, now, content_digest(t), signer)
        for t in select_trajectories(store, include_heldout=True)
        for v in t.verdicts
    ]
    with store._sessions.begin() as session:
        session.execute(delete(VerdictRow))
        session.execute(delete(VerifierPolicyRow))  # a kept store's policy, signed with another key
        session.execute(insert(VerdictRow), rows)
    store.close()
    # As a worker starting with the key does: a verifier with no signed policy is not trusted.
    honed.open_store(url, verdict_key=key).register_verifiers({"reference": "high"})


@contextmanager
def _null_receiver() -> Iterator[str]:
    """An OTLP/HTTP endpoint that reads each request and answers 200, in its own process."""
    port = free_port()
    code = (
        "import http.server as h\n"
        "class H(h.BaseHTTPRequestHandler):\n"
        "    def do_POST(self):\n"
        "        self.rfile.read(int(self.headers['Content-Length']))\n"
        "        self.send_response(200); self.send_header('Content-Length', '0'); self.end_headers()\n"
        "    def log_message(self, *a): pass\n"
        f"h.ThreadingHTTPServer(('127.0.0.1', {port}), H).serve_forever()\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(100):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


CPU_S: dict[str, float] = {}  # label -> this process's CPU seconds: steadier than wall time on a busy machine


def timed(label: str, fn: Callable[[], Any]) -> tuple[float, Any]:
    started, cpu = time.perf_counter(), time.process_time()
    value = fn()
    elapsed = time.perf_counter() - started
    CPU_S[label] = time.process_time() - cpu
    print(f"  {label}: {elapsed:.2f} s (cpu {CPU_S[label]:.2f} s)", flush=True)
    return elapsed, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=10_000)
    parser.add_argument("--keep-store", help="Build (or reuse) the store at this SQLite path.")
    parser.add_argument(
        "--ingest-wait", type=float, default=60.0, help="Seconds to watch Phoenix store the replay."
    )
    parser.add_argument(
        "--no-otlp", action="store_true", help="Reading and datasets only: no OTLP replay, no Phoenix."
    )
    parser.add_argument(
        "--signed", action="store_true", help="Verdicts signed, read with the key (HONED_VERDICT_KEY's cost)."
    )
    parser.add_argument(
        "--no-phoenix", action="store_true", help="Replay into a discarding receiver only: no Phoenix."
    )
    args = parser.parse_args()
    n = args.trajectories
    workdir = Path(tempfile.mkdtemp(prefix="honed-export-bench-"))
    db = Path(args.keep_store) if args.keep_store else workdir / "bench.db"
    url = f"sqlite:///{db}"
    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        os.environ.pop(name)

    print(f"store: {n} trajectories at {db}", flush=True)
    if not db.exists():
        timed("build store", lambda: build_store(url, n))
    key = None
    if args.signed:
        key = secrets.token_urlsafe(32)
        timed("sign the verdicts", lambda: sign_verdicts(url, key))
    store = honed.open_store(url, verdict_key=key)
    count = store.count()
    passing = store.count(verdict="pass") - store.count(verdict="pass", split="heldout")
    results: dict[str, Any] = {"trajectories": count}

    print("reading and mapping (no network)", flush=True)
    read_s, trajectories = timed(
        "read all from the store", lambda: list(select_trajectories(store, include_heldout=True))
    )
    mapper = SpanMapper(make_resource(project="bench"))
    map_s, span_count = timed("map to spans", lambda: sum(len(mapper.spans(t)) for t in trajectories))
    content_mapper = SpanMapper(make_resource(project="bench"), capture_content=True)
    map_content_s, _ = timed(
        "map to spans, content on", lambda: sum(len(content_mapper.spans(t)) for t in trajectories)
    )
    results.update(
        read_traj_s=count / read_s,
        read_traj_cpu_s=count / CPU_S["read all from the store"],
        map_spans_s=span_count / map_s,
        map_content_spans_s=span_count / map_content_s,
    )
    trajectories.clear()  # free the memory before the next measurements

    print("datasets", flush=True)
    import datasets  # noqa: F401  (imported before timing: a one-off second, not per export)

    jsonl_s, jsonl = timed(
        "JSONL (verdict=pass)",
        lambda: write_jsonl(select_trajectories(store, verdict="pass"), workdir / "train.jsonl"),
    )
    parquet_s, parquet = timed(
        "parquet (verdict=pass)",
        lambda: write_parquet(select_trajectories(store, verdict="pass"), workdir / "train.parquet"),
    )
    assert jsonl.written == parquet.written == passing, (jsonl, parquet, passing)
    results.update(
        rows=jsonl.written,
        jsonl_traj_s=jsonl.written / jsonl_s,
        parquet_traj_s=parquet.written / parquet_s,
        jsonl_traj_cpu_s=jsonl.written / CPU_S["JSONL (verdict=pass)"],
        parquet_traj_cpu_s=parquet.written / CPU_S["parquet (verdict=pass)"],
        jsonl_mib=(workdir / "train.jsonl").stat().st_size / 2**20,
        parquet_mib=(workdir / "train.parquet").stat().st_size / 2**20,
    )
    if args.no_otlp:
        _print_reading(results)
        print("BENCH-RESULT " + json.dumps(results))
        return

    print("OTLP/HTTP replay to a null receiver (accepts and discards: honed's own ceiling)", flush=True)
    with _null_receiver() as null_url:
        null_s, null = timed("replay", lambda: replay(_replayed(store), null_url, project="null"))
    results.update(
        null_spans_s=null.spans / null_s,
        null_traj_s=null.trajectories / null_s,
        null_spans_cpu_s=null.spans / CPU_S["replay"],
    )
    if args.no_phoenix:
        _print_reading(results)
        _print_null(results)
        print("BENCH-RESULT " + json.dumps(results))
        return

    print("starting Phoenix", flush=True)
    # A queue big enough to take the whole replay, so the send rate is honed's, not Phoenix's
    # 503 backpressure; Phoenix's own ingestion (into its SQLite) is measured apart.
    phoenix_env = {"PHOENIX_MAX_SPANS_QUEUE_SIZE": str(10 * span_count)}
    with PhoenixServer(workdir / "phoenix", env=phoenix_env) as phoenix:
        print("live exporter (BatchSpanProcessor), fed 50 trajectories a call as the writer does", flush=True)
        # Fresh ids: spans the replay below sends again would be de-duplicated, not stored.
        batch = [
            dataclasses.replace(t, id=str(uuid.uuid4()))
            for t in select_trajectories(store, limit=1000, include_heldout=True)
        ]
        live = LiveExporter(endpoint=phoenix.http_url, project="live", max_queue_size=span_count)
        started, enqueue = time.perf_counter(), 0.0
        for k in range(0, len(batch), 50):
            t = time.perf_counter()
            live.export(batch[k : k + 50])
            enqueue += time.perf_counter() - t
        live.force_flush()
        live_s = time.perf_counter() - started
        live.shutdown()
        stats = live.stats()
        results.update(
            live_enqueue_us_per_traj=enqueue / len(batch) * 1e6,
            live_spans_s=stats["spans_exported"] / live_s,
            live_queued=stats["spans_queued"],
            live_exported=stats["spans_exported"],
        )
        caught_up = time.perf_counter()
        while phoenix.count("live") < stats["spans_exported"]:  # let Phoenix store them before the replay
            time.sleep(2.0)
        print(f"  Phoenix stored them {time.perf_counter() - caught_up:.0f} s after the flush", flush=True)

        print("OTLP/HTTP replay to Phoenix (store → spans → POST, 512 spans a request)", flush=True)
        replay_s, sent = timed("replay", lambda: replay(_replayed(store), phoenix.http_url, project="replay"))
        # Phoenix queues what it accepted and writes it to its own database afterwards, at its pace.
        before, started = phoenix.count("replay"), time.perf_counter()
        time.sleep(args.ingest_wait)
        ingested, ingest_s = phoenix.count("replay"), time.perf_counter() - started
        print(
            f"  Phoenix stored {ingested - before} more spans in the {ingest_s:.0f} s after ({ingested} of {sent.spans})"
        )
        again_s, again = timed(
            "replay again (ids already sent)",
            lambda: replay(_replayed(store), phoenix.http_url, project="replay"),
        )
        results.update(
            spans=sent.spans,
            replay_spans_s=sent.spans / replay_s,
            replay_traj_s=sent.trajectories / replay_s,
            replay_retries=sent.retries,
            phoenix_ingest_spans_s=(ingested - before) / ingest_s,
            phoenix_ingested=ingested,
            replay_again_spans_s=again.spans / again_s,
        )

    r = results
    _print_reading(r)
    _print_null(r)
    print(f"  OTLP/HTTP to Phoenix      {r['replay_spans_s']:>9,.0f} spans/s accepted, store read included"
          f" ({r['replay_traj_s']:,.0f} trajectories/s, {r['replay_retries']} retries)")  # fmt: skip
    print(
        f"  Phoenix's own ingestion   {r['phoenix_ingest_spans_s']:>9,.0f} spans/s ({r['phoenix_ingested']} stored)"
    )
    print(f"  replay again              {r['replay_again_spans_s']:>9,.0f} spans/s (same ids: nothing new)")
    print(f"  live, BatchSpanProcessor  {r['live_spans_s']:>9,.0f} spans/s, {r['live_exported']}/{r['live_queued']} sent;"
          f" {r['live_enqueue_us_per_traj']:.0f} µs/trajectory on the writer thread")  # fmt: skip
    print("BENCH-RESULT " + json.dumps(results))


def _replayed(store: Any) -> Any:
    """What `honed export otlp` reads, content off: every trajectory, steps without content."""
    return select_trajectories(store, include_heldout=True, step_content=False)


def _print_null(r: dict[str, Any]) -> None:
    print(f"  OTLP/HTTP, null receiver  {r['null_spans_s']:>9,.0f} spans/s ({r['null_traj_s']:,.0f} trajectories/s;"
          f" {r['null_spans_cpu_s']:,.0f} per CPU second of this process)")  # fmt: skip


def _print_reading(r: dict[str, Any]) -> None:
    print()
    spans = f", {r['spans']} spans" if "spans" in r else ""
    print(f"export figures: {r['trajectories']} trajectories{spans}, {r['rows']} passing non-held-out rows")
    print(
        f"  read from SQLite          {r['read_traj_s']:>9,.0f} trajectories/s ({r['read_traj_cpu_s']:,.0f} per CPU second)"
    )
    print(
        f"  map to spans              {r['map_spans_s']:>9,.0f} spans/s ({r['map_content_spans_s']:,.0f} with content)"
    )
    print(f"  JSONL                     {r['jsonl_traj_s']:>9,.0f} trajectories/s ({r['jsonl_mib']:.1f} MiB;"
          f" {r['jsonl_traj_cpu_s']:,.0f} per CPU second)")  # fmt: skip
    print(f"  parquet                   {r['parquet_traj_s']:>9,.0f} trajectories/s ({r['parquet_mib']:.1f} MiB;"
          f" {r['parquet_traj_cpu_s']:,.0f} per CPU second)")  # fmt: skip


if __name__ == "__main__":
    main()
