"""`extraction`: a sentence about a person to a JSON record, checked against a schema and the reference.

    >>> task = ExtractionSuite().heldout[0]
    >>> task.prompt                     # e.g. "Maya, 34, moved to Lyon."
    >>> task.metadata["expected"]       # {"name": "Maya", "age": 34, "city": "Lyon"}

The answer is the final message itself, `{"name": ..., "age": ..., "city": ...}`, with no tools:
the shortest format that still exercises structured output, so a tiny model learns it in minutes.
`JsonSchema` checks the types (age an integer, no extra keys) and every reference value. Slices are
the sentence shapes: the fields come in different orders, so copying in order is not enough.
"""

from __future__ import annotations

import json
import random
from typing import Any

from honed.demo.generated import GeneratedSuite, Problem, Solution

SYSTEM_PROMPT = "Reply with JSON: name, age, city."

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}

# fmt: off
NAMES = (
    "Maya", "Liam", "Noah", "Emma", "Olivia", "Ava", "Lucas", "Mia", "Leo", "Zoe",
    "Hugo", "Ines", "Omar", "Lina", "Yuki", "Ravi", "Sara", "Tom", "Nina", "Ivan",
    "Chloe", "Felix", "Aria", "Jonas", "Elena", "Mateo", "Amir", "Lea", "Oscar", "Ruth",
    "Paul", "Iris", "Kai", "Dara", "Milo", "Vera", "Theo", "Alba", "Ezra", "Nora",
)
CITIES = (
    "Lyon", "Paris", "Oslo", "Rome", "Lima", "Cairo", "Kyoto", "Dakar", "Quito", "Porto",
    "Bern", "Riga", "Turin", "Nice", "Graz", "Cork", "Leeds", "Malmo", "Tunis", "Accra",
    "Hanoi", "Perth", "Austin", "Denver", "Boston", "Dublin", "Madrid", "Berlin", "Vienna", "Prague",
    "Warsaw", "Athens", "Seoul", "Delhi", "Lagos", "Nairobi", "Bogota", "Havana", "Manila", "Sydney",
)
# fmt: on

# (slice, sentence): the field order differs between slices.
TEMPLATES = (
    ("name_age_city", "{name}, {age}, moved to {city}."),
    ("name_age_city", "{name} is {age} and lives in {city}."),
    ("name_city_age", "{name} lives in {city} and is {age}."),
    ("name_city_age", "{name} left for {city} at {age}."),
    ("city_first", "In {city} lives {name}, aged {age}."),
    ("city_first", "{city} is home to {name}, {age}."),
)


class ExtractionSuite(GeneratedSuite):
    """See the module docstring; `JsonSchema()` reads `metadata["schema"]` and `["expected"]`."""

    name = "extraction"
    system_prompt = SYSTEM_PROMPT
    max_tokens = 40

    def verifiers(self) -> list[Any]:
        from honed.verifiers import JsonSchema

        return [JsonSchema()]

    def draw(self, rng: random.Random) -> Problem:
        kind, template = rng.choice(TEMPLATES)
        record = {"name": rng.choice(NAMES), "age": rng.randint(18, 89), "city": rng.choice(CITIES)}
        return Problem(
            template.format(**record),
            kind,
            {"schema": SCHEMA, "expected": record},
            Solution(answer=json.dumps(record, ensure_ascii=False)),
        )
