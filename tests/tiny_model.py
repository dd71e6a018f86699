"""Tiny models for the serving tests, built once per test process.

`tiny_path(seed)` is a randomly initialised model (it says garbage, which is fine for batching,
swapping and attribution tests). `tool_model_path()` is the same model trained for a few seconds
to memorise one tool-calling conversation, so real clients (LangChain agents, the `openai`
package, `ChatOpenAI`) can be tested on a model that really emits `<tool_call>` and then answers.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

_ROOT = Path(tempfile.mkdtemp(prefix="honed-tiny-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)

QUESTION = "What is 2 plus 3?"
# The adder suite's requests: its training tasks ask QUESTIONS, its held-out ones another
# phrasing (a held-out task never asks what a training task asks: training on the same request
# is training on the gate), and the model memorises all three.
QUESTIONS = (QUESTION, "What is two plus three?")
HELDOUT_QUESTION = "Please add 2 and 3."
ANSWER = "The sum is 5."
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
THINK = "<think>\n\n</think>\n\n"


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@functools.cache
def add_tool() -> Any:
    from langchain_core.tools import tool

    return tool(add)


@functools.cache
def add_schema() -> dict[str, Any]:
    """The exact tool schema every client sends (LangChain converts `add` to this)."""
    from langchain_core.utils.function_calling import convert_to_openai_tool

    return convert_to_openai_tool(add_tool())


@functools.cache
def tiny_path(seed: int = 0) -> Path:
    from honed.demo import build_tiny

    return build_tiny(_ROOT / f"tiny-{seed}", seed=seed)


def copy_model(source: Path, name: str) -> Path:
    """A copy in a new folder (a new version with the same weights, or one to corrupt)."""
    target = _ROOT / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    return target


@functools.cache
def tool_model_path() -> Path:
    """The tiny model trained to answer QUESTION (and the suite's other QUESTIONS, HELDOUT_QUESTION)
    with a call to `add`, then ANSWER after the result."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from honed.demo import build_tiny

    # A narrower sibling of the tiny model (same tokenizer and template): memorising one
    # conversation takes it about a second instead of a minute.
    source = build_tiny(
        _ROOT / "tool-base", seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    tools = [add_schema()]
    pairs = []
    for question in (*QUESTIONS, HELDOUT_QUESTION):
        first = [{"role": "user", "content": question}]
        arguments = {"a": 2, "b": 3}
        second = [
            *first,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": arguments}}],
            },
            {"role": "tool", "content": "5"},
        ]
        pairs += [(first, THINK + CALL), (second, THINK + ANSWER)]
    rows = []
    for messages, completion in pairs:
        prompt = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids, completion_ids))
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is several times faster on a busy machine
    try:
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        target = labels != -100
        for _step in range(400):
            out = model(input_ids=ids, labels=labels)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            # Greedy decoding reproduces the completions once every next-token argmax is right.
            predicted = out.logits[:, :-1].argmax(-1)
            if bool((predicted == labels[:, 1:])[target[:, 1:]].all()) and out.loss.item() < 0.05:
                break
    finally:
        torch.set_num_threads(threads)
    model.eval()
    out = _ROOT / "tool-model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
