"""Serving: the served chat model that follows the live version, the local batching engine, the
OpenAI-compatible backend and `honed serve`.

Imported lazily: the local model needs torch (`honed[train]`), the server FastAPI and uvicorn
(`honed[serve]`); `import honed` loads neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from honed._lazy import lazy_attributes

if TYPE_CHECKING:
    from honed.serving.app import create_app, serve
    from honed.serving.engine import ContextWindowExceeded
    from honed.serving.local import LocalChatModel
    from honed.serving.served import ServedModel
    from honed.serving.toolcalls import ParsedCompletion, parse_completion

_LAZY = {
    "ServedModel": "honed.serving.served",
    "LocalChatModel": "honed.serving.local",
    "ContextWindowExceeded": "honed.serving.engine",
    "ParsedCompletion": "honed.serving.toolcalls",
    "parse_completion": "honed.serving.toolcalls",
    "create_app": "honed.serving.app",
    "serve": "honed.serving.app",
}

__all__ = [
    "ContextWindowExceeded",
    "LocalChatModel",
    "ParsedCompletion",
    "ServedModel",
    "create_app",
    "parse_completion",
    "serve",
]


__getattr__ = lazy_attributes(__name__, _LAZY)
