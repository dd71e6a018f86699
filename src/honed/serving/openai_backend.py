"""The OpenAI-compatible backend of `ServedModel`: `ChatOpenAI` pointed at a server.

Two kinds of server are supported, and they differ in who moves to a new version:
- `honed serve` follows the store itself; the client sends the served *name* and learns which
  version answered from the response's `model` (`support-agent@v3`). Nothing to do at promotion.
- vLLM and the like (`load_adapters=True`): at promotion the client asks the server to load the
  version's LoRA adapter (`POST /v1/load_lora_adapter`, which vLLM allows with
  `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`) and sends `NAME@vN` as the model; when the version
  is retired and idle, its adapter is unloaded.

Both return, with `token_ids=True`, the prompt and completion token ids (`return_token_ids`, a
vLLM extension `honed serve` also speaks) and the sampled tokens' logprobs, so captured steps hold
exactly what was sampled, as with the local backend.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import httpx
from langchain_core.outputs import ChatResult
from langchain_openai import ChatOpenAI

from honed.trajectory import ModelVersion

log = logging.getLogger("honed")


class AdapterLoadFailed(RuntimeError):
    """The server refused to load a version's LoRA adapter (its path must exist on the server)."""


class HonedChatOpenAI(ChatOpenAI):
    """`ChatOpenAI` that keeps what a training-aware server returns: token ids and logprobs as
    plain lists in `response_metadata`; `close()` unloads the LoRA adapter it loaded, if any."""

    adapter: str | None = None

    def _create_chat_result(self, response: Any, generation_info: dict[str, Any] | None = None) -> ChatResult:
        result = super()._create_chat_result(response, generation_info)
        data = response if isinstance(response, dict) else response.model_dump()
        prompt_ids = data.get("prompt_token_ids")
        for generation, choice in zip(result.generations, data.get("choices") or (), strict=False):
            meta = generation.message.response_metadata
            if prompt_ids is not None:
                meta["prompt_token_ids"] = prompt_ids
            if choice.get("token_ids") is not None:
                meta["token_ids"] = choice["token_ids"]
            content = (choice.get("logprobs") or {}).get("content")
            if content:
                meta["logprobs"] = [item["logprob"] for item in content]
            _keep_reasoning(generation.message, choice.get("message"))
        return result

    def _convert_chunk_to_generation_chunk(
        self, chunk: dict[str, Any], default_chunk_class: type, base_generation_info: dict[str, Any] | None
    ) -> Any:
        """A streamed chunk, with the same token ids and logprobs as plain lists (summing the
        chunks concatenates them: the whole reply's, as `_create_chat_result` gives)."""
        generation = super()._convert_chunk_to_generation_chunk(
            chunk, default_chunk_class, base_generation_info
        )
        choices = chunk.get("choices") or ()
        if generation is None or not choices:
            return generation
        meta = generation.message.response_metadata
        if chunk.get("prompt_token_ids") is not None:
            meta["prompt_token_ids"] = chunk["prompt_token_ids"]
        if choices[0].get("token_ids") is not None:
            meta["token_ids"] = choices[0]["token_ids"]
        content = (choices[0].get("logprobs") or {}).get("content")
        if content:
            meta["logprobs"] = [item["logprob"] for item in content]
        _keep_reasoning(generation.message, choices[0].get("delta"))
        return generation

    def close(self) -> None:
        if self.adapter is not None:
            try:
                _post(self.openai_api_base, self._key(), "unload_lora_adapter", {"lora_name": self.adapter})
            except Exception:
                log.warning("honed: could not unload adapter %s", self.adapter, exc_info=True)
            self.adapter = None

    def _key(self) -> str:
        return self.openai_api_key.get_secret_value() if self.openai_api_key else ""


def _keep_reasoning(message: Any, sent: Any) -> None:
    """The reply's reasoning (`reasoning_content`, as vLLM and honed's server send it), which
    `ChatOpenAI` drops: stored without it, a thinking model's reply was not the text its token ids
    say, and never trained from its ids (a review, session 22)."""
    reasoning = sent.get("reasoning_content") if isinstance(sent, dict) else None
    if isinstance(reasoning, str) and reasoning and "reasoning_content" not in message.additional_kwargs:
        message.additional_kwargs["reasoning_content"] = reasoning


def openai_chat_model(
    version: ModelVersion, settings: dict[str, Any], config: dict[str, Any]
) -> HonedChatOpenAI:
    """The chat model that serves `version` through the server at `config["base_url"]`."""
    base_url = config.get("base_url") or os.environ.get("OPENAI_BASE_URL")
    if not base_url:
        raise ValueError("the openai backend needs base_url= (e.g. http://127.0.0.1:8000/v1)")
    api_key = (
        config.get("api_key")
        or os.environ.get("HONED_API_KEY")
        or os.environ.get("OPENAI_API_KEY")
        or "EMPTY"
    )
    model, adapter = config["name"], None
    if config.get("load_adapters"):
        _post(base_url, api_key, "load_lora_adapter", {"lora_name": version.ref, "lora_path": version.path})
        model = adapter = version.ref
    extra: dict[str, Any] = {"logprobs": True}
    if config.get("token_ids", True):
        extra["extra_body"] = {"return_token_ids": True}
    return HonedChatOpenAI(
        model=model, base_url=base_url, api_key=api_key, adapter=adapter, **extra, **settings
    )


def _post(base_url: str | None, api_key: str, route: str, payload: dict[str, Any]) -> None:
    url = f"{(base_url or '').rstrip('/')}/{route}"
    response = httpx.post(url, json=payload, headers={"Authorization": f"Bearer {api_key}"}, timeout=120)
    if response.status_code >= 400 and "already" not in response.text.lower():
        raise AdapterLoadFailed(f"{url} answered {response.status_code}: {response.text[:500]}")
