"""Qwen3's run-time chat template (TRL's `trl/chat_templates/qwen3.jinja`, byte for byte; the
demo's tiny model uses it), and `training_template`, which places `{% generation %}` markers in a
template of that shape so SFT trains exactly what the model writes at run time.

Kept here (not read from TRL at run time) so serving needs no TRL; a test checks it still equals
TRL's copy, because TRL recognises a tokenizer's template by exact text to swap in its training
variant (`{% generation %}` markers for `assistant_only_loss`) and its response parser.
"""

from __future__ import annotations

QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""


def training_template(template: str = QWEN3_CHAT_TEMPLATE) -> str:
    """The run-time Qwen3 template with `{% generation %}` around each assistant reply of the
    conversation's last turn, after its last user message (think block, text, tool calls,
    `<|im_end|>`): an earlier turn's replies are context, judged by their own run's verdict. It
    renders the same text as at run time, so TRL's `assistant_only_loss` trains exactly what the
    model says, in the contexts it sees then (TRL's own `qwen3_training.jinja` adds a think block
    to every assistant turn, which the run-time template leaves out of earlier turns). Raises
    ValueError for another template."""
    start = "        {%- if loop.index0 > ns.last_query_index %}\n"
    end = "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}"
    head, found, rest = template.partition(start)
    body, found_end, tail = rest.partition(end)
    # The three branches that open the turn lose their "<|im_start|>assistant\n", written once above.
    opened = ("'<|im_start|>' + message.role + '\\n<think>\\n'", "'<|im_start|>' + message.role + '\\n' + ")
    if not found or not found_end or body.count(opened[0]) != 1 or body.count(opened[1]) != 2:
        raise ValueError("not the Qwen3 chat template: cannot place generation markers")
    body = body.replace(opened[0], "'<think>\\n'").replace(opened[1], "")
    reply = start + body + "        {{- '<|im_end|>' }}\n"
    return (
        head
        + "        {{- '<|im_start|>' + message.role + '\\n' }}\n"
        # Only this turn's replies train: an earlier turn's were judged by their own verdicts. A
        # conversation ending on a user message has no reply of its own: all are marked (TRL's
        # probe that the end-of-turn token trains renders one such).
        + "        {%- if loop.index0 > ns.last_query_index or ns.multi_step_tool"
        + " or messages[-1].role == 'user' %}\n"
        + "        {%- generation %}\n"
        + reply
        + "        {%- endgeneration %}\n"
        + "        {%- else %}\n"
        + reply
        + "        {%- endif %}\n"
        + "        {{- '\\n' }}\n"
        + '    {%- elif message.role == "tool" %}'
        + tail
    )
