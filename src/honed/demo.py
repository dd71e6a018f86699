"""`honed demo`: a real `create_agent` agent, captured end to end into the embedded store.

The agent runs on `ScriptedChatModel` (no weights can be downloaded here), calls real tools,
sometimes fails, and every run lands in SQLite, where `honed runs` and `honed show` read it.
"""

from __future__ import annotations

import random
from typing import Any

from langchain.agents import create_agent
from langchain_core.tools import tool

import honed
from honed.testing import ScriptedChatModel


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def mul(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def demo_tasks(n: int, seed: int) -> list[dict[str, Any]]:
    """Arithmetic tasks with their expected answers; one in five uses a tool that does not exist."""
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
        if i % 5 == 4:
            text = f'call divide {{"a": {a}, "b": {b}}}; answer {{result}}'
            expected = str(a // b)
        else:
            text = f'call add {{"a": {a}, "b": {b}}}; call mul {{"a": {a + b}, "b": {c}}}; answer {{result}}'
            expected = str((a + b) * c)
        tasks.append({"task_id": f"demo-{i}", "text": text, "expected": expected, "split": "train"})
    return tasks


def run_capture_demo(store_url: str, n: int = 20, seed: int = 0) -> list[str]:
    """Run `n` tasks concurrently through a captured agent; return the trajectory ids."""
    agent = create_agent(
        ScriptedChatModel(reasoning="Work it out with the tools, one step at a time."),
        [add, mul],
        name="calculator",
        middleware=[honed.Middleware(store=store_url)],
    )
    tasks = demo_tasks(n, seed)
    agent.batch(
        [{"messages": [("user", t["text"])]} for t in tasks],
        config=[{"metadata": {"honed": {k: t[k] for k in ("task_id", "expected", "split")}}} for t in tasks],
        return_exceptions=True,
    )
    honed.flush()
    store = honed.open_store(store_url)
    return [t.id for t in store.trajectories(limit=n, agent="calculator")]
