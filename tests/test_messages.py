"""honed.messages: one set of conversion rules between LangChain messages, the stored form, OpenAI
chat and chat templates. The last section holds one test per rule that used to differ between
the copies this module replaced."""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from honed.learn.datasets import _normalised_example
from honed.messages import (
    MessageError,
    NotExportable,
    chat_example,
    completion_trajectory,
    content_text,
    dump_arguments,
    langchain_message,
    langchain_messages,
    openai_message,
    openai_messages,
    openai_tool_call,
    request_text,
    stored_message,
    template_messages,
)
from honed.serving.protocol import BadRequest, assistant_dict, parse_chat_request
from honed.trajectory import Step, Trajectory

TRUNCATED = {"__truncated__": True, "type": "str", "size": 10**6, "sha256": "0" * 64, "preview": "..."}


def conversation() -> list[BaseMessage]:
    return [
        SystemMessage("You add numbers."),
        HumanMessage("What is 2 + 3, and 1 + 1?"),
        AIMessage(
            content="",
            tool_calls=[
                {"name": "add", "args": {"a": 2, "b": 3}, "id": "c1"},
                {"name": "add", "args": {"a": 1, "b": 1, "note": "Zürich"}, "id": "c2"},
            ],
            additional_kwargs={"reasoning_content": "Two sums."},
        ),
        ToolMessage("5", tool_call_id="c1", name="add"),
        ToolMessage("2", tool_call_id="c2", name="add"),
        AIMessage("5 and 2.", additional_kwargs={"reasoning_content": "Done."}),
    ]


def essentials(message: BaseMessage) -> dict[str, Any]:
    """What a round trip must keep."""
    out: dict[str, Any] = {"type": message.type, "content": message.content}
    if isinstance(message, AIMessage):
        out["tool_calls"] = [(c["name"], c["args"], c["id"]) for c in message.tool_calls]
        out["invalid"] = [(c["name"], c["args"]) for c in message.invalid_tool_calls]
        out["reasoning"] = message.additional_kwargs.get("reasoning_content")
    if isinstance(message, ToolMessage):
        out["tool_call_id"] = message.tool_call_id
    return out


def trajectory_of(messages: list[dict[str, Any]], reply: dict[str, Any], tools: Any = None) -> Trajectory:
    model_input: dict[str, Any] = {"messages": messages}
    if tools is not None:
        model_input["tools"] = tools
    step = Step(id="s0", index=0, kind="model", name="m", input=model_input, output=reply)
    return Trajectory(id="t-1", agent="a", steps=[step])


# -- round trips -------------------------------------------------------------------------------


def test_langchain_to_stored_to_openai_to_langchain_keeps_the_conversation() -> None:
    messages = conversation()
    stored = [stored_message(m) for m in messages]
    wire = json.loads(json.dumps([openai_message(m) for m in stored]))  # through JSON, as on the wire
    back = [langchain_message(m) for m in wire]
    assert [essentials(m) for m in back] == [essentials(m) for m in messages]

    assistant = wire[2]
    assert assistant["tool_calls"][1] == {
        "id": "c2",
        "type": "function",
        "function": {"name": "add", "arguments": '{"a": 1, "b": 1, "note": "Zürich"}'},
    }
    assert assistant["reasoning_content"] == "Two sums."
    assert wire[3] == {"role": "tool", "tool_call_id": "c1", "content": "5"}
    # LangChain → OpenAI directly is the same as through the store.
    assert [openai_message(m) for m in messages] == wire


def test_stored_to_langchain_keeps_tool_errors_and_names() -> None:
    message = ToolMessage("boom", tool_call_id="c9", name="explode", status="error")
    back = langchain_message(stored_message(message))
    assert isinstance(back, ToolMessage)
    assert (back.tool_call_id, back.name, back.status, back.content) == ("c9", "explode", "error", "boom")


def test_template_form_is_the_openai_form_with_argument_objects() -> None:
    messages = conversation()
    rendered = template_messages(messages)
    wire = [openai_message(m) for m in messages]
    assert rendered[3]["name"] == "add"
    for template, openai in zip(rendered, wire, strict=True):
        calls = openai.pop("tool_calls", None)
        if calls:
            assert [c["function"]["arguments"] for c in template.pop("tool_calls")] == [
                json.loads(c["function"]["arguments"]) for c in calls
            ]
        template.pop("name", None)  # the template form keeps tool names (some templates show them)
        assert template == openai


def test_chat_example_round_trips_a_captured_conversation() -> None:
    stored = [stored_message(m) for m in conversation()]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    example = chat_example(trajectory_of(stored[:-1], stored[-1], tools), reasoning=True)
    assert example["tools"] == tools
    assert [essentials(langchain_message(m)) for m in example["messages"]] == [
        essentials(m) for m in conversation()
    ]
    plain = chat_example(trajectory_of(stored[:-1], stored[-1]))
    assert "tools" not in plain and not any("reasoning_content" in m for m in plain["messages"])


def test_tool_results_without_ids_answer_the_calls_before_them_in_order() -> None:
    """TRL-style data has no ids: calls get `call_<message>_<index>`, and each result answers the
    earliest unanswered call before it, the order chat templates assume."""

    def add(a: int, b: int, **call: Any) -> dict[str, Any]:
        return {**call, "type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}

    trl = [
        {"role": "user", "content": "2+3 and 1+1?"},
        {"role": "assistant", "content": "", "tool_calls": [add(2, 3), add(1, 1)]},
        {"role": "tool", "content": "5"},
        {"role": "tool", "content": "2"},
        {"role": "assistant", "content": "5 and 2."},
    ]
    rows = openai_messages(trl)
    assert [c["id"] for c in rows[1]["tool_calls"]] == ["call_1_0", "call_1_1"]
    assert [rows[2]["tool_call_id"], rows[3]["tool_call_id"]] == ["call_1_0", "call_1_1"]
    back = langchain_messages(trl)
    assert [m.tool_call_id for m in back[2:4]] == ["call_1_0", "call_1_1"]  # type: ignore[attr-defined]

    named = [trl[0], {**trl[1], "tool_calls": [add(2, 3, id="c1"), add(1, 1, id="c2")]}]
    rows = openai_messages([*named, {"role": "tool", "tool_call_id": "c2", "content": "2"}, trl[2]])
    assert [rows[2]["tool_call_id"], rows[3]["tool_call_id"]] == ["c2", "c1"]

    with pytest.raises(MessageError) as error:
        openai_messages([*trl[:4], {"role": "tool", "content": "?"}])  # nothing left to answer
    assert (error.value.reason, error.value.index) == ("missing_tool_call_id", 4)


# -- odd inputs --------------------------------------------------------------------------------


def test_content_blocks_flatten_to_text_and_reasoning() -> None:
    message = AIMessage(
        content=[
            {"type": "reasoning", "reasoning": "first"},
            {"type": "text", "text": "The answer "},
            "is ",
            {"type": "reasoning", "reasoning": "second"},
            {"type": "text", "text": "5."},
        ]
    )
    assert openai_message(message) == {
        "role": "assistant",
        "content": "The answer is 5.",
        "reasoning_content": "first\nsecond",
    }
    assert stored_message(HumanMessage([{"type": "text", "text": "a"}, "b"]))["content"] == "ab"


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}],
        [{"type": "image", "url": "https://example.com/cat.png"}],
        [{"text": "a block with no type"}],
        42,
        {"text": "a dict, not a list"},
    ],
)
def test_content_that_is_not_text_is_an_error_never_dropped(content: Any) -> None:
    with pytest.raises(MessageError) as error:
        openai_message({"role": "user", "content": content})
    assert error.value.reason == "non_text_content" and error.value.field == "content"
    with pytest.raises(MessageError):
        content_text(content)
    if isinstance(content, list):
        with pytest.raises(MessageError):
            template_messages([HumanMessage(content)])
        assert stored_message(HumanMessage(content))["content"] == content  # the store keeps it whole


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{bad"}},
            "not valid JSON",
        ),
        ({"id": "c1", "type": "function", "function": {"name": "add", "arguments": "[1, 2]"}}, "JSON object"),
        ({"id": "c1", "type": "function", "function": {"arguments": "{}"}}, '"name"'),
        ({"id": "c1", "type": "function", "function": {"name": "", "arguments": "{}"}}, '"name"'),
    ],
)
def test_malformed_tool_calls_from_a_client_become_invalid_tool_calls(
    call: dict[str, Any], error: str
) -> None:
    message = langchain_message({"role": "assistant", "content": "", "tool_calls": [call]})
    assert isinstance(message, AIMessage) and message.tool_calls == []
    [bad] = message.invalid_tool_calls
    assert bad["id"] == "c1" and error in bad["error"]
    assert bad["args"] == call["function"]["arguments"]
    # Written back, the model is shown what it said, inside the tags it uses (with its name).
    head = (
        f'{{"name": {json.dumps(bad["name"])}, "arguments": {bad["args"]}}}' if bad["name"] else bad["args"]
    )
    assert openai_message(message)["content"] == f"<tool_call>\n{head}\n</tool_call>"


def test_malformed_tool_calls_in_stored_data_are_not_exported() -> None:
    for args in ("{bad", [1, 2], TRUNCATED):
        reply = {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "args": args, "id": "c"}]}
        with pytest.raises(NotExportable) as skipped:
            chat_example(trajectory_of([{"role": "user", "content": "hi"}], reply))
        assert skipped.value.reason == ("truncated" if args is TRUNCATED else "malformed_tool_call")


@pytest.mark.parametrize(
    ("message", "reason", "field"),
    [
        ({"role": "critic", "content": "x"}, "unknown_role_critic", "role"),
        ({"content": "x"}, "unknown_role_None", "role"),
        ({"role": "tool", "content": "5"}, "missing_tool_call_id", "tool_call_id"),
        ({"role": "user", "content": TRUNCATED}, "truncated", "content"),
        (TRUNCATED, "truncated", None),
        ("just text", "malformed_message", None),
    ],
)
def test_messages_that_break_a_rule_say_which(message: Any, reason: str, field: str | None) -> None:
    with pytest.raises(MessageError) as error:
        openai_message(message)
    assert (error.value.reason, error.value.field) == (reason, field)


def test_the_server_names_the_offending_field() -> None:
    def param(message: dict[str, Any]) -> str | None:
        with pytest.raises(BadRequest) as error:
            parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "hi"}, message]})
        return error.value.param

    assert (
        param({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}) == "messages[1].content"
    )
    assert param({"role": "tool", "content": "5"}) == "messages[1].tool_call_id"
    assert param({"role": "critic", "content": "x"}) == "messages[1].role"
    assert param({"role": "user", "content": 42}) == "messages[1].content"


# -- rules that used to drift between copies ----------------------------------------------------


def test_roles_one_map_everywhere() -> None:
    """Was: the store wrote a ChatMessage's role as "chat", the template turned a FunctionMessage
    into "user" and passed unknown roles through (Qwen3 then drops the turn), the exporter and
    external rows kept "developer" (which Qwen3 drops too)."""
    assert stored_message(ChatMessage(role="user", content="hi"))["role"] == "user"
    assert template_messages([ChatMessage(role="user", content="hi")])[0]["role"] == "user"
    assert stored_message(FunctionMessage(name="f", content="x"))["role"] == "tool"
    with pytest.raises(MessageError, match="tool_call_id"):
        template_messages([FunctionMessage(name="f", content="x")])
    with pytest.raises(MessageError, match="unknown role"):
        template_messages([ChatMessage(role="critic", content="x")])
    developer = {"role": "developer", "content": "Be terse."}
    assert openai_message(developer) == {"role": "system", "content": "Be terse."}
    assert isinstance(langchain_message(developer), SystemMessage)
    row = _normalised_example({"messages": [developer, {"role": "user", "content": "hi"}]}, 0)
    assert row["messages"][0]["role"] == "system"


def test_reasoning_blocks_are_exported_not_skipped_and_joined_the_same_way() -> None:
    """Was: the exporter skipped such a reply as non_text_content, the template joined the parts
    with "" while the store joined them with "\\n", the server's reply dropped them."""
    reply = AIMessage(
        content=[
            {"type": "reasoning", "reasoning": "r1"},
            {"type": "reasoning", "reasoning": "r2"},
            {"type": "text", "text": "ok"},
        ]
    )
    stored = stored_message(reply)
    assert stored["reasoning"] == "r1\nr2"
    example = chat_example(trajectory_of([{"role": "user", "content": "hi"}], stored), reasoning=True)
    assert example["messages"][1] == {"role": "assistant", "content": "ok", "reasoning_content": "r1\nr2"}
    assert template_messages([reply])[0]["reasoning_content"] == "r1\nr2"
    assert assistant_dict(reply) == {"role": "assistant", "content": "ok", "reasoning_content": "r1\nr2"}


def test_anthropic_thinking_blocks_are_reasoning_in_the_store_too() -> None:
    """Was: only the template read `thinking` blocks; the store lost them."""
    message = AIMessage(content=[{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "ok"}])
    assert stored_message(message)["reasoning"] == "hmm"
    assert template_messages([message])[0] == {
        "role": "assistant",
        "content": "ok",
        "reasoning_content": "hmm",
    }


def test_an_invalid_tool_call_is_written_back_the_same_way_everywhere() -> None:
    """Was: the exporter dropped it (an empty assistant turn), the server appended the bare
    arguments, the template wrapped them in <tool_call> tags."""
    raw = '<tool_call>\n{"name": "add", "arguments": {"a": 2,}\n</tool_call>'
    local = AIMessage(content="", invalid_tool_calls=[{"name": None, "args": raw, "id": "c1", "error": "x"}])
    other = AIMessage(
        content="Let me add.", invalid_tool_calls=[{"name": "add", "args": "{bad", "id": "c2", "error": "x"}]
    )
    # The call as the template writes one, its name kept (a QA pass, session 16: only the
    # arguments were written, and the function the model called was lost).
    named = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {bad}\n</tool_call>'
    for message, text in ((local, raw), (other, named)):
        exported = chat_example(trajectory_of([{"role": "user", "content": "hi"}], stored_message(message)))
        assert exported["messages"][1] == {"role": "assistant", "content": text}
        assert template_messages([message])[0]["content"] == text
        assert assistant_dict(message)["content"] == text


def test_tool_call_arguments_must_be_an_object_in_every_copy() -> None:
    """Was: the exporter and external rows wrote string arguments verbatim ("{bad", "" — not
    JSON), GRPO's completion reader kept them as a string in `tool_calls`; the server's reader
    already made them invalid_tool_calls."""
    empty = {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "args": "", "id": "c"}]}
    assert openai_message(empty)["tool_calls"][0]["function"]["arguments"] == "{}"
    bad = {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{bad"}}
    with pytest.raises(ValueError, match="external example 3, message 0"):
        _normalised_example({"messages": [{"role": "assistant", "content": "", "tool_calls": [bad]}]}, 3)
    t = completion_trajectory(
        "q", [{"role": "assistant", "content": "", "tool_calls": [{"function": bad["function"]}]}]
    )
    assert t.steps[0].tool_calls == []
    assert t.steps[0].output["invalid_tool_calls"][0]["args"] == "{bad"


def test_a_tool_result_needs_its_call_id() -> None:
    """Was: the exporter wrote `"tool_call_id": ""`, external rows left the key out, the server
    refused the message. Now a result without an id answers the earliest unanswered call before
    it (see above), and one with no call to answer is an error everywhere."""
    reply = {"role": "assistant", "content": "5"}
    history = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "5"}]
    with pytest.raises(NotExportable) as skipped:
        chat_example(trajectory_of(history, reply))
    assert skipped.value.reason == "missing_tool_call_id"


def test_a_served_reply_with_content_blocks_keeps_its_text() -> None:
    """Was: the server answered "" for any non-string content."""
    assert assistant_dict(AIMessage(content=[{"type": "text", "text": "hello"}]))["content"] == "hello"
    called = AIMessage(content="", tool_calls=[{"name": "w", "args": {}, "id": "c"}])
    assert assistant_dict(called)["content"] is None  # OpenAI's API writes null beside tool calls


def test_an_image_is_refused_by_the_template_as_by_the_server() -> None:
    """Was: the template dropped the image and rendered "look"; the server and the exporter refused."""
    content = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(MessageError, match="image_url"):
        template_messages([HumanMessage(content)])


def test_request_text_is_the_last_user_message_as_text() -> None:
    """Was four readings: the report and `honed trajectories show` took the last message of any
    role, the training cycle returned None for text blocks, the judge dumped them as JSON, GRPO's
    completion reader took the first user message."""
    task = {
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "earlier"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "later"},
        ]
    }
    assert request_text(task) == "ab"
    assert request_text({"messages": [("human", "hi"), ("ai", "hello")]}) == "hi"
    assert request_text({"messages": [{"type": "human", "content": "hi"}]}) == "hi"
    assert request_text({"messages": ["hi"]}) == "hi"
    assert request_text("plain") == "plain"
    assert request_text({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}) is None
    assert request_text({"question": "no messages"}) is None
    prompt = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "x"},
        task["messages"][2],
    ]
    assert completion_trajectory(prompt, "answer").task == "ab"


def test_non_ascii_arguments_are_written_as_templates_write_them() -> None:
    """Was: the local model's streamed tool-call chunks escaped non-ASCII (`json.dumps`), its
    whole replies, the exporter and the demos did not."""
    assert dump_arguments({"city": "Zürich"}) == '{"city": "Zürich"}'
    call = openai_tool_call({"name": "weather", "args": {"city": "Zürich"}, "id": "c"})
    assert call["function"]["arguments"] == '{"city": "Zürich"}'


def test_external_rows_read_reasoning_under_either_key() -> None:
    """Was: external rows kept only `reasoning_content`; the server also read `reasoning`."""
    row = _normalised_example({"messages": [{"role": "assistant", "content": "x", "reasoning": "r"}]}, 0)
    assert row["messages"][0] == {"role": "assistant", "content": "x", "reasoning_content": "r"}


def test_completion_content_blocks_are_read_as_text() -> None:
    """Was: GRPO's completion reader turned list content into an empty answer."""
    t = completion_trajectory(
        "q", [{"role": "assistant", "content": [{"type": "text", "text": "<think>s</think>5"}]}]
    )
    assert t.output == "5" and t.steps[0].reasoning == "s"


def test_a_streamed_reply_says_what_the_whole_reply_says() -> None:
    """Was: a malformed call that had a name streamed as a tool call whose arguments were the raw
    `<tool_call>` text, and the raw text of a nameless one was glued to the content without the
    newline the whole reply puts there."""
    from langchain_core.messages import AIMessageChunk

    from honed.serving.protocol import chunk_delta

    good = {"name": "add", "args": {"a": 2, "b": 3}, "id": "c1"}
    named = '<tool_call>\n{"name": "add", "arguments": [1]}\n</tool_call>'
    nameless = "<tool_call>\n{not json}\n</tool_call>"
    whole = AIMessage(
        content="Let me add.",
        tool_calls=[good],
        invalid_tool_calls=[
            {"name": "add", "args": named, "id": "c2", "error": "x"},
            {"name": None, "args": nameless, "id": "c3", "error": "x"},
        ],
    )
    chunks = [
        AIMessageChunk(content="Let me"),
        AIMessageChunk(content=" add."),
        AIMessageChunk(
            content="",
            tool_call_chunks=[
                {
                    "type": "tool_call_chunk",
                    "name": "add",
                    "args": dump_arguments(good["args"]),
                    "id": "c1",
                    "index": 0,
                },
                {"type": "tool_call_chunk", "name": "add", "args": named, "id": "c2", "index": 1},
                {"type": "tool_call_chunk", "name": None, "args": nameless, "id": "c3", "index": 2},
            ],
        ),
    ]
    text, calls, sent = "", [], False
    for chunk in chunks:
        delta = chunk_delta(chunk, text_sent=sent)
        sent = sent or bool(delta.get("content"))
        text += delta.get("content", "")
        calls += delta.get("tool_calls", [])
    expected = assistant_dict(whole)
    assert text == expected["content"] == f"Let me add.\n{named}\n{nameless}"
    assert [(c["id"], c["function"]) for c in calls] == [
        (c["id"], c["function"]) for c in expected["tool_calls"]
    ]


def test_a_streamed_reply_summed_up_keeps_its_role() -> None:
    """A QA pass (session 16): `AIMessageChunk`'s type is "AIMessageChunk": every step captured
    from `.stream` (each `stream: true` request to `honed serve`) was stored with that as its
    role, and a history holding a streamed reply made the local model raise."""
    from langchain_core.messages import AIMessageChunk, HumanMessageChunk, ToolMessageChunk

    from honed.messages import openai_message, stored_message, template_messages

    reply = AIMessageChunk("hel") + AIMessageChunk("lo")
    assert stored_message(reply)["role"] == "assistant" and openai_message(reply)["role"] == "assistant"
    history = [HumanMessageChunk("hi"), reply, ToolMessageChunk("5", tool_call_id="c1")]
    assert [m["role"] for m in template_messages(history)] == ["user", "assistant", "tool"]


def test_the_legacy_functions_are_read_as_tools() -> None:
    """A QA pass (session 16): `functions`/`function_call` (the API before `tools`) were accepted
    and ignored: they never reached the prompt, and the client silently got no call."""
    add = {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}
    body = {"model": "m", "messages": [{"role": "user", "content": "2+3?"}], "functions": [add],
            "function_call": {"name": "add"}}  # fmt: skip
    kwargs = parse_chat_request(body).call_kwargs
    assert kwargs["tools"] == [{"type": "function", "function": add}]
    assert kwargs["tool_choice"] == {"type": "function", "function": {"name": "add"}}
    with pytest.raises(BadRequest):
        parse_chat_request({**body, "functions": "add"})


def test_a_refused_field_is_the_one_the_client_sent_and_option_types_are_checked() -> None:
    """A QA pass (session 20, an attacker): a legacy `function_call` naming no function was
    refused as `tool_choice` (a field the client never sent); `parallel_tool_calls: "yes"` and
    `stream_options` without `stream` were accepted (OpenAI refuses both)."""
    add = {"name": "add", "parameters": {"type": "object", "properties": {}}}
    ask = {"model": "m", "messages": [{"role": "user", "content": "2+3?"}]}
    with pytest.raises(BadRequest) as caught:
        parse_chat_request({**ask, "functions": [add], "function_call": {"name": "nope"}})
    assert caught.value.param == "function_call" and "'nope'" in str(caught.value)
    with pytest.raises(BadRequest) as caught:
        parse_chat_request({**ask, "parallel_tool_calls": "yes"})
    assert caught.value.param == "parallel_tool_calls"
    with pytest.raises(BadRequest) as caught:
        parse_chat_request({**ask, "stream_options": {"include_usage": True}})
    assert caught.value.param == "stream_options"
    parse_chat_request(
        {**ask, "stream": True, "stream_options": {"include_usage": True}, "parallel_tool_calls": False}
    )
