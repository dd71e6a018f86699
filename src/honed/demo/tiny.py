"""`build_tiny`: a small randomly initialised tool-calling chat model, built offline in seconds.

Tests, the demo and the learning benchmark need a real transformers model with a real chat
template (tools, tool calls, tool results, think blocks) and no model hub. This builds one: a
byte-level BPE trained here on a small corpus (digits split, so numbers are learnable), the Qwen3
chat template TRL recognises, and a Qwen2-style decoder (4 layers, hidden 192: ~1.8M parameters,
the size that learned tool-calling arithmetic in the feasibility run), saved with `save_pretrained`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from honed.learn.chat_templates import QWEN3_CHAT_TEMPLATE

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Single tokens that stay in decoded text (not "special"), as in Qwen3's vocabulary.
TAG_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

DEFAULT_CONFIG: dict[str, Any] = {
    "hidden_size": 192,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rope_theta": 10_000.0,
    "tie_word_embeddings": True,
}


def build_tiny(
    path: str | Path,
    *,
    seed: int = 0,
    vocab_corpus: Iterable[str] | None = None,
    vocab_size: int = 384,
    **config: Any,
) -> Path:
    """Build and save a tiny causal LM and its tokenizer at `path`; returns the folder.

    Deterministic for a given `seed` and corpus: the same call writes the same weights. `config`
    overrides the Qwen2 config (`hidden_size`, `num_hidden_layers`, `max_position_embeddings` ...).

    >>> build_tiny("/tmp/tiny", seed=1)  # then LocalChatModel("/tmp/tiny"), SFT with TRL, ...
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_corpus, vocab_size=vocab_size)
    pad_id, eos_id = (tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>"))
    settings = {**DEFAULT_CONFIG, **config}
    model_config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **settings,
    )
    # Seed a private generator state only: building a model must not disturb the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, bos_token_id=None, do_sample=False
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "honed_tiny.json").write_text(json.dumps({"seed": seed, "vocab_size": len(tokenizer), **settings}))
    return out


def build_tokenizer(corpus: Iterable[str] | None = None, *, vocab_size: int = 384) -> Any:
    """A byte-level BPE (digits split one by one) trained on `corpus`, with the Qwen3 chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(corpus) if corpus is not None else default_corpus(), trainer)
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=DEFAULT_CONFIG["max_position_embeddings"],
        padding_side="left",
    )
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def default_corpus() -> list[str]:
    """Chat-template text with tools, tool calls and results, plus plain prose: what agents say."""
    from jinja2 import Template

    template = Template(QWEN3_CHAT_TEMPLATE)
    tools = [
        {
            "type": "function",
            "function": {
                "name": name,
                "description": f"{verb} two integers.",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"],
                },
            },
        }
        for name, verb in (("add", "Add"), ("sub", "Subtract"), ("mul", "Multiply"))
    ]
    texts = []
    for i, (name, a, b, result) in enumerate(
        (("add", 12, 30, 42), ("mul", 6, 7, 42), ("sub", 90, 48, 42), ("add", 5, 8, 13))
    ):
        messages = [
            {"role": "system", "content": "You are a careful assistant. Use the tools."},
            {"role": "user", "content": f"What is {a} {name} {b}? Answer with the number."},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": f"I should call {name}.",
                "tool_calls": [
                    {"type": "function", "function": {"name": name, "arguments": {"a": a, "b": b}}}
                ],
            },
            {"role": "tool", "content": str(result)},
            {"role": "assistant", "content": f"The answer is {result}.", "reasoning_content": "Done."},
        ]
        texts.append(template.render(messages=messages, tools=tools if i % 2 == 0 else None))
    prose = (
        "The quick brown fox jumps over the lazy dog. Hello, how can I help you today? "
        "I will look that up for you. The result is ready; here is the answer. "
        "Please provide more details about the question, the user and the task. "
        "error: invalid arguments; the tool returned an error message, try again."
    )
    return [*texts, prose, json.dumps(tools)]
