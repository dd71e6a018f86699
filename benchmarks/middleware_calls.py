"""Python function calls per invocation of the 11-step agent (`capture.py`'s) under do-nothing
middlewares with subsets of honed's hooks: what LangChain's middleware machinery costs before honed's
hooks do any work. Call counts are deterministic, unlike times on a shared machine.

    .venv/bin/python benchmarks/middleware_calls.py

`before_agent`/`after_agent` are graph nodes (a Pregel task each per invocation); `wrap_model_call`
and `wrap_tool_call` wrap the model and tool calls inside existing nodes. Asserts nothing.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import capture  # the benchmark agent and its invocations


def do_nothing(hooks: tuple[str, ...]) -> Any:
    from langchain.agents.middleware import AgentMiddleware

    from honed.capture.middleware import HonedState

    def before_agent(self: Any, state: Any, runtime: Any) -> dict[str, Any]:
        return {"honed_trajectory": ""}

    def after_agent(self: Any, state: Any, runtime: Any) -> None:
        return None

    def wrap_model_call(self: Any, request: Any, handler: Any) -> Any:
        return handler(request)

    def wrap_tool_call(self: Any, request: Any, handler: Any) -> Any:
        return handler(request)

    every = {f.__name__: f for f in (before_agent, after_agent, wrap_model_call, wrap_tool_call)}
    namespace: dict[str, Any] = {"state_schema": HonedState, **{h: every[h] for h in hooks}}
    return type("DoNothing", (AgentMiddleware,), namespace)()


VARIANTS: dict[str, tuple[str, ...] | None] = {
    "none": None,
    "all four hooks (honed's)": ("before_agent", "after_agent", "wrap_model_call", "wrap_tool_call"),
    "wrap hooks only": ("wrap_model_call", "wrap_tool_call"),
    "node hooks only": ("before_agent", "after_agent"),
}


def main() -> None:
    base = None
    for name, hooks in VARIANTS.items():
        invoke = capture._invoker(capture._build_agent([] if hooks is None else [do_nothing(hooks)]))
        for i in range(10):
            invoke(i)
        profile = cProfile.Profile()
        profile.enable()
        for i in range(50):
            invoke(i)
        profile.disable()
        calls = pstats.Stats(profile).total_calls / 50  # type: ignore[attr-defined]
        base = base or calls
        print(f"{name:<26} {calls:>8.0f} calls per invocation  {calls / base - 1:+.1%}")


if __name__ == "__main__":
    main()
