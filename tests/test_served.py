"""ServedModel: one chat model object that follows the live version, swapping weights under the agent."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, TypedDict

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

import honed
from honed.serving.served import ServedModel
from honed.store.registry import ModelVersionInvalid, NoLiveVersion
from test_registry import fake_model


class VersionEcho(BaseChatModel):
    """A backend that answers with its version's ref, after `delay` seconds; records `close()`."""

    ref: str
    delay: float = 0.0
    closed: bool = False

    @property
    def _llm_type(self) -> str:
        return "version-echo"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        time.sleep(self.delay)
        assert not self.closed, "a call ran on released weights"
        return ChatResult(
            generations=[
                ChatGeneration(message=AIMessage(self.ref, response_metadata={"model_name": "echo"}))
            ]
        )

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def registry(store_url: str, tmp_path: Path):
    store = honed.open_store(store_url)
    for i in range(1, 4):
        store.register_model("agent", fake_model(tmp_path / f"v{i}", seed=i))
    store.promote("agent", 1)
    yield store
    store.close()


def echo_backend(delays: dict[str, float] | None = None, made: list[VersionEcho] | None = None):
    def make(version: Any) -> VersionEcho:
        backend = VersionEcho(ref=version.ref, delay=(delays or {}).get(version.ref, 0.0))
        if made is not None:
            made.append(backend)
        return backend

    return make


def test_calls_in_flight_finish_on_their_weights_then_those_are_released(registry) -> None:
    made: list[VersionEcho] = []
    served = ServedModel(
        registry, name="agent", backend=echo_backend({"agent@v1": 0.6}, made), poll_interval=60
    )
    results: dict[str, Any] = {}
    slow = threading.Thread(target=lambda: results.setdefault("slow", served.invoke("long task")))
    slow.start()
    time.sleep(0.15)
    registry.promote("agent", 2)
    assert served.refresh().ref == "agent@v2"
    fast = served.invoke("new task")
    assert fast.content == "agent@v2" and fast.response_metadata["model_version"] == "agent@v2"
    assert made[0].closed is False  # v1 still has a call running on it
    slow.join()
    assert (
        results["slow"].content == "agent@v1"
        and results["slow"].response_metadata["model_version"] == "agent@v1"
    )
    assert made[0].closed is True  # released once its last call ended
    served.close()
    assert made[1].closed is True


def test_calls_inside_pinned_go_to_one_version_whatever_is_promoted(registry) -> None:
    """`honed serve` answered one request's `n` choices with `n` calls, each taking the live
    version on its own: a promotion between them gave one response choices of two models."""
    import asyncio

    made: list[VersionEcho] = []
    served = ServedModel(registry, name="agent", backend=echo_backend(made=made), poll_interval=60)

    async def request() -> list[str]:
        async with served.pinned() as version:
            first = await served.ainvoke("choice 1")
            registry.promote("agent", 2)
            assert served.refresh().ref == "agent@v2"  # swapped while the request is in flight
            rest = await asyncio.gather(*(served.ainvoke(f"choice {i}") for i in range(2, 5)))
            assert made[0].closed is False  # the pinned version stays loaded until the block ends
        return [version.ref, *(m.content for m in (first, *rest))]

    assert asyncio.run(request()) == ["agent@v1"] * 5
    assert made[0].closed is True and served.invoke("next").content == "agent@v2"
    served.close()


def test_polling_notices_a_promotion_from_elsewhere(registry) -> None:
    served = ServedModel(registry.url, name="agent", backend=echo_backend(), poll_interval=0.05)
    assert served.invoke("x").content == "agent@v1"
    with honed.open_store(registry.url) as other:  # another process's view of the store
        other.promote("agent@v3", reason="better")
    deadline = time.monotonic() + 5
    while served.invoke("x").content != "agent@v3":
        assert time.monotonic() < deadline, "the promotion was not noticed"
        time.sleep(0.02)
    served.close()


def test_postgres_notify_swaps_without_waiting_for_a_poll(pg_url: str, tmp_path: Path) -> None:
    store = honed.open_store(pg_url)
    for i in (1, 2):
        store.register_model("agent", fake_model(tmp_path / f"v{i}"))
    store.promote("agent", 1)
    served = ServedModel(store, name="agent", backend=echo_backend(), poll_interval=30)
    time.sleep(0.5)  # the follower is LISTENing
    started = time.monotonic()
    store.promote("agent", 2)
    while served.invoke("x").content != "agent@v2":
        assert time.monotonic() - started < 5, "NOTIFY did not reach the follower"
        time.sleep(0.01)
    served.close()
    store.close()


def test_no_live_version_yet_is_a_clear_error_or_a_wait(sqlite_url: str, tmp_path: Path) -> None:
    store = honed.open_store(sqlite_url)
    store.register_model("fresh", fake_model(tmp_path / "v1"))
    served = ServedModel(store, name="fresh", backend=echo_backend(), poll_interval=0.05)
    with pytest.raises(NoLiveVersion, match="honed promote fresh@v1"):
        served.invoke("x")
    threading.Timer(0.2, lambda: store.promote("fresh@v1")).start()
    waiting = ServedModel(store, name="fresh", backend=echo_backend(), poll_interval=0.05, wait_for_live=5)
    assert waiting.invoke("x").content == "fresh@v1"
    served.close()
    waiting.close()


def test_a_version_that_fails_to_load_leaves_the_live_one_serving(registry) -> None:
    def make(version: Any) -> VersionEcho:
        if version.version == 2:
            raise OSError("weights unreadable")
        return VersionEcho(ref=version.ref)

    served = ServedModel(registry, name="agent", backend=make, poll_interval=60)
    registry.promote("agent", 2)
    served.refresh()
    assert served.invoke("x").content == "agent@v1"
    assert "weights unreadable" in served._follower.load_error
    registry.promote("agent", 3)
    served.refresh()
    assert served.invoke("x").content == "agent@v3"
    served.close()


def test_a_version_moved_as_the_interpreter_exits_is_not_reported_as_failing(
    registry, caplog: pytest.LogCaptureFixture
) -> None:
    """A QA pass (session 25): the README's serving snippet ended, then the follower saw its
    rollback while the interpreter exited, failed to load (thread pools refuse work then) and
    printed "could not be loaded ... still serving v2" with a traceback."""

    def make(version: Any) -> VersionEcho:
        if version.version == 2:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        return VersionEcho(ref=version.ref)

    served = ServedModel(registry, name="agent", backend=make, poll_interval=60)
    registry.promote("agent", 2)
    with caplog.at_level("ERROR", logger="honed"):
        served.refresh()
    assert not [r for r in caplog.records if "could not be loaded" in r.getMessage()]
    assert served._follower.load_error is None and served._follower._stop.is_set()
    served.close()


def test_a_live_version_whose_folder_is_gone_is_said_in_a_line(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A QA pass (session 18): `honed serve` over a version whose folder was deleted logged a
    traceback for it; it says the folder is missing, in one line."""
    import shutil

    store = honed.open_store(sqlite_url)
    store.register_model("gone", fake_model(tmp_path / "v1"))
    store.promote("gone", 1)
    shutil.rmtree(tmp_path / "v1")
    with caplog.at_level("ERROR", logger="honed"):
        served = ServedModel(store, name="gone", backend="local", poll_interval=60)
        served.refresh()
    assert served._follower.load_error.startswith(
        f"gone@v1 could not be loaded: no model folder at {tmp_path / 'v1'}"
    )
    failed = [r for r in caplog.records if "could not be loaded" in r.getMessage()]
    assert failed and not any(r.exc_info for r in failed), [r.exc_info for r in failed]
    with pytest.raises(NoLiveVersion):
        served.invoke("x")
    served.close()
    store.close()


def test_a_corrupt_version_is_refused_at_promotion_and_serving_goes_on(registry, tmp_path: Path) -> None:
    served = ServedModel(registry, name="agent", backend=echo_backend(), poll_interval=60)
    broken = fake_model(tmp_path / "broken")
    version = registry.register_model("agent", broken)
    (broken / "model.safetensors").write_bytes(b"not weights")  # the files rot after registering
    with pytest.raises(ModelVersionInvalid):
        registry.promote("agent", version.version)
    served.refresh()
    assert served.invoke("x").content == "agent@v1"
    served.close()


class TwoAgents(TypedDict, total=False):
    task: str
    plan: str
    code: str


def test_one_served_model_per_subagent_each_follows_its_own_name(sqlite_url: str, tmp_path: Path) -> None:
    from langgraph.graph import END, START, StateGraph

    store = honed.open_store(sqlite_url)
    for name in ("planner", "coder"):
        for i in (1, 2):
            store.register_model(name, fake_model(tmp_path / f"{name}{i}"))
        store.promote(name, 1)
    planner = ServedModel(store, name="planner", backend=echo_backend(), poll_interval=60)
    coder = ServedModel(store, name="coder", backend=echo_backend(), poll_interval=60)

    graph = StateGraph(TwoAgents)
    graph.add_node("plan", lambda state: {"plan": planner.invoke("plan").content})
    graph.add_node("code", lambda state: {"code": coder.invoke("code").content})
    graph.add_edge(START, "plan")
    graph.add_edge("plan", "code")
    graph.add_edge("code", END)
    app = honed.wrap(graph.compile(), store=sqlite_url)

    assert app.invoke({"task": "t"}) == {"task": "t", "plan": "planner@v1", "code": "coder@v1"}
    store.promote("coder", 2)
    planner.refresh()
    coder.refresh()
    assert app.invoke({"task": "t"}) == {"task": "t", "plan": "planner@v1", "code": "coder@v2"}
    assert honed.flush()
    newest = store.trajectories(limit=1)[0]
    assert [s.model_version for s in newest.model_steps()] == ["planner@v1", "coder@v2"]
    planner.close()
    coder.close()


# -- the real local backend under load ------------------------------------------------------------------


def test_eight_agents_through_three_promotions_and_a_rollback(sqlite_url: str) -> None:
    """Zero failed calls; every captured step is attributed to the version whose weights produced
    it (its logprobs match that version's and no other's); old weights are released."""
    torch = pytest.importorskip("torch")
    from langchain.agents import create_agent
    from transformers import AutoModelForCausalLM

    from honed.serving import engine as engines
    from tiny_model import add_tool, tiny_path

    store = honed.open_store(sqlite_url)
    paths = {i: tiny_path(i) for i in (1, 2, 3, 4)}
    for i in (1, 2, 3, 4):
        store.register_model("agent", paths[i])
    store.promote("agent", 1)
    served = ServedModel(store, name="agent", poll_interval=0.05, temperature=0, max_tokens=4)
    agent = create_agent(served, [add_tool()], middleware=[honed.Middleware(store=sqlite_url)], name="stress")

    stop, failures, replies = threading.Event(), [], []
    lock = threading.Lock()

    def work(worker: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                out = agent.invoke({"messages": [("user", f"worker {worker} task {n}")]})
                with lock:
                    replies.append(out["messages"][-1].response_metadata["model_version"])
            except Exception as exc:  # the assertion below reports these
                failures.append(repr(exc))
            n += 1

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()

    def served_a_few(ref: str) -> None:  # each version serves some calls before the next change
        # count only replies that came after the change: v3 served before v4, and its old replies
        # must not pass for the rollback's
        start, deadline = len(replies), time.monotonic() + 60
        while sum(1 for r in replies[start:] if r == ref) < 8:
            assert time.monotonic() < deadline and not failures, (ref, Counter(replies), failures[:3])
            time.sleep(0.02)

    served_a_few("agent@v1")
    for change, ref in (
        (lambda: store.promote("agent", 2), "agent@v2"),
        (lambda: store.promote("agent", 3), "agent@v3"),
        (lambda: store.promote("agent", 4), "agent@v4"),
        (lambda: store.rollback("agent"), "agent@v3"),
    ):
        change()
        served_a_few(ref)
    stop.set()
    for t in threads:
        t.join()

    assert failures == []
    counts = Counter(replies)
    assert set(counts) == {"agent@v1", "agent@v2", "agent@v3", "agent@v4"}, counts
    assert served.live.ref == "agent@v3"
    assert honed.flush()
    steps = [s for t in store.trajectories(limit=None, agent="stress") for s in t.model_steps()]
    assert len(steps) == len(replies)

    weights = {f"agent@v{i}": AutoModelForCausalLM.from_pretrained(p) for i, p in paths.items()}

    def logprobs(model: Any, step: Any) -> Any:
        prompt, completion = step.extra["prompt_token_ids"], step.extra["token_ids"]
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)

    by_version: dict[str, list[Any]] = {}
    for step in steps:
        by_version.setdefault(step.model_version, []).append(step)
    rng = random.Random(0)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # small forwards: one thread is much faster on a busy machine
    try:
        for ref, group in by_version.items():
            for step in rng.sample(group, min(len(group), 12)):
                recorded = torch.tensor(step.extra["logprobs"])
                assert torch.allclose(recorded, logprobs(weights[ref], step), atol=2e-3), ref
                other = rng.choice([r for r in weights if r != ref])
                assert not torch.allclose(recorded, logprobs(weights[other], step), atol=2e-3)
    finally:
        torch.set_num_threads(threads_before)

    live_paths = {key[0] for key in engines._engines}
    assert str(paths[3].resolve()) in live_paths
    assert not live_paths & {str(paths[i].resolve()) for i in (1, 2, 4)}  # swapped-out weights were released
    served.close()
    store.close()


def test_openai_backend_loads_each_versions_lora_adapter_on_a_vllm_style_server(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The vLLM protocol (`/v1/load_lora_adapter`, then the adapter's name as the model), checked
    against a recording stub that answers as vLLM documents it."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    calls: list[tuple[str, dict[str, Any]]] = []

    class Stub(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append((self.path, body))
            if self.path.endswith("/chat/completions"):
                reply = {
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hi"},
                            "finish_reason": "stop",
                            "logprobs": {
                                "content": [
                                    {"token": "hi", "logprob": -0.5, "bytes": [104, 105], "top_logprobs": []}
                                ]
                            },
                            "token_ids": [42],
                        }
                    ],
                    "prompt_token_ids": [1, 2, 3],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
                }
                data = json.dumps(reply).encode()
            else:
                data = b'"Success"'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    store = honed.open_store(sqlite_url)
    for i in (1, 2):
        store.register_model("agent", fake_model(tmp_path / f"adapter{i}"))
    store.promote("agent", 1)
    served = ServedModel(
        store, name="agent", backend="openai", base_url=base, load_adapters=True, poll_interval=60
    )
    reply = served.invoke("x")
    meta = reply.response_metadata
    assert (meta["model_version"], meta["token_ids"], meta["prompt_token_ids"], meta["logprobs"]) == (
        "agent@v1",
        [42],
        [1, 2, 3],
        [-0.5],
    )
    store.promote("agent", 2)
    served.refresh()
    assert served.invoke("x").response_metadata["model_version"] == "agent@v2"
    routes = [(path.rsplit("/", 1)[-1], body.get("lora_name") or body.get("model")) for path, body in calls]
    assert routes == [
        ("load_lora_adapter", "agent@v1"),
        ("completions", "agent@v1"),
        ("load_lora_adapter", "agent@v2"),
        ("unload_lora_adapter", "agent@v1"),  # the old adapter goes once no call uses it
        ("completions", "agent@v2"),
    ]
    assert calls[0][1]["lora_path"] == str((tmp_path / "adapter1").resolve())
    assert calls[1][1]["return_token_ids"] is True and calls[1][1]["logprobs"] is True
    served.close()
    server.shutdown()
