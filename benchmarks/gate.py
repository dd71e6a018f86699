"""The promotion gate's error rates: how often it promotes an equal candidate, and how often a
better one, by the number of held-out tasks and samples, beside the normal-approximation bound
it used before (2026-12-06).

    .venv/bin/python benchmarks/gate.py [--trials 4000] [--seed 1]

Each trial draws a task difficulty p ~ U(0, 1) per held-out task (U(0, 0.8) for the better
candidates) and samples both versions' outcomes from it, the candidate at p + delta; the gate
(`honed.learn.gate.decide`, its defaults: margin 0.02, 95%) decides. Pure Python, seconds.
Asserts nothing; not part of the test suite.
"""

from __future__ import annotations

import argparse
import math
import random
from statistics import NormalDist

from honed.learn.evaluate import Scores
from honed.learn.gate import decide


def normal_bound_promotes(candidate: Scores, live: Scores, margin: float = 0.02) -> bool:
    """The rule before: mean per-task gain, normal quantile, the spread of the differences only."""
    c, b = candidate.task_rates(), live.task_rates()
    diffs = [c[t] - b[t] for t in c]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean >= margin and mean - NormalDist().inv_cdf(0.95) * math.sqrt(var / n) > 0


def rates(tasks: int, samples: int, delta: float, trials: int, seed: int) -> tuple[float, float]:
    rng = random.Random(seed)
    top = 1.0 if delta == 0 else 0.8

    def draw(ps: list[float], shift: float) -> Scores:
        per_task = {
            f"t{i}": [rng.random() < min(1.0, p + shift) for _ in range(samples)] for i, p in enumerate(ps)
        }
        return Scores(per_task=per_task)

    now = before = 0
    for _ in range(trials):
        ps = [rng.random() * top for _ in range(tasks)]
        candidate, live = draw(ps, delta), draw(ps, 0.0)
        now += decide(candidate, live).promote
        before += normal_bound_promotes(candidate, live)
    return now / trials, before / trials


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"{'tasks x samples':>16} {'candidate':>12} {'promoted now':>13} {'normal bound':>13}")
    for tasks, samples, delta in (
        (3, 8, 0.0), (4, 2, 0.0), (4, 1, 0.0), (6, 8, 0.0), (10, 8, 0.0), (40, 8, 0.0), (50, 8, 0.0),
        (40, 8, 0.05), (40, 8, 0.1), (40, 8, 0.2), (10, 8, 0.2), (6, 8, 0.3),
    ):  # fmt: skip
        now, before = rates(tasks, samples, delta, args.trials, args.seed)
        what = "equal" if delta == 0 else f"+{delta:.2f}"
        print(f"{f'{tasks} x {samples}':>16} {what:>12} {now:>13.3f} {before:>13.3f}")


if __name__ == "__main__":
    main()
