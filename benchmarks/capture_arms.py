"""Agent-overhead arms of `capture.py` side by side, optionally for two versions of honed.

    .venv/bin/python benchmarks/capture_arms.py [--rounds 6] [--arms none,honed-middleware,...]
        [--src base=/tmp/base/src --src new=src]

Each measurement is `capture.py --arm NAME --quick` in a fresh interpreter (5 warm-up + 40 timed
invocations). Rounds interleave the arms, reversing the order every other round, and every ratio
is the median over rounds of the arm's figure divided by `none`'s in the same round: on a shared
machine the load moves both alike. `none` and the diagnostic arms run on the first `--src`;
the honed arms run once per `--src`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CAPTURE = Path(__file__).with_name("capture.py")
HONED_ARMS = ("honed-middleware", "honed-instrument", "honed-deferred")


def run_arm(arm: str, src: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=src)
    out = subprocess.run(
        [sys.executable, str(CAPTURE), "--arm", arm, "--quick"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = [x for x in out.splitlines() if x.startswith("BENCH-RESULT ")][-1]
    result = json.loads(line.removeprefix("BENCH-RESULT "))
    return {
        "wall": statistics.median(result["times"]),
        "agent_cpu": statistics.median(result["thread_cpu"]),
        "all_cpu": result["cpu_per_invocation_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--arms", default="none,noop-middleware,honed-instrument,honed-middleware")
    parser.add_argument("--src", action="append", help="LABEL=PATH of a honed src tree (default: src)")
    args = parser.parse_args()
    srcs = dict(s.split("=", 1) for s in args.src or [f"src={Path(__file__).parent.parent / 'src'}"])
    first = next(iter(srcs))
    cells = [(a, label) for a in args.arms.split(",") for label in (srcs if a in HONED_ARMS else [first])]
    if ("none", first) not in cells:
        cells.insert(0, ("none", first))
    figures: dict[tuple[str, str], list[dict[str, float]]] = {c: [] for c in cells}
    for n in range(args.rounds):
        for arm, label in cells if n % 2 == 0 else cells[::-1]:
            figures[(arm, label)].append(run_arm(arm, srcs[label]))
    base = figures[("none", first)]
    print(
        f"{'arm':18} {'src':6} {'wall ms':>8} {'x':>6} {'agent cpu ms':>12} {'x':>6} {'all cpu ms':>10} {'x':>6}"
    )
    for (arm, label), rounds in figures.items():
        row = [f"{arm:18} {label:6}"]
        for key in ("wall", "agent_cpu", "all_cpu"):
            median = statistics.median(r[key] for r in rounds)
            ratio = statistics.median(r[key] / b[key] for r, b in zip(rounds, base, strict=True))
            row.append(f"{median * 1e3:8.2f} {ratio:6.3f}")
        print(" ".join(row))


if __name__ == "__main__":
    main()
