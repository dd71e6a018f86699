"""The demo: a client of the product. Verifiable task suites, the warm-started tiny model, and the
learning loop with its tuned defaults (`honed demo`, `benchmarks/learning.py`). Nothing outside
`honed.demo` and the CLI imports it.

>>> suite = load_suite("tool_use")            # or "extraction", "coding", "package.module:SUITE"
>>> path = base_model(suite, seed=0)           # a warm-started tiny model, cached
>>> model = LocalChatModel(path, temperature=1.0, max_tokens=suite.max_tokens)
"""

from __future__ import annotations

from collections.abc import Callable

from honed._lazy import lazy_attributes
from honed.demo.coding import CodingSuite
from honed.demo.extraction import ExtractionSuite
from honed.demo.suite import Suite, load_suite
from honed.demo.tool_use import ToolUseSuite
from honed.demo.warmstart import RECIPE, Recipe, base_model
from honed.trajectory import HELDOUT, TRAIN, Task

SUITES: dict[str, Callable[[], Suite]] = {
    "tool_use": ToolUseSuite,
    "extraction": ExtractionSuite,
    "coding": CodingSuite,
}

_LAZY = {  # these import torch and transformers on first use only
    "build_tiny": "honed.demo.tiny",
    "build_tokenizer": "honed.demo.tiny",
    "LearningLoop": "honed.demo.loop",
    "CycleResult": "honed.demo.loop",
}

__all__ = [
    "HELDOUT",
    "RECIPE",
    "SUITES",
    "TRAIN",
    "CodingSuite",
    "CycleResult",
    "ExtractionSuite",
    "LearningLoop",
    "Recipe",
    "Suite",
    "Task",
    "ToolUseSuite",
    "base_model",
    "build_tiny",
    "build_tokenizer",
    "load_suite",
]


__getattr__ = lazy_attributes(__name__, _LAZY)
