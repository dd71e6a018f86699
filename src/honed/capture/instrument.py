"""One recorder per store in a process, and the process-wide `instrument()` switch.

Sharing a recorder per store URL (and recorder options) means one writer thread per store, however
many handlers and middlewares point at it; duplicate events from two of them are merged by run id.
"""

from __future__ import annotations

import os
import threading
from contextvars import ContextVar
from typing import Any, TypeVar

from honed.capture.recorder import Recorder, flush_all
from honed.store import TrajectoryStore, resolve_store_url

_recorders: dict[tuple[str, tuple[Any, ...]], Recorder] = {}
_lock = threading.Lock()
_instrumented: Any = None  # the CallbackHandler installed by instrument(), once per process
_hook_var: ContextVar[Any] | None = None

G = TypeVar("G")


def recorder_for(
    store: str | TrajectoryStore | None = None, *, otlp: str | None = None, **options: Any
) -> Recorder:
    """The process's recorder for `store` and these options: one per store and options, made on
    first use. A recorder is never closed to make another (a second handler built with its own
    options closed the first one's, and every run the first captured afterwards was dropped).
    `otlp`: an endpoint the recorder also sends spans to, compared by its URL (each call with
    the same one made a recorder, a store process and an exporter more: a QA pass, session 19)."""
    url = store.url if isinstance(store, TrajectoryStore) else resolve_store_url(store)
    key = (url, _options_key({**options, "otlp": otlp}))
    with _lock:
        recorder = _recorders.get(key)
        if recorder is None or recorder._closed:
            if otlp is not None:
                from honed.exporters.otel import LiveExporter

                options["exporters"] = [*options.get("exporters", ()), LiveExporter(endpoint=otlp)]
            recorder = Recorder(store, **options)
            _recorders[key] = recorder
        return recorder


def _options_key(options: dict[str, Any]) -> tuple[Any, ...]:
    """Options compared by value where they are plain values, by identity otherwise (the same
    redaction function or exporter given again is the same recorder; a new object, a new one)."""

    def plain(value: Any) -> Any:
        if value is None or isinstance(value, (str, int, float, bool, os.PathLike)):
            return value
        if isinstance(value, (tuple, list)) and all(plain(v) is v for v in value):
            return tuple(value)
        return ("object", id(value))

    return tuple(sorted((name, plain(value)) for name, value in options.items()))


def instrument(store: str | TrajectoryStore | None = None, *, otlp: str | None = None, **options: Any) -> Any:
    """Capture every LangChain/LangGraph run in this process into `store`, with no code change
    to the agents. Calling it again switches the store; `uninstrument()` turns capture off.

    `otlp="http://host:4318"` also exports each finished trajectory as OpenTelemetry GenAI spans
    (`honed[otlp]`). Other options are the `Recorder`'s: `max_field_bytes`, `redact`, `max_queue`,
    `spool_path`, `writer`.
    """
    global _instrumented, _hook_var
    from langchain_core.tracers.context import register_configure_hook

    from honed.capture.callbacks import CallbackHandler

    recorder = recorder_for(store, otlp=otlp, **options)
    with _lock:
        if _instrumented is None:
            _instrumented = CallbackHandler(recorder=recorder)
            # The ContextVar's *default* is what new threads and asyncio tasks see. With the class
            # given, LangChain leaves the hook's handler out of a run that already has a honed
            # handler in its config: an explicit `wrap()`/`CallbackHandler` wins, never both.
            _hook_var = ContextVar("honed_instrument", default=_instrumented)
            register_configure_hook(_hook_var, inheritable=True, handle_class=CallbackHandler)
        _instrumented.recorder = recorder
        _instrumented.enabled = True
    return _instrumented


def uninstrument() -> None:
    """Stop process-wide capture (LangChain has no way to unregister a hook: it is switched off)."""
    if _instrumented is not None:
        _instrumented.enabled = False


def instrumented_handler() -> Any:
    """The handler `instrument()` installed, if capture is on."""
    return _instrumented if _instrumented is not None and _instrumented.enabled else None


def wrap(graph: G, store: str | TrajectoryStore | None = None, **options: Any) -> G:
    """The same graph (or any Runnable) with capture attached to every invocation.

    For a compiled LangGraph graph, `with_config` returns a graph, so `get_state`, `stream`
    and the rest keep working.
    """
    from honed.capture.callbacks import CallbackHandler

    handler = CallbackHandler(store, **options) if options else CallbackHandler(recorder=recorder_for(store))
    return graph.with_config(callbacks=[handler])  # type: ignore[attr-defined]


def flush(timeout: float = 30.0) -> bool:
    """Write every captured trajectory to its store (or spool) now; also runs at exit."""
    return flush_all(timeout)


def stats() -> dict[str, Any]:
    """Capture counters summed over the process's recorders, plus each store's own."""
    from honed.capture.recorder import live_recorders

    # Keyed by the store's URL as logs show it: never a password in a key. Two recorders on one
    # store (built with different options) count together.
    per_store: dict[str, dict[str, Any]] = {}
    for counts in (r.stats() for r in live_recorders()):
        seen = per_store.setdefault(counts["store"], counts)
        if seen is not counts:
            for key, value in counts.items():
                if isinstance(value, int) and isinstance(seen.get(key), int):
                    seen[key] += value
            seen["lag_s"] = max(seen["lag_s"], counts["lag_s"])
    from honed.capture.recorder import RECORDER_COUNTERS
    from honed.capture.sinks import STORE_COUNTERS

    # Each counter there before any capture (a QA pass, session 27: a process using `Middleware`
    # alone had none until its first run, and `stats()["trajectories_written"]` raised KeyError).
    total: dict[str, Any] = dict.fromkeys((*RECORDER_COUNTERS, *STORE_COUNTERS, "spool_pending"), 0)
    for counts in per_store.values():
        for key, value in counts.items():
            if isinstance(value, int):
                total[key] = total.get(key, 0) + value
    total["lag_s"] = max((c["lag_s"] for c in per_store.values()), default=0.0)
    total["stores"] = per_store
    return total
