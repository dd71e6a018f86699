"""Each training method on its real TRL trainer with the tiny model: a few steps change the weights,
the saved folder loads, SFT learns only the model's own tokens, GRPO refuses rewards that teach
nothing, and an empty dataset never reaches a trainer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback

import honed
from honed.learn.datasets import TrainingData, prepare
from honed.learn.methods import (
    DistillMethod,
    DPOMethod,
    GRPOMethod,
    KTOMethod,
    NothingToLearn,
    SFTMethod,
    VerifierReward,
    completion_trajectory,
    trl_tool,
)
from honed.learn.methods.base import _bf16_available, _save
from honed.learn.methods.sft import _with_generation_markers
from honed.learn.shared_prefix import shared_prefix_length
from honed.store import TrajectoryStore
from honed.trajectory import Trajectory, Verdict
from honed.verifiers import BaseVerifier, CannotTell, ReferenceMatch
from honed.verifiers.protocol import verdict
from test_trainers_data import ADD_SCHEMA, SYSTEM, add, make_trajectory, question
from tiny_model import add_tool, tiny_path

FEW_STEPS = {"max_steps": 2, "logging_steps": 1}
THINK = "<think>\n\n</think>\n\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny matrices on a shared 2-core machine: one thread ran these tests 6x faster than two."""
    import torch

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
def tokenizer(tiny: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


def changed_parameters(base: Path, out: Path) -> list[str]:
    """Names of the parameters that differ between two saved folders (same architecture)."""
    import torch
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert before.keys() == after.keys()
    return [name for name in before if not torch.equal(before[name], after[name])]


class LogRecorder(TrainerCallback):
    """What a progress bar would see: every log TRL emits."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any
    ) -> None:
        self.logs.append(dict(logs or {}))


def saved_model_is_complete(base: Path, out: Path) -> None:
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "honed_tiny.json"} <= names
    assert "tokenizer.json" in names and "training_args.bin" not in names
    assert not any(name.startswith("adapter_") for name in names)  # LoRA merged, never left as an adapter
    for name in ("generation_config.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_text() == (base / name).read_text(), name  # untouched by trainers
    assert changed_parameters(base, out)


# -- SFT ---------------------------------------------------------------------------------------


def test_sft_trains_only_on_the_assistant_turns(store: TrajectoryStore, tiny: Path, tmp_path: Path) -> None:
    add(store, make_trajectory("t1"), True)
    add(store, make_trajectory("t2", a=4, answer="The sum is 7."), True)
    data = prepare(store, "sft")
    assert not data.pretokenized
    # Without activation checkpointing (TRL's default), which the shared prefix's KV cache needs off.
    method = SFTMethod(per_device_train_batch_size=2, activation_checkpointing=False, **FEW_STEPS)
    trainer = method.build_trainer(tiny, data, tmp_path / "scratch")
    tok = trainer.processing_class
    rows = sorted(trainer.train_dataset, key=lambda r: len(r["input_ids"]))
    batch = trainer.data_collator(rows)  # exactly what a training step sees
    for i, row in enumerate(rows):
        labels = batch["labels"][i].tolist()
        ids = batch["input_ids"][i].tolist()
        trained = _runs([t if label != -100 else None for t, label in zip(ids, labels, strict=True)])
        texts = [tok.decode(run, skip_special_tokens=False) for run in trained]
        call, answer = ("2", "5") if "sum is 5" in tok.decode(row["input_ids"]) else ("4", "7")
        # Exactly what the model writes at run time: the run-time template renders an earlier
        # turn without a think block and the last one with it (TRL's own training template adds
        # one everywhere, which would teach the model text it never sees in its context).
        assert texts == [
            f'<tool_call>\n{{"name": "add", "arguments": {{"a": {call}, "b": 3}}}}\n</tool_call><|im_end|>',
            f"{THINK}The sum is {answer}.<|im_end|>",
        ]
        masked = tok.decode([t for t, label in zip(ids, labels, strict=True) if label == -100])
        for text in (SYSTEM, "You may call one or more functions", "What is 2 plus 3?", "<tool_response>"):
            assert text in masked
    # The rows' common prefix (system prompt, tool schemas) runs once a batch, and the loss is exact.
    assert type(trainer).__name__ == "SharedPrefixSFTTrainer"
    assert shared_prefix_length(batch["input_ids"], batch["labels"] != -100) > 0
    inputs = {k: batch[k].to(trainer.model.device) for k in ("input_ids", "attention_mask", "labels")}
    plain = trainer.model(**inputs).loss
    assert torch.allclose(trainer.compute_loss(trainer.model, dict(inputs)), plain, atol=1e-5)
    # ... and trains on them: the weights move, the folder is a complete model.
    recorder = LogRecorder()
    result = method.train(tiny, data, tmp_path / "out", callbacks=[recorder])
    assert result.path == tmp_path / "out"
    assert result.metrics["steps"] == 2 and result.metrics["train_loss"] > 0
    assert (
        result.metrics["tokens"] > 0 and result.metrics["tokens_per_s"] > 0 and result.metrics["samples"] == 4
    )
    assert any("loss" in entry for entry in recorder.logs)
    saved_model_is_complete(tiny, result.path)
    from honed.serving.local import LocalChatModel

    reply = LocalChatModel(result.path, temperature=0, max_tokens=3).invoke("hi")
    assert reply.response_metadata["token_ids"]
    assert json.dumps(method.config())  # recorded with the training run
    assert method.config()["chosen"] == {
        "per_device_train_batch_size": 2,
        "activation_checkpointing": False,
        **FEW_STEPS,
    }
    assert method.config()["settings"]["max_steps"] == 2


def test_sft_keeps_a_conversation_longer_than_trls_default_and_says_when_none_fits(
    store: TrajectoryStore, tiny: Path, tmp_path: Path, tokenizer: Any
) -> None:
    """A QA pass (session 15): honed left TRL's `max_length` (1024) in place, which cut an agent's
    conversation (a long system prompt, many tool schemas) before the reply it was to learn and
    dropped the row without a word; with every row that long, training died on an unclear error."""
    long_system = "You are a calculator. " + "Check every digit twice before you answer. " * 45
    assert 1100 < len(tokenizer(long_system)["input_ids"]) < 1900  # over TRL's 1024, within the model's 2048
    add(store, make_trajectory("t1", system=long_system), True)
    data = prepare(store, "sft")
    trainer = SFTMethod(**FEW_STEPS).build_trainer(tiny, data, tmp_path / "scratch")
    assert trainer.args.max_length == 2048 and len(trainer.train_dataset) == 1  # the model's window
    assert SFTMethod(max_length=512, **FEW_STEPS).chosen["max_length"] == 512  # the user's choice wins
    with pytest.raises(NothingToLearn, match="longer than max_length=512"):
        SFTMethod(max_length=512, **FEW_STEPS).train(tiny, data, tmp_path / "out")


def test_sft_on_a_later_turn_trains_only_that_turns_replies(
    store: TrajectoryStore, tiny: Path, tmp_path: Path
) -> None:
    earlier = [
        {"role": "user", "content": "What is 1 plus 1?"},
        {"role": "assistant", "content": "It is 11."},  # judged by the first turn's own verdict
    ]
    add(store, make_trajectory("t1", history=earlier), True)
    data = prepare(store, "sft")
    assert [m["role"] for m in data.dataset[0]["messages"]][:4] == ["system", "user", "assistant", "user"]
    method = SFTMethod(per_device_train_batch_size=1, activation_checkpointing=False, **FEW_STEPS)
    trainer = method.build_trainer(tiny, data, tmp_path / "scratch")
    tok = trainer.processing_class
    batch = trainer.data_collator(list(trainer.train_dataset))
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    trained = _runs([t if label != -100 else None for t, label in zip(ids, labels, strict=True)])
    assert [tok.decode(run, skip_special_tokens=False) for run in trained] == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>',
        f"{THINK}The sum is 5.<|im_end|>",
    ]
    masked = tok.decode([t for t, label in zip(ids, labels, strict=True) if label == -100])
    assert "It is 11.<|im_end|>" in masked  # the earlier turn is context, rendered as at run time
    # ... and TRL's probe that the end-of-turn token trains (a reply between two user messages)
    # still finds it: it warned "the model may not learn to stop" on every SFT run.
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    from honed.learn.chat_templates import training_template

    assert is_chat_template_stop_token_trained(tok, chat_template=training_template())


def _runs(ids: list[int | None]) -> list[list[int]]:
    """Contiguous runs of non-None ids."""
    runs: list[list[int]] = []
    for i, token in enumerate(ids):
        if token is None:
            continue
        if i == 0 or ids[i - 1] is None:
            runs.append([])
        runs[-1].append(token)
    return runs


def test_sft_on_recorded_token_ids_uses_them_verbatim(
    store: TrajectoryStore, tiny: Path, tokenizer: Any, tmp_path: Path
) -> None:
    recorded = {}
    for task_id, a in (("t1", 2), ("t2", 4)):
        ids = recorded_ids(tokenizer, task_id, a)
        answer = f"The sum is {a + 3}."  # what the ids say: ids that say other text never train
        recorded[add(store, make_trajectory(task_id, a=a, answer=answer, token_ids=ids), True).id] = ids
    data = prepare(store, "sft", tokenizer=tokenizer)
    assert data.pretokenized
    method = SFTMethod(per_device_train_batch_size=2, max_steps=1)
    trainer = method.build_trainer(tiny, data, tmp_path / "scratch")
    assert trainer.args.completion_only_loss and not trainer.args.assistant_only_loss
    expected = sorted(
        (prompt + completion, [-100] * len(prompt) + completion)
        for p1, c1, p2, c2 in recorded.values()
        for prompt, completion in ((p1, c1), (p2, c2))
    )
    assert sorted((r["input_ids"], r["labels"]) for r in trainer.train_dataset) == expected
    result = method.train(tiny, data, tmp_path / "out")
    assert result.metrics["steps"] == 1
    assert changed_parameters(tiny, result.path)


def recorded_ids(tokenizer: Any, task_id: str, a: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """Token ids as LocalChatModel records them: the rendered prompt and the sampled completion."""
    call = f'<tool_call>\n{{"name": "add", "arguments": {{"a": {a}, "b": 3}}}}\n</tool_call>'
    user = {"role": "user", "content": question(task_id)}
    first = [{"role": "system", "content": SYSTEM}, user]
    second = [
        *first,
        {"role": "assistant", "content": call},
        {"role": "tool", "content": str(a + 3)},
    ]

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(messages: list[dict[str, Any]]) -> list[int]:
        return encode(
            tokenizer.apply_chat_template(
                messages, tools=[ADD_SCHEMA], add_generation_prompt=True, tokenize=False
            )
        )

    answer = f"The sum is {a + 3}."
    return (
        prompt(first),
        encode(THINK + call + "<|im_end|>"),
        prompt(second),
        encode(THINK + answer + "<|im_end|>"),
    )


def test_lora_is_merged_into_a_plain_model_folder(store: TrajectoryStore, tiny: Path, tmp_path: Path) -> None:
    add(store, make_trajectory("t1"), True)
    add(store, make_trajectory("t2", a=4), True)
    method = SFTMethod(lora=True, per_device_train_batch_size=2, learning_rate=1e-2, max_steps=1)
    assert method.config()["peft"]["r"] == 16
    result = method.train(tiny, prepare(store, "sft"), tmp_path / "out")
    saved_model_is_complete(tiny, result.path)


# -- KTO, DPO ----------------------------------------------------------------------------------


def test_kto_learns_from_passes_and_failures(store: TrajectoryStore, tiny: Path, tmp_path: Path) -> None:
    add(store, make_trajectory("t1"), True)
    add(store, make_trajectory("t1", answer="The sum is 6."), False)
    add(store, make_trajectory("t2", a=4, answer="The sum is 7."), True)
    add(store, make_trajectory("t2", a=4, answer="The sum is 8."), False)
    data = prepare(store, "kto")
    assert sorted(data.dataset["label"]) == [False, False, True, True]
    result = KTOMethod(per_device_train_batch_size=2, max_steps=2).train(tiny, data, tmp_path / "out")
    assert result.metrics["steps"] == 2
    saved_model_is_complete(tiny, result.path)


def test_kto_pushes_a_failure_down_only_after_it_diverged_from_a_pass(
    store: TrajectoryStore, tiny: Path, tmp_path: Path
) -> None:
    """TRL's KTO scores the whole completion, so a failure pushed down the tool call it shares
    with the pass; honed's moves the shared tokens into the failure's prompt."""
    add(store, make_trajectory("t1"), True)
    add(store, make_trajectory("t1", answer="The sum is 6."), False)
    data = prepare(store, "kto")
    trainer = KTOMethod(per_device_train_batch_size=2).build_trainer(tiny, data, tmp_path / "s")
    tok = trainer.processing_class
    rows = {row["label"]: row for row in trainer.train_dataset}
    assert tok.decode(rows[False]["completion_ids"]).startswith("6.")
    assert tok.decode(rows[False]["prompt_ids"]).endswith("The sum is ")
    assert "<tool_call>" in tok.decode(rows[True]["completion_ids"])  # passes keep their whole completion
    plain = KTOMethod(per_device_train_batch_size=2, after_divergence=False)
    assert plain.config()["after_divergence"] is False
    whole = {row["label"]: row for row in plain.build_trainer(tiny, data, tmp_path / "p").train_dataset}
    assert whole[False]["prompt_ids"] == whole[True]["prompt_ids"]
    assert "<tool_call>" in tok.decode(whole[False]["completion_ids"])
    assert (
        KTOMethod(max_steps=1, per_device_train_batch_size=2)
        .train(tiny, data, tmp_path / "o")
        .metrics["steps"]
        == 1
    )


def test_kto_weighs_passes_against_failures(store: TrajectoryStore, tiny: Path, tmp_path: Path) -> None:
    """A loop fails more often than it passes: unweighted, the failures' push-down dominates."""
    add(store, make_trajectory("t1"), True)
    for answer in (6, 7, 8):
        add(store, make_trajectory("t1", answer=f"The sum is {answer}."), False)
    trainer = KTOMethod(per_device_train_batch_size=2).build_trainer(
        tiny, prepare(store, "kto"), tmp_path / "s"
    )
    assert trainer.args.undesirable_weight == pytest.approx(1 / 3) and trainer.args.desirable_weight == 1.0
    user = KTOMethod(per_device_train_batch_size=2, undesirable_weight=0.9)  # the user's word wins
    assert user.build_trainer(tiny, prepare(store, "kto"), tmp_path / "u").args.undesirable_weight == 0.9


def test_dpo_learns_from_pairs(store: TrajectoryStore, tiny: Path, tmp_path: Path) -> None:
    add(store, make_trajectory("t1"), True)
    add(store, make_trajectory("t1", answer="The sum is 6."), False)
    add(store, make_trajectory("t2", a=4, answer="The sum is 7."), True)
    add(store, make_trajectory("t2", a=4, answer="The sum is 8."), False)
    data = prepare(store, "dpo")
    assert len(data.dataset) == 2
    result = DPOMethod(per_device_train_batch_size=2, **FEW_STEPS).train(tiny, data, tmp_path / "out")
    assert result.metrics["steps"] == 2
    saved_model_is_complete(tiny, result.path)


# -- GRPO --------------------------------------------------------------------------------------


class EvenLength(BaseVerifier):
    """Passes an answer of even length: on a random model's samples, rewards that differ."""

    name = "even"

    def check(self, t: Trajectory) -> Any:
        return verdict(len(t.answer) % 2 == 0, "parity")


class NeverPasses(BaseVerifier):
    name = "never"

    def check(self, t: Trajectory) -> Any:
        return verdict(False, "no")


def grpo_data(store: TrajectoryStore) -> TrainingData:
    add(store, make_trajectory("t1"), True)
    add(store, make_trajectory("t2", a=4), False)
    return prepare(store, "grpo")


def test_grpo_learns_from_groups_whose_rewards_differ(
    store: TrajectoryStore, tiny: Path, tmp_path: Path
) -> None:
    data = grpo_data(store)
    method = GRPOMethod(
        [EvenLength()], tools=[add_tool()], num_generations=4, max_completion_length=8, learning_rate=1e-3,
        per_device_train_batch_size=8, max_tool_calling_iterations=1, **FEW_STEPS,
    )  # fmt: skip
    assert method.config()["verifiers"] == ["even"] and method.config()["tools"] == ["add"]
    result = method.train(tiny, data, tmp_path / "out")
    assert result.metrics["steps"] == 2
    assert 0.0 <= result.metrics["zero_variance_groups"] < 1.0
    saved_model_is_complete(tiny, result.path)


def test_langchain_tools_become_functions_trl_can_describe_and_call() -> None:
    from transformers.utils import get_json_schema

    add = trl_tool(add_tool())
    assert add(a=2, b=3) == 5
    schema = get_json_schema(add)["function"]
    assert schema["name"] == "add" and schema["description"] == "Add two integers."
    assert schema["parameters"]["required"] == ["a", "b"]
    assert schema["parameters"]["properties"]["a"]["type"] == "integer"
    assert trl_tool(_plain_function) is _plain_function
    with pytest.raises(TypeError):
        trl_tool("add")


def _plain_function(x: int) -> int:
    """Identity.

    Args:
        x: a number
    """
    return x


class CannotJudge(BaseVerifier):
    name = "unsure"

    def check(self, t: Trajectory) -> Any:
        raise CannotTell("no reference")


@pytest.mark.parametrize(
    ("verifier", "reason"), [(NeverPasses(), "same reward"), (CannotJudge(), "could tell")]
)
def test_grpo_without_reward_differences_has_nothing_to_learn(
    store: TrajectoryStore, tiny: Path, tmp_path: Path, verifier: BaseVerifier, reason: str
) -> None:
    method = GRPOMethod(
        [verifier], num_generations=2, max_completion_length=4, per_device_train_batch_size=4, max_steps=1
    )
    with pytest.raises(NothingToLearn, match=reason) as caught:
        method.train(tiny, grpo_data(store), tmp_path / "out")
    assert caught.value.metrics["steps"] == 1
    if reason == "same reward":
        assert caught.value.metrics["zero_variance_groups"] == 1.0
    assert not (tmp_path / "out").exists()


# -- configuration -----------------------------------------------------------------------------


def sft_rows() -> TrainingData:
    return TrainingData(dataset=None, method="sft", trajectory_ids=[], counts={})


def test_defaults_are_trls_with_honeds_logistics(tmp_path: Path) -> None:
    args = SFTMethod().training_args(tmp_path / "scratch", sft_rows(), seed=3)
    # TRL's documented defaults for a real model ...
    assert (args.learning_rate, args.num_train_epochs, args.per_device_train_batch_size) == (2e-5, 3, 8)
    assert args.activation_checkpointing is True and args.lr_scheduler_type == "linear"
    assert args.bf16 is _bf16_available()  # TRL's bf16=True where transformers allows it
    # ... honed's logistics, seed and scratch folder, and what its rows need.
    assert args.report_to == [] and args.save_strategy == "no" and args.logging_steps == 1
    assert args.seed == 3 and args.output_dir == str(tmp_path / "scratch") and args.assistant_only_loss
    settings = SFTMethod().config()["settings"]
    assert settings["learning_rate"] == 2e-5 and settings["num_train_epochs"] == 3
    assert settings["per_device_train_batch_size"] == 8 and settings["bf16"] is _bf16_available()
    for method in (KTOMethod(), DPOMethod(), GRPOMethod([NeverPasses()])):
        assert method.config()["settings"]["learning_rate"] == 1e-6, method.name


def test_keyword_fields_override_without_conflicts(tmp_path: Path) -> None:
    method = SFTMethod(gradient_checkpointing=False, learning_rate=1e-5, assistant_only_loss=False)
    args = method.training_args(tmp_path, sft_rows())
    assert args.activation_checkpointing is False and args.gradient_checkpointing is False
    assert args.learning_rate == 1e-5 and args.assistant_only_loss is False  # the user's word wins
    assert method.config()["settings"]["activation_checkpointing"] is False
    with pytest.raises(TypeError, match=r"no_such_setting not fields of trl\.SFTConfig"):
        SFTMethod(no_such_setting=1)


def test_a_users_trl_config_reaches_the_trainer(store: TrajectoryStore, tiny: Path, tmp_path: Path) -> None:
    from trl import GRPOConfig, KTOConfig, SFTConfig

    add(store, make_trajectory("t1"), True)
    add(store, make_trajectory("t2", a=4), True)
    config = SFTConfig(
        output_dir=str(tmp_path / "theirs"), learning_rate=3e-4, per_device_train_batch_size=2,
        lr_scheduler_type="constant", seed=7, max_steps=1, bf16=False, weight_decay=0.01,
    )  # fmt: skip
    method = SFTMethod(config=config)
    trainer = method.build_trainer(tiny, prepare(store, "sft"), tmp_path / "scratch", seed=0)
    args = trainer.args
    assert args.learning_rate == 3e-4 and args.per_device_train_batch_size == 2
    assert args.lr_scheduler_type == "constant" and args.weight_decay == 0.01 and args.bf16 is False
    assert args.seed == 7 and args.max_steps == 1  # the config's seed wins over the cycle's
    assert args.output_dir == str(tmp_path / "scratch")  # honed's scratch folder, not theirs
    assert args.save_strategy == "no" and args.assistant_only_loss  # left at TRL's default: honed's
    chosen = method.config()["chosen"]
    assert chosen["learning_rate"] == 3e-4 and "output_dir" not in chosen
    # What is recorded with the run holds no credential (a QA pass, session 17: a `hub_token`).
    token = "hf_" + "a1B2c3D4e5" * 4
    recorded = json.dumps(SFTMethod(config=config, hub_token=token).config())
    assert token not in recorded and "[REDACTED:" in recorded
    # TRL's activation checkpointing stays on; the shared-prefix loss gives way to TRL's.
    assert args.activation_checkpointing is True
    assert trainer.train().global_step == 1
    # Keyword fields win over the config's.
    overridden = SFTMethod(config=config, learning_rate=1e-3)
    assert overridden.training_args(tmp_path, sft_rows()).learning_rate == 1e-3
    # Fields TRL derives in __post_init__ come through consistent (GRPO's generation batch).
    grpo = GRPOConfig(
        output_dir="x", bf16=False, num_generations=2, per_device_train_batch_size=4, steps_per_generation=2
    )
    args = GRPOMethod([NeverPasses()], config=grpo).training_args(tmp_path, sft_rows())
    assert (args.num_generations, args.steps_per_generation, args.generation_batch_size) == (2, 2, 8)
    with pytest.raises(TypeError, match=r"takes a trl\.SFTConfig, not KTOConfig"):
        SFTMethod(config=KTOConfig(output_dir="x", bf16=False))


def test_chat_templates_get_generation_markers_only_where_honed_can_place_them() -> None:
    from honed.learn.chat_templates import QWEN3_CHAT_TEMPLATE, training_template

    assert _with_generation_markers(QWEN3_CHAT_TEMPLATE) == training_template(QWEN3_CHAT_TEMPLATE)
    marked = training_template()
    assert _with_generation_markers(marked) == marked  # already trainable
    other = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert _with_generation_markers(other) == other  # TRL's own handling decides


def test_saving_keeps_every_file_of_the_base_but_its_weights(
    store: TrajectoryStore, tiny: Path, tmp_path: Path
) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny, base)
    (base / "my_manifest.yaml").write_text("owner: me\n")
    add(store, make_trajectory("t1"), True)
    trainer = SFTMethod(per_device_train_batch_size=1, max_steps=1).build_trainer(
        base, prepare(store, "sft"), tmp_path / "scratch"
    )
    trainer.train()
    _save(trainer, base, tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {p.name for p in base.iterdir()}  # nothing the trainer wrote beyond the model
    assert (tmp_path / "out" / "my_manifest.yaml").read_text() == "owner: me\n"
    saved_model_is_complete(base, tmp_path / "out")


def test_verifier_reward_scores_completions_as_trajectories() -> None:
    prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2 plus 3?"}]
    completion = [
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "name": "add", "content": "5"},
        {"role": "assistant", "content": "<think>\nsum\n</think>\n\nThe sum is 5."},
    ]  # fmt: skip
    t = completion_trajectory(prompt, completion, task_id="t1", metadata='{"expected": "5"}', split="train")
    assert t.answer == "The sum is 5." and t.task == "What is 2 plus 3?" and t.metadata == {"expected": "5"}
    assert [s.kind for s in t.steps] == ["model", "tool", "model"]
    assert t.steps[0].tool_calls[0]["name"] == "add" and t.steps[0].tool_calls[0]["args"] == {"a": 2, "b": 3}
    assert t.steps[2].reasoning == "sum"

    class Broken(BaseVerifier):
        name = "broken"

        def check(self, t: Trajectory) -> Any:
            raise RuntimeError("boom")

    reward = VerifierReward([ReferenceMatch("numeric"), Broken()])
    wrong = [{"role": "assistant", "content": "It is 6."}]
    scores = reward(
        prompts=[prompt] * 3,
        completions=[completion, wrong, wrong],
        task_id=["t1"] * 3,
        metadata=['{"expected": "5"}', '{"expected": "5"}', "{}"],  # the last: no reference, no signal
        split=["train"] * 3,
        trainer_state=None,
    )
    assert scores == [1.0, 0.0, None]
    assert VerifierReward([Broken()]).score(t) is None
    # Routed as the Worker routes: a task that names its verifier meets only that one.
    both = VerifierReward([ReferenceMatch("numeric"), NeverPasses()])
    assert both.score(t) == 0.0
    named = completion_trajectory(prompt, completion, metadata={"expected": "5", "verifier": "reference"})
    assert both.score(named) == 1.0

    # Only verifiers that may label training data reward: a model judge (low trust) a completion
    # can talk into a pass, and one the store's policy refuses (below its audited precision).
    class Gullible(BaseVerifier):
        name, trust = "judge", "low"

        def check(self, t: Trajectory) -> Any:
            return Verdict(passed=True, reason="looks right to me")

    wrong_t = completion_trajectory(prompt, wrong, task_id="t1", metadata={"expected": "5"})
    assert VerifierReward([Gullible()]).score(wrong_t) is None
    assert VerifierReward([Gullible()], usable={"judge": True}).score(wrong_t) == 1.0  # audited, vouched for
    assert VerifierReward([ReferenceMatch("numeric")], usable={"reference": False}).score(t) is None


# -- distillation, empty data ------------------------------------------------------------------


def test_distill_with_a_teacher_runs_trl_distillation(
    store: TrajectoryStore, tiny: Path, tmp_path: Path
) -> None:
    add(store, make_trajectory("t1", agent="teacher"), True)
    add(store, make_trajectory("t2", agent="teacher", a=4), True)
    add(store, make_trajectory("t3", agent="student", a=5), True)
    data = prepare(store, "distill", agent="teacher")
    assert sorted(data.dataset["task_id"]) == ["t1", "t2"]
    teacher = tiny_path(1)  # same tokenizer, other weights
    method = DistillMethod(
        teacher=teacher, per_device_train_batch_size=2, max_completion_length=8, max_steps=1
    )
    assert method.config()["teacher"] == str(teacher)
    result = method.train(tiny, data, tmp_path / "out")
    assert result.metrics["steps"] == 1
    saved_model_is_complete(tiny, result.path)


def test_empty_or_mismatched_data_never_reaches_a_trainer(store: TrajectoryStore, tmp_path: Path) -> None:
    add(store, make_trajectory("t1"), False)
    missing = tmp_path / "no-model-here"  # nothing is loaded before the check
    methods: list[tuple[Any, str]] = [
        (SFTMethod(), "sft"),
        (KTOMethod(), "kto"),
        (DPOMethod(), "dpo"),
        (GRPOMethod([NeverPasses()]), "grpo"),
        (DistillMethod(), "distill"),
    ]
    for method, name in methods:
        data = prepare(store, name, agent="nobody")
        with pytest.raises(NothingToLearn, match="no rows"):
            method.train(missing, data, tmp_path / "out")
    with pytest.raises(ValueError, match="KTOMethod trains on"):
        KTOMethod().train(missing, prepare(store, "sft", agent="nobody"), tmp_path / "out")
    with pytest.raises(ValueError, match="verifier"):
        GRPOMethod([])
