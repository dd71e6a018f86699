"""What the bundled suites share: deterministic splits, and demonstrations in the agent's own format.

A bundled suite only says how to draw one problem (prompt, verifier metadata, the solution as tool
calls and a final answer); `GeneratedSuite` turns that into disjoint train and held-out splits and
into demonstrations that are byte for byte what a `create_agent` agent over `LocalChatModel` sees
and says at run time: the same system prompt, the tools as `bind_tools` converts them, tool results
as the real tools return them, tool-call arguments as JSON strings.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from honed.messages import openai_tool_call, tool_schemas
from honed.trajectory import HELDOUT, TRAIN, Task


@dataclass(frozen=True)
class Solution:
    """A correct run: tool calls in order (name, arguments), then the final answer text."""

    calls: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    answer: str = ""


@dataclass(frozen=True)
class Problem:
    """One drawn task with its solution; two problems are the same task when their prompts are."""

    prompt: str
    slice: str
    metadata: Mapping[str, Any] = field(default_factory=dict)
    solution: Solution = field(default_factory=Solution)


class GeneratedSuite:
    """A suite whose tasks come from `draw(rng)`: deterministic, disjoint splits, unlimited demos.

    Subclasses set `name`, `system_prompt`, `tools`, `max_tokens` and implement `draw` and
    `verifiers`. Held-out tasks are drawn first from a fixed stream, then train tasks unequal to
    any of them; demonstrations come from a per-seed stream and skip every split task, so a model
    warm-started on them has seen none of the tasks it is trained or measured on.
    """

    name: str = ""
    system_prompt: str = ""
    tools: Sequence[Any] = ()
    # Generation budget per model call: a reply longer than any correct one is a failure anyway,
    # and an untrained model left at 512 tokens makes every evaluation round slow.
    max_tokens: int = 64

    def __init__(self, *, train_size: int = 300, heldout_size: int = 100) -> None:
        self.train_size, self.heldout_size = train_size, heldout_size

    def draw(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    def verifiers(self) -> list[Any]:
        raise NotImplementedError

    # -- splits ---------------------------------------------------------------------------------

    @cached_property
    def _splits(self) -> tuple[tuple[Task, ...], tuple[Task, ...], dict[str, Problem]]:
        rng = random.Random(f"honed.demo/{self.name}/splits")
        problems: dict[str, Problem] = {}
        splits: dict[str, list[Task]] = {HELDOUT: [], TRAIN: []}
        for split, size in ((HELDOUT, self.heldout_size), (TRAIN, self.train_size)):
            for _ in range(size * 100):
                if len(splits[split]) >= size:
                    break
                problem = self.draw(rng)
                if problem.prompt in problems:
                    continue
                problems[problem.prompt] = problem
                index = len(splits[split])
                metadata = {**problem.metadata, "slice": problem.slice}
                splits[split].append(
                    Task(f"{self.name}-{split}-{index:03d}", problem.prompt, split, metadata)
                )
            if len(splits[split]) < size:
                raise ValueError(f"suite {self.name!r} cannot draw {size} distinct {split} tasks")
        return tuple(splits[TRAIN]), tuple(splits[HELDOUT]), problems

    @property
    def train(self) -> tuple[Task, ...]:
        return self._splits[0]

    @property
    def heldout(self) -> tuple[Task, ...]:
        return self._splits[1]

    # -- demonstrations -------------------------------------------------------------------------

    def demonstrations(self, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """`n` solved problems as chat examples, none equal to a train or held-out task."""
        return [example for _task, example in self.demonstration_tasks(n, seed)]

    def demonstration_tasks(self, n: int, seed: int = 0) -> list[tuple[Task, dict[str, Any]]]:
        """The demonstrations with the tasks they solve (metadata included), e.g. to replay and verify them."""
        taken = self._splits[2]
        rng = random.Random(f"honed.demo/{self.name}/demonstrations/{seed}")
        pairs: list[tuple[Task, dict[str, Any]]] = []
        for _ in range(n * 100):
            if len(pairs) >= n:
                break
            problem = self.draw(rng)
            if problem.prompt in taken:
                continue
            metadata = {**problem.metadata, "slice": problem.slice}
            task = Task(f"{self.name}-demo{seed}-{len(pairs):04d}", problem.prompt, "demonstration", metadata)
            pairs.append((task, self.example(problem)))
        if len(pairs) < n:
            raise ValueError(f"suite {self.name!r} cannot draw {n} demonstrations outside its splits")
        return pairs

    def solution_for(self, task: Task) -> dict[str, Any]:
        """The correct chat example for one of this suite's own tasks (for tests and dev checks)."""
        problem = self._splits[2].get(task.prompt)
        if problem is None:
            raise KeyError(f"{task.id} is not a task of suite {self.name!r}")
        return self.example(problem)

    def example(self, problem: Problem) -> dict[str, Any]:
        """`problem` solved, as `{"messages", "tools"}`: what the agent would see and say."""
        return chat_example(self.system_prompt, self.tools, problem.prompt, problem.solution)

    def vocab_corpus(self) -> list[str]:
        """Rendered demonstrations (a fixed seed apart from the warm start's), for the tokenizer."""
        return [render(example) for example in self.demonstrations(400, seed=-1)]

    def fingerprint(self) -> str:
        """A short hash of what a model trained for this suite depends on (prompt, tools, demos)."""
        parts = [self.name, self.system_prompt, tools_json(self.tools), json.dumps(self.demonstrations(8))]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def chat_example(system_prompt: str, tools: Sequence[Any], prompt: str, solution: Solution) -> dict[str, Any]:
    """A solution as an OpenAI-format chat example; tool results come from running the real tools."""
    by_name = {tool.name: tool for tool in tools}
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": prompt})
    for index, (name, args) in enumerate(solution.calls):
        call_id = f"call_{index}"
        result = by_name[name].invoke({"type": "tool_call", "name": name, "args": dict(args), "id": call_id})
        # The arguments exactly as the template renders the parsed call's dict.
        call = openai_tool_call({"name": name, "args": dict(args), "id": call_id})
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": str(result.content)})
    messages.append({"role": "assistant", "content": solution.answer})
    return {"messages": messages, "tools": tools_json(tools)}


def tools_json(tools: Sequence[Any]) -> str:
    """The tools as `bind_tools` hands them to the model (OpenAI schemas), as one JSON string."""
    return json.dumps(tool_schemas(list(tools)) or [], ensure_ascii=False)


def render(example: Mapping[str, Any], *, generation_prompt: bool = False) -> str:
    """A chat example as the tiny model's chat template writes it (no tokenizer needed)."""
    from honed.learn.chat_templates import QWEN3_CHAT_TEMPLATE

    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return _template(QWEN3_CHAT_TEMPLATE).render(
        messages=list(example["messages"]), tools=tools or None, add_generation_prompt=generation_prompt
    )


_templates: dict[str, Any] = {}


def _template(source: str) -> Any:
    """A Jinja template with transformers' `tojson` (no HTML escaping), compiled once."""
    if source not in _templates:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda value, **kw: json.dumps(value, ensure_ascii=False, **kw)
        _templates[source] = env.from_string(source)
    return _templates[source]
