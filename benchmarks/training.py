"""Training benchmarks: dataset building from the store, SFT tokens/s on the tiny model, one full cycle.

    .venv/bin/python benchmarks/training.py [--quick] [--trajectories N] [--no-cycle] [--no-sft]

- dataset building: N verified trajectories (model call -> tool -> model call, the shape the
  capture layer stores, half with recorded token ids) in a SQLite store; `prepare(store, "sft")`
  and `prepare(store, "kto")` timed end to end (select, label, dedupe, rows, `datasets.Dataset`).
  Target: >= 2,000 trajectories/s.
- SFT throughput: `SFTMethod` (TRL's SFTTrainer) on the default tiny model (`build_tiny`, ~1.8M
  parameters) over those rows, conversational and pre-tokenised; tokens/s as TRL counts them
  (`num_tokens`, padding excluded) over the training wall time. On a GPU when one is present.
- a full cycle: one `LearningLoop` cycle on the tool-use suite (attempts -> labels -> SFT -> gate
  -> promote) with the cached warm-started base model, its phases timed.
Prints figures and a JSON line; asserts nothing (machines are noisy); not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

TARGET_BUILD = 2000.0
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    }
    for name in ("add", "sub", "mul")
]


def trajectory(n: int, tokenizer: Any, with_ids: bool) -> Any:
    from honed import Step, Trajectory

    rng = random.Random(n)
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    task_id = f"task-{n % 1000}"
    system = {"role": "system", "content": "Use the tools; answer with the number."}
    user = {"role": "user", "content": f"What is {a} plus {b}? ({n})"}
    call = {"name": "add", "args": {"a": a, "b": b}, "id": f"call_{n}"}
    first_out = {"role": "assistant", "content": "", "tool_calls": [call]}
    tool_msg = {"role": "tool", "content": str(a + b), "tool_call_id": call["id"]}
    answer = f"The answer is {a + b}."
    second_out = {"role": "assistant", "content": answer}
    extras: list[dict[str, Any]] = [{"finish_reason": "tool_calls"}, {"finish_reason": "stop"}]
    if with_ids:
        for extra, messages, text in (
            (
                extras[0],
                [system, user],
                f'<tool_call>\n{{"name": "add", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call>',
            ),
            (extras[1], [system, user, first_out, tool_msg], answer),
        ):
            prompt = tokenizer.apply_chat_template(
                _template(messages), tools=TOOLS, add_generation_prompt=True, tokenize=False
            )
            extra["prompt_token_ids"] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            extra["token_ids"] = tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
            extra["logprobs"] = [-0.1] * len(extra["token_ids"])
    t0 = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=n)
    steps = [
        Step(id=f"{n}-0", index=0, kind="model", name="model", input={"messages": [system, user], "tools": TOOLS},
             output=first_out, tool_calls=[call], model_version="bench@v1", extra=extras[0]),
        Step(id=f"{n}-1", index=1, kind="tool", name="add", input={"a": a, "b": b}, output=str(a + b),
             extra={"tool_call_id": call["id"]}),
        Step(id=f"{n}-2", index=2, kind="model", name="model",
             input={"messages": [system, user, first_out, tool_msg], "tools": TOOLS}, output=second_out,
             model_version="bench@v1", extra=extras[1]),
    ]  # fmt: skip
    return Trajectory(
        id=f"bench-{n:07d}",
        agent="bench",
        task={"messages": [user]},
        task_id=task_id,
        split="train",
        metadata={"expected": str(a + b)},
        steps=steps,
        output=answer,
        model_version="bench@v1",
        started_at=t0,
        ended_at=t0 + timedelta(seconds=1),
    )


def _template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {"type": "function", "function": {"name": c["name"], "arguments": c["args"]}}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


def fill_store(url: str, n: int, tokenizer: Any, with_ids: bool) -> Any:
    """N captured trajectories, 3 in 4 passed by the `reference` verifier (bulk-inserted: this is
    set-up, not what is measured)."""
    from sqlalchemy import insert

    import honed
    from honed.store import trajectory_to_record
    from honed.store.schema import VerdictRow

    store = honed.open_store(url)
    for start in range(0, n, 500):
        batch = [trajectory(i, tokenizer, with_ids) for i in range(start, min(n, start + 500))]
        store.save_records([trajectory_to_record(t) for t in batch])
        verdicts = [
            {"trajectory_id": t.id, "verifier": "reference", "version": "1", "passed": i % 4 != 0,
             "score": float(i % 4 != 0), "reason": "bench", "evidence": {}, "duration_s": 0.0}
            for i, t in enumerate(batch, start)
        ]  # fmt: skip
        with store.engine.begin() as conn:
            conn.execute(insert(VerdictRow), verdicts)
    return store


def build_rate(store: Any, method: str, n: int) -> dict[str, Any]:
    from honed.learn.datasets import prepare

    started, cpu = time.perf_counter(), time.process_time()
    data = prepare(store, method, max_per_task=None)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "method": method,
        "trajectories": n,
        "rows": len(data),
        "seconds": round(seconds, 2),
        "per_s": round(n / seconds, 1),
        "per_cpu_s": round(n / cpu, 1),  # steadier than wall time on a shared machine
        "pretokenized": data.pretokenized,
    }


def sft_rate(base: Path, store: Any, out: Path, rows: int, pretokenized: bool) -> dict[str, Any]:
    from honed.demo.loop import cpu_settings
    from honed.learn.datasets import prepare
    from honed.learn.methods import SFTMethod

    data = prepare(store, "sft", max_per_task=None, limit=rows, pretokenized=pretokenized)
    method = SFTMethod(
        num_train_epochs=1, learning_rate=5e-4, per_device_train_batch_size=16, **cpu_settings()
    )
    result = method.train(base, data, out)
    m = result.metrics
    return {
        "rows": len(data),
        "pretokenized": data.pretokenized,
        "tokens": m.get("tokens"),
        "seconds": round(m.get("seconds", 0.0), 2),
        "tokens_per_s": round(m.get("tokens_per_s", 0.0), 1),
    }


def full_cycle(workdir: Path, train_tasks: int, heldout_tasks: int) -> dict[str, Any]:
    import honed
    from honed.demo import load_suite
    from honed.demo.loop import LearningLoop

    store = honed.open_store(f"sqlite:///{workdir}/cycle.db")
    loop = LearningLoop(
        load_suite("tool_use"),
        store,
        cycles=1,
        train_tasks=train_tasks,
        heldout_tasks=heldout_tasks,
        workdir=workdir,
    )
    started = time.monotonic()
    loop.start()
    base_s = time.monotonic() - started
    try:
        base = loop.baseline()
        one = loop.step(1)
    finally:
        loop.close()
    return {
        "base_model_s": round(base_s, 1),
        "baseline_eval_s": base.seconds,
        "cycle_s": one.seconds,
        "phases_s": one.extra.get("durations"),
        "attempts": one.trajectories,
        "status": one.extra.get("status"),
        "heldout_pass_at_1": [base.heldout_pass_at_1, one.heldout_pass_at_1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--trajectories", type=int, default=None)
    parser.add_argument("--no-cycle", action="store_true")
    parser.add_argument("--no-sft", action="store_true", help="dataset building only (implies --no-cycle)")
    args = parser.parse_args()
    n = args.trajectories or (2000 if args.quick else 10000)
    import torch
    from transformers import AutoTokenizer

    from honed.demo import build_tiny

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {"device": device, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(prefix="honed-bench-training-") as tmp:
        root = Path(tmp)
        base = build_tiny(root / "tiny", seed=0)
        tokenizer = AutoTokenizer.from_pretrained(base)
        print(f"filling stores with {n} trajectories ...", flush=True)
        conv = fill_store(f"sqlite:///{root}/conv.db", n, tokenizer, with_ids=False)
        ids = fill_store(f"sqlite:///{root}/ids.db", n, tokenizer, with_ids=True)
        import datasets  # noqa: F401  (imported before timing: a one-off second, not per build)

        results["build"] = [
            build_rate(conv, "sft", n),
            build_rate(ids, "sft", n),
            build_rate(conv, "kto", n),
        ]
        for row in results["build"]:
            kind = "token ids" if row["pretokenized"] else "conversations"
            print(
                f"dataset build  {row['method']:<4} {kind:<13} {row['per_s']:>9,.0f} trajectories/s "
                f"({row['rows']} rows in {row['seconds']}s; {row['per_cpu_s']:,.0f} per CPU second)  "
                f"target >= {TARGET_BUILD:,.0f}: "
                f"{'met' if row['per_s'] >= TARGET_BUILD else 'MISSED'}"
            )
        if args.no_sft:
            print("JSON " + json.dumps(results))
            return
        rows = 500 if args.quick else 2000
        results["sft"] = [
            sft_rate(base, conv, root / "sft-conv", rows, pretokenized=False),
            sft_rate(base, ids, root / "sft-ids", rows, pretokenized=True),
        ]
        for row in results["sft"]:
            kind = "token ids" if row["pretokenized"] else "conversations"
            print(
                f"SFT on {device:<4} {kind:<13} {row['tokens_per_s']:>9,.0f} tokens/s "
                f"({row['rows']} rows, {row['tokens']} tokens in {row['seconds']}s)"
            )
        if not args.no_cycle:
            print(
                "one full cycle on the tool-use suite (base model from the cache or warm-started now) ...",
                flush=True,
            )
            cycle = full_cycle(
                root, train_tasks=100 if args.quick else None, heldout_tasks=50 if args.quick else None
            )
            results["cycle"] = cycle
            print(
                f"full cycle: {cycle['cycle_s']}s ({cycle['attempts']} attempts; phases {cycle['phases_s']}); "
                f"base model {cycle['base_model_s']}s, baseline eval {cycle['baseline_eval_s']}s; {cycle['status']}"
            )
    print("JSON " + json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
