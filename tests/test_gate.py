"""The promotion gate: better by the margin with confidence, no slice regression, no collapse."""

from __future__ import annotations

import random

from honed.learn.evaluate import Scores, pass_at_k
from honed.learn.gate import decide, paired_gain


def scores(
    rates: dict[str, float], samples: int = 8, slices: dict[str, str] | None = None, **div: float
) -> Scores:
    per_task = {t: [i < round(r * samples) for i in range(samples)] for t, r in rates.items()}
    diversity = {"distinct_answers": 0.9, "distinct_tool_calls": 0.9} | div
    return Scores(per_task=per_task, slices=slices or {}, diversity=diversity)


def tasks(n: int, seed: int, mean: float) -> dict[str, float]:
    rng = random.Random(seed)
    return {f"t{i}": min(1.0, max(0.0, rng.gauss(mean, 0.25))) for i in range(n)}


def test_a_clearly_better_candidate_is_promoted() -> None:
    live = scores(tasks(100, 0, 0.3))
    better = scores({t: min(1.0, r + 0.2) for t, r in live.task_rates().items()})
    decision = decide(better, live, margin=0.02)
    assert decision.promote, decision.reason
    assert decision.gain > 0.15 and decision.lower_bound > 0
    # The reason states both scores, the gain, the task count and the bound, as measured.
    expected = (
        f"held-out pass@1 {live.pass_at_1:.3f} -> {better.pass_at_1:.3f} ({decision.gain:+.3f} over 100 "
        f"tasks, 95% lower bound {decision.lower_bound:+.3f})"
    )
    assert decision.reason == expected


def test_a_worse_or_equal_candidate_is_rejected_with_the_reason() -> None:
    live = scores(tasks(100, 1, 0.4))
    worse = scores({t: max(0.0, r - 0.1) for t, r in live.task_rates().items()})
    decision = decide(worse, live)
    assert not decision.promote and "below the margin" in decision.reason
    assert decision.setback and decision.to_dict()["setback"] is True  # worse: the next step is smaller
    same = decide(scores(dict(live.task_rates())), live)
    assert not same.promote and not same.setback


def test_noise_is_not_confidence() -> None:
    # Half the tasks up a lot, half down nearly as much: the mean gain clears the margin, the bound does not.
    live = scores({f"t{i}": 0.5 for i in range(10)})
    noisy = scores({f"t{i}": 1.0 if i < 6 else 0.0 for i in range(10)})  # mean gain +0.1
    gain, lower, n = paired_gain(noisy, live)
    assert n == 10 and gain > 0.02 and lower <= 0
    decision = decide(noisy, live)
    assert not decision.promote and "not confidently better" in decision.reason
    assert not decision.setback  # short of evidence, not worse


def test_a_regressing_slice_blocks_promotion() -> None:
    slices = {f"t{i}": ("convert" if i < 20 else "arith") for i in range(100)}
    live = scores({f"t{i}": 0.5 for i in range(100)}, slices=slices)
    candidate = scores({f"t{i}": (0.25 if i < 20 else 1.0) for i in range(100)}, slices=slices)
    decision = decide(candidate, live)
    assert decision.gain > 0.3 and not decision.promote and decision.setback
    assert "slice 'convert' regresses 0.500 -> 0.250" in decision.reason


def test_a_slice_that_dips_by_sampling_alone_does_not_block_a_confident_gain() -> None:
    # The calendar suite's case: 40 tasks in hour-slices of ~5; the candidate is confidently better
    # overall while one small slice's mean falls by 0.1 through two tasks that went down and three
    # that went up (not a confident drop over its 5 tasks).
    slices = {f"t{i}": ("from-14" if i < 5 else "rest") for i in range(40)}
    live = scores({f"t{i}": 0.5 for i in range(40)}, slices=slices)
    dips = {"t0": 0.0, "t1": 0.0, "t2": 0.75, "t3": 0.75, "t4": 0.5}  # mean 0.4: -0.1 on the slice
    candidate = scores({f"t{i}": dips.get(f"t{i}", 0.75) for i in range(40)}, slices=slices)
    assert live.per_slice()["from-14"] - candidate.per_slice()["from-14"] > 0.05
    decision = decide(candidate, live)
    assert decision.promote, decision.reason
    # A fall on every task of the slice, beyond what sampling explains, is a regression, and blocks.
    # (One sample in 8 fewer on each of 5 tasks is not: 5 passes of 40; it blocked while the bound
    # took tasks that moved alike for certainty.)
    steady = scores({f"t{i}": 0.125 if i < 5 else 0.75 for i in range(40)}, slices=slices)
    blocked = decide(steady, live)
    assert not blocked.promote
    assert (
        "slice 'from-14' regresses 0.500 -> 0.125 (more than 0.05, confidently over its 5 tasks)"
        in blocked.reason
    )
    one_sample_less = scores({f"t{i}": 0.375 if i < 5 else 0.75 for i in range(40)}, slices=slices)
    assert decide(one_sample_less, live).promote


def test_collapsed_outputs_block_promotion() -> None:
    live = scores(tasks(50, 2, 0.3))
    collapsed = scores({t: min(1.0, r + 0.3) for t, r in live.task_rates().items()}, distinct_answers=0.1)
    decision = decide(collapsed, live)
    assert not decision.promote and "diversity collapsed: distinct_answers 0.900 -> 0.100" in decision.reason
    assert decision.setback


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    assert pass_at_k({"a": [True] + [False] * 7}, 1) == 1 / 8
    assert pass_at_k({"a": [True] + [False] * 7}, 8) == 1.0
    assert abs(pass_at_k({"a": [True, True] + [False] * 6}, 2) - (1 - (6 * 5) / (8 * 7))) < 1e-12
    assert pass_at_k({"a": [False] * 8, "b": [True] * 8}, 8) == 0.5


def test_an_equal_candidate_is_promoted_at_most_at_the_stated_rate_however_few_the_tasks() -> None:
    """A QA pass (session 14) measured the normal bound promoting an equal candidate in 14% of
    cycles at 3 held-out tasks, 10% at 4 x 1 sample, 7% at 10; two tasks both won on one sample
    each promoted with a lower bound of +1. Student's t and the rates' own sampling variance."""
    from honed.learn.gate import t_quantile

    assert [round(t_quantile(0.95, df), 3) for df in (1, 2, 10, 39)] == [6.314, 2.92, 1.812, 1.685]
    assert not decide(
        scores({"a": 1.0, "b": 1.0}, samples=1), scores({"a": 0.0, "b": 0.0}, samples=1)
    ).promote
    rng = random.Random(7)

    def draw(p: list[float], samples: int) -> Scores:
        return Scores(per_task={f"t{i}": [rng.random() < q for _ in range(samples)] for i, q in enumerate(p)})

    for n_tasks, samples in ((3, 8), (4, 1), (10, 8)):
        promoted = 0
        for _ in range(1500):
            p = [rng.random() for _ in range(n_tasks)]
            promoted += decide(draw(p, samples), draw(p, samples)).promote
        assert promoted / 1500 <= 0.05, (n_tasks, samples, promoted / 1500)


def test_a_round_that_scored_nothing_is_no_setback_and_zero_samples_are_refused() -> None:
    """A QA pass (session 19): `honed train --samples 0` trained a candidate, scored no task, and
    the empty comparison counted as a setback, halving every later cycle's learning rate."""
    import pytest

    from honed.learn.cycle import GateConfig

    empty = decide(Scores(per_task={}, slices={}, diversity={}), scores(tasks(10, 0, 0.3)))
    assert not empty.promote and not empty.setback and "no held-out task was scored" in empty.reason
    for bad in ({"samples": 0}, {"samples": -2}, {"margin": -5.0}, {"confidence": 1.0}):
        with pytest.raises(ValueError):
            GateConfig(**bad)


def test_the_lower_bound_of_a_gain_is_never_below_minus_one() -> None:
    """A QA pass (session 19): with few tasks the gate said "95% lower bound -2.073" for a
    difference of pass rates, which lies in [-1, 1]."""
    live = scores({"t0": 1.0, "t1": 0.0, "t2": 1.0}, samples=1)
    candidate = scores({"t0": 0.0, "t1": 1.0, "t2": 0.0}, samples=1)
    decision = decide(candidate, live)
    assert decision.lower_bound == -1.0 and "lower bound -1.000" in decision.reason, decision.reason


def test_attempts_only_an_untrusted_verifier_judged_are_unjudged() -> None:
    """A QA pass (session 20): with the gate's only verifier under its audited minimum precision,
    its passes counted for nothing and every candidate scored 0.000 -> 0.000, "rejected"; no
    trusted verifier judged those attempts: the round is not measured."""
    from honed import Trajectory, Verdict
    from honed.learn.evaluate import score
    from honed.trajectory import Task

    tasks = [Task("t1", "2+2?"), Task("t2", "3+3?")]
    runs = [
        Trajectory(id=f"r{i}", agent="a", task_id=t.id, verdicts=[Verdict(passed=True, verifier="reference")])
        for i, t in enumerate(tasks)
    ]
    trusted = score(runs, tasks, samples=1)
    assert trusted.unjudged == 0 and trusted.pass_at_1 == 1.0 and trusted.measured
    untrusted = score(runs, tasks, samples=1, untrusted={"reference"})
    assert untrusted.unjudged == 2 and not untrusted.measured
    runs[0].verdicts.append(Verdict(passed=True, verifier="human"))  # a trusted judgement of one of them
    assert score(runs, tasks, samples=1, untrusted={"reference"}).unjudged == 1
