"""Local models: the offline tiny model, the batched transformers chat model, tool-call parsing.

Importing this package loads no torch: `LocalChatModel`, `build_tiny` and the rest are imported on
first use, so `honed` stays installable and importable without the `honed[train]` extra.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from honed.models.engine import ContextWindowExceeded
    from honed.models.local import LocalChatModel
    from honed.models.tiny import build_tiny, build_tokenizer
    from honed.models.toolcalls import ParsedCompletion, parse_completion

_LAZY = {
    "LocalChatModel": "honed.models.local",
    "ContextWindowExceeded": "honed.models.engine",
    "build_tiny": "honed.models.tiny",
    "build_tokenizer": "honed.models.tiny",
    "ParsedCompletion": "honed.models.toolcalls",
    "parse_completion": "honed.models.toolcalls",
}

__all__ = [
    "ContextWindowExceeded",
    "LocalChatModel",
    "ParsedCompletion",
    "build_tiny",
    "build_tokenizer",
    "parse_completion",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'honed.models' has no attribute {name!r}")
    return getattr(import_module(module), name)
