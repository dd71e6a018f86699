"""Many concurrent callers, one forward pass per token for all of them: how a CPU serves dozens of agents.

Callers (threads, asyncio tasks, `agent.batch`) submit a `GenerationRequest` and get a future.
One generation thread batches them as serving engines do (continuous batching): requests that
arrive together (within a few-ms window) are left-padded and prefilled as one batch; the batch
then decodes one token per step for all its rows; a row that ends leaves at once (its caller gets
its result and its KV cache is dropped), and requests arriving meanwhile are prefilled and joined
to the running batch between steps (caches left-padded to one length). Short replies do not wait
for long ones, and an agent's next call does not wait for the whole batch to drain. On the tiny
model, dozens of agents get an order of magnitude more tokens/s than one.

Each row keeps its own sampling parameters (temperature, 0 = greedy; top-k; top-p), stop strings
and token budget. Every sampled token is recorded with its raw log-probability (before warping,
as vLLM's default `raw_logprobs`) and streamed to the row's callback. Nothing is retokenised
afterwards: the ids and logprobs a trainer gets are exactly what was sampled.

One row never fails its batch-mates: a request with parameters no sampler can use (NaN or
negative temperature, `top_p` outside (0, 1], an empty prompt, token ids outside the vocabulary)
is refused at `submit` and never joins a batch; a temperature below `GREEDY_BELOW` is greedy (its
limit; dividing by it would overflow to NaN); top-p always keeps the most likely token; a row
whose scores are not numbers, or whose sampling fails anyway, fails alone (the others are
sampled again, each on its own); a prefill that fails is retried row by row, so only the rows
that fail alone fail. Only the shared forward pass of a running batch fails all its rows.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

log = logging.getLogger("honed")

DEFAULT_MAX_BATCH = int(os.environ.get("HONED_MAX_BATCH", "64"))
DEFAULT_WINDOW_S = float(os.environ.get("HONED_BATCH_WINDOW_MS", "5")) / 1000.0

FinishReason = Literal["stop", "length", "cancelled"]
GREEDY_BELOW = 1e-5  # temperatures this small sample the argmax: logits / 1e-45 is inf, softmax NaN


class InvalidGeneration(ValueError):
    """A request no sampler can run (see `submit`); it failed alone, before joining a batch."""


class GeneratorClosed(RuntimeError):
    """The model was released (a newer version took over, or it was closed) before this request ran."""


@dataclass(slots=True, eq=False)
class GenerationRequest:
    """One completion to generate. `temperature=0` is greedy. `on_token(token_id, logprob)` is
    called on the generation thread for each sampled token (keep it cheap). Set `cancelled` to
    abandon the request; its row stops at the next step."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    on_token: Callable[[int, float], None] | None = None
    cancelled: bool = False
    # Who asked (`honed serve`: the API key or address): one client holds at most
    # `BatchGenerator.client_cap` rows, so another's request always finds one. None: no cap.
    client: str | None = None
    # `tool_choice="none"`: a tool call the model writes anyway is text of the reply, not a call.
    tools_off: bool = False
    # The reply's first tokens, fixed (`tool_choice="required"` or a named function opens the
    # call): the last of `prompt_ids` for the model, the first of the reply for everyone else.
    forced: tuple[int, ...] = ()


@dataclass(slots=True)
class GenerationResult:
    """What was sampled: token ids (an EOS that ended the row included), their raw logprobs,
    why the row ended, the stop string that ended it, and the most rows it shared a step with."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason = "length"
    stop_string: str | None = None
    batch_size: int = 1


# The client a request comes from, as `honed serve` names it (set around each request's calls):
# local models put it on their `GenerationRequest`s.
current_client: ContextVar[str | None] = ContextVar("honed_serving_client", default=None)


class PerClient:
    """At most `limit` of one client's requests in a section at once (others wait their turn);
    other clients never wait on them. Parsing a body holds the GIL: one client posting 8 MB bodies
    16 at a time delayed another client's small request by 4-10 s (a QA pass, session 15)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str | None, tuple[asyncio.Semaphore, int]] = {}

    @asynccontextmanager
    async def turn(self, client: str | None) -> AsyncIterator[None]:
        await self.acquire(client)
        try:
            yield
        finally:
            self.release(client)

    async def acquire(self, client: str | None) -> None:
        """Wait for a turn (`release` gives it back: for work that outlives its waiter)."""
        semaphore, users = self._held.get(client) or (asyncio.Semaphore(self.limit), 0)
        self._held[client] = (semaphore, users + 1)
        try:
            await semaphore.acquire()
        except BaseException:
            self._leave(client)
            raise

    def release(self, client: str | None) -> None:
        self._held[client][0].release()
        self._leave(client)

    def _leave(self, client: str | None) -> None:
        semaphore, users = self._held[client]
        if users <= 1:
            del self._held[client]
        else:
            self._held[client] = (semaphore, users - 1)


_CLOSE = object()
_JOIN_EVERY_WINDOWS = 2  # newcomers join a running batch at most every 2 windows (10 ms), or at once if many
_SOLO_S = 1.0  # after a batch of one, for this long, a new request starts without a window
# A prefill beside a running batch runs about this long between the batch's steps (a chunk of
# positions sized by the prefill speed measured): a long prompt prefilled whole held every other
# row's next token for its whole length (21 s for 8,000 tokens of a 25M-parameter model).
PREFILL_SLICE_S = float(os.environ.get("HONED_PREFILL_SLICE_MS", "100")) / 1000.0
_MIN_SLICE_S = 0.01


class BatchGenerator:
    """Owns one model's generation thread. Thread-safe `submit`; `close` finishes the rows
    running and fails what is still queued."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        eos_ids: Sequence[int],
        pad_id: int,
        max_batch: int = DEFAULT_MAX_BATCH,
        window_s: float = DEFAULT_WINDOW_S,
        threads: int | None = None,
        name: str = "model",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.pad_id = int(pad_id)
        self.max_batch = max(1, int(max_batch))
        # Rows one client may hold: an eighth of the batch stays free for the others (one client's
        # 64 long rows made everyone else wait minutes, a QA pass found).
        self.client_cap = max(1, self.max_batch - max(1, self.max_batch // 8))
        self._held: list[_Row] = []  # rows of clients at their cap, in arrival order
        self.window_s = max(0.0, float(window_s))
        self.threads = threads
        accepted = inspect.signature(model.forward).parameters
        self._keeps_logits = "logits_to_keep" in accepted
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"  # renamed in transformers 5
        self.stats = {"steps": 0, "rows": 0, "tokens": 0, "max_rows": 0, "joins": 0, "prefill_tokens": 0}
        self.prefill_rate: float | None = None  # positions a second, measured (see `_Prefill`)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"honed-generate[{name}]", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        """Queue the request; a request no sampler can run fails at once (`ValueError`), alone."""
        future: Future[GenerationResult] = Future()
        if self._closed:
            future.set_exception(GeneratorClosed("this model was closed; call the served model again"))
            return future
        problem = _refusal(request, self.vocab_size)
        if problem is not None:
            future.set_exception(InvalidGeneration(problem))
            return future
        self._queue.put((request, future))
        return future

    @property
    def vocab_size(self) -> int | None:
        """Rows of the output layer: the token ids a prompt may hold."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        size = getattr(head, "out_features", None) or getattr(self.model.config, "vocab_size", None)
        return int(size) if size else None

    def close(self, timeout: float = 30.0) -> None:
        """Finish the rows in progress, fail queued requests, stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_CLOSE)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def rows_per_step(self) -> float:
        """Mean rows decoded together per step since the stats were last reset."""
        return self.stats["rows"] / max(1, self.stats["steps"])

    # -- the generation thread ---------------------------------------------------------------

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # per OS thread: the caller's setting is untouched
        batch: _Batch | None = None
        prefilling: _Prefill | None = None  # newcomers prefilled a chunk at a time between steps
        waiting: list[_Row] = []
        closing, last_join = False, 0.0
        solo_until = 0.0  # a lone caller calling again soon does not wait for company
        step_s = PREFILL_SLICE_S  # how long a decoding step takes, lately
        while True:
            busy = (batch.rows if batch else []) + (prefilling.rows if prefilling else [])
            if not busy and not waiting and not self._held:
                if closing:
                    break
                first = self._queue.get()
                if first is _CLOSE:
                    break
                waiting, closing = self._collect(first, wait=time.monotonic() > solo_until)
            else:
                more, seen_close = self._drain(self.max_batch - len(waiting) - len(busy))
                waiting += more
                closing = closing or seen_close
            waiting = self._within_caps(busy, [r for r in waiting if not r.abandoned()])
            now = time.monotonic()
            # Newcomers join a running batch in groups: each join is a prefill plus a copy of the
            # KV cache, worth paying for a few rows at a time, not for every single arrival.
            join_due = batch is None or (
                batch.mergeable
                and (
                    len(waiting) >= max(4, batch.size // 4)
                    or now - last_join >= self.window_s * _JOIN_EVERY_WINDOWS
                )
            )
            slice_positions = int(self.prefill_rate * PREFILL_SLICE_S) if self.prefill_rate else None
            if waiting and join_due:
                # Short prompts start at once, whatever long ones wait or are being prefilled;
                # long ones are prefilled a slice at a time, one group after another. A group of
                # long prompts prefilled whole while no batch ran held every request that arrived
                # meanwhile: another client's ~2,000-token prompts with max_tokens=1 kept an honest
                # client's replies at 1-6 s, not 22 ms (a QA pass, session 28).
                quick, slow = _quick_first(waiting, slice_positions)
                if quick and (prefilling is None or prefilling.mergeable):
                    batch, quick, last_join = self._join(batch, self._prefill_isolated, quick), [], now
                if slow and prefilling is None:
                    prefilling, slow = _Prefill(self, slow), []
                left = set(map(id, quick + slow))
                waiting = [r for r in waiting if id(r) in left]
            if prefilling is not None:
                # Beside a running batch, a slice of prefill takes about as long as one of its
                # steps: the rows decoding and the prompts waiting share the time (a 100 ms slice
                # between 5 ms steps held an honest client's few tokens ~0.3-1 s, a QA pass, session 28).
                share = PREFILL_SLICE_S if batch is None else min(PREFILL_SLICE_S, max(step_s, _MIN_SLICE_S))
                try:
                    newcomers = prefilling.advance(
                        int(self.prefill_rate * share) if self.prefill_rate else None
                    )
                except Exception:  # the rows that fail alone fail; the others start whole
                    newcomers, rows = None, prefilling.rows
                    batch = self._join(batch, self._prefill_isolated, rows)
                    prefilling = None
                if newcomers is not None:
                    batch = self._join(batch, lambda _, ready=newcomers: ready, prefilling.rows)
                    prefilling = None
            if batch is not None:
                started = time.perf_counter()
                try:
                    peak, batch = batch.peak, self._step(batch)
                except BaseException as exc:
                    self._fail(batch.rows, exc)
                    batch = None
                else:
                    step_s = (step_s + time.perf_counter() - started) / 2
                    if batch is None:
                        solo_until = time.monotonic() + _SOLO_S if peak == 1 else 0.0
        self._fail_queued()

    def _join(
        self, batch: _Batch | None, prefill: Callable[[list[_Row]], _Batch | None], rows: list[_Row]
    ) -> _Batch | None:
        """`batch` with `rows` prefilled (by `prefill`) and merged in; a failure fails those rows."""
        try:
            newcomers = prefill(rows)
        except BaseException as exc:  # one bad batch must not kill the thread; every caller hears why
            self._fail([r for r in rows if not r.future.done()], exc)
            return batch
        if newcomers is None:
            return batch
        self.stats["joins"] += 1
        if batch is None:
            return newcomers
        if newcomers.shared is not None or any(r.request.max_new_tokens <= 1 for r in newcomers.rows):
            # Their first token drawn apart: rows done at once (`max_tokens=1`) never copy their
            # cache into the batch, and rows sharing a prompt have theirs copied first. (Others
            # merge as they are: a step apart is one more forward pass.)
            try:
                newcomers = self._step(newcomers)
            except BaseException as exc:
                self._fail(newcomers.rows, exc)
                return batch
        return batch if newcomers is None else batch.merge(newcomers)

    def _within_caps(self, busy: list[_Row], arrived: list[_Row]) -> list[_Row]:
        """The rows to start now, from those held back earlier and the new ones: taken client by
        client, the client holding the fewest rows first (ties: first come), each client up to
        `client_cap` rows of those running or being prefilled (`busy`); and a client's rows past
        its first leave `max_batch - client_cap` rows free, for clients holding none. (Two heavy
        clients at 7/8 of the batch each filled it: a third waited minutes, a QA pass found.)
        The rest wait, in order."""
        waiting = [r for r in self._held if not r.abandoned()] + arrived
        running = Counter(r.request.client for r in busy)
        room = self.max_batch - len(busy)
        shared = self.client_cap  # rows for clients' second and later rows: the rest is the reserve
        queues: dict[str | None, list[_Row]] = {}
        for row in waiting:
            queues.setdefault(row.request.client, []).append(row)
        start: list[_Row] = []
        while queues and len(start) < room:
            client = min(queues, key=lambda c: running[c])  # insertion order breaks ties
            allowed = (
                client is None
                or running[client] == 0
                or (running[client] < self.client_cap and len(busy) + len(start) < shared)
            )
            if not allowed:
                del queues[client]  # this client waits for a row of its own to end
                continue
            start.append(queues[client].pop(0))
            running[client] += 1
            if not queues[client]:
                del queues[client]
        started = set(map(id, start))
        self._held = [r for r in waiting if id(r) not in started]
        return start

    def _collect(self, first: Any, *, wait: bool) -> tuple[list[_Row], bool]:
        """The first request plus those arriving within `window_s` of the previous one, up to
        `max_batch`, so concurrent callers start together (later ones join between steps).
        Without `wait` (a lone caller's next call), only what is queued already."""
        items = [first]
        while len(items) < self.max_batch:
            try:
                item = (
                    self._queue.get(timeout=self.window_s)
                    if wait and self.window_s > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is _CLOSE:
                return [_Row(*i) for i in items], True
            items.append(item)
        return [_Row(*i) for i in items], False

    def _drain(self, room: int) -> tuple[list[_Row], bool]:
        rows: list[_Row] = []
        while len(rows) < room:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _CLOSE:
                return rows, True
            rows.append(_Row(*item))
        return rows, False

    def _fail(self, rows: list[_Row], exc: BaseException) -> None:
        log.error("honed: generation failed for %d rows", len(rows), exc_info=exc)
        for row in rows:
            if not row.future.done():
                row.future.set_exception(exc)

    def _fail_queued(self) -> None:
        for row in self._held:
            if not row.future.done():
                row.future.set_exception(GeneratorClosed("this model was closed before the request ran"))
        self._held = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _CLOSE:
                item[1].set_exception(GeneratorClosed("this model was closed before the request ran"))

    def _prefill_isolated(self, rows: list[_Row]) -> _Batch | None:
        """`_prefill`, and when the group fails, each row on its own: the rows that fail alone
        fail, the others are prefilled together again. None when no row is left."""
        try:
            return self._prefill(rows)
        except Exception as exc:
            if len(rows) == 1:
                self._fail(rows, exc)
                return None
        good = []
        for row in rows:
            try:
                self._prefill([row])
            except Exception as exc:
                self._fail([row], exc)
            else:
                good.append(row)
        return self._prefill(good) if good else None

    def _prefill(self, rows: list[_Row]) -> _Batch:
        """The newcomers' prompts run as one batch, whole: their cache and the logits of their
        first token (see `_Prefill`)."""
        batch = _Prefill(self, rows).advance(None)
        assert batch is not None
        return batch

    def _step(self, batch: _Batch) -> _Batch | None:
        """Sample one token for every row; rows that end leave (their callers get their result
        now); the rest run one forward pass. Returns the batch, or None once it is empty."""
        tokens, logprobs, failed = _sample(batch.rows, batch.logits)
        size = batch.size
        self.stats["steps"] += 1
        self.stats["rows"] += size
        self.stats["max_rows"] = max(self.stats["max_rows"], size)
        keep = []
        for j, row in enumerate(batch.rows):
            row.result.batch_size = max(row.result.batch_size, size)
            if j in failed:  # this row alone: its batch-mates go on
                self._fail([row], failed[j])
            elif row.record(tokens[j], logprobs[j], self):
                keep.append(j)
            else:
                self.stats["tokens"] += len(row.result.token_ids)
                if not row.future.done():
                    row.future.set_result(row.result)
        if not keep:
            return None
        next_tokens = torch.tensor(tokens, dtype=torch.long, device=batch.mask.device)
        if len(keep) < size:
            next_tokens = next_tokens[torch.tensor(keep, device=next_tokens.device)]
        if len(keep) < size or batch.shared is not None:
            batch.select(keep)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.size, 1))], dim=-1)
        with torch.inference_mode():
            batch.logits = self._forward(next_tokens[:, None], batch.mask, batch.next_position, batch.cache)
        batch.next_position = batch.next_position + 1
        return batch

    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        extra: dict[str, Any] = {"logits_to_keep": 1} if self._keeps_logits else {}
        extra[self._cache_arg] = cache
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra
        )
        return out.logits[:, -1].float()


class _Row:
    """One request in flight: its future and what it has sampled so far."""

    __slots__ = ("future", "request", "result", "stop_window")

    def __init__(self, request: GenerationRequest, future: Future[GenerationResult]) -> None:
        self.request = request
        self.future = future
        self.result = GenerationResult(batch_size=0)
        # Tokens enough to hold the longest stop string: a byte-level tokenizer may spend one on
        # each of its UTF-8 bytes (an emoji is 4): counted in characters, `stop=["😀"]` never stopped.
        self.stop_window = max((len(s.encode("utf-8", "surrogatepass")) for s in request.stop), default=0) + 2

    def abandoned(self) -> bool:
        """Cancelled before it started (its caller went away): it never takes a row."""
        if self.request.cancelled and not self.future.done():
            self.future.cancel()
        return self.request.cancelled or self.future.cancelled()

    def record(self, token: int, logprob: float, generator: BatchGenerator) -> bool:
        """Keep the token; stream it; False when the row has ended."""
        request, result = self.request, self.result
        result.token_ids.append(token)
        result.logprobs.append(logprob)
        if request.on_token is not None:
            try:
                request.on_token(token, logprob)
            except Exception:  # a consumer's bug must not stop the other rows
                log.exception("honed: a token callback failed; the row is cancelled")
                request.cancelled = True
        if token in generator.eos_ids:
            result.finish_reason = "stop"
        elif request.stop and (matched := self._stop_string(generator.tokenizer)) is not None:
            result.stop_string, result.finish_reason = matched, "stop"
        elif len(result.token_ids) >= request.max_new_tokens:
            result.finish_reason = "length"
        elif request.cancelled or self.future.cancelled():
            result.finish_reason = "cancelled"
        else:
            return True
        return False

    def _stop_string(self, tokenizer: Any) -> str | None:
        text = tokenizer.decode(self.result.token_ids[-self.stop_window :], skip_special_tokens=True)
        return next((s for s in self.request.stop if s in text), None)


def _quick_first(rows: list[_Row], slice_positions: int | None) -> tuple[list[_Row], list[_Row]]:
    """The rows to prefill whole now (shortest prompts first, up to two slices of positions) and
    the rest, in their order, for a prefill slice by slice."""
    if slice_positions is None:  # no prefill measured yet: all of them at once
        return rows, []
    quick: list[_Row] = []
    for row in sorted(rows, key=lambda r: len(r.request.prompt_ids)):
        if _Prefill.positions_of([*quick, row]) > 2 * slice_positions:
            break
        quick.append(row)
    started = set(map(id, quick))
    return quick, [r for r in rows if id(r) not in started]


class _Prefill:
    """Newcomers' prompts left-padded into one batch and run through the model, whole or a chunk of
    positions at a time (between a running batch's steps, so that a long prompt does not hold
    every other row's next token for its whole length). Rows with the same prompt (a request's
    `n` samples) share one prefill: its cache is copied to each (n=16 ran a long prompt 16 times)."""

    def __init__(self, generator: BatchGenerator, rows: list[_Row]) -> None:
        self.generator, self.rows = generator, rows
        device = generator.model.device
        distinct: dict[tuple[int, ...], int] = {}
        self.which = [distinct.setdefault(tuple(r.request.prompt_ids), len(distinct)) for r in rows]
        prompts = list(distinct)
        self.width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), self.width), generator.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), self.width), dtype=torch.long)
        for i, prompt in enumerate(prompts):  # left padding: every row ends where generation starts
            input_ids[i, self.width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, self.width - len(prompt) :] = 1
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
        self.input_ids, self.mask = input_ids.to(device), mask.to(device)
        self.cache = _growing(DynamicCache(config=generator.model.config))
        self.done = 0  # positions run so far

    @property
    def mergeable(self) -> bool:
        """Whether its batch can merge with one that starts meanwhile."""
        return _mergeable(self.cache)

    @staticmethod
    def positions_of(rows: list[_Row]) -> int:
        """Positions a prefill of `rows` runs (distinct prompts x the longest)."""
        prompts = {tuple(r.request.prompt_ids) for r in rows}
        return len(prompts) * max(len(p) for p in prompts)

    def advance(self, budget: int | None) -> _Batch | None:
        """Run the next chunk (about `budget` positions, all rows together; None: the rest); the
        batch once the whole prompt has run, else None."""
        distinct = self.input_ids.shape[0]
        # At least 16 positions a row: a chunk writes into the growing cache in place, and a chunk
        # of 128 (the floor before) held a decoding row 30 ms a token beside a long prompt.
        end = self.width if budget is None else min(self.width, self.done + max(16, budget // distinct))
        started = time.perf_counter()
        with torch.inference_mode():
            logits = self.generator._forward(
                self.input_ids[:, self.done : end],
                self.mask[:, :end],
                self.positions[:, self.done : end],
                self.cache,
            )
        rate = distinct * (end - self.done) / max(time.perf_counter() - started, 1e-6)
        known = self.generator.prefill_rate
        self.generator.prefill_rate = rate if known is None else (known + rate) / 2
        self.generator.stats["prefill_tokens"] += int(self.mask[:, self.done : end].sum())
        self.done = end
        if end < self.width:
            return None
        shared = None
        if distinct < len(self.rows):  # the cache copied to each row once its first token is drawn
            shared = torch.tensor(self.which, device=self.mask.device)
            logits = logits[shared]
        return _Batch(self.rows, self.cache, self.mask, self.positions[:, -1:] + 1, logits, shared)


class _Batch:
    """Rows decoding together: their KV cache, attention mask, next positions, next-token logits."""

    def __init__(
        self,
        rows: list[_Row],
        cache: Any,
        mask: torch.Tensor,
        next_position: torch.Tensor,
        logits: torch.Tensor,
        shared: torch.Tensor | None = None,
    ) -> None:
        self.rows, self.cache, self.mask = rows, cache, mask
        self.next_position, self.logits = next_position, logits
        # Rows sharing a prompt's prefill: the cache row (and mask, position) of each. Copied to
        # each row that goes on after its first token (`select`), not before: `n=16` with
        # `max_tokens=1` copied a 1,900-token cache sixteen times for nothing (300 ms a request,
        # every other row waiting, a QA pass, session 28).
        self.shared = shared
        self.peak = len(rows)
        self.mergeable = _mergeable(cache)

    @property
    def size(self) -> int:
        return len(self.rows)

    def select(self, keep: list[int]) -> None:
        """Keep only these rows, and drop the leading columns no remaining row attends to."""
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[j] for j in keep]
        if self.shared is not None:
            index, self.shared = self.shared[index], None
        self.cache.batch_select_indices(index)
        self.mask, self.next_position = self.mask[index], self.next_position[index]
        start = int(self.mask.any(dim=0).int().argmax())
        if start > 0 and self.mergeable:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]

    def merge(self, other: _Batch) -> _Batch:
        """One batch of both: caches and masks left-padded to the same length, then stacked."""
        for batch in (self, other):  # a prompt's cache shared by its rows: each row its own first
            if batch.shared is not None:  # (a merge with it shared failed the rows after it, a QA pass)
                batch.select(list(range(batch.size)))
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(other.mask, width)])
        self.next_position = torch.cat([self.next_position, other.next_position])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows = self.rows + other.rows
        self.peak = max(self.peak, len(self.rows))
        return self


class _GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose keys and values live in a buffer with room to grow: a
    step writes its token in place. `DynamicLayer` concatenates, copying the whole cache every
    step (at 48 rows of 600 positions, 83% of a decoding step's time). `keys`/`values` are views
    of the buffer; whoever replaces them (a merge, a selection) makes the next update start a new
    buffer from what they hold."""

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = 0 if self.keys.numel() == 0 else self.keys.shape[-2]
        needed = held + key_states.shape[-2]
        buffer = self._key_buffer
        ours = (
            buffer is not None
            and self.keys.data_ptr() == buffer.data_ptr()
            and self.keys.shape[:-2] == key_states.shape[:-2]
        )
        if not ours or buffer.shape[-2] < needed:
            room = needed + max(64, needed // 2)
            self._key_buffer = self._grown(self.keys, key_states, held, room)
            self._value_buffer = self._grown(self.values, value_states, held, room)
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[..., held:needed, :] = key_states
        self._value_buffer[..., held:needed, :] = value_states
        self.keys = self._key_buffer[..., :needed, :]
        self.values = self._value_buffer[..., :needed, :]
        return self.keys, self.values

    @staticmethod
    def _grown(held: torch.Tensor, new: torch.Tensor, length: int, room: int) -> torch.Tensor:
        buffer = new.new_empty((*new.shape[:-2], room, new.shape[-1]))
        if length:
            buffer[..., :length, :] = held
        return buffer


def _mergeable(cache: Any) -> bool:
    """Joining needs plain growing caches (full attention); other layouts run batch by batch."""
    return all(type(layer) in (DynamicLayer, _GrowingLayer) for layer in getattr(cache, "layers", ()))


def _growing(cache: Any) -> Any:
    """`cache` with its plain full-attention layers growing in place (`_GrowingLayer`)."""
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list):
        cache.layers = [_GrowingLayer() if type(layer) is DynamicLayer else layer for layer in layers]
    return cache


def _left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - states.shape[-2]
    if missing <= 0:
        return states
    pad = states.new_zeros((*states.shape[:-2], missing, states.shape[-1]))
    return torch.cat([pad, states], dim=-2)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return mask if missing <= 0 else torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)


def _refusal(request: GenerationRequest, vocab: int | None) -> str | None:
    """Why no sampler can run this request, or None."""
    ids = request.prompt_ids
    if len(ids) == 0:
        return "the prompt is empty"
    if vocab is not None and (int(min(ids)) < 0 or int(max(ids)) >= vocab):
        return f"the prompt holds token ids outside the vocabulary (0..{vocab - 1})"
    budget = request.max_new_tokens
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        return f"max_new_tokens must be a positive integer ({budget!r} given)"
    temperature, top_p, top_k = request.temperature, request.top_p, request.top_k
    if not isinstance(temperature, int | float) or not math.isfinite(temperature) or temperature < 0:
        return f"temperature must be a finite number >= 0 ({temperature!r} given)"
    if not isinstance(top_p, int | float) or not 0 < top_p <= 1:  # NaN fails the comparison too
        return f"top_p must be in (0, 1] ({top_p!r} given)"
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        return f"top_k must be an integer >= 0 ({top_k!r} given)"
    return None


def _sample(
    rows: list[_Row], logits: torch.Tensor
) -> tuple[list[int], list[float], dict[int, BaseException]]:
    """Next token per row under its own settings, its raw log-probability (before warping), and
    the rows that could not be sampled (by index, with why): they fail alone. A row whose scores
    hold NaN or no finite value fails at once; if sampling the rest together fails anyway, each
    is sampled on its own."""
    size = len(rows)
    tokens, chosen = [0] * size, [0.0] * size
    failed: dict[int, BaseException] = {}
    broken = torch.isnan(logits).any(dim=-1) | ~torch.isfinite(logits).any(dim=-1)
    if bool(broken.any()):
        for j in broken.nonzero().flatten().tolist():
            failed[j] = FloatingPointError("the model's scores for this request are not numbers")
    good = [j for j in range(size) if j not in failed]
    try:
        _draw(rows, logits, good, tokens, chosen)
    except Exception:
        for j in good:
            try:
                _draw(rows, logits, [j], tokens, chosen)
            except Exception as exc:
                failed[j] = exc
    return tokens, chosen, failed


def _draw(
    rows: list[_Row], all_logits: torch.Tensor, index: list[int], tokens: list[int], chosen: list[float]
) -> None:
    """Sample rows `index` of the batch into `tokens`/`chosen`; raises if any row cannot be."""
    if not index:
        return
    logits = (
        all_logits if len(index) == len(rows) else all_logits[torch.tensor(index, device=all_logits.device)]
    )
    logprobs = torch.log_softmax(logits, dim=-1)
    requests = [rows[j].request for j in index]
    greedy = torch.tensor([not r.temperature >= GREEDY_BELOW for r in requests], device=logits.device)
    if bool(greedy.all()):
        picked = logits.argmax(dim=-1)
    else:
        temperature = torch.tensor(
            [r.temperature if r.temperature >= GREEDY_BELOW else 1.0 for r in requests], device=logits.device
        )
        scores = logits / temperature[:, None]
        vocab = scores.shape[-1]
        top_k = [r.top_k if 0 < r.top_k < vocab else vocab for r in requests]
        if min(top_k) < vocab:
            kth = torch.sort(scores, dim=-1, descending=True).values.gather(
                1, torch.tensor(top_k, device=logits.device)[:, None] - 1
            )
            scores = scores.masked_fill(scores < kth, float("-inf"))
        top_p = torch.tensor(
            [min(max(r.top_p, 0.0), 1.0) if r.top_p == r.top_p else 1.0 for r in requests],
            device=logits.device,
        )[:, None]
        if bool((top_p < 1.0).any()):
            ordered, order = torch.sort(scores, dim=-1, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            beyond = (probs.cumsum(dim=-1) - probs) > top_p
            beyond[:, 0] = False  # the most likely token always stays
            scores = scores.masked_fill(beyond.scatter(-1, order, beyond), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if not bool(torch.isfinite(probs).all()):
            raise FloatingPointError("sampling scores for this request are not numbers")
        picked = torch.multinomial(probs, num_samples=1).squeeze(1)
        if bool(greedy.any()):
            picked = torch.where(greedy, logits.argmax(dim=-1), picked)
    values = logprobs.gather(1, picked[:, None]).squeeze(1)
    for j, token, value in zip(index, picked.tolist(), values.tolist(), strict=True):
        tokens[j], chosen[j] = token, value
