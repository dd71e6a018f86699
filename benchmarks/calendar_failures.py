"""The user-written calendar suite (`tests/calendar_suite.py`) through the loop, with its failures
sorted by kind: why it learns or does not.

    PYTHONPATH=tests .venv/bin/python benchmarks/calendar_failures.py [--cycles 3] [--lr 1e-4] [--epochs 4]

Runs `honed.demo.loop.LearningLoop` on the calendar suite with the demo's sizes (80 train tasks x 4
attempts, 40 held-out x 8 samples at T=1), every candidate promoted (`measure_candidate`, as the
learning benchmark does) so the curve shows what the data does; the gate's decision is printed.
After each cycle it sorts the live version's held-out attempts by what their last `book` call got
wrong (the goal-state check says only pass or fail): `right`, `wrong-person`, `wrong-day`,
`busy` (a taken hour), `free-before` (a free hour before the asked one), `free-later` (a free hour
after the first one), `no-book`. Prints one JSON line per cycle. Asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))


def failure_kinds(store: Any, version: str) -> dict[str, float]:
    """The share of each kind of outcome among `version`'s held-out attempts."""
    from calendar_suite import busy_hours

    kinds: collections.Counter[str] = collections.Counter()
    for t in store.trajectories(limit=None, split="heldout", model_version=version):
        meta = t.metadata or {}
        books = [s for s in t.tool_steps() if s.name == "book" and isinstance(s.input, dict)]
        if not books:
            kinds["no-book"] += 1
            continue
        args = books[-1].input
        try:
            hour = int(args.get("hour"))
        except (TypeError, ValueError):
            kinds["bad-hour"] += 1
            continue
        if args.get("day") != meta.get("day"):
            kinds["wrong-day"] += 1
        elif args.get("person") != meta.get("person"):
            kinds["wrong-person"] += 1
        elif hour == meta.get("hour"):
            kinds["right"] += 1
        elif hour in busy_hours(meta["day"]):
            kinds["busy"] += 1
        else:
            kinds["free-before" if hour < meta["hour"] else "free-later"] += 1
    total = sum(kinds.values()) or 1
    return {k: round(v / total, 3) for k, v in sorted(kinds.items())}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None, help="SFT learning rate (default: the demo's)")
    parser.add_argument("--epochs", type=int, default=None, help="SFT epochs (default: the demo's)")
    args = parser.parse_args()

    from learning import measure_candidate

    import honed
    from calendar_suite import SUITE
    from honed.demo.loop import LearningLoop, demo_method

    fields = {
        k: v for k, v in (("learning_rate", args.lr), ("num_train_epochs", args.epochs)) if v is not None
    }
    with tempfile.TemporaryDirectory(prefix="honed-calendar-") as tmp:
        store = honed.open_store(f"sqlite:///{tmp}/store.db")
        loop = LearningLoop(
            SUITE, store, cycles=args.cycles, seed=args.seed, method=demo_method("sft", **fields),
            train_tasks=80, heldout_tasks=40, greedy=True, workdir=tmp,
        )  # fmt: skip
        for result in loop:
            result = measure_candidate(store, result)
            row = result.to_dict()
            print(json.dumps({
                "cycle": row["cycle"], "pass_at_1": row["heldout_pass_at_1"], "pass_at_8": row["pass_at_8"],
                "greedy": result.extra.get("greedy_pass_at_1"), "train_pass_rate": row["train_pass_rate"],
                "gate": (row.get("decision") or {}).get("promote"), "rows": (row.get("data") or {}).get("rows"),
                "steps": (row.get("metrics") or {}).get("steps"), "reason": row["reason"],
                "kinds": failure_kinds(store, row["version"]),
            }), flush=True)  # fmt: skip
        store.close()


if __name__ == "__main__":
    main()
