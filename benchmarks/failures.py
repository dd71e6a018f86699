"""What learning from failures does to the tokens that passes and failures share.

    .venv/bin/python benchmarks/failures.py                      # tool_use, 40 train tasks x 4 attempts
    .venv/bin/python benchmarks/failures.py --methods kto,offpolicy --tasks 20

The warm-started base model (`honed.demo.base_model`) attempts train tasks through the real agent
(`LocalChatModel` at temperature 1, captured into a store, labelled by the suite's verifiers). Each
method then trains once on those attempts with the demo's recipe, from the same base, and the
change in log-probability of every sampled token is measured, in four classes:

- pass, shared: a pass's token that a failure of the same task also sampled in the same context
  (the same prompt and the same completion so far): tool-call syntax, the opening of an answer;
- pass, own: a pass's token after it diverged from every failure of its task;
- fail, shared / fail, own: the same for the failures' tokens.

Methods: the demo's recipes (`honed.demo.loop.RECIPES`); `kto` is honed's (a failure's loss only
after it diverged from a pass), `kto-plain` TRL's KTO scoring the whole completion.

A method that learns from failures well raises "pass, own", lowers "fail, own" and leaves the shared
tokens alone, whose context says nothing about the verdict. Also printed: how far the trainer's
log-probabilities of the recorded tokens are from the ones recorded at sampling (the off-policy
method's ratio at its first step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

CLASSES = ("pass, shared", "pass, own", "fail, shared", "fail, own")


def capture(suite: Any, base: Path, store: Any, name: str, tasks: int, attempts: int) -> list[Any]:
    """The base model's verified attempts at the first `tasks` train tasks."""
    from honed.learn.evaluate import attempt, suite_agent, verify_round
    from honed.serving.local import LocalChatModel

    version = store.register_model(name, base, reason="base")
    store.promote(name, version.version, expected_live=None)
    chat = LocalChatModel(base, model_version=version.ref, temperature=1.0, max_tokens=suite.max_tokens)
    agent = suite_agent(suite, chat, store=store, name=name)
    chosen = list(suite.train)[:tasks]
    tag = attempt(agent, chosen, samples=attempts)
    found = verify_round(store, suite.verifiers(), tag, expected=len(chosen) * attempts)
    chat.close()
    return store.trajectories(None, ids=[t.id for t in found])


def token_classes(trajectories: list[Any]) -> list[tuple[list[int], list[int], list[float], list[str]]]:
    """Per model call of a labelled attempt: (prompt ids, completion ids, recorded logprobs, the
    class of each completion token)."""
    from honed.trajectory import label

    labelled = [(t, label(t.verdicts)) for t in trajectories]
    by_task: dict[str, list[tuple[Any, bool]]] = defaultdict(list)
    for t, passed in labelled:
        if passed is not None and t.task_id:
            by_task[t.task_id].append((t, passed))
    out = []
    for group in by_task.values():
        # Completion prefixes seen per (prompt, label): a token is shared when the other label's
        # attempts sampled the same prefix after the same prompt.
        prefixes: dict[bool, set[tuple[tuple[int, ...], tuple[int, ...]]]] = {True: set(), False: set()}
        calls = []
        for t, passed in group:
            for step in t.model_steps():
                prompt, completion = step.extra["prompt_token_ids"], step.extra["token_ids"]
                calls.append((prompt, completion, step.extra["logprobs"], passed))
                for i in range(1, len(completion) + 1):
                    prefixes[passed].add((tuple(prompt), tuple(completion[:i])))
        for prompt, completion, logprobs, passed in calls:
            kinds = []
            for i in range(1, len(completion) + 1):
                shared = (tuple(prompt), tuple(completion[:i])) in prefixes[not passed]
                kinds.append(f"{'pass' if passed else 'fail'}, {'shared' if shared else 'own'}")
            out.append((prompt, completion, logprobs, kinds))
    return out


def logprobs(model: Any, prompt: list[int], completion: list[int]) -> list[float]:
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()


def measure(model: Any, calls: list[Any]) -> list[list[float]]:
    return [logprobs(model, prompt, completion) for prompt, completion, _, _ in calls]


def shifts(
    before: list[list[float]], after: list[list[float]], calls: list[Any]
) -> dict[str, dict[str, float]]:
    """Mean change of log-probability per token, per class; and per attempt-call, of the sum."""
    per: dict[str, list[float]] = defaultdict(list)
    for b, a, (_, _, _, kinds) in zip(before, after, calls, strict=True):
        for x, y, kind in zip(b, a, kinds, strict=True):
            per[kind].append(y - x)
    return {
        kind: {
            "tokens": len(per[kind]),
            "mean_change": round(statistics.fmean(per[kind]), 4) if per[kind] else None,
        }
        for kind in CLASSES
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", default="tool_use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", type=int, default=40)
    parser.add_argument("--attempts", type=int, default=4)
    parser.add_argument(
        "--methods", default="sft,kto,kto-plain,dpo,offpolicy", help="kto-plain: TRL's KTO as is"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/failures.json"))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    import honed
    from honed.demo import base_model, load_suite
    from honed.demo.loop import demo_method
    from honed.learn.datasets import prepare
    from honed.learn.methods import NothingToLearn

    suite = load_suite(args.suite)
    base = base_model(suite, seed=args.seed)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="honed-failures-") as tmp:
        store = honed.open_store(f"sqlite:///{tmp}/store.db")
        started = time.monotonic()
        trajectories = capture(suite, base, store, f"{suite.name}-agent", args.tasks, args.attempts)
        calls = token_classes(trajectories)
        counts = {"attempts": len(trajectories), "model_calls": len(calls)}
        counts["passed"] = sum(1 for t in trajectories if any(v.passed for v in t.verdicts))
        print(f"captured {counts} in {time.monotonic() - started:.0f}s", flush=True)
        reference = AutoModelForCausalLM.from_pretrained(base).eval()
        before = measure(reference, calls)
        # The recorded logprobs against the trainer's: the off-policy ratio at its first step.
        gaps = [
            abs(x - r)
            for b, (_, _, rec, _) in zip(before, calls, strict=True)
            for x, r in zip(b, rec, strict=True)
        ]
        counts["recorded_vs_trainer_logprob_max_abs"] = round(max(gaps), 6)
        counts["recorded_vs_trainer_logprob_mean_abs"] = round(statistics.fmean(gaps), 7)
        results["captured"] = counts
        print(json.dumps(counts), flush=True)
        for name in [m for m in args.methods.split(",") if m]:
            kind, extra = ("kto", {"after_divergence": False}) if name == "kto-plain" else (name, {})
            method = demo_method(kind, suite, **extra)
            try:
                data = prepare(store, kind, seed=args.seed)
                started = time.monotonic()
                trained = method.train(base, data, Path(tmp) / name, seed=args.seed)
            except NothingToLearn as exc:
                results[name] = {"nothing_to_learn": exc.reason}
                continue
            after = measure(AutoModelForCausalLM.from_pretrained(trained.path).eval(), calls)
            results[name] = {
                "rows": len(data),
                "train_s": round(time.monotonic() - started, 1),
                "recipe": method.config()["chosen"],
                "shift": shifts(before, after, calls),
                "metrics": trained.metrics,
            }
            print(f"{name}: {json.dumps(results[name]['shift'])}", flush=True)
        store.close()
    print("\nmean change of log-probability per sampled token (after - before)")
    print(f"{'method':<12}" + "".join(f"{c:>16}" for c in CLASSES))
    for name in [m for m in args.methods.split(",") if m]:
        shift = results.get(name, {}).get("shift")
        if shift:
            print(f"{name:<12}" + "".join(f"{shift[c]['mean_change']:>16}" for c in CLASSES))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
