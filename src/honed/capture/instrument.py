"""One recorder per store in a process, and the process-wide `instrument()` switch.

Sharing a recorder per store URL means one writer thread and one spool per store, however many
handlers and middlewares point at it; duplicate events from two of them are merged by run id.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar
from typing import Any, TypeVar

from honed.capture.recorder import Recorder, flush_all
from honed.store import TrajectoryStore, resolve_store_url

_recorders: dict[str, Recorder] = {}
_lock = threading.Lock()
_instrumented: Any = None  # the CallbackHandler installed by instrument(), once per process
_hook_var: ContextVar[Any] | None = None

G = TypeVar("G")


def recorder_for(store: str | TrajectoryStore | None = None, **options: Any) -> Recorder:
    """The process's recorder for `store`; options apply when it is created (or differ)."""
    url = store.url if isinstance(store, TrajectoryStore) else resolve_store_url(store)
    with _lock:
        recorder = _recorders.get(url)
        if recorder is None or recorder._closed or options:
            if recorder is not None and not recorder._closed:
                recorder.close()
            recorder = Recorder(store, **options)
            _recorders[url] = recorder
        return recorder


def instrument(store: str | TrajectoryStore | None = None, *, otlp: str | None = None, **options: Any) -> Any:
    """Capture every LangChain/LangGraph run in this process into `store`, with no code change
    to the agents. Calling it again switches the store; `uninstrument()` turns capture off.

    `otlp="http://host:4318"` also exports each finished trajectory as OpenTelemetry GenAI spans
    (`honed[otlp]`). Other options are the `Recorder`'s: `max_field_bytes`, `redact`, `max_queue`,
    `spool_path`, `writer`.
    """
    if otlp is not None:
        from honed.exporters.otel import LiveExporter

        options["exporters"] = [*options.get("exporters", ()), LiveExporter(endpoint=otlp)]
    global _instrumented, _hook_var
    from langchain_core.tracers.context import register_configure_hook

    from honed.capture.callbacks import CallbackHandler

    recorder = recorder_for(store, **options)
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

    # Keyed by the store's URL as logs show it: never a password in a key.
    per_store = {counts["store"]: counts for counts in (r.stats() for r in live_recorders())}
    total: dict[str, Any] = {}
    for counts in per_store.values():
        for key, value in counts.items():
            if isinstance(value, int):
                total[key] = total.get(key, 0) + value
    total["lag_s"] = max((c["lag_s"] for c in per_store.values()), default=0.0)
    total["stores"] = per_store
    return total
