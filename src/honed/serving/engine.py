"""Loading a model folder once per process and sharing it: weights, tokenizer, generation thread.

Two chat models over the same folder (a `LocalChatModel` built twice, two served names on one
version) share one `Engine`; it is freed when the last user releases it, which is how a served
model's old weights go away once the calls still running on them have finished.

A prompt's size is checked in characters before it is rendered or tokenised: no token of the
vocabulary spells more than `longest_token` characters, so text longer than `max_prompt_chars`
(the context window times that, with slack for normalisers) cannot fit, and is refused without
paying for tokenising it (a 20 MB message took 39 s and 3.3 GB to tokenise).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from honed.serving.batching import DEFAULT_MAX_BATCH, DEFAULT_WINDOW_S, BatchGenerator, GenerationRequest
from honed.tokenizer_id import tokenizer_id

log = logging.getLogger("honed")

SMALL_MODEL_PARAMETERS = 50_000_000


class ContextWindowExceeded(ValueError):
    """The prompt does not fit the model's context window; shorten the conversation.
    `prompt_tokens` is None when the prompt was refused on its length in characters, untokenised."""

    def __init__(self, prompt_tokens: int | None, limit: int, *, chars: int | None = None) -> None:
        size = (
            f"{prompt_tokens} tokens"
            if prompt_tokens is not None
            else f"{chars} characters, more tokens than fit,"
        )
        super().__init__(
            f"the prompt is {size} but the model's context window is {limit} tokens: "
            "shorten the conversation or the tool results"
        )
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class PromptTooSlow(ValueError):
    """Rendering and tokenising the prompt took longer than the time allowed."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(f"preparing the prompt took longer than {limit_s:g} s: shorten it")
        self.limit_s = limit_s


_TURNS = [
    {"role": "user", "content": "x"},
    {"role": "assistant", "content": "x"},
    {"role": "user", "content": "x"},
]
PROMPT_CHARS_SLACK = 2  # normalisers (NFC ...) may merge a few characters into one


@dataclass(eq=False)
class Engine:
    """A loaded model folder: tokenizer, model, its generation thread and sampling defaults."""

    path: str
    tokenizer: Any
    model: Any
    generator: BatchGenerator
    max_context: int
    defaults: dict[str, Any] = field(default_factory=dict)
    refs: int = 0
    longest_token: int = 64
    control_tokens: re.Pattern[str] = re.compile("")  # the tokenizer's special tokens, spelled
    tokenizer_id: str = ""  # `honed.tokenizer_id`: recorded with the ids it makes
    _before_calls: dict[str, str] = field(default_factory=dict)

    @property
    def max_prompt_chars(self) -> int:
        """More characters than this cannot fit the context window, whatever they say."""
        return self.max_context * self.longest_token * PROMPT_CHARS_SLACK

    def check_chars(self, chars: int) -> None:
        if chars > self.max_prompt_chars:
            raise ContextWindowExceeded(None, self.max_context, chars=chars)

    def render(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, **template: Any
    ) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False, **template
        )

    @functools.cached_property
    def message_tokens(self) -> int:
        """Tokens each message of a conversation costs at least in this chat template (its turn's
        head and end, 5 in Qwen's; counted here as half what an assistant and a user turn add on
        average, to stay below what any turn costs): what `check_fits` counts a message at."""
        try:
            one, three = (
                len(self.tokenizer(self.render(turns, None), add_special_tokens=False)["input_ids"])
                for turns in (_TURNS[:1], _TURNS)
            )
        except Exception:  # a template that refuses these turns: the bound of 1
            return 1
        # (An assistant and a user turn: a template may write a last assistant turn otherwise.)
        framing = (three - one - 2) // 2  # per turn, less its one-letter content
        return max(1, framing // 2)

    def before_calls(self, **template: Any) -> str:
        """What the chat template writes in a reply before its tool calls (a thinking template's
        empty `<think>\n\n</think>\n\n`): a forced `tool_choice` opens the reply with it, as the
        model learned replies to open. Forced straight after the turn's head, the model wrote
        broken arguments where, left to choose, it called the tool right (a QA pass, session 19)."""
        key = repr(sorted(template.items()))
        if key not in self._before_calls:
            self._before_calls[key] = _before_calls(self.tokenizer, template)
        return self._before_calls[key]

    def encode(self, text: str) -> list[int]:
        self.check_chars(len(text))
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= self.max_context:
            raise ContextWindowExceeded(len(ids), self.max_context)
        return ids

    def prompt_ids(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, **template: Any
    ) -> list[int]:
        """The rendered conversation's token ids, where only the chat template writes control
        tokens: a message or tool schema that spells one (`<|im_end|>\n<|im_start|>system`, sent
        by a client or pasted into a tool result) is tokenised as the plain text it is, so it
        cannot close its turn and open a forged one."""
        spelled: list[str] = []
        marker = f"honedcontrol{secrets.token_hex(8)}n"

        def neutral(text: str) -> str:
            def placeholder(match: re.Match[str]) -> str:
                spelled.append(match.group(0))
                return f"{marker}{len(spelled) - 1}x"

            return self.control_tokens.sub(placeholder, text)

        if self.control_tokens.pattern:
            messages, tools = _map_strings(messages, neutral), _map_strings(tools, neutral)
        text = self.render(messages, tools, **template)
        if not spelled:
            return self.encode(text)
        self.check_chars(len(text))
        ids: list[int] = []
        for i, piece in enumerate(re.split(f"{marker}(\\d+)x", text)):
            if i % 2 == 0:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
            else:  # the spelled control token, as text
                ids += self.tokenizer(
                    spelled[int(piece)], add_special_tokens=False, split_special_tokens=True
                )["input_ids"]
        if len(ids) >= self.max_context:
            raise ContextWindowExceeded(len(ids), self.max_context)
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def submit(self, request: GenerationRequest) -> Any:
        return self.generator.submit(request)


_engines: dict[tuple[Any, ...], Engine] = {}
_lock = threading.Lock()


def acquire_engine(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    window_s: float = DEFAULT_WINDOW_S,
) -> Engine:
    """The process's engine for this folder and settings, loading it on first use."""
    key = (os.path.realpath(path), device, dtype, max_batch, window_s)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = load_engine(path, device=device, dtype=dtype, max_batch=max_batch, window_s=window_s)
            _engines[key] = engine
        engine.refs += 1
        return engine


def release_engine(engine: Engine) -> None:
    """Drop one reference; the last one stops the generation thread and frees the weights."""
    with _lock:
        engine.refs -= 1
        if engine.refs > 0:
            return
        for key, value in list(_engines.items()):
            if value is engine:
                del _engines[key]
    engine.generator.close()
    engine.model = None


def load_engine(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    window_s: float = DEFAULT_WINDOW_S,
) -> Engine:
    """Load a transformers causal LM folder, or a PEFT LoRA adapter folder over its base model
    (merged into the weights: serving an adapter then costs nothing per token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():  # else transformers takes the path for a hub name and retries for ~50 s
        raise FileNotFoundError(f"no model folder at {folder}: checkpoints load from a local folder")
    torch_dtype = getattr(torch, dtype) if dtype else None
    adapter_config = folder / "adapter_config.json"
    if adapter_config.exists():
        from peft import PeftModel

        base = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype)
        model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
        has_tokenizer = (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()
        tokenizer = AutoTokenizer.from_pretrained(folder if has_tokenizer else base)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    model.to(device)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.chat_template is None:
        raise ValueError(f"{folder} has no chat template: a chat model needs one (tokenizer.chat_template)")
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    pad_id = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
    if pad_id is None:
        pad_id = eos_ids[0]
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    max_context = int(getattr(text_config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    defaults = {
        "temperature": (gen.temperature if gen.temperature is not None else 1.0) if gen.do_sample else 0.0,
        "top_p": gen.top_p if gen.do_sample and gen.top_p is not None else 1.0,
        "top_k": gen.top_k if gen.do_sample and gen.top_k is not None else 0,
    }
    generator = BatchGenerator(
        model,
        tokenizer,
        eos_ids=eos_ids,
        pad_id=pad_id,
        max_batch=max_batch,
        window_s=window_s,
        threads=_torch_threads(model, device),
        name=folder.name,
    )
    log.debug("honed: loaded %s (context %d, defaults %s)", folder, max_context, defaults)
    return Engine(
        path=str(folder),
        tokenizer=tokenizer,
        model=model,
        generator=generator,
        max_context=max_context,
        defaults=defaults,
        longest_token=_longest_token(tokenizer),
        control_tokens=_control_tokens(tokenizer),
        tokenizer_id=tokenizer_id(tokenizer),
    )


def _control_tokens(tokenizer: Any) -> re.Pattern[str]:
    """A pattern matching the tokenizer's special tokens as text (longest first)."""
    spelled = {str(t) for t in getattr(tokenizer, "all_special_tokens", ())}
    spelled |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    spelled.discard("")
    return re.compile("|".join(re.escape(t) for t in sorted(spelled, key=len, reverse=True)))


def _map_strings(value: Any, change: Any) -> Any:
    """`value` with `change` applied to every string inside its dicts and lists (keys too)."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {change(k) if isinstance(k, str) else k: _map_strings(v, change) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, change) for v in value]
    return value


def _longest_token(tokenizer: Any) -> int:
    """The most characters one token stands for: its vocabulary string's length (a byte-level
    BPE writes one character per byte, a byte is at most one character; sentencepiece's `▁` is
    one space), at least that of the longest special token."""
    try:
        return max(1, max(map(len, tokenizer.get_vocab())))
    except Exception:  # a tokenizer without a readable vocabulary: a generous bound
        return 256


def _torch_threads(model: Any, device: str) -> int | None:
    """Intra-op threads for the generation thread. A small model's matrices are too small to split:
    on a busy 2-core machine two threads ran ~10x slower than one (they spin waiting on each other),
    and the batch already keeps a core busy. Larger models keep torch's own setting.
    `HONED_TORCH_THREADS` overrides."""
    if os.environ.get("HONED_TORCH_THREADS"):
        return int(os.environ["HONED_TORCH_THREADS"])
    if device != "cpu":
        return None
    return 1 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS else None


def _before_calls(tokenizer: Any, template: dict[str, Any]) -> str:
    """The text between the generation prompt and a reply's first `<tool_call>`, rendered by the
    template itself; "" when it renders calls otherwise."""
    from honed.messages import CALL_OPEN

    ask = [{"role": "user", "content": "x"}]
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    tools = [
        {"type": "function", "function": {"name": "f", "description": "", "parameters": {"type": "object"}}}
    ]
    try:
        head = tokenizer.apply_chat_template(
            ask, tools=tools, add_generation_prompt=True, tokenize=False, **template
        )
        whole = tokenizer.apply_chat_template(
            [*ask, {"role": "assistant", "content": "", "tool_calls": [call]}],
            tools=tools,
            tokenize=False,
            **template,
        )
    except Exception:  # a template that takes no tools, or no such call: nothing to add
        return ""
    if not isinstance(head, str) or not isinstance(whole, str) or not whole.startswith(head):
        return ""
    at = whole.find(CALL_OPEN, len(head))
    return whole[len(head) : at] if at >= 0 else ""
