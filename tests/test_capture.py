"""Capture of real LangGraph agents through the three entry points: middleware, handler/wrap, instrument."""

from __future__ import annotations

import asyncio
import itertools
import json
import operator
import threading
from typing import Annotated, Any, TypedDict

import pytest
from langchain.agents import create_agent
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

import honed
from fakes import ToolScriptModel, make_tools
from honed import Trajectory, Verdict
from honed.testing import ScriptedChatModel


def add_task(a: int, b: int) -> str:
    return f'call add {{"a": {a}, "b": {b}}}; answer the sum is {{result}}'


def run_config(task_id: str, split: str = "train", **extra: Any) -> dict[str, Any]:
    return {"metadata": {"honed": {"task_id": task_id, "split": split, **extra}}}


def only(store: honed.TrajectoryStore, **filters: Any) -> Trajectory:
    found = store.trajectories(limit=10, **filters)
    assert len(found) == 1, [t.task_id for t in found]
    return found[0]


def kinds(t: Trajectory) -> list[tuple[str, str]]:
    return [(s.kind, s.name) for s in t.steps]


@pytest.fixture
def instrumented(sqlite_url: str):
    handler = honed.instrument(store=sqlite_url)
    yield sqlite_url
    honed.uninstrument()
    assert handler.enabled is False


# -- the middleware ------------------------------------------------------------------------------


class _CachingModel(ToolScriptModel):
    """Reports cache reads and reasoning tokens, as OpenAI's and Anthropic's integrations do."""

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        result = super()._generate(messages, stop, run_manager, **kwargs)
        usage = result.generations[0].message.usage_metadata
        usage["input_token_details"] = {"cache_read": 900, "cache_creation": 50}
        usage["output_token_details"] = {"reasoning": 450}
        return result


@pytest.mark.parametrize("entry", ["middleware", "instrument"])
def test_token_usage_keeps_cache_and_reasoning_details(sqlite_url: str, entry: str) -> None:
    middleware = [honed.Middleware(store=sqlite_url)] if entry == "middleware" else []
    agent = create_agent(_CachingModel(), make_tools(), middleware=middleware)
    if entry == "instrument":
        honed.instrument(store=sqlite_url)
    try:
        agent.invoke({"messages": [("user", add_task(2, 3))]}, config=run_config("t-usage"))
    finally:
        honed.uninstrument()
    assert honed.flush()
    first = next(s for s in only(honed.open_store(sqlite_url)).steps if s.kind == "model")
    assert first.usage is not None and first.usage["input_tokens"] >= 1
    assert first.usage["input_token_details"] == {"cache_read": 900, "cache_creation": 50}
    assert first.usage["output_token_details"] == {"reasoning": 450}


def test_middleware_captures_model_and_tool_steps_with_metadata(sqlite_url: str) -> None:
    model = ToolScriptModel(reasoning="I should add the numbers first.")
    agent = create_agent(
        model, make_tools(), name="calculator", middleware=[honed.Middleware(store=sqlite_url)]
    )

    result = agent.invoke({"messages": [("user", add_task(2, 3))]}, config=run_config("t-add", expected="5"))
    assert honed.flush()

    assert result["messages"][-1].content == "the sum is 5"
    t = only(honed.open_store(sqlite_url))
    assert (t.agent, t.task_id, t.split, t.status) == ("calculator", "t-add", "train", "ok")
    assert t.metadata["expected"] == "5"
    assert t.answer == "the sum is 5"
    assert t.task["messages"][0] == {"role": "user", "content": add_task(2, 3)}
    assert kinds(t) == [("model", "tool-script"), ("tool", "add"), ("model", "tool-script")]
    first, tool, last = t.steps
    assert first.tool_calls == [{"name": "add", "args": {"a": 2, "b": 3}, "id": "call_0_add"}]
    assert first.reasoning == "I should add the numbers first."
    assert first.usage and first.usage["output_tokens"] >= 1
    assert first.model_version == "tool-script"
    assert [tool_schema["function"]["name"] for tool_schema in first.input["tools"]] == [
        "add",
        "mul",
        "explode",
        "fragile",
    ]
    assert tool.input == {"a": 2, "b": 3} and tool.output == "5" and tool.error is None
    assert tool.extra["tool_call_id"] == "call_0_add"
    assert last.input["messages"][-1] == {
        "role": "tool",
        "content": "5",
        "name": "add",
        "tool_call_id": "call_0_add",
    }
    assert all(s.started_at <= s.ended_at for s in t.steps)
    assert [s.index for s in t.steps] == sorted(s.index for s in t.steps)


async def test_middleware_under_ainvoke_and_astream(sqlite_url: str) -> None:
    agent = create_agent(
        ToolScriptModel(), make_tools(), name="calc", middleware=[honed.Middleware(store=sqlite_url)]
    )
    await agent.ainvoke({"messages": [("user", add_task(1, 1))]}, config=run_config("a1"))
    chunks = [
        c async for c in agent.astream({"messages": [("user", add_task(2, 2))]}, config=run_config("a2"))
    ]
    assert chunks
    honed.flush()
    store = honed.open_store(sqlite_url)
    for task_id, answer in (("a1", "the sum is 2"), ("a2", "the sum is 4")):
        t = only(store, task_id=task_id)
        assert t.answer == answer
        assert kinds(t) == [("model", "tool-script"), ("tool", "add"), ("model", "tool-script")]


def test_middleware_stands_aside_when_instrumented(instrumented: str) -> None:
    agent = create_agent(ToolScriptModel(), make_tools(), name="calc", middleware=[honed.Middleware()])
    agent.invoke({"messages": [("user", add_task(3, 4))]}, config=run_config("once"))
    honed.flush()
    t = only(honed.open_store(instrumented), task_id="once")  # exactly one trajectory, not two
    assert [k for k in kinds(t) if k[0] != "node"] == [
        ("model", "tool-script"),
        ("tool", "add"),
        ("model", "tool-script"),
    ]


def test_subagent_called_from_a_tool_nests_inside_the_callers_trajectory(sqlite_url: str) -> None:
    from langchain_core.tools import tool

    mw = honed.Middleware(store=sqlite_url)
    inner = create_agent(ToolScriptModel(), make_tools(), name="inner", middleware=[mw])

    @tool
    def delegate(a: int, b: int) -> str:
        """Ask the inner agent to add."""
        return inner.invoke({"messages": [("user", add_task(a, b))]})["messages"][-1].content

    outer = create_agent(ToolScriptModel(), [delegate], name="outer", middleware=[mw])
    outer.invoke({"messages": [("user", 'call delegate {"a": 5, "b": 6}; answer inner said {result}')]})
    honed.flush()
    t = only(honed.open_store(sqlite_url))
    assert t.agent == "outer" and t.answer == "inner said the sum is 11"
    delegate_step = next(s for s in t.steps if s.name == "delegate")
    inner_node = next(s for s in t.steps if s.name == "inner")
    assert inner_node.parent_id == delegate_step.id
    assert [s.name for s in t.steps if s.parent_id == inner_node.id] == ["tool-script", "add", "tool-script"]


# -- the callback handler, wrap() and plain StateGraphs -------------------------------------------


class Counter(TypedDict):
    value: int
    log: Annotated[list[str], operator.add]


def counter_graph() -> Any:
    def double(state: Counter) -> dict[str, Any]:
        return {"value": state["value"] * 2, "log": ["double"]}

    def inc(state: Counter) -> dict[str, Any]:
        return {"value": state["value"] + 1, "log": ["inc"]}

    inner = StateGraph(Counter)
    inner.add_node("inc", inc)
    inner.add_edge(START, "inc")
    inner.add_edge("inc", END)

    graph = StateGraph(Counter)
    graph.add_node("double", double)
    graph.add_node("sub", inner.compile(name="sub"))
    graph.add_edge(START, "double")
    graph.add_edge("double", "sub")
    graph.add_edge("sub", END)
    return graph.compile(name="counter")


def test_wrap_captures_a_plain_state_graph_with_a_subgraph(sqlite_url: str) -> None:
    expected = counter_graph().invoke({"value": 5, "log": []})
    graph = honed.wrap(counter_graph(), store=sqlite_url)
    assert graph.get_graph() is not None  # still a graph, not a bare Runnable
    out = graph.invoke({"value": 5, "log": []}, config=run_config("c1"))
    assert out == expected and out["value"] == 11
    honed.flush()
    t = only(honed.open_store(sqlite_url))
    assert t.agent == "counter" and t.task == {"value": 5, "log": []}
    assert t.output == expected
    assert kinds(t) == [("node", "double"), ("node", "sub"), ("node", "inc")]
    double, sub, inc = t.steps
    assert double.output == {"value": 10, "log": ["double"]}
    assert inc.parent_id == sub.id and sub.parent_id is None


def test_handler_in_config_captures_batch_as_separate_trajectories(sqlite_url: str) -> None:
    handler = honed.CallbackHandler(store=sqlite_url)
    agent = create_agent(ToolScriptModel(), make_tools(), name="calc")
    inputs = [{"messages": [("user", add_task(i, 10))]} for i in range(5)]
    configs = [{"callbacks": [handler], **run_config(f"b{i}")} for i in range(5)]
    outputs = agent.batch(inputs, config=configs)
    honed.flush()
    store = honed.open_store(sqlite_url)
    assert store.count() == 5
    for i, out in enumerate(outputs):
        t = only(store, task_id=f"b{i}")
        assert t.answer == out["messages"][-1].content == f"the sum is {i + 10}"
        model_steps = t.model_steps()
        assert len(model_steps) == 2 and model_steps[0].tool_calls[0]["args"] == {"a": i, "b": 10}
        # each model call hangs under its graph node
        nodes = {s.id: s.name for s in t.steps if s.kind == "node"}
        assert {nodes[s.parent_id] for s in model_steps} == {"model"}


def test_a_second_handler_with_its_own_options_loses_none_of_the_first_ones_runs(sqlite_url: str) -> None:
    """A QA pass (session 15): building a second handler (or a Middleware) with recorder options
    for the same store closed the first one's recorder, and every run it captured was dropped."""
    first = honed.CallbackHandler(store=sqlite_url, max_field_bytes=100_000)
    second = honed.CallbackHandler(store=sqlite_url, max_field_bytes=50_000)
    again = honed.CallbackHandler(store=sqlite_url, max_field_bytes=100_000)
    assert again.recorder is first.recorder  # the same options: one recorder, not one per handler
    agent = create_agent(ToolScriptModel(), make_tools(), name="calc")
    for i, handler in enumerate((first, second, again)):
        agent.invoke(
            {"messages": [("user", add_task(i, 1))]}, config={"callbacks": [handler], **run_config(f"h{i}")}
        )
    honed.flush()
    store = honed.open_store(sqlite_url)
    assert sorted(t.task_id for t in store.trajectories()) == ["h0", "h1", "h2"]
    assert honed.stats()["stores"][first.recorder.stats()["store"]]["trajectories_written"] >= 3


@pytest.mark.parametrize(
    "mode", ["values", "updates", "messages", "debug", "custom", ["updates", "messages"]]
)
def test_instrument_captures_every_stream_mode(instrumented: str, mode: Any) -> None:
    agent = create_agent(ToolScriptModel(), make_tools(), name="calc")
    chunks = list(
        agent.stream({"messages": [("user", add_task(4, 4))]}, config=run_config("s"), stream_mode=mode)
    )
    assert chunks or mode == "custom"
    honed.flush()
    t = only(honed.open_store(instrumented), task_id="s")
    assert t.status == "ok" and t.answer == "the sum is 8"
    assert [k for k in kinds(t) if k[0] != "node"] == [
        ("model", "tool-script"),
        ("tool", "add"),
        ("model", "tool-script"),
    ]


async def test_instrument_captures_astream_and_abatch(instrumented: str) -> None:
    agent = create_agent(ToolScriptModel(), make_tools(), name="calc")
    async for _ in agent.astream(
        {"messages": [("user", add_task(1, 2))]}, config=run_config("as"), stream_mode="messages"
    ):
        pass
    await agent.abatch(
        [{"messages": [("user", add_task(i, i))]} for i in range(3)],
        config=[run_config(f"ab{i}") for i in range(3)],
    )
    honed.flush()
    store = honed.open_store(instrumented)
    assert only(store, task_id="as").answer == "the sum is 3"
    assert [only(store, task_id=f"ab{i}").answer for i in range(3)] == [
        "the sum is 0",
        "the sum is 2",
        "the sum is 4",
    ]


# -- concurrency: no cross-talk ---------------------------------------------------------------------


def test_many_threads_never_mix_trajectories(instrumented: str) -> None:
    agent = create_agent(ToolScriptModel(), make_tools(), name="calc")
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            for j in range(6):
                a, b = w, 100 + j
                agent.invoke(
                    {"messages": [("user", add_task(a, b))]}, config=run_config(f"w{w}-{j}", a=a, b=b)
                )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(12)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    honed.flush()
    store = honed.open_store(instrumented)
    found = store.trajectories(limit=None)
    assert len(found) == 72
    for t in found:
        _assert_consistent(t)


async def test_many_asyncio_tasks_never_mix_trajectories(sqlite_url: str) -> None:
    agent = create_agent(
        ToolScriptModel(), make_tools(), name="calc", middleware=[honed.Middleware(store=sqlite_url)]
    )

    async def one(i: int) -> None:
        a, b = i, 1000 - i
        await agent.ainvoke({"messages": [("user", add_task(a, b))]}, config=run_config(f"t{i}", a=a, b=b))

    await asyncio.gather(*(one(i) for i in range(40)))
    honed.flush()
    found = honed.open_store(sqlite_url).trajectories(limit=None)
    assert len(found) == 40
    for t in found:
        _assert_consistent(t)


def _assert_consistent(t: Trajectory) -> None:
    a, b = t.metadata["a"], t.metadata["b"]
    model_steps, tool_steps = t.model_steps(), t.tool_steps()
    assert len(model_steps) == 2 and len(tool_steps) == 1, t.id
    assert model_steps[0].tool_calls[0]["args"] == {"a": a, "b": b}
    assert tool_steps[0].input == {"a": a, "b": b} and tool_steps[0].output == str(a + b)
    assert t.answer == f"the sum is {a + b}"


# -- failures: recorded, and the agent behaves exactly as without honed -------------------------------


def _outcome(agent: Any, text: str, config: dict[str, Any] | None = None) -> tuple[str, Any]:
    try:
        result = agent.invoke({"messages": [("user", text)]}, config=config or {})
    except Exception as exc:
        return "raised", (type(exc).__name__, str(exc))
    return "returned", [(m.type, m.content, getattr(m, "status", None)) for m in result["messages"]]


TOOL_FAILURES = {
    "raised": ('call explode {"reason": "boom"}; answer {result}', "explode", "ValueError: exploded: boom"),
    "invalid_args": ('call add {"a": "zz"}; answer {result}', "add", "Input should be a valid integer"),
    "tool_exception": ('call fragile {"x": 7}; answer {result}', "fragile", "fragile failed on 7"),
    "unknown_tool": ("call nosuch {}; answer {result}", "nosuch", "nosuch is not a valid tool"),
}


@pytest.mark.parametrize("capture", ["middleware", "instrument"])
@pytest.mark.parametrize("failure", sorted(TOOL_FAILURES))
def test_tool_failures_are_error_steps_and_change_nothing(
    sqlite_url: str, capture: str, failure: str
) -> None:
    text, tool_name, message = TOOL_FAILURES[failure]
    plain = create_agent(ToolScriptModel(), make_tools(), name="calc")
    expected = _outcome(plain, text)

    if capture == "middleware":
        agent = create_agent(
            ToolScriptModel(), make_tools(), name="calc", middleware=[honed.Middleware(store=sqlite_url)]
        )
    else:
        honed.instrument(store=sqlite_url)
        agent = plain
    try:
        assert _outcome(agent, text, run_config("f")) == expected
    finally:
        honed.uninstrument()
    honed.flush()

    t = only(honed.open_store(sqlite_url), task_id="f")
    failed = [s for s in t.tool_steps() if s.error]
    assert [s.name for s in failed] == [tool_name]
    assert message in failed[0].error
    if expected[0] == "raised":
        assert t.status == "error" and "exploded: boom" in t.error
    else:
        assert t.status == "ok" and t.answer == expected[1][-1][1]


@pytest.mark.parametrize("capture", ["middleware", "instrument"])
def test_a_model_that_raises_is_recorded_and_reraised(sqlite_url: str, capture: str) -> None:
    model = ToolScriptModel(fail_on="BOOM")
    middleware = [honed.Middleware(store=sqlite_url)] if capture == "middleware" else []
    agent = create_agent(model, make_tools(), name="calc", middleware=middleware)
    if capture == "instrument":
        honed.instrument(store=sqlite_url)
    try:
        with pytest.raises(RuntimeError, match="model failure"):
            agent.invoke({"messages": [("user", "BOOM")]}, config=run_config("m"))
    finally:
        honed.uninstrument()
    honed.flush()
    t = only(honed.open_store(sqlite_url), task_id="m")
    assert t.status == "error" and "RuntimeError: model failure" in t.error
    (step,) = t.model_steps()
    assert "model failure" in step.error


def test_a_stream_the_caller_abandons_is_recorded_as_abandoned(instrumented: str) -> None:
    agent = create_agent(ToolScriptModel(), make_tools(), name="calc")
    stream = agent.stream(
        {"messages": [("user", add_task(1, 2))]}, config=run_config("cut"), stream_mode="updates"
    )
    next(stream)
    stream.close()
    honed.flush()
    t = only(honed.open_store(instrumented), task_id="cut")
    # An error, not `interrupted` (a pause at a LangGraph interrupt, which can be resumed).
    assert t.status == "error" and "abandoned (the caller stopped consuming the stream)" in t.error
    assert t.steps and t.steps[0].kind == "node"


def test_output_of_the_agent_is_identical_with_and_without_capture(sqlite_url: str) -> None:
    text = add_task(20, 22)
    plain = create_agent(ToolScriptModel(reasoning="r"), make_tools(), name="calc")
    captured = create_agent(
        ToolScriptModel(reasoning="r"),
        make_tools(),
        name="calc",
        middleware=[honed.Middleware(store=sqlite_url)],
    )
    strip = lambda r: [(m.type, m.content, getattr(m, "tool_calls", None)) for m in r["messages"]]  # noqa: E731
    assert strip(plain.invoke({"messages": [("user", text)]})) == strip(
        captured.invoke({"messages": [("user", text)]})
    )


# -- payloads: anything serialises, big fields are capped, secrets never reach the store --------------


def test_unserialisable_huge_and_secret_tool_results(sqlite_url: str) -> None:
    from langchain_core.tools import tool

    class Opaque:
        def __repr__(self) -> str:
            raise RuntimeError("no repr for you")

    @tool(response_format="content_and_artifact")
    def leak(n: int) -> tuple[str, dict]:
        """Return awkward things: the artifact reaches callbacks as the raw objects."""
        cyclic: dict[str, Any] = {"n": n}
        cyclic["self"] = cyclic
        artifact = {"opaque": Opaque(), "cyclic": cyclic, "blob": b"\x00\x01" * 10}
        return "my key is sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD, ok", artifact

    @tool
    def huge(n: int) -> str:
        """A 300 KB result."""
        return "x" * 300_000

    capture = honed.Middleware(store=sqlite_url, max_field_bytes=4096)
    agent = create_agent(ToolScriptModel(), [leak, huge], name="leaky", middleware=[capture])
    agent.invoke({"messages": [("user", 'call leak {"n": 1}; call huge {"n": 2}; answer done')]})
    honed.flush()
    t = only(honed.open_store(sqlite_url))
    leak_step, huge_step = t.tool_steps()
    everything = json.dumps(t.to_dict(), default=str)
    assert "sk-proj-abcdefghijklmnop" not in everything and "[REDACTED" in leak_step.output
    artifact = leak_step.extra["artifact"]
    assert artifact["cyclic"]["self"] == {"__cycle__": "dict"}
    assert "Opaque" in json.dumps(artifact["opaque"]) and artifact["blob"]["size"] == 20
    assert huge_step.output["__truncated__"] is True and huge_step.output["size"] >= 300_000
    stored_text = json.dumps(huge_step.output, separators=(",", ":"), ensure_ascii=False)  # as stored
    assert "sha256" not in huge_step.output  # redacted fields are never hashed whole
    assert len(stored_text.encode()) <= 4096


def test_a_capped_answer_is_marked_as_the_text_it_is(sqlite_url: str) -> None:
    """A QA pass (session 28): the marker of an answer over the cap named its type
    `langchain_core.messages.base.TextAccessor` (what `message.text` returns), not `str`."""
    capture = honed.Middleware(store=sqlite_url, max_field_bytes=1000)
    agent = create_agent(ToolScriptModel(), [], name="long", middleware=[capture])
    agent.invoke({"messages": [("user", "answer " + "x" * 5000)]})
    honed.flush()
    t = only(honed.open_store(sqlite_url))
    assert t.output["__truncated__"] is True and t.output["type"] == "str", t.output


def test_store_filters(sqlite_url: str) -> None:
    handler = honed.CallbackHandler(store=sqlite_url)
    agent = create_agent(ToolScriptModel(), make_tools(), name="calc")
    for i, split in enumerate(["train", "train", "heldout"]):
        agent.invoke(
            {"messages": [("user", add_task(i, 1))]},
            config={"callbacks": [handler], **run_config(f"k{i}", split)},
        )
    honed.flush()
    store = honed.open_store(sqlite_url)
    newest_first = store.trajectories()
    assert [t.task_id for t in newest_first] == ["k2", "k1", "k0"]
    assert [t.task_id for t in store.trajectories(split="train")] == ["k1", "k0"]
    assert store.count(split="heldout") == 1
    assert store.count(verdict="unlabeled") == 3
    store.add_verdict(newest_first[0].id, honed.Verdict(passed=True, verifier="ref"))
    store.add_verdict(newest_first[1].id, honed.Verdict(passed=False, verifier="ref"))
    assert [t.task_id for t in store.trajectories(verdict="pass")] == ["k2"]
    assert [t.task_id for t in store.trajectories(verdict="fail")] == ["k1"]
    assert store.trajectories(since=newest_first[0].started_at)[0].task_id == "k2"
    assert store.trajectories(model_version="tool-script", limit=None).__len__() == 3
    assert store.get(newest_first[0].id[-12:]).task_id == "k2"


class Nested(TypedDict):
    ctx: dict[str, Any]
    value: int


def test_the_task_is_stored_as_given_though_the_graph_changes_it_deep_inside(sqlite_url: str) -> None:
    """A node that edits the input's nested dicts in place (a QA pass, session 20: two levels down,
    the stored task showed the edit), and a caller that reuses its task dict afterwards."""

    def work(state: Nested) -> dict[str, Any]:
        state["ctx"]["user"]["tries"] += 1
        state["ctx"]["user"]["seen"].append("work")
        return {"value": state["value"] + 1}

    graph = StateGraph(Nested)
    graph.add_node("work", work)
    graph.add_edge(START, "work")
    graph.add_edge("work", END)
    app = honed.wrap(graph.compile(name="nested"), store=sqlite_url, flush_interval=3600)
    task = {"ctx": {"user": {"tries": 0, "seen": []}}, "value": 1}
    app.invoke(task, config=run_config("n1"))
    task["ctx"]["user"]["tries"] = 99
    honed.flush()
    t = only(honed.open_store(sqlite_url))
    assert t.task == {"ctx": {"user": {"tries": 0, "seen": []}}, "value": 1}
    assert t.output["ctx"]["user"] == {"tries": 1, "seen": ["work"]}


def test_a_snapshot_costs_the_agent_little_however_large_or_cyclic_its_state() -> None:
    """A review (session 21) of the deep snapshot: 20,000 documents cost a captured invoke 0.9 s
    on the agent's thread, and a small tree with parent pointers took a minute."""
    import time

    from honed.capture.events import SNAPSHOT_ITEMS, snapshot

    docs = [{"id": i, "meta": {"source": "kb", "tags": ["a"]}} for i in range(20_000)]
    started = time.perf_counter()
    copied = snapshot({"docs": docs})
    assert time.perf_counter() - started < 0.2
    assert copied["docs"] is not docs and copied["docs"][0] is not docs[0]  # the head: copied
    assert copied["docs"][-1] is docs[-1] and len(copied["docs"]) == 20_000  # past the budget: shared
    assert sum(d is not o for d, o in zip(copied["docs"], docs, strict=True)) <= SNAPSHOT_ITEMS
    # A review (session 22): with the budget spent on the documents, the lists and dicts after
    # them at the top level were kept by reference, and changed in place after the snapshot.
    state = {"docs": docs, "messages": [{"role": "user", "content": "hi"}], "meta": {"turn": 1}}
    copied = snapshot(state)
    state["messages"].append({"role": "assistant", "content": "after the snapshot"})
    state["meta"]["turn"] = 2
    assert len(copied["messages"]) == 1 and copied["meta"] == {"turn": 1}
    # ... but not a dict of 200,000 lists whole (a second review: 0.7 s on the agent's thread).
    wide = {f"k{i}": [i] for i in range(200_000)}
    copied = snapshot(wide)
    assert sum(copied[k] is not wide[k] for k in wide) <= 2 * SNAPSHOT_ITEMS

    root: dict[str, Any] = {"name": "root", "children": []}
    level = [root]
    for _ in range(6):  # 5**6 nodes reachable many ways before: exponential
        nxt = []
        for node in level:
            for i in range(5):
                child = {"name": f"n{i}", "parent": node, "children": []}
                node["children"].append(child)
                nxt.append(child)
        level = nxt[:5]
    started = time.perf_counter()
    tree = snapshot({"tree": root})["tree"]
    assert time.perf_counter() - started < 0.5
    assert tree["children"][0]["parent"] is tree  # the cycle kept, on the copy
    # A review of that fix (session 21): a chain 1,000 long raised RecursionError into the agent;
    # columns of 500,000 rows cost 0.7 s.
    chunks = [{"i": i} for i in range(1000)]
    for a, b in itertools.pairwise(chunks):
        a["next"] = b
    assert snapshot({"chunks": chunks})["chunks"][0]["i"] == 0
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(5000):
        node["d"] = {}
        node = node["d"]
    assert "d" in snapshot({"deep": deep})["deep"]
    columns = {f"c{i}": list(range(500_000)) for i in range(12)}
    started = time.perf_counter()
    snapshot({"result": columns})
    assert time.perf_counter() - started < 0.1


def test_labels_the_callers_code_gives_an_agent_inside_another_run_are_kept(instrumented: str) -> None:
    """A QA pass (session 22): an agent invoked with labels in a request handler (`@chain`) or in
    a node was captured under `instrument()` as part of the outer run, whose labels alone counted:
    a held-out run lost its split, was judged and trained on. Under an unlabelled root the inner
    run's labels are the run's; under a labelled one a held-out split among them holds it out."""
    from langchain_core.runnables import chain

    from honed.learn.datasets import prepare
    from honed.store.select import HeldOut

    agent = create_agent(ScriptedChatModel(), [], name="qa")

    @chain
    def handler(question: str) -> str:
        labels = {"task_id": "secret-heldout-7", "split": "heldout", "expected": question}
        return agent.invoke({"messages": [("user", f"answer {question}")]}, {"metadata": {"honed": labels}})[
            "messages"
        ][-1].content

    handler.invoke("the held-out answer")
    handler.invoke("the train answer", {"metadata": {"honed": {"task_id": "outer-1", "split": "train"}}})
    # Labels inherited from the root are not labels of the run's own: nothing changes.
    agent.invoke(
        {"messages": [("user", "answer inherited")]},
        {"metadata": {"honed": {"task_id": "t9", "split": "train"}}},
    )
    honed.flush()
    store = honed.open_store(instrumented)
    unlabelled, labelled, plain = store.trajectories(oldest_first=True)
    assert (unlabelled.task_id, unlabelled.split) == ("secret-heldout-7", "heldout")
    assert unlabelled.metadata["expected"] == "the held-out answer"
    # Held out by what it holds, its own task not made a held-out task (session 25: a tool's
    # `split="heldout"` withdrew every run of its run's task from training).
    assert (labelled.task_id, labelled.split) == ("outer-1", "train")
    assert labelled.metadata["held_out_by"] == {"task_id": "secret-heldout-7", "split": "heldout"}
    assert HeldOut.of(store).holds(labelled) and "outer-1" not in HeldOut.of(store).task_ids
    assert (plain.task_id, plain.split) == ("t9", "train") and "held_out_by" not in plain.metadata
    for t in (unlabelled, labelled, plain):
        store.add_verdict(t.id, Verdict(verifier="human", passed=True))
    data = prepare(store, "sft")
    assert data.trajectory_ids == [plain.id]

    # Two labelled agents in one handler: the second task's conversation is in the run, so the
    # run is held out with it (a second review, session 22: trained, named by the first's labels).
    @chain
    def two(question: str) -> str:
        agent.invoke({"messages": [("user", "answer Paris")]}, {"metadata": {"honed": {"task_id": "task-a"}}})
        return agent.invoke(
            {"messages": [("user", f"answer {question}")]}, {"metadata": {"honed": {"task_id": "task-b"}}}
        )["messages"][-1].content

    two.invoke("42")
    honed.flush()
    both = store.trajectories()[0]
    assert both.task_id == "task-a" and both.metadata["nested_task_ids"] == ["task-b"]
    store.add_verdict(both.id, Verdict(verifier="human", passed=True))
    assert both.id in prepare(store, "sft").trajectory_ids
    assert both.id not in prepare(store, "sft", heldout_tasks=["task-b"]).trajectory_ids

    @chain
    def many(_: str) -> str:  # more tasks than are named: held out when any task is (a third review)
        for i in range(66):
            agent.invoke({"messages": [("user", "answer hi")]}, {"metadata": {"honed": {"task_id": f"t{i}"}}})
        return "done"

    many.invoke("go", {"metadata": {"honed": {"task_id": "batch", "split": "train"}}})
    honed.flush()
    batch = store.trajectories(task_id="batch")[0]
    store.add_verdict(batch.id, Verdict(verifier="human", passed=True))
    assert len(batch.metadata["nested_task_ids"]) == 64 and batch.metadata["nested_task_ids_cut"]
    assert batch.id not in prepare(store, "sft", heldout_tasks=["t65"]).trajectory_ids


def test_a_call_a_middleware_answered_from_its_cache_is_a_tool_step(instrumented: str) -> None:
    """A QA pass (session 22): a tool call a middleware answered without running the tool (a cache,
    `LLMToolEmulator`) left no tool step under `instrument()` or a `Middleware` listed after it;
    only error replies were recorded."""
    from langchain.agents.middleware import wrap_tool_call
    from langchain_core.messages import ToolMessage
    from langchain_core.tools import tool

    @tool
    def price(item: str) -> str:
        """Price of an item."""
        return f"{item}: 10 EUR"

    @wrap_tool_call
    def cache(request: Any, handler: Any) -> Any:
        if request.tool_call["args"].get("item") == "tea":
            return ToolMessage("tea: 3 EUR (cached)", tool_call_id=request.tool_call["id"], name="price")
        return handler(request)

    task = {
        "messages": [("user", 'call price {"item": "tea"}; call price {"item": "cake"}; answer {result}')]
    }
    create_agent(ScriptedChatModel(), [price], middleware=[cache], name="shop").invoke(task)
    honed.flush()
    own = f"{instrumented[:-3]}-mw.db"
    create_agent(
        ScriptedChatModel(), [price], middleware=[cache, honed.Middleware(store=own)], name="shop"
    ).invoke(task)
    honed.flush()
    for url in (instrumented, own):
        (t,) = honed.open_store(url).trajectories()
        steps = [(s.input, s.output, bool(s.extra.get("synthesised"))) for s in t.tool_steps()]
        assert steps == [
            ({"item": "tea"}, "tea: 3 EUR (cached)", True),
            ({"item": "cake"}, "cake: 10 EUR", False),
        ]
        assert [s.kind for s in t.steps if s.kind != "node"] == ["model", "tool", "model", "tool", "model"]


def test_a_hand_written_tool_node_stores_each_call_once(instrumented: str) -> None:
    """A review (session 22): LangGraph's tutorial tool node runs `tool.invoke(call["args"])`, so the
    tool's callback carries no call id, and the ToolMessage it returns was taken for a call
    answered without running: every call was stored twice. The run's step gets the call's id."""
    from langchain_core.tools import tool

    @tool
    def price(item: str) -> str:
        """Price of an item."""
        return f"{item}: 10 EUR"

    hand_written_tool_node(ScriptedChatModel().bind_tools([price]), price).invoke(
        {"messages": [("user", 'call price {"item": "tea"}; call price {"item": "jam"}; answer {result}')]}
    )
    honed.flush()
    (t,) = honed.open_store(instrumented).trajectories()
    steps = [
        (s.input, s.output, s.extra.get("tool_call_id"), bool(s.extra.get("synthesised")))
        for s in t.tool_steps()
    ]
    assert steps == [
        ({"item": "tea"}, "tea: 10 EUR", "call_0_price", False),
        ({"item": "jam"}, "jam: 10 EUR", "call_1_price", False),
    ]


def test_two_equal_calls_in_a_hand_written_tool_node_keep_their_ids(instrumented: str) -> None:
    """A review (session 22): two equal calls in one turn (roll two dice) took each other's ids."""
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage
    from langchain_core.tools import tool

    rolled = iter([2, 3])

    @tool
    def roll(sides: int) -> str:
        """Roll a die."""
        return f"rolled {next(rolled)}"

    calls = [{"name": "roll", "args": {"sides": 6}, "id": f"c{i}"} for i in range(2)]
    llm = GenericFakeChatModel(messages=iter([AIMessage("", tool_calls=calls), AIMessage("done")]))
    hand_written_tool_node(llm, roll).invoke({"messages": [("user", "roll two dice")]})
    honed.flush()
    (t,) = honed.open_store(instrumented).trajectories()
    assert [(s.extra.get("tool_call_id"), s.output) for s in t.tool_steps()] == [
        ("c0", "rolled 2"),
        ("c1", "rolled 3"),
    ]


class _Chat(TypedDict):
    messages: Annotated[list, add_messages]


def hand_written_tool_node(llm: Any, tool: Any) -> Any:
    """LangGraph's tutorial graph: a chatbot node, and a tool node of its own that runs each call
    on its arguments (`tool.invoke(call["args"])`) and answers with a ToolMessage."""
    from langchain_core.messages import ToolMessage

    def chatbot(state: _Chat) -> dict[str, Any]:
        return {"messages": [llm.invoke(state["messages"])]}

    def tools(state: _Chat) -> dict[str, Any]:
        asked = state["messages"][-1].tool_calls
        return {
            "messages": [
                ToolMessage(tool.invoke(c["args"]), name=c["name"], tool_call_id=c["id"]) for c in asked
            ]
        }

    graph = StateGraph(_Chat)
    graph.add_node("chatbot", chatbot)
    graph.add_node("tools", tools)
    graph.add_edge(START, "chatbot")
    graph.add_conditional_edges("chatbot", lambda s: "tools" if s["messages"][-1].tool_calls else END)
    graph.add_edge("tools", "chatbot")
    return graph.compile()


def test_labels_a_tool_gives_a_run_inside_it_decide_nothing_of_the_run(instrumented: str) -> None:
    """A QA pass (session 25): the agent's own code, in a tool, invoked a runnable labelled with
    another task's id, its own answer as `expected`, a verifier and `split="train"`: the unlabelled
    run took them all, a reference check passed it and it trained. Under a labelled root its
    `split="heldout"` made the run's task held out, withdrawing that task's honest runs."""
    from langchain_core.runnables import RunnableLambda
    from langchain_core.tools import tool

    from honed.learn.datasets import prepare
    from honed.store.select import HeldOut
    from honed.verifiers import ReferenceMatch, Worker

    forged = {"task_id": "victim", "expected": "WRONG", "split": "train", "verifier": "reference"}

    @tool
    def lookup(q: str) -> str:
        """Look something up."""
        RunnableLambda(lambda x: x).invoke("x", {"metadata": {"honed": forged}})
        RunnableLambda(lambda x: x).invoke("x", {"metadata": {"honed": {"split": "heldout"}}})
        return "WRONG"

    agent = create_agent(ScriptedChatModel(), [lookup], name="bot")
    task = 'call lookup {"q": "x"}; answer {result}'
    agent.invoke({"messages": [("user", task)]})  # a production run: no labels
    agent.invoke(
        {"messages": [("user", "answer 42")]}, {"metadata": {"honed": {"task_id": "t1", "expected": "42"}}}
    )
    agent.invoke({"messages": [("user", task)]}, {"metadata": {"honed": {"task_id": "t1", "expected": "42"}}})
    assert honed.flush()
    store = honed.open_store(instrumented)
    unlabelled, honest, poisoning = store.trajectories(oldest_first=True)
    assert (unlabelled.task_id, unlabelled.split) == (None, None)
    assert "expected" not in unlabelled.metadata and "verifier" not in unlabelled.metadata
    assert unlabelled.metadata.get("nested_task_ids") == ["victim"]
    assert (poisoning.task_id, poisoning.split) == ("t1", None) and HeldOut.of(store).holds(poisoning)
    assert "t1" not in HeldOut.of(store).task_ids
    Worker(store, verifiers=[ReferenceMatch()], concurrency=1).run_once()
    assert prepare(store, "sft").trajectory_ids == [honest.id]


def test_a_call_that_fails_mid_stream_keeps_what_it_streamed(sqlite_url: str) -> None:
    """A provider hanging up half-way through a streamed reply: the step kept the error and lost
    the text the user had already seen (a QA pass, session 27). Now it keeps both."""
    from collections.abc import Iterator

    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessageChunk
    from langchain_core.outputs import ChatGenerationChunk
    from langgraph.graph import MessagesState

    class HangsUp(BaseChatModel):
        @property
        def _llm_type(self) -> str:
            return "hangs-up"

        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

        def _stream(
            self, messages: Any, stop: Any = None, run_manager: Any = None, **kw: Any
        ) -> Iterator[Any]:
            for word in ("The ", "answer ", "is "):
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=word))
                if run_manager:
                    run_manager.on_llm_new_token(word, chunk=chunk)
                yield chunk
            raise TimeoutError("the provider hung up mid-stream")

    model = HangsUp()
    graph = StateGraph(MessagesState)
    graph.add_node("llm", lambda state: {"messages": [model.invoke(state["messages"])]})
    graph.add_edge(START, "llm")
    app = graph.compile(name="streamer")
    handler = honed.CallbackHandler(store=sqlite_url)
    with pytest.raises(TimeoutError):
        for _ in app.stream({"messages": [("user", "q")]}, {"callbacks": [handler]}, stream_mode="messages"):
            pass
    handler.recorder.flush()
    [step] = only(honed.open_store(sqlite_url)).model_steps()
    assert step.error and "hung up mid-stream" in step.error
    assert step.output == {"role": "assistant", "content": "The answer is "}
    assert step.extra["streamed_before_error"] is True
    assert not handler._streamed  # nothing held once the call ended
