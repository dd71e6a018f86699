"""The bundled task suites and the warm-start machinery, without warm-starting anything.

Demonstrations are replayed through a real `create_agent` agent, captured by `honed.Middleware`
into SQLite and labelled by the suite's own verifiers, exactly as `honed.learn.evaluate` measures a
model: every demonstration must pass, and the same conversation with a wrong answer must fail.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult

import honed
from honed.demo import HELDOUT, SUITES, TRAIN, Suite, Task, base_model, load_suite, warmstart
from honed.demo.generated import render
from honed.learn.evaluate import evaluate, suite_agent
from honed.learn.shared_prefix import shared_prefix_loss

SUITE_NAMES = sorted(SUITES)


class ReplayChatModel(BaseChatModel):
    """Says what a demonstration's assistant said, turn by turn, keyed by the user's request."""

    scripts: dict[str, dict[str, Any]]

    @property
    def _llm_type(self) -> str:
        return "replay"

    def bind_tools(self, tools: Any, **kwargs: Any) -> ReplayChatModel:
        return self

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **_: Any
    ) -> Any:
        prompt = next(m.text for m in messages if isinstance(m, HumanMessage))
        turns = [m for m in self.scripts[prompt]["messages"] if m["role"] == "assistant"]
        turn = turns[sum(isinstance(m, AIMessage) for m in messages)]
        calls = [
            {"name": c["function"]["name"], "args": json.loads(c["function"]["arguments"]), "id": c["id"]}
            for c in turn.get("tool_calls") or ()
        ]
        message = AIMessage(content=turn["content"], tool_calls=calls)
        return ChatResult(generations=[ChatGeneration(message=message)])


def replay(suite: Any, pairs: list[tuple[Task, dict[str, Any]]], tmp_path: Path) -> tuple[Any, Any]:
    """Run the suite's agent on the tasks, replaying the examples; (scores, store)."""
    store = honed.open_store(f"sqlite:///{tmp_path / 'replay.db'}")
    model = ReplayChatModel(scripts={task.prompt: example for task, example in pairs})
    agent = suite_agent(suite, model, store=store)
    tasks = [task for task, _ in pairs]
    return evaluate(store, agent, tasks, suite.verifiers(), samples=1), store


def needs_sandbox(name: str) -> None:
    if name == "coding":
        from honed.verifiers.sandbox import bwrap_problem

        problem = bwrap_problem()
        if problem:
            pytest.skip(f"the coding suite's verifier needs bubblewrap: {problem}")


def wrong(name: str, example: dict[str, Any]) -> dict[str, Any]:
    """The same conversation with a final answer that is wrong but well formed."""
    bad = copy.deepcopy(example)
    final = bad["messages"][-1]
    if name == "tool_use":
        final["content"] = str(int(final["content"]) + 1)
    elif name == "extraction":
        record = json.loads(final["content"])
        record["age"] += 1
        final["content"] = json.dumps(record)
    else:
        final["content"] = (
            final["content"].replace("return x", "return 1 + x").replace("return max", "return 1 + max")
        )
        final["content"] = final["content"].replace("return min", "return 1 + min")
    return bad


# -- the protocol ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SUITE_NAMES)
def test_suite_protocol_splits_and_determinism(name: str) -> None:
    suite = load_suite(name)
    assert isinstance(suite, Suite) and suite.name == name
    assert len(suite.train) == 300 and len(suite.heldout) == 100
    assert {t.split for t in suite.train} == {TRAIN} and {t.split for t in suite.heldout} == {HELDOUT}
    ids = [t.id for t in (*suite.train, *suite.heldout)]
    assert len(set(ids)) == len(ids)
    train, heldout = {t.prompt for t in suite.train}, {t.prompt for t in suite.heldout}
    assert len(train) == 300 and len(heldout) == 100 and not train & heldout
    assert all(t.slice for t in (*suite.train, *suite.heldout))
    assert len({t.slice for t in suite.heldout}) >= 2
    again = SUITES[name]()
    assert again.train == suite.train and again.heldout == suite.heldout
    assert suite.verifiers() and suite.verifiers()[0] is not suite.verifiers()[0]
    assert isinstance(suite.max_tokens, int) and suite.max_tokens > 0


@pytest.mark.parametrize("name", SUITE_NAMES)
def test_demonstrations_are_deterministic_and_never_a_split_task(name: str) -> None:
    suite = load_suite(name)
    demos = suite.demonstrations(400, seed=0)
    assert demos == suite.demonstrations(400, seed=0)
    assert demos != suite.demonstrations(400, seed=1)
    prompts = {m["content"] for d in demos for m in d["messages"] if m["role"] == "user"}
    assert not prompts & {t.prompt for t in suite.heldout}
    assert not prompts & {t.prompt for t in suite.train}
    for demo in demos[:50]:
        assert isinstance(demo["tools"], str)
        assert demo["messages"][0] == {"role": "system", "content": suite.system_prompt}
        for message in demo["messages"]:
            for call in message.get("tool_calls") or ():
                assert isinstance(call["function"]["arguments"], str)


def test_load_suite_by_name_instance_and_user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_suites.py").write_text(
        textwrap.dedent(
            """
            from honed.demo import Task
            from honed.verifiers import ReferenceMatch


            class Echo:
                name = "echo"
                system_prompt = "Repeat the word."
                tools = []
                train = [Task("echo-t0", "apple", "train", {"expected": "apple"})]
                heldout = [Task("echo-h0", "pear", "heldout", {"expected": "pear"})]

                def verifiers(self):
                    return [ReferenceMatch()]

                def demonstrations(self, n, seed=0):
                    return []

                def vocab_corpus(self):
                    return ["apple pear"]


            SUITE = Echo()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    instance = load_suite("my_suites:SUITE")
    assert instance.name == "echo" and isinstance(instance, Suite)
    assert load_suite("my_suites:Echo").name == "echo"  # a factory is called
    assert load_suite(instance) is instance
    with pytest.raises(ValueError, match="unknown suite"):
        load_suite("no_such_suite")
    sys.modules.pop("my_suites", None)


# -- demonstrations: what the agent sees, and what the verifiers accept ------------------------


@pytest.mark.parametrize("name", SUITE_NAMES)
def test_demonstrations_replayed_pass_and_wrong_answers_fail(name: str, tmp_path: Path) -> None:
    needs_sandbox(name)
    suite = load_suite(name)
    pairs = suite.demonstration_tasks(12, seed=3)
    pairs += [(task, suite.solution_for(task)) for task in suite.heldout[:4]]
    scores, store = replay(suite, pairs, tmp_path)
    assert scores.pass_at_1 == 1.0, scores.to_dict()
    assert set(scores.per_slice()) == {task.slice for task, _ in pairs}

    # What the model was shown and said at run time renders exactly like the demonstration.
    from honed.exporters.datasets import chat_example

    by_prompt = {task.prompt: example for task, example in pairs}
    for trajectory in store.trajectories(limit=len(pairs)):
        captured = chat_example(trajectory)
        demo = by_prompt[captured["messages"][1]["content"]]
        assert render(captured) == render(demo)

    if name == "coding":  # judged by pytest in the sandbox, not by reading the code
        for trajectory in store.trajectories(limit=3):
            evidence = trajectory.verdicts[0].evidence
            assert evidence["tests"]["passed"] == 1 and evidence["exit_code"] == 0, evidence

    bad_pairs = [(task, wrong(name, example)) for task, example in pairs[:6]]
    bad_scores, _ = replay(suite, bad_pairs, tmp_path / "bad")
    assert bad_scores.pass_at_1 == 0.0, bad_scores.to_dict()


@pytest.mark.parametrize("name", SUITE_NAMES)
def test_rendering_matches_the_tokenizer_and_vocab_covers_the_suite(name: str) -> None:
    from honed.demo.tiny import build_tokenizer

    suite = load_suite(name)
    corpus = suite.vocab_corpus()
    tokenizer = build_tokenizer(corpus, vocab_size=warmstart.RECIPE.vocab_size)
    for example in suite.demonstrations(5, seed=7):
        tools = json.loads(example["tools"]) or None
        text = tokenizer.apply_chat_template(example["messages"], tools=tools, tokenize=False)
        assert text == render(example)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    digits = [tokenizer.decode([i]) for i in tokenizer("12345", add_special_tokens=False)["input_ids"]]
    assert digits == list("12345")


# -- the warm start's pieces ----------------------------------------------------------------------


def test_sft_template_renders_the_runtime_text_and_masks_only_replies() -> None:
    from honed.demo.tiny import build_tokenizer

    suite = load_suite("tool_use")
    tokenizer = build_tokenizer(suite.vocab_corpus()[:50], vocab_size=400)
    example = suite.demonstrations(40, seed=0)
    two_step = next(e for e in example if sum(m["role"] == "tool" for m in e["messages"]) == 2)
    tools = json.loads(two_step["tools"])
    text = tokenizer.apply_chat_template(
        two_step["messages"], tools=tools, tokenize=False, chat_template=warmstart.SFT_CHAT_TEMPLATE
    )
    assert text == render(two_step)
    encoded = tokenizer.apply_chat_template(
        two_step["messages"],
        tools=tools,
        chat_template=warmstart.SFT_CHAT_TEMPLATE,
        return_assistant_tokens_mask=True,
        return_dict=True,
        tokenize=True,
    )
    trained = tokenizer.decode(
        [i for i, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m]
    )
    calls = [c["function"] for m in two_step["messages"] for c in m.get("tool_calls") or ()]
    want = "".join(
        f'<tool_call>\n{{"name": "{c["name"]}", "arguments": {c["arguments"]}}}\n</tool_call><|im_end|>'
        for c in calls
    )
    want += f"<think>\n\n</think>\n\n{two_step['messages'][-1]['content']}<|im_end|>"
    assert trained == want


def _small_model(tmp_path: Path, suite: Any, seed: int) -> tuple[Any, Any]:
    """A 2-layer model on the suite's vocabulary and its tokenizer: big enough for exact-loss checks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from honed.demo.tiny import build_tiny

    path = build_tiny(
        tmp_path / "m", seed=seed, vocab_corpus=suite.vocab_corpus()[:50], vocab_size=400,
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


def test_shared_prefix_loss_equals_the_plain_loss(tmp_path: Path) -> None:
    import torch

    suite = load_suite("tool_use")
    tokenizer, model = _small_model(tmp_path, suite, seed=0)
    rows = []
    for example in suite.demonstrations(4, seed=0):
        encoded = tokenizer.apply_chat_template(
            example["messages"],
            tools=json.loads(example["tools"]),
            chat_template=warmstart.SFT_CHAT_TEMPLATE,
            return_assistant_tokens_mask=True,
            return_dict=True,
            tokenize=True,
        )
        ids, mask = encoded["input_ids"], encoded["assistant_masks"]
        rows.append((ids, [i if m else -100 for i, m in zip(ids, mask, strict=True)]))
    width = max(len(ids) for ids, _ in rows)
    batch = {
        "input_ids": torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows]),
        "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
    }
    shared = shared_prefix_loss(model, dict(batch))
    assert shared is not None
    shared.backward()
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = model(**batch).loss
    plain.backward()
    assert torch.allclose(shared, plain, atol=1e-5)
    for a, b in zip(shared_grads, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_base_model_caches_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def fake_warm_start(suite: Any, out: Path, **kwargs: Any) -> dict[str, Any]:
        calls.append(Path(out))
        if len(calls) == 1:
            (Path(out) / "half-written").write_text("x")
            raise KeyboardInterrupt  # an interrupted build
        (Path(out) / warmstart.REPORT).write_text("{}")
        return {}

    monkeypatch.setattr(warmstart, "warm_start", fake_warm_start)
    with pytest.raises(KeyboardInterrupt):
        base_model("extraction", seed=5, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-built is left to be reused
    path = base_model("extraction", seed=5, cache_dir=tmp_path)
    assert path.parent == tmp_path and path.name.startswith("extraction-5-")
    assert base_model("extraction", seed=5, cache_dir=tmp_path) == path and len(calls) == 2
    other = base_model("extraction", seed=6, cache_dir=tmp_path)
    assert other != path and len(calls) == 3
    monkeypatch.setenv("HONED_CACHE", str(tmp_path / "env"))
    assert base_model("extraction", seed=5).parent == tmp_path / "env"


def test_dev_estimate_is_the_probability_of_sampling_each_solution(tmp_path: Path) -> None:
    import torch

    suite = load_suite("tool_use")
    tokenizer, model = _small_model(tmp_path, suite, seed=1)
    tokenizer.chat_template = warmstart.SFT_CHAT_TEMPLATE
    model.eval()
    examples = warmstart.dev_examples(suite, 3)
    dev = warmstart.DevSet(tokenizer, examples).measure(model)
    want, correct, scored = [], 0, 0
    for example in examples:
        encoded = tokenizer.apply_chat_template(
            example["messages"],
            tools=json.loads(example["tools"]),
            return_assistant_tokens_mask=True,
            return_dict=True,
            tokenize=True,
        )
        ids = torch.tensor([encoded["input_ids"]])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        positions = [t for t, m in enumerate(encoded["assistant_masks"]) if m]
        want.append(sum(float(logprobs[t - 1, ids[0, t]]) for t in positions))
        correct += sum(int(logprobs[t - 1].argmax() == ids[0, t]) for t in positions)
        scored += len(positions)
    assert dev.logprobs == pytest.approx(want, rel=1e-4)
    assert dev.sampled == pytest.approx(sum(math.exp(w) for w in want) / len(want), rel=1e-3)
    assert dev.token_accuracy == pytest.approx(correct / scored)
    assert dev.greedy == 0.0  # an untrained model reproduces nothing


def test_copy_drills_repeat_the_suites_own_words() -> None:
    suite = load_suite("extraction")
    drills = warmstart.copy_drills(suite, 20, seed=0)
    assert drills == warmstart.copy_drills(suite, 20, seed=0)
    words = {w for d in suite.demonstrations(64) for w in d["messages"][1]["content"].split()}
    for drill in drills:
        user, assistant = drill["messages"]
        assert user["role"] == "user" and assistant == {"role": "assistant", "content": user["content"]}
        assert all(item.isdigit() or item in words for item in user["content"].split())


def test_a_warm_start_leaves_progress_bars_as_it_found_them() -> None:
    """`honed demo` turns datasets' bars off (its own are on screen); a warm start must not turn them back on."""
    import datasets

    datasets.disable_progress_bars()
    try:
        with warmstart._quiet():
            assert not datasets.utils.is_progress_bar_enabled()
        assert not datasets.utils.is_progress_bar_enabled()
    finally:
        datasets.enable_progress_bars()
