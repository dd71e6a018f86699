"""The capture events' vocabulary: what the recorder's queue carries from the agent's thread to the
writer. Its own module so that the recorder loads without LangChain (the assembler needs it)."""

from typing import Any, NamedTuple

# Event kinds (first element of every event tuple).
START, END, ERROR, FLUSH = 0, 1, 2, 3
# An error escaped a step; it ends the trajectory unless more of the run follows (a middleware
# caught it). Closed at the next flush, or after PENDING_LINGER_S without news.
PENDING_ERROR = 4
PENDING_LINGER_S = 30.0
# The run paused at a LangGraph interrupt: payload `(interrupt values, checkpoint id or None)`;
# the trajectory ends as `interrupted` when its root ends.
INTERRUPT = 5
# A trajectory continues after an interrupt (the middleware's view of `Command(resume=...)`):
# run id = the trajectory id, payload `(name, resume value or NO_VALUE, metadata, extra)`.
RESUME = 6
# Another entry point captures this run: drop the trajectory holding run id, write nothing.
DISCARD = 7
NO_VALUE = object()

# START payload: (run_kind, name, inputs, metadata, tags, extra); run_kind is one of these.
CHAIN, MODEL, LLM, TOOL = "chain", "model", "llm", "tool"
# In a START's `extra`: the `honed` labels of a run inside another run, given by the caller's own
# code (an agent invoked in a request handler or a node, with a config of its own).
NESTED_LABELS = "nested_labels"


class StreamedBeforeError(NamedTuple):
    """A model call's ERROR payload when it failed after streaming part of its reply: the error,
    and the text streamed so far (kept as the step's output; a QA pass, session 27: it was lost)."""

    error: BaseException
    text: str


class RanAs(NamedTuple):
    """A tool step's END payload when the call ran as another than the one its START recorded
    (a middleware further in changed it: a reviewer's edit). The step records the call that ran;
    `extra["asked"]` keeps the model's."""

    result: Any
    name: str | None
    args: Any
    asked_name: str | None
    asked_args: Any


class NotRun(NamedTuple):
    """A tool step's END payload when the tool never started: a middleware further in answered
    the call itself (a reviewer's rejection, a call limit, a human's answer, a cache). The step
    is marked `synthesised`, as one the assembler makes from the conversation."""

    result: Any


class ToolAnswer(NamedTuple):
    """A tool step's END payload when the tool answered with a ToolMessage: the message and its
    `content` then (see `CONTENTS`: a node that scrubbed the result before the next call changed
    what the tool was stored as having returned)."""

    message: Any
    content: Any


def tool_answer(result: Any) -> Any:
    """`result` with a ToolMessage in it (alone, or as a `RanAs`/`NotRun` result) as a `ToolAnswer`.
    (Called in the agent's process only: the store's process loads no LangChain.)"""
    from langchain_core.messages import ToolMessage

    if isinstance(result, RanAs | NotRun):
        return result._replace(result=tool_answer(result.result))
    if isinstance(result, ToolMessage):
        return ToolAnswer(result, content_now(result.content))
    return result


class ModelRanAs(NamedTuple):
    """A model step's END payload when the model itself received another request than the one
    its START recorded: a middleware further in changed it (a dynamic system prompt, narrowed
    tools, a fallback model). The step records what the model received: `messages`, `tools`
    (None: as recorded) and `name`."""

    response: Any
    messages: list[Any]
    tools: list[Any] | None
    name: str | None


# A model call's START `extra` key: each input message's `content` as the call began. The
# messages are serialised later, on the writer thread, and a node that scrubs an earlier tool
# result (`message.content = "[scrubbed]"`) before the next call changed what the first call was
# stored as having seen; the memo of a message by its id then stored the next call as seeing the
# old text (a QA pass, session 27). Contents are replaced, not edited, in LangChain (a str is
# immutable), so the reference is the snapshot, taken for the cost of a list.
CONTENTS = "_contents"


def contents_of(messages: Any) -> list[Any] | None:
    try:
        return [content_now(getattr(m, "content", None)) for m in messages]
    except Exception:  # never into the agent
        return None


def content_now(content: Any) -> Any:
    """A message's content as it is now: a str as it is (immutable), a list of content blocks
    copied with its blocks (edited in place, `content[0]["text"] = ...`, the first call was
    stored with the later text: a QA pass, session 27)."""
    if type(content) is list:
        return [dict(block) if type(block) is dict else block for block in content]
    return content


def snapshot(value: Any) -> Any:
    """What a run was given or returned, as it was at that moment: the events are serialised
    later, on the writer thread, and callers change these objects meanwhile (the stateless chat
    loop appends the reply and the next turn to the `messages` list it passed in; a node edits
    the previous node's dict in place; a caller reuses its nested task dict). A dict's top level
    and the lists and dicts right under it are always copied (in C); deeper dicts and lists are
    copied too, each once (shared and cyclic ones stay so), up to `SNAPSHOT_ITEMS` items in all
    (and as many top-level containers again past them) and `SNAPSHOT_DEPTH` levels: the copy runs on the agent's thread, and a state of 20,000
    documents or of columns of 500,000 rows must not cost it a second. Past the budget, by
    reference. The objects in them are not copied: LangChain's messages are not changed in place."""
    if type(value) is not dict:
        return value
    try:
        return _Snapshot().dict(value, 0)
    except Exception:  # never into the agent: the top two levels, as they always were
        return {
            k: list(v) if type(v) is list else dict(v) if type(v) is dict else v for k, v in value.items()
        }


SNAPSHOT_ITEMS = 10_000  # items of the dicts and lists below the top two levels copied per snapshot
SNAPSHOT_DEPTH = 32


class _Snapshot:
    __slots__ = ("left", "memo")

    def __init__(self) -> None:
        self.left = SNAPSHOT_ITEMS
        self.memo: dict[int, Any] = {}

    def tree(self, value: Any, depth: int) -> Any:
        copied = self.memo.get(id(value))
        if copied is not None:
            return copied
        if depth > 1:  # the top two levels are copied whatever the budget says
            if depth > SNAPSHOT_DEPTH or len(value) > self.left:
                return value
            self.left -= 1
        return self.dict(value, depth) if type(value) is dict else self.list(value, depth)

    def dict(self, value: dict[Any, Any], depth: int) -> dict[Any, Any]:
        out = dict(value)  # in C; the items that are containers are replaced by their copies
        self.memo[id(value)] = out
        top = SNAPSHOT_ITEMS  # past the budget, the top level's containers are copied, only them
        for k, v in out.items():
            if self.left <= 0:
                # ... up to as many again: a state's channels come well within it, where a dict of
                # 200,000 lists copied whole cost the agent 0.7 s (a review, session 22)
                if depth or top <= 0:
                    break
                if type(v) is dict or type(v) is list:
                    top -= 1
                    out[k] = self.memo.get(id(v)) or (dict(v) if type(v) is dict else list(v))
                continue
            self.left -= 1
            if type(v) is dict or type(v) is list:
                out[k] = self.tree(v, depth + 1)
        return out

    def list(self, value: list[Any], depth: int) -> list[Any]:
        out = list(value)  # in C, as is a list of messages
        self.memo[id(value)] = out
        for i, v in enumerate(out):
            if self.left <= 0 and depth:
                break  # the rest by reference: a list of 500,000 rows is not walked
            self.left -= 1
            if type(v) is dict or type(v) is list:
                out[i] = self.tree(v, depth + 1)
        return out


class NotTheAnswer(NamedTuple):
    """A trajectory's END payload when its turn ran inside a labelled run whose answer is another
    turn's (a pipeline's researcher before its writer): the run's task labels are not this turn's
    (`inherited_labels`). A QA pass (session 23): each turn was judged against the run's expected
    answer, one run that passed counted as two attempts and a failure."""

    outputs: Any


# The labels that describe one task: an agent asked something else inside another run (a `Send`
# worker of a map-reduce graph) inherits its caller's metadata, but not its task (a QA pass, session
# 20: three workers' turns were one task id, each judged against the graph's expected answer).
TASK_LABELS = ("task_id", "expected", "tests", "schema", "match", "tolerance", "verifier")


def inherited_labels(labels: dict[str, Any]) -> dict[str, Any]:
    """The caller's labels for an agent turn run inside it that is not its task's answer: its split
    and run-wide labels, and the caller's task id as `within_task_id` (held-out stays held out)."""
    kept = {k: v for k, v in labels.items() if k not in TASK_LABELS}
    if labels.get("task_id") is not None:
        kept["within_task_id"] = labels["task_id"]
    return kept
