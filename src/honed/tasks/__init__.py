"""Verifiable task suites for the demo and the learning benchmark, and the protocol to bring your own.

>>> suite = load_suite("tool_use")            # or "extraction", "coding", "package.module:SUITE"
>>> path = base_model(suite, seed=0)           # a warm-started tiny model, cached
>>> model = LocalChatModel(path, temperature=1.0, max_tokens=suite.max_tokens)
"""

from __future__ import annotations

from collections.abc import Callable

from honed.tasks.base import HELDOUT, TRAIN, Suite, Task, load_suite
from honed.tasks.coding import CodingSuite
from honed.tasks.extraction import ExtractionSuite
from honed.tasks.tool_use import ToolUseSuite
from honed.tasks.warmstart import RECIPE, Recipe, base_model

SUITES: dict[str, Callable[[], Suite]] = {
    "tool_use": ToolUseSuite,
    "extraction": ExtractionSuite,
    "coding": CodingSuite,
}

__all__ = [
    "HELDOUT",
    "RECIPE",
    "SUITES",
    "TRAIN",
    "CodingSuite",
    "ExtractionSuite",
    "Recipe",
    "Suite",
    "Task",
    "ToolUseSuite",
    "base_model",
    "load_suite",
]
