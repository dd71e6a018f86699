"""Trajectories to any OTLP backend (Phoenix, Jaeger, Tempo, Langfuse, Datadog), live or replayed.

Live: `honed.instrument(store=..., otlp="http://host:4318")` hands each finished trajectory to a
`LiveExporter` on the writer thread; its spans go through the SDK's `BatchSpanProcessor`, so the
writer only enqueues, and an endpoint that is down costs dropped spans, never a blocked or broken
agent. Replay: `replay(trajectories, endpoint=...)` (or `honed export otlp`) sends stored
trajectories synchronously and reports what the backend accepted. Both derive trace and span ids
from the trajectory id (`honed.exporters.spans`), so a trajectory sent twice is one trace.

Configuration is by argument or the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` (and
`_TRACES_` forms), `OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf` default, `grpc`),
`OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`, `OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`;
`HONED_OTLP_PROJECT` names the Phoenix project (default: the service name).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from honed.exporters.spans import PROJECT_ATTRIBUTE, SpanMapper, utf8_len
from honed.store.reader import collector_paused
from honed.trajectory import Trajectory

log = logging.getLogger("honed")

DEFAULT_SERVICE_NAME = "honed"
ENV_PROJECT = "HONED_OTLP_PROJECT"
HTTP_PROTOCOL, GRPC_PROTOCOL = "http/protobuf", "grpc"
TRACES_PATH = "/v1/traces"
REPLAY_BATCH_SPANS = 512
# A replayed batch stays under gRPC's and the OpenTelemetry Collector's default 4 MiB message limit
# (a receiver answers a larger one RESOURCE_EXHAUSTED, every time): with content, 512 chat spans of a
# long conversation made 29 MB.
REPLAY_BATCH_BYTES = 3 * 2**20
REPLAY_RETRIES = 4
_REPLAY_RETRY_DELAY_S = 2.0
# After a failed export the live exporter drops batches without trying for this long (doubling
# up to the maximum), so a dead endpoint costs one export timeout, not one per batch.
_BACKOFF_MIN_S, _BACKOFF_MAX_S = 1.0, 60.0


class OTLPExportError(RuntimeError):
    """The OTLP endpoint refused or did not answer a replayed batch."""


def make_resource(service_name: str | None = None, project: str | None = None) -> Resource:
    """The resource spans are filed under: `OTEL_RESOURCE_ATTRIBUTES` / `OTEL_SERVICE_NAME` as
    the SDK reads them, `service.name` defaulting to "honed", and `openinference.project.name`
    (Phoenix's project) defaulting to `HONED_OTLP_PROJECT`, else the service name."""
    attributes = dict(Resource.create().attributes)
    if service_name:
        attributes["service.name"] = service_name
    elif str(attributes.get("service.name", "")).startswith("unknown_service"):
        attributes["service.name"] = DEFAULT_SERVICE_NAME
    if project:
        attributes[PROJECT_ATTRIBUTE] = project
    else:
        attributes.setdefault(PROJECT_ATTRIBUTE, os.environ.get(ENV_PROJECT) or attributes["service.name"])
    return Resource(attributes)


def resolve_protocol(protocol: str | None = None) -> str:
    """`protocol`, else `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL`, else
    HTTP/protobuf. `http/json` (no Python exporter exists) is logged and replaced, never raised."""
    value = (
        (
            protocol
            or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or HTTP_PROTOCOL
        )
        .strip()
        .lower()
    )
    if value in ("grpc", "http/protobuf"):
        return value
    if value in ("http", "http/proto", "protobuf"):
        return HTTP_PROTOCOL
    log.warning("honed: OTLP protocol %r is not supported; using %s", value, HTTP_PROTOCOL)
    return HTTP_PROTOCOL


def otlp_span_exporter(
    endpoint: str | None = None,
    *,
    protocol: str | None = None,
    headers: Mapping[str, str] | str | None = None,
    timeout_s: float | None = None,
) -> SpanExporter:
    """The SDK's OTLP span exporter for `endpoint` (a base URL such as `http://host:4318`, or a
    full `.../v1/traces` URL); with no endpoint, the exporter reads the `OTEL_EXPORTER_OTLP_*`
    variables itself. gRPC needs `opentelemetry-exporter-otlp-proto-grpc` (`honed[otlp]`)."""
    if endpoint is not None:
        check_endpoint(endpoint)
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"the OTLP timeout must be a positive number of seconds, not {timeout_s}")
    header_map = parse_headers(headers) if isinstance(headers, str) else headers
    if resolve_protocol(protocol) == GRPC_PROTOCOL:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        except ImportError as exc:
            raise ImportError("OTLP over gRPC needs `pip install 'honed[otlp]'`") from exc
        return GrpcExporter(endpoint=endpoint, headers=header_map, timeout=timeout_s)
    from honed.exporters.otlp_proto import HTTPSpanExporter

    return HTTPSpanExporter(
        endpoint=traces_url(endpoint) if endpoint else None, headers=header_map, timeout=timeout_s
    )


def check_endpoint(endpoint: str) -> str:
    """An OTLP endpoint that can work, or a ValueError saying why: an http(s) URL with a host, for
    gRPC too (`http://` is plaintext, `https://` TLS). A QA pass (session 26): `localhost:4317`
    tried TLS against a plaintext receiver, and `not a url` was taken; both failed on every batch
    with a message about batch sizes."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{shown_endpoint(endpoint)!r} is not an OTLP endpoint: give an http(s) URL, e.g. "
            "http://localhost:4318 (HTTP) or http://localhost:4317 (gRPC; https:// for TLS)"
        )
    return endpoint


def traces_url(endpoint: str) -> str:
    """An explicit HTTP endpoint is used verbatim by the SDK: add `/v1/traces` to a base URL."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


def effective_endpoint(endpoint: str | None, protocol: str | None) -> tuple[str, bool]:
    """Where the exporter sends, as the SDK decides it with no endpoint given (its variables,
    else localhost), and whether that is the default: a replay with none said "the endpoint in
    OTEL_EXPORTER_OTLP_* did not accept a batch" with no such variable set (a QA pass, session 25)."""
    if endpoint:
        return endpoint, False
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        if os.environ.get(name):
            return os.environ[name], False
    grpc = resolve_protocol(protocol) == GRPC_PROTOCOL
    return ("http://localhost:4317" if grpc else "http://localhost:4318"), True


def _proxied() -> bool:
    """Whether requests may go through a proxy (then a direct connection says nothing)."""
    names = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
    return any(os.environ.get(name) for name in names)


def _unreachable(endpoint: str | None) -> str | None:
    """Why nothing listens at `endpoint` (`Connection refused`, a name that does not resolve), or
    None when a TCP connection opens (or the endpoint cannot be told from the environment)."""
    import socket
    from urllib.parse import urlsplit

    if not endpoint:
        return None
    try:
        parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        host = parts.hostname
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    if not host:
        return None
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


def shown_endpoint(endpoint: str | None) -> str:
    """An endpoint as messages show it: a password in it (`https://user:token@host`) as `***`."""
    if not endpoint:
        return "the endpoint in OTEL_EXPORTER_OTLP_*"
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(endpoint)
        if parts.password is None:
            return endpoint
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "the endpoint given"


def parse_headers(text: str) -> dict[str, str]:
    """`k=v,k2=v2` (the `OTEL_EXPORTER_OTLP_HEADERS` form) as a dict."""
    pairs = (item.split("=", 1) for item in text.split(",") if "=" in item)
    return {key.strip(): value.strip() for key, value in pairs}


def header_pair(text: str) -> tuple[str, str]:
    """One `key=value` header as given on a command line (its value may hold commas)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{text.split('=')[0][:40]!r} is not key=value")
    return key.strip(), value.strip()


class LiveExporter:
    """Exports trajectories as spans as they are captured (the recorder's `TrajectoryExporter`).

    `export` maps each trajectory to spans and queues them on a `BatchSpanProcessor` (bounded:
    `OTEL_BSP_MAX_QUEUE_SIZE`, default 2048, oldest dropped when full); a background thread sends
    them. Nothing here raises into the writer, and the global tracer provider is left alone.

        honed.instrument(store="sqlite:///honed.db", otlp="http://localhost:4318")
        # or: honed.CallbackHandler(store=..., exporters=[LiveExporter(endpoint=..., capture_content=True)])

    Args:
        endpoint: OTLP base URL (`http://host:4318`, or `http://host:4317` with gRPC); `None`
            reads `OTEL_EXPORTER_OTLP_ENDPOINT`.
        protocol: `http/protobuf` (default) or `grpc`; `None` reads `OTEL_EXPORTER_OTLP_PROTOCOL`.
        headers, timeout_s: passed to the OTLP exporter (else its `OTEL_*` variables).
        service_name, project: see `make_resource`.
        capture_content: message content, tool arguments and results (see `SpanMapper`).
        span_exporter: any SDK `SpanExporter` instead of OTLP (tests, a console exporter).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        protocol: str | None = None,
        headers: Mapping[str, str] | str | None = None,
        timeout_s: float | None = None,
        service_name: str | None = None,
        project: str | None = None,
        capture_content: bool | None = None,
        span_exporter: SpanExporter | None = None,
        max_queue_size: int | None = None,
        schedule_delay_millis: float | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.mapper = SpanMapper(make_resource(service_name, project), capture_content=capture_content)
        exporter = span_exporter or otlp_span_exporter(
            endpoint, protocol=protocol, headers=headers, timeout_s=timeout_s
        )
        self._sender = _BreakerExporter(exporter)
        self._processor = BatchSpanProcessor(
            self._sender, max_queue_size=max_queue_size, schedule_delay_millis=schedule_delay_millis
        )
        self._lock = threading.Lock()
        self._counts = {
            "trajectories": 0, "spans_queued": 0, "mapping_errors": 0,
            "trajectories_unqueued": 0, "spans_unqueued": 0,
        }  # fmt: skip

    def export(self, trajectories: Sequence[Trajectory]) -> None:
        """Queue the spans of finished trajectories; returns at once, never raises. A trajectory
        the queue has no room for (the endpoint slower than the agents) is left out whole and
        counted (`spans_unqueued`, in `honed.stats()["export_errors"]`): the SDK's queue dropped
        its oldest spans silently, leaving traces without their root. A replay resends it."""
        queued = errors = unqueued = unqueued_spans = 0
        for trajectory in trajectories:
            try:
                spans = self.mapper.spans(trajectory)
            except Exception:  # one odd record must not cost the batch
                errors += 1
                log.exception("honed: could not map trajectory %s to spans", getattr(trajectory, "id", "?"))
                continue
            room = self._queue_room()
            if room is not None and len(spans) > room:
                unqueued, unqueued_spans = unqueued + 1, unqueued_spans + len(spans)
                continue
            for span in spans:
                self._processor.on_end(span)
            queued += len(spans)
        with self._lock:
            self._counts["trajectories"] += len(trajectories) - errors - unqueued
            self._counts["spans_queued"] += queued
            self._counts["mapping_errors"] += errors
            first = unqueued and not self._counts["trajectories_unqueued"]
            self._counts["trajectories_unqueued"] += unqueued
            self._counts["spans_unqueued"] += unqueued_spans
        if first:
            log.warning(
                "honed: the OTLP queue is full (the endpoint is slower than the agents): trajectories are "
                "left out of live export (counted in honed.stats()); `honed export otlp` resends them"
            )

    def _queue_room(self) -> int | None:
        """Free places in the SDK processor's queue (None where its internals differ)."""
        batch = getattr(self._processor, "_batch_processor", None)
        queue, size = getattr(batch, "_queue", None), getattr(batch, "_max_queue_size", None)
        if queue is None or not isinstance(size, int):
            return None
        return size - len(queue)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Send everything queued now (blocks; for tests and short scripts)."""
        return self._processor.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Send what is queued (one export timeout at most when the endpoint is down), then stop."""
        self._processor.shutdown()

    def stats(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self._counts)
        sender = self._sender.stats()
        # Never sent live, as the breaker's drops: what `export_errors` adds up.
        return {**counts, **sender, "spans_dropped": sender["spans_dropped"] + counts["spans_unqueued"]}

    def __repr__(self) -> str:
        return f"LiveExporter(endpoint={shown_endpoint(self.endpoint)!r})"


@dataclass(slots=True)
class ReplayResult:
    """What a replay sent: trajectories and spans the backend accepted."""

    trajectories: int = 0
    spans: int = 0
    batches: int = 0
    retries: int = 0
    # Of `spans`, those the receiver took the request of but refused (OTLP `partial_success`),
    # and what it said about them.
    rejected: int = 0
    rejection: str | None = None


def replay(
    trajectories: Iterable[Trajectory],
    endpoint: str | None = None,
    *,
    protocol: str | None = None,
    headers: Mapping[str, str] | str | None = None,
    timeout_s: float | None = None,
    service_name: str | None = None,
    project: str | None = None,
    capture_content: bool | None = None,
    span_exporter: SpanExporter | None = None,
    batch_spans: int = REPLAY_BATCH_SPANS,
    batch_bytes: int = REPLAY_BATCH_BYTES,
    retries: int = REPLAY_RETRIES,
    on_trajectory: Callable[[Trajectory], None] | None = None,
    untrusted: Iterable[str] = (),
) -> ReplayResult:
    """Send stored trajectories as spans, synchronously, batch by batch.

    Ids are the ones live export used, so replaying what was already sent (or re-running a replay
    that failed half-way) adds nothing twice. A batch refused after earlier ones went through is
    the backend pushing back (Phoenix answers 503 while its ingest queue is full): it is sent
    again up to `retries` times, waiting 2, 4, 8... s. Raises `OTLPExportError` when the first
    batch fails (the endpoint is down or wrong) or the retries run out; what was sent stays sent.

        result = replay(store.trajectories(since=yesterday), endpoint="http://localhost:4318")

    `untrusted`: verifiers whose judgements the label leaves out (`store.untrusted_verifiers()`).
    A batch holds at most `batch_spans` spans and about `batch_bytes` of attributes (one span
    larger than that goes alone).
    """
    mapper = SpanMapper(
        make_resource(service_name, project), capture_content=capture_content, untrusted=untrusted
    )
    exporter = span_exporter or otlp_span_exporter(
        endpoint, protocol=protocol, headers=headers, timeout_s=timeout_s
    )
    result = ReplayResult()
    pending: list[ReadableSpan] = []
    pending_trajectories = pending_bytes = 0

    def send() -> None:
        nonlocal pending, pending_trajectories, pending_bytes
        attempt = 0
        if result.batches == 0 and span_exporter is None and not _proxied():
            # Nothing listening: said now, not after the SDK's retries (~10 s of "Transient
            # error" lines, then this; a QA pass, session 27).
            target, by_default = effective_endpoint(endpoint, protocol)
            down = _unreachable(target)
            if down is not None:
                default = (
                    " (the default: no --endpoint or OTEL_EXPORTER_OTLP_ENDPOINT was given)"
                    if by_default
                    else ""
                )
                raise OTLPExportError(
                    f"cannot connect to {shown_endpoint(target)}{default}: {down}; is the backend running there?"
                )
        while exporter.export(pending) is not SpanExportResult.SUCCESS:
            if result.batches == 0 or attempt >= retries:
                target, by_default = (
                    (endpoint, False) if span_exporter is not None else effective_endpoint(endpoint, protocol)
                )
                where = shown_endpoint(target) + (
                    " (the default: no --endpoint or OTEL_EXPORTER_OTLP_ENDPOINT was given)"
                    if by_default
                    else ""
                )
                down = _unreachable(target) if result.batches == 0 else None
                if down is not None:  # the cause, not the batch's size (a QA pass, session 20)
                    raise OTLPExportError(f"cannot connect to {where}: {down}; is the backend running there?")
                said = refusals.said(exporter)
                raise OTLPExportError(
                    f"{where} did not accept a batch of {len(pending)} spans (~{pending_bytes / 2**20:.1f} MiB) "
                    f"after {result.spans} were sent{f' ({said})' if said else ''}; check that the backend "
                    "is up and takes messages this large (--batch-mib), then re-run: spans already sent "
                    "are not duplicated"
                )
            time.sleep(_REPLAY_RETRY_DELAY_S * 2**attempt)
            attempt += 1
            result.retries += 1
        result.spans += len(pending)
        result.trajectories += pending_trajectories
        result.batches += 1
        result.rejected = getattr(exporter, "rejected_spans", 0)
        result.rejection = getattr(exporter, "rejection", None)
        pending, pending_trajectories, pending_bytes = [], 0, 0

    # A batch is mapped, encoded and sent with the cyclic collector paused (as the store's read
    # does): spans are trees, freed by reference counting once sent, yet the collections their
    # allocations trigger rescan every object alive (measured: ~15% of a replay). It runs again
    # between batches.
    remaining = iter(trajectories)
    refusals = _Refusals()
    try:
        while True:
            with collector_paused():
                for trajectory in remaining:
                    for span in mapper.spans(trajectory):
                        size = _approx_bytes(span)
                        if pending and pending_bytes + size > batch_bytes:
                            send()
                        pending.append(span)
                        pending_bytes += size
                    pending_trajectories += 1
                    if on_trajectory is not None:
                        on_trajectory(trajectory)
                    if len(pending) >= batch_spans or pending_bytes >= batch_bytes:
                        break
                if not pending:
                    break
                send()
    finally:
        refusals.close()
        if span_exporter is None:
            exporter.shutdown()
    return result


class _Refusals(logging.Filter):
    """While a replay runs, the OTLP exporters' own "Failed to export ... batch" lines are held
    back and kept: the replay's error says what they said (the receiver's status and reason, with
    the body it answered), once. Both printed, a refused batch was told twice, the SDK's line bare
    of which batch and what had been sent (a QA pass, session 26)."""

    LOGGERS = (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "opentelemetry.exporter.otlp.proto.grpc.exporter",
    )

    def __init__(self) -> None:
        super().__init__()
        self.last: str | None = None
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Failed to export"):
            self.last = record.getMessage().removeprefix("Failed to export ")
            return False
        # The SDK's own retries of a batch: the replay's error, or its count of retries, says it.
        return not str(record.msg).startswith("Transient error")

    def said(self, exporter: SpanExporter) -> str | None:
        body = getattr(exporter, "refusal_body", None)
        parts = [part for part in (self.last, f"it answered {body!r}" if body else None) if part]
        return "; ".join(parts) or None

    def close(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


def _approx_bytes(span: ReadableSpan) -> int:
    """About what a span weighs encoded: its text attributes (content: messages, tool results),
    its events' (a verdict's explanation: a review, session 21, found 59 spans of 4.8 MiB sent
    as one request when only attributes counted) and a fixed part for ids, times and names."""
    size = 160 + len(span.name) + _attributes_bytes(span.attributes)
    for event in span.events or ():
        size += 32 + len(event.name) + _attributes_bytes(event.attributes)
    return size


def _attributes_bytes(attributes: Any) -> int:
    size = 0
    for key, value in (attributes or {}).items():
        if isinstance(value, str):
            size += len(key) + utf8_len(value)
        else:
            size += len(key) + 16
    return size


class _BreakerExporter(SpanExporter):
    """Wraps the OTLP exporter: after a failure, batches are dropped without a try until a backoff
    passes, so an endpoint that is down holds the export thread (and a shutdown at exit) for one
    timeout, not one per queued batch. Counts what was sent, failed and dropped.

    The batch processor bounds a batch by spans only (512): with content, 512 spans of long
    conversations made 6 MB, which gRPC receivers refuse (4 MiB), then the breaker dropped what
    followed: 98% of the spans were lost. A batch is sent in parts of at most `batch_bytes`."""

    def __init__(self, exporter: SpanExporter, batch_bytes: int = REPLAY_BATCH_BYTES) -> None:
        self.exporter = exporter
        self.batch_bytes = batch_bytes
        self._retry_at = 0.0
        self._backoff = _BACKOFF_MIN_S
        self._counts = {"spans_exported": 0, "spans_failed": 0, "spans_dropped": 0}

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = SpanExportResult.SUCCESS
        part: list[ReadableSpan] = []
        size = 0
        for span in spans:
            weight = _approx_bytes(span)
            if part and size + weight > self.batch_bytes:
                if self._send(part) is not SpanExportResult.SUCCESS:
                    result = SpanExportResult.FAILURE
                part, size = [], 0
            part.append(span)
            size += weight
        if part and self._send(part) is not SpanExportResult.SUCCESS:
            result = SpanExportResult.FAILURE
        return result

    def _send(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if time.monotonic() < self._retry_at:
            self._counts["spans_dropped"] += len(spans)
            return SpanExportResult.FAILURE
        try:
            result = self.exporter.export(spans)
        except Exception:
            log.exception("honed: the OTLP exporter raised; %d spans are lost", len(spans))
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self._counts["spans_exported"] += len(spans)
            self._backoff = _BACKOFF_MIN_S
            self._retry_at = 0.0
        else:
            if self._retry_at == 0.0:
                log.warning("honed: OTLP export failed; dropping spans until the endpoint answers")
            self._counts["spans_failed"] += len(spans)
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.exporter.force_flush(timeout_millis)

    def stats(self) -> dict[str, Any]:
        return dict(self._counts)
