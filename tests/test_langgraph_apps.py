"""Real LangGraph applications, captured, and what a user then reads from the store.

Each shape is a real `create_agent` (or `StateGraph`) application driven by the scripted chat
model, with real checkpointers (in memory and LangGraph's SQLite saver) and real stores: human in
the loop (approve, reject, resumed in another process), a multi-turn chat, structured output, a
supervisor with subagents, and a retrieval tool.
"""

from __future__ import annotations

import json
import operator
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Annotated, Any, NotRequired, TypedDict

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentState, HumanInTheLoopMiddleware
from langchain.tools import ToolRuntime
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import InjectedToolCallId, tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.prebuilt import InjectedState
from langgraph.types import Command, interrupt
from pydantic import BaseModel
from typer.testing import CliRunner

import honed
from fakes import ToolScriptModel, add, make_tools, mul
from honed import Trajectory
from honed.cli import app
from honed.exporters import select_trajectories, write_jsonl
from honed.exporters.datasets import chat_example
from honed.messages import NotExportable, content_text
from honed.verifiers import JsonSchema, ReferenceMatch, Worker

TESTS = Path(__file__).parent
ADD_TASK = 'call add {"a": 2, "b": 3}; answer the sum is {result}'
runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(params=["middleware", "instrument"])
def capture(request: pytest.FixtureRequest) -> Any:
    """Which entry point captures: `honed.Middleware(store=...)` on the agent, or `instrument()`."""
    yield request.param
    honed.uninstrument()


def capture_middleware(capture: str, store_url: str) -> list[Any]:
    if capture == "instrument":
        honed.instrument(store=store_url)
        return []
    return [honed.Middleware(store=store_url)]


def checkpointer(kind: str, tmp_path: Path) -> Any:
    if kind == "memory":
        return InMemorySaver()
    from langgraph.checkpoint.sqlite import SqliteSaver

    return SqliteSaver(sqlite3.connect(tmp_path / "checkpoints.db", check_same_thread=False))


def hitl_agent(capture: str, store_url: str, saver: Any) -> Any:
    """A calculator whose `add` needs a human's approval (LangChain's own HITL middleware)."""
    middleware = [
        *capture_middleware(capture, store_url),
        HumanInTheLoopMiddleware(interrupt_on={"add": True}),
    ]
    return create_agent(ToolScriptModel(), [add], name="calc", middleware=middleware, checkpointer=saver)


def thread(thread_id: str, **honed_metadata: Any) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread_id}, "metadata": {"honed": honed_metadata}}


def labels(task_id: str) -> dict[str, Any]:
    return {"metadata": {"honed": {"task_id": task_id}}}


def names(t: Trajectory) -> list[str]:
    """The steps a user reads in `honed show`, graph plumbing left out."""
    return [s.name for s in t.steps if s.kind != "node" or s.extra.get("synthesised")]


# -- human in the loop ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "decision",
    [
        {"type": "edit", "edited_action": {"name": "add", "args": {"a": 2, "b": 40}}},
        {"type": "edit", "edited_action": {"name": "mul", "args": {"a": 2, "b": 40}}},
        {"type": "reject", "message": "no adding"},
    ],
    ids=["edit", "redirect", "reject"],
)
def test_a_reviewers_decision_is_stored_as_what_ran_in_the_order_it_ran(
    capture: str, decision: dict[str, Any], sqlite_url: str
) -> None:
    """Listed before the reviewer (the README's order), the middleware saw the model's call; a
    reviewer's edit ran another (stored: what the model asked), and a rejected call (answered in
    a hook, never run) was stored after the final answer."""
    middleware = [
        *capture_middleware(capture, sqlite_url),
        HumanInTheLoopMiddleware(interrupt_on={"add": True}),
    ]
    agent = create_agent(
        ToolScriptModel(), [add, mul], name="calc", middleware=middleware, checkpointer=InMemorySaver()
    )
    config = thread("th-edit", task_id="t-add")
    agent.invoke({"messages": [("user", ADD_TASK)]}, config)
    done = agent.invoke(Command(resume={"decisions": [decision]}), config)
    assert honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    (tool_step,) = t.tool_steps()
    answer = next(s for s in reversed(t.steps) if s.kind == "model")
    assert tool_step.index < answer.index  # the call was answered before the model's last turn
    if decision["type"] == "reject":
        assert "no adding" in tool_step.error and tool_step.input == {"a": 2, "b": 3}
    else:
        _assert_edit_ran(capture, decision, done, tool_step)
    # However it was captured (a QA pass, session 17: under callbacks nothing marked the edit),
    # the run passed on the reviewer's call, not the model's, or on a call a reviewer rejected
    # (a QA pass, session 21: trained as the model's good call): it never trains as the model's.
    from honed.learn.datasets import prepare

    store = honed.open_store(sqlite_url)
    store.add_verdict(t.id, honed.Verdict(passed=True, verifier="human"))
    data = prepare(store, "sft")
    assert len(data) == 0 and data.counts["calls_changed_before_running"] == 1
    # ... nor as an exported dataset's row (a QA pass, session 17: `honed export` wrote it).
    from honed.exporters import select_trajectories, write_jsonl

    result = write_jsonl(
        select_trajectories(store, verdict="pass"), sqlite_url.removeprefix("sqlite:///") + ".jsonl"
    )
    assert result.written == 0 and result.skipped == {"call_changed_before_running": 1}


def _assert_edit_ran(capture: str, decision: dict[str, Any], done: Any, tool_step: Any) -> None:
    edited = decision["edited_action"]
    result = "42" if edited["name"] == "add" else "80"
    assert next(m for m in done["messages"] if isinstance(m, ToolMessage)).content.endswith(result)
    assert (tool_step.name, tool_step.input) == (edited["name"], edited["args"])
    assert str(tool_step.output).endswith(result) and tool_step.error is None
    if capture == "middleware":  # what the model asked for stays on the step
        assert tool_step.extra["asked"] == {"name": "add", "args": {"a": 2, "b": 3}}


@pytest.mark.parametrize("position", ["first", "last"])
def test_a_call_a_reviewer_rejected_one_at_a_time_never_trains(
    capture: str, position: str, sqlite_url: str
) -> None:
    """`interrupt_mode="per_call"`: the reviewer answers inside the tool call, so `Middleware`
    listed first saw a call whose tool never ran (a QA pass, session 21: stored as the tool's own
    error, then trained on as the model's good call)."""
    if capture == "instrument" and position == "last":
        pytest.skip("one instrument() run is enough")
    hitl = HumanInTheLoopMiddleware(interrupt_on={"add": True}, interrupt_mode="per_call")
    ours = capture_middleware(capture, sqlite_url)
    middleware = [*ours, hitl] if position == "first" else [hitl, *ours]
    agent = create_agent(
        ToolScriptModel(), [add], name="calc", middleware=middleware, checkpointer=InMemorySaver()
    )
    config = thread("th-per-call", task_id="t-add")
    paused = agent.invoke({"messages": [("user", ADD_TASK)]}, config)
    (pending,) = paused["__interrupt__"]
    agent.invoke(Command(resume={pending.id: {"type": "reject", "message": "no adding"}}), config)
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    (t,) = store.trajectories()
    tool_step = t.tool_steps()[-1]  # under `Middleware` first, the call paused is a step too
    assert "no adding" in tool_step.error and tool_step.extra.get("synthesised")  # never ran
    store.add_verdict(t.id, honed.Verdict(passed=True, verifier="human"))
    from honed.learn.datasets import prepare

    assert len(prepare(store, "sft")) == 0


def test_a_turn_appended_with_update_state_keeps_its_labels_and_task(capture: str, sqlite_url: str) -> None:
    """`update_state(..., as_node="__start__")` then `invoke(None, config)` with the turn's labels
    (a QA pass, session 21: `Middleware` took it for a `Send` worker and dropped `task_id` and
    `expected`; `instrument()` stored no task)."""
    from langchain_core.messages import HumanMessage

    agent = create_agent(
        ToolScriptModel(), [add], name="calc", middleware=capture_middleware(capture, sqlite_url),
        checkpointer=InMemorySaver(),
    )  # fmt: skip
    agent.invoke({"messages": [("user", "answer hi")]}, thread("th-us", task_id="turn1", expected="hi"))
    agent.update_state(
        {"configurable": {"thread_id": "th-us"}}, {"messages": [HumanMessage(ADD_TASK)]}, as_node="__start__"
    )
    agent.invoke(None, thread("th-us", task_id="turn2", expected="the sum is 5"))
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    second = next(t for t in store.trajectories() if t.task_id == "turn2")
    assert second.metadata.get("expected") == "the sum is 5" and "within_task_id" not in second.metadata
    assert second.task == {"messages": [{"role": "user", "content": ADD_TASK}]}
    Worker(store, [ReferenceMatch()]).run_once()
    assert store.get(second.id).verdicts[0].passed is True


@pytest.mark.parametrize("saver", ["memory", "sqlite"])
@pytest.mark.parametrize("decision", ["approve", "reject"])
def test_hitl_pauses_as_interrupted_and_the_resume_continues_the_trajectory(
    capture: str, saver: str, decision: str, sqlite_url: str, tmp_path: Path
) -> None:
    agent = hitl_agent(capture, sqlite_url, checkpointer(saver, tmp_path))
    config = thread("th-1", task_id="t-add", expected="the sum is 5")
    paused = agent.invoke({"messages": [("user", ADD_TASK)]}, config)
    assert paused["__interrupt__"]
    assert honed.flush()
    store = honed.open_store(sqlite_url)

    (t,) = store.trajectories()
    assert (t.status, t.thread_id, t.output, t.task_id) == ("interrupted", "th-1", None, "t-add")
    assert t.task == {"messages": [{"role": "user", "content": ADD_TASK}]}
    pause = t.steps[-1]
    assert pause.name == "interrupt" and pause.extra["synthesised"]
    (request,) = pause.output[0]["value"]["action_requests"]
    assert (request["name"], request["args"]) == ("add", {"a": 2, "b": 3})
    # Not an outcome: never verified, never selected for export or training, counted apart.
    assert Worker(store, [ReferenceMatch()]).run_once() == 0
    assert list(select_trajectories(store)) == []
    assert write_jsonl(select_trajectories(store), tmp_path / "train.jsonl").written == 0
    assert store.count(finished=False) == 1 and store.count(finished=True) == 0
    shown = runner.invoke(app, ["show", t.id, "--store", sqlite_url]).output
    assert "interrupted: waiting to be resumed" in shown and "⏸ interrupted, waiting for:" in shown
    listed = runner.invoke(app, ["runs", "--store", sqlite_url, "--status", "interrupted"]).output
    assert "interrupted" in listed and "waiting:" in listed

    choice = {"type": "approve"} if decision == "approve" else {"type": "reject", "message": "no adding"}
    done = agent.invoke(Command(resume={"decisions": [choice]}), config)
    assert honed.flush()

    (t,) = store.trajectories()  # the same trajectory, continued: not a second one
    assert t.status == "ok" and t.thread_id == "th-1" and t.error is None
    resume = next(s for s in t.steps if s.name == "resume")
    assert resume.input == {"decisions": [choice]}
    assert names(t)[:3] == ["tool-script", "interrupt", "resume"]
    add_step = next(s for s in t.tool_steps() if s.name == "add")
    if decision == "approve":
        assert t.answer == done["messages"][-1].content == "the sum is 5"
        assert (add_step.output, add_step.error) == ("5", None)
        assert Worker(store, [ReferenceMatch()]).run_once() == 1
        assert [v.passed for v in store.get(t.id).verdicts] == [True]
    else:
        assert "rejected" in t.answer and "no adding" in add_step.error  # the call that never ran
    assert [(s.index) for s in t.steps] == sorted(s.index for s in t.steps)
    assert "▶ resumed with:" in runner.invoke(app, ["show", t.id, "--store", sqlite_url]).output


async def test_concurrent_paused_conversations_resume_into_their_own_trajectories(
    capture: str, sqlite_url: str
) -> None:
    import asyncio

    agent = hitl_agent(capture, sqlite_url, InMemorySaver())

    async def start(i: int) -> dict[str, Any]:
        config = thread(f"th-{i}")
        task = f'call add {{"a": {i}, "b": 1}}; answer the sum is {{result}}'
        await agent.ainvoke({"messages": [("user", task)]}, config)
        return config

    configs = await asyncio.gather(*(start(i) for i in range(6)))
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    assert store.count(status="interrupted") == 6
    approve = Command(resume={"decisions": [{"type": "approve"}]})
    await asyncio.gather(*(agent.ainvoke(approve, c) for c in reversed(configs)))
    assert honed.flush()
    found = {t.thread_id: t for t in store.trajectories(limit=None)}
    assert len(found) == 6 and {t.status for t in found.values()} == {"ok"}
    for i in range(6):
        t = found[f"th-{i}"]
        assert t.answer == f"the sum is {i + 1}" and f'"a": {i}' in t.task["messages"][0]["content"]
        assert next(s for s in t.tool_steps() if s.name == "add").input == {"a": i, "b": 1}


FIRST_HALF = """
import sys
sys.path.insert(0, {tests!r})
import honed
from langchain_core.messages import HumanMessage
from test_langgraph_apps import ADD_TASK, checkpointer, hitl_agent, thread
from pathlib import Path
agent = hitl_agent({capture!r}, {url!r}, checkpointer("sqlite", Path({tmp!r})))
assert agent.invoke({{"messages": [("user", ADD_TASK)]}}, thread("th-x"))["__interrupt__"]
assert honed.flush()
"""


def test_hitl_resumed_in_another_process_continues_the_trajectory(
    capture: str, sqlite_url: str, tmp_path: Path
) -> None:
    """A server pauses a run, the process exits; another one resumes it from the SQLite saver."""
    code = FIRST_HALF.format(tests=str(TESTS), capture=capture, url=sqlite_url, tmp=str(tmp_path))
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=180)
    store = honed.open_store(sqlite_url)
    (paused,) = store.trajectories()
    assert paused.status == "interrupted"

    agent = hitl_agent(capture, sqlite_url, checkpointer("sqlite", tmp_path))
    agent.invoke(Command(resume={"decisions": [{"type": "approve"}]}), thread("th-x"))
    assert honed.flush()
    (t,) = store.trajectories()
    assert t.id == paused.id and t.status == "ok" and t.answer == "the sum is 5"
    assert t.task == paused.task  # the original request, not the resume command
    assert names(t)[:3] == ["tool-script", "interrupt", "resume"] and "add" in names(t)
    assert len({s.index for s in t.steps}) == len(t.steps)  # the second half numbered after the first


class Collected:
    """A live exporter (what `instrument(otlp=...)` plugs in): the trajectories it was sent."""

    def __init__(self) -> None:
        self.sent: list[Trajectory] = []

    def export(self, trajectories: Any) -> None:
        self.sent.extend(trajectories)

    def shutdown(self) -> None:
        pass


def test_live_exporters_get_a_paused_run_once_it_is_finished(sqlite_url: str) -> None:
    exporter = Collected()
    capture = honed.Middleware(recorder=honed.Recorder(sqlite_url, exporters=[exporter]))
    approval = HumanInTheLoopMiddleware(interrupt_on={"add": True})
    agent = create_agent(ToolScriptModel(), [add], name="calc", middleware=[capture, approval],
                         checkpointer=InMemorySaver())  # fmt: skip
    agent.invoke({"messages": [("user", ADD_TASK)]}, thread("th-live"))
    capture.recorder.flush()
    assert exporter.sent == []  # paused: not an outcome to send
    agent.invoke(Command(resume={"decisions": [{"type": "approve"}]}), thread("th-live"))
    capture.recorder.flush()
    (sent,) = exporter.sent  # sent once, whole: both halves under one trajectory id
    assert (sent.status, sent.answer) == ("ok", "the sum is 5")
    assert names(sent) == ["tool-script", "interrupt", "resume", "add", "tool-script"]
    assert sent.id == honed.open_store(sqlite_url).trajectories()[0].id


def test_an_interrupt_inside_a_tool_pauses_and_resumes(capture: str, sqlite_url: str) -> None:
    from langgraph.types import interrupt

    @tool
    def refund(order: str) -> str:
        """Refund an order, once a human approves."""
        answer = interrupt({"question": f"refund {order}?"})
        return f"refunded {order}" if answer == "yes" else "refund declined"

    agent = create_agent(ToolScriptModel(), [refund], name="support",
                         middleware=capture_middleware(capture, sqlite_url), checkpointer=InMemorySaver())  # fmt: skip
    config = thread("th-refund")
    agent.invoke({"messages": [("user", 'call refund {"order": "A7"}; answer {result}')]}, config)
    honed.flush()
    store = honed.open_store(sqlite_url)
    (t,) = store.trajectories()
    assert t.status == "interrupted" and t.steps[-1].output[0]["value"] == {"question": "refund A7?"}
    assert all(s.error is None for s in t.steps)  # a pause is no failure

    agent.invoke(Command(resume="yes"), config)
    honed.flush()
    (t,) = store.trajectories()
    assert (t.status, t.answer) == ("ok", "refunded A7")
    assert [s.output for s in t.tool_steps() if s.error is None][-1] == "refunded A7"
    # Called once: the attempt paused inside it is a step (session 24: counted as a call of its own).
    assert [s.output for s in t.tool_steps()] == ["refunded A7"]
    assert any(s.kind == "tool" and (s.extra or {}).get("bubbled") for s in t.steps)


@pytest.mark.parametrize("how", ["invoke", "stream", "astream"])
def test_a_streamed_run_stores_what_an_invoked_one_does_and_no_private_state(
    capture: str, how: str, sqlite_url: str
) -> None:
    """`stream()` ends its root run with every channel (LangGraph's default `output_keys`), where
    `invoke()` gives the output schema: private state (honed's own trajectory id, a call limit's
    counters) must not land in the stored output either way."""
    import asyncio

    from langchain.agents.middleware import ModelCallLimitMiddleware

    middleware = [*capture_middleware(capture, sqlite_url), ModelCallLimitMiddleware(run_limit=10)]
    agent = create_agent(
        ToolScriptModel(), [add], name="calc", middleware=middleware, checkpointer=InMemorySaver()
    )
    inputs, config = {"messages": [("user", ADD_TASK)]}, thread(f"th-{how}")
    if how == "invoke":
        agent.invoke(inputs, config)
    elif how == "stream":
        list(agent.stream(inputs, config, stream_mode="updates"))
    else:

        async def drain() -> None:
            async for _ in agent.astream(inputs, config, stream_mode="messages"):
                pass

        asyncio.run(drain())
    assert honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert (t.status, t.output) == ("ok", "the sum is 5")


@pytest.mark.parametrize("how", ["invoke", "stream-values", "stream-updates", "astream", "handler"])
def test_a_streamed_graph_with_an_output_schema_stores_its_output_schema(how: str, sqlite_url: str) -> None:
    """A `StateGraph(..., output_schema=Out)` returns `Out` from `invoke()`; streamed, its run
    ends with every channel (scratch work, notes not meant for the caller). The stored output,
    which verifiers judge, is the output schema's whichever way the graph was run."""
    import asyncio
    from typing import TypedDict

    from langgraph.graph import END, START, StateGraph

    class In(TypedDict):
        question: str

    class Out(TypedDict):
        answer: str

    class State(In, Out):
        scratch: str

    graph = StateGraph(State, input_schema=In, output_schema=Out)
    graph.add_node("think", lambda s: {"scratch": "the answer is 4, or is it"})
    graph.add_node("reply", lambda s: {"answer": s["question"].upper()})
    graph.add_edge(START, "think")
    graph.add_edge("think", "reply")
    graph.add_edge("reply", END)
    app = graph.compile()
    config: dict[str, Any] = {"metadata": {"honed": {"task_id": "q1"}}}
    if how == "handler":
        config["callbacks"] = [honed.CallbackHandler(store=sqlite_url)]
    else:
        honed.instrument(store=sqlite_url)
    try:
        if how == "invoke":
            assert app.invoke({"question": "hi"}, config) == {"answer": "HI"}
        elif how == "astream":

            async def drain() -> None:
                async for _ in app.astream({"question": "hi"}, config):
                    pass

            asyncio.run(drain())
        else:
            mode = "updates" if how == "stream-updates" else "values"
            list(app.stream({"question": "hi"}, config, stream_mode=mode))
        assert honed.flush()
    finally:
        honed.uninstrument()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert (t.status, t.task_id, t.output) == ("ok", "q1", {"answer": "HI"})


def test_update_state_between_pause_and_resume_is_not_a_run(sqlite_url: str) -> None:
    """`graph.update_state()` runs the node's writers as a root run named `<graph>UpdateState`; it is
    an operator editing the checkpoint, not an attempt at a task, so it stores no trajectory."""
    from langgraph.types import interrupt

    @tool
    def ask(question: str) -> str:
        """Ask a human."""
        return f"{question}={interrupt(question)}"

    honed.instrument(store=sqlite_url)
    try:
        agent = create_agent(ToolScriptModel(), [ask], name="support", checkpointer=InMemorySaver())
        config = thread("th-edit")
        agent.invoke({"messages": [("user", 'call ask {"question": "Z"}; answer got {result}')]}, config)
        agent.update_state(config, {"messages": []}, as_node="model")
        agent.invoke(Command(resume="yes"), config)
        assert honed.flush()
    finally:
        honed.uninstrument()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert (t.agent, t.status, t.answer) == ("support", "ok", "got Z=yes")


class _Count(TypedDict):
    n: int


@pytest.mark.parametrize("entry", ["instrument", "handler"])
def test_update_state_on_a_node_with_a_router_is_not_a_run(entry: str, sqlite_url: str) -> None:
    """A QA pass (session 28): the node's router ran inside `update_state()`, and was stored as a run
    of its own, `ok`, named after it, answering "b", with the thread's labels: a reference check
    passed it. What runs inside an edit is the edit's."""
    from langgraph.graph import END, START, StateGraph

    def route(state: _Count) -> str:
        return "b" if state["n"] > 0 else END

    graph = StateGraph(_Count)
    graph.add_node("a", lambda state: {"n": state["n"]})
    graph.add_node("b", lambda state: {"n": state["n"] + 1})
    graph.add_edge(START, "a")
    graph.add_conditional_edges("a", route)
    graph.add_edge("b", END)
    app = graph.compile(checkpointer=InMemorySaver(), interrupt_before=["b"], name="plain")
    config: dict[str, Any] = {**thread("p1"), "metadata": {"honed": {"task_id": "t1", "expected": "b"}}}
    handler = honed.CallbackHandler(store=sqlite_url) if entry == "handler" else None
    if handler is None:
        honed.instrument(store=sqlite_url)
    else:
        config["callbacks"] = [handler]
    try:
        app.invoke({"n": 1}, config)
        app.update_state(config, {"n": 5}, as_node="a")
        app.invoke(None, config)
        assert honed.flush()
    finally:
        honed.uninstrument()
    runs = honed.open_store(sqlite_url).trajectories(oldest_first=True)
    assert [t.agent for t in runs] == ["plain"] * len(runs) and "route" not in {t.agent for t in runs}


def test_the_agents_code_cannot_rewrite_its_own_reference(capture: str, sqlite_url: str) -> None:
    """The labels ride in the run's config, which the agent's code can reach (`get_config()`); an
    edit in place, however quick, must not change what the run is judged against."""
    from langgraph.config import get_config

    @tool
    def lookup(query: str) -> str:
        """Look something up, and rewrite the run's reference to match the wrong answer."""
        labels = get_config()["metadata"]["honed"]
        labels["expected"].clear()
        labels["expected"].append("wrong")
        labels["meta"]["split"] = "train"
        return "wrong"

    agent = create_agent(
        ToolScriptModel(), [lookup], name="m", middleware=capture_middleware(capture, sqlite_url)
    )
    config = {"metadata": {"honed": {"task_id": "t1", "expected": ["right"], "meta": {"split": "heldout"}}}}
    agent.invoke({"messages": [("user", 'call lookup {"query": "x"}; answer {result}')]}, config)
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    assert Worker(store, [ReferenceMatch()]).run_once() == 1
    (t,) = store.trajectories()
    assert t.answer == "wrong" and t.metadata["expected"] == ["right"]
    assert t.metadata["meta"] == {"split": "heldout"}
    assert [v.passed for v in store.get(t.id).verdicts] == [False]


@pytest.mark.parametrize("position", ["last", "first"])
def test_retried_calls_are_steps_when_the_middleware_is_listed_last(position: str, sqlite_url: str) -> None:
    """As the README says: listed last, `honed.Middleware` records each attempt a retry middleware
    makes, the failed ones as error steps; listed first, one call per turn and its outcome."""
    from langchain.agents.middleware import ModelRetryMiddleware, ToolRetryMiddleware

    failures = {"model": 1, "tool": 1}

    class Flaky(ToolScriptModel):
        def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
            if failures["model"]:
                failures["model"] -= 1
                raise RuntimeError("transient model failure")
            return super()._generate(messages, stop, run_manager, **kwargs)

    @tool
    def flaky_add(a: int, b: int) -> int:
        """Add two integers, failing the first time."""
        if failures["tool"]:
            failures["tool"] -= 1
            raise RuntimeError("transient tool failure")
        return a + b

    retries = [
        ModelRetryMiddleware(max_retries=2, initial_delay=0.0),
        ToolRetryMiddleware(max_retries=2, initial_delay=0.0),
    ]
    capture = honed.Middleware(store=sqlite_url)
    middleware = [*retries, capture] if position == "last" else [capture, *retries]
    agent = create_agent(Flaky(), [flaky_add], name="calc", middleware=middleware)
    agent.invoke({"messages": [("user", 'call flaky_add {"a": 2, "b": 3}; answer {result}')]})
    assert honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    steps = [(s.kind, s.error is not None) for s in t.steps if s.kind != "node"]
    if position == "last":
        assert steps == [("model", True), ("model", False), ("tool", True), ("tool", False), ("model", False)]
    else:
        assert steps == [("model", False), ("tool", False), ("model", False)]
    assert (t.status, t.answer) == ("ok", "5")


def test_a_reply_a_retry_middleware_made_up_is_no_model_reply(sqlite_url: str) -> None:
    """A QA pass (session 20): every model call failed and `ModelRetryMiddleware(on_failure=
    "continue")` answered for the model; listed first, `honed.Middleware` stored that made-up text
    as the model's reply and a lenient verdict made it a training row. The step failed."""
    from langchain.agents.middleware import ModelRetryMiddleware

    retry = ModelRetryMiddleware(max_retries=1, initial_delay=0.0, on_failure="continue")
    agent = create_agent(ToolScriptModel(fail_on="hello"), [], name="calc",
                         middleware=[honed.Middleware(store=sqlite_url), retry])  # fmt: skip
    agent.invoke({"messages": [("user", "answer hello")]})
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    (t,) = store.trajectories()
    (step,) = t.model_steps()
    assert "model failure" in (step.error or "") and step.output is None
    store.add_verdict(t.id, honed.Verdict(passed=True, verifier="lenient"))
    with pytest.raises(NotExportable, match="no_reply"):
        chat_example(store.get(t.id))


def test_messages_whose_equality_raises_never_break_the_agent(sqlite_url: str) -> None:
    """A QA pass (session 20): an inner middleware passing copies of the messages, one holding an
    array (an embedding), made `honed.Middleware`'s comparison of what the model received raise
    into the agent. Capture never raises: the run is stored, as the model received it."""
    import numpy as np
    from langchain.agents.middleware import AgentMiddleware
    from langchain_core.messages import HumanMessage

    class CopyMessages(AgentMiddleware):
        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            return handler(request.override(messages=[m.model_copy(deep=True) for m in request.messages]))

    agent = create_agent(ToolScriptModel(), [], name="emb",
                         middleware=[honed.Middleware(store=sqlite_url), CopyMessages()])  # fmt: skip
    message = HumanMessage("answer hello", additional_kwargs={"embedding": np.array([0.1, 0.2, 0.3])})
    assert agent.invoke({"messages": [message]})["messages"][-1].content == "hello"
    assert honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert t.answer == "hello" and t.model_steps()[0].output["content"] == "hello"


def test_the_request_is_stored_as_the_model_received_it(sqlite_url: str) -> None:
    """A QA pass (session 20): listed first, `honed.Middleware` stored the request as it reached
    it: a system prompt a `dynamic_prompt` middleware added and tools another narrowed were not
    what the row held (no system prompt, a tool the model never had), and under a fallback
    model the step was named after the model that failed."""
    from langchain.agents.middleware import ModelFallbackMiddleware, dynamic_prompt, wrap_model_call
    from langchain_core.tools import tool as as_tool

    @as_tool
    def delete_account(user: str) -> str:
        """Delete a user's account."""
        return "deleted"

    @dynamic_prompt
    def persona(request: Any) -> str:
        return "You are a careful calculator."

    @wrap_model_call
    def only_add(request: Any, handler: Any) -> Any:
        return handler(request.override(tools=[t for t in request.tools if t.name == "add"]))

    fallback = ModelFallbackMiddleware(ToolScriptModel(model_name="backup-llm"))
    agent = create_agent(
        ToolScriptModel(model_name="primary-llm", fail_on="the sum"),
        [add, delete_account],
        name="calc",
        middleware=[honed.Middleware(store=sqlite_url), persona, only_add, fallback],
    )
    agent.invoke({"messages": [("user", ADD_TASK)]})
    assert honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    for step in t.model_steps():
        assert step.input["messages"][0] == {"role": "system", "content": "You are a careful calculator."}
        assert [x["function"]["name"] for x in step.input["tools"]] == ["add"]
        assert step.name == step.model_version == "backup-llm"
    example = chat_example(t)
    assert example["messages"][0]["role"] == "system"
    assert [x["function"]["name"] for x in example["tools"]] == ["add"]


def test_a_tool_that_updates_state_keeps_its_answer_as_the_steps_output(
    capture: str, sqlite_url: str
) -> None:
    @tool
    def remember(fact: str, runtime: ToolRuntime) -> Command:
        """Store a fact in the agent's state."""
        reply = ToolMessage(f"stored {fact}", tool_call_id=runtime.tool_call_id)
        return Command(update={"messages": [reply], "topic": fact})

    class Remembering(AgentState):
        topic: NotRequired[str]

    agent = create_agent(ToolScriptModel(), [remember], name="notes", state_schema=Remembering,
                         middleware=capture_middleware(capture, sqlite_url))  # fmt: skip
    agent.invoke({"messages": [("user", 'call remember {"fact": "sky"}; answer ok {result}')]})
    assert honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    (step,) = t.tool_steps()
    assert (step.output, step.error, step.extra["state_update"]) == ("stored sky", None, {"topic": "sky"})
    assert t.answer == "ok stored sky"


# -- conversations --------------------------------------------------------------------------------


def test_a_multi_turn_chat_is_one_thread_of_turns_with_the_same_task_under_every_entry_point(
    capture: str, sqlite_url: str
) -> None:
    agent = create_agent(ToolScriptModel(), [add], name="chat", middleware=capture_middleware(capture, sqlite_url),
                         checkpointer=InMemorySaver())  # fmt: skip
    turns = ["answer hello", 'call add {"a": 1, "b": 2}; answer it is {result}', "answer bye"]
    for text in turns:
        agent.invoke({"messages": [("user", text)]}, thread("conv-1"))
    agent.invoke({"messages": [("user", "answer elsewhere")]}, thread("conv-2"))
    assert honed.flush()
    store = honed.open_store(sqlite_url)

    conversation = store.trajectories(thread_id="conv-1", oldest_first=True)
    assert [t.answer for t in conversation] == ["hello", "it is 3", "bye"]
    # `task` is this turn's new input, whichever entry point captured it: never the history.
    assert [t.task for t in conversation] == [{"messages": [{"role": "user", "content": x}]} for x in turns]
    assert store.count(thread_id="conv-2") == 1 and {t.thread_id for t in conversation} == {"conv-1"}
    # The history is where the model saw it: turn 3's model call has all of it.
    seen = [m["content"] for m in conversation[2].model_steps()[0].input["messages"]]
    assert seen[0] == "answer hello" and seen[-1] == "answer bye" and "it is 3" in seen

    result = runner.invoke(app, ["runs", "--store", sqlite_url, "--thread", "conv-1", "--json"])
    assert [json.loads(line)["id"] for line in result.output.splitlines()] == [
        t.id for t in reversed(conversation)
    ]
    shown = runner.invoke(app, ["show", conversation[1].id, "--store", sqlite_url])
    assert shown.exit_code == 0, shown.output
    assert (
        "thread conv-1: 3 turns" in shown.output and "▶ 2." in shown.output and "answer bye" in shown.output
    )


def test_a_guardrail_models_call_is_neither_the_agents_row_nor_its_version(
    capture: str, sqlite_url: str
) -> None:
    """A QA pass (session 17): a middleware that asks another model to check each reply (a
    guardrail) made that check the run's last model call under `instrument()`: the exported and
    training row was the guard's prompt and its "SAFE", and the run's model version the guard's.
    The agent's row is the call whose reply is the run's answer."""
    from langchain.agents.middleware import AgentMiddleware
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    guard = FakeListChatModel(responses=["SAFE"] * 10, name="guard")

    class Guardrail(AgentMiddleware):
        def after_model(self, state: Any, runtime: Any) -> None:
            guard.invoke([("system", "Say SAFE or UNSAFE."), ("user", state["messages"][-1].text)])

    agent = create_agent(ToolScriptModel(), [add], name="calc",
                         middleware=[*capture_middleware(capture, sqlite_url), Guardrail()])  # fmt: skip
    agent.invoke({"messages": [("user", ADD_TASK)]}, labels("guarded"))
    assert honed.flush()
    (run,) = honed.open_store(sqlite_url).trajectories(task_id="guarded")
    assert run.answer == "the sum is 5"
    example = chat_example(run)
    assert example["messages"][0]["content"] == ADD_TASK
    assert example["messages"][-1] == {"role": "assistant", "content": "the sum is 5"}
    assert [t["function"]["name"] for t in example.get("tools", [])] in (
        ["add"],
        [],
    )  # as the model reports them
    assert run.model_version == run.model_steps()[0].model_version != "guard"


def test_a_run_whose_context_was_rewritten_between_calls_is_no_training_row(
    capture: str, sqlite_url: str
) -> None:
    """A QA pass (session 18): with LangChain's `ContextEditingMiddleware` clearing old tool
    results (or `SummarizationMiddleware`), the row built from the last call's conversation put
    an earlier reply after a context it was never produced from (`mul` called after a `[cleared]`
    result): trained, it teaches answers from nothing. Such a run is no row, and says why."""
    from langchain.agents.middleware import ContextEditingMiddleware
    from langchain.agents.middleware.context_editing import ClearToolUsesEdit

    from honed.messages import NotExportable

    task = 'call add {"a": 2, "b": 3}; call mul {"a": 5, "b": 2}; answer it is {result}'
    for name, edits in (("plain", []), ("edited", [ClearToolUsesEdit(trigger=0, keep=1)])):
        # honed after the editor (innermost): what is recorded is what the model saw
        stack = [ContextEditingMiddleware(edits=edits), *capture_middleware(capture, sqlite_url)]
        agent = create_agent(ToolScriptModel(), [add, mul], name="calc", middleware=stack)
        assert (
            agent.invoke({"messages": [("user", task)]}, labels(name))["messages"][-1].content == "it is 10"
        )
        honed.uninstrument()
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    (plain,), (edited,) = store.trajectories(task_id="plain"), store.trajectories(task_id="edited")
    assert "[cleared]" in json.dumps(edited.model_steps()[-1].input)
    assert len(chat_example(plain)["messages"]) == 6
    with pytest.raises(NotExportable) as refused:
        chat_example(edited)
    assert refused.value.reason == "context_rewritten"


def test_the_agents_name_is_the_same_under_every_entry_point_whatever_the_run_name(
    capture: str, sqlite_url: str
) -> None:
    """A QA pass (session 18): with `config["run_name"]`, `instrument()` stored the agent under
    the run's name, `Middleware` under `create_agent`'s: `--agent`, `DataConfig(agent=...)` and
    `honed status NAME` split one agent's runs by entry point."""
    agent = create_agent(
        ToolScriptModel(), [add], name="calc", middleware=capture_middleware(capture, sqlite_url)
    )
    agent.invoke({"messages": [("user", ADD_TASK)]}, {"run_name": "nightly-eval", **labels("named")})
    agent.with_config(run_name="configured").invoke({"messages": [("user", ADD_TASK)]}, labels("configured"))
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    assert {t.agent for t in store.trajectories(limit=None)} == {"calc"}
    # Unnamed: LangGraph's default name under both (a QA pass, session 20: "agent" under Middleware).
    unnamed = create_agent(ToolScriptModel(), [add], middleware=capture_middleware(capture, sqlite_url))
    unnamed.invoke({"messages": [("user", ADD_TASK)]}, labels("unnamed"))
    assert honed.flush()
    assert [t.agent for t in store.trajectories(task_id="unnamed")] == ["LangGraph"]


# -- structured output -------------------------------------------------------------------------


class Ticket(BaseModel):
    title: str
    priority: int


TICKET = {"title": "login broken", "priority": 1}
TICKET_TASK = f"call Ticket {json.dumps(TICKET)}; answer filed"


def _assert_structured(t: Trajectory, key: str | None) -> None:
    data = t.output if key is None else t.output[key]
    assert data == TICKET  # plain JSON, no {"__type__": ..., "value": ...} wrapper
    assert t.metadata["output_types"] == {("$" if key is None else f"$.{key}"): f"{__name__}.Ticket"}
    assert JsonSchema(Ticket).verify(t).passed is True
    assert ReferenceMatch().verify(t).passed is True  # metadata expected = TICKET (json mode)


def test_create_agent_response_format_is_stored_as_the_schema_describes(
    capture: str, sqlite_url: str, tmp_path: Path
) -> None:
    agent = create_agent(ToolScriptModel(), [], name="triage", response_format=Ticket,
                         middleware=capture_middleware(capture, sqlite_url))  # fmt: skip
    out = agent.invoke({"messages": [("user", TICKET_TASK)]}, thread("tk", task_id="tk", expected=TICKET))
    assert out["structured_response"] == Ticket(**TICKET)
    bad = {"title": "login broken", "priority": 3}
    agent.invoke({"messages": [("user", f"call Ticket {json.dumps(bad)}; answer filed")]},
                 thread("tk2", task_id="tk2", expected=TICKET))  # fmt: skip
    honed.flush()
    store = honed.open_store(sqlite_url)
    good, wrong = store.trajectories(task_id="tk")[0], store.trajectories(task_id="tk2")[0]
    _assert_structured(good, "structured_response")
    assert json.loads(good.answer) == TICKET  # the structured response is the answer
    reference = ReferenceMatch().verify(wrong)
    assert reference.passed is False and "priority" in reference.evidence["diff"]
    schema = JsonSchema(Ticket).verify(wrong)  # valid against the schema; one reference field differs
    assert schema.passed is False and list(schema.evidence["field_mismatches"]) == ["priority"]
    if capture == "middleware":
        # The dataset row offers the model the tool its answer calls (the request's tools omit it).
        example = chat_example(good)
        assert example["messages"][-1]["tool_calls"][0]["function"]["name"] == "Ticket"
        assert [t["function"]["name"] for t in example["tools"]] == ["Ticket"]
        assert example["tools"][0]["function"]["parameters"]["required"] == ["title", "priority"]


def test_with_structured_output_is_stored_as_the_schema_describes(sqlite_url: str) -> None:
    chain = ToolScriptModel().with_structured_output(Ticket)
    honed.instrument(store=sqlite_url)
    try:
        ticket = chain.invoke(TICKET_TASK, config={"metadata": {"honed": {"expected": TICKET}}})
    finally:
        honed.uninstrument()
    assert ticket == Ticket(**TICKET)
    honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    _assert_structured(t, None)


# -- explicit stores -------------------------------------------------------------------------------


def test_an_agents_own_store_wins_over_instrument_and_nothing_is_captured_twice(tmp_path: Path) -> None:
    a, b, c = (f"sqlite:///{tmp_path / name}.db" for name in ("a", "b", "c"))
    honed.instrument(store=a)
    try:
        own = create_agent(ToolScriptModel(), [add], name="own", middleware=[honed.Middleware(store=b)])
        own.invoke({"messages": [("user", ADD_TASK)]})
        shared = create_agent(ToolScriptModel(), [add], name="shared", middleware=[honed.Middleware()])
        shared.invoke({"messages": [("user", ADD_TASK)]})
        wrapped = honed.wrap(create_agent(ToolScriptModel(), [add], name="wrapped"), store=c)
        wrapped.invoke({"messages": [("user", ADD_TASK)]})
        same = create_agent(ToolScriptModel(), [add], name="same", middleware=[honed.Middleware(store=a)])
        same.invoke({"messages": [("user", ADD_TASK)]})
    finally:
        honed.uninstrument()
    honed.flush()
    by_store = {url: sorted(t.agent for t in honed.open_store(url).trajectories()) for url in (a, b, c)}
    assert by_store == {a: ["same", "shared"], b: ["own"], c: ["wrapped"]}
    (own_run,) = honed.open_store(b).trajectories()
    assert names(own_run) == ["tool-script", "add", "tool-script"]  # the middleware's exact capture


def test_an_agent_with_its_own_store_inside_an_instrumented_graph_leaves_the_outer_run_whole(
    tmp_path: Path,
) -> None:
    """A QA pass (session 16): the inner agent's Middleware told `instrument()` to drop the run it
    holds, which was the outer pipeline's: the whole pipeline vanished from the default store."""
    from langgraph.graph import START, StateGraph
    from typing_extensions import TypedDict

    a, b = (f"sqlite:///{tmp_path / name}.db" for name in ("a", "b"))
    honed.instrument(store=a)
    try:
        writer = create_agent(ToolScriptModel(), [add], name="writer", middleware=[honed.Middleware(store=b)])

        class S(TypedDict):
            topic: str
            final: str

        def write(state: S) -> dict[str, str]:
            return {"final": writer.invoke({"messages": [("user", ADD_TASK)]})["messages"][-1].content}

        pipeline = StateGraph(S).add_node("write", write).add_edge(START, "write").compile(name="pipeline")
        assert pipeline.invoke({"topic": "sums"})["final"] == "the sum is 5"
    finally:
        honed.uninstrument()
    assert honed.flush()
    (outer,) = honed.open_store(a).trajectories()
    (inner,) = honed.open_store(b).trajectories()
    assert (outer.agent, outer.output["final"]) == ("pipeline", "the sum is 5")
    assert inner.agent == "writer" and names(inner) == ["tool-script", "add", "tool-script"]


def test_an_agent_wrapped_in_a_runnable_keeps_its_own_answer(capture: str, sqlite_url: str) -> None:
    """A QA pass (session 16): under the Middleware, `agent | RunnableLambda(...)` stored the
    wrapper's output as the agent's answer, and a correct answer failed its reference."""
    from langchain_core.runnables import RunnableLambda

    agent = create_agent(
        ToolScriptModel(), [add], name="helper", middleware=capture_middleware(capture, sqlite_url)
    )
    pipeline = agent | RunnableLambda(lambda state: {"reply": state["messages"][-1].content, "lang": "en"})
    config = {"metadata": {"honed": {"task_id": "p1", "expected": "the sum is 5"}}}
    assert pipeline.invoke({"messages": [("user", ADD_TASK)]}, config)["reply"] == "the sum is 5"
    assert honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    if capture == "middleware":  # `instrument()` captures the pipeline, the root run, whole
        assert t.answer == "the sum is 5" and ReferenceMatch().verify(t).passed


def test_structured_output_with_the_raw_reply_stores_the_parsed_object_as_plain_json(sqlite_url: str) -> None:
    """A QA pass (session 16): `with_structured_output(Schema, include_raw=True)` stored `parsed`
    inside honed's type wrapper (`{"__type__", "value"}`), which `JsonSchema(Schema)` cannot read."""
    from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
    from langchain_core.messages import AIMessage

    class Ticket(BaseModel):
        title: str
        priority: int

    class Fake(FakeMessagesListChatModel):
        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self.bind(**kwargs)

    reply = AIMessage("", tool_calls=[{"name": "Ticket", "args": {"title": "T", "priority": 2}, "id": "x"}])
    honed.instrument(store=sqlite_url)
    try:
        Fake(responses=[reply]).with_structured_output(Ticket, include_raw=True).invoke("file it")
    finally:
        honed.uninstrument()
    assert honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert t.output["parsed"] == {"title": "T", "priority": 2}
    assert list(t.metadata["output_types"]) == ["$.parsed"] and t.metadata["output_types"][
        "$.parsed"
    ].endswith("Ticket")


# -- a supervisor with subagents, and retrieval ----------------------------------------------------


def supervisor(middleware: list[Any]) -> Any:
    researcher = create_agent(ToolScriptModel(), [search_docs], name="researcher", middleware=middleware)
    calculator = create_agent(ToolScriptModel(), [add], name="calculator", middleware=middleware)

    @tool
    def ask_researcher(question: str) -> str:
        """Ask the research agent."""
        task = f'call search_docs {{"query": "{question}"}}; answer found: {{result}}'
        return researcher.invoke({"messages": [("user", task)]})["messages"][-1].content

    @tool
    def ask_calculator(a: int, b: int) -> str:
        """Ask the calculator agent to add."""
        task = f'call add {{"a": {a}, "b": {b}}}; answer {{result}}'
        return calculator.invoke({"messages": [("user", task)]})["messages"][-1].content

    return create_agent(
        ToolScriptModel(), [ask_researcher, ask_calculator], name="supervisor", middleware=middleware
    )


DOCS = ["Paris is the capital of France.", "Refunds take five days.", "Honed learns from verified runs."]


def _retriever() -> Any:
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.vectorstores import InMemoryVectorStore

    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=32))
    store.add_texts(DOCS)
    return store.as_retriever(search_kwargs={"k": 1})


RETRIEVER = _retriever()


@tool
def search_docs(query: str) -> str:
    """Search the knowledge base."""
    return "\n".join(d.page_content for d in RETRIEVER.invoke(query))


def test_a_supervisor_with_subagents_is_one_trajectory(capture: str, sqlite_url: str) -> None:
    middleware = capture_middleware(capture, sqlite_url)
    if middleware:
        middleware = [honed.Middleware(store=sqlite_url)]  # one instance across the three agents
    boss = supervisor(middleware)
    task = 'call ask_calculator {"a": 2, "b": 3}; call ask_researcher {"question": "Refunds take five days."}; answer {result}'
    out = boss.invoke({"messages": [("user", task)]}, thread("sup", task_id="sup"))
    assert out["messages"][-1].content == "found: Refunds take five days."
    honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert (t.agent, t.status, t.answer) == ("supervisor", "ok", "found: Refunds take five days.")
    subagents = {s.name: s for s in t.steps if s.name in ("researcher", "calculator")}
    assert set(subagents) == {"researcher", "calculator"}
    delegate = {s.name: s for s in t.tool_steps() if s.name.startswith("ask_")}
    assert subagents["calculator"].parent_id == delegate["ask_calculator"].id
    search = next(s for s in t.tool_steps() if s.name == "search_docs")
    assert search.output == "Refunds take five days."
    assert _ancestors(t, search) >= {subagents["researcher"].id, delegate["ask_researcher"].id}


def _ancestors(t: Trajectory, step: Any) -> set[str]:
    by_id, found = {s.id: s for s in t.steps}, set()
    while step.parent_id in by_id:
        found.add(step.parent_id)
        step = by_id[step.parent_id]
    return found


def test_a_retrieval_tool_keeps_what_was_retrieved(capture: str, sqlite_url: str) -> None:
    agent = create_agent(
        ToolScriptModel(), [search_docs], name="rag", middleware=capture_middleware(capture, sqlite_url)
    )
    question = "Paris is the capital of France."
    agent.invoke({"messages": [("user", f'call search_docs {{"query": "{question}"}}; answer per the docs: {{result}}')]},
                 thread("rag", expected="Paris"))  # fmt: skip
    honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert t.answer == "per the docs: Paris is the capital of France."
    (search,) = [s for s in t.tool_steps() if s.name == "search_docs"]
    assert search.input == {"query": question} and search.output == question
    if capture == "instrument":  # the retriever's own run, documents and all, under the tool
        (retrieval,) = [s for s in t.tool_steps() if s.parent_id == search.id]
        assert retrieval.input == {"query": question}
        assert retrieval.output[0]["value"]["page_content"] == question
    verdict = ReferenceMatch("contains").verify(t)
    assert verdict.passed is True


# -- agents handing a conversation to each other ---------------------------------------------------


@tool
def transfer_to_billing(
    state: Annotated[dict, InjectedState], tool_call_id: Annotated[str, InjectedToolCallId]
) -> Command:
    """Hand the conversation to the billing agent."""
    done = ToolMessage("transferred to billing", tool_call_id=tool_call_id, name="transfer_to_billing")
    return Command(goto="billing", graph=Command.PARENT, update={"messages": [*state["messages"], done]})


DESK_REQUEST = "call transfer_to_billing {}; answer billing here: {result}"


def help_desk(middleware: list[Any]) -> Any:
    """A help desk graph: a triage agent that hands the conversation to a billing agent."""
    from langgraph.graph import START, MessagesState, StateGraph

    desk = StateGraph(MessagesState)
    desk.add_node("triage", create_agent(ToolScriptModel(), [transfer_to_billing], name="triage",
                                         middleware=middleware), destinations=("billing",))  # fmt: skip
    desk.add_node("billing", create_agent(ToolScriptModel(), [add], name="billing", middleware=middleware))
    desk.add_edge(START, "triage")
    return desk.compile(name="desk")


def test_agents_handing_off_in_a_graph(capture: str, sqlite_url: str) -> None:
    """A help desk graph: a triage agent hands the conversation to a billing agent (`Command` to the
    parent graph). `instrument()` sees the desk as one run; each agent's middleware sees its turn."""
    desk = help_desk(capture_middleware(capture, sqlite_url))
    request = DESK_REQUEST
    out = desk.invoke({"messages": [("user", request)]})
    assert out["messages"][-1].content == "billing here: transferred to billing"
    honed.flush()
    found = honed.open_store(sqlite_url).trajectories(oldest_first=True)
    assert all(t.status == "ok" and not any(s.error for s in t.steps) for t in found)  # a handoff is no error
    asked = {"messages": [{"role": "user", "content": request}]}
    if capture == "instrument":
        (t,) = found
        assert (t.agent, t.task, t.answer) == ("desk", asked, "billing here: transferred to billing")
        assert [s.name for s in t.steps if s.kind == "node" and s.parent_id is None] == ["triage", "billing"]
        # The handoff's `Command` (where to, what it adds) is the node's output (a QA pass, session 22: null).
        (triage,) = [s for s in t.steps if s.kind == "node" and s.name == "triage"]
        handed = triage.output["value"]
        assert handed["goto"] == "billing" and "transferred to billing" in json.dumps(handed["update"])
    else:
        triage, billing = found
        assert (triage.agent, triage.task, triage.output) == ("triage", asked, {"handoff": "billing"})
        assert (billing.agent, billing.answer) == ("billing", "billing here: transferred to billing")
        assert (
            billing.task["messages"][0] == asked["messages"][0]
        )  # handed the conversation from the request on


def test_a_turn_that_hands_the_conversation_on_is_not_judged_alone(sqlite_url: str) -> None:
    """A QA pass (session 17): under `Middleware`, each agent's turn of a team is a trajectory
    with the run's labels; the triage turn (answer `{"handoff": ...}`) failed the run's reference,
    so the task's pass rate read 1/2 for a run that passed, and failure-learning methods took a
    correct handoff for a failure. A handoff turn is a step of the run: could not tell."""
    from honed.learn.datasets import task_pass_rates

    help_desk(capture_middleware("middleware", sqlite_url)).invoke(
        {"messages": [("user", DESK_REQUEST)]}, {"metadata": {"honed": {
            "task_id": "desk-1", "expected": "billing here: transferred to billing", "split": "train"}}},
    )  # fmt: skip
    honed.flush()
    store = honed.open_store(sqlite_url)
    assert Worker(store, [ReferenceMatch()]).run_once() == 2
    triage, billing = store.trajectories(oldest_first=True)
    assert triage.handed_off_to == "billing" and billing.handed_off_to is None
    assert (
        triage.verdicts[0].passed is None
        and "handed the conversation to 'billing'" in triage.verdicts[0].reason
    )
    assert billing.verdicts[0].passed is True
    assert task_pass_rates(store)["desk-1"] == (1, 1)  # one run, one judged answer, passed
    # The billing turn's conversation holds triage's call to a tool billing was never offered:
    # no row (trained against billing's tools, it would teach billing that call).
    from honed.messages import NotExportable, chat_example

    with pytest.raises(NotExportable, match="other_agents_turns"):  # triage's call, named triage's
        chat_example(billing)
    assert triage.tool_steps()[-1].extra["handoff"] == "billing"


def test_a_team_members_row_never_teaches_another_members_turns(capture: str, sqlite_url: str) -> None:
    """A QA pass (session 19): the desk's row under `instrument()` (the triage agent's last call)
    taught the billing agent's reply; under `Middleware` billing's row taught triage's handoff call
    (billing offered no such tool). Replies are named by `create_agent(name=...)`: a row holding
    another agent's turn after the request is no row."""
    from honed.messages import NotExportable, chat_example

    help_desk(capture_middleware(capture, sqlite_url)).invoke({"messages": [("user", DESK_REQUEST)]})
    honed.flush()
    for run in honed.open_store(sqlite_url).trajectories():
        if run.handed_off_to is None:
            with pytest.raises(NotExportable, match="other_agents_turns"):
                chat_example(run)


def test_an_answer_shaped_like_a_handoff_is_judged(sqlite_url: str) -> None:
    """A QA pass (session 19): a run whose answer was `{"handoff": "I give up"}` (a chain ending in
    a JSON parser) was taken for a team's handoff, and every verifier said "could not tell": a
    wrong answer dodged its fail. A handoff is the tool step's `Command`, marked by capture."""
    from langchain_core.output_parsers import JsonOutputParser

    from honed.testing import ScriptedChatModel

    handler = honed.CallbackHandler(store=sqlite_url)
    chain = ScriptedChatModel() | JsonOutputParser()
    dodge = 'answer {"handoff": "I give up"}'
    chain.invoke(
        dodge, {"callbacks": [handler], "metadata": {"honed": {"task_id": "t", "expected": {"total": 5}}}}
    )
    honed.flush()
    store = honed.open_store(sqlite_url)
    assert Worker(store, [ReferenceMatch()]).run_once() == 1
    (run,) = store.trajectories()
    assert run.output == {"handoff": "I give up"} and run.handed_off_to is None
    assert run.verdicts[0].passed is False, run.verdicts[0].reason


def routed_desk(middleware: list[Any], hook: str) -> Any:
    """A help desk whose triage agent never calls a tool to hand on: a router middleware's hook
    (`before_model` or `after_model`) returns the `Command` to the parent graph."""
    from langchain.agents.middleware import after_model, before_model
    from langchain_core.language_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage
    from langgraph.graph import START, MessagesState, StateGraph

    @{"before_model": before_model, "after_model": after_model}[hook]
    def route(state: AgentState, runtime: Any) -> Command:
        return Command(goto="billing", graph=Command.PARENT, update={"messages": state["messages"]})

    billing_model = GenericFakeChatModel(messages=iter([AIMessage("billing here")]))
    desk = StateGraph(MessagesState)
    desk.add_node("triage", create_agent(ToolScriptModel(), [], name="triage", middleware=[*middleware, route]),
                  destinations=("billing",))  # fmt: skip
    desk.add_node("billing", create_agent(billing_model, [], name="billing", middleware=middleware))
    desk.add_edge(START, "triage")
    return desk.compile(name="desk")


@pytest.mark.parametrize("hook", ["before_model", "after_model"])
def test_a_handoff_a_middlewares_hook_makes_ends_the_turn_as_a_tools_does(
    capture: str, hook: str, sqlite_url: str
) -> None:
    """A router middleware's hook, not a tool, hands the conversation to billing. The triage
    agent's end hook never runs, as at a pause: `Middleware` stored its turn `interrupted`, a run
    waiting for a human forever (never verified, counted unfinished). It ends as a tool's handoff
    does: `{"handoff": "billing"}`, with a step that says where it went."""
    desk = routed_desk(capture_middleware(capture, sqlite_url), hook)
    out = desk.invoke({"messages": [("user", "answer to billing")]}, labels("desk-1"))
    assert out["messages"][-1].content == "billing here"
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    found = store.trajectories(oldest_first=True)
    assert all(t.status == "ok" and not any(s.error for s in t.steps) for t in found)
    assert store.count(finished=False) == 0
    asked = {"messages": [{"role": "user", "content": "answer to billing"}]}
    if capture == "instrument":  # the desk is one run; the handoff's `Command` is triage's output
        (t,) = found
        assert (t.agent, t.task, t.answer) == ("desk", asked, "billing here")
        (triage_node,) = [s for s in t.steps if s.kind == "node" and s.name == "triage"]
        assert triage_node.output["value"]["goto"] == "billing"
        return
    triage, billing = found
    assert (triage.agent, triage.task, triage.output) == ("triage", asked, {"handoff": "billing"})
    assert names(triage) == (["handoff"] if hook == "before_model" else ["tool-script", "handoff"])
    handoff = triage.steps[-1]
    assert handoff.extra == {"synthesised": True, "handoff": "billing"}
    assert handoff.output["value"]["goto"] == "billing"
    assert (billing.agent, billing.answer, billing.task_id) == ("billing", "billing here", "desk-1")


def test_a_turn_a_hook_handed_on_is_not_judged_alone(sqlite_url: str) -> None:
    """As a tool's handoff (`test_a_turn_that_hands_the_conversation_on_is_not_judged_alone`): the
    triage turn's `{"handoff": "billing"}` is a step of the team's run, not an answer to judge."""
    routed_desk(capture_middleware("middleware", sqlite_url), "after_model").invoke(
        {"messages": [("user", "answer to billing")]},
        {"metadata": {"honed": {"task_id": "desk-1", "expected": "billing here"}}},
    )
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    Worker(store, [ReferenceMatch()]).run_once()
    triage = next(t for t in store.trajectories() if t.agent == "triage")
    assert triage.handed_off_to == "billing"
    assert triage.verdicts[0].passed is None


def test_a_replay_or_fork_from_an_earlier_checkpoint_is_a_run_of_its_own(
    capture: str, sqlite_url: str
) -> None:
    """Time travel: `invoke(None, checkpoint_config)` replays from a checkpoint taken mid-run, and
    `update_state(..., as_node=...)` forks it. Each is a new attempt under its own labels; the
    finished original must stay as it was (the replayed state still carries its trajectory id)."""
    from langchain_core.messages import AIMessage

    task = 'call add {"a": 2, "b": 3}; call mul {"a": 4, "b": 5}; answer product {result}'
    agent = create_agent(
        ToolScriptModel(), make_tools(), name="calc", middleware=capture_middleware(capture, sqlite_url),
        checkpointer=InMemorySaver(),
    )  # fmt: skip
    agent.invoke({"messages": [("user", task)]}, {**thread("tt"), **labels("orig")})
    assert honed.flush()
    (original,) = honed.open_store(sqlite_url).trajectories()
    history = list(agent.get_state_history(thread("tt")))
    mid = next(h for h in history if h.next == ("tools",) and len(h.values["messages"]) == 2)
    assert agent.invoke(None, {**mid.config, **labels("replay")})["messages"][-1].content == "product 20"
    asked = mid.values["messages"][-1]
    changed = AIMessage("", tool_calls=[{**asked.tool_calls[0], "args": {"a": 10, "b": 10}}], id=asked.id)
    fork = agent.update_state(mid.config, {"messages": [changed]}, as_node="model")
    agent.invoke(None, {**fork, **labels("fork")})
    assert honed.flush()
    runs = {t.task_id: t for t in honed.open_store(sqlite_url).trajectories()}
    assert set(runs) == {"orig", "replay", "fork"}
    assert [s.name for s in runs["orig"].steps] == [s.name for s in original.steps]
    assert runs["orig"].output == original.output == "product 20"
    assert all(t.status == "ok" for t in runs.values())
    if capture == "middleware":  # the replayed state names the run it was taken in (a QA pass, session 25)
        assert runs["replay"].metadata.get("replayed_from") == original.id
    assert next(s.input for s in runs["fork"].tool_steps()) == {"a": 10, "b": 10}
    # The fork ran a call a person wrote into the checkpoint: no row teaches it as the model's (a QA
    # pass, session 19: exported as the model's own, the fork holding no model call that asked it).
    from honed.messages import NotExportable, chat_example

    with pytest.raises(NotExportable, match="call_changed_before_running"):
        chat_example(runs["fork"])
    assert chat_example(runs["orig"])["messages"][-1]["content"] == "product 20"


def test_a_finished_runs_pause_resumed_again_is_an_attempt_of_its_own(capture: str, sqlite_url: str) -> None:
    """A QA pass (session 15): resuming a finished run's interrupt again (time travel from its
    checkpoint) merged the new outcome into the verified trajectory, under its old verdict."""
    agent = hitl_agent(capture, sqlite_url, InMemorySaver())
    chat = thread("c1", task_id="r1", expected="the sum is 5")
    agent.invoke({"messages": [("user", 'call add {"a": 2, "b": 3}; answer the sum is {result}')]}, chat)
    paused = agent.get_state(chat).config  # the checkpoint at the interrupt
    agent.invoke(Command(resume={"decisions": [{"type": "approve"}]}), chat)
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    Worker(store, [ReferenceMatch()]).run_once()
    (first,) = store.trajectories()
    assert first.answer == "the sum is 5" and [v.passed for v in first.verdicts] == [True]
    reject = {"type": "reject", "message": "no adding"}
    replayed = agent.invoke(Command(resume={"decisions": [reject]}), {**paused, "metadata": chat["metadata"]})
    assert honed.flush()
    assert store.get(first.id).answer == "the sum is 5"  # the verified run as it was
    (again,) = [t for t in store.trajectories() if t.id != first.id]
    assert again.answer == replayed["messages"][-1].content and again.task_id == "r1"
    assert again.metadata.get("replayed_from") == first.id or capture == "instrument"
    assert Worker(store, [ReferenceMatch()]).run_once() == 1  # judged on its own
    assert [v.passed for v in store.get(first.id).verdicts] == [True]


def test_a_run_id_used_again_is_an_attempt_of_its_own(capture: str, sqlite_url: str, tmp_path: Path) -> None:
    """A QA pass (session 16): `config["run_id"]` used again (a harness's request or idempotency
    key, a retry) was dropped in the same process, and in another process merged into the
    verified trajectory: the wrong answer of the retry trained under the first run's pass."""
    import uuid

    agent = create_agent(
        ToolScriptModel(), [], name="calc", middleware=capture_middleware(capture, sqlite_url)
    )
    run_id = uuid.uuid4()
    config = {"run_id": run_id, "metadata": {"honed": {"task_id": "t1", "expected": "5"}}}
    agent.invoke({"messages": [("user", "answer 5")]}, config)
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    worker = Worker(store, [ReferenceMatch()])
    assert worker.run_once() == 1
    (first,) = store.trajectories()
    agent.invoke({"messages": [("user", "answer 7")]}, config)  # the same id, in this process
    script = textwrap.dedent(f"""
        import uuid, honed
        from langchain.agents import create_agent
        from fakes import ToolScriptModel
        agent = create_agent(ToolScriptModel(), [], name="calc")
        handler = honed.CallbackHandler(store={sqlite_url!r})
        config = {{"run_id": uuid.UUID({str(run_id)!r}), "callbacks": [handler],
                  "metadata": {{"honed": {{"task_id": "t1", "expected": "5"}}}}}}
        agent.invoke({{"messages": [("user", "answer 8")]}}, config)
        assert honed.flush()
    """)  # and in another process
    env = {**__import__("os").environ, "PYTHONPATH": str(TESTS), "HONED_SPOOL_DIR": str(tmp_path / "spool")}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    assert honed.flush()
    assert worker.run_once() == 2
    runs = {t.answer: t for t in store.trajectories()}
    assert set(runs) == {"5", "7", "8"}
    assert [v.passed for v in runs["5"].verdicts] == [True] and runs["5"].id == first.id
    assert [v.passed for v in runs["7"].verdicts] == [False] == [v.passed for v in runs["8"].verdicts]
    if capture == "instrument":  # the trajectory's id is the run's (the Middleware makes its own)
        assert runs["7"].metadata["replayed_from"] == runs["8"].metadata["replayed_from"] == first.id
    assert [t.answer for t in honed.exporters.select_trajectories(store, verdict="pass")] == ["5"]


def test_what_a_run_was_given_is_stored_as_it_was_though_the_caller_changes_it(
    capture: str, sqlite_url: str
) -> None:
    """A QA pass (session 16): inputs and outputs were serialised later on the writer thread, from
    the caller's own objects: the stateless chat loop (append the reply and the next turn to the
    `history` it passed in) stored every turn's task with the later turns in it, and the gate
    rebuilt its held-out prompts from those."""
    from honed.learn.cycle import tasks_from_store

    agent = create_agent(
        ToolScriptModel(), [], name="chat", middleware=capture_middleware(capture, sqlite_url)
    )
    history: list[dict[str, str]] = []
    for i, text in enumerate(["answer one", "answer two", "answer three"]):
        history.append({"role": "user", "content": text})
        labels = {"task_id": f"turn{i}", "split": "heldout", "expected": text.split()[1]}
        state = agent.invoke({"messages": history}, {"metadata": {"honed": labels}})
        history.append({"role": "assistant", "content": state["messages"][-1].content})
        state["messages"].append(("user", "changed afterwards"))  # the state it got back, too
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    runs = store.trajectories(oldest_first=True)
    assert [[m["content"] for m in t.task["messages"]] for t in runs] == [
        ["answer one"],
        ["answer one", "one", "answer two"],
        ["answer one", "one", "answer two", "two", "answer three"],
    ]
    assert [t.answer for t in runs] == ["one", "two", "three"]
    assert [(k.id, k.prompt) for k in tasks_from_store(store, "heldout")] == [
        ("turn0", "answer one"), ("turn1", "answer two"), ("turn2", "answer three")
    ]  # fmt: skip


@pytest.mark.parametrize("where", ["here", "another process"])
def test_a_tool_error_before_a_pause_is_one_step_after_the_resume(
    capture: str, sqlite_url: str, tmp_path: Path, where: str
) -> None:
    """A QA pass (session 16): a tool that failed before a human-in-the-loop pause was recorded
    again after the resume (the next model call read its error message back): the timeline
    showed the call twice and tool-error counts were inflated. Another (session 23): so was a
    call that succeeded, once calls the model asked for were synthesised when they succeed too."""
    from langchain_core.tools import ToolException

    @tool
    def lookup(order: str) -> str:
        """Look up an order."""
        raise ToolException(f"no such order {order}")

    lookup.handle_tool_error = True
    saver = checkpointer("sqlite", tmp_path)
    middleware = [
        *capture_middleware(capture, sqlite_url),
        HumanInTheLoopMiddleware(interrupt_on={"add": True}),
    ]
    agent = create_agent(
        ToolScriptModel(), [note, lookup, add], name="support", middleware=middleware, checkpointer=saver
    )
    chat = thread("t1", task_id="k1")
    task = 'call note {"text": "order A7"}; call lookup {"order": "A7"}; ' + ADD_TASK
    agent.invoke({"messages": [("user", task)]}, chat)
    resume = Command(resume={"decisions": [{"type": "approve"}]})
    if where == "here":
        agent.invoke(resume, chat)
    else:
        assert honed.flush()
        script = RESUME_WITH_LOOKUP.format(
            store=sqlite_url, checkpoints=tmp_path / "checkpoints.db", capture=capture
        )
        env = {
            **__import__("os").environ,
            "PYTHONPATH": str(TESTS),
            "HONED_SPOOL_DIR": str(tmp_path / "spool"),
        }
        subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    assert honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    calls = [(s.name, s.extra.get("tool_call_id")) for s in t.steps if s.kind == "tool"]
    assert [name for name, _ in calls] == ["note", "lookup", "add"] and t.status == "ok", calls


@tool
def note(text: str) -> str:
    """Keep a note."""
    return f"noted: {text}"


RESUME_WITH_LOOKUP = textwrap.dedent(
    """
    import sqlite3
    import honed
    from langchain.agents import create_agent
    from langchain.agents.middleware import HumanInTheLoopMiddleware
    from langchain_core.tools import ToolException, tool
    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.types import Command
    from fakes import ToolScriptModel, add

    @tool
    def note(text: str) -> str:
        \"\"\"Keep a note.\"\"\"
        return f"noted: {{text}}"

    @tool
    def lookup(order: str) -> str:
        \"\"\"Look up an order.\"\"\"
        raise ToolException(f"no such order {{order}}")

    lookup.handle_tool_error = True
    if "{capture}" == "instrument":
        honed.instrument(store="{store}")
        capture = []
    else:
        capture = [honed.Middleware(store="{store}")]
    saver = SqliteSaver(sqlite3.connect("{checkpoints}", check_same_thread=False))
    middleware = [*capture, HumanInTheLoopMiddleware(interrupt_on={{"add": True}})]
    agent = create_agent(ToolScriptModel(), [note, lookup, add], name="support", middleware=middleware, checkpointer=saver)
    chat = {{"configurable": {{"thread_id": "t1"}}, "metadata": {{"honed": {{"task_id": "k1"}}}}}}
    agent.invoke(Command(resume={{"decisions": [{{"type": "approve"}}]}}), chat)
    assert honed.flush()
    """
)


def test_a_run_continued_past_a_static_breakpoint_is_the_same_trajectory(
    capture: str, sqlite_url: str
) -> None:
    """`interrupt_before=["tools"]` pauses; `invoke(None, config)` (no checkpoint named) goes on.
    A QA pass (session 15): the paused trajectory stayed `interrupted` forever (never verified)
    and the rest became a second one with no task."""
    agent = create_agent(
        ToolScriptModel(), make_tools(), name="calc", middleware=capture_middleware(capture, sqlite_url),
        checkpointer=InMemorySaver(), interrupt_before=["tools"],
    )  # fmt: skip
    task = 'call add {"a": 2, "b": 3}; answer sum {result}'
    config = {**thread("bp"), **labels("bp")}
    if capture == "instrument":  # LangGraph tells only handlers in the config of these pauses (README)
        config["callbacks"] = [honed.CallbackHandler(store=sqlite_url)]
    agent.invoke({"messages": [("user", task)]}, config)
    assert agent.invoke(None, config)["messages"][-1].content == "sum 5"
    assert honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert (t.status, t.task_id, t.answer) == ("ok", "bp", "sum 5")
    assert t.task == {"messages": [{"role": "user", "content": task}]}
    names = [s.name for s in t.steps]
    assert names.index("interrupt") < names.index("resume") < names.index("add")


@pytest.mark.parametrize("how", ["invoke", "astream"])
@pytest.mark.parametrize("where", ["interrupt_before", "interrupt_after"])
def test_a_static_breakpoint_pauses_as_interrupted_under_instrument_alone(
    capture: str, where: str, how: str, sqlite_url: str
) -> None:
    """A run stopped at a static breakpoint ends as if it were done (no `__interrupt__`, nothing
    raised), and LangGraph tells only handlers in the config (`on_interrupt`): under
    `instrument()` alone it was stored `ok`, its answer the tool-call reply's empty text (a
    verifier failed it), and `invoke(None)` began a second trajectory."""
    import asyncio

    agent = create_agent(
        ToolScriptModel(), [add], name="calc", middleware=capture_middleware(capture, sqlite_url),
        checkpointer=InMemorySaver(), **{where: ["tools"]},
    )  # fmt: skip

    def run(inputs: Any) -> None:
        if how == "invoke":
            agent.invoke(inputs, config)
            return

        async def consume() -> None:
            async for _ in agent.astream(inputs, config):
                pass

        asyncio.run(consume())

    task = 'call add {"a": 2, "b": 3}; answer sum {result}'
    config = {**thread("bp"), **labels("bp")}
    run({"messages": [("user", task)]})
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    (paused,) = store.trajectories()
    assert (paused.status, paused.output, paused.task_id) == ("interrupted", None, "bp")
    assert paused.task == {"messages": [{"role": "user", "content": task}]}
    assert names(paused)[-1] == "interrupt" and store.count(finished=False) == 1
    if capture == "instrument":  # the checkpoint it waits at, as `on_interrupt` would say
        at = agent.get_state(config).config["configurable"]["checkpoint_id"]
        assert paused.steps[-1].extra["checkpoint_id"] == at
    assert Worker(store, [ReferenceMatch()]).run_once() == 0

    run(None)  # on past the breakpoint
    assert honed.flush()
    (t,) = store.trajectories()
    assert (t.id, t.status, t.answer, t.task) == (paused.id, "ok", "sum 5", paused.task)
    before = where == "interrupt_before"
    paused_at = ["tool-script", "interrupt"] if before else ["tool-script", "add", "interrupt"]
    assert names(t) == [*paused_at, "resume", *(["add"] if before else []), "tool-script"]


def test_a_failure_an_outer_middleware_retries_stays_a_step_whatever_flushes_meanwhile(
    sqlite_url: str,
) -> None:
    """A tool fails and a middleware listed before honed's retries it (the README's order). A
    `honed.flush()` from anywhere in the process meanwhile (a server's periodic flush, another
    request) must not end the run as an error and drop the rest of it."""
    from langchain.agents.middleware import AgentMiddleware

    failures = []

    @tool
    def flaky(x: int) -> str:
        """Fails the first time."""
        if not failures:
            failures.append(x)
            raise ConnectionError("transient")
        return f"ok{x}"

    class RetryAfterFlush(AgentMiddleware):
        def wrap_tool_call(self, request: Any, handler: Any) -> Any:
            try:
                return handler(request)
            except ConnectionError:
                assert honed.flush()  # what a flush from another thread during a backoff does
                return handler(request)

    agent = create_agent(
        ToolScriptModel(),
        [flaky],
        name="retry",
        middleware=[RetryAfterFlush(), honed.Middleware(store=sqlite_url)],
    )
    out = agent.invoke({"messages": [("user", 'call flaky {"x": 7}; answer got {result}')]}, labels("r"))
    assert out["messages"][-1].content == "got ok7" and honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert (t.status, t.output) == ("ok", "got ok7")
    assert [(s.kind, s.error) for s in t.steps] == [
        ("model", None), ("tool", "ConnectionError: transient"), ("tool", None), ("model", None),
    ]  # fmt: skip


def test_a_return_direct_tools_result_is_the_answer(capture: str, sqlite_url: str) -> None:
    """With `return_direct=True` the run ends on the tool's message: that is what `invoke()`
    returns and what a reference check must compare, not the tool-calling message's ''."""

    @tool(return_direct=True)
    def lookup(order: str) -> str:
        """Look up an order."""
        return f"order {order} shipped"

    agent = create_agent(
        ToolScriptModel(), [lookup], name="rd", middleware=capture_middleware(capture, sqlite_url)
    )
    out = agent.invoke({"messages": [("user", 'call lookup {"order": "A7"}; answer unused')]}, labels("rd"))
    assert out["messages"][-1].content == "order A7 shipped" and honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert (t.output, t.answer) == ("order A7 shipped", "order A7 shipped")


def test_an_agent_called_by_other_code_gets_its_own_task_and_answer(sqlite_url: str) -> None:
    """An agent called (twice) from a plain Runnable: the root run is the caller's, whose input
    and output are not the agent's; each call is stored with what it was asked and answered."""
    from langchain_core.runnables import RunnableLambda

    agent = create_agent(
        ToolScriptModel(), make_tools(), name="calc", middleware=[honed.Middleware(store=sqlite_url)]
    )

    def twice(_: Any) -> dict[str, Any]:
        first = agent.invoke({"messages": [("user", 'call add {"a": 1, "b": 1}; answer first {result}')]})
        second = agent.invoke({"messages": [("user", 'call mul {"a": 3, "b": 3}; answer second {result}')]})
        return {"messages": second["messages"], "first": first["messages"][-1].content}

    RunnableLambda(twice, name="wrapper").invoke({"messages": [("user", "outer question")]}, labels("w"))
    assert honed.flush()
    runs = honed.open_store(sqlite_url).trajectories(oldest_first=True)
    assert [(t.task["messages"][-1]["content"].split(";")[-1], t.output) for t in runs] == [
        (" answer first {result}", "first 2"), (" answer second {result}", "second 9"),
    ]  # fmt: skip


class Trip(TypedDict):
    cities: list[str]
    answers: Annotated[list[str], operator.add]


def test_map_reduce_workers_keep_their_own_task_not_the_graphs(sqlite_url: str, tmp_path: Path) -> None:
    """A QA pass (session 20): `Send` workers (an agent with `honed.Middleware`) inherited the
    graph's labels: three different requests were one task id, each judged against the graph's
    expected answer. A worker keeps the split and run-wide labels, and the graph's task id as
    `within_task_id` (a held-out task's workers stay out of training)."""
    from langgraph.graph import START, StateGraph
    from langgraph.types import Send

    from honed.store.select import HeldOut

    worker = create_agent(
        ToolScriptModel(), [], name="worker", middleware=[honed.Middleware(store=sqlite_url)]
    )

    def fan(state: Trip) -> Any:
        return [Send("work", {"messages": [("user", f"answer {c} is sunny")]}) for c in state["cities"]]

    def work(state: dict[str, Any]) -> dict[str, Any]:
        return {"answers": [worker.invoke(state)["messages"][-1].content]}

    graph = StateGraph(Trip)
    graph.add_node("work", work)
    graph.add_conditional_edges(START, fan, ["work"])
    app_ = graph.compile()
    labels = {"task_id": "trip-17", "expected": "3 cities sunny", "split": "train", "deployment": "eu"}
    app_.invoke({"cities": ["Oslo", "Rome", "Lima"]}, {"metadata": {"honed": labels}})
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    runs = store.trajectories(oldest_first=True)
    assert sorted(t.answer for t in runs) == ["Lima is sunny", "Oslo is sunny", "Rome is sunny"]
    for t in runs:
        assert t.task_id is None and "expected" not in t.metadata, t.metadata
        assert (t.split, t.metadata["deployment"], t.metadata["within_task_id"]) == ("train", "eu", "trip-17")
    assert all(HeldOut(task_ids=frozenset({"trip-17"})).holds(t) for t in runs)
    assert not any(HeldOut(task_ids=frozenset({"trip-18"})).holds(t) for t in runs)


def test_a_send_payload_is_its_nodes_input(sqlite_url: str) -> None:
    """Map-reduce with `Send`: each branch runs the same node on its own payload, and that payload
    is what tells the branches' steps apart."""
    from typing import TypedDict

    from langgraph.graph import END, START, StateGraph
    from langgraph.types import Send

    class State(TypedDict):
        topics: list[str]
        done: Annotated[list[str], operator.add]

    graph = StateGraph(State)
    graph.add_node("work", lambda s: {"done": [s["topic"].upper()]})
    graph.add_conditional_edges(START, lambda s: [Send("work", {"topic": t}) for t in s["topics"]])
    graph.add_edge("work", END)
    honed.instrument(store=sqlite_url)
    try:
        graph.compile().invoke({"topics": ["a", "b", "c"]}, labels("fan"))
        assert honed.flush()
    finally:
        honed.uninstrument()
    (t,) = honed.open_store(sqlite_url).trajectories()
    work = [s for s in t.steps if s.name == "work"]
    assert sorted((s.input["topic"], s.output["done"][0]) for s in work) == [
        ("a", "A"),
        ("b", "B"),
        ("c", "C"),
    ]


def test_labels_that_are_not_a_dict_lose_the_labels_not_the_run(capture: str, sqlite_url: str) -> None:
    """`{"honed": "task-1"}` is a mistake (labels are a dict): the run is captured whole, unlabelled."""
    agent = create_agent(
        ToolScriptModel(), [add], name="calc", middleware=capture_middleware(capture, sqlite_url)
    )
    agent.invoke({"messages": [("user", ADD_TASK)]}, {"metadata": {"honed": "task-1"}})
    assert honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert (t.status, t.task_id, t.output) == ("ok", None, "the sum is 5")
    assert [s.kind for s in t.steps if s.kind != "node"] == ["model", "tool", "model"]


def test_a_tool_call_a_limit_blocked_keeps_the_arguments_the_model_asked_for(
    capture: str, sqlite_url: str
) -> None:
    """A call stopped before its tool (a tool-call limit, an unknown tool) is a failed tool step
    with the arguments the model sent: they are what the failure is about."""
    from langchain.agents.middleware import ToolCallLimitMiddleware

    middleware = [ToolCallLimitMiddleware(run_limit=1), *capture_middleware(capture, sqlite_url)]
    agent = create_agent(ToolScriptModel(), [add], name="calc", middleware=middleware)
    task = 'call add {"a": 1, "b": 1}; call add {"a": 2, "b": 2}; answer {result}'
    agent.invoke({"messages": [("user", task)]}, labels("limit"))
    assert honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert [(s.input, s.error is not None) for s in t.tool_steps()] == [
        ({"a": 1, "b": 1}, False),
        ({"a": 2, "b": 2}, True),
    ]


def test_a_huge_state_key_does_not_cost_the_answer(capture: str, sqlite_url: str) -> None:
    """A structured response beside a state key over the field cap (a document the agent loaded):
    the output is capped key by key, so the answer a verifier reads survives the document's cut."""
    from langchain.agents.middleware import AgentMiddleware

    class Document(AgentState):
        document: NotRequired[str]

    class LoadsDocument(AgentMiddleware):
        state_schema = Document

        def before_agent(self, state: Any, runtime: Any) -> dict[str, Any]:
            return {"document": "lorem ipsum " * 50_000}

    middleware = [LoadsDocument(), *capture_middleware(capture, sqlite_url)]
    if capture == "instrument":
        honed.instrument(store=sqlite_url, max_field_bytes=8192)
    else:
        middleware[-1] = honed.Middleware(store=sqlite_url, max_field_bytes=8192)
    agent = create_agent(ToolScriptModel(), [add], name="calc", middleware=middleware)
    agent.invoke({"messages": [("user", ADD_TASK)]}, labels("doc"))
    assert honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert t.answer == "the sum is 5" and t.output["document"]["__truncated__"] is True


def test_a_subagent_paused_at_an_interrupt_is_no_failed_step(sqlite_url: str) -> None:
    """A QA pass (session 17): under `Middleware`, a subagent (an agent called by a tool) that
    paused at `interrupt()` left its step open; the caller's trajectory ended first, so the step
    read "incomplete: the run ended before this step finished", an ERROR span in OTLP."""

    @tool
    def approve_search(q: str) -> str:
        """Search, once a person approves."""
        return f"found {q}" if interrupt({"search": q}) else "denied"

    middleware = [honed.Middleware(store=sqlite_url)]
    searcher = create_agent(ToolScriptModel(), [approve_search], name="searcher", middleware=middleware)

    @tool
    def delegate(q: str) -> str:
        """Ask the searcher."""
        request = f'call approve_search {{"q": "{q}"}}; answer searcher says {{result}}'
        return searcher.invoke({"messages": [("user", request)]})["messages"][-1].content

    top = create_agent(
        ToolScriptModel(), [delegate], name="top", middleware=middleware, checkpointer=InMemorySaver()
    )
    config = thread("th-sub")
    top.invoke({"messages": [("user", 'call delegate {"q": "otters"}; answer top says {result}')]}, config)
    done = top.invoke(Command(resume=True), config)
    assert done["messages"][-1].content == "top says searcher says found otters"
    assert honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert t.status == "ok"
    subagent_steps = [s for s in t.steps if s.kind == "node" and s.name == "searcher"]
    assert len(subagent_steps) == 2 and not any(s.error for s in t.steps), [
        (s.name, s.error) for s in t.steps
    ]


def test_a_tool_cannot_move_the_run_into_another_trajectory(sqlite_url: str) -> None:
    """A QA pass (session 19): a tool returning `Command(update={"honed_trajectory": <another
    run's id>})` split its run in two: a "paused" one holding its tool calls (never verified) and
    a new one holding its answer alone. The run's trajectory is the one its middleware opened."""
    from langchain_core.messages import ToolMessage as Reply

    from honed.testing import ScriptedChatModel

    middleware = honed.Middleware(store=sqlite_url)
    victim = create_agent(ScriptedChatModel(), tools=[], name="victim", middleware=[middleware])
    victim.invoke({"messages": [("user", "answer 5")]})
    honed.flush()
    store = honed.open_store(sqlite_url)
    (before,) = store.trajectories(agent="victim")

    @tool
    def lookup(q: str, tool_call_id: Annotated[str, InjectedToolCallId]) -> Command:
        """Look something up."""
        return Command(
            update={"honed_trajectory": before.id, "messages": [Reply("7", tool_call_id=tool_call_id)]}
        )

    attacker = create_agent(
        ScriptedChatModel(), tools=[lookup], name="attacker", middleware=[honed.Middleware(store=sqlite_url)]
    )
    attacker.invoke({"messages": [("user", 'call lookup {"q": "x"}; answer {result}')]})
    honed.flush()
    (run,) = store.trajectories(agent="attacker")
    assert (run.status, run.answer) == ("ok", "7")
    assert [s.kind for s in run.steps] == ["model", "tool", "model"]
    assert store.get(before.id).to_dict() == before.to_dict()


def test_a_tool_strategys_tools_are_recorded_on_every_call(sqlite_url: str) -> None:
    """A QA pass (session 19): with `ToolStrategy(Ticket)` the model is bound to `Ticket` at every
    call, yet `Middleware` recorded it only on the call that answered through it (`instrument()`
    on every call): the first call's row read as offered tools the model never had."""
    from langchain.agents.structured_output import ToolStrategy

    agent = create_agent(ToolScriptModel(), [add], name="triage", response_format=ToolStrategy(Ticket),
                         middleware=[honed.Middleware(store=sqlite_url)])  # fmt: skip
    agent.invoke({"messages": [("user", f'call add {{"a": 1, "b": 2}}; {TICKET_TASK}')]})
    honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    offered = [[x["function"]["name"] for x in s.input.get("tools") or ()] for s in t.model_steps()]
    assert offered == [["add", "Ticket"], ["add", "Ticket"]], offered


def test_an_unknown_tools_error_is_a_step_of_its_tool_node_beside_a_command(sqlite_url: str) -> None:
    """A QA pass (session 19): when another tool of the node returned a `Command`, `ToolNode` returns a
    list, and the error step for a call to a tool that does not exist landed under the next node."""
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage, HumanMessage
    from langgraph.graph import END, START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode

    @tool
    def cmd(x: str, tool_call_id: Annotated[str, InjectedToolCallId]) -> Command:
        """Returns a Command."""
        return Command(update={"messages": [ToolMessage("cmd " + x, tool_call_id=tool_call_id)]})

    calls = [{"name": "cmd", "args": {"x": "1"}, "id": "ok1"}, {"name": "ghost", "args": {}, "id": "bad1"}]
    model = GenericFakeChatModel(messages=iter([AIMessage("", tool_calls=calls), AIMessage("final")]))
    graph = StateGraph(MessagesState)
    graph.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    graph.add_node("tools", ToolNode([cmd]))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges(
        "agent", lambda s: "tools" if s["messages"][-1].tool_calls else END, ["tools", END]
    )
    graph.add_edge("tools", "agent")
    honed.instrument(store=sqlite_url)
    try:
        graph.compile(name="desk").invoke({"messages": [HumanMessage("go")]})
    finally:
        honed.uninstrument()
    honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    by_id = {s.id: s for s in t.steps}
    placed = [(s.kind, s.name, by_id[s.parent_id].name if s.parent_id in by_id else None) for s in t.steps]
    assert placed[2:5] == [("node", "tools", None), ("tool", "cmd", "tools"), ("tool", "ghost", "tools")], (
        placed
    )


@pytest.mark.parametrize("shape", ["a message", "a role dict", "a pair"])
def test_a_run_given_one_message_keeps_its_labels(capture: str, sqlite_url: str, shape: str) -> None:
    """A QA pass (session 23): `{"messages": HumanMessage(...)}` (one message, as `add_messages`
    takes it) lost its task and expected answer under the middleware, taken for another run's
    worker: never verified, never trained on."""
    from langchain_core.messages import HumanMessage

    text = 'call add {"a": 2, "b": 3}; answer {result}'
    message = {
        "a message": HumanMessage(text),
        "a role dict": {"role": "user", "content": text},
        "a pair": ("user", text),  # (a review, session 23)
    }[shape]
    agent = create_agent(
        ToolScriptModel(), [add], name="calc", middleware=capture_middleware(capture, sqlite_url)
    )
    agent.invoke({"messages": message}, {"metadata": {"honed": {"task_id": "k1", "expected": "5"}}})
    assert honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert (t.task_id, t.metadata.get("expected"), t.answer) == ("k1", "5", "5")


def test_a_handoff_beside_another_call_of_the_same_reply_is_one_turn(sqlite_url: str) -> None:
    """A QA pass (session 23): a triage agent's reply asked for a handoff and another tool at once;
    the middleware ended the turn when the handoff returned, so the other call (slowed here by an
    outer middleware, as a rate limiter would) began a second trajectory, stored `interrupted`
    (waiting for a human forever), or was stored as failed."""
    import time

    from langchain.agents.middleware import wrap_tool_call
    from langchain_core.messages import AIMessage
    from langgraph.graph import START, MessagesState, StateGraph

    from honed.testing import ScriptedChatModel

    class OneReply(ScriptedChatModel):
        reply: AIMessage

        def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any) -> Any:
            from langchain_core.outputs import ChatGeneration, ChatResult

            return ChatResult(generations=[ChatGeneration(message=self.reply.model_copy(deep=True))])

    @tool
    def transfer_to_billing(tool_call_id: Annotated[str, InjectedToolCallId]) -> Command:
        """Hand the conversation to billing."""
        update = {"messages": [ToolMessage("transferred", tool_call_id=tool_call_id)]}
        return Command(goto="billing", graph=Command.PARENT, update=update)

    @tool
    def log_ticket(note: str) -> str:
        """Log a ticket."""
        return f"logged {note}"

    @wrap_tool_call
    def rate_limited(request: Any, handler: Any) -> Any:
        if request.tool_call["name"] == "log_ticket":
            time.sleep(0.2)
        return handler(request)

    capture = honed.Middleware(store=sqlite_url)
    both = AIMessage("", tool_calls=[{"name": "transfer_to_billing", "args": {}, "id": "c1"},
                                     {"name": "log_ticket", "args": {"note": "n1"}, "id": "c2"}])  # fmt: skip
    desk = StateGraph(MessagesState)
    triage = create_agent(OneReply(reply=both), [transfer_to_billing, log_ticket], name="triage",
                          middleware=[rate_limited, capture])  # fmt: skip
    billing = create_agent(
        OneReply(reply=AIMessage("billing here")), [], name="billing", middleware=[capture]
    )
    desk.add_node("triage", triage, destinations=("billing",))
    desk.add_node("billing", billing)
    desk.add_edge(START, "triage")
    out = desk.compile(name="desk").invoke({"messages": [("user", "my bill is wrong")]})
    assert out["messages"][-1].content == "billing here"
    assert honed.flush()
    (turn,) = honed.open_store(sqlite_url).trajectories(agent="triage")
    tools = {s.name: s.error for s in turn.steps if s.kind == "tool"}
    assert turn.status == "ok" and tools == {"transfer_to_billing": None, "log_ticket": None}, (
        turn.status,
        tools,
    )


def test_a_pipelines_turns_before_its_answer_are_not_judged_as_the_task(sqlite_url: str) -> None:
    """A QA pass (session 23): two agents as consecutive nodes (researcher, then writer) each
    stored with the run's task and expected answer; the researcher's correct notes failed the
    reference, and one run that passed read as two attempts and a failure."""
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.outputs import ChatGeneration, ChatResult
    from langgraph.graph import END, START, MessagesState, StateGraph

    from honed.learn.datasets import task_pass_rates

    class Writer(BaseChatModel):
        @property
        def _llm_type(self) -> str:
            return "writer"

        def _generate(
            self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any
        ) -> ChatResult:
            notes = [m for m in messages if isinstance(m, AIMessage)][-1].content
            return ChatResult(generations=[ChatGeneration(message=AIMessage(notes.replace("notes: ", "")))])

    capture = honed.Middleware(store=sqlite_url)
    graph = StateGraph(MessagesState)
    graph.add_node(
        "researcher", create_agent(ToolScriptModel(), [add], name="researcher", middleware=[capture])
    )
    graph.add_node("writer", create_agent(Writer(), [], name="writer", middleware=[capture]))
    graph.add_edge(START, "researcher")
    graph.add_edge("researcher", "writer")
    graph.add_edge("writer", END)
    out = graph.compile(name="pipeline").invoke(
        {"messages": [("user", 'call add {"a": 2, "b": 3}; answer notes: {result}')]},
        {"metadata": {"honed": {"task_id": "sum", "expected": "5", "split": "train"}}},
    )
    assert out["messages"][-1].content == "5"
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    Worker(store, [ReferenceMatch()]).run_once()
    runs = {t.agent: t for t in store.trajectories()}
    assert (runs["researcher"].task_id, runs["researcher"].metadata.get("within_task_id")) == (None, "sum")
    assert runs["writer"].task_id == "sum" and runs["writer"].verdicts[0].passed is True
    assert task_pass_rates(store) == {"sum": (1, 1)}


def test_a_held_out_tasks_workers_stay_held_out_under_a_redaction_hook(sqlite_url: str) -> None:
    """A second review (session 23): the `redact=` hook rewrote the `within_task_id` a `Send`
    worker's turn keeps (the README's own hook, `ACME-` ids), so the task held out by id no
    longer held its workers out."""
    from honed.store.select import HeldOut

    hook = honed.Middleware(store=sqlite_url, redact=lambda s: s.replace("ACME-", "[customer]-"))
    worker = create_agent(ToolScriptModel(), [], name="worker", middleware=[hook])

    class Trip(TypedDict):
        cities: list[str]
        answers: Annotated[list[str], operator.add]

    def fan(state: Trip) -> Any:
        from langgraph.types import Send

        return [Send("work", {"messages": [("user", f"answer {c} is sunny")]}) for c in state["cities"]]

    def work(state: dict[str, Any]) -> dict[str, Any]:
        return {"answers": [worker.invoke(state)["messages"][-1].content]}

    from langgraph.graph import START, StateGraph

    graph = StateGraph(Trip)
    graph.add_node("work", work)
    graph.add_conditional_edges(START, fan, ["work"])
    graph.compile().invoke({"cities": ["Oslo", "Rome"]}, {"metadata": {"honed": {"task_id": "ACME-17"}}})
    assert honed.flush()
    runs = honed.open_store(sqlite_url).trajectories()
    assert len(runs) == 2 and all(t.metadata.get("within_task_id") == "ACME-17" for t in runs)
    assert all(HeldOut(task_ids=frozenset({"ACME-17"})).holds(t) for t in runs)


def test_a_resume_labelled_held_out_holds_the_whole_run_out(capture: str, sqlite_url: str) -> None:
    """A QA pass (session 24): a run labelled `train` paused for a human, resumed with labels
    that say `heldout`: under `instrument()` its metadata said it was held out and its split did
    not (the store merged the resumed half's metadata, not its split), so it trained; under
    `Middleware` the resume's labels were dropped. Either way now, the whole run is held out."""
    from honed.store.select import HeldOut, select_trajectories

    agent = hitl_agent(capture, sqlite_url, InMemorySaver())
    agent.invoke({"messages": [("user", ADD_TASK)]}, thread("th-held", task_id="t-add", split="train"))
    resumed = thread("th-held", task_id="t-eval", split="heldout")
    agent.invoke(Command(resume={"decisions": [{"type": "approve"}]}), resumed)
    assert honed.flush()
    store = honed.open_store(sqlite_url)
    (t,) = store.trajectories()
    assert (t.status, t.task_id, t.split) == ("ok", "t-add", "heldout")
    assert HeldOut.of(store).holds(t) and not list(select_trajectories(store))


def test_a_retry_after_a_failure_is_an_attempt_at_the_same_task(capture: str, sqlite_url: str) -> None:
    """A QA pass (session 24): a tool failed, and the app retried from the last checkpoint with
    `invoke(None, config)`, as LangGraph documents. The retry was stored as an `ok` run of no task
    (`null` under `instrument()`, `{"resume": null}` under `Middleware`): a verifier judged an
    answer to nothing. Now, under both, it is an attempt of its own at the failed run's task,
    `replayed_from` it; the failed run stays as it ended."""
    failing = [True]

    @tool
    def flaky(a: int, b: int) -> int:
        """Add two numbers; the service is down the first time."""
        if failing[0]:
            failing[0] = False
            raise ConnectionError("upstream down")
        return a + b

    agent = create_agent(
        ToolScriptModel(), [flaky], name="calc", middleware=capture_middleware(capture, sqlite_url),
        checkpointer=InMemorySaver(),
    )  # fmt: skip
    config = thread("th-retry", task_id="t-flaky", split="train")
    task = 'call flaky {"a": 2, "b": 3}; answer the sum is {result}'
    with pytest.raises(ConnectionError):
        agent.invoke({"messages": [("user", task)]}, config)
    agent.invoke(None, config)
    assert honed.flush()
    runs = honed.open_store(sqlite_url).trajectories(oldest_first=True)
    failed, retry = runs
    assert failed.status == "error" and "upstream down" in failed.error
    assert (retry.status, retry.answer, retry.metadata.get("replayed_from")) == (
        "ok",
        "the sum is 5",
        failed.id,
    )
    assert (retry.task_id, retry.split, retry.task) == ("t-flaky", "train", failed.task)


def test_a_model_step_has_the_same_name_whichever_entry_point_stored_it(
    capture: str, sqlite_url: str
) -> None:
    """Session 25: a model with no model name (LangChain's own fakes, a custom `BaseChatModel`)
    was `GenericFakeChatModel` under `Middleware` and `genericfakechatmodel` (its tracing provider)
    under `instrument()`: a report grouping steps by name split one model in two."""
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    model = GenericFakeChatModel(messages=iter([AIMessage("hello")]))
    agent = create_agent(model, [], middleware=capture_middleware(capture, sqlite_url))
    agent.invoke({"messages": [("user", "hi")]})
    assert honed.flush()
    (run,) = honed.open_store(sqlite_url).trajectories()
    assert [s.name for s in run.steps if s.kind == "model"] == ["genericfakechatmodel"]
    # Session 26 (a QA pass): its provider's name was its model version under `Middleware` only;
    # a version filter and a cycle's lineage read it. No model name: no version.
    assert run.model_version is None
    assert [s.model_version for s in run.steps if s.kind == "model"] == [None]


def test_two_agents_paused_on_one_thread_are_each_resumed_into_their_own_run(
    capture: str, sqlite_url: str
) -> None:
    """A QA pass (session 25): two agents keyed by the same session id (`thread_id`), each with
    its own checkpointer, both waiting for a reviewer. Under `instrument()` the first's approval
    was stored as the second's answer (the paused run was remembered by thread alone), and the
    first stayed `interrupted` for good: a verifier judged one agent's answer as another's."""

    @tool
    def refund(order: str) -> str:
        """Refund an order."""
        return f"refunded {order}"

    @tool
    def reship(order: str) -> str:
        """Ship an order again."""
        return f"reshipped {order}"

    def agent(name: str, tool_: Any) -> Any:
        middleware = [
            *capture_middleware(capture, sqlite_url),
            HumanInTheLoopMiddleware(interrupt_on={tool_.name: True}),
        ]
        return create_agent(
            ToolScriptModel(), [tool_], name=name, middleware=middleware, checkpointer=InMemorySaver()
        )

    if capture == "instrument":
        honed.instrument(store=sqlite_url)  # once: both agents under the one handler
    refunds, shipping = agent("refunds", refund), agent("shipping", reship)
    config = {"configurable": {"thread_id": "session-1"}}
    refunds.invoke({"messages": [("user", 'call refund {"order": "A7"}; answer {result}')]}, config)
    shipping.invoke({"messages": [("user", 'call reship {"order": "B9"}; answer {result}')]}, config)
    approve = Command(resume={"decisions": [{"type": "approve"}]})
    assert refunds.invoke(approve, config)["messages"][-1].content == "refunded A7"
    assert honed.flush()
    runs = {t.agent: t for t in honed.open_store(sqlite_url).trajectories()}
    assert (runs["refunds"].status, runs["refunds"].answer) == ("ok", "refunded A7")
    assert [s.name for s in runs["refunds"].tool_steps()] == ["refund"]
    assert (runs["shipping"].status, runs["shipping"].tool_steps()) == ("interrupted", [])
    assert shipping.invoke(approve, config)["messages"][-1].content == "reshipped B9"
    assert honed.flush()
    runs = {t.agent: t for t in honed.open_store(sqlite_url).trajectories()}
    assert len(runs) == 2 and (runs["shipping"].status, runs["shipping"].answer) == ("ok", "reshipped B9")


def test_invoking_a_finished_thread_with_nothing_left_to_run_stores_nothing(
    capture: str, sqlite_url: str
) -> None:
    """A QA pass (session 25): `invoke(None, config)` on a finished thread (a UI's "continue")
    runs no node. Under `instrument()` it was stored as an `ok` run of no task holding the last
    turn's answer, and a reference check given the call's labels passed it."""
    agent = create_agent(
        ToolScriptModel(), [add], name="calc", middleware=capture_middleware(capture, sqlite_url),
        checkpointer=InMemorySaver(),
    )  # fmt: skip
    agent.invoke({"messages": [("user", ADD_TASK)]}, thread("th-done"))
    agent.invoke(None, thread("th-done", task_id="t-2", expected="the sum is 5"))
    assert honed.flush()
    (run,) = honed.open_store(sqlite_url).trajectories()
    assert (run.status, run.answer, run.task_id) == ("ok", "the sum is 5", None)


def test_a_reply_whose_structured_output_fails_to_parse_is_kept_with_the_error(
    capture: str, sqlite_url: str
) -> None:
    """A QA pass (session 25): `ProviderStrategy` and a model answering "it is warm". The run
    fails, rightly; under `Middleware` the model step (the call and its parsing) was an error with
    no output, the reply one needs to see why gone. `instrument()` kept it."""
    from langchain.agents.structured_output import ProviderStrategy, StructuredOutputValidationError
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    class Weather(BaseModel):
        city: str
        temp: int

    class Model(GenericFakeChatModel):
        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self

    agent = create_agent(
        Model(messages=iter([AIMessage("it is warm")])), [], response_format=ProviderStrategy(Weather),
        middleware=capture_middleware(capture, sqlite_url),
    )  # fmt: skip
    with pytest.raises(StructuredOutputValidationError):
        agent.invoke({"messages": [("user", "weather in Oslo?")]})
    assert honed.flush()
    (run,) = honed.open_store(sqlite_url).trajectories()
    (model,) = [s for s in run.steps if s.kind == "model"]
    assert run.status == "error" and "it is warm" in json.dumps(model.output)


def test_a_structured_output_that_failed_to_parse_is_a_failed_call(capture: str, sqlite_url: str) -> None:
    """A QA pass (session 25): `ToolStrategy` answers a reply that does not parse with its own
    error text for the model to retry, in a message LangChain marks a success: the failed call was
    stored as one that worked. The retry that parsed is no failure."""
    from langchain.agents.structured_output import ToolStrategy
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    class Model(GenericFakeChatModel):
        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self

    replies = [
        AIMessage(
            "", tool_calls=[{"name": "Ticket", "args": {"title": "x", "priority": "high"}, "id": "c1"}]
        ),
        AIMessage("", tool_calls=[{"name": "Ticket", "args": {"title": "x", "priority": 2}, "id": "c2"}]),
    ]
    agent = create_agent(
        Model(messages=iter(replies)), [], response_format=ToolStrategy(Ticket),
        middleware=capture_middleware(capture, sqlite_url),
    )  # fmt: skip
    assert agent.invoke({"messages": [("user", "file it")]})["structured_response"] == Ticket(
        title="x", priority=2
    )
    assert honed.flush()
    (run,) = honed.open_store(sqlite_url).trajectories()
    calls = [(s.name, s.input, s.error is not None) for s in run.tool_steps()]
    assert calls[0] == ("Ticket", {"title": "x", "priority": "high"}, True), calls
    assert all(not failed for _, _, failed in calls[1:]), calls


def test_parallel_workers_paused_for_a_reviewer_and_resumed_together_keep_their_own_steps(
    sqlite_url: str,
) -> None:
    """A QA pass (session 25): one agent (with `Middleware`) run by `Send` on three items, two
    paused for approval and resumed by one call. The second worker's state named its own paused
    trajectory, yet a shortcut for a tool that rewrites the key sent its call and answer into the
    first worker's: the audit said item x2's task deleted x3."""
    from langgraph.graph import END, START, StateGraph
    from langgraph.types import Send

    @tool
    def delete(item: str) -> str:
        """Delete an item (needs approval)."""
        return f"deleted {item}"

    worker = create_agent(
        ToolScriptModel(), [delete], name="worker",
        middleware=[honed.Middleware(store=sqlite_url), HumanInTheLoopMiddleware(interrupt_on={"delete": True})],
    )  # fmt: skip

    class Batch(TypedDict):
        items: list[str]
        results: Annotated[list[str], operator.add]

    def run_worker(payload: dict[str, str]) -> dict[str, list[str]]:
        task = f'call delete {{"item": "{payload["item"]}"}}; answer {{result}}'
        return {"results": [worker.invoke({"messages": [("user", task)]})["messages"][-1].content]}

    graph = StateGraph(Batch)
    graph.add_node("run_worker", run_worker)
    graph.add_conditional_edges(
        START, lambda s: [Send("run_worker", {"item": i}) for i in s["items"]], ["run_worker"]
    )
    graph.add_edge("run_worker", END)
    app = graph.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "batch"}}
    paused = app.invoke({"items": ["x2", "x3"], "results": []}, config)["__interrupt__"]
    approve = {"decisions": [{"type": "approve"}]}
    done = app.invoke(Command(resume={i.id: approve for i in paused}), config)
    assert sorted(done["results"]) == ["deleted x2", "deleted x3"]
    assert honed.flush()
    runs = honed.open_store(sqlite_url).trajectories()
    got = sorted((t.status, t.answer, [s.input for s in t.tool_steps()]) for t in runs)
    assert got == [("ok", "deleted x2", [{"item": "x2"}]), ("ok", "deleted x3", [{"item": "x3"}])], got


ASK_MATH_TASK = {
    "messages": [("user", f"call ask_math {json.dumps({'question': 'answer BOOM'})}; answer {{result}}")]
}


def ask_failing_math(store_url: str, *, caught: bool) -> Any:
    """A supervisor's tool asking a math subagent (with `Middleware`) whose model fails on "BOOM";
    `caught`: the tool apologises instead of raising."""
    from honed.testing import ScriptedChatModel

    helper = create_agent(
        ScriptedChatModel(fail_on="BOOM"), [add], name="math", middleware=[honed.Middleware(store=store_url)]
    )

    @tool
    def ask_math(question: str) -> str:
        """Ask the math agent."""
        try:
            return helper.invoke({"messages": [("user", question)]})["messages"][-1].content
        except RuntimeError:
            if not caught:
                raise
            return "the math agent is down"

    return ask_math


def test_a_subagent_failure_its_caller_catches_is_an_error_not_a_pause(sqlite_url: str) -> None:
    """A QA pass (session 25): a subagent with `Middleware`, called from a supervisor's tool that
    catches its error and apologises. The subagent's run was stored `interrupted`, waiting for a
    human forever and never judged: its end hook never ran, which read as a pause."""
    supervisor = create_agent(
        ToolScriptModel(), [ask_failing_math(sqlite_url, caught=True)], name="supervisor"
    )
    reply = supervisor.invoke(ASK_MATH_TASK)
    assert reply["messages"][-1].content == "the math agent is down"
    assert honed.flush()
    (run,) = honed.open_store(sqlite_url).trajectories()
    assert (run.agent, run.status) == ("math", "error") and "model failure" in run.error


@pytest.mark.parametrize("caught", [True, False], ids=["caught", "raised"])
def test_a_subagents_step_shows_the_error_it_failed_with(sqlite_url: str, caught: bool) -> None:
    """A QA pass (session 25): supervisor and subagent each with `Middleware`. The subagent's
    step inside the supervisor's run said "incomplete: the run ended before this step finished"
    when its failure ended the run, and nothing at all when the supervisor's tool caught it."""
    supervisor = create_agent(
        ToolScriptModel(), [ask_failing_math(sqlite_url, caught=caught)], name="supervisor",
        middleware=[honed.Middleware(store=sqlite_url)],
    )  # fmt: skip
    task = ASK_MATH_TASK
    if caught:
        supervisor.invoke(task)
    else:
        with pytest.raises(RuntimeError):
            supervisor.invoke(task)
    assert honed.flush()
    (run,) = honed.open_store(sqlite_url).trajectories()
    (step,) = [s for s in run.steps if s.kind == "node" and s.name == "math"]
    assert run.status == ("ok" if caught else "error")
    assert step.error is not None and "model failure" in step.error, step.error


@pytest.mark.parametrize("handle", ["TOOL FAILED, try again", "callable"])
@pytest.mark.parametrize("entry", ["instrument", "wrap"])
def test_a_tool_error_a_toolnode_handles_keeps_what_the_model_was_told(
    entry: str, handle: str, sqlite_url: str
) -> None:
    """A QA pass (session 26): `ToolNode(handle_tool_errors=...)` answers a raised error with a
    message of its own, which is what the model read next; the tool's step kept only the
    exception, its output null (training and the report showed a reply the model never saw)."""
    from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
    from langchain_core.messages import AIMessage
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    class Model(FakeMessagesListChatModel):
        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self

    @tool
    def good(x: int) -> str:
        """Works."""
        return f"good {x}"

    @tool
    def bad(x: int) -> str:
        """Fails."""
        raise ValueError(f"bad exploded on {x}")

    calls = [{"name": "good", "args": {"x": 1}, "id": "c1"}, {"name": "bad", "args": {"x": 2}, "id": "c2"}]
    model = Model(responses=[AIMessage("", tool_calls=calls), AIMessage("recovered")])
    handler = (lambda e: f"handled: {e}") if handle == "callable" else handle
    graph = StateGraph(MessagesState)
    graph.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    graph.add_node("tools", ToolNode([good, bad], handle_tool_errors=handler))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    app = graph.compile(name="react")
    if entry == "instrument":
        honed.instrument(store=sqlite_url)
    else:
        app = honed.wrap(app, store=sqlite_url)
    result = app.invoke({"messages": [("user", "go")]})
    told = next(
        m.content for m in result["messages"] if isinstance(m, ToolMessage) and m.tool_call_id == "c2"
    )
    assert told == ("handled: bad exploded on 2" if handle == "callable" else handle)
    assert honed.flush()
    (run,) = honed.open_store(sqlite_url).trajectories()
    steps = {s.extra.get("tool_call_id"): s for s in run.tool_steps()}
    assert (steps["c1"].output, steps["c1"].error) == ("good 1", None)
    assert steps["c2"].output == told
    assert "bad exploded on 2" in steps["c2"].error


@pytest.mark.parametrize("entry", ["middleware", "instrument", "handler"])
def test_a_stale_resume_after_a_new_turn_leaves_the_abandoned_pause_alone(
    entry: str, sqlite_url: str
) -> None:
    """A QA pass (session 27): turn 1 pauses for a reviewer, turn 2 is a new message (LangGraph
    drops the pause), then an old "Approve" arrives as `Command(resume=...)`: LangGraph resumes
    nothing and runs nothing. Under `instrument()` and the handler it was joined to the pause, which
    became `ok` with turn 2's answer though its tool never ran: a run for a verifier to pass."""
    middleware = [HumanInTheLoopMiddleware(interrupt_on={"add": True})]
    config: dict[str, Any] = thread("th-stale", task_id="t-add", expected="the sum is 5")
    if entry == "middleware":
        middleware.insert(0, honed.Middleware(store=sqlite_url))
    elif entry == "instrument":
        honed.instrument(store=sqlite_url)
    else:
        config["callbacks"] = [honed.CallbackHandler(store=sqlite_url)]
    try:
        agent = create_agent(
            ToolScriptModel(), [add], name="calc", checkpointer=InMemorySaver(), middleware=middleware
        )
        assert agent.invoke({"messages": [("user", ADD_TASK)]}, config)["__interrupt__"]
        agent.invoke({"messages": [("user", "answer ok")]}, config)
        agent.invoke(Command(resume={"decisions": [{"type": "approve"}]}), config)
        assert honed.flush()
    finally:
        honed.uninstrument()
    store = honed.open_store(sqlite_url)
    runs = store.trajectories(oldest_first=True)
    paused = runs[0]
    assert paused.status == "interrupted" and paused.output is None, paused
    assert [s.name for s in paused.steps][-1] == "interrupt"
    assert not any(s.name == "add" and s.error is None for s in paused.tool_steps())
    assert runs[1].answer == "ok" and runs[1].status == "ok"
    assert Worker(store, [ReferenceMatch()]).run_once() <= len(runs) - 1
    assert store.get(paused.id).verdicts == []


@pytest.mark.parametrize("entry", ["instrument", "handler"])
def test_a_second_agents_call_to_a_tool_it_lacks_is_a_step_when_call_ids_repeat(
    entry: str, sqlite_url: str
) -> None:
    """A QA pass (session 27): two agents in one graph whose models number their calls alike
    (local servers do); the second called a tool only the first has, and its ToolNode's error left
    no step: an error under the id of the first agent's call that succeeded was taken for it."""
    from langchain_core.messages import HumanMessage
    from langgraph.graph import START, MessagesState, StateGraph

    @tool
    def lookup(x: str) -> str:
        """Look x up."""
        return "found " + x

    @tool
    def real(x: str) -> str:
        """Return x."""
        return x

    def ask(state: dict[str, Any]) -> dict[str, Any]:
        return {"messages": [HumanMessage('call lookup {"x": "2"}; answer {result}')]}

    graph = StateGraph(MessagesState)
    graph.add_node("a", create_agent(ToolScriptModel(), [lookup], name="a"))
    graph.add_node("ask", ask)
    graph.add_node("b", create_agent(ToolScriptModel(), [real], name="b"))
    graph.add_edge(START, "a")
    graph.add_edge("a", "ask")
    graph.add_edge("ask", "b")
    app_ = graph.compile(name="team")
    config: dict[str, Any] = {}
    if entry == "instrument":
        honed.instrument(store=sqlite_url)
    else:
        config["callbacks"] = [honed.CallbackHandler(store=sqlite_url)]
    try:
        out = app_.invoke({"messages": [("user", 'call lookup {"x": "1"}; answer {result}')]}, config)
        assert honed.flush()
    finally:
        honed.uninstrument()
    assert "not a valid tool" in out["messages"][-2].content
    (t,) = honed.open_store(sqlite_url).trajectories()
    steps = [(s.name, s.output, s.error is not None) for s in t.tool_steps()]
    assert steps[0] == ("lookup", "found 1", False) and len(steps) == 2, steps
    assert steps[1][0] == "lookup" and steps[1][2] and "not a valid tool" in steps[1][1]


@pytest.mark.parametrize("entry", ["middleware last", "middleware first", "instrument"])
@pytest.mark.parametrize("pause", [0.0, 0.3])
def test_a_message_scrubbed_in_place_between_calls_is_stored_as_each_call_saw_it(
    entry: str, pause: float, sqlite_url: str
) -> None:
    """A QA pass (session 27): a `before_model` hook blanking an earlier tool result in place
    (`message.content = "[scrubbed]"`, a common way to keep old secrets from the next call). The
    writer serialises later: with no pause the first call and the tool step were stored with the
    scrubbed text; with one, the memo of the message by its id stored the next call as still
    seeing the secret. Each call is stored as it was called, the tool's answer as it returned."""
    from langchain.agents.middleware import before_model

    @tool
    def lookup(q: str) -> str:
        """Look q up."""
        return f"SECRET-{q}"

    @before_model
    def scrub(state: dict[str, Any], runtime: Any) -> None:
        time.sleep(pause)
        results = [m for m in state["messages"] if isinstance(m, ToolMessage)]
        if len(results) == 2 and results[0].content == "SECRET-a":
            results[0].content = "[scrubbed]"

    middleware: list[Any] = [scrub]
    if entry == "middleware last":
        middleware.append(honed.Middleware(store=sqlite_url))
    elif entry == "middleware first":
        middleware.insert(0, honed.Middleware(store=sqlite_url))
    else:
        honed.instrument(store=sqlite_url)
    try:
        agent = create_agent(ToolScriptModel(), [lookup], middleware=middleware)
        agent.invoke(
            {"messages": [("user", 'call lookup {"q": "a"}; call lookup {"q": "b"}; answer {result}')]}
        )
        assert honed.flush()
    finally:
        honed.uninstrument()
    (t,) = honed.open_store(sqlite_url).trajectories()
    seen = [
        [m["content"] for m in s.input["messages"] if m["role"] == "tool"]
        for s in t.steps
        if s.kind == "model"
    ]
    assert seen == [[], ["SECRET-a"], ["[scrubbed]", "SECRET-b"]], seen
    assert [s.output for s in t.tool_steps()] == ["SECRET-a", "SECRET-b"]


def test_a_middleware_calling_the_model_twice_keeps_each_reply_with_its_request(sqlite_url: str) -> None:
    """A QA pass (session 27): with `Middleware` first, a `wrap_model_call` that asks the model
    twice and returns the first reply (best of n, a draft then a check) stored the first reply
    as the answer to the second request, a pair that never happened."""
    from langchain.agents.middleware import wrap_model_call
    from langchain_core.messages import HumanMessage

    @wrap_model_call
    def ask_twice(request: Any, handler: Any) -> Any:
        first = handler(request)
        handler(request.override(messages=[*request.messages, HumanMessage("answer again please")]))
        return first

    agent = create_agent(ToolScriptModel(), [add], middleware=[honed.Middleware(store=sqlite_url), ask_twice])
    agent.invoke({"messages": [("user", ADD_TASK)]})
    assert honed.flush()
    (t,) = honed.open_store(sqlite_url).trajectories()
    first = next(s for s in t.steps if s.kind == "model")
    assert [m["content"] for m in first.input["messages"]] == [ADD_TASK]
    assert [c["name"] for c in first.tool_calls] == ["add"]
    assert t.answer == "the sum is 5"


@pytest.mark.parametrize("entry", ["middleware", "instrument"])
def test_a_retried_tool_keeps_each_attempts_own_outcome(entry: str, sqlite_url: str) -> None:
    """A QA pass (session 27): under `ToolRetryMiddleware` the second failed attempt was given the
    successful third attempt's result, read back from the conversation."""
    from langchain.agents.middleware import ToolRetryMiddleware

    attempts = {"n": 0}

    @tool
    def flaky(q: str) -> str:
        """Fails twice, then answers."""
        attempts["n"] += 1
        if attempts["n"] < 3:
            raise RuntimeError(f"boom {attempts['n']}")
        return f"ok {q}"

    middleware: list[Any] = [ToolRetryMiddleware(max_retries=3, initial_delay=0.0, retry_on=(RuntimeError,))]
    if entry == "middleware":
        middleware.append(honed.Middleware(store=sqlite_url))
    else:
        honed.instrument(store=sqlite_url)
    try:
        agent = create_agent(ToolScriptModel(), [flaky], middleware=middleware)
        agent.invoke({"messages": [("user", 'call flaky {"q": "z"}; answer {result}')]})
        assert honed.flush()
    finally:
        honed.uninstrument()
    (t,) = honed.open_store(sqlite_url).trajectories()
    assert [(s.error is not None, s.output) for s in t.tool_steps()] == [
        (True, None),
        (True, None),
        (False, "ok z"),
    ]
    assert t.answer == "ok z"


def test_content_blocks_edited_in_place_between_calls_are_stored_as_each_call_saw_them(
    sqlite_url: str,
) -> None:
    """A QA pass (session 27): the snapshot of a message's content held a list of content blocks
    by reference; a node editing a block in place (`m.content[0]["text"] = ...`) had the first
    call stored with the later text, paired with a reply it never produced."""
    from langchain_core.messages import HumanMessage
    from langgraph.graph import START, StateGraph
    from langgraph.graph.message import add_messages

    from honed.testing import ScriptedChatModel

    model = ScriptedChatModel()

    State = TypedDict("State", {"messages": Annotated[list, add_messages]})  # noqa: UP013 (evaluated here)

    def ask(state: State) -> dict[str, Any]:
        return {"messages": [model.invoke(state["messages"])]}

    def scrub(state: State) -> dict[str, Any]:
        state["messages"][0].content[0]["text"] = "answer [scrubbed]"
        return {}

    graph = StateGraph(State)
    graph.add_node("first", ask)
    graph.add_node("scrub", scrub)
    graph.add_node("second", ask)
    graph.add_edge(START, "first")
    graph.add_edge("first", "scrub")
    graph.add_edge("scrub", "second")
    honed.instrument(store=sqlite_url)
    try:
        graph.compile().invoke(
            {"messages": [HumanMessage(content=[{"type": "text", "text": "answer SECRET-A"}])]}
        )
        assert honed.flush()
    finally:
        honed.uninstrument()
    (t,) = honed.open_store(sqlite_url).trajectories()
    seen = [
        (content_text(s.input["messages"][0]["content"]), s.output["content"])
        for s in t.steps
        if s.kind == "model"
    ]
    assert seen == [("answer SECRET-A", "SECRET-A"), ("answer [scrubbed]", "[scrubbed]")], seen


class _ParallelCalls(BaseChatModel):
    """A custom chat model as users write them: three calls in one reply, then an answer; its
    replies name no model (LangChain's tracing metadata does: `ls_model_name`)."""

    model_name: str = "house-model-v3"

    @property
    def _llm_type(self) -> str:
        return "house"

    def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
        return self

    def _generate(
        self, messages: list[Any], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        if any(m.type == "tool" for m in messages):
            return ChatResult(generations=[ChatGeneration(message=AIMessage("done"))])
        calls = [
            {"name": "add", "args": {"a": 1, "b": 1}, "id": "c1"},
            {"name": "ghost", "args": {}, "id": "c2"},  # no such tool
            {"name": "add", "args": {"a": 3, "b": 3}, "id": "c3"},
        ]
        return ChatResult(generations=[ChatGeneration(message=AIMessage("", tool_calls=calls))])


def test_parallel_calls_keep_the_models_order_and_a_custom_model_its_name(
    capture: str, sqlite_url: str
) -> None:
    """A QA pass (session 28): the call to a missing tool, second of three, was stored last (its
    step is made from the ToolMessage, after the third call ran); and a chat model whose replies
    name no model had no version, though LangChain traced its name."""
    agent = create_agent(
        _ParallelCalls(), [add], name="calc", middleware=capture_middleware(capture, sqlite_url)
    )
    agent.invoke({"messages": [("user", "add twice")]})
    honed.flush()
    t = honed.open_store(sqlite_url).trajectories()[0]
    tools = [s for s in t.steps if s.kind == "tool"]
    assert [s.extra.get("tool_call_id") for s in tools] == ["c1", "c2", "c3"]
    assert [s.index for s in t.steps] == sorted(s.index for s in t.steps)
    assert tools[1].error and tools[0].error is None and tools[2].output == "6"
    assert t.model_version == "house-model-v3"
    assert {s.model_version for s in t.steps if s.kind == "model"} == {"house-model-v3"}


def test_a_hand_built_graphs_parallel_calls_keep_the_models_order(sqlite_url: str) -> None:
    """The same under a `StateGraph` with LangGraph's `ToolNode`, where the missing tool's step
    was stored after the third call's (c1, c3, c2)."""
    from langgraph.graph import START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    model = _ParallelCalls()
    graph = StateGraph(MessagesState)
    graph.add_node("llm", lambda state: {"messages": [model.invoke(state["messages"])]})
    graph.add_node("tools", ToolNode([add]))
    graph.add_edge(START, "llm")
    graph.add_conditional_edges("llm", tools_condition)
    graph.add_edge("tools", "llm")
    honed.instrument(store=sqlite_url)
    try:
        graph.compile(name="calc").invoke({"messages": [("user", "add twice")]})
        honed.flush()
    finally:
        honed.uninstrument()
    t = honed.open_store(sqlite_url).trajectories()[0]
    assert [s.extra.get("tool_call_id") for s in t.steps if s.kind == "tool"] == ["c1", "c2", "c3"]
    assert [s.index for s in t.steps] == list(range(len(t.steps)))


def test_create_react_agent_v2_tool_nodes_keep_their_call_not_the_whole_state(sqlite_url: str) -> None:
    """A QA pass (session 28): `create_react_agent` (v2, the default) sends its tool node each call
    with the whole state beside it; stored in every tool node's step, a 30-call run held its
    conversation 30 times over (753 KB against 8.6 KB for `create_agent`)."""
    from langgraph.prebuilt import create_react_agent

    task = "; ".join(f'call add {{"a": {i}, "b": 1}}' for i in range(5)) + "; answer done {result}"
    honed.instrument(store=sqlite_url)
    try:
        create_react_agent(ToolScriptModel(), [add], version="v2", name="calc").invoke(
            {"messages": [("user", task)]}
        )
        assert honed.flush()
    finally:
        honed.uninstrument()
    t = honed.open_store(sqlite_url).trajectories()[0]
    nodes = [s for s in t.steps if s.kind == "node" and s.name == "tools"]
    assert len(nodes) == 5 and t.answer == "done 5"
    for node in nodes:
        assert "state" not in node.input and node.input["tool_call"]["name"] == "add", node.input


def test_a_replay_from_a_checkpoint_inside_a_turn_keeps_the_turns_request(sqlite_url: str) -> None:
    """A QA pass (session 28): `invoke(None, config_of_a_checkpoint)` (time travel: a replay or a
    fork before the tools ran) stored its run with no task, so nothing told a verifier what was
    asked; its first model call read nothing after the last reply. It goes on with that turn."""
    asked = 'call add {"a": 1, "b": 2}; answer sum {result}'
    honed.instrument(store=sqlite_url)
    try:
        agent = create_agent(ToolScriptModel(), [add], name="calc", checkpointer=InMemorySaver())
        config = thread("tt")
        agent.invoke({"messages": [("user", asked)]}, config)
        before_tools = next(h for h in agent.get_state_history(config) if h.next == ("tools",))
        assert agent.invoke(None, before_tools.config)["messages"][-1].content == "sum 3"
        assert honed.flush()
    finally:
        honed.uninstrument()
    runs = honed.open_store(sqlite_url).trajectories(oldest_first=True)
    assert len(runs) == 2
    assert [t.task for t in runs] == [{"messages": [{"role": "user", "content": asked}]}] * 2
