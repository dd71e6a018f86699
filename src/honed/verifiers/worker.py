"""The background worker: claim unlabeled trajectories in batches, run the verifiers that apply, store verdicts.

    >>> worker = Worker(store, verifiers=[ReferenceMatch(), TestSuite()], concurrency=2)
    >>> worker.run_once()      # label what is unlabeled now; returns how many trajectories were settled
    >>> worker.run_forever()   # keep polling; SIGTERM/SIGINT finish in-flight work and stop cleanly

Guarantees:
- **One verdict per verifier.** "Unlabeled" means lacking a verdict from an applicable verifier's
  name@version; the worker's set of verifiers is its *queue*, so a new version labels everything
  again. Claims are leases (see `honed.store.verification`): any number of workers on any number of
  machines never work on the same trajectory at once, and a crashed worker's claims come back.
- **Errors are errors.** A verifier that raises is recorded with its traceback, one that runs past
  its deadline as `VerifierTimeout`; both are `passed=None` verdicts (never passes), retried with
  exponential backoff up to `max_attempts`, after which the error verdict stays.
- **The worker survives.** Verifier calls run on the worker's threads under a deadline; a call past
  it is recorded as `VerifierTimeout` at once, its thread abandoned and the pool replaced, so a hung
  in-process verifier costs one leaked (logged) thread, never the worker. Code that can truly hang
  belongs in a subprocess, as `TestSuite` does. Store outages are retried with backoff by
  `run_forever`.
- **Clean shutdown.** On stop, claimed items not yet started are released (pending again, the
  attempt not counted), in-flight ones finish and are written.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import signal
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from honed.store.signing import content_digest
from honed.store.verification import Claim, ClaimOutcome
from honed.trajectory import Trajectory, Verdict, is_verifier_error
from honed.verifiers.protocol import (
    VerifierTimeout,
    error_verdict,
    names,
    trust_of,
    verdict,
    verifier_key,
    verifier_name,
)
from honed.verifiers.routing import applicable

log = logging.getLogger("honed.verifiers")


@dataclass(slots=True)
class WorkerStats:
    """Counts since the worker started."""

    claimed: int = 0
    settled: int = 0
    verdicts: int = 0
    passed: int = 0
    failed: int = 0
    failed_runs: int = 0  # of the fails: the agent's run had raised (no check was needed to tell)
    undecided: int = 0
    errors: int = 0
    timeouts: int = 0
    retries: int = 0
    released: int = 0
    lost: int = 0
    store_errors: int = 0


@dataclass(slots=True)
class _Job:
    """One claimed trajectory's verification, shared by its verifier thread and the main loop."""

    trajectory: Trajectory
    claim: Claim
    todo: list[Any]
    digest: str | None = None  # of the content judged, taken before any verifier saw it
    verdicts: list[Verdict] = field(default_factory=list)
    current: Any = None
    deadline: float = math.inf
    abandoned: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def queue_name(verifiers: Iterable[Any]) -> str:
    """The queue a set of verifiers works on: their sorted name@version list (hashed when long)."""
    text = ",".join(sorted(names(verifiers)))
    return text if len(text) <= 200 else "h:" + hashlib.sha256(text.encode()).hexdigest()


class Worker:
    """Labels trajectories of `store` with `verifiers`; see the module docstring.

    Args:
        concurrency: trajectories verified at once (threads; sandboxed tests use one process each).
        batch_size: trajectories claimed per round trip (default 8 per unit of concurrency).
        lease_s: how long a claim lasts without renewal; a crashed worker's work returns after it.
        timeout_s: deadline of one verifier call, unless the verifier sets its own `timeout_s`.
        max_attempts: claims of one trajectory before its errors are final.
        backoff_s: first retry delay after an error; doubles per attempt up to `max_backoff_s`.
        poll_s: `run_forever`'s wait when there is nothing to do.
        on_progress: called with `WorkerStats` after each write (the CLI draws its progress bar).
    """

    def __init__(
        self,
        store: Any,
        verifiers: Iterable[Any],
        *,
        concurrency: int = 2,
        batch_size: int | None = None,
        lease_s: float = 60.0,
        timeout_s: float = 60.0,
        max_attempts: int = 3,
        backoff_s: float = 5.0,
        max_backoff_s: float = 600.0,
        poll_s: float = 2.0,
        flush_s: float = 0.5,
        owner: str | None = None,
        queue: str | None = None,
        on_progress: Callable[[WorkerStats], None] | None = None,
        only: Collection[str] | None = None,
    ) -> None:
        self.store = store
        # Only these trajectories (a gate's round): a worker over the whole store labelled every
        # other agent's runs its verifiers had not seen (a QA pass, session 21).
        self.only = only
        self.verifiers = list(verifiers)
        if not self.verifiers:
            raise ValueError("a worker needs at least one verifier")
        keys = [verifier_key(v) for v in self.verifiers]
        if len(set(keys)) != len(keys):
            raise ValueError(f"two verifiers share a name and version: {names(self.verifiers)}")
        for what, value in (
            ("concurrency", concurrency),
            ("batch_size", batch_size or 1),
            ("max_attempts", max_attempts),
        ):
            if value < 1:
                raise ValueError(f"{what} must be at least 1, not {value}")
        for what, value in (("lease_s", lease_s), ("timeout_s", timeout_s), ("poll_s", poll_s)):
            if not value > 0:
                raise ValueError(f"{what} must be a positive number of seconds, not {value}")
        self.concurrency = concurrency
        self.batch_size = batch_size or 8 * self.concurrency
        self.lease_s, self.timeout_s = lease_s, timeout_s
        self.max_attempts, self.backoff_s, self.max_backoff_s = max_attempts, backoff_s, max_backoff_s
        self.poll_s, self.flush_s = poll_s, flush_s
        # Signed, a queue of the key's own: runs judged before it was set, or under another key
        # (their verdicts do not count here), are judged again, once.
        signer = getattr(store, "signer", None)
        signed = f"+signed:{signer.fingerprint}" if signer is not None else ""
        self.queue = queue or queue_name(self.verifiers) + signed
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.on_progress = on_progress
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._pool: _DaemonPool | None = None
        self._in_flight: dict[Future[ClaimOutcome | None], _Job] = {}
        self._buffer: list[ClaimOutcome] = []
        self._prepared = False
        self._hung = 0

    # -- running ------------------------------------------------------------------------------

    def run_once(self, *, install_signal_handlers: bool = False) -> int:
        """Label everything claimable now; returns how many trajectories were settled. With
        `install_signal_handlers` (`honed verify --once`), SIGTERM/SIGINT stop it as `stop()` does:
        what is in flight finishes and is written, the rest is released."""
        restore = self._install_signal_handlers() if install_signal_handlers else {}
        try:
            self._prepare()
            return self._pump(until_idle=True)
        finally:
            for signum, handler in restore.items():
                signal.signal(signum, handler)

    def run_forever(self, *, install_signal_handlers: bool = True) -> int:
        """Poll and label until `stop()` (or SIGTERM/SIGINT when run in the main thread)."""
        restore = self._install_signal_handlers() if install_signal_handlers else {}
        # Counted as written, not as `_pump` returns: a store error loses the count of the pump it
        # ended (`honed verify --watch` said 0 checked after an outage, having settled many).
        before, failures = self.stats.settled, 0
        try:
            self._prepare_with_retry()
            while True:
                try:
                    self._pump(until_idle=False)
                    return self.stats.settled - before
                except SQLAlchemyError as exc:
                    failures += 1
                    self.stats.store_errors += 1
                    delay = self._backoff(failures)
                    log.warning("honed: store error (%s); retrying in %.1fs", type(exc).__name__, delay)
                    if self._stop.wait(delay) and not self._in_flight and not self._buffer:
                        return self.stats.settled - before
        finally:
            for signum, handler in restore.items():
                signal.signal(signum, handler)

    def stop(self) -> None:
        """Ask the worker to finish what it started and return."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        """Whether `stop()` (or SIGTERM/SIGINT) asked it to stop: `run_once` returned early."""
        return self._stop.is_set()

    def close(self) -> None:
        """Stop, and release the verifiers' resources (sandboxes, clients)."""
        self.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        for verifier in self.verifiers:
            if hasattr(verifier, "close"):
                try:
                    verifier.close()
                except Exception:
                    log.warning("honed: closing %s failed", verifier_name(verifier), exc_info=True)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the pipeline ---------------------------------------------------------------------------

    def _pump(self, *, until_idle: bool) -> int:
        """Keep the verifier threads fed with claimed trajectories and write what they settle.

        The next batch is claimed and loaded while the current one is still being verified, and
        verdicts are written in batches (every `flush_s` at most). Returns when there is no work
        left (`until_idle`) or after `stop()` once in-flight work is written."""
        settled = 0
        idle_since: float | None = None  # when a claim last came back empty
        last_flush = last_renew = time.monotonic()
        while True:
            stopping = self._stop.is_set()
            now = time.monotonic()
            polling_due = idle_since is None or now - idle_since >= self.poll_s
            if not stopping and len(self._in_flight) <= self.concurrency and polling_due:
                claims = self._claim()
                idle_since = None if claims else now
                self._submit(claims)
            if not self._in_flight:
                if self._buffer:
                    settled += self._flush()
                if stopping or (idle_since is not None and until_idle):
                    return settled
                if idle_since is not None:
                    self._stop.wait(self.poll_s)
                continue
            done, _ = wait(list(self._in_flight), timeout=self._wait_timeout(), return_when=FIRST_COMPLETED)
            for future in done:
                self._in_flight.pop(future)
                outcome = future.result()
                if outcome is not None:  # None: the job was abandoned after a timeout
                    self._buffer.append(outcome)
            self._expire_hung()
            if stopping:
                self._release_unstarted()
            now = time.monotonic()
            if self._buffer and (len(self._buffer) >= self.batch_size or now - last_flush >= self.flush_s):
                settled += self._flush()
                last_flush = now
            if self._in_flight and now - last_renew >= self.lease_s / 3:
                ids = [job.claim.trajectory_id for job in self._in_flight.values()]
                self.store.renew_claims(self.queue, self.owner, ids, lease_s=self.lease_s)
                last_renew = now

    def _claim(self) -> list[Claim]:
        only = None if self.only is None else list(self.only)
        claims = self.store.claim_verification(
            self.queue, self.owner, limit=self.batch_size, lease_s=self.lease_s, ids=only
        )
        if len(claims) < self.batch_size:
            # Claim again even when we enqueued nothing: another worker may just have.
            self.store.enqueue_verification(self.queue, ids=only)
            claims += self.store.claim_verification(
                self.queue, self.owner, limit=self.batch_size - len(claims), lease_s=self.lease_s, ids=only
            )
        return claims

    def _submit(self, claims: list[Claim]) -> None:
        if not claims:
            return
        self.stats.claimed += len(claims)
        found = {t.id: t for t in self.store.trajectories(ids=[c.trajectory_id for c in claims], limit=None)}
        pool = self._executor()
        signs = getattr(self.store, "signer", None) is not None
        for claim in claims:
            t = found.get(claim.trajectory_id)
            if t is None:  # deleted since it was enqueued (its claim went with it), or unreadable:
                self._buffer.append(ClaimOutcome(claim.trajectory_id))  # settled, with no verdict
                continue
            digest = content_digest(t) if signs else None
            have = {(v.verifier, v.version) for v in t.verdicts if not is_verifier_error(v)}
            try:
                todo = [v for v in applicable(self.verifiers, t) if verifier_key(v) not in have]
            except Exception as exc:  # a routing bug must not stop the worker
                log.exception("honed: routing %s failed", t.id)
                self._buffer.append(
                    ClaimOutcome(t.id, retry_at=self._retry_at(claim.attempts), error=str(exc), digest=digest)
                )
                continue
            if claim.attempts > self.max_attempts:
                reason = RuntimeError(
                    f"gave up after {claim.attempts - 1} attempts (a worker died or timed out each time)"
                )
                self._buffer.append(
                    ClaimOutcome(
                        t.id,
                        [error_verdict(v, t.id, reason, "", claim.attempts) for v in todo],
                        digest=digest,
                    )
                )
                continue
            job = _Job(t, claim, todo, digest)
            self._in_flight[pool.submit(self._work, job)] = job

    def _flush(self) -> int:
        outcomes, self._buffer = self._buffer, []
        try:
            held = self._with_store_retry(lambda: self.store.finish_claims(self.queue, self.owner, outcomes))
        except BaseException:
            self._buffer = outcomes + self._buffer  # written on the next try (or dropped with the lease)
            raise
        for outcome in outcomes:
            if outcome.trajectory_id not in held:
                self.stats.lost += 1
                log.warning(
                    "honed: lost the claim on %s (lease expired); its verdicts were dropped",
                    outcome.trajectory_id,
                )
                continue
            self.stats.settled += outcome.retry_at is None
            self.stats.retries += outcome.retry_at is not None
            for v in outcome.verdicts:
                self.stats.verdicts += 1
                if is_verifier_error(v):
                    self.stats.errors += 1
                elif v.passed is None:
                    self.stats.undecided += 1
                elif v.passed:
                    self.stats.passed += 1
                else:
                    self.stats.failed += 1
                    self.stats.failed_runs += "agent_error" in (v.evidence or {})
        if self.on_progress is not None:
            self.on_progress(self.stats)
        return sum(1 for o in outcomes if o.trajectory_id in held and o.retry_at is None)

    # -- one trajectory, on a verifier thread ------------------------------------------------------

    def _work(self, job: _Job) -> ClaimOutcome | None:
        """Run a job's verifiers in turn; None when the main loop abandoned it (a verifier hung)."""
        for verifier in job.todo:
            timeout = getattr(verifier, "timeout_s", None) or self.timeout_s
            with job.lock:
                if job.abandoned:
                    return None
                job.current, job.deadline = verifier, time.monotonic() + timeout
            result = self._call(verifier, job.trajectory, job.claim.attempts)
            with job.lock:
                if job.abandoned:
                    return None
                job.verdicts.append(result)
                job.current, job.deadline = None, math.inf
        return self._outcome(job)

    def _call(self, verifier: Any, t: Trajectory, attempt: int) -> Verdict:
        """One verifier call; whatever it raises or returns becomes a well-formed verdict."""
        started = time.perf_counter()
        try:
            handed_to = t.handed_off_to
            if handed_to is not None:  # not judged alone: the team's answer came later
                result = verdict(
                    None, f"handed the conversation to {handed_to[:80]!r}: a step of the team's run"
                )
            else:
                result = verifier.verify(t)
            if not isinstance(result, Verdict):
                raise TypeError(
                    f"{verifier_name(verifier)}.verify returned {type(result).__name__}, not a Verdict"
                )
            _check_verdict(result)
            if trust_of(verifier) == "low":
                result.evidence = {**(result.evidence or {}), "trust": "low"}
        except BaseException as exc:
            result = error_verdict(verifier, t.id, exc, traceback.format_exc(), attempt)
        result.verifier, result.version = verifier_key(verifier)
        result.trajectory_id = t.id
        result.duration_s = result.duration_s or (time.perf_counter() - started)
        return result

    def _outcome(self, job: _Job) -> ClaimOutcome:
        attempt, t = job.claim.attempts, job.trajectory
        errors = [v for v in job.verdicts if is_verifier_error(v)]
        retry = bool(errors) and attempt < self.max_attempts
        verdicts = list(job.verdicts)
        if errors and not retry:  # final: say why the verifiers after a hung one have no verdict
            ran = {(v.verifier, v.version) for v in verdicts}
            skipped = RuntimeError("not run: an earlier verifier of this trajectory hung")
            verdicts += [
                error_verdict(v, t.id, skipped, "", attempt) for v in job.todo if verifier_key(v) not in ran
            ]
        return ClaimOutcome(
            t.id,
            verdicts,
            self._retry_at(attempt) if retry else None,
            errors[0].reason if errors else None,
            job.digest,
        )

    def _expire_hung(self) -> None:
        """Give up on verifier calls past their deadline: an error verdict now, the thread abandoned."""
        now = time.monotonic()
        replaced = False
        for future, job in list(self._in_flight.items()):
            with job.lock:
                if job.current is None or job.abandoned or now < job.deadline:
                    continue
                job.abandoned = True
                timeout = getattr(job.current, "timeout_s", None) or self.timeout_s
                exc = VerifierTimeout(verifier_name(job.current), job.trajectory.id, timeout)
                hung = error_verdict(job.current, job.trajectory.id, exc, "", job.claim.attempts)
                hung.evidence["timeout_s"] = timeout
                hung.duration_s = timeout
                job.verdicts.append(hung)
            del self._in_flight[future]
            self._hung += 1
            self.stats.timeouts += 1
            log.warning(
                "honed: %s timed out after %.1fs on %s (%d verifier thread(s) abandoned)",
                verifier_name(job.current), timeout, job.trajectory.id, self._hung,
            )  # fmt: skip
            self._buffer.append(self._outcome(job))
            if not replaced:
                self._replace_pool()
                replaced = True

    def _replace_pool(self) -> None:
        """A hung call keeps its thread forever: move queued work to a fresh pool."""
        old, self._pool = self._pool, None
        if old is None:
            return
        pool = self._executor()
        for future, job in list(self._in_flight.items()):
            if future.cancel():
                del self._in_flight[future]
                self._in_flight[pool.submit(self._work, job)] = job
        old.shutdown(wait=False)

    def _release_unstarted(self) -> None:
        released = []
        for future, job in list(self._in_flight.items()):
            if future.cancel():
                del self._in_flight[future]
                released.append(job.claim.trajectory_id)
        if released:
            self.stats.released += self.store.release_claims(self.queue, self.owner, released)

    def _wait_timeout(self) -> float:
        deadline = min((job.deadline for job in self._in_flight.values()), default=math.inf)
        return max(0.005, min(self.flush_s, deadline - time.monotonic() + 0.001))

    # -- helpers ------------------------------------------------------------------------------

    def _prepare(self) -> None:
        if self._prepared:
            return
        self.store.register_verifiers({verifier_name(v): trust_of(v) for v in self.verifiers})
        for verifier in self.verifiers:
            if hasattr(verifier, "prepare"):
                verifier.prepare(self.store)
        self._prepared = True

    def _prepare_with_retry(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._prepare()
                return
            except SQLAlchemyError:
                failures += 1
                self.stats.store_errors += 1
                self._stop.wait(self._backoff(failures))

    def _executor(self) -> _DaemonPool:
        if self._pool is None:
            self._pool = _DaemonPool(self.concurrency, "honed-verify")
        return self._pool

    def _with_store_retry(self, fn: Callable[[], Any], attempts: int = 5) -> Any:
        for n in range(1, attempts + 1):
            try:
                return fn()
            except SQLAlchemyError:
                self.stats.store_errors += 1
                if n == attempts:
                    raise
                delay = self._backoff(n, cap=10.0)
                log.warning("honed: store write failed; retrying in %.1fs", delay, exc_info=True)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self, n: int, cap: float | None = None) -> float:
        return min(cap or self.max_backoff_s, self.backoff_s * 2 ** (n - 1))

    def _retry_at(self, attempt: int) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self._backoff(attempt))

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.getsignal(signum)
            signal.signal(signum, lambda *_: self.stop())
        return previous


class _DaemonPool:
    """`ThreadPoolExecutor`'s `submit`/`shutdown` on daemon threads. A verifier call that hangs
    keeps its thread forever; the executor's threads are joined at interpreter exit, so one hung
    call kept `honed verify --once` (and any script that ran a `Worker`) from ever exiting."""

    def __init__(self, workers: int, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None]
        self._queue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}_{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._queue.put((future, fn, args))
        return future

    def shutdown(self, wait: bool = False, cancel_futures: bool = False) -> None:
        """Stop the threads once their current call returns (a hung one never does: it is a daemon)."""
        while cancel_futures:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)


def _check_verdict(result: Verdict) -> None:
    """A verifier's verdict as the store keeps it, or the error that says why not: `passed` a
    real bool or None ("false" is not a fail to make a pass of), a score a number in [0, 1] (NaN,
    a 0/0 metric, clamped to 1.0 before), evidence a dict, the reason text."""
    if result.passed is not None and type(result.passed) is not bool:
        raise TypeError(f"passed must be True, False or None, not {result.passed!r}")
    score = result.score if result.score is not None else (1.0 if result.passed else 0.0)
    if isinstance(score, bool) or not isinstance(score, int | float) or math.isnan(score):
        raise TypeError(f"score must be a number in [0, 1], not {result.score!r}")
    result.score = max(0.0, min(1.0, float(score)))
    if result.evidence is not None and not isinstance(result.evidence, dict):
        raise TypeError(f"evidence must be a dict, not {type(result.evidence).__name__}")
    result.reason = str(result.reason or "")
