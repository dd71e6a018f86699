"""Storage benchmark: bytes per trajectory as runs get longer, before and after messages-once.

    .venv/bin/python benchmarks/storage.py [--steps 10,50,200] [--trajectories 20]

Each run is a tool loop shaped like an `instrument()` capture: N model calls, each under its graph
node and each seeing the whole conversation so far (a 120-character system prompt, the user's
request, every earlier assistant turn and ~90-byte tool result) with 4 tool schemas, and N-1 tool
calls under theirs. Both layouts hold the same runs in a fresh SQLite file:

- before: the schema at migration 0004, every model step's input stored whole (what honed wrote
  up to 0006);
- after: `store.save_records` at head: the conversation once per trajectory, steps refer to it.

Reported per trajectory: the bytes of every stored value (`length()` of each column of its
trajectory, step and verdict rows: what the rows hold, without SQLite's pages and indexes) and
the database file's size after VACUUM divided by the number of trajectories. Target: a 200-step
run costs at most 1.2x twenty 10-step runs (linear growth). Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, create_engine, insert, text

SYSTEM = "You are a support agent for ACME. Use the tools to look things up, one at a time; answer in one sentence."
TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"{name} a record by id.",
     "parameters": {"type": "object", "properties": {"id": {"type": "string"}, "limit": {"type": "integer"}},
                    "required": ["id"]}}}
    for name in ("lookup_order", "lookup_customer", "refund", "escalate")
]  # fmt: skip


def build_record(i: int, model_steps: int, t0: float) -> dict[str, Any]:
    """One captured run (the writer's record format): node/model, node/tool, ... node/model."""
    user = {
        "role": "user",
        "content": f"Where is order {i:06d}? It was due on Monday and I have heard nothing.",
    }
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, user]
    steps: list[dict[str, Any]] = []
    clock = t0

    def step(kind: str, name: str, parent: str | None, **fields: Any) -> str:
        nonlocal clock
        step_id = str(uuid.uuid4())
        steps.append({"id": step_id, "index": len(steps), "parent_id": parent, "kind": kind, "name": name,
                      "started_at": clock, "ended_at": clock + 0.1, "extra": {}, **fields})  # fmt: skip
        clock += 0.1
        return step_id

    for turn in range(model_steps):
        last = turn == model_steps - 1
        call = {
            "name": TOOLS[turn % 4]["function"]["name"],
            "args": {"id": f"{i:06d}", "limit": turn},
            "id": f"call_{turn}",
        }
        output = (
            {"role": "assistant", "content": f"Order {i:06d} ships tomorrow; you will get a tracking link."}
            if last
            else {"role": "assistant", "content": "", "tool_calls": [call]}
        )
        node = step("node", "model", None)
        step("model", "gpt-4o-mini", node, input={"messages": list(messages), "tools": TOOLS}, output=output,
             tool_calls=output.get("tool_calls", []), usage={"input_tokens": 300 + 60 * turn, "output_tokens": 24},
             model_version="support@v3", extra={"finish_reason": "stop"})  # fmt: skip
        messages.append(output)
        if not last:
            result = json.dumps(
                {"order": f"{i:06d}", "status": "in transit", "step": turn, "eta": "tomorrow"}
            )
            tools_node = step("node", "tools", None)
            step("tool", call["name"], tools_node, input=call["args"], output=result,
                 extra={"tool_call_id": call["id"]})  # fmt: skip
            messages.append(
                {"role": "tool", "content": result, "tool_call_id": call["id"], "name": call["name"]}
            )
    return {
        "id": str(uuid.uuid4()), "agent": "support", "task": {"messages": [user]}, "task_id": f"task-{i}",
        "split": "train", "metadata": {}, "output": messages[-1]["content"], "status": "ok", "error": None,
        "model_version": "support@v3", "started_at": t0, "ended_at": clock, "steps": steps,
    }  # fmt: skip


def write_before(path: Path, records: list[dict[str, Any]]) -> None:
    """The 0004 schema, rows as honed wrote them then: every model input whole."""
    from alembic import command

    from honed.store.store import TrajectoryStore, _alembic_config, _step_row, _trajectory_row

    store = TrajectoryStore(f"sqlite:///{path}", migrate=False)
    config = _alembic_config()
    with store.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0004")
    tables = MetaData()
    tables.reflect(store.engine, only=["trajectories", "steps"])
    with store.engine.begin() as conn:
        for record in records:
            row = _trajectory_row(record)
            row["metadata"] = row.pop("meta")
            row["created_at"] = row["started_at"]
            conn.execute(insert(tables.tables["trajectories"]), row)
            conn.execute(
                insert(tables.tables["steps"]), [_step_row(record["id"], s) for s in record["steps"]]
            )
    store.close()


def write_after(path: Path, records: list[dict[str, Any]]) -> float:
    """Through the store at head; returns the seconds `save_records` took (migrations apart)."""
    import honed

    store = honed.open_store(f"sqlite:///{path}")
    started = time.perf_counter()
    store.save_records(records)
    seconds = time.perf_counter() - started
    store.close()
    return seconds


def measure(path: Path, n: int) -> dict[str, float]:
    """Bytes of stored values per trajectory, and of the vacuumed file."""
    engine = create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        payload = 0
        for table in ("trajectories", "steps", "verdicts"):
            columns = [row[1] for row in conn.execute(text(f"PRAGMA table_info({table})"))]
            total = " + ".join(f'ifnull(length(CAST("{c}" AS BLOB)), 0)' for c in columns)
            payload += conn.execute(text(f"SELECT ifnull(sum({total}), 0) FROM {table}")).scalar() or 0
        steps = conn.execute(text("SELECT count(*) FROM steps")).scalar()
    with engine.connect() as conn:
        conn.execute(text("VACUUM"))
    engine.dispose()
    return {"payload": payload / n, "file": path.stat().st_size / n, "steps": steps / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="10,50,200", help="model steps per run, comma-separated")
    parser.add_argument("--trajectories", type=int, default=20, help="runs of each length")
    args = parser.parse_args()
    sizes = [int(s) for s in args.steps.split(",")]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="honed-storage-bench-") as tmp:
        for size in sizes:
            records = [build_record(i, size, time.time()) for i in range(args.trajectories)]
            before, after = Path(tmp) / f"before-{size}.db", Path(tmp) / f"after-{size}.db"
            write_before(before, records)
            write_s = write_after(after, records)
            results[size] = {
                "before": measure(before, len(records)),
                "after": measure(after, len(records)),
                "write_traj_s": len(records) / write_s,
            }
    print(f"bytes per trajectory, {args.trajectories} runs of each length (SQLite)")
    print(f"{'model steps':>11} {'steps':>6} {'before: values':>15} {'after: values':>14} {'ratio':>6}"
          f" {'before: file':>13} {'after: file':>12} {'ratio':>6}")  # fmt: skip
    for size, r in results.items():
        b, a = r["before"], r["after"]
        print(f"{size:>11} {a['steps']:>6.0f} {b['payload']:>15,.0f} {a['payload']:>14,.0f}"
              f" {b['payload'] / a['payload']:>5.1f}x {b['file']:>13,.0f} {a['file']:>12,.0f}"
              f" {b['file'] / a['file']:>5.1f}x")  # fmt: skip
    print(
        "  writing (after): "
        + ", ".join(f"{k} model steps {r['write_traj_s']:,.0f} runs/s" for k, r in results.items())
    )
    if 10 in results and 200 in results:
        for layout in ("before", "after"):
            for what in ("payload", "file"):
                growth = results[200][layout][what] / (20 * results[10][layout][what])
                verdict = "met" if growth <= 1.2 else "MISSED"
                print(f"  {layout:>6}, {what:<7}: a 200-step run = {growth:.2f}x twenty 10-step runs"
                      f" (target <= 1.2x: {verdict})")  # fmt: skip
    print("BENCH-RESULT " + json.dumps({str(k): v for k, v in results.items()}))


if __name__ == "__main__":
    main()
