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


def import_user_module(name: str) -> Any:
    """The module a `module:attr` on the command line names (`--agent my_app.agents:build`,
    `--verifier mychecks:judge`, `--suite my_pkg.tasks:SUITE`): found in the current folder too,
    as `python -m` would (the `honed` script does not put it on the path). The folder is added
    last, so it shadows nothing installed."""
    import os
    import sys

    try:
        return import_module(name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if exc.name != name.partition(".")[0] or here in sys.path or "" in sys.path:
            raise
        sys.path.append(here)
        return import_module(name)
