"""The recorder: a hot path that only enqueues, and one writer thread that does everything else.

`Recorder.emit` is what the agent's thread pays for a captured event: a bounded-deque append.
The writer thread drains the queue in batches, assembles trajectories, serialises and redacts them,
and inserts them into the store; when the store is down they go to a spool file and are replayed,
in order, once it answers again. Nothing here raises into the agent.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from honed.capture.assembler import FLUSH, PENDING_LINGER_S, Assembler
from honed.capture.redact import Redactor
from honed.capture.serialize import Serializer
from honed.capture.spool import Spool, default_spool_path
from honed.store import TrajectoryStore, record_to_trajectory, resolve_store_url
from honed.trajectory import Trajectory

log = logging.getLogger("honed")

DEFAULT_MAX_QUEUE = 200_000  # events; beyond it new events are dropped and counted
DEFAULT_FLUSH_INTERVAL_S = 0.2
DEFAULT_OPEN_TIMEOUT_S = 3600  # a run silent this long is written as incomplete (HONED_OPEN_TIMEOUT_S)
_RETRY_MIN_S, _RETRY_MAX_S = 0.5, 30.0

_live: weakref.WeakSet[Recorder] = weakref.WeakSet()


class TrajectoryExporter(Protocol):
    """A live sink beside the store (OTLP, a file): called on the writer thread with each batch of
    finished trajectories, whether the store took them or they were spooled. Must not block long."""

    def export(self, trajectories: Sequence[Trajectory]) -> None: ...

    def shutdown(self) -> None: ...


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        log.warning("honed: %s=%r is not an integer; using %d", name, raw, default)
        return default


class Recorder:
    """Captures events for one store.

    Args:
        store: a URL (default `HONED_STORE`, else `sqlite:///honed.db`) or an open `TrajectoryStore`.
        max_queue: events held in memory before new ones are dropped (`HONED_MAX_QUEUE`).
        max_field_bytes: cap of each stored field (`HONED_MAX_FIELD_BYTES`, default 64 KiB).
        redact: a hook applied to every string after the built-in secret redaction.
        spool_path: where records wait while the store is down (`HONED_SPOOL_DIR`).
        open_timeout_s: a run with no event for this long is written as incomplete
            (`HONED_OPEN_TIMEOUT_S`, default one hour): memory stays bounded in a server.
        exporters: live sinks that also receive each finished trajectory (e.g. OTLP spans).
    """

    def __init__(
        self,
        store: str | TrajectoryStore | None = None,
        *,
        max_queue: int | None = None,
        max_field_bytes: int | None = None,
        redact: Callable[[str], str] | None = None,
        spool_path: str | Path | None = None,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL_S,
        open_timeout_s: float | None = None,
        exporters: Sequence[TrajectoryExporter] = (),
    ) -> None:
        self._owns_store = not isinstance(store, TrajectoryStore)
        if isinstance(store, TrajectoryStore):
            self._store: TrajectoryStore | None = store
            self.store_url = store.url
        else:
            self._store = None
            self.store_url = resolve_store_url(store)
        self.max_queue = max_queue or _env_int("HONED_MAX_QUEUE", DEFAULT_MAX_QUEUE)
        self.open_timeout_s = float(
            open_timeout_s or _env_int("HONED_OPEN_TIMEOUT_S", DEFAULT_OPEN_TIMEOUT_S)
        )
        self._next_stale_check = 0.0
        self.exporters = list(exporters)
        self.spool = Spool(Path(spool_path) if spool_path else default_spool_path(self.store_url))
        self._serializer = Serializer(max_field_bytes=max_field_bytes, redactor=Redactor(redact))
        self._assembler = Assembler(self._serializer.field)
        self._queue: deque[tuple[Any, ...]] = deque()
        self._flush_interval = flush_interval
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._retry_at = 0.0
        self._retry_delay = _RETRY_MIN_S
        self._store_error: str | None = None
        self._counts = dict.fromkeys(
            (
                "events_dropped",
                "events_processed",
                "trajectories_captured",
                "trajectories_written",
                "steps_written",
                "trajectories_spooled",
                "trajectories_replayed",
                "write_errors",
                "export_errors",
            ),
            0,
        )
        _live.add(self)

    # -- hot path ----------------------------------------------------------------------------

    def emit(self, event: tuple[Any, ...]) -> None:
        """Enqueue one event. O(1), no I/O, never raises."""
        if len(self._queue) >= self.max_queue or self._closed:
            self._count_drop()
            return
        self._queue.append(event)
        if self._thread is None:
            self._start_writer()

    def _count_drop(self) -> None:
        with self._lock:
            self._counts["events_dropped"] += 1
            first = self._counts["events_dropped"] == 1
        if first:
            log.warning("honed: capture queue full (%d events) or closed; dropping events", self.max_queue)

    # -- control -----------------------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> bool:
        """Write everything emitted before this call (to the store, or the spool if it is down).

        Returns False if it could not finish within `timeout`.
        """
        if self._closed:
            return not self._queue  # a closed recorder's writer has stopped: nothing to wait for
        if self._thread is None and not self._queue:
            return True
        done = threading.Event()
        self._queue.append((FLUSH, None, None, 0.0, done))
        if self._thread is None:
            self._start_writer()
        self._wake.set()
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Flush, end trajectories still open as incomplete, and stop the writer."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._store is not None and self._owns_store:
            self._store.close()
        for exporter in self.exporters:
            try:
                exporter.shutdown()
            except Exception:
                log.exception("honed: the exporter %r failed to shut down", exporter)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
        counts["events_captured"] = counts["events_processed"] + len(self._queue)
        counts["queue_depth"] = len(self._queue)
        counts["spool_pending"] = self.spool.pending()
        counts["open_trajectories"] = self._assembler.open_trajectories
        counts["events_ignored"] = self._assembler.ignored_events
        counts["store"] = self._safe_url()
        counts["store_error"] = self._store_error
        return counts

    def _safe_url(self) -> str:
        from sqlalchemy.engine import make_url

        try:
            return make_url(self.store_url).render_as_string(hide_password=True)
        except Exception:
            return "<unparseable store URL>"

    # -- writer thread -----------------------------------------------------------------------

    def _start_writer(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="honed-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._flush_interval)
            self._wake.clear()
            try:
                self._drain()
            except Exception:  # the writer must outlive any bug in one batch
                log.exception("honed: the capture writer hit an error; it keeps running")
            if self._closed and not self._queue:
                self._drain(close_open=True)
                return

    def _drain(self, close_open: bool = False) -> None:
        flushes: list[threading.Event] = []
        processed = 0
        queue, feed = self._queue, self._assembler.feed
        while queue:
            event = queue.popleft()
            if event[0] == FLUSH:
                self._assembler.close_pending()
                self._write(self._assembler.take_completed())
                flushes.append(event[4])
                continue
            feed(event)
            processed += 1
            if processed % 2000 == 0:
                self._write(self._assembler.take_completed())
        now = time.time()
        self._assembler.close_pending(older_than=now - PENDING_LINGER_S)
        if now >= self._next_stale_check:
            self._assembler.close_stale(older_than=now - self.open_timeout_s, when=now)
            self._next_stale_check = now + min(60.0, self.open_timeout_s / 2)
        if close_open:
            self._assembler.close_all("incomplete: the process exited before the run ended", time.time())
        self._write(self._assembler.take_completed())  # with nothing to write, retries the spool
        with self._lock:
            self._counts["events_processed"] += processed
        for done in flushes:
            done.set()

    def _write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            self._replay_if_due()
            return
        with self._lock:
            self._counts["trajectories_captured"] += len(records)
        self._export(records)
        if self.spool.has_pending() and not self._replay_if_due():
            self._to_spool(records)  # keep order: nothing overtakes what is already spooled
            return
        try:
            self._save(records)
        except Exception as exc:
            self._store_down(exc)
            self._to_spool(records)

    def _export(self, records: list[dict[str, Any]]) -> None:
        if not self.exporters:
            return
        try:
            trajectories = [record_to_trajectory(r) for r in records]
        except Exception:
            log.exception("honed: could not prepare trajectories for the exporters")
            return
        for exporter in self.exporters:
            try:
                exporter.export(trajectories)
            except Exception:  # an exporter's outage must not touch the store path
                with self._lock:
                    self._counts["export_errors"] += 1
                log.exception("honed: the exporter %r failed; the store is unaffected", exporter)

    def _save(self, records: list[dict[str, Any]]) -> None:
        if self._store is None:
            self._store = TrajectoryStore(self.store_url)
        self._store.save_records(records)
        with self._lock:
            self._counts["trajectories_written"] += len(records)
            self._counts["steps_written"] += sum(len(r["steps"]) for r in records)
        if self._store_error is not None:
            log.warning("honed: the store %s is reachable again", self._safe_url())
        self._store_error = None
        self._retry_delay = _RETRY_MIN_S

    def _replay_if_due(self) -> bool:
        """Replay the spool if it has records and a retry is due; True when it is now empty."""
        if not self.spool.has_pending():
            return True
        if time.monotonic() < self._retry_at:
            return False
        try:
            replayed = self.spool.replay(self._save)
        except Exception as exc:
            self._store_down(exc)
            return False
        with self._lock:
            self._counts["trajectories_replayed"] += replayed
        if replayed:
            log.warning("honed: replayed %d spooled trajectories into %s", replayed, self._safe_url())
        return True

    def _to_spool(self, records: list[dict[str, Any]]) -> None:
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
        if self._store_error is None:
            log.warning(
                "honed: the store %s is unavailable (%s); spooling to %s",
                self._safe_url(),
                message,
                self.spool.path,
            )
        self._store_error = message
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX_S)


def live_recorders() -> list[Recorder]:
    return [r for r in list(_live) if not r._closed]


def flush_all(timeout: float = 30.0) -> bool:
    """Flush every live recorder in the process."""
    return all([r.flush(timeout) for r in live_recorders()])


@atexit.register
def _close_all_at_exit() -> None:
    for recorder in list(_live):
        try:
            recorder.close(timeout=10.0)
        except Exception:
            log.exception("honed: could not flush captures at exit")


def _after_fork_in_child() -> None:
    # The writer thread does not survive fork; a child starts its own on first emit, with no
    # inherited events (they belong to the parent, which writes them).
    for recorder in list(_live):
        recorder._thread = None
        recorder._queue.clear()
        recorder._lock = threading.Lock()
        recorder._wake = threading.Event()


os.register_at_fork(after_in_child=_after_fork_in_child)
