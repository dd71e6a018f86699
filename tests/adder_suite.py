"""A one-sum suite around the tiny model that memorised "What is 2 plus 3?" in two phrasings (its
training tasks ask them) and a third, "Please add 2 and 3.", that its held-out tasks ask (tiny_model.py).

It satisfies `honed.demo.Suite`, so the loop, the demo (`--suite adder_suite:Adder`) and the
cycle tests run on it exactly as on a bundled suite, in seconds.
"""

from __future__ import annotations

import json
from typing import Any

from honed.demo import Task
from honed.verifiers import ReferenceMatch
from tiny_model import ANSWER, HELDOUT_QUESTION, QUESTION, QUESTIONS, add_schema, add_tool


def demonstration() -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": QUESTION},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "5"},
            {"role": "assistant", "content": ANSWER},
        ],
        "tools": json.dumps([add_schema()]),
    }


class Adder:
    name = "adder"
    system_prompt = None
    max_tokens = 48
    tools = [add_tool()]
    train = [
        Task(f"train-{i}", QUESTIONS[i // 2], metadata={"expected": "5", "slice": "add"}) for i in range(4)
    ]
    heldout = [
        Task(f"heldout-{i}", HELDOUT_QUESTION, split="heldout", metadata={"expected": "5", "slice": "add"})
        for i in range(6)
    ]

    def verifiers(self) -> list[Any]:
        return [ReferenceMatch()]

    def demonstrations(self, n: int, seed: int = 0) -> list[dict[str, Any]]:
        return [demonstration() for _ in range(n)]

    def vocab_corpus(self) -> list[str]:
        return [QUESTION, ANSWER]
