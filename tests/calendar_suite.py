"""A calendar-booking agent suite, written the way a user writes one: only the suite protocol of
README's "The demo" (name, system prompt, tools, train and held-out `Task`s, `verifiers()`,
`demonstrations(n, seed)`, `vocab_corpus()`) and a goal-state verifier from `honed.verifiers`.

The world is a fixed calendar: every day of March 2025 has busy hours drawn from the date alone,
so the tools need no per-task state. A task asks to book a meeting with someone on a day at the
first free hour from some hour on; the agent looks at `free_hours(day)` and calls `book(day, hour,
person)`. The verifier (`GoalCheck`) replays the run's bookings on the calendar and passes only
if the calendar ends with exactly the requested meeting, at the right hour.

    honed demo --suite calendar_suite:SUITE --cycles 3
"""

from __future__ import annotations

import json
import random
from typing import Any

from langchain_core.tools import StructuredTool
from langchain_core.utils.function_calling import convert_to_openai_tool

from honed.demo import Task
from honed.trajectory import Trajectory
from honed.verifiers import GoalCheck

SYSTEM_PROMPT = "You book meetings. Use the tools, then confirm in one line."
PEOPLE = ("Ana", "Ben", "Chloe", "Dev", "Eli", "Fay")
HOURS = range(9, 17)  # meetings start on the hour, 9:00 to 16:00
DAYS = tuple(f"2025-03-{d:02d}" for d in range(1, 32))


def busy_hours(day: str) -> list[int]:
    """The hours already taken on `day`: part of the world, the same on every call."""
    rng = random.Random(f"calendar/{day}")
    return sorted(rng.sample(list(HOURS), 3))


def free_hours(day: str) -> str:
    """List the free hours of a day (YYYY-MM-DD)."""
    if day not in DAYS:
        return f"error: no calendar for {day}"
    return ", ".join(str(h) for h in HOURS if h not in busy_hours(day))


def book(day: str, hour: int, person: str) -> str:
    """Book a one-hour meeting with person on day (YYYY-MM-DD) at hour (9 to 16)."""
    problem = booking_problem(day, hour, set())
    return f"error: {problem}" if problem else f"booked {person} on {day} at {hour}:00"


def booking_problem(day: Any, hour: Any, booked: set[tuple[str, int]]) -> str | None:
    """Why a booking cannot be made (None: it can), given the bookings made before it."""
    if day not in DAYS:
        return f"no calendar for {day}"
    if not isinstance(hour, int) or hour not in HOURS:
        return f"{hour} is not a bookable hour"
    if hour in busy_hours(day) or (day, hour) in booked:
        return f"{hour}:00 on {day} is taken"
    return None


def first_free(day: str, after: int) -> int | None:
    return next((h for h in HOURS if h >= after and h not in busy_hours(day)), None)


# -- the goal-state verifier -------------------------------------------------------------------


def calendar_after(trajectory: Trajectory) -> list[dict[str, Any]]:
    """The bookings the run made, in order: its `book` calls replayed on the calendar."""
    made: list[dict[str, Any]] = []
    for step in trajectory.tool_steps():
        args = step.input if isinstance(step.input, dict) else None
        if step.name != "book" or args is None or step.error:
            continue
        day, hour, person = args.get("day"), _hour(args.get("hour")), args.get("person")
        if booking_problem(day, hour, {(b["day"], b["hour"]) for b in made}) is None:
            made.append({"day": day, "hour": hour, "person": person})
    return made


def _hour(value: Any) -> Any:
    """The tool's own validation turns "14" into 14: so does the replay."""
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


def booked_as_asked(state: dict[str, Any], trajectory: Trajectory) -> tuple[bool, str]:
    """Passes when the calendar ends with exactly the requested meeting at the first free hour."""
    meta = trajectory.metadata or {}
    want = {"day": meta["day"], "hour": meta["hour"], "person": meta["person"]}
    made = calendar_after(trajectory)
    if made == [want]:
        return True, f"booked {want['person']} on {want['day']} at {want['hour']}:00"
    return False, f"calendar has {made or 'no booking'}, wanted {want}"


# -- the suite ---------------------------------------------------------------------------------


class CalendarSuite:
    name = "calendar"
    system_prompt = SYSTEM_PROMPT
    max_tokens = 64

    def __init__(self, *, train_size: int = 120, heldout_size: int = 40) -> None:
        self.tools = [StructuredTool.from_function(free_hours), StructuredTool.from_function(book)]
        problems = self._problems(random.Random("calendar/splits"), train_size + heldout_size, taken=set())
        self.heldout = [
            self._task(f"calendar-heldout-{i:03d}", p, "heldout")
            for i, p in enumerate(problems[:heldout_size])
        ]
        self.train = [
            self._task(f"calendar-train-{i:03d}", p, "train") for i, p in enumerate(problems[heldout_size:])
        ]
        self._taken = {t.prompt for t in [*self.train, *self.heldout]}

    def verifiers(self) -> list[Any]:
        return [GoalCheck(booked_as_asked, name="calendar-goal")]

    def demonstrations(self, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """`n` solved requests, none of them a train or held-out task. The world has only ~1,300
        other requests and the warm start asks for 3,000, so they repeat once all were drawn."""
        problems = self._problems(random.Random(f"calendar/demos/{seed}"), n, taken=self._taken)
        return [self._solved(p) for p in problems]

    def vocab_corpus(self) -> list[str]:
        return [json.dumps(d["messages"]) + d["tools"] for d in self.demonstrations(200, seed=-1)]

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _problems(rng: random.Random, n: int, *, taken: set[str]) -> list[dict[str, Any]]:
        """`n` requests not in `taken`, distinct until every one was drawn, then again."""
        every = [
            {"prompt": f"Book a meeting with {person} on {day} at the first free hour from {after}:00.",
             "day": day, "person": person, "after": after, "hour": first_free(day, after)}
            for day in DAYS for person in PEOPLE for after in HOURS
        ]  # fmt: skip
        pool = [p for p in every if p["hour"] is not None and p["prompt"] not in taken]
        out: list[dict[str, Any]] = []
        while len(out) < n:
            out += rng.sample(pool, min(n - len(out), len(pool)))
        return out

    @staticmethod
    def _task(task_id: str, p: dict[str, Any], split: str) -> Task:
        meta = {"day": p["day"], "person": p["person"], "hour": p["hour"], "slice": f"from-{p['after']}"}
        return Task(task_id, p["prompt"], split, meta)

    def _solved(self, p: dict[str, Any]) -> dict[str, Any]:
        """The run a correct agent makes, in the OpenAI chat format (arguments as JSON text)."""
        calls = [
            ("free_hours", {"day": p["day"]}),
            ("book", {"day": p["day"], "hour": p["hour"], "person": p["person"]}),
        ]
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": p["prompt"]},
        ]
        for i, (name, args) in enumerate(calls):
            result = free_hours(**args) if name == "free_hours" else book(**args)
            call = {
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args)},
            }
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            messages.append({"role": "tool", "tool_call_id": f"call_{i}", "content": result})
        messages.append(
            {"role": "assistant", "content": f"Booked {p['person']} on {p['day']} at {p['hour']}:00."}
        )
        tools = json.dumps([convert_to_openai_tool(t) for t in self.tools])
        return {"messages": messages, "tools": tools}


SUITE = CalendarSuite()
