"""Reliability: Wilson intervals, audits against human labels, training policies, and the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import honed
from honed.cli import app
from honed.trajectory import Verdict, label
from honed.verifiers import Judge, ReferenceMatch, Worker, confusion, wilson
from verifier_helpers import FakeJudgeModel, traj

runner = CliRunner(env={"COLUMNS": "200"})


def test_wilson_interval_matches_known_values() -> None:
    half = wilson(5, 10)
    assert half is not None and (half.value, round(half.low, 4), round(half.high, 4)) == (0.5, 0.2366, 0.7634)
    none = wilson(0, 10)
    assert none is not None and none.low == 0.0 and round(none.high, 4) == 0.2775
    everything = wilson(10, 10)
    assert everything is not None and round(everything.low, 4) == 0.7225 and everything.high == 1.0
    assert wilson(0, 0) is None
    tight = wilson(950, 1000)
    assert tight is not None and tight.high - tight.low < 0.03


def test_confusion_counts_and_undecided() -> None:
    pairs = (
        [(True, True)] * 6
        + [(True, False)] * 2
        + [(False, True)]
        + [(False, False)] * 3
        + [(None, True), (True, None)]
    )
    result = confusion(pairs, verifier="v", version="1", gold="human")
    assert (result.tp, result.fp, result.fn, result.tn, result.undecided, result.n) == (6, 2, 1, 3, 2, 12)
    assert result.precision is not None and result.precision.value == 0.75
    assert result.recall is not None and result.recall.value == pytest.approx(6 / 7)
    assert result.false_positive_rate is not None and result.false_positive_rate.value == 0.4
    assert json.loads(json.dumps(result.to_dict()))["precision"]["k"] == 6


@pytest.fixture
def labelled(store_url: str) -> str:
    """20 runs labelled by ReferenceMatch; a human labels 11 of them through the CLI, disagreeing on 3."""
    store = honed.open_store(store_url)
    for i in range(20):
        store.save(traj(f"run-{i:02d}", f"answer {i}", expected=str(i if i % 5 else -1)))  # 4 are wrong
    Worker(store, [ReferenceMatch()]).run_once()
    human = {f"run-{i:02d}": "pass" for i in range(1, 10) if i % 5} | {"run-00": "fail", "run-05": "fail"}
    human |= {"run-01": "fail", "run-02": "fail", "run-10": "pass"}  # the human disagrees on these three
    for tid, outcome in human.items():
        result = runner.invoke(
            app,
            ["label", tid[-6:], outcome, "--store", store_url, "--note", "checked by hand", "--by", "ana"],
        )
        assert result.exit_code == 0, result.output
    return store_url


def test_audit_against_human_labels_is_stored_and_gates_training(labelled: str) -> None:
    store = honed.open_store(labelled)
    label = next(v for v in store.get("run-01").verdicts if v.verifier == "human")
    assert (label.passed, label.reason, label.evidence) == (False, "checked by hand", {"labeler": "ana"})
    # A pass over a verifier's fail is kept, and the operator is told the run is still a fail
    # (a QA pass, session 20: "pass by ana" read as if it had overruled the reference).
    again = runner.invoke(app, ["label", "run-10", "pass", "--store", labelled, "--by", "ana"])
    assert (
        again.exit_code == 0
        and "still labelled fail" in again.output
        and "reference failed it" in again.output
    )
    assert "fix the verifier" in " ".join(again.output.split())
    agreed = runner.invoke(app, ["label", "run-03", "pass", "--store", labelled, "--by", "ana"])
    assert agreed.exit_code == 0 and "still labelled" not in agreed.output

    result = runner.invoke(app, ["verifiers", "audit", "reference", "--store", labelled, "--json"])
    assert result.exit_code == 0, result.output
    audit = json.loads(result.output)
    # reference passes 8 of the 11 human-labelled runs it decided; the human passes 6 of those.
    assert (audit["tp"], audit["fp"], audit["tn"], audit["fn"]) == (6, 2, 2, 1)
    assert audit["precision"]["value"] == 0.75 and audit["usable_for_training"] is True
    assert 0.4 < audit["precision"]["low"] < 0.75 < audit["precision"]["high"] <= 1.0

    table = runner.invoke(
        app, ["verifiers", "audit", "reference", "--store", labelled, "--min-precision", "0.9"]
    )
    assert table.exit_code == 0 and "precision" in table.output and "not used" in table.output, table.output
    assert store.untrusted_verifiers() == {"reference"}
    assert [a.precision.value for a in store.audits("reference")] == [0.75, 0.75]  # both runs stored
    policy = store.verifier_policy("reference")
    assert (policy.min_precision, policy.precision, policy.usable) == (0.9, 0.75, False)
    # The list says why it does not train, in the words `honed status` uses (a QA pass, session 27).
    listed = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["verifiers", "list", "--store", labelled])
    assert "no (audited 0.75 < min 0.90)" in listed.output, listed.output

    assert (
        runner.invoke(
            app, ["verifiers", "policy", "reference", "--min-precision", "0.7", "--store", labelled]
        ).exit_code
        == 0
    )
    assert store.untrusted_verifiers() == set()
    listing = runner.invoke(app, ["verifiers", "list", "--store", labelled, "--json"])
    rows = {r["verifier"]: r for r in map(json.loads, listing.output.splitlines())}
    assert rows["reference"]["total"] == 20 and rows["human"]["total"] == 11
    # Another person's fail is no verifier's to fix (a QA pass, session 27).
    runner.invoke(app, ["label", "run-03", "fail", "--store", labelled, "--by", "bo"])
    other = runner.invoke(app, ["label", "run-03", "pass", "--store", labelled, "--by", "cy"])
    said = " ".join(other.output.split())
    assert "still labelled fail" in said and "fix the verifier" not in said and "labels it again" in said, (
        said
    )


def test_two_labellers_gold_labels_are_both_kept_and_disagreement_is_a_fail(sqlite_url: str) -> None:
    """Bob's gold label replaced Alice's (one verdict per source and version), though the help
    says a label replaces *that person's* earlier one: an annotator's disagreement was lost."""
    store = honed.open_store(sqlite_url)
    store.save(traj("run-x", "answer 1", expected="1"))
    said = runner.invoke(
        app, ["label", "run-x", "pass", "--as", "gold", "--by", "alice", "--store", sqlite_url]
    )
    assert said.exit_code == 0 and "by alice (gold)" in said.output
    runner.invoke(app, ["label", "run-x", "fail", "--as", "gold", "--by", "bob", "--store", sqlite_url])
    runner.invoke(app, ["label", "run-x", "pass", "--as", "gold", "--by", "alice", "--store", sqlite_url])
    golds = sorted((v.evidence["labeler"], v.passed) for v in store.get("run-x").verdicts)
    assert golds == [("alice", True), ("bob", False)]  # alice's second label replaced her first
    assert label(store.get("run-x").verdicts) is False  # two humans disagree: not a pass to train on
    # ... and the audit reads it so (a QA pass, session 15: the label written last decided, so a
    # verifier's precision depended on who labelled last)
    store.add_verdict("run-x", Verdict(passed=True, verifier="reference"))
    audit = store.audit_verifier("reference", gold="gold")
    assert (audit.fp, audit.tp) == (1, 0)


def test_a_judge_is_low_trust_until_audited_above_its_minimum(sqlite_url: str) -> None:
    store = honed.open_store(sqlite_url)
    for i in range(6):
        store.save(traj(f"j{i}", "a correct answer" if i < 4 else "nonsense"))
    Worker(store, [Judge(FakeJudgeModel(), "Pass correct answers.")]).run_once()
    assert store.untrusted_verifiers() == {"judge"}  # low trust and no minimum precision
    for i in range(6):
        outcome = "pass" if i < 3 else "fail"
        assert runner.invoke(app, ["label", f"j{i}", outcome, "--store", sqlite_url]).exit_code == 0
    audit = store.audit_verifier("judge")
    assert (audit.tp, audit.fp, audit.tn, audit.fn) == (3, 1, 2, 0)
    store.set_min_precision("judge", 0.7)
    assert store.untrusted_verifiers() == set()
    store.set_min_precision("judge", 0.8)
    assert store.untrusted_verifiers() == {"judge"}
    with pytest.raises(ValueError):
        store.set_min_precision("judge", 1.5)


def test_cli_verify_once_label_errors_and_audit_without_labels(sqlite_url: str) -> None:
    store = honed.open_store(sqlite_url)
    for i in range(5):
        store.save(traj(f"c{i}", f"it is {i}", expected=str(i)))
    result = runner.invoke(
        app, ["verify", "--once", "--store", sqlite_url, "--verifier", "reference", "--concurrency", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "5 trajectories checked" in result.output and "5 pass" in result.output
    assert store.count(verdict="pass") == 5
    bad = runner.invoke(app, ["verify", "--store", sqlite_url, "--verifier", "nonsense"])
    assert bad.exit_code == 2 and "unknown verifier" in bad.output
    assert runner.invoke(app, ["label", "no-such-id", "pass", "--store", sqlite_url]).exit_code == 1
    assert runner.invoke(app, ["label", "c1", "maybe", "--store", sqlite_url]).exit_code == 2
    # A run paused at an interrupt is no outcome: labelling it was accepted (a QA pass, session 19).
    store.save(traj("paused", "", status="interrupted", expected="1"))
    paused = runner.invoke(app, ["label", "paused", "pass", "--store", sqlite_url])
    assert paused.exit_code == 1 and "paused at an interrupt" in paused.output, paused.output
    assert store.get("paused").verdicts == []
    empty = runner.invoke(app, ["verifiers", "audit", "reference", "--store", sqlite_url])
    assert empty.exit_code == 0 and "no trajectory has both" in empty.output
    typo = runner.invoke(app, ["verifiers", "audit", "referense", "--store", sqlite_url])
    assert typo.exit_code == 1 and "'referense'" in typo.output and "reference" in typo.output
    ahead = runner.invoke(
        app, ["verifiers", "policy", "referense", "--min-precision", "0.9", "--store", sqlite_url]
    )
    assert ahead.exit_code == 0 and "no verdicts from a verifier named 'referense' yet" in ahead.output


def test_a_composite_with_an_untrusted_part_is_untrusted(sqlite_url: str) -> None:
    """A QA pass (session 15): `any_of(reference, style)` selected wrong answers on the pass of a
    part audited below its minimum precision, which alone selected none."""
    from honed.verifiers import any_of

    store = honed.open_store(sqlite_url)
    composite = any_of(ReferenceMatch(), ReferenceMatch("contains", name="lenient"))
    assert composite.name == "any_of(reference,lenient)"
    nested = "all_of(x,any_of(reference,y))"
    store.register_verifiers({"reference": "high", "lenient": "high", composite.name: "high", nested: "high"})
    assert store.untrusted_verifiers() == set()
    store.set_min_precision("reference", 0.9)
    store.save(traj("r1", "wrong", expected="right"))
    store.add_verdict("r1", Verdict(passed=True, verifier="reference"))
    store.add_verdict("r1", Verdict(passed=False, verifier="human"))
    store.audit_verifier("reference", gold="human")
    untrusted = store.untrusted_verifiers()
    assert untrusted == {"reference", composite.name, nested}
