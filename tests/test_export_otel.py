"""Trajectories as OpenTelemetry GenAI spans: the mapping, live export, replay, and a real backend
(Arize Phoenix on loopback) read back through its API."""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode
from typer.testing import CliRunner

import honed
from fakes import ToolScriptModel, make_tools
from honed import Step, Trajectory, Verdict
from honed.cli import app
from honed.exporters.otel import LiveExporter, make_resource, replay, resolve_protocol, traces_url
from honed.exporters.spans import SpanMapper, span_id_for, trace_id_for
from honed.store.select import select_trajectories
from phoenix_server import PhoenixServer, free_port, phoenix_installed

ADD = 'call add {"a": 2, "b": 3}; answer the sum is {result}'
EXPLODE = 'call explode {"reason": "kaboom"}; answer no'


class Collect(SpanExporter):
    """An in-memory span exporter: what a backend would receive."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def capture(store_url: str, *tasks: tuple[str, str], name: str = "calc") -> None:
    """Run the real agent once per (task id, task text), captured with graph nodes."""
    agent = create_agent(
        ToolScriptModel(reasoning="add first"), make_tools(), name=name, system_prompt="Add."
    )
    handler = honed.CallbackHandler(store=store_url)
    for task_id, text in tasks:
        config = {"callbacks": [handler], "metadata": {"honed": {"task_id": task_id, "split": "train"}}}
        with contextlib.suppress(ValueError):  # explode raises through the agent; the trajectory records it
            agent.invoke({"messages": [("user", text)]}, config=config)
    assert honed.flush()


@pytest.fixture
def captured(sqlite_url: str) -> str:
    capture(sqlite_url, ("t-add", ADD), ("t-boom", EXPLODE))
    return sqlite_url


def spans_of(trajectory: Trajectory, **options: Any) -> list[ReadableSpan]:
    return SpanMapper(make_resource(project="unit"), **options).spans(trajectory)


def by_name(spans: list[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    named: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        named.setdefault(span.name, []).append(span)
    return named


def has(attributes: Any, expected: dict[str, Any]) -> bool:
    return expected.items() <= dict(attributes).items()


def one(store_url: str, task_id: str) -> Trajectory:
    (trajectory,) = honed.open_store(store_url).trajectories(task_id=task_id)
    return trajectory


# -- the mapping ---------------------------------------------------------------------------------


def test_spans_follow_the_genai_conventions_and_mirror_the_steps(captured: str) -> None:
    t = one(captured, "t-add")
    spans = spans_of(t, capture_content=False)
    named = by_name(spans)
    assert sorted(named) == ["chat tool-script", "execute_tool add", "invoke_agent calc", "model", "tools"]

    (root,) = named["invoke_agent calc"]
    assert root.parent is None and root.kind is SpanKind.INTERNAL
    assert root.context.trace_id == uuid.UUID(t.id).int  # a trace is found by the trajectory id
    assert {
        k: root.attributes[k] for k in ("gen_ai.operation.name", "gen_ai.agent.name", "honed.task.id")
    } == {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "calc",
        "honed.task.id": "t-add",
    }
    assert root.attributes["gen_ai.provider.name"] and root.status.status_code is StatusCode.UNSET
    assert abs(root.start_time - t.started_at.timestamp() * 1e9) < 2000
    assert abs(root.end_time - t.ended_at.timestamp() * 1e9) < 2000

    first_chat, last_chat = named["chat tool-script"]
    assert first_chat.kind is SpanKind.CLIENT
    assert has(
        first_chat.attributes,
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "tool-script",
            "gen_ai.response.model": "tool-script",
            "honed.model_version": "tool-script",
            "gen_ai.usage.input_tokens": t.steps[1].usage["input_tokens"],
            "gen_ai.usage.output_tokens": 1,
            # It called a tool: the test model said "stop" of that too (a QA pass, session 26).
            "gen_ai.response.finish_reasons": ("tool_calls",),
            "honed.step.kind": "model",
        },
    )
    (tool,) = named["execute_tool add"]
    assert has(
        tool.attributes,
        {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": "add",
            "gen_ai.tool.call.id": "call_0_add",
            "gen_ai.tool.type": "function",
        },
    )
    # parentage: every step span sits under its recorded parent step, or under the root
    ids = {span.context.span_id: span for span in spans}
    step_of = {span.attributes.get("honed.step.id"): span for span in spans}
    for step in t.steps:
        span = step_of[step.id]
        expected = step_of[step.parent_id] if step.parent_id else root
        assert span.parent.span_id == expected.context.span_id
        assert span.context.trace_id == root.context.trace_id
    assert ids[first_chat.parent.span_id].name == "model" and ids[tool.parent.span_id].name == "tools"
    assert ids[ids[tool.parent.span_id].parent.span_id] is root
    assert len(ids) == len(spans)  # span ids are unique
    # content is opt-in: nothing of the conversation by default
    assert not any(
        key.startswith(
            ("gen_ai.input", "gen_ai.output", "gen_ai.tool.call.arguments", "gen_ai.tool.call.result")
        )
        for span in spans
        for key in span.attributes
    )
    assert last_chat.start_time >= tool.end_time


def test_errors_are_span_status_and_error_type(captured: str) -> None:
    named = by_name(spans_of(one(captured, "t-boom")))
    (root,) = named["invoke_agent calc"]
    (tool,) = named["execute_tool explode"]
    for span in (root, tool):
        assert span.status.status_code is StatusCode.ERROR
        # The message is content: only with content capture (a QA pass, session 20: a tool's
        # arguments and a file's name reached the backend with it off).
        assert span.status.description == "ValueError"
        assert span.attributes["error.type"] == "ValueError"
    assert named["chat tool-script"][0].status.status_code is StatusCode.UNSET
    with_content = by_name(spans_of(one(captured, "t-boom"), capture_content=True))
    assert "exploded: kaboom" in with_content["execute_tool explode"][0].status.description
    # A handled ToolException is stored as its bare message: its first word is no exception type.
    from honed.exporters.spans import _error_status

    attributes: dict[str, Any] = {}
    assert _error_status(attributes, "acct_88412: account locked", False).description == "_OTHER"
    assert attributes["error.type"] == "_OTHER"


def test_content_is_opt_in_by_argument_or_environment(captured: str, monkeypatch: pytest.MonkeyPatch) -> None:
    t = one(captured, "t-add")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    from_env = by_name(spans_of(t, capture_content=None))
    from_argument = by_name(spans_of(t, capture_content=True))
    assert [s.attributes for s in from_env["chat tool-script"]] == [
        s.attributes for s in from_argument["chat tool-script"]
    ]
    last_chat = from_argument["chat tool-script"][1]
    inputs = json.loads(last_chat.attributes["gen_ai.input.messages"])
    assert [m["role"] for m in inputs] == ["system", "user", "assistant", "tool"]
    assert inputs[2]["parts"][-1] == {
        "type": "tool_call",
        "id": "call_0_add",
        "name": "add",
        "arguments": {"a": 2, "b": 3},
    }
    assert inputs[3]["parts"] == [{"type": "tool_call_response", "id": "call_0_add", "response": "5"}]
    (output,) = json.loads(last_chat.attributes["gen_ai.output.messages"])
    assert output["parts"] == [
        {"type": "reasoning", "content": "add first"},
        {"type": "text", "content": "the sum is 5"},
    ]
    assert output["finish_reason"] == "stop"
    (tool,) = from_argument["execute_tool add"]
    assert json.loads(tool.attributes["gen_ai.tool.call.arguments"]) == {"a": 2, "b": 3}
    assert tool.attributes["gen_ai.tool.call.result"] == "5"
    monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "false")
    assert "gen_ai.input.messages" not in by_name(spans_of(t))["chat tool-script"][0].attributes


def test_verdicts_become_root_events_attributes_and_their_own_spans(captured: str) -> None:
    store = honed.open_store(captured)
    t = one(captured, "t-add")
    store.add_verdict(t.id, Verdict(passed=True, score=1.0, reason="matches", verifier="reference"))
    store.add_verdict(t.id, Verdict(passed=None, score=0.0, reason="no rubric", verifier="llm judge"))
    t = store.get(t.id)
    spans = spans_of(t)
    (root,) = by_name(spans)["invoke_agent calc"]
    assert has(
        root.attributes,
        {
            "honed.verdict.outcome": "pass",
            "honed.verdict.count": 2,
            "honed.verdict.reference.passed": True,
            "honed.verdict.reference.score": 1.0,
            "honed.verdict.llm_judge.score": 0.0,
        },
    )
    assert "honed.verdict.llm_judge.passed" not in root.attributes  # undecided is not False
    events = {e.attributes["gen_ai.evaluation.name"]: e for e in root.events}
    assert {e.name for e in root.events} == {"gen_ai.evaluation.result"}
    assert has(
        events["reference"].attributes,
        {"gen_ai.evaluation.score.label": "pass", "gen_ai.evaluation.score.value": 1.0},
    )
    assert events["llm judge"].attributes["gen_ai.evaluation.score.label"] == "unknown"
    verdict_span = by_name(spans)["verdict reference"][0]
    # A reason quotes the answer and the reference ("7 != 8"): content, sent only with it (a QA
    # pass, session 19: held-out references reached the tracing backend with content off).
    assert "gen_ai.evaluation.explanation" not in events["reference"].attributes
    assert "honed.verdict.reason" not in verdict_span.attributes
    with_content = by_name(spans_of(t, capture_content=True))
    (root_with,) = with_content["invoke_agent calc"]
    explained = {e.attributes["gen_ai.evaluation.name"]: e for e in root_with.events}
    assert explained["reference"].attributes["gen_ai.evaluation.explanation"] == "matches"
    assert with_content["verdict reference"][0].attributes["honed.verdict.reason"] == "matches"
    assert verdict_span.parent.span_id == root.context.span_id
    first = next(v for v in t.verdicts if v.verifier == "reference")
    assert verdict_span.context.span_id == span_id_for(t.id, f"verdict\x00reference\x001\x00{first.id}")
    assert spans_of(store.get(t.id)) and by_name(spans_of(store.get(t.id)))["verdict reference"][
        0
    ].context == (verdict_span.context)  # the same verdict exported again: the same span
    # Relabelled by the same verifier: a new judgement, a new span (its old id hid it in a backend).
    store.add_verdict(t.id, Verdict(passed=False, score=0.0, reason="recomputed", verifier="reference"))
    (relabelled,) = by_name(spans_of(store.get(t.id)))["verdict reference"]
    assert relabelled.context.span_id != verdict_span.context.span_id
    assert relabelled.attributes["honed.verdict.outcome"] == "fail"
    store.add_verdict(t.id, Verdict(passed=False, verifier="tests"))
    assert (
        by_name(spans_of(store.get(t.id)))["invoke_agent calc"][0].attributes["honed.verdict.outcome"]
        == "fail"
    )


def test_ids_are_derived_from_the_trajectory_so_exports_agree(captured: str) -> None:
    first = [(s.name, s.context.trace_id, s.context.span_id) for s in spans_of(one(captured, "t-add"))]
    again = [(s.name, s.context.trace_id, s.context.span_id) for s in spans_of(one(captured, "t-add"))]
    other = {s.context.span_id for s in spans_of(one(captured, "t-boom"))}
    assert first == again
    assert not other & {span_id for _, _, span_id in first}


def test_hand_built_trajectories_with_odd_data_still_map() -> None:
    started = datetime(2025, 1, 2, 3, 4, 5)  # naive: read as UTC
    t = Trajectory(
        id="not-a-uuid",
        agent="odd",
        started_at=started,
        ended_at=None,
        status="error",
        error="incomplete: the process exited before the run ended",
        steps=[
            Step(id="m", index=0, kind="model", name="gpt", parent_id="missing-parent",
                 input={"__truncated__": True, "size": 10**6, "sha256": "x", "preview": "..."},
                 output={"role": "assistant", "content": [{"type": "text", "text": "hi"}, {"type": "image"}]},
                 usage={"input_tokens": 3.0, "output_tokens": None},
                 extra={"settings": {"_type": "openai-chat", "model": "gpt-4o", "temperature": 0.2, "stop": ["\n"]}},
                 started_at=started + timedelta(seconds=1), ended_at=started + timedelta(seconds=2)),
            Step(id="t", index=1, kind="tool", name="search", parent_id="m", extra={"synthesised": True},
                 error="not a tool", started_at=None, ended_at=None),
        ],
    )  # fmt: skip
    spans = spans_of(t, capture_content=True)
    named = by_name(spans)
    root, chat, tool = named["invoke_agent odd"][0], named["chat gpt-4o"][0], named["execute_tool search"][0]
    assert root.context.trace_id == trace_id_for("not-a-uuid") != 0
    assert root.start_time == int(started.replace(tzinfo=UTC).timestamp()) * 10**9
    assert root.end_time >= chat.end_time  # no end recorded: the last step's end
    assert (
        root.attributes["error.type"] == "incomplete" and root.attributes["gen_ai.provider.name"] == "openai"
    )
    assert chat.parent.span_id == root.context.span_id  # an unknown parent step: the root
    assert has(
        chat.attributes,
        {
            "gen_ai.request.temperature": 0.2,
            "gen_ai.request.stop_sequences": ("\n",),
            "gen_ai.usage.input_tokens": 3,
            "honed.input.truncated": True,
        },
    )
    assert "gen_ai.usage.output_tokens" not in chat.attributes
    assert json.loads(chat.attributes["gen_ai.output.messages"])[0]["parts"] == [
        {"type": "text", "content": "hi"},
        {"type": "image"},
    ]
    assert tool.parent.span_id == chat.context.span_id and tool.attributes["honed.step.synthesised"] is True
    assert tool.attributes["error.type"] == "_OTHER"


def odd_spans() -> list[ReadableSpan]:
    """Spans with every value shape the encoder writes itself: long and non-ASCII text, empty
    strings, zero and negative numbers, sequences, an event, a remote parent, a trace state."""
    from opentelemetry.sdk.trace import Event
    from opentelemetry.trace import SpanContext, Status, TraceFlags, TraceState

    from honed.exporters.spans import SCOPE

    resource = make_resource(project="unit")
    context = SpanContext(2**128 - 1, 1, False, TraceFlags(1), TraceState([("k", "v")]))
    remote = SpanContext(5, 2**64 - 1, True, TraceFlags(1))
    attributes = {
        "s": "", "long": "é" * 5000, "k" * 300: "v", "b": False, "t": True, "i": -(2**63), "big": 2**63 - 1,
        "zero": 0, "f": 0.0, "nf": -1.5e300, "seq": ("a", "", "ü"), "ints": [1, -2], "mixed": (True, 2.5, None),
        "empty": (), "bytes": b"\x00\xff", "none": None,
    }  # fmt: skip
    return [
        ReadableSpan(name="ünïcode " * 40, context=context, parent=remote, resource=resource,
                     attributes=attributes, events=[Event("e", {"x": 1}, 7), Event("", {}, 0)],
                     kind=SpanKind.PRODUCER, status=Status(StatusCode.ERROR, "boom " * 300),
                     start_time=0, end_time=2**64 - 1, instrumentation_scope=SCOPE),
        ReadableSpan(name="", context=context, parent=None, resource=resource, attributes={},
                     kind=SpanKind.SERVER, status=Status(StatusCode.OK), start_time=1, end_time=1,
                     instrumentation_scope=SCOPE),
    ]  # fmt: skip


def test_the_fast_encoder_writes_exactly_the_sdks_request(captured: str) -> None:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from honed.exporters.otlp_proto import Unsupported, encode_request

    store = honed.open_store(captured)
    store.add_verdict(
        one(captured, "t-add").id, Verdict(passed=False, score=0.25, reason="é", verifier="ref x")
    )
    trajectories = store.trajectories()
    mapper, content = (
        SpanMapper(make_resource(project="unit")),
        SpanMapper(make_resource(), capture_content=True),
    )
    batches = [
        [s for t in trajectories for s in mapper.spans(t)],
        [s for t in trajectories for s in content.spans(t)],
        odd_spans(),
    ]
    for spans in batches:
        assert encode_request(spans) == encode_spans(spans).SerializePartialToString()
    assert encode_request([]) == encode_spans([]).SerializePartialToString()

    # What it does not write as the SDK would, it refuses (the exporter then uses the SDK's encoder).
    spans = batches[0]
    other_resource = SpanMapper(make_resource(project="other")).spans(trajectories[0])
    surrogate = spans_of(dataclasses.replace(trajectories[0], agent="\ud800"))
    mapping = ReadableSpan(
        name="m",
        context=spans[0].context,
        attributes={"d": {"a": 1}},
        resource=spans[0].resource,
        instrumentation_scope=spans[0].instrumentation_scope,
    )
    for refused in (spans + other_resource, surrogate, [mapping]):
        with pytest.raises(Unsupported):
            encode_request(refused)


@contextlib.contextmanager
def otlp_receiver(headers: list[dict[str, str]] | None = None) -> Iterator[tuple[str, list[bytes]]]:
    """A real OTLP/HTTP endpoint on a free port: its URL, and the request bodies it received (and
    each request's headers into `headers`, when given)."""
    received: list[bytes] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            if headers is not None:
                headers.append(dict(self.headers))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_replay_over_http_sends_the_sdks_bytes_or_falls_back(
    captured: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    import honed.exporters.otlp_proto as otlp_proto

    # What the fast encoder wrote: the SDK's private HTTP client is where the exporter looks for it.
    encoded: list[bytes] = []

    def encode_request(spans: Any) -> bytes:
        encoded.append(otlp_proto_encode(spans))
        return encoded[-1]

    otlp_proto_encode = otlp_proto.encode_request
    monkeypatch.setattr(otlp_proto, "encode_request", encode_request)

    with otlp_receiver() as (url, received):
        trajectories = honed.open_store(captured).trajectories()
        result = replay(trajectories, url, project="unit", capture_content=True, batch_spans=1)
        expected = SpanMapper(make_resource(project="unit"), capture_content=True)
        assert received == [
            encode_spans(expected.spans(t)).SerializePartialToString() for t in trajectories
        ] and result.batches == len(trajectories)
        assert encoded == received
        received.clear()
        # Text that is not UTF-8: the SDK's own encoder, which drops that attribute and sends the rest.
        surrogate = dataclasses.replace(trajectories[0], task_id="\ud800")
        assert replay([surrogate], url).spans == len(surrogate.steps) + 1 and len(received) == 1


@contextlib.contextmanager
def answering(answer: Any, status: int = 200, content_type: str | None = None) -> Iterator[str]:
    """An HTTP receiver (its URL) answering every POST with `status` and `answer(request_body)`."""

    class Answering(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = answer(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answering)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_replay_says_what_a_receiver_refused_in_a_partial_success(captured: str) -> None:
    """A QA pass (session 17): a receiver answering 200 with `partial_success` (spans too old for
    its retention: what a `--since 7d` replay sends) kept none, and `honed export otlp` said
    "sent 41 spans" and exited 0."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )
    from typer.testing import CliRunner

    from honed.cli import app

    def too_old(body: bytes) -> bytes:
        request = ExportTraceServiceRequest.FromString(body)
        answer = ExportTraceServiceResponse()
        answer.partial_success.rejected_spans = sum(
            len(s.spans) for r in request.resource_spans for s in r.scope_spans
        )
        answer.partial_success.error_message = "spans older than the retention window"
        return answer.SerializeToString()

    with answering(too_old, content_type="application/x-protobuf") as url:
        result = replay(honed.open_store(captured).trajectories(), url)
        assert result.spans > 0 and result.rejected == result.spans
        assert result.rejection == "spans older than the retention window"
        shown = CliRunner().invoke(app, ["export", "otlp", "--store", captured, "--endpoint", url])
        assert shown.exit_code == 1 and "refused" in shown.output and "retention window" in shown.output
        typo = ["export", "otlp", "--store", captured, "--endpoint", url, "--agent", "no-such-agent"]
        shown = CliRunner().invoke(app, typo)  # it sent nothing and said nothing (session 18's QA)
        # Exit 1, as `export jsonl` has it (a QA pass, session 26: 0 here).
        assert shown.exit_code == 1 and "sent 0 spans" in shown.output, shown.output
        assert "no stored runs have agent 'no-such-agent' (agents: " in shown.output, shown.output


def test_endpoint_protocol_and_resource_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert traces_url("http://h:4318") == "http://h:4318/v1/traces"
    assert traces_url("http://h:4318/") == "http://h:4318/v1/traces"
    assert traces_url("http://h:4318/v1/traces") == "http://h:4318/v1/traces"
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    assert resolve_protocol() == "http/protobuf"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    assert resolve_protocol() == "grpc" and resolve_protocol("http/protobuf") == "http/protobuf"
    assert resolve_protocol("http/json") == "http/protobuf"  # logged and replaced, never raised

    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.delenv("HONED_OTLP_PROJECT", raising=False)
    assert make_resource().attributes["service.name"] == "honed"
    assert make_resource().attributes["openinference.project.name"] == "honed"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "support-bot")
    assert make_resource().attributes["openinference.project.name"] == "support-bot"
    monkeypatch.setenv("HONED_OTLP_PROJECT", "prod")
    assert has(
        make_resource().attributes, {"service.name": "support-bot", "openinference.project.name": "prod"}
    )
    assert make_resource("svc", "p2").attributes["openinference.project.name"] == "p2"


def test_replay_batches_and_retries_only_a_backend_pushing_back(
    captured: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import honed.exporters.otel as otel

    monkeypatch.setattr(otel, "_REPLAY_RETRY_DELAY_S", 0.0)
    trajectories = list(select_trajectories(honed.open_store(captured), include_heldout=True))
    total = sum(len(t.steps) + 1 for t in trajectories)

    class Flaky(Collect):
        def __init__(self, fail: set[int]) -> None:
            super().__init__()
            self.fail, self.calls = fail, 0

        def export(self, spans: Any) -> SpanExportResult:
            self.calls += 1
            if self.calls in self.fail:
                return SpanExportResult.FAILURE
            return super().export(spans)

    pushed_back = Flaky(fail={2, 3})  # the second batch is refused twice, then accepted
    result = replay(trajectories * 2, span_exporter=pushed_back, batch_spans=5)
    assert result.spans == 2 * total == len(pushed_back.spans) and result.retries == 2
    assert result.trajectories == 2 * len(trajectories) and result.batches >= 4
    with pytest.raises(otel.OTLPExportError, match="after 0 were sent"):
        replay(trajectories, span_exporter=Flaky(fail={1}), batch_spans=5)  # down from the start: no retry
    with pytest.raises(otel.OTLPExportError):
        replay(trajectories, span_exporter=Flaky(fail=set(range(2, 10))), batch_spans=5, retries=3)


def test_a_refused_batch_is_told_once_with_what_the_receiver_answered(captured: str) -> None:
    """A QA pass (session 26): a receiver answering 400 had the SDK log "Failed to export spans batch
    code: 400" and the CLI print its own line (on stdout) without the status or the body, which said
    why: told twice, neither whole."""
    import subprocess

    with answering(lambda _: b"resource attribute service.name is required", status=400) as url:
        shown = subprocess.run(
            [sys.executable, "-m", "honed.cli", "export", "otlp", "--store", captured, "--endpoint", url],
            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"},
        )  # fmt: skip
    assert shown.returncode == 1 and shown.stdout == "", shown
    said = " ".join(shown.stderr.split())
    assert "Failed to export" not in said and said.count("did not accept a batch") == 1, said
    assert "code: 400" in said and "resource attribute service.name is required" in said, said


def test_nothing_listening_is_said_once_before_the_sdk_retries(captured: str) -> None:
    """A new user (a QA pass, session 27): with no collector running, three SDK lines of
    "Transient error ... retrying" came first, then, ~10 s later, the replay's own line."""
    import subprocess

    shown = subprocess.run(
        [sys.executable, "-m", "honed.cli", "export", "otlp", "--store", captured, "--endpoint", "http://127.0.0.1:1"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"},
    )  # fmt: skip
    assert shown.returncode == 1 and shown.stdout == "", shown
    assert shown.stderr.strip().splitlines() == [
        "cannot connect to http://127.0.0.1:1: Connection refused; is the backend running there?"
    ], shown.stderr


def test_a_replay_with_no_endpoint_names_the_default_it_tried(
    captured: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A QA pass (session 25): `honed export otlp` with no endpoint and nothing on localhost said
    "the endpoint in OTEL_EXPORTER_OTLP_* did not accept a batch", no such variable being set."""
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
    result = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["export", "otlp", "--store", captured])
    assert result.exit_code == 1
    assert "http://localhost:4318 (the default: no --endpoint or OTEL_EXPORTER_OTLP_ENDPOINT" in result.output
    assert "OTEL_EXPORTER_OTLP_*" not in result.output, result.output


def test_replayed_batches_with_content_stay_under_a_receivers_message_limit() -> None:
    """512 chat spans of long conversations made one 29 MB request: a gRPC receiver (and the
    Collector, by default) refuses anything over 4 MiB, every time, so the replay never went
    through. Batches are bounded by size too. Cache and reasoning tokens reach the span."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    usage = {"input_tokens": 9, "output_tokens": 4, "input_token_details": {"cache_read": 7, "cache_creation": 2},
             "output_token_details": {"reasoning": 3}}  # fmt: skip
    text = "a long message " * 2_000  # 30 KB
    steps = [
        Step(id=f"s{i}", index=i, kind="model", name="m", input={"messages": [{"role": "user", "content": text}]},
             output={"role": "assistant", "content": text}, usage=usage)
        for i in range(40)
    ]  # fmt: skip
    t = Trajectory(id=str(uuid.UUID(int=7)), agent="a", task="t", steps=steps, output="ok")

    class Batches(Collect):
        def __init__(self) -> None:
            super().__init__()
            self.sizes: list[int] = []

        def export(self, spans: Any) -> SpanExportResult:
            self.sizes.append(len(encode_spans(list(spans)).SerializeToString()))
            return super().export(spans)

    sent = Batches()
    result = replay([t, t], span_exporter=sent, capture_content=True, batch_bytes=500_000)
    assert result.spans == len(sent.spans) == 82 and result.trajectories == 2
    assert len(sent.sizes) >= 8 and max(sent.sizes) <= 600_000, sent.sizes
    # Verdict events count too (a review, session 21: 59 root spans with long failing-test reasons
    # made one 4.8 MiB request).
    judged = [
        Trajectory(id=str(uuid.UUID(int=100 + i)), agent="a", task="t", output="no",
                   verdicts=[Verdict(passed=False, verifier="pytest", reason="E assert " * 10_000)])
        for i in range(12)
    ]  # fmt: skip
    events = Batches()
    replay(judged, span_exporter=events, capture_content=True, batch_bytes=500_000)
    assert len(events.sizes) >= 3 and max(events.sizes) <= 600_000, events.sizes
    chat = next(s for s in sent.spans if s.attributes.get("gen_ai.operation.name") == "chat")
    assert {k: chat.attributes[k] for k in chat.attributes if k.startswith("gen_ai.usage.")} == {
        "gen_ai.usage.input_tokens": 9,
        "gen_ai.usage.output_tokens": 4,
        "gen_ai.usage.cache_read.input_tokens": 7,
        "gen_ai.usage.cache_creation.input_tokens": 2,
        "gen_ai.usage.reasoning.output_tokens": 3,
    }


# -- live export, endpoint down ------------------------------------------------------------------


def test_live_export_to_a_dead_endpoint_neither_blocks_nor_raises(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    dead = f"http://127.0.0.1:{free_port()}"
    handler = honed.instrument(store=sqlite_url, otlp=dead)
    try:
        agent = create_agent(ToolScriptModel(), make_tools(), name="calc")
        started = time.perf_counter()
        for i in range(5):
            agent.invoke({"messages": [("user", ADD)]}, config={"metadata": {"honed": {"task_id": f"d{i}"}}})
        assert honed.flush()
        elapsed = time.perf_counter() - started
        recorder = handler.recorder
        (exporter,) = recorder.exporters
        assert isinstance(exporter, LiveExporter)
        # The same call again (a notebook cell run twice) is the same recorder and exporter: each
        # made another recorder, store process and exporter (a QA pass, session 19).
        assert honed.instrument(store=sqlite_url, otlp=dead).recorder is recorder
        # A burst far beyond the queue: export only enqueues (oldest dropped), it never waits.
        burst = honed.open_store(sqlite_url).trajectories() * 300
        started = time.perf_counter()
        exporter.export(burst)
        assert time.perf_counter() - started < 10.0
    finally:
        honed.uninstrument()
    assert elapsed < 5.0
    assert honed.open_store(sqlite_url).count() == 5
    started = time.perf_counter()
    exporter.shutdown()  # what the recorder does at exit: one export timeout at most, then drops
    assert time.perf_counter() - started < 8.0
    stats = exporter.stats()
    # Each trajectory queued, or (no room left) left out whole and counted.
    assert (
        stats["trajectories"] + stats["trajectories_unqueued"] == 5 + len(burst)
        and stats["spans_exported"] == 0
    )
    assert stats["spans_failed"] + stats["spans_dropped"] > 0
    # The spans lost to the dead endpoint show in `honed.stats()` (they went unseen before).
    lost = stats["spans_failed"] + stats["spans_dropped"]
    assert recorder.stats()["export_errors"] == lost and recorder.stats()["trajectories_written"] == 5


def test_live_batches_with_content_stay_under_a_receivers_message_limit() -> None:
    """A QA pass (session 16): the batch processor hands 512 spans at once; with content, 6 MB
    that a gRPC receiver refused (4 MiB), and the breaker then dropped the batches after it: 52
    of 2,100 spans arrived, and nothing said so. Live batches are sent in parts, as replay's."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    class FourMiB(Collect):  # gRPC's default limit, as the Collector has it
        def export(self, spans: Any) -> SpanExportResult:
            if len(encode_spans(list(spans)).SerializeToString()) > 4 * 2**20:
                return SpanExportResult.FAILURE
            return super().export(spans)

    text = "lorem ipsum dolor sit amet " * 1_500  # 40 KB
    steps = [
        Step(id=f"s{i}", index=i, kind="model", name="m", input={"messages": [{"role": "user", "content": text}]},
             output={"role": "assistant", "content": text})
        for i in range(6)
    ]  # fmt: skip
    runs = [
        Trajectory(id=str(uuid.UUID(int=i + 1)), agent="a", task="t", steps=steps, output="ok")
        for i in range(60)
    ]
    sink = FourMiB()
    exporter = LiveExporter(span_exporter=sink, capture_content=True, schedule_delay_millis=60_000)
    exporter.export(runs)
    assert exporter.force_flush()
    exporter.shutdown()
    assert len(sink.spans) == 60 * 7 and exporter.stats()["spans_failed"] == 0


def test_live_export_faster_than_its_endpoint_leaves_whole_traces_out_and_counts_them() -> None:
    """A QA pass (session 17): with the endpoint slower than the agents, the SDK's queue dropped
    its oldest spans silently (3,303 of 3,500 arrived, traces without their root, and
    `export_errors` said 0). A trajectory without room is now left out whole, and counted."""
    import threading

    release = threading.Event()

    class Slow(Collect):
        def export(self, spans: Any) -> SpanExportResult:
            release.wait(30)
            return super().export(spans)

    steps = [Step(id=f"s{i}", index=i, kind="model", name="m", output={"role": "assistant", "content": "x"})
             for i in range(6)]  # fmt: skip
    runs = [
        Trajectory(id=str(uuid.UUID(int=i + 1)), agent="a", task="t", steps=steps, output="ok")
        for i in range(400)
    ]
    sink = Slow()
    exporter = LiveExporter(span_exporter=sink)
    exporter.export(runs)
    release.set()
    assert exporter.force_flush()
    exporter.shutdown()
    stats = exporter.stats()
    assert stats["spans_unqueued"] > 0 and stats["spans_dropped"] == stats["spans_unqueued"]
    assert len(sink.spans) + stats["spans_unqueued"] == 400 * 7
    per_trace: dict[int, int] = {}
    for span in sink.spans:
        per_trace[span.context.trace_id] = per_trace.get(span.context.trace_id, 0) + 1
    assert set(per_trace.values()) == {7}  # whole trajectories, each with its root


# -- a real backend: Arize Phoenix -------------------------------------------------------------------


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PhoenixServer]:
    if not phoenix_installed():
        pytest.skip("arize-phoenix is not installed (pip install arize-phoenix)")
    with PhoenixServer(tmp_path_factory.mktemp("phoenix")) as server:
        yield server


def phoenix_tree(spans: list[dict[str, Any]]) -> dict[str, list[str]]:
    """span name → sorted names of its children, from Phoenix's `parent_id`s."""
    by_id = {s["context"]["span_id"]: s for s in spans}
    tree: dict[str, list[str]] = {s["name"]: [] for s in spans}
    for span in spans:
        parent = by_id.get(span["parent_id"] or "")
        if parent is not None:
            tree[parent["name"]].append(span["name"])
    return {name: sorted(children) for name, children in tree.items()}


def test_live_instrument_to_phoenix_then_replay_adds_only_new_verdicts(
    phoenix: PhoenixServer, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = f"live-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("HONED_OTLP_PROJECT", project)
    handler = honed.instrument(store=sqlite_url, otlp=phoenix.http_url)
    try:
        agent = create_agent(ToolScriptModel(), make_tools(), name="calc")
        agent.invoke({"messages": [("user", ADD)]}, config={"metadata": {"honed": {"task_id": "live-ok"}}})
        with pytest.raises(ValueError):
            agent.invoke(
                {"messages": [("user", EXPLODE)]}, config={"metadata": {"honed": {"task_id": "live-boom"}}}
            )
        assert honed.flush()
    finally:
        honed.uninstrument()
    (exporter,) = handler.recorder.exporters
    assert exporter.force_flush()
    store = honed.open_store(sqlite_url)
    trajectories = store.trajectories()
    expected = sum(len(t.steps) + 1 for t in trajectories)
    spans = phoenix.wait_for_spans(project, expected)
    assert len(spans) == expected and exporter.stats()["spans_exported"] == expected

    ok = next(t for t in trajectories if t.task_id == "live-ok")
    ok_spans = [s for s in spans if s["context"]["trace_id"] == uuid.UUID(ok.id).hex]
    assert phoenix_tree(ok_spans)["invoke_agent calc"] == ["model", "model", "tools"]
    assert phoenix_tree(ok_spans)["tools"] == ["execute_tool add"]
    assert phoenix_tree(ok_spans)["model"] == ["chat tool-script", "chat tool-script"]  # both model nodes
    named = {s["name"]: s for s in ok_spans}
    root, chat, tool = named["invoke_agent calc"], named["chat tool-script"], named["execute_tool add"]
    assert root["parent_id"] is None and root["span_kind"] == "AGENT"
    assert (
        root["attributes"]["gen_ai.agent.name"] == "calc" and root["attributes"]["honed.task.id"] == "live-ok"
    )
    assert chat["span_kind"] == "LLM" and chat["attributes"]["honed.model_version"] == "tool-script"
    assert chat["attributes"]["gen_ai.operation.name"] == "chat"
    # One call asked for the tool, the other answered.
    assert sorted(
        s["attributes"]["gen_ai.response.finish_reasons"][0]
        for s in ok_spans
        if s["name"] == "chat tool-script"
    ) == ["stop", "tool_calls"]
    assert tool["span_kind"] == "TOOL" and tool["attributes"]["gen_ai.tool.call.id"] == "call_0_add"
    assert "gen_ai.input.messages" not in chat["attributes"]  # content stays off by default
    boom_root = next(s for s in spans if s["name"] == "invoke_agent calc" and s["status_code"] == "ERROR")
    assert boom_root["attributes"]["error.type"] == "ValueError"

    # A verifier judges after the live export; replaying everything adds the verdict, nothing twice.
    store.add_verdict(ok.id, Verdict(passed=True, score=1.0, reason="sum is right", verifier="reference"))
    result = CliRunner().invoke(
        app, ["export", "otlp", "--store", sqlite_url, "--endpoint", phoenix.http_url, "--project", project]
    )
    assert result.exit_code == 0, result.output
    assert f"sent {expected + 1} spans of 2 trajectories" in result.output
    spans = phoenix.wait_for_spans(project, expected + 1)
    time.sleep(1.0)  # anything duplicated would land by now
    spans = phoenix.spans(project)
    assert len(spans) == expected + 1
    assert len({s["context"]["span_id"] for s in spans}) == len(spans)
    (verdict,) = [s for s in spans if s["name"] == "verdict reference"]
    assert verdict["parent_id"] == root["context"]["span_id"]
    assert verdict["attributes"]["honed.verdict.passed"] is True
    exporter.shutdown()


def test_replay_over_grpc_with_content_and_verdicts(phoenix: PhoenixServer, captured: str) -> None:
    store = honed.open_store(captured)
    ok = one(captured, "t-add")
    store.add_verdict(ok.id, Verdict(passed=True, score=1.0, verifier="reference"))
    project = f"grpc-{uuid.uuid4().hex[:8]}"
    trajectories = list(select_trajectories(store, include_heldout=True))
    result = replay(trajectories, phoenix.grpc_url, protocol="grpc", project=project, capture_content=True)
    assert result.trajectories == 2 and result.spans == sum(
        len(t.steps) + 1 + len(t.verdicts) for t in trajectories
    )
    spans = phoenix.wait_for_spans(project, result.spans)
    assert len(spans) == result.spans
    root = next(
        s for s in spans if s["context"]["trace_id"] == uuid.UUID(ok.id).hex and s["parent_id"] is None
    )
    assert root["attributes"]["honed.verdict.outcome"] == "pass"
    assert root["attributes"]["honed.verdict.reference.passed"] is True
    assert [e["name"] for e in root["events"]] == ["gen_ai.evaluation.result"]
    assert root["events"][0]["attributes"]["gen_ai.evaluation.name"] == "reference"
    tool = next(s for s in spans if s["name"] == "execute_tool add")
    assert json.loads(tool["attributes"]["gen_ai.tool.call.arguments"]) == {"a": 2, "b": 3}
    chat = next(s for s in spans if s["name"] == "chat tool-script")
    assert json.loads(chat["attributes"]["gen_ai.input.messages"])[0]["role"] == "system"


def test_replay_reads_the_standard_otel_variables(
    phoenix: PhoenixServer, captured: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    service = f"env-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", phoenix.http_url)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_SERVICE_NAME", service)
    monkeypatch.delenv("HONED_OTLP_PROJECT", raising=False)
    result = CliRunner().invoke(app, ["export", "otlp", "--store", captured, "--task-id", "t-boom", "--json"])
    assert result.exit_code == 0, result.output
    sent = json.loads(result.output)
    assert sent["trajectories"] == 1
    spans = phoenix.wait_for_spans(service, sent["spans"])
    assert {s["name"] for s in spans} >= {"invoke_agent calc", "execute_tool explode"}


def test_replay_to_a_dead_endpoint_fails_with_a_clear_message(
    captured: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    dead = f"http://ingest:s3cr3t-t0ken@127.0.0.1:{free_port()}"  # its token never printed
    result = CliRunner().invoke(app, ["export", "otlp", "--store", captured, "--endpoint", dead])
    assert result.exit_code == 1
    # The cause, not the batch's size (a QA pass, session 20: it suggested --batch-mib).
    assert "cannot connect to" in result.output and "Connection refused" in result.output, result.output
    assert "--batch-mib" not in result.output
    assert "s3cr3t" not in result.output and "ingest:***@127.0.0.1" in result.output


def test_a_conversation_turn_carries_the_thread_as_gen_ai_conversation_id(sqlite_url: str) -> None:
    from langgraph.checkpoint.memory import InMemorySaver

    agent = create_agent(ToolScriptModel(), make_tools(), name="chat", checkpointer=InMemorySaver())
    handler = honed.CallbackHandler(store=sqlite_url)
    for text in ("answer hi", ADD):
        agent.invoke(
            {"messages": [("user", text)]}, {"callbacks": [handler], "configurable": {"thread_id": "c-9"}}
        )
    assert honed.flush()
    turns = honed.open_store(sqlite_url).trajectories(thread_id="c-9")
    roots = [by_name(spans_of(t))["invoke_agent chat"][0] for t in turns]
    assert [r.attributes["gen_ai.conversation.id"] for r in roots] == ["c-9", "c-9"]
    assert "gen_ai.conversation.id" not in spans_of(Trajectory(id="x", agent="a"))[0].attributes


@pytest.mark.parametrize("entry", ["middleware", "instrument"])
def test_a_providers_content_blocks_become_one_part_each_and_name_the_provider(
    sqlite_url: str, entry: str
) -> None:
    """An Anthropic-style reply (thinking, text, tool_use blocks beside `tool_calls`): each is one
    conventional part (reasoning, text, tool_call), not twice and not in the provider's shape
    (a thinking block's signature), and the provider is named whichever entry point captured it."""
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_core.outputs import ChatGeneration, ChatResult

    class Blocks(BaseChatModel):
        @property
        def _llm_type(self) -> str:
            return "anthropic-chat"

        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self

        def _generate(
            self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any
        ) -> ChatResult:
            if any(isinstance(m, ToolMessage) for m in messages):
                message = AIMessage([{"type": "text", "text": "The sum is 5."}])
            else:
                message = AIMessage(
                    [
                        {"type": "thinking", "thinking": "need add", "signature": "sig"},
                        {"type": "text", "text": "Let me add."},
                        {"type": "tool_use", "id": "toolu_1", "name": "add", "input": {"a": 2, "b": 3}},
                    ],
                    tool_calls=[{"name": "add", "args": {"a": 2, "b": 3}, "id": "toolu_1"}],
                )
            message.response_metadata = {"model_name": "claude-x"}
            return ChatResult(generations=[ChatGeneration(message=message)])

    middleware = [honed.Middleware(store=sqlite_url)] if entry == "middleware" else []
    if entry == "instrument":
        honed.instrument(store=sqlite_url)
    try:
        create_agent(Blocks(), make_tools(), name="claude", middleware=middleware).invoke(
            {"messages": [("user", "add")]}
        )
        assert honed.flush()
    finally:
        honed.uninstrument()
    (t,) = honed.open_store(sqlite_url).trajectories()
    chat = next(s for s in spans_of(t, capture_content=True) if s.name.startswith("chat"))
    assert chat.attributes["gen_ai.provider.name"] == "anthropic"
    (reply,) = json.loads(chat.attributes["gen_ai.output.messages"])
    assert [p["type"] for p in reply["parts"]] == ["reasoning", "text", "tool_call"]


def test_content_stays_sendable_and_faithful_when_capture_cut_or_a_conversation_is_long() -> None:
    """A QA pass (session 15): a message cut at the field cap became an empty *user* message; a
    conversation of 70 tool results of 60 KB made one 4 MiB attribute (refused over gRPC on every
    export); an agent a tool ran was a plain CHAIN span, not `invoke_agent`."""
    from honed.exporters.spans import MAX_CONTENT_BYTES

    cut = {"__truncated__": True, "type": "dict", "size": 99_000, "preview": '{"role":"tool","content":"xx'}
    big = [{"role": "tool", "content": "r" * 60_000, "tool_call_id": f"c{i}"} for i in range(70)]
    now = datetime(2026, 1, 1, tzinfo=UTC)
    steps = [
        Step(id="m1", index=0, kind="model", name="m", input={"messages": [{"role": "user", "content": "hi"}, cut]},
             output={"role": "assistant", "content": "ok"}, started_at=now, ended_at=now),
        Step(id="m2", index=1, kind="model", name="m", input={"messages": [{"role": "user", "content": "go"}, *big]},
             output={"role": "assistant", "content": "done"}, started_at=now, ended_at=now),
        Step(id="t1", index=2, kind="tool", name="ask_helper", input={}, output="x", started_at=now, ended_at=now),
        Step(id="n1", index=3, kind="node", name="helper", parent_id="t1", started_at=now, ended_at=now),
        Step(id="n2", index=4, kind="node", name="model", parent_id="n1", started_at=now, ended_at=now),
        Step(id="m5", index=5, kind="model", name="m", parent_id="n2", extra={"settings": {"_type": "anthropic-chat"}},
             output={"role": "assistant", "content": "42"}, started_at=now, ended_at=now),
    ]  # fmt: skip
    t = Trajectory(id=str(uuid.uuid4()), agent="boss", steps=steps, started_at=now, ended_at=now)
    spans = {s.attributes.get("honed.step.id"): s for s in spans_of(t, capture_content=True)}
    first = json.loads(spans["m1"].attributes["gen_ai.input.messages"])
    assert (
        first[1]["role"] == "tool"
        and first[1]["truncated"]
        and first[1]["parts"][0]["content"].startswith("{")
    )
    long = spans["m2"].attributes
    assert (
        len(long["gen_ai.input.messages"]) <= MAX_CONTENT_BYTES and long["honed.input.messages_dropped"] > 0
    )
    kept = json.loads(long["gen_ai.input.messages"])
    assert kept[-1]["parts"][0]["id"] == "c69"  # the latest messages are the ones kept
    # A QA pass (session 16): a reply whose only call was malformed was exported as empty.
    bad = {"role": "assistant", "content": "", "invalid_tool_calls": [
        {"name": "add", "args": '{"a": 2, "b": ', "id": "call_1", "error": "Unterminated JSON"}]}  # fmt: skip
    step = Step(id="m4", index=0, kind="model", name="m", input={"messages": [{"role": "user", "content": "2+3?"}]},
                output=bad, started_at=now, ended_at=now)  # fmt: skip
    t = Trajectory(id=str(uuid.uuid4()), agent="boss", steps=[step], started_at=now, ended_at=now)
    (chat,) = [s.attributes for s in spans_of(t, capture_content=True) if s.name.startswith("chat")]
    [part] = json.loads(chat["gen_ai.output.messages"])[0]["parts"]
    assert (part["type"], part["name"], part["arguments"]) == ("tool_call", "add", '{"a": 2, "b": ')
    # A QA pass (session 16): counted in characters, 40 results of 16,000 emoji (64 KB each) fit,
    # and made a 2.6 MB attribute; with tool definitions, a span over gRPC's 4 MiB limit.
    emoji = [{"role": "tool", "content": "\U0001f600" * 16_000, "tool_call_id": f"e{i}"} for i in range(40)]
    step = Step(
        id="m3", index=0, kind="model", name="m", input={"messages": emoji}, started_at=now, ended_at=now
    )
    t = Trajectory(id=str(uuid.uuid4()), agent="boss", steps=[step], started_at=now, ended_at=now)
    (attributes,) = [s.attributes for s in spans_of(t, capture_content=True) if s.name.startswith("chat")]
    assert len(attributes["gen_ai.input.messages"].encode()) <= MAX_CONTENT_BYTES
    assert attributes["honed.input.messages_dropped"] > 0
    helper = spans["n1"]
    assert (
        helper.name == "invoke_agent helper" and helper.attributes["gen_ai.operation.name"] == "invoke_agent"
    )
    # The conventions require the provider on an agent span (a QA pass, session 17: missing here).
    assert helper.attributes["gen_ai.provider.name"] == "anthropic"


def test_the_part_of_a_run_resumed_in_another_process_is_not_sent_live_as_a_trace_of_its_own() -> None:
    """A QA pass (session 15): resumed in another process, the part after the pause was sent live
    under its own trace id, without the task or the pause: a second, partial trace of the run."""
    from honed.capture.sinks import ExporterSink

    sent: list[Trajectory] = []

    class Keep:
        def export(self, trajectories: list[Trajectory]) -> None:
            sent.extend(trajectories)

    now = time.time()
    step = {"id": "s", "index": 0, "kind": "node", "started_at": now, "ended_at": now}
    base = {"agent": "a", "status": "ok", "started_at": now, "ended_at": now, "resumes": True}
    part = {**base, "id": "part", "steps": [{**step, "id": "r", "name": "resume"}]}
    whole = {
        **base,
        "id": "whole",
        "steps": [{**step, "id": "i", "name": "interrupt"}, {**step, "id": "r", "name": "resume"}],
    }
    ExporterSink(Keep()).write([part, whole, {**base, "id": "plain", "resumes": False, "steps": []}])
    assert [t.id for t in sent] == ["whole", "plain"]


def test_one_runs_undecodable_text_loses_no_other_run_sent_live() -> None:
    """A QA pass (session 19): a tool's error naming a file whose name is not UTF-8
    (`os.fsdecode(b"caf\\xe9")`: a lone surrogate) failed the SDK's encoding of the whole live batch:
    none of the 11 runs in it reached the receiver. Runs go out as the store holds them (U+FFFD)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from honed.capture.sinks import ExporterSink
    from honed.store import trajectory_to_record

    with otlp_receiver() as (url, received):
        runs = [
            Trajectory(id=str(uuid.UUID(int=i + 1)), agent="files", task="t", output="ok", steps=[
                Step(id=f"s{i}", index=0, kind="tool", name="open_report", input={"name": "q3"},
                     error="ValueError: cannot open caf\udce9-report.txt\x00" if i == 5 else None)])
            for i in range(11)
        ]  # fmt: skip
        exporter = LiveExporter(url, capture_content=True)
        ExporterSink(exporter).write([trajectory_to_record(t) for t in runs])
        assert exporter.force_flush()
        exporter.shutdown()
    roots, errors = set(), []
    for body in received:
        request = ExportTraceServiceRequest.FromString(body)
        for span in (s for r in request.resource_spans for ss in r.scope_spans for s in ss.spans):
            if not span.parent_span_id:
                roots.add(span.trace_id)
            if span.status.message:
                errors.append(span.status.message)
    assert len(roots) == 11 and exporter.stats()["spans_failed"] == 0
    assert errors == ["ValueError: cannot open caf\ufffd-report.txt\ufffd"], errors


def test_no_content_attribute_outgrows_a_span_though_the_capture_cap_was_raised() -> None:
    """A QA pass (session 20): with `HONED_MAX_FIELD_BYTES` past 4 MiB, a tool's 5 MB result
    (or task, or reply) went whole into one attribute, a span gRPC refuses on every export."""
    from honed.exporters.spans import MAX_CONTENT_BYTES

    now = datetime(2026, 1, 1, tzinfo=UTC)
    huge = "\u00e9" * (3 << 20)  # 6 MiB of UTF-8
    steps = [
        Step(id="t1", index=0, kind="tool", name="read", input={"path": huge}, output=huge,
             started_at=now, ended_at=now),
        Step(id="m1", index=1, kind="model", name="m", input={"messages": [{"role": "user", "content": "hi"}]},
             output={"role": "assistant", "content": huge}, started_at=now, ended_at=now),
    ]  # fmt: skip
    t = Trajectory(id=str(uuid.uuid4()), agent="a", task=huge, steps=steps, started_at=now, ended_at=now)
    spans = list(spans_of(t, capture_content=True))
    sizes = [len(v.encode()) for s in spans for v in s.attributes.values() if isinstance(v, str)]
    assert max(sizes) <= MAX_CONTENT_BYTES
    tool = next(s for s in spans if s.attributes.get("honed.step.id") == "t1")
    assert set(tool.attributes["honed.truncated_attributes"]) == {
        "gen_ai.tool.call.arguments",
        "gen_ai.tool.call.result",
    }
    assert tool.attributes["gen_ai.tool.call.result"] == "\u00e9" * (MAX_CONTENT_BYTES // 2)
    # A verdict's 5 MB reason: cut on its span, shorter on the root span's event (a review, session 21:
    # the root span was 4.9 MiB).
    from honed.exporters.spans import EVENT_CONTENT_BYTES

    judged = Trajectory(id=str(uuid.uuid4()), agent="a", task="hi", started_at=now, ended_at=now,
                        verdicts=[Verdict(passed=False, verifier="pytest", reason=huge)])  # fmt: skip
    root = next(s for s in spans_of(judged, capture_content=True) if s.parent is None)
    (event,) = [e for e in root.events if e.name == "gen_ai.evaluation.result"]
    assert len(event.attributes["gen_ai.evaluation.explanation"].encode()) <= EVENT_CONTENT_BYTES
    small = next(s for s in spans_of(Trajectory(id=str(uuid.uuid4()), agent="a", task="hi", started_at=now,
                                                 ended_at=now), capture_content=True))  # fmt: skip
    assert "honed.truncated_attributes" not in small.attributes


def test_an_endpoint_or_header_that_cannot_work_is_refused_before_anything_is_sent(
    captured: str, sqlite_url: str
) -> None:
    """A QA pass (session 26): `localhost:4317` (the usual gRPC form) tried TLS against a plaintext
    receiver, `not a url` and a timeout of 0 were taken, and each failed on every batch with a
    message about batch sizes; `--header x-tags=a,b` arrived as `x-tags: a`, `--header novalue`
    vanished, and the command said it sent."""
    runner = CliRunner()
    for args in (
        ["--endpoint", "localhost:4317", "--protocol", "grpc"],
        ["--endpoint", "not a url"],
        ["--endpoint", "http://localhost:4318", "--timeout", "0"],
        ["--endpoint", "http://localhost:4318", "--header", "novalue"],
    ):
        result = runner.invoke(app, ["export", "otlp", "--store", captured, *args])
        assert result.exit_code == 2, (args, result.output)
        assert "Invalid value" in result.output, result.output
    with pytest.raises(ValueError, match="not an OTLP endpoint"):
        honed.instrument(store=sqlite_url, otlp="localhost:4318")

    seen: list[dict[str, str]] = []
    with otlp_receiver(seen) as (url, _):
        args = [
            "--endpoint",
            url,
            "--header",
            "x-tags=a,b",
            "--header",
            "authorization=Bearer t=1",
            "--limit",
            "1",
        ]
        result = runner.invoke(app, ["export", "otlp", "--store", captured, *args])
        assert result.exit_code == 0, result.output
        # Sent where the variable says: named so (it said "the endpoint in OTEL_EXPORTER_OTLP_*").
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": url}
        result = runner.invoke(app, ["export", "otlp", "--store", captured, "--limit", "1"], env=env)
        assert result.exit_code == 0 and f"to {url}" in result.output, result.output
    assert seen and seen[0]["x-tags"] == "a,b" and seen[0]["authorization"] == "Bearer t=1"
