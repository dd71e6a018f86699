"""The learning benchmark: the seed's claims, measured side by side with the same budget and seeds.

    .venv/bin/python benchmarks/learning.py               # arms a,a0,b,c,g,d,e, seeds 0 1 2, 5 cycles
    .venv/bin/python benchmarks/learning.py --arms a,g --suite extraction   # a second bundled suite
    .venv/bin/python benchmarks/learning.py --arms a,b --seeds 0 --cycles 2 --train-tasks 120
    .venv/bin/python benchmarks/learning.py --parallel 2                # two runs at a time
    .venv/bin/python benchmarks/learning.py --resume                    # continue a stopped run

Arms (each runs `honed.demo.loop.LearningLoop` on the same suite, base model and seeds):
  (a)  verified rejection-sampling SFT learning from the whole lineage (the demo's loop, the default
       `DataConfig(versions="lineage", newest_weight=2)`: experience accumulates across cycles, the
       live version's own rows counted twice);
  (a1) (a) with the live version's rows counted once (`newest_weight=1`, the default until
       2026-12-05: its rows in earlier result files are labelled (a); session 11's (w) is today's (a));
  (a0) (a) learning from the live version's runs only (`versions="live"`);
  (b)  the same loop training on every attempt, unverified;
  (c)  the training attempts labelled by a verifier with 20% false positives (a failing attempt
       is called a pass with probability 0.2); held-out figures still use the true verifier;
  (g)  off-policy policy gradient on the captured attempts (`OffPolicyMethod`: passes as SFT,
       failures down with the ratio against the recorded logprobs truncated at 1);
  (d)  DPO on same-task (pass, failure) pairs (`--dpo-lr`);
  (e)  (a) without the external-data mix (no demonstrations in the training sets);
  (t)  (a) with demonstrations only for tasks that never pass (`external_for="stuck"`);
  (s)  (a), each candidate trained from the base model on the accumulated data (`start="base"`,
       as STaR restarts) instead of from the live version;
  (k)  KTO from verified passes and failures;
  (f)  GRPO with the verifiers as reward (10 steps a cycle at 1e-5: what fits a CPU budget).
Every arm promotes every candidate (`measure_candidate`: this harness promotes what the gate
rejected, never the product) so the curve shows what its training data does; the gate still runs
and its decision is recorded, which is how "the gate never promotes a
version that is worse on the held-out set" is checked: for every cycle, did the gate say promote
while the candidate's held-out pass@1 was below the live version's?

Prints, per arm and cycle, held-out pass@1 (sampled: the mean of 8 samples at temperature 1), mean
± standard deviation over seeds, with pass@8 and greedy pass@1 beside it; the gate's decision per
cycle and seed; the targets; writes JSON and an SVG plot.
Asserts nothing (machines are noisy); not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ARMS = {
    "a": "verified RS-SFT, lineage",
    "a1": "(a), the live version's rows once",
    "a0": "verified RS-SFT, live version only",
    "b": "unverified SFT",
    "c": "verifier with 20% false positives",
    "g": "off-policy (tapered PG on attempts)",
    "d": "DPO on pass/fail pairs",
    "e": "(a) without external data",
    "t": "(a), demonstrations for stuck tasks",
    "s": "(a), every cycle from the base weights",
    "k": "KTO (passes and failures)",
    "f": "GRPO (verifier reward)",
}
DEFAULT_ARMS = "a,a0,b,c,g,d,e"


class FalsePositives:
    """Wraps a verifier: a failing verdict becomes a pass with probability `rate` (seeded per
    trajectory, so a re-run labels the same way). Named apart, and deaf to the gate's attempts."""

    trust = "high"

    def __init__(self, inner: Any, rate: float, seed: int) -> None:
        self.inner, self.rate, self.seed = inner, rate, seed
        self.name = f"{getattr(inner, 'name', type(inner).__name__)}-noisy"
        self.version = getattr(inner, "version", "1")

    def applies_to(self, trajectory: Any) -> bool:
        meta = trajectory.metadata or {}
        return meta.get("purpose") != "gate" and self.inner.applies_to(trajectory)

    def verify(self, trajectory: Any) -> Any:
        verdict = self.inner.verify(trajectory)
        if verdict.passed is False and random.Random(f"{self.seed}:{trajectory.id}").random() < self.rate:
            verdict.passed, verdict.score = True, 1.0
            verdict.reason = f"(false positive) {verdict.reason}"
        return verdict

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close:
            close()


def measure_candidate(store: Any, result: Any) -> Any:
    """Promote a candidate the gate rejected, so an arm's curve shows what its data does (the
    measurement arms' switch: it lives here, not in the product's `Cycle`). The gate's decision
    stays recorded with the training run; the row says the gate was overridden."""
    if result.status != "rejected" or result.candidate is None:
        return result
    store.promote(
        result.candidate, reason=f"benchmark: measuring every candidate (the gate rejected: {result.reason})"
    )
    result.version, result.heldout = result.candidate, result.candidate_heldout
    result.extra["gate_overridden"] = True
    return result


def arm_loop(arm: str, suite: Any, store: Any, seed: int, args: argparse.Namespace, workdir: Path) -> Any:
    from honed.demo.loop import LearningLoop, demo_method

    options: dict[str, Any] = {}
    if arm == "a1":
        options["data"] = {"newest_weight": 1}
    elif arm == "a0":
        options["data"] = {"versions": "live"}
    elif arm == "b":
        options["data"] = {"verified": False}
    elif arm == "c":
        noisy = [FalsePositives(v, 0.2, seed) for v in suite.verifiers()]
        options["training_verifiers"] = noisy
        options["data"] = {"verifiers": [v.name for v in noisy]}
    elif arm == "g":
        options["method"] = demo_method("offpolicy", **_lr(args.offpolicy_lr))
    elif arm == "d":
        options["method"] = demo_method("dpo", **_lr(args.dpo_lr))
    elif arm == "k":
        options["method"] = demo_method("kto")
    elif arm == "e":
        options["external_ratio"] = 0.0
    elif arm == "t":
        options["data"] = {"external_for": "stuck"}
    elif arm == "s":
        options["start"] = "base"
    elif arm == "f":
        # What fits a CPU budget: a GRPO step (8 multi-turn completions through TRL's own
        # generation) takes ~20 s here; at the SFT rate of 1e-4 three steps wrecked the model.
        options["method"] = demo_method(
            "grpo",
            suite,
            max_steps=args.grpo_steps,
            max_completion_length=128,
            learning_rate=1e-5,
        )
    return LearningLoop(
        suite,
        store,
        cycles=args.cycles,
        seed=seed,
        attempts=args.attempts,
        train_tasks=args.train_tasks,
        heldout_tasks=args.heldout_tasks,
        greedy=True,
        workdir=workdir,
        **options,
    )


def _lr(value: float | None) -> dict[str, Any]:
    return {} if value is None else {"learning_rate": value}


def _args(args: argparse.Namespace) -> dict[str, Any]:
    """The command line as JSON: paths as text."""
    return {
        k: str(v) if isinstance(v, Path) else [str(p) for p in v] if k == "include" else v
        for k, v in vars(args).items()
    }


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def run_arm(arm: str, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    import honed
    from honed.demo import load_suite

    suite = load_suite(args.suite)
    with tempfile.TemporaryDirectory(prefix=f"honed-learning-{arm}{seed}-") as tmp:
        store = honed.open_store(f"sqlite:///{tmp}/store.db")
        rows = []
        started = time.monotonic()
        for result in arm_loop(arm, suite, store, seed, args, Path(tmp)):
            row = measure_candidate(store, result).to_dict()
            row["greedy_pass_at_1"] = result.extra.get("greedy_pass_at_1")
            gate = result.decision or {}
            row["gate_would_promote"] = gate.get("promote")
            row["arm"], row["seed"] = arm, seed
            rows.append(row)
            print(
                f"  [{arm} seed {seed}] cycle {result.cycle}: pass@1 {result.heldout_pass_at_1:.3f} "
                f"greedy {row['greedy_pass_at_1']} pass@8 {row['pass_at_8']:.3f} "
                f"train {result.train_pass_rate} gate {'promote' if gate.get('promote') else 'reject' if gate else '-'} "
                f"({result.seconds:.0f}s)",
                flush=True,
            )
        store.close()
        print(f"  [{arm} seed {seed}] done in {time.monotonic() - started:.0f}s", flush=True)
        return rows


def summarise(rows: list[dict[str, Any]], arms: list[str], cycles: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        per_cycle = []
        for c in range(cycles + 1):
            at = [r for r in mine if r["cycle"] == c]
            if not at:
                continue

            def stat(key: str, at: list[dict[str, Any]] = at) -> tuple[float, float]:
                vals = [r[key] for r in at if r.get(key) is not None]
                if not vals:
                    return float("nan"), float("nan")
                return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

            per_cycle.append(
                {
                    "cycle": c,
                    "seeds": len(at),
                    "pass_at_1": stat("heldout_pass_at_1"),
                    "greedy": stat("greedy_pass_at_1"),
                    "pass_at_8": stat("pass_at_8"),
                    "train_pass_rate": stat("train_pass_rate"),
                }
            )
        out[arm] = per_cycle
    return out


def gate_check(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Cycles where the gate would have promoted a candidate that measured worse than the live version."""
    by_key = {(r["arm"], r["seed"], r["cycle"]): r for r in rows}
    promoted_worse = checked = 0
    for r in rows:
        if r["cycle"] == 0 or r.get("gate_would_promote") is None:
            continue
        before = by_key.get((r["arm"], r["seed"], r["cycle"] - 1))
        if before is None or r.get("candidate_pass_at_1") is None:
            continue
        checked += 1
        if r["gate_would_promote"] and r["candidate_pass_at_1"] < before["heldout_pass_at_1"]:
            promoted_worse += 1
    return {"cycles_checked": checked, "gate_promoted_worse": promoted_worse}


def print_table(summary: dict[str, Any], cycles: int, rows: list[dict[str, Any]] | None = None) -> None:
    print("\nheld-out pass@1, sampled (mean of 8 at T=1), mean ± sd over seeds [pass@8] {greedy}")
    print(f"{'arm':<44}" + "".join(f"{'cycle ' + str(c):>28}" for c in range(cycles + 1)))
    for arm, per_cycle in summary.items():
        cells = ""
        for p in per_cycle:
            (m, s), (k, _), (g, _) = p["pass_at_1"], p["pass_at_8"], p["greedy"]
            cells += f"{m:>9.3f} ±{s:.3f} [{k:.2f}] {{{g:.2f}}}"
        print(f"({arm}) {ARMS[arm]:<{40 - len(arm)}}{cells}")
    if rows:
        print("\nthe gate's decisions (P promote, R reject, - none), per seed, cycles 1..")
        for arm in summary:
            seeds = sorted({r["seed"] for r in rows if r["arm"] == arm})
            for seed in seeds:
                mine = sorted(
                    (r for r in rows if r["arm"] == arm and r["seed"] == seed), key=lambda r: r["cycle"]
                )
                marks = "".join(
                    "-" if r.get("gate_would_promote") is None else "P" if r["gate_would_promote"] else "R"
                    for r in mine
                    if r["cycle"]
                )
                print(f"({arm}) seed {seed}: {marks}")


def targets(summary: dict[str, Any]) -> list[str]:
    lines = []
    a = summary.get("a")
    if not a:
        return ["(a) not measured: no targets checked"]
    base, last = a[0]["pass_at_1"][0], a[-1]["pass_at_1"][0]
    lines.append(
        f"(a) {base:.3f} -> {last:.3f} after {len(a) - 1} cycles: {100 * (last - base):+.1f} points "
        f"(target >= +30 after 5): {'met' if last - base >= 0.30 and len(a) > 5 else 'MISSED' if len(a) > 5 else 'fewer than 5 cycles'}"
    )
    for arm, want in (("a0", "below (a): accumulation helps"), ("e", "vs (a): what the demonstrations add")):
        if arm in summary and len(summary[arm]) == len(a):
            other = summary[arm][-1]["pass_at_1"][0]
            lines.append(
                f"({arm}) {other:.3f} vs (a) {last:.3f}: {100 * (other - last):+.1f} points ({want})"
            )
    if "g" in summary and len(summary["g"]) == len(a):
        g = summary["g"][-1]["pass_at_1"][0]
        lines.append(
            f"(g) {g:.3f} vs (a) {last:.3f}: {100 * (g - last):+.1f} points (target >= +3): "
            f"{'met' if g - last >= 0.03 else 'MISSED'}"
        )
    if "b" in summary and len(summary["b"]) > 1:
        b = summary["b"]
        b_last = b[-1]["pass_at_1"][0]
        lines.append(
            f"(b) {b[0]['pass_at_1'][0]:.3f} -> {b_last:.3f}: does not improve (target): "
            f"{'met' if b_last <= b[0]['pass_at_1'][0] + 0.05 else 'MISSED'}"
        )
        if "c" in summary and len(summary["c"]) > 1:
            c_last = summary["c"][-1]["pass_at_1"][0]
            lines.append(
                f"(c) {c_last:.3f} between (b) {b_last:.3f} and (a) {last:.3f}: "
                f"{'met' if min(last, b_last) <= c_last <= max(last, b_last) else 'MISSED'}"
            )
    return lines


COLOURS = (
    "#1f77b4", "#17becf", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
)  # fmt: skip


def plot(summary: dict[str, Any], path: Path, width: int = 720, height: int = 420) -> None:
    """Held-out pass@1 per cycle, one line per arm with its spread over seeds, as a standalone SVG."""
    left, right, top, bottom = 56, 250, 20, 46
    cycles = max((len(v) for v in summary.values()), default=1)

    def sx(c: float) -> float:
        return left + (c / max(1, cycles - 1)) * (width - left - right)

    def sy(v: float) -> float:
        return height - bottom - max(0.0, min(1.0, v)) * (height - top - bottom)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        'font-size="12"><rect width="100%" height="100%" fill="#fff"/>'
    ]
    for i in range(6):
        v = i / 5
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#eee"/>'
        )
        out.append(f'<text x="{left - 8}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
    for c in range(cycles):
        out.append(f'<text x="{sx(c):.1f}" y="{height - bottom + 18}" text-anchor="middle">{c}</text>')
    out.append(
        f'<text x="{(left + width - right) / 2:.1f}" y="{height - 8}" text-anchor="middle">cycle (0 = base model)</text>'
        f'<text transform="translate(16 {(top + height - bottom) / 2:.1f}) rotate(-90)" text-anchor="middle">'
        "held-out pass@1 (mean of 8 at T=1)</text>"
    )
    for n, (arm, per_cycle) in enumerate(summary.items()):
        colour = COLOURS[n % len(COLOURS)]
        points = [(p["cycle"], *p["pass_at_1"]) for p in per_cycle if p["pass_at_1"][0] == p["pass_at_1"][0]]
        if not points:
            continue
        d = " ".join(f"{'M' if i == 0 else 'L'}{sx(c):.1f} {sy(m):.1f}" for i, (c, m, _) in enumerate(points))
        out.append(f'<path d="{d}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for c, m, spread in points:
            out.append(
                f'<line x1="{sx(c):.1f}" x2="{sx(c):.1f}" y1="{sy(m - spread):.1f}" y2="{sy(m + spread):.1f}" '
                f'stroke="{colour}"/><circle cx="{sx(c):.1f}" cy="{sy(m):.1f}" r="3.5" fill="{colour}"/>'
            )
        y = top + 16 + 18 * n
        out.append(
            f'<line x1="{width - right + 14}" x2="{width - right + 34}" y1="{y - 4}" y2="{y - 4}" stroke="{colour}" '
            f'stroke-width="2"/><text x="{width - right + 40}" y="{y}">({arm}) {ARMS[arm]}</text>'
        )
    out.append("</svg>")
    path.write_text("".join(out))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--suite", default="tool_use")
    parser.add_argument("--attempts", type=int, default=4)
    parser.add_argument("--train-tasks", type=int, default=None)
    parser.add_argument("--heldout-tasks", type=int, default=None)
    parser.add_argument("--grpo-steps", type=int, default=10)
    parser.add_argument(
        "--offpolicy-lr", type=float, default=None, help="(g)'s learning rate (default: the demo's)"
    )
    parser.add_argument(
        "--dpo-lr", type=float, default=None, help="(d)'s learning rate (default: the demo's)"
    )
    parser.add_argument("--parallel", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--resume", action="store_true", help="keep the finished runs in --out, do the rest")
    parser.add_argument(
        "--include", type=Path, nargs="*", default=[], help="result files whose other arms join the summary"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/learning[-SUITE].json"
    )
    args = parser.parse_args()
    if args.out is None:
        tail = "" if args.suite == "tool_use" else f"-{args.suite.replace(':', '-').replace('.', '-')}"
        args.out = Path(f"benchmarks/results/learning{tail}.json")
    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(ARMS)
    if unknown:
        sys.exit(f"unknown arms {sorted(unknown)}; choose from {sorted(ARMS)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if args.resume and args.out.exists():  # keep the runs a stopped benchmark finished
        done = json.loads(args.out.read_text())["rows"]
        complete = {
            key
            for key in {(r["arm"], r["seed"]) for r in done}
            if sum((r["arm"], r["seed"]) == key for r in done) == args.cycles + 1
        }
        rows = [r for r in done if (r["arm"], r["seed"]) in complete]
        print(f"resuming: {len(complete)} runs already done", flush=True)
    started = time.monotonic()
    finished = {(r["arm"], r["seed"]) for r in rows}
    # Arm by arm, in the order given: a stopped run leaves whole arms behind it.
    jobs = [(arm, seed) for arm in arms for seed in args.seeds if (arm, seed) not in finished]
    # Each run in a fresh interpreter (spawned): runs share no served model, store or torch state.
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        args.parallel, mp_context=context, initializer=_threads, initargs=(threads,), max_tasks_per_child=1
    ) as pool:
        futures = {pool.submit(run_arm, arm, seed, args): (arm, seed) for arm, seed in jobs}
        for future in as_completed(futures):
            arm, seed = futures[future]
            try:
                rows.extend(future.result())
            except Exception as exc:  # one arm failing must not lose the others' figures
                print(f"  [{arm} seed {seed}] FAILED: {type(exc).__name__}: {exc}", flush=True)
            rows.sort(key=lambda r: (r["arm"], r["seed"], r["cycle"]))
            args.out.write_text(json.dumps({"args": _args(args), "rows": rows}, indent=1))
    for extra in args.include:  # runs made apart (e.g. an arm measured in another session)
        more = [r for r in json.loads(extra.read_text())["rows"] if r["arm"] not in arms]
        rows.extend(more)
        arms += sorted({r["arm"] for r in more} - set(arms))
    summary = summarise(rows, arms, args.cycles)
    print_table(summary, args.cycles, rows)
    check = gate_check(rows)
    print(
        f"\ngate: would have promoted a worse candidate in {check['gate_promoted_worse']} of {check['cycles_checked']} cycles"
    )
    for line in targets(summary):
        print(line)
    payload = {"args": _args(args), "rows": rows, "summary": summary, "gate": check}
    args.out.write_text(json.dumps(payload, indent=1))
    svg = args.out.with_suffix(".svg")
    plot(summary, svg)
    print(f"plot: {svg}")
    print(f"wrote {args.out} ({time.monotonic() - started:.0f}s)")
    print("JSON " + json.dumps({"summary": summary, "gate": check}))


if __name__ == "__main__":
    main()
