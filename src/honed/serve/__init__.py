"""`honed serve`: the OpenAI-compatible server, and the client side `ServedModel` uses to reach one.

Imported lazily: `create_app` and `serve` need the `honed[serve]` extra (FastAPI, uvicorn) and
the local model (torch); nothing here is loaded by `import honed`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from honed.serve.app import create_app, serve

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module("honed.serve.app"), name)
    raise AttributeError(f"module 'honed.serve' has no attribute {name!r}")
