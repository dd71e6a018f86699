"""Which trajectories count: the held-out policy, and the one selection export and training share
(a read of the store under `honed.trajectory.label`; `honed.learn` and `honed.exporters` both ask it).

The label of a trajectory is `honed.trajectory.label` (trusted judgements only); what is held out is
`HeldOut`: a split named `heldout`, *any* task with a trajectory in that split (a task is held out
as a whole, even where some attempts were captured without a split), a task whose stable hash
falls under a `fraction`, and any run whose user request is a held-out task's request (the same
question under another task id, or none, is the same task to a model). `honed export`, `prepare`
(training), the report and `honed status` all ask these two, so "verified data" means the same
thing to each of them.

    for t in select_trajectories(store, verdict="pass"): ...      # held-out tasks stay out
"""

from __future__ import annotations

import hashlib
import html
import itertools
import json
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

from honed.trajectory import HELDOUT, Trajectory, label

if TYPE_CHECKING:
    from honed.store import TrajectoryStore

DEFAULT_PAGE_SIZE = 500


class HeldOutLeak(ValueError):
    """A held-out task would have reached a training set: the gate measures on held-out tasks, so
    training on one makes every later promotion decision meaningless. Never caught in honed."""

    def __init__(self, what: str, task_ids: Iterable[str | None] = ()) -> None:
        shown = sorted({str(t) for t in task_ids if t is not None})
        more = f" (tasks: {', '.join(shown[:10])}{' …' if len(shown) > 10 else ''})" if shown else ""
        super().__init__(f"{what}{more}: held-out tasks are for evaluation only; leave them out")
        self.task_ids = shown


@dataclass(frozen=True)
class HeldOut:
    """The held-out policy: `split`, the tasks seen in it (`task_ids`) and a hash `fraction` of
    task ids held out whatever split their runs carry (a task is held out or not, every run of it
    alike). `HeldOut.of(store)` reads the task ids from the store."""

    task_ids: frozenset[str] = field(default_factory=frozenset)
    split: str = HELDOUT
    fraction: float = 0.0
    requests: frozenset[str] = field(default_factory=frozenset)  # `request_key`s of held-out tasks

    @classmethod
    def of(
        cls,
        store: TrajectoryStore,
        *,
        split: str = HELDOUT,
        fraction: float = 0.0,
        task_ids: Iterable[str] = (),
    ) -> HeldOut:
        """The policy with the store's held-out tasks and their requests: those of `split` and of
        `heldout` (where the gate's own runs are always captured), of the `task_ids` held out by
        name, and, with a `fraction`, of every task its hash holds out, wherever their runs are
        (read from the whole store: a filtered selection must not decide what leaks)."""
        named = {str(t) for t in task_ids}
        found, requests = _heldout_tasks_and_requests(store, split, fraction, named)
        return cls(frozenset(found | named), split, fraction, frozenset(requests))

    def holds(self, item: Trajectory | Mapping[str, Any] | tuple[str | None, str | None]) -> bool:
        """Whether a trajectory, a row with `task_id`/`split` (and `messages`: an external
        example), or a `(task_id, split)` pair is held out."""
        task_id, split = _task_and_split(item)
        if task_id is not None and str(task_id) in self.task_ids:
            return True
        if isinstance(item, Trajectory):
            # an agent's turn inside a held-out task's run (a Send worker), or a run holding another
            # labelled task's agent (an agent invoked in a request handler: `nested_task_ids`)
            if item.metadata.get("held_out_by"):
                return True  # capture saw a held-out label inside it (a nested run, a resume)
            nested = item.metadata.get("nested_task_ids")
            if item.metadata.get("nested_task_ids_cut") and (self.task_ids or self.fraction > 0):
                return True  # more tasks' agents than were named: one of them may be held out
            for other in [item.metadata.get("within_task_id"), *(nested if isinstance(nested, list) else ())]:
                if other is not None and (
                    str(other) in self.task_ids
                    or (self.fraction > 0 and task_hash(str(other)) < self.fraction)
                ):
                    return True
        if split is not None and (same_split(split, self.split) or evaluation_split(split)):
            return True
        if self.requests and not self.requests.isdisjoint(requests_of(item)):
            return True
        if (
            self.requests
            and isinstance(item, Trajectory)
            and not self.requests.isdisjoint(question_keys(item.task))
        ):
            return True  # a graph input's question field asking a held-out request
        cores, short = self._request_cores, self._short_requests
        if cores or short:  # a held-out request anywhere in what it could teach: a system prompt, parts
            key = conversation_key(item)
            # Its core once: in the generator it was made again for every held-out request (500
            # held-out tasks: JSONL export at 120 trajectories/s, not 4,000).
            words = core(key) if key and cores else ""
            if words and self._core_inside(words):
                return True
            if key and short is not None and short.search(key):
                return True
        return task_id is not None and self.fraction > 0 and task_hash(str(task_id)) < self.fraction

    @cached_property
    def _request_cores(self) -> tuple[str, ...]:
        """The held-out requests long enough to look for inside other text (`core`)."""
        return tuple(sorted({c for c in map(core, self.requests) if len(c) - c.count(" ") >= MIN_CORE_CHARS}))

    @cached_property
    def _cores_by_word(self) -> dict[str, tuple[str, ...]]:
        """Each core under its most telling word (one with a digit, else its longest): a core inside
        a text has all its words there, so that one too."""
        by_word: dict[str, list[str]] = {}
        for c in self._request_cores:
            word = max(c.split(), key=lambda w: (any(ch.isdigit() for ch in w), len(w)))
            by_word.setdefault(word, []).append(c)
        return {w: tuple(cs) for w, cs in by_word.items()}

    def _core_inside(self, words: str) -> bool:
        """Whether a held-out request's core is inside `words` (a `core`): only the cores whose
        telling word it holds are looked for (1,000 held-out requests, each looked for in every
        run, held JSONL export to 1,300 runs/s)."""
        index = self._cores_by_word
        return any(c in words for w in set(words.split()) for c in index.get(w, ()))

    @cached_property
    def _short_requests(self) -> re.Pattern[str] | None:
        """The held-out requests too short for `_request_cores` but specific (a digit or a symbol
        beside two words, or five words: "what is 17*23", not "hi" or "summarize this"), as whole
        words of a conversation's `request_key`. As one sentence of a short message they were held
        out already; in the middle of one ("quick one: what is 17*23, thanks"), or after a long
        document, they trained (a QA pass, session 23)."""
        short = {
            k
            for k in self.requests
            if (c := core(k)) and len(c) - c.count(" ") < MIN_CORE_CHARS and _specific(k)
        }
        if not short:
            return None
        alternatives = "|".join(map(re.escape, sorted(short, key=len, reverse=True)))
        return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")


# A held-out request this long (word characters) found inside another conversation is that
# request, asked another way (a QA pass, session 20: put in a system prompt, or split over two user
# messages, the gate's question reached an SFT row); a shorter one ("hi") only as a whole message.
MIN_CORE_CHARS = 24


def core(text: str) -> str:
    """Its words only, one space apart and between: what a request still says however it is cut,
    spaced or punctuated (`request_key`s compare whole messages); "x times 2" is not in "x times 24"."""
    return " " + " ".join(_WORD.findall(text)) + " "


_WORD = re.compile(r"[^\W_]+")  # `_` apart, as `request_key` has it


def _specific(key: str) -> bool:
    """A short request that says something of its own: two words or more and a digit or symbol
    ("what is 17*23", "2+2 equals"), or five words ("what is the capital of peru")."""
    words = key.count(" ") + 1
    return words >= 5 or (words >= 2 and not key.replace(" ", "").isalpha())


def conversation_key(item: Any) -> str:
    """`request_key` of every message an item holds, in order, whatever its role (the task's,
    each model call's input, an external example's `messages`): where a held-out request must not
    appear."""
    if isinstance(item, Trajectory):
        # In conversation order; the replies too: an answer quoting a held-out question and its
        # answer teaches both (an operator's QA pass, session 21).
        values = [
            *(v for s in item.steps if s.kind == "model" for v in (s.input, {"messages": [s.output]})),
            item.task,
            {"messages": [item.answer]},
        ]
    elif isinstance(item, Mapping):
        values = [item]
    else:
        return ""
    seen: dict[str, None] = {}
    # Each model call's input holds the conversation so far, read back as the same objects (the
    # store keeps a run's messages once): each read once, not once per call that saw it.
    read: set[int] = set()
    for value in values:
        messages = value.get("messages") if isinstance(value, Mapping) else value
        if isinstance(messages, str):
            messages = [messages]
        for message in messages if isinstance(messages, list) else ():
            if id(message) in read:
                continue
            read.add(id(message))
            text = _message_text(message)
            if text:
                seen.setdefault(text)
        # ... and the tools offered beside them: a row carries their schemas (a review, session 23:
        # a held-out question and its answer in a tool's description trained).
        tools = value.get("tools") if isinstance(value, Mapping) else None
        if isinstance(tools, list) and tools and id(tools) not in read:
            read.add(id(tools))
            described: list[str] = []
            _strings(tools, described)
            seen.setdefault(" ".join(described))
    return request_key(" ".join(seen)) or ""


def _message_text(message: Any) -> str:
    """All a message could teach as text: its content, its reasoning, its tool calls' arguments
    (a QA pass, session 23: a model's note or its reasoning quoting a held-out question and its
    answer trained)."""
    if isinstance(message, str):
        return message
    if isinstance(message, (tuple, list)) and len(message) == 2:
        return _message_text(message[1])
    if isinstance(message, Mapping):
        get = message.get
        extra = get("additional_kwargs")
    else:

        def get(name: str) -> Any:
            return getattr(message, name, None)

        extra = get("additional_kwargs")
    texts: list[str] = []
    content = get("content")
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping):  # text, and reasoning or thinking blocks
                texts.extend(
                    p for k in ("text", "reasoning", "thinking") if isinstance(p := part.get(k), str)
                )
                # An Anthropic `tool_result` block holds its text in blocks of its own.
                _strings(part.get("content"), texts)
    for name in ("reasoning", "reasoning_content"):
        _strings(get(name), texts)
    if isinstance(extra, Mapping):
        _strings(extra.get("reasoning_content"), texts)
    for name in ("tool_calls", "invalid_tool_calls"):
        calls = get(name)
        for call in calls if isinstance(calls, list) else ():
            if isinstance(call, Mapping):
                function = call.get("function")
                _strings(call.get("args"), texts)
                _strings(function.get("arguments") if isinstance(function, Mapping) else None, texts)
    return " ".join(texts)


def _strings(value: Any, out: list[str], depth: int = 0) -> None:
    """Every string in a value (text blocks' and reasoning blocks' text, arguments' values)."""
    if isinstance(value, str):
        if value:
            out.append(value)
    elif depth < 8 and isinstance(value, Mapping):
        for item in value.values():
            _strings(item, out, depth + 1)
    elif depth < 8 and isinstance(value, (list, tuple)):
        for item in value:
            _strings(item, out, depth + 1)


def request_key(text: str | None) -> str | None:
    """A user request as the held-out check compares it: compatibility forms folded (NFKC: a
    full-width "ａｎｓｗｅｒ" is "answer"), invisible format characters (zero-width spaces, joiners)
    dropped, case, runs of white space and punctuation at either end ignored."""
    if not isinstance(text, str):
        return None
    if "&" in text:  # "what&nbsp;is" in HTML is "what is" (a QA pass, session 25)
        text = html.unescape(text)
    # "what_is_the_capital" asks what "what is the capital" does: `_` is a space between words.
    text = text.replace("_", " ")
    if text.isascii():  # the common case: nothing to fold, no invisible characters
        key = " ".join(text.lower().split())
    else:
        folded = (
            unicodedata.normalize("NFKC", text)
            .translate(_INVISIBLE)
            .translate(_LOOKALIKES)
            .casefold()
            .translate(_LOOKALIKES)
        )
        key = " ".join("".join(c for c in folded if unicodedata.category(c) != "Cf").split())
    start, end = 0, len(key)
    while start < end and _edge(key[start]):
        start += 1
    while end > start and _edge(key[end - 1]):
        end -= 1
    # "2 + 3" is "2+3" (an operator's QA pass, session 21: spaced otherwise, a held-out question trained).
    return _SPACED_SYMBOL.sub(r"\1", key[start:end]) or None


_SPACED_SYMBOL = re.compile(r" ?([^\w ]) ?")


def _edge(c: str) -> bool:
    """Punctuation or space at either end of a request: "What is 2+3?" asks "what is 2+3"."""
    return c.isspace() or unicodedata.category(c).startswith("P")


def requests_of(item: Any, *, sentences: bool = True) -> set[str]:
    """The `request_key`s a training item could teach: every user message of a trajectory's
    request and of the conversations its model calls read (an earlier turn of a thread is
    trained as context too), or of an external example's `messages` (a held-out question
    anywhere in it leaks). With `sentences`, each user message's sentences too (what a held-out
    request may hide in); without, whole messages (what a held-out run holds out of others)."""
    from honed.messages import request_text

    if isinstance(item, Trajectory):
        texts = {request_text(item.task), *_user_texts(item.task)}
        for step in item.steps:
            if step.kind == "model":
                texts.update(_user_texts(step.input))  # each model call repeats the conversation: once
        return _keys_and_sentences(texts, sentences) | task_keys(item.task)
    elif isinstance(item, Mapping) and isinstance(item.get("messages"), list):
        texts = set(_user_texts(item))
    else:
        return set()
    return _keys_and_sentences(texts, sentences)


def _keys_and_sentences(texts: set[str | None], sentences: bool) -> set[str]:
    """Each text's `request_key`, and each of its sentences' and lines': a short held-out question
    ("What is 17*23?", too short to be looked for inside text) asked as one sentence of a longer
    request still asks it (a QA pass, session 23)."""
    keys = set()
    for text in texts:
        if not isinstance(text, str):
            continue
        key = request_key(text)
        if key is None:
            continue
        keys.add(key)
        if sentences and len(text) <= _MAX_SPLIT:
            for sentence in _SENTENCE_END.split(text):
                k = request_key(sentence)
                # a question, not a greeting: "Hi!", "Thanks." would hold every run opening so out;
                # "What's 2+2?", "Who is Ada?" are asked (a second review, session 23)
                if k is not None and (k.count(" ") >= 2 or (" " in k and not k.replace(" ", "").isalpha())):
                    keys.add(k)
    return keys


_SENTENCE_END = re.compile(r"(?<=[.?!:;])\s+|\n+")
_MAX_SPLIT = 4096  # a longer user message is a document: its sentences are not requests


def _user_texts(value: Any) -> list[str | None]:
    """The text of each user message of an input with `messages`, or of a list of messages (any
    shape `request_text` reads)."""
    from honed.messages import request_text

    messages = value.get("messages") if isinstance(value, Mapping) else value
    if not isinstance(messages, list):
        return []
    return [request_text({"messages": [m]}) for m in messages]


# Cyrillic and Greek letters drawn as Latin ones (Unicode's confusables, lowercase): "Whісh" with
# Cyrillic і asks "which" (a QA pass, session 23: identical on screen, it trained).
# Armenian letters and Latin small capitals too (a QA pass, session 25: "օ" for "o", "ɪ" for "i").
_LOOKALIKES = str.maketrans(
    "аеорсухіјѕԁһӏԛԝкοανικɡıАВЕКМНОРСТУХІЈЅΑΒΕΖΗΙΚΜΝΟΡΤΥΧօսհոᴀʙᴄᴅᴇɢʜɪᴊᴋʟᴍɴᴏᴘʀꜱᴛᴜᴠᴡʏᴢ",
    "aeopcyxijsdhlqwkoavikgiABEKMHOPCTYXIJSABEZHIKMNOPTYXouhnabcdeghijklmnoprstuvwyz",
)
# Soft hyphen and the other characters NFKC keeps that render as nothing (category Cf goes too),
# and the variation selectors (category Mn, drawn as nothing after a letter: a QA pass, session 25).
_INVISIBLE = dict.fromkeys(
    [
        *map(ord, "\u00ad\u034f\u115f\u1160\u3164\uffa0"),
        *range(0xFE00, 0xFE10),
        *range(0xE0100, 0xE01F0),
    ],
    None,
)


def is_heldout(
    item: Trajectory | Mapping[str, Any] | tuple[str | None, str | None],
    *,
    heldout_split: str = HELDOUT,
    heldout_fraction: float = 0.0,
) -> bool:
    """`HeldOut` without the store's task ids: by split, else by the task's stable hash."""
    return HeldOut(frozenset(), heldout_split, heldout_fraction).holds(item)


def same_split(a: str, b: str) -> bool:
    """Splits compared as people write them: "HeldOut", "held-out", "held_out", "held.out" and
    "heldout\\n" (read from a file) are "heldout": only letters and digits count, after NFKC (a
    typo must not send held-out runs to training)."""
    return a == b or _split_key(a) == _split_key(b)


# Splits that name an evaluation set, however written: held out like "heldout" (a user whose
# evaluation set is "test" trained on it when only "heldout" was held out).
EVALUATION_SPLITS = frozenset(
    {
        "heldout",
        "holdout",
        "test",
        "testing",
        "eval",
        "evaluation",
        "validation",
        "valid",
        "val",
        "dev",
        "ood",
    }
)


def evaluation_split(split: str) -> bool:
    """Whether `split` names an evaluation set (`EVALUATION_SPLITS`), held out from training:
    also with a version, a number, a plural or a "set" after it (`test_set`, `heldout_v2`,
    `evals`, `validation-2024`: a QA pass, session 20, found these trained on)."""
    key = _split_key(split)
    if key in EVALUATION_SPLITS or _SPLIT_TAIL.sub("", key) in EVALUATION_SPLITS:
        return True
    # ... and as one word of several (`heldout_hard`, `test_ood`, `eval-2024-q1`, `private_test`,
    # `heldOutHard`: an operator's QA pass, session 21, found these trained on).
    # A word that only ever names an evaluation set counts anywhere, `test`, `dev`, `val` and
    # `benchmark` too (`gsm8k_test`, `test_v2_hard`, `dev-other`), except beside a word that makes
    # them training data's (`unit_tests`, `dev_tools`, `web_dev`, `test_generation`: a review,
    # session 21, found both kinds mistaken).
    words = [
        _SPLIT_TAIL.sub("", w) or w
        for w in _SPLIT_WORD.findall(_CAMEL_CASE.sub(" ", unicodedata.normalize("NFKC", split)).casefold())
    ]
    if any(w in _EVALUATION_WORDS for w in words) or any(
        a + b in ("heldout", "holdout") for a, b in itertools.pairwise(words)
    ):
        return True
    for i, word in enumerate(words):
        if word in _SET_WORDS and not _NOT_A_SET.intersection(words[max(0, i - 1) : i + 2]):
            return True
    return False


_EVALUATION_WORDS = frozenset(("heldout", "holdout", "eval", "evaluation", "ood", "leaderboard", "golden"))
_SET_WORDS = frozenset(("test", "testing", "dev", "val", "valid", "validation", "benchmark"))
# Beside a set word, these make it a kind of work, not an evaluation set (`ab_test`, `load_test`,
# `data_validation`: production traffic and work, held out by the rule before, a review, session 22;
# `test_b`, `qa_test`, `agent_benchmark` stay held out: a second review, the same session).
_NOT_A_SET = frozenset(
    ("unit", "write", "writing", "generate", "generation", "ground", "tool", "tools", "env", "environment", "ops",
     "request", "requests", "web", "frontend", "backend", "fullstack", "support", "op", "driven", "case",
     "cases", "suite", "runner", "writer", "fixture", "fixtures", "rel", "input", "inputs", "data",
     "ab", "load", "smoke", "canary", "stress", "perf", "performance", "mirror", "sweep", "scraping",
     "schema", "form")
)  # fmt: skip
_SPLIT_WORD = re.compile(r"[^\W\d_]+")
_CAMEL_CASE = re.compile(r"(?<=[a-z])(?=[A-Z])")
_SPLIT_TAIL = re.compile(r"(?:s|sets?|splits?|data(?:set)?s?)?(?:v?\d+)?$")


def _split_key(split: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKC", split).casefold() if c.isalnum())


def task_hash(task_id: str) -> float:
    """A task id's stable position in [0, 1): the same on every machine and in every process."""
    digest = hashlib.sha256(task_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# The fields of a graph's input that ask its question; others (`format`, a shared `instructions`
# or document) are context many tasks share (a review, session 21: all of them were held out).
_QUESTION_FIELDS = frozenset(
    ("question", "query", "prompt", "request", "input", "task", "q", "user_input", "problem", "instruction",
     "user_message", "message", "text", "goal", "ask", "user_query", "question_text")
)  # fmt: skip


def task_keys(task: Any) -> set[str]:
    """The keys a run's input is compared by: its request (`request_key`), or, for an input that
    holds no chat request (a graph's `{"question": ...}`), the input itself as canonical JSON."""
    from honed.messages import request_text

    text = request_text(task)
    if text is None and task is not None:
        text = "input:" + json.dumps(task, sort_keys=True, ensure_ascii=False, default=str)
    key = request_key(text)
    return set() if key is None else {key}


# ... of which these only ever ask it: a value one of them holds is a question, however many held-out
# tasks share it (`{"question": Q, "instruction": <a format>}`: a second review, session 22).
_ASKING_FIELDS = frozenset(("question", "query", "q", "problem", "ask", "user_query", "question_text"))


def question_keys(task: Any) -> set[str]:
    """The request keys of a graph input's question fields (`{"question": Q}` asks Q, as a chat's
    user message would). Each is held out, but for a value several held-out tasks share beside a
    question of each one's own: that is context (`{"task": <a shared instruction>, "question":
    ...}`), where the same question asked by two tasks in two formats is a held-out question
    (`_heldout_tasks_and_requests`; a review, session 22, found it trained)."""
    if not isinstance(task, Mapping) or "messages" in task:
        return set()
    return {
        k
        for name, v in task.items()
        if name in _QUESTION_FIELDS and isinstance(v, str) and len(k := request_key(v) or "") >= 8
    }


def _heldout_tasks_and_requests(
    store: TrajectoryStore, heldout_split: str, fraction: float = 0.0, named: set[str] | None = None
) -> tuple[set[str], set[str]]:
    """The task ids and request keys (`task_keys`) of every trajectory in `heldout_split` (or
    `heldout`), of the `named` tasks, and with a `fraction` of every task its hash holds out."""
    from sqlalchemy import Text, cast, select

    from honed.store.schema import TrajectoryRow

    # Distinct by the task's JSON text (PostgreSQL's `json` has no equality to DISTINCT on).
    task = cast(TrajectoryRow.task, Text)
    task_ids: set[str] = set()
    requests: set[str] = set()
    asked_by: dict[str, set[str]] = {}  # a question field's key -> the held-out tasks asking it

    asking_fields: set[str] = set()  # keys held in a field that only ever asks

    def add(task_id: Any, text: str | None) -> None:
        value = _decoded(text)
        requests.update(task_keys(value))
        for key in question_keys(value):
            asked_by.setdefault(key, set()).add(str(task_id))
        if isinstance(value, Mapping):
            asking_fields.update(
                k
                for name in _ASKING_FIELDS
                if isinstance(v := value.get(name), str) and (k := request_key(v))
            )

    with store.engine.connect() as conn:
        # The spellings in the store that mean the held-out split, decided here, not in SQL.
        splits = conn.execute(select(TrajectoryRow.split).where(TrajectoryRow.split.is_not(None)).distinct())
        written = [s for (s,) in splits if same_split(s, heldout_split) or evaluation_split(s)]
        if written:
            query = select(TrajectoryRow.task_id, task).where(TrajectoryRow.split.in_(written))
            for task_id, text in conn.execute(query.distinct()):
                if task_id is not None:
                    task_ids.add(str(task_id))
                add(task_id, text)
        if named:  # the runs of a task held out by its id, in any split
            names = sorted(named)
            for start in range(0, len(names), 500):
                query = select(TrajectoryRow.task_id, task).where(
                    TrajectoryRow.task_id.in_(names[start : start + 500])
                )
                for task_id, text in conn.execute(query.distinct()):
                    add(task_id, text)
        if fraction > 0:  # a hashed-out task's request, whatever split or selection its runs are in
            query = select(TrajectoryRow.task_id, task).where(TrajectoryRow.task_id.is_not(None))
            for task_id, text in conn.execute(query.distinct()):
                if task_hash(str(task_id)) < fraction:
                    add(task_id, text)
    asks: dict[str, set[str]] = {}  # a held-out task -> the question fields' keys it asks
    for key, asking in asked_by.items():
        for task_id in asking:
            asks.setdefault(task_id, set()).add(key)

    def context(
        key: str,
    ) -> bool:  # shared, not in a field that only asks, beside a question of each task's own
        asking = asked_by[key]
        return (
            len(asking) > 1
            and key not in asking_fields
            and all(any(len(asked_by[k]) == 1 for k in asks[t] - {key}) for t in asking)
        )

    return task_ids, requests | {key for key in asked_by if not context(key)}


def _decoded(text: str | None) -> Any:
    return None if text is None else json.loads(text)


@dataclass(frozen=True, slots=True)
class Selection:
    """Filters of an export; `None` means any. `task_ids` matches any of them.

    `verdict="pass"` keeps trajectories whose `label` is True (trusted verifiers only), `"fail"`
    those whose label is False. Runs paused at an interrupt are not finished: left out unless
    `status="interrupted"` asks for them. Held-out tasks (see `HeldOut`) are left out unless
    `include_heldout` is true or `split="heldout"` asks for them: they are what a trained model is
    gated on, so a dataset must never pick them up by accident.
    """

    verdict: str | None = None
    split: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    model_version: str | None = None
    task_ids: tuple[str, ...] | None = None
    agent: str | None = None
    status: str | None = None
    include_heldout: bool = False

    @property
    def store_filters(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "split": self.split,
            "since": self.since,
            "until": self.until,
            "model_version": self.model_version,
            "agent": self.agent,
            "status": self.status,
            "finished": True if self.status is None else None,
        }

    @property
    def excludes_heldout(self) -> bool:
        # Asking for an evaluation split by name is asking for held-out runs (`--split test`).
        return not self.include_heldout and not (self.split is not None and evaluation_split(self.split))


def select_trajectories(
    store: TrajectoryStore,
    selection: Selection | None = None,
    *,
    limit: int | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    step_content: bool = True,
    **filters: Any,
) -> Iterator[Trajectory]:
    """Trajectories matching `selection` (or the same fields as keywords), oldest first, with
    steps and verdicts, read `page_size` at a time (`step_content`: see `store.trajectories`).

        for t in select_trajectories(store, verdict="pass", task_ids=["t1", "t2"]): ...
    """
    selection = _as_selection(selection, filters)
    heldout = HeldOut.of(store) if selection.excludes_heldout else None
    excluded = sorted(heldout.task_ids) if heldout else None
    untrusted = store.untrusted_verifiers() if selection.verdict in ("pass", "fail") else set()
    wanted = {"pass": True, "fail": False}.get(selection.verdict or "")
    store_filters = _resolved(store, selection)
    produced = 0
    for task_id in selection.task_ids or (None,):
        last = None  # pages by position: a run stored meanwhile never shifts one (read twice)
        while limit is None or produced < limit:
            size = page_size if limit is None else min(page_size, max(limit - produced, 1))
            page = store.trajectories(
                limit=size, after=last, task_id=task_id, oldest_first=True,
                exclude_task_ids=excluded, step_content=step_content, **store_filters,
            )  # fmt: skip
            last = page[-1] if page else last
            for t in page:
                if heldout is not None and heldout.holds(t):
                    continue
                if wanted is not None and label(t.verdicts, untrusted=untrusted) is not wanted:
                    continue
                yield t
                produced += 1
                if limit is not None and produced >= limit:
                    return
            if len(page) < size:
                break


def count_selected(store: TrajectoryStore, selection: Selection | None = None, **filters: Any) -> int:
    """How many trajectories `select_trajectories` will yield (progress bars, `honed status`):
    counted in SQL, or, where held-out tasks exist, over the matching rows without their steps,
    the held-out policy applied to each (its task, split and request: a held-out question asked
    again under another task id was counted). Exact but for a held-out question only an earlier
    turn of a thread asked, which only a run's steps show."""
    selection = _as_selection(selection, filters)
    heldout = HeldOut.of(store) if selection.excludes_heldout else None
    store_filters = _resolved(store, selection)
    total = 0
    for task_id in selection.task_ids or (None,):
        if heldout is None:
            total += store.count(task_id=task_id, **store_filters)
            continue
        last = None
        while True:
            page = store.trajectories(
                limit=_COUNT_PAGE, after=last, task_id=task_id, oldest_first=True, with_steps=False,
                exclude_task_ids=sorted(heldout.task_ids), **store_filters,
            )  # fmt: skip
            total += sum(1 for t in page if not heldout.holds(t))
            if len(page) < _COUNT_PAGE:
                break
            last = page[-1]
    return total


_COUNT_PAGE = 2000


def unmatched_names(
    store: TrajectoryStore, *, task_ids: Iterable[str] | None = None, **names: str | None
) -> str:
    """What a selection that found nothing named and the store does not hold, with what it does:
    "no stored runs have agent 'calculator' (agents: calc, coder)"; empty when every name is held.
    (A typo'd `--model-version` or agent name wrote 0 examples and said nothing.) Task ids are
    too many to list: each one no run has is named."""
    said = [f"no stored runs have task id {t!r}" for t in task_ids or () if not store.count(task_id=t)]
    for name, value in names.items():
        if value is None or store.count(**{name: value}):
            continue
        held = store.stored_values(name)  # type: ignore[arg-type]
        shown = ", ".join(held[:10]) + (f" and {len(held) - 10} more" if len(held) > 10 else "")
        said.append(
            f"no stored runs have {name.replace('_', ' ')} {value!r} ({name.replace('_', ' ')}s: {shown or 'none'})"
        )
    return "; ".join(said)


def _resolved(store: TrajectoryStore, selection: Selection) -> dict[str, Any]:
    """`selection.store_filters` with its split resolved to stored names once, for every page."""
    return {**selection.store_filters, "split": store.split_names(selection.split)}


def _as_selection(selection: Selection | None, filters: dict[str, Any]) -> Selection:
    if selection is not None and filters:
        raise TypeError("give either a Selection or filter keywords, not both")
    if selection is not None:
        return selection
    task_ids = filters.pop("task_ids", None)
    return Selection(**filters, task_ids=_unique(task_ids) if task_ids is not None else None)


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(str(v) for v in values))


def _task_and_split(item: Any) -> tuple[Any, Any]:
    if isinstance(item, Trajectory):
        return item.task_id, item.split
    if isinstance(item, Mapping):
        return item.get("task_id"), item.get("split")
    return item
