"""Tools for driving real agents in tests; the scripted model lives in `honed.testing`."""

from __future__ import annotations

from typing import Any

from langchain_core.tools import tool

from honed.testing import ScriptedChatModel as ToolScriptModel

__all__ = ["ToolScriptModel", "add", "make_tools", "mul"]


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def mul(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def make_tools() -> list[Any]:
    """add / mul tools, a tool that raises, and one with a handled ToolException."""
    from langchain_core.tools import StructuredTool, ToolException, tool

    @tool
    def explode(reason: str) -> str:
        """A tool that raises."""
        raise ValueError(f"exploded: {reason}")

    def _fragile(x: int) -> str:
        """A tool whose failures are handled and returned to the model."""
        raise ToolException(f"fragile failed on {x}")

    fragile = StructuredTool.from_function(_fragile, name="fragile", handle_tool_error=True)
    return [add, mul, explode, fragile]
