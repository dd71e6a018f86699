"""Lazy package attributes (PEP 562): heavy modules (torch, TRL, FastAPI) load on first use only."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_attributes(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `homes[name]` (a module path) the first time `name` is
    read: `__getattr__ = lazy_attributes(__name__, {"LocalChatModel": "honed.serving.local"})`."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(home), name)

    return __getattr__
