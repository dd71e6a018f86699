"""A deterministic tool-calling chat model, for tests and demos of agents without LLM weights.

`ScriptedChatModel` is stateless: its reply is a function of the conversation so far, so many
concurrent conversations never share a counter (the pitfall of FakeMessagesListChatModel).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult


class ScriptedChatModel(BaseChatModel):
    """Replies by rule: the task text `call NAME {json args}; call ...; answer TEXT`.

    Each `call` clause becomes one tool-call turn, in order; after the last tool result the model
    answers `TEXT` with `{result}` replaced by the last tool message's content. The task is the
    latest user message, so each turn of a multi-turn conversation follows its own rule.
    `reasoning` adds a reasoning block to every reply; `fail_on` raises when the task text contains it.
    """

    reasoning: str | None = None
    fail_on: str | None = None
    usage: bool = True
    model_name: str = "tool-script"

    @property
    def _llm_type(self) -> str:
        return "tool-script"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        """Bound as a provider's model binds them: the schemas travel in the call's parameters,
        where callbacks (`honed.instrument()`) read them (returning `self` hid them)."""
        from langchain_core.utils.function_calling import convert_to_openai_tool

        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        turn_start = max((i for i, m in enumerate(messages) if isinstance(m, HumanMessage)), default=-1)
        task = messages[turn_start].text if turn_start >= 0 else ""
        this_turn = messages[turn_start + 1 :]  # the replies and tool results since the task
        if self.fail_on and self.fail_on in task:
            raise RuntimeError(f"model failure for {task!r}")
        clauses = [c.strip() for c in task.split(";") if c.strip()]
        calls = [c for c in clauses if c.startswith("call ")]
        answer = next((c[len("answer ") :] for c in clauses if c.startswith("answer ")), "done")
        turns_done = sum(1 for m in this_turn if isinstance(m, AIMessage))
        if turns_done < len(calls):
            name, _, raw = calls[turns_done][len("call ") :].partition(" ")
            args = json.loads(raw) if raw.strip() else {}
            message = AIMessage(
                content="",
                tool_calls=[{"name": name, "args": args, "id": f"call_{turns_done}_{name}"}],
            )
        else:
            last_tool = next((m for m in reversed(this_turn) if isinstance(m, ToolMessage)), None)
            text = answer.replace("{result}", str(last_tool.content) if last_tool else "")
            message = AIMessage(content=text)
        if self.reasoning:
            message.additional_kwargs["reasoning_content"] = self.reasoning
        if self.usage:
            n_in = sum(len(str(m.content).split()) for m in messages)
            n_out = max(1, len(str(message.content).split()))
            message.usage_metadata = {
                "input_tokens": n_in,
                "output_tokens": n_out,
                "total_tokens": n_in + n_out,
            }
        # As OpenAI's API says it: a reply that calls tools stopped to call them.
        finish = "tool_calls" if message.tool_calls else "stop"
        message.response_metadata = {"model_name": self.model_name, "finish_reason": finish}
        return ChatResult(generations=[ChatGeneration(message=message)])
