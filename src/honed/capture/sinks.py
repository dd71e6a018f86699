"""Where the writer sends finished trajectories: one small interface, the store and live exporters.

A `Sink` is what OpenTelemetry's `SpanExporter` is to its `BatchProcessor`: the recorder's one writer
thread hands each batch of finished records to every sink, in order, and a sink's failure never
reaches another sink or the agent. `StoreSink` is the durable path: the store, or the spool while
the store is down (replayed in order, nothing overtaking what waits). `ExporterSink` adapts a
live `TrajectoryExporter` (OTLP spans, a file) that wants `Trajectory` objects.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from honed._json import storable
from honed.capture.spool import Spool, default_spool_path
from honed.store import InvalidStoreURL, TrajectoryStore, record_to_trajectory, resolve_store_url
from honed.store.signing import KEY_ENV
from honed.trajectory import INTERRUPTED, Trajectory

log = logging.getLogger("honed")

Record = dict[str, Any]
_RETRY_MIN_S, _RETRY_MAX_S = 0.5, 30.0


class Sink(Protocol):
    """Receives batches of finished trajectory records on the writer thread."""

    def write(self, records: list[Record]) -> None: ...

    def idle(self) -> None:
        """Called when a drain had nothing to write (a chance to retry)."""

    def wait(self, timeout: float) -> bool:
        """Until what `write` took is written (a sink that writes elsewhere); True when it is."""

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class TrajectoryExporter(Protocol):
    """A live sink beside the store (OTLP, a file): called on the writer thread with each batch of
    finished trajectories, whether the store took them or they were spooled. Must not block long."""

    def export(self, trajectories: Sequence[Trajectory]) -> None: ...

    def shutdown(self) -> None: ...


STORE_COUNTERS = (
    "trajectories_written",
    "steps_written",
    "trajectories_spooled",
    "trajectories_replayed",
    "write_errors",
)


class StoreSink:
    """The store, with the spool as its fallback. Records go to the store; while it is down they are
    appended to the spool, and replayed in order (retried with backoff) once it answers, on the
    writer's timer: no new capture is needed. A URL that can never work (malformed, unsupported)
    is a configuration error: reported once, never retried; records wait in the spool for
    `honed spool --replay --store FIXED_URL`."""

    def __init__(self, store: str | TrajectoryStore | None, spool_path: str | Path | None = None) -> None:
        self._owns_store = not isinstance(store, TrajectoryStore)
        self._store: TrajectoryStore | None = store if isinstance(store, TrajectoryStore) else None
        self.store_url = store.url if isinstance(store, TrajectoryStore) else resolve_store_url(store)
        path = Path(spool_path) if spool_path else default_spool_path(self.store_url)
        self.spool = Spool(path, store=self.safe_url())
        self.error: str | None = None
        self.misconfigured: str | None = None
        self._retry_at = 0.0
        self._retry_delay = _RETRY_MIN_S
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(STORE_COUNTERS, 0)

    def write(self, records: list[Record]) -> None:
        if self.misconfigured or (self.spool.has_pending() and not self._replay_if_due()):
            self.to_spool(records)  # keep order: nothing overtakes what is already spooled
            return
        try:
            self._save(records)
        except Exception as exc:
            self._store_down(exc)
            self.to_spool(records)

    def idle(self) -> None:
        self._replay_if_due()

    def retry_now(self) -> None:
        """Try the store for what the spool holds now, not at the next retry (`flush()`, and so
        a normal exit: the backoff grows to 30 s, and runs spooled during an outage stayed in the
        spool at exit with the store back for seconds, a QA pass, session 27)."""
        if self.spool.has_pending() and not self.misconfigured:
            self._retry_at = 0.0
            self._replay_if_due()

    def wait(self, timeout: float) -> bool:
        return True  # `write` returns once the store (or the spool) has the records

    def stats(self) -> dict[str, Any]:
        return {**self.counts(), "spool_pending": self.spool.pending()}

    def counts(self) -> dict[str, Any]:
        """`stats()` without the spool's size (which reads the spool file)."""
        with self._lock:
            counts: dict[str, Any] = dict(self._counts)
        counts["store"] = self.safe_url()
        counts["store_error"] = self.misconfigured or self.error
        return counts

    def close(self) -> None:
        if self._store is not None and self._owns_store:
            self._store.close()

    def safe_url(self) -> str:
        from honed.store.store import safe_url

        try:
            return safe_url(self.store_url)
        except Exception:
            return f"<unparseable store URL of {len(self.store_url)} characters>"

    def _save(self, records: list[Record]) -> None:
        if self._store is None:
            # Capture writes no label: the verdict key is not read here (a QA pass, session 26: a
            # short one in the agent's environment stopped every capture), only warned of.
            if os.environ.get(KEY_ENV):
                log.warning(
                    "honed: %s is set in the process that captures: code running here (the agent's "
                    "tools) could sign labels; set it only where verifiers and training run",
                    KEY_ENV,
                )
            self._store = TrajectoryStore(self.store_url, verdict_key=False)
        self._store.save_records(records)
        with self._lock:
            self._counts["trajectories_written"] += len(records)
            self._counts["steps_written"] += sum(len(r["steps"]) for r in records)
        if self.error is not None:
            log.warning("honed: the store %s is reachable again", self.safe_url())
        self.error = None
        self._retry_delay = _RETRY_MIN_S

    def _replay_if_due(self) -> bool:
        """Replay the spool if it has records and a retry is due; True when it is now empty."""
        if not self.spool.has_pending():
            return True
        if self.misconfigured or time.monotonic() < self._retry_at:
            return False
        try:
            replayed = self.spool.replay(self._save)
        except Exception as exc:
            self._store_down(exc)
            return False
        with self._lock:
            self._counts["trajectories_replayed"] += replayed
        if replayed:
            log.warning("honed: replayed %d spooled trajectories into %s", replayed, self.safe_url())
        return True

    def to_spool(self, records: list[Record]) -> None:
        """Keep `records` in the spool, replayed into the store once it answers."""
        try:
            self.spool.append(records)
            with self._lock:
                self._counts["trajectories_spooled"] += len(records)
        except Exception:
            with self._lock:
                self._counts["write_errors"] += len(records)
            log.exception(
                "honed: could not write %d trajectories to the spool %s", len(records), self.spool.path
            )

    def _store_down(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        if isinstance(exc, InvalidStoreURL):
            # Not an outage: no retry can help. Said once, loudly; the records stay in the spool.
            self.misconfigured = f"configuration error: {exc}"
            log.error(
                "honed: %s. Captured runs are kept in the spool %s; move them to the right store with "
                "`honed spool --replay --from %s --store URL`",
                self.misconfigured,
                self.spool.path,
                self.spool.path,
            )
            return
        if self._store is not None and self._owns_store:
            # Opened anew at the next try: a store opened while it was down stays as it was opened
            # (a SQLite file not writable then is opened read-only), and every later write failed
            # with the file writable again, all runs spooled until a restart (a QA pass, session 28).
            self._store.close()
            self._store = None
        if self.error is None:
            log.warning(
                "honed: the store %s is unavailable (%s); spooling to %s",
                self.safe_url(),
                message,
                self.spool.path,
            )
        self.error = message
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX_S)


def _part_after_a_pause(record: Record) -> bool:
    """A resumed run's record that does not hold its pause (it was paused in another process)."""
    return bool(record.get("resumes")) and not any(
        isinstance(step, dict) and step.get("name") == "interrupt" for step in record.get("steps") or ()
    )


class ExporterSink:
    """A `TrajectoryExporter` as a sink: records become `Trajectory` objects once per batch. A run
    paused at an interrupt is not sent: it is not finished, and a backend that keeps the first copy
    of a span would keep the pause; resumed in this process, it is sent whole once it ends. Resumed
    in another process, the part after the pause is not sent either: under its own id, without the
    task and the steps before the pause, it was a second, partial trace of the run; the store joins
    the parts, and `honed export otlp` sends the run whole."""

    def __init__(self, exporter: TrajectoryExporter) -> None:
        self.exporter = exporter
        self.errors = 0

    def write(self, records: list[Record]) -> None:
        finished = [r for r in records if r.get("status") != INTERRUPTED and not _part_after_a_pause(r)]
        if not finished:
            return
        try:
            # As the store holds them (NUL and lone surrogates as U+FFFD): one run's undecodable
            # error text failed the SDK's encoding of its whole batch, every run in it lost, and
            # a span sent live differed from the same span replayed from the store.
            self.exporter.export([record_to_trajectory(storable(r)) for r in finished])
        except Exception:  # an exporter's outage must not touch the store path
            self.errors += 1
            log.exception("honed: the exporter %r failed; the store is unaffected", self.exporter)

    def idle(self) -> None:
        return None

    def wait(self, timeout: float) -> bool:
        return True  # `write` exported (or failed) before returning

    def stats(self) -> dict[str, Any]:
        """`export_errors`: failed exports, and spans an OTLP exporter could not send (refused,
        or dropped while its endpoint was failing), which otherwise went unseen."""
        counts = getattr(self.exporter, "stats", None)
        sent = counts() if callable(counts) else {}
        lost = int(sent.get("spans_failed", 0)) + int(sent.get("spans_dropped", 0))
        return {"export_errors": self.errors + lost}

    def close(self) -> None:
        try:
            self.exporter.shutdown()
        except Exception:
            log.exception("honed: the exporter %r failed to shut down", self.exporter)
