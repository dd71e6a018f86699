"""Trajectories as fine-tuning data: OpenAI chat-format JSONL, Hugging Face Dataset / parquet,
the filters, and a round trip through TRL's SFTTrainer."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from typer.testing import CliRunner

import honed
from fakes import ToolScriptModel, make_tools
from honed import Step, Trajectory, Verdict
from honed.cli import app
from honed.cli.common import parse_when
from honed.exporters import select_trajectories
from honed.exporters.datasets import (
    chat_example,
    dataset_features,
    to_hf_dataset,
    write_jsonl,
    write_parquet,
)

SYSTEM = "You are a calculator. Use the tools."
ADD = 'call add {"a": 2, "b": 3}; answer the sum is {result}'
TWO_TOOLS = 'call add {"a": 1, "b": 2}; call mul {"a": 3, "b": 4}; answer {result}'
HELD = 'call add {"a": 4, "b": 5}; answer the sum is {result}'  # a held-out task asks its own question

# task id → (task text, split, model name, verdict: True pass, False fail, None unlabeled)
RUNS = {
    "t-add": (ADD, "train", "calc@v1", True),
    "t-two": (TWO_TOOLS, "train", "calc@v2", True),
    "t-direct": ("answer 42", None, "calc@v2", True),
    "t-wrong": (ADD, "train", "calc@v1", False),
    "t-held": (HELD, "heldout", "calc@v1", True),
    "t-unlabeled": (ADD, "train", "calc@v1", None),
}


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def verified(sqlite_url: str) -> str:
    """A store with real captured runs (middleware: exact messages and tools) and verdicts."""
    middleware = honed.Middleware(store=sqlite_url)
    for task_id, (text, split, model_name, _) in RUNS.items():
        agent = create_agent(
            ToolScriptModel(model_name=model_name), make_tools(), name="calc", system_prompt=SYSTEM,
            middleware=[middleware],
        )  # fmt: skip
        config = {"metadata": {"honed": {"task_id": task_id, **({"split": split} if split else {})}}}
        agent.invoke({"messages": [("user", text)]}, config=config)
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    for t in store.trajectories():
        passed = RUNS[t.task_id][3]
        if passed is not None:
            store.add_verdict(t.id, Verdict(passed=passed, verifier="reference"))
    return sqlite_url


def exported_task_ids(store_url: str, **filters: Any) -> list[str]:
    store = honed.open_store(store_url)
    return sorted(t.task_id for t in select_trajectories(store, **filters))


def test_jsonl_is_the_openai_chat_format_with_tools(verified: str, tmp_path: Path) -> None:
    store = honed.open_store(verified)
    out = tmp_path / "train.jsonl"
    result = write_jsonl(select_trajectories(store, verdict="pass"), out)
    assert result.written == 3 and result.skipped == {}
    rows = {row["messages"][1]["content"]: row for row in lines(out)}
    assert set(rows) == {ADD, TWO_TOOLS, "answer 42"}

    add = rows[ADD]
    assert add["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": ADD},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_0_add",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0_add", "content": "5"},
        {"role": "assistant", "content": "the sum is 5"},
    ]
    assert [tool["function"]["name"] for tool in add["tools"]] == ["add", "mul", "explode", "fragile"]
    add_schema = add["tools"][0]
    assert add_schema["type"] == "function"
    assert add_schema["function"]["parameters"]["properties"] == {
        "a": {"type": "integer"},
        "b": {"type": "integer"},
    }
    assert add_schema["function"]["description"] == "Add two integers."

    two = rows[TWO_TOOLS]["messages"]
    assert [m["role"] for m in two] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
        "assistant",
    ]
    assert two[4]["tool_calls"][0]["function"] == {"name": "mul", "arguments": '{"a": 3, "b": 4}'}
    assert two[-1] == {"role": "assistant", "content": "12"}


def test_an_export_stopped_midway_leaves_the_previous_file_whole(verified: str, tmp_path: Path) -> None:
    """A QA pass (session 15): an interrupted `honed export jsonl` had already replaced the last
    complete export with the first few thousand rows of the new one."""
    store = honed.open_store(verified)
    out = tmp_path / "train.jsonl"
    write_jsonl(select_trajectories(store, verdict="pass"), out)
    complete = out.read_text()

    def stopped() -> Any:
        yield from select_trajectories(store, verdict="pass", limit=1)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(stopped(), out)
    parquet = tmp_path / "train.parquet"
    write_parquet(select_trajectories(store, verdict="pass"), parquet)
    before = parquet.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        write_parquet(stopped(), parquet, rows_per_group=1)
    assert parquet.read_bytes() == before
    assert out.read_text() == complete and not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_filters_and_held_out_exclusion(verified: str) -> None:
    assert exported_task_ids(verified, verdict="pass") == ["t-add", "t-direct", "t-two"]
    assert exported_task_ids(verified, verdict="pass", include_heldout=True) == [
        "t-add", "t-direct", "t-held", "t-two",
    ]  # fmt: skip
    assert exported_task_ids(verified, split="heldout") == ["t-held"]  # asking for the split is asking
    assert exported_task_ids(verified, verdict="fail") == ["t-wrong"]
    assert exported_task_ids(verified, verdict="unlabeled") == ["t-unlabeled"]
    assert exported_task_ids(verified, verdict="pass", split="train") == ["t-add", "t-two"]
    assert exported_task_ids(verified, verdict="pass", model_version="calc@v2") == ["t-direct", "t-two"]
    assert exported_task_ids(verified, task_ids=["t-two", "t-held", "t-add", "t-two"]) == ["t-add", "t-two"]
    now = datetime.now(UTC)
    assert exported_task_ids(verified, verdict="pass", since=now + timedelta(hours=1)) == []
    assert exported_task_ids(verified, verdict="pass", since=now - timedelta(hours=1)) == [
        "t-add", "t-direct", "t-two",
    ]  # fmt: skip
    store = honed.open_store(verified)
    assert len(list(select_trajectories(store, limit=2, page_size=1))) == 2


def test_unfaithful_trajectories_are_skipped_and_counted(sqlite_url: str, tmp_path: Path) -> None:
    store = honed.open_store(sqlite_url)
    marker = {"__truncated__": True, "type": "str", "size": 10**6, "sha256": "0" * 64, "preview": "..."}
    when = datetime(2025, 1, 1, tzinfo=UTC)

    def model_step(content: Any, output: Any = None) -> Step:
        messages = [{"role": "user", "content": content}]
        reply = output if output is not None else {"role": "assistant", "content": "ok"}
        return Step(
            id=f"s-{id(content)}", index=0, kind="model", name="m", input={"messages": messages}, output=reply
        )

    cases = {
        "good": [model_step("hi")],
        "cut-content": [model_step(marker)],
        "cut-input": [
            Step(id="s-cut", index=0, kind="model", name="m", input=marker, output={"role": "assistant"})
        ],
        "image": [model_step([{"type": "image_url", "image_url": {"url": "x"}}])],
        "no-model": [Step(id="s-tool", index=0, kind="tool", name="add", input={"a": 1})],
        "no-reply": [Step(id="s-nr", index=0, kind="model", name="m", input={"messages": []}, error="boom")],
    }
    for task_id, steps in cases.items():
        store.save(Trajectory(id=f"id-{task_id}", agent="a", task_id=task_id, steps=steps, started_at=when))
    result = write_jsonl(select_trajectories(store), tmp_path / "out.jsonl")
    assert result.written == 1
    assert result.skipped == {"truncated": 2, "non_text_content": 1, "no_chat_model_step": 1, "no_reply": 1}
    example = chat_example(store.get("id-good"), reasoning=True)
    assert example == {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    }


def test_hf_dataset_and_parquet_keep_tools_whole(verified: str, tmp_path: Path) -> None:
    import pyarrow.parquet as pq
    from datasets import Dataset

    store = honed.open_store(verified)
    examples = {t.id: chat_example(t) for t in select_trajectories(store, verdict="pass")}
    dataset = to_hf_dataset(select_trajectories(store, verdict="pass"))
    assert dataset.num_rows == 3 and dataset.features == dataset_features()
    for row in dataset:
        example = examples[row["trajectory_id"]]
        # Tool schemas with different parameters are not merged into one struct full of None.
        assert row["tools"] == example["tools"]
        assert [m["role"] for m in row["messages"]] == [m["role"] for m in example["messages"]]
        # Arguments as objects, as chat templates read them (JSONL keeps OpenAI's strings): a
        # Qwen2.5 or Llama 3 template wrote a JSON string inside the call (a QA pass, session 20).
        calls = [c for m in row["messages"] for c in m["tool_calls"] or ()]
        assert calls == [
            {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
            for m in example["messages"]
            for c in m.get("tool_calls", ())
        ]
        assert row["agent"] == "calc" and row["task_id"] in {"t-add", "t-two", "t-direct"}
    import trl

    templates = Path(trl.__file__).parent / "chat_templates"
    _, tokenizer = tiny_chat_model(["a b"])
    for name in ("llama3_2.jinja", "qwen2_5_training.jinja"):
        if (templates / name).exists():
            tokenizer.chat_template = (templates / name).read_text()
            text = "".join(
                tokenizer.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False)
                for row in dataset
            )
            assert '"a": 2' in text and '\\"a\\"' not in text, (name, text[:800])

    path = tmp_path / "train.parquet"
    result = write_parquet(select_trajectories(store, verdict="pass"), path, rows_per_group=2)
    assert result.written == 3
    assert Dataset.from_parquet(str(path)).to_list() == dataset.to_list()
    empty = tmp_path / "empty.parquet"
    assert write_parquet([], empty).written == 0
    table = pq.read_table(empty)
    assert table.num_rows == 0 and table.schema.names == list(dataset_features())


def test_cli_export_jsonl_and_hf(verified: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    out = tmp_path / "train.jsonl"
    result = runner.invoke(app, ["export", "jsonl", str(out), "--store", verified, "--json"])
    assert result.exit_code == 0, result.output
    # What the held-out policy left out is said too (a QA pass, session 28: `"skipped": {}` only).
    assert json.loads(result.output) == {"written": 3, "skipped": {}, "path": str(out), "heldout_excluded": 1}
    assert len(lines(out)) == 3

    args = ["--store", verified, "--task-id", "t-held", "--task-id", "t-add", "--since", "1h"]
    result = runner.invoke(app, ["export", "jsonl", str(out), *args])
    assert result.exit_code == 0 and "wrote 1 example to" in result.output
    assert "1 matching run left out: held out" in " ".join(result.output.split()), result.output
    result = runner.invoke(
        app, ["export", "jsonl", str(out), *args, "--include-heldout", "--model-version", "calc@v1"]
    )
    assert "wrote 2 examples" in result.output and "no stored runs" not in result.output
    # A held-out task asked for by id wrote nothing and said nothing (a QA pass, session 19).
    result = runner.invoke(app, ["export", "jsonl", str(out), "--store", verified, "--task-id", "t-held"])
    assert result.exit_code == 0 and "wrote 0 examples" in result.output
    assert "matching run left out: held out" in " ".join(result.output.split()), result.output
    assert "--include-heldout" in result.output, result.output
    # A typo'd version wrote nothing and said nothing (a QA pass, session 18): it names what is
    # stored; and it replaced the export with an empty file, exit 0 (a QA pass, session 25).
    before = out.read_bytes()
    for typo in (["--model-version", "calc@v9"], ["--agent", "calcc"], ["--task-id", "t-nope"]):
        result = runner.invoke(app, ["export", "jsonl", str(out), "--store", verified, *typo])
        assert result.exit_code == 1 and "wrote" not in result.output, result.output
        assert "no stored runs have" in result.output and "left as it was" in result.output, result.output
        assert out.read_bytes() == before
    assert (
        "(model versions: calc@v1"
        in runner.invoke(
            app, ["export", "jsonl", str(out), "--store", verified, "--model-version", "calc@v9"]
        ).output
    )
    result = runner.invoke(
        app, ["export", "jsonl", "-", "--store", verified, "--verdict", "any", "--split", "train"]
    )
    assert result.exit_code == 0
    assert len([line for line in result.stdout.splitlines() if line.startswith("{")]) == 4

    parquet = tmp_path / "d.parquet"
    result = runner.invoke(app, ["export", "hf", str(parquet), "--store", verified, "--verdict", "pass"])
    assert result.exit_code == 0 and "wrote 3 examples" in result.output
    folder = tmp_path / "saved"
    result = runner.invoke(app, ["export", "hf", str(folder), "--store", verified, "--json"])
    assert result.exit_code == 0, result.output
    from datasets import load_from_disk

    assert load_from_disk(str(folder)).num_rows == 3
    # Built from its rows in batches (memory flat: a QA pass, session 20), the same dataset as the parquet file.
    from datasets import Dataset

    assert load_from_disk(str(folder)).to_list() == Dataset.from_parquet(str(parquet)).to_list()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left beside it
    # A file name is a mistake `export hf` says so, not a folder called d.csv.
    result = runner.invoke(app, ["export", "hf", str(tmp_path / "d.csv"), "--store", verified])
    assert result.exit_code == 1 and "names a file" in result.output and not (tmp_path / "d.csv").exists()
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["export", "hf", "-", "--store", verified])  # a QA pass, session 26
    assert result.exit_code == 1 and "not standard output" in result.output and not Path("-").exists()

    result = runner.invoke(app, ["export", "jsonl", str(out), "--store", verified, "--verdict", "great"])
    assert result.exit_code != 0


def test_parse_when(monkeypatch: pytest.MonkeyPatch) -> None:
    now = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
    assert parse_when("30m", now) == now - timedelta(minutes=30)
    assert parse_when("1d12h", now) == now - timedelta(days=1, hours=12)
    # A time without a zone is local, as `honed runs` prints it (a QA pass, session 26: read as
    # UTC, a time copied from `honed runs` in New York missed the runs it showed).
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_when("2025-05-01T08:00") == datetime(2025, 5, 1, 12, 0, tzinfo=UTC)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert parse_when("2025-05-01T10:00:00+02:00").utcoffset() == timedelta(hours=2)
    with pytest.raises(Exception, match="neither"):
        parse_when("yesterday")


# -- TRL round trip ------------------------------------------------------------------------------


def tiny_chat_model(texts: list[str]) -> tuple[Any, Any]:
    """A tiny Qwen2 model and a BPE tokenizer trained here on `texts`, with TRL's Qwen3 chat
    template (nothing to download)."""
    import trl
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    template = (Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                "<tool_response>", "</tool_response>", "<think>", "</think>"]  # fmt: skip
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [*texts, template],
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=template
    )
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config), tokenizer


def test_exported_jsonl_trains_with_trl_sft_trainer_unchanged(verified: str, tmp_path: Path) -> None:
    from datasets import Dataset, load_dataset
    from trl import SFTConfig, SFTTrainer

    store = honed.open_store(verified)
    path = tmp_path / "train.jsonl"
    assert write_jsonl(select_trajectories(store, verdict="pass"), path).written == 3
    raw = lines(path)
    model, tokenizer = tiny_chat_model([path.read_text()])
    dataset = load_dataset("json", data_files=str(path), split="train")
    # What TRL renders from the loaded file is what the agent saw: no merged keys, no null arguments.
    for loaded, original in zip(dataset, raw, strict=True):
        rendered = tokenizer.apply_chat_template(loaded["messages"], tools=loaded["tools"], tokenize=False)
        expected = tokenizer.apply_chat_template(
            original["messages"], tools=original.get("tools"), tokenize=False
        )
        assert rendered == expected
    assert '"arguments": {"a": 3, "b": 4}' in "".join(
        tokenizer.apply_chat_template(row["messages"], tools=row["tools"], tokenize=False) for row in dataset
    )
    parquet = tmp_path / "train.parquet"
    write_parquet(select_trajectories(store, verdict="pass"), parquet)

    for name, train in (("jsonl", dataset), ("parquet", Dataset.from_parquet(str(parquet)))):
        args = SFTConfig(
            output_dir=str(tmp_path / name), use_cpu=True, bf16=False, activation_checkpointing=False,
            max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, report_to=[], save_strategy="no",
            logging_steps=1, assistant_only_loss=True, disable_tqdm=True,
        )  # fmt: skip
        trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
        output = trainer.train()
        assert output.global_step == 2
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(losses) == 2 and all(loss > 0 for loss in losses)


@pytest.mark.parametrize("entry", ["middleware", "instrument"])
def test_a_run_ending_in_a_subagent_exports_its_own_conversation(sqlite_url: str, entry: str) -> None:
    """A `return_direct` tool that runs a subagent ends the run inside it: the row for the run
    is the agent's own last call (its system prompt, its tools), never the subagent's, which the
    run's verdict did not judge."""
    from langchain_core.tools import tool

    middleware = [honed.Middleware(store=sqlite_url)] if entry == "middleware" else []
    if entry == "instrument":
        honed.instrument(store=sqlite_url)
    try:
        helper = create_agent(
            ToolScriptModel(),
            make_tools(),
            name="helper",
            system_prompt="I am the helper",
            middleware=middleware,
        )

        @tool(return_direct=True)
        def ask_helper(question: str) -> str:
            """Ask the helper agent."""
            out = helper.invoke(
                {"messages": [("user", 'call mul {"a": 6, "b": 7}; answer helper says {result}')]}
            )
            return out["messages"][-1].content

        boss = create_agent(
            ToolScriptModel(), [ask_helper], name="boss", system_prompt="I am the boss", middleware=middleware
        )
        boss.invoke({"messages": [("user", 'call ask_helper {"question": "6x7"}; answer unused')]})
        assert honed.flush()
    finally:
        honed.uninstrument()
    (run,) = honed.open_store(sqlite_url).trajectories()
    messages = chat_example(run)["messages"]
    assert messages[0] == {"role": "system", "content": "I am the boss"}
    assert [c["function"]["name"] for c in messages[-1]["tool_calls"]] == ["ask_helper"]


def test_earlier_turns_of_a_conversation_carry_weight_zero(sqlite_url: str, tmp_path: Path) -> None:
    """The second turn's row holds the first turn's answer: the verdict judged the second turn
    only, so the first turn's assistant messages say `weight: 0` (OpenAI trains every other)."""
    from langgraph.checkpoint.memory import InMemorySaver

    agent = create_agent(
        ToolScriptModel(), make_tools(), name="calc", checkpointer=InMemorySaver(),
        middleware=[honed.Middleware(store=sqlite_url)],
    )  # fmt: skip
    config = {"configurable": {"thread_id": "chat"}}
    agent.invoke({"messages": [("user", 'call add {"a": 2, "b": 2}; answer five {result}')]}, config)
    agent.invoke({"messages": [("user", 'call add {"a": 5, "b": 5}; answer {result}')]}, config)
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    second, _first = store.trajectories()
    out = tmp_path / "turn2.jsonl"
    write_jsonl([second], out)
    (row,) = lines(out)
    weights = [
        (m["role"], m.get("content"), m.get("weight")) for m in row["messages"] if m["role"] == "assistant"
    ]
    assert weights == [
        ("assistant", "", 0),
        ("assistant", "five 4", 0),
        ("assistant", "", None),
        ("assistant", "10", None),
    ]
    # ... and in the Hugging Face dataset and parquet file too (a QA pass, session 15: they had
    # no marker, so a failed earlier reply looked like verified training data)
    from datasets import Dataset

    write_parquet([second], tmp_path / "turn2.parquet")
    for dataset in (to_hf_dataset([second]), Dataset.from_parquet(str(tmp_path / "turn2.parquet"))):
        (hf_row,) = dataset
        hf = [(m["role"], m["content"], m["weight"]) for m in hf_row["messages"] if m["role"] == "assistant"]
        assert [w for *_, w in hf] == [w for *_, w in weights]


def test_an_empty_selection_writes_an_empty_dataset_everywhere(verified: str, tmp_path: Path) -> None:
    store = honed.open_store(verified)
    for target in ("empty.jsonl", "empty.parquet", "empty-folder"):
        command = "jsonl" if target.endswith("jsonl") else "hf"
        result = CliRunner().invoke(
            app, ["export", command, str(tmp_path / target), "--store", verified, "--since", "2099-01-01"]
        )  # (a name or task id no run has is refused: a typo, sessions 25 and 26; a time selects)
        assert result.exit_code == 0 and "wrote 0" in result.output, (target, result.output)
        # A QA pass (session 19): `datasets` refuses an empty parquet file; the user is told so.
        assert ("`datasets` refuses" in result.output) == target.endswith(".parquet"), result.output
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "empty.parquet").num_rows == 0
    assert len(to_hf_dataset(select_trajectories(store, agent="nobody"))) == 0
    # A QA pass (session 16): the empty folder had no shard, and `load_from_disk` failed on it.
    import datasets

    assert len(datasets.load_from_disk(str(tmp_path / "empty-folder"))) == 0


def test_an_export_to_a_pipe_or_through_a_link_writes_there(verified: str, tmp_path: Path) -> None:
    """A QA pass (session 16): the export was written beside its target and moved over it, which
    replaced a named pipe with a file (its reader got nothing) and a symbolic link with a copy
    (its file kept the old data)."""
    import os
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = CliRunner().invoke(app, ["export", "jsonl", str(fifo), "--store", verified])
    reader.join(30)
    assert result.exit_code == 0 and fifo.is_fifo() and got and got[0].count(b"\n") >= 1, result.output
    real, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    real.write_text("old\n")
    link.symlink_to(real)
    assert CliRunner().invoke(app, ["export", "jsonl", str(link), "--store", verified]).exit_code == 0
    assert link.is_symlink() and real.read_text().startswith('{"messages"')


def test_an_export_never_replaces_what_it_did_not_make(verified: str, tmp_path: Path) -> None:
    """A QA pass (session 20, a new user): `honed export hf .` replaced the folder it ran in (the
    store and the code beside it went), and `honed export jsonl honed.db` wrote over the store
    it read. A folder that is no saved dataset, or a database, is refused; nothing is written."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "app.py").write_text("print('mine')\n")
    store_file = Path(verified.removeprefix("sqlite:///"))
    before = store_file.read_bytes()
    for command, target in (("hf", project), ("hf", project / "src"), ("jsonl", store_file)):
        result = CliRunner().invoke(app, ["export", command, str(target), "--store", verified])
        assert result.exit_code == 1, result.output
        assert "nothing was written" in result.output, result.output
    assert (project / "src" / "app.py").read_text() == "print('mine')\n"
    assert store_file.read_bytes()[:16] == before[:16] and honed.open_store(verified).count() == len(RUNS)
    # An earlier export's folder (and an empty one) is replaced as before.
    for target in (tmp_path / "empty", tmp_path / "saved"):
        target.mkdir()
        for _ in range(2):
            result = CliRunner().invoke(app, ["export", "hf", str(target), "--store", verified])
            assert result.exit_code == 0 and "wrote 3 examples" in result.output, result.output
