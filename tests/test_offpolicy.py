"""Off-policy learning from captured attempts: rows carry the recorded logprobs and the advantage
(1 for a pass, minus the group's pass rate for a failure), the loss is the tapered objective
(checked against a plain reference on a real collated batch), the ratio is 1 on the generating
model's own samples, and training moves passes up and leaves failures less likely than learning the
passes alone does. Tasks never passed, held-out tasks and rows without logprobs never train."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import honed
from honed.learn.datasets import MissingLogprobs, prepare
from honed.learn.methods import NothingToLearn, OffPolicyMethod, offpolicy_loss
from honed.learn.shared_prefix import shared_prefix_length
from honed.store import TrajectoryStore
from honed.trajectory import Step, Trajectory
from test_trainers_data import ADD_SCHEMA, IDS_A, IDS_B, SYSTEM, add, make_trajectory, question
from tiny_model import tiny_path

THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def store(sqlite_url: str) -> TrajectoryStore:
    return honed.open_store(sqlite_url)


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_path()


@pytest.fixture(scope="module")
def model(tiny: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


def with_logprobs(t: Trajectory, *per_step: list[float] | None) -> Trajectory:
    """`t` with these recorded logprobs on its model steps (None: none recorded)."""
    for step, logprobs in zip(t.model_steps(), per_step, strict=True):
        if logprobs is None:
            step.extra.pop("logprobs", None)
        else:
            step.extra["logprobs"] = list(logprobs)
    return t


def own_logprobs(model: Any, prompt: list[int], completion: list[int]) -> list[float]:
    """What `model` gave each completion token after `prompt`: what it records when it samples them."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()


def conversation_ids(
    tokenizer: Any, task_id: str, answer: str
) -> tuple[list[int], list[int], list[int], list[int]]:
    """The two model calls of `make_trajectory` as the tiny model's template renders them."""
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question(task_id)}]
    second = [*first, {"role": "assistant", "content": call}, {"role": "tool", "content": "5"}]

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(messages: list[dict[str, Any]]) -> list[int]:
        return encode(
            tokenizer.apply_chat_template(
                messages, tools=[ADD_SCHEMA], add_generation_prompt=True, tokenize=False
            )
        )

    return (
        prompt(first),
        encode(THINK + call + "<|im_end|>"),
        prompt(second),
        encode(THINK + answer + "<|im_end|>"),
    )


def attempt(
    store: TrajectoryStore, model: Any, tokenizer: Any, task_id: str, answer: str, passed: bool
) -> Trajectory:
    """A captured attempt whose recorded logprobs are the tiny model's own (it is the generating one)."""
    ids = conversation_ids(tokenizer, task_id, answer)
    t = make_trajectory(task_id, answer=answer, token_ids=ids)
    with_logprobs(t, own_logprobs(model, ids[0], ids[1]), own_logprobs(model, ids[2], ids[3]))
    return add(store, t, passed)


# -- rows ----------------------------------------------------------------------------------------


def test_rows_carry_recorded_logprobs_and_the_group_advantage(store: TrajectoryStore) -> None:
    t1 = [add(store, make_trajectory("t1", token_ids=IDS_A), True)]
    t1 += [add(store, make_trajectory("t1", a=4, token_ids=IDS_B), False) for _ in range(3)]
    t2 = [add(store, make_trajectory("t2", token_ids=IDS_A), True) for _ in range(2)]  # all pass
    for _ in range(2):  # never passed: nothing says which tokens were wrong
        add(store, make_trajectory("t3", token_ids=IDS_B), False)
    add(store, make_trajectory("h1", split="heldout", token_ids=IDS_A), True)
    add(store, make_trajectory("h1", split="heldout", token_ids=IDS_B), False)
    data = prepare(store, "offpolicy")
    assert data.pretokenized and data.method == "offpolicy"
    assert data.counts["groups"] == 2 and data.counts["unpassed_groups"] == 1
    assert data.counts["failed_attempts"] == 3  # t1's, beside its pass
    assert data.counts["heldout_excluded"] == 2 and set(data.dataset["task_id"]) == {"t1", "t2"}
    assert sorted(set(data.trajectory_ids)) == sorted(t.id for t in t1 + t2)
    rows = list(data.dataset)
    assert len(rows) == 12  # one row per model call
    # A pass: 1, whatever its group did; a failure: minus its group's pass rate (1 of 4).
    advantage = {tid: rows_[0]["advantage"] for tid, rows_ in _by_trajectory(rows).items()}
    assert all(advantage[t.id] == 1.0 for t in [t1[0], *t2])
    assert all(advantage[t.id] == pytest.approx(-0.25) for t in t1[1:])
    for row in rows:
        prompt = row["completion_mask"].count(0)
        assert row["logprobs"][:prompt] == [0.0] * prompt
        assert row["logprobs"][prompt:] == [-0.5] * (len(row["input_ids"]) - prompt)
        assert len(row["logprobs"]) == len(row["input_ids"]) == len(row["completion_mask"])


def _by_trajectory(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["trajectory_id"], []).append(row)
    return out


def test_rows_without_recorded_logprobs_are_refused(store: TrajectoryStore) -> None:
    add(store, make_trajectory("t1", token_ids=IDS_A), True)
    bare = add(store, with_logprobs(make_trajectory("t1", token_ids=IDS_B), [-0.1, -0.2, -0.3], None), False)
    no_ids = add(store, make_trajectory("t1"), False)
    with pytest.raises(MissingLogprobs, match="lack the token ids and logprobs") as caught:
        prepare(store, "offpolicy")
    assert sorted(caught.value.trajectory_ids) == sorted([bare.id, no_ids.id])
    assert "sft" in str(caught.value)  # says what to do instead
    with pytest.raises(ValueError, match="verified=True"):
        prepare(store, "offpolicy", verified=False)


def test_an_attempt_that_cannot_teach_does_not_refuse_the_cycle(store: TrajectoryStore) -> None:
    """A QA pass (session 16): one attempt whose model raised (a prompt over the window: no
    token ids) refused every later off-policy cycle, though its task never passed and its group
    would have been left out anyway; and an errored attempt beside passes did the same."""
    import dataclasses

    kept = [add(store, make_trajectory("t1", token_ids=IDS_A), True)]
    kept.append(add(store, make_trajectory("t1", a=4, token_ids=IDS_B), False))
    add(store, make_trajectory("t2"), False)  # never passed, no token ids: its group teaches nothing
    raised = dataclasses.replace(make_trajectory("t1"), status="error", error="ContextWindowExceeded")
    add(store, raised, False)  # beside passes, but its model never replied
    data = prepare(store, "offpolicy")
    assert sorted(set(data.trajectory_ids)) == sorted(t.id for t in kept)
    assert data.counts["unpassed_groups"] == 1 and data.counts["no_reply"] == 1


def test_tasks_never_passed_teach_nothing(store: TrajectoryStore, tiny: Path, tmp_path: Path) -> None:
    for ids in (IDS_A, IDS_B):
        add(store, make_trajectory("t1", token_ids=ids), False)
    add(store, make_trajectory("t2", token_ids=IDS_A), False)  # a group of one
    data = prepare(store, "offpolicy")
    assert len(data) == 0 and data.counts["unpassed_groups"] == 2
    with pytest.raises(NothingToLearn, match="failed, so nothing shows what a right answer looks like"):
        OffPolicyMethod().train(tiny, data, tmp_path / "out")  # before loading anything
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="trains on prepare"):
        OffPolicyMethod().train(tiny, prepare(store, "sft"), tmp_path / "out")


def test_one_attempt_per_task_is_said_to_teach_no_failure(
    store: TrajectoryStore, tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A QA pass (session 28): production tasks attempted once each gave offpolicy the passes
    alone (SFT, said nowhere), and DPO "no rows" without saying it pairs attempts at one task."""
    from honed.learn.methods import DPOMethod

    add(store, make_trajectory("t1", token_ids=IDS_A), True)
    add(store, make_trajectory("t2", token_ids=IDS_B), False)
    data = prepare(store, "offpolicy")
    assert data.counts["groups"] == 1 and data.counts["failed_attempts"] == 0
    with caplog.at_level("WARNING", logger="honed"):
        OffPolicyMethod(max_steps=1).train(tiny, data, tmp_path / "out")
    assert "no task here has a failed attempt beside a pass" in caplog.text
    with pytest.raises(NothingToLearn, match="a pass and a failure of the same task"):
        DPOMethod().train(tiny, prepare(store, "dpo"), tmp_path / "dpo")


# -- the loss ------------------------------------------------------------------------------------


def reference_loss(model: Any, rows: list[dict[str, Any]], failure_weight: float = 0.5) -> torch.Tensor:
    """The tapered objective, row by row, without padding or a shared prefix (failures weighted
    by `failure_weight`, the method's default)."""
    total, tokens = torch.zeros(()), 0
    for row in rows:
        ids = row["input_ids"]
        sampled = [i for i, label in enumerate(row["labels"]) if label != -100]
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        logps = torch.log_softmax(logits[[i - 1 for i in sampled]], -1)[
            range(len(sampled)), [ids[i] for i in sampled]
        ]
        a = row["advantage"]
        if a > 0:
            weight = torch.ones_like(logps)
        else:
            weight = failure_weight * torch.exp(
                logps.detach() - torch.tensor([row["logprobs"][i] for i in sampled])
            ).clamp(max=1)
        total = total - (a * weight * logps).sum()
        tokens += len(sampled)
    return total / tokens


def gradient(loss: torch.Tensor, net: Any) -> torch.Tensor:
    net.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


def test_the_loss_on_a_collated_batch_is_the_tapered_objective(
    store: TrajectoryStore, model: Any, tokenizer: Any, tiny: Path, tmp_path: Path
) -> None:
    attempt(store, model, tokenizer, "t1", "The sum is 5.", True)
    attempt(store, model, tokenizer, "t1", "The sum is 6.", False)
    attempt(store, model, tokenizer, "t2", "The sum is 5.", True)
    attempt(store, model, tokenizer, "t2", "I cannot tell.", False)
    data = prepare(store, "offpolicy", tokenizer=tokenizer)
    method = OffPolicyMethod(per_device_train_batch_size=8, activation_checkpointing=False)
    trainer = method.build_trainer(tiny, data, tmp_path / "scratch")
    assert trainer.args.completion_only_loss and type(trainer).__name__ == "OffPolicyTrainer"
    rows = list(trainer.train_dataset)
    assert {"logprobs", "advantage"} <= rows[0].keys()
    assert sorted({r["advantage"] for r in rows}) == [-0.5, 1.0]
    batch = trainer.data_collator(rows)  # what a training step sees: padded, labels -100 off the samples
    assert batch["old_logprobs"].shape == batch["input_ids"].shape and batch["advantages"].shape == (8,)
    net = trainer.model.eval()
    assert shared_prefix_length(batch["input_ids"], batch["labels"] != -100) > 0  # the prefix runs once

    # The model is the generating one: every ratio is 1, the loss is -A log p averaged over tokens.
    loss = trainer.compute_loss(net, dict(batch))
    assert torch.allclose(loss, reference_loss(net, rows), atol=1e-5)
    _, stats = offpolicy_loss(net, dict(batch))
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    at_one = gradient(loss, net)

    # Failures the model has moved away from (now e times less likely than when sampled) push
    # with weight 1/e; passes keep weight 1 whatever their ratio (as SFT learns them).
    far = [dict(r) for r in rows]
    for r in far:
        r["logprobs"] = [
            lp + 1.0 * (label != -100) for lp, label in zip(r["logprobs"], r["labels"], strict=True)
        ]
    far_batch = trainer.data_collator(far)
    loss = trainer.compute_loss(net, dict(far_batch))
    assert torch.allclose(loss, reference_loss(net, far), atol=1e-5)
    _, stats = offpolicy_loss(net, dict(far_batch))
    failures = (far_batch["advantages"] < 0)[:, None] & (far_batch["labels"] != -100)
    assert stats["tapered"] == pytest.approx(float(failures.sum() / (far_batch["labels"] != -100).sum()))
    tapered = gradient(loss, net)
    # Only the passes' part (failures' advantage 0, the same token count): the failures' part of
    # the gradient is the same direction as at ratio 1, scaled by 1/e.
    passes = trainer.data_collator([dict(r, advantage=max(r["advantage"], 0.0)) for r in rows])
    passes_part = gradient(trainer.compute_loss(net, dict(passes)), net)
    assert not torch.allclose(at_one, passes_part, atol=1e-6)
    assert torch.allclose(tapered - passes_part, (at_one - passes_part) / torch.e, atol=1e-6)

    # `failure_weight` scales the failures' part and nothing else: 1 doubles the default's 0.5.
    trainer.failure_weight = 1.0
    loss = trainer.compute_loss(net, dict(batch))
    assert torch.allclose(loss, reference_loss(net, rows, failure_weight=1.0), atol=1e-5)
    assert torch.allclose(gradient(loss, net) - passes_part, 2 * (at_one - passes_part), atol=1e-6)


def test_the_ratio_is_one_on_what_the_served_model_sampled(
    store: TrajectoryStore, tiny: Path, tmp_path: Path
) -> None:
    """Recorded by honed's engine (batched, KV-cached, sampled at T=1): training sees the same policy."""
    from langchain_core.messages import HumanMessage, SystemMessage

    from honed.serving.local import LocalChatModel

    chat = LocalChatModel(tiny, temperature=1.0, max_tokens=12)
    prompts = [[SystemMessage(SYSTEM), HumanMessage(question(f"t{i}"))] for i in range(4)]
    replies = chat.batch(prompts)
    chat.close()
    for i, reply in enumerate(replies):
        meta = reply.response_metadata
        assert len(meta["logprobs"]) == len(meta["token_ids"]) > 0
        t = Trajectory(
            id=f"gen-{i}", agent="calc", task_id=f"t{i // 2}", split="train", model_version="calc@v1",
            steps=[Step(id=f"g{i}", index=0, kind="model", name="model", model_version="calc@v1",
                        extra={k: meta[k] for k in ("prompt_token_ids", "token_ids", "logprobs")})],
        )  # fmt: skip
        add(store, t, i % 2 == 0)
    data = prepare(store, "offpolicy")
    trainer = OffPolicyMethod(per_device_train_batch_size=4, activation_checkpointing=False).build_trainer(
        tiny, data, tmp_path / "scratch"
    )
    batch = trainer.data_collator(list(trainer.train_dataset))
    _, stats = offpolicy_loss(trainer.model.eval(), dict(batch))
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-3)


# -- training ------------------------------------------------------------------------------------


def sequence_logprob(model: Any, prompt: list[int], completion: list[int]) -> float:
    return sum(own_logprobs(model, prompt, completion))


def test_training_moves_passes_up_and_failures_below_what_passes_alone_leave(
    store: TrajectoryStore, model: Any, tokenizer: Any, tiny: Path, tmp_path: Path
) -> None:
    """Passes are learned as SFT learns them, so the tokens they share with failures (the template,
    the tool call) rise for both; what failures teach is that the failed answers end up less likely
    than after the same training on the passes alone, the more so the larger `failure_weight`."""
    from transformers import AutoModelForCausalLM

    answers = {("t1", True): "The sum is 5.", ("t1", False): "I cannot tell.",
               ("t2", True): "The sum is 5.", ("t2", False): "It is 9 or so."}  # fmt: skip
    for (task, passed), answer in answers.items():
        attempt(store, model, tokenizer, task, answer, passed)
    data = prepare(store, "offpolicy", tokenizer=tokenizer)
    method = OffPolicyMethod(
        per_device_train_batch_size=8, learning_rate=1e-3, max_steps=4, failure_weight=1.0
    )
    result = method.train(tiny, data, tmp_path / "out")
    assert result.metrics["steps"] == 4 and result.metrics["tokens"] > 0
    assert 0.0 < result.metrics["tapered"] <= 1.0 and result.metrics["ratio_mean"] > 0
    halved = OffPolicyMethod(
        per_device_train_batch_size=8, learning_rate=1e-3, max_steps=4
    )  # the default, 0.5
    half = halved.train(tiny, data, tmp_path / "half")
    data.dataset = data.dataset.filter(lambda row: row["advantage"] > 0)
    alone = method.train(tiny, data, tmp_path / "passes")
    after = AutoModelForCausalLM.from_pretrained(result.path).eval()
    after_half = AutoModelForCausalLM.from_pretrained(half.path).eval()
    passes_alone = AutoModelForCausalLM.from_pretrained(alone.path).eval()
    for (task, passed), answer in answers.items():
        _, _, prompt, completion = conversation_ids(tokenizer, task, answer)
        moved = sequence_logprob(after, prompt, completion) - sequence_logprob(model, prompt, completion)
        alone_lp = sequence_logprob(passes_alone, prompt, completion)
        below = sequence_logprob(after, prompt, completion) - alone_lp
        below_half = sequence_logprob(after_half, prompt, completion) - alone_lp
        if passed:
            assert moved > 0, (task, answer, moved)
        else:
            assert below < -1.0, (task, answer, below)
            assert below < below_half < 0, (task, answer, below, below_half)
    assert halved.config()["failure_weight"] == 0.5
    with pytest.raises(ValueError, match="failure_weight"):
        OffPolicyMethod(failure_weight=-1.0)
    config = method.config()
    assert config["method"] == "offpolicy" and config["trl_config"] == "SFTConfig"
