"""The suite protocol: what the loop needs to know about a family of verifiable tasks.

A suite is data plus verifiers: a system prompt, tools, train and held-out tasks (each with the
metadata its verifiers read: an expected answer, a schema, tests), and demonstrations (the external
data a base model is warm-started on and mixed into training). The loop never looks inside: a user
brings their own with `honed demo --suite package.module:SUITE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from honed._lazy import import_user_module
from honed.trajectory import Task


@runtime_checkable
class Suite(Protocol):
    """A family of verifiable tasks (see the module docstring); `honed.demo` ships three.

    Optional: `max_tokens`, a cap on each model reply (the loop passes it to the model);
    `gate_verifiers()`, verifiers the gate judges held-out attempts with when they should differ
    from the training ones (hidden tests): see `gate_verifiers` below; `solution_for(task)`, a
    correct chat example for one of its train tasks (outside help for the tasks that never pass:
    `LearningLoop(data={"external_for": "stuck"})`).
    """

    name: str
    system_prompt: str
    tools: Sequence[Any]
    train: Sequence[Task]
    heldout: Sequence[Task]

    def verifiers(self) -> list[Any]:
        """Fresh verifier instances that label attempts at this suite's tasks."""
        ...

    def demonstrations(self, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """`n` correct solutions as chat examples `{"messages", "tools"}` (OpenAI format, tool
        arguments and `tools` as JSON strings), for tasks drawn like the train split's but never
        equal to a held-out task. Exactly `n`, repeating tasks if the suite has fewer: the warm
        start asks for 3,000 (`Recipe.demonstrations`)."""
        ...

    def vocab_corpus(self) -> list[str]:
        """Text a tokenizer for this suite should be trained on (rendered demonstrations)."""
        ...


_SUITE_PROTOCOL = (
    "name",
    "system_prompt",
    "tools",
    "train",
    "heldout",
    "verifiers",
    "demonstrations",
    "vocab_corpus",
)


def load_suite(spec: str | Suite) -> Suite:
    """A bundled suite by name (`tool_use`, `extraction`, `coding`) or `package.module:ATTR`."""
    if not isinstance(spec, str):
        return spec
    from honed.demo import SUITES

    if spec in SUITES:
        return SUITES[spec]()
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"unknown suite {spec!r}: use one of {sorted(SUITES)} or 'package.module:SUITE'")
    module = import_user_module(module_name)
    if not hasattr(module, attr):
        raise ValueError(f"{module_name} has no {attr!r}: name a suite object, class or factory in it")
    suite = getattr(module, attr)
    if isinstance(suite, type) or (callable(suite) and not isinstance(suite, Suite)):
        suite = suite()  # a class or a factory
    if not isinstance(suite, Suite):
        wanted = sorted(name for name in _SUITE_PROTOCOL if not hasattr(suite, name))
        raise ValueError(
            f"{spec} is not a honed.demo.Suite: it lacks {', '.join(wanted) or 'what the protocol needs'} "
            f"(a suite has {', '.join(_SUITE_PROTOCOL)})"
        )
    return suite


def gate_verifiers(suite: Suite) -> list[Any]:
    """The verifiers the gate judges `suite`'s held-out attempts with: its `gate_verifiers()` when
    it has them (independent of training's, so the reward-hacking watch can see a training
    verifier being gamed), else its `verifiers()`."""
    chosen = getattr(suite, "gate_verifiers", None)
    return list(chosen()) if callable(chosen) else suite.verifiers()
