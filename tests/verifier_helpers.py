"""Shared pieces of the verifier tests: trajectories, small verifiers with known behaviour, a fake
judge model, and a worker entry point run as a real subprocess (`python verifier_helpers.py ...`)."""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from sqlalchemy import text

from honed import Step, Trajectory, Verdict
from honed.verifiers import BaseVerifier, GoalCheck, ReferenceMatch
from honed.verifiers.protocol import verdict

_T0 = datetime(2026, 1, 1, tzinfo=UTC)


def traj(
    id: str, output: Any = "42", *, status: str = "ok", steps: list[Step] | None = None, **metadata: Any
) -> Trajectory:
    """A finished trajectory with one model step (so it is not 'empty') unless `steps` says otherwise."""
    if steps is None:
        steps = [
            Step(
                id=f"{id}-s0",
                index=0,
                kind="model",
                name="m",
                output={"role": "assistant", "content": str(output)},
            )
        ]
    start = _T0 + timedelta(seconds=hash(id) % 1000)
    return Trajectory(
        id=id,
        agent="test-agent",
        task={"messages": [{"role": "user", "content": f"task {id}"}]},
        metadata=metadata,
        steps=steps,
        output=output,
        status=status,  # type: ignore[arg-type]
        started_at=start,
        ended_at=start + timedelta(seconds=1),
    )


def tool_traj(id: str, tool: str, args: dict[str, Any], **metadata: Any) -> Trajectory:
    """A trajectory whose model called `tool` with `args`, then answered 'done'."""
    steps = [
        Step(
            id=f"{id}-s0",
            index=0,
            kind="model",
            name="m",
            tool_calls=[{"name": tool, "args": args, "id": "c1"}],
        ),
        Step(id=f"{id}-s1", index=1, kind="tool", name=tool, input=args, output="ok"),
        Step(id=f"{id}-s2", index=2, kind="model", name="m", output={"role": "assistant", "content": "done"}),
    ]
    return traj(id, "done", steps=steps, **metadata)


class SlowReference(ReferenceMatch):
    """ReferenceMatch that takes `delay` seconds and records every trajectory it is called on."""

    def __init__(self, delay: float = 0.2, calls: list[str] | None = None) -> None:
        super().__init__(name="slow-ref")
        self.delay, self.calls, self._lock = delay, calls if calls is not None else [], threading.Lock()

    def check(self, t: Trajectory) -> Verdict:
        with self._lock:
            self.calls.append(t.id)
        time.sleep(self.delay)
        return super().check(t)


class Hangs(BaseVerifier):
    name = "hangs"

    def __init__(self, seconds: float = 30.0, timeout_s: float = 0.3) -> None:
        self.seconds, self.timeout_s = seconds, timeout_s

    def check(self, t: Trajectory) -> Verdict:
        time.sleep(self.seconds)
        return verdict(True, "should never be recorded")


class Raises(BaseVerifier):
    name = "raises"

    def __init__(self, times: int | None = None) -> None:
        self.times, self.calls = times, 0  # raise the first `times` calls (None: always)

    def check(self, t: Trajectory) -> Verdict:
        self.calls += 1
        if self.times is None or self.calls <= self.times:
            raise ZeroDivisionError(f"boom #{self.calls} on {t.id}")
        return verdict(True, "worked on retry")


class FakeJudgeModel(BaseChatModel):
    """Answers every grading request with a JudgeDecision tool call: pass when the agent's answer
    contains 'correct'. What `with_structured_output` expects from a tool-calling model."""

    calls: int = 0

    @property
    def _llm_type(self) -> str:
        return "fake-judge"

    def bind_tools(self, tools: Any, **kwargs: Any) -> FakeJudgeModel:
        return self

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        self.calls += 1
        answer = str(messages[-1].content).split("Agent's final answer:")[-1]
        passed = "correct" in answer
        args = {
            "passed": passed,
            "score": 0.9 if passed else 0.1,
            "reason": "looks right" if passed else "looks wrong",
        }
        message = AIMessage(content="", tool_calls=[{"name": "JudgeDecision", "args": args, "id": "call-1"}])
        return ChatResult(generations=[ChatGeneration(message=message)])


def verdict_counts(store: Any) -> dict[tuple[str, str], int]:
    """(trajectory id, verifier) -> number of verdict rows, straight from the table."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT trajectory_id, verifier, COUNT(*) FROM verdicts GROUP BY trajectory_id, verifier")
        )
        return {(t, v): n for t, v, n in rows}


def claim_states(store: Any) -> dict[str, int]:
    with store.engine.connect() as conn:
        return dict(
            conn.execute(text("SELECT state, COUNT(*) FROM verification_claims GROUP BY state")).all()
        )


def worker_verifiers(delay: float = 0.2) -> list[Any]:
    return [SlowReference(delay), ReferenceMatch()]


def _main(argv: list[str]) -> None:
    """`python verifier_helpers.py URL OPTIONS_JSON`: run a worker until signalled (or once)."""
    import logging

    import honed
    from honed.verifiers import Worker

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    url, options = argv[0], json.loads(argv[1])
    forever, delay = options.pop("forever", False), options.pop("delay", 0.2)
    signals = options.pop("signals", False)  # run_once as `honed verify --once` runs it
    store = honed.open_store(url)
    worker = Worker(store, worker_verifiers(delay), **options)
    print("worker ready", flush=True)
    settled = worker.run_forever() if forever else worker.run_once(install_signal_handlers=signals)
    worker.close()
    print(f"worker exits after settling {settled}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _main(sys.argv[1:])


def _broken_check(state: Any) -> bool:
    raise RuntimeError("a bug in the check")


# A goal-state check with a bug: it raises on every run it gets to (a run that crashed, with no
# final state, it cannot tell without running).
broken_goal = GoalCheck(_broken_check, name="broken")


def _broken_factory() -> Any:
    """A verifier factory whose configuration is missing (`honed verify -v` must say so in a line)."""
    raise KeyError("JUDGE_MODEL")
