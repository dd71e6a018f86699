"""One SFT cycle of the adder model, as every rank of a distributed launch runs it (or one process).

    torchrun --standalone --nproc_per_node 2 tests/distributed_cycle.py STORE_URL OUT_DIR BATCH
    python tests/distributed_cycle.py STORE_URL OUT_DIR BATCH          # the same cycle, one process

The store holds the live version to train; the rows are eight demonstrations (external data), so
both launches train on the same rows: BATCH per device, the global batch being BATCH times the
ranks. Every rank writes its `CycleResult` to OUT_DIR/result-<rank>.json. Run by
`test_cycle_distributed.py`.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch

import honed
from adder_suite import Adder, demonstration
from honed.learn import Cycle, DataConfig, GateConfig, SFTMethod
from honed.learn.cycle import local_chat_model
from honed.learn.evaluate import suite_agent

NAME = "adder"
SUMS = [(2, 3), (4, 1), (5, 2), (1, 1), (3, 3), (6, 2), (7, 1), (2, 2)]


def demonstrations() -> list[dict]:
    """The adder demonstration with other numbers: eight different rows."""
    rows = []
    for a, b in SUMS:
        row = copy.deepcopy(demonstration())
        user, call, result, answer = row["messages"]
        user["content"] = f"What is {a} plus {b}?"
        call["tool_calls"][0]["function"]["arguments"] = json.dumps({"a": a, "b": b})
        result["content"] = str(a + b)
        answer["content"] = f"The sum is {a + b}."
        rows.append(row)
    return rows


def main(store_url: str, out_dir: str, batch: int) -> None:
    torch.set_num_threads(1)
    store = honed.open_store(store_url)
    suite = Adder()
    method = SFTMethod(
        num_train_epochs=2, learning_rate=1e-3, lr_scheduler_type="constant", per_device_train_batch_size=batch,
        use_cpu=True, activation_checkpointing=False,  # the shared-prefix loss, across ranks too
    )  # fmt: skip
    cycle = Cycle(
        store,
        model=NAME,
        method=method,
        agent=lambda model: suite_agent(suite, model, store=store),
        verifiers=suite.verifiers(),
        heldout=suite.heldout,
        data=DataConfig(agent=NAME, external=demonstrations(), external_ratio=1.0, min_new_verified=0),
        gate=GateConfig(samples=1, temperature=0.0),
        chat_model=local_chat_model(max_tokens=48),
        output_dir=Path(out_dir) / "models",
    )
    result = cycle.run()
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), **result.to_dict()}
    (Path(out_dir) / f"result-{rank}.json").write_text(json.dumps(record, default=str))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
