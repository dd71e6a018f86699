"""OTLP protobuf bytes for honed's spans, written directly: the SDK's encoder, ~4x faster.

The SDK (`opentelemetry.exporter.otlp.proto.common`) builds one protobuf object per attribute,
value and span and then serialises them: at ~8 attributes a span it costs ~35 us a span, more than
reading and mapping a trajectory together, and was most of a replay's time. Here each span is
written straight to the wire format, with the encoded attribute keys and the resource/scope header
cached; the bytes decode to the very message `encode_spans(spans)` builds (the tests compare the
two). Spans the SDK would treat differently (several resources or scopes in one batch, links,
attribute values outside str/bool/int/float/bytes and sequences of them, text that is not valid
UTF-8) raise `Unsupported`, and the caller falls back to the SDK's encoder: never a different
request, only a slower one.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanKind

log = logging.getLogger("honed")

_U64 = struct.Struct("<Q").pack
_F64 = struct.Struct("<d").pack
_U32 = struct.Struct("<I").pack
_BYTE = [bytes((n,)) for n in range(128)]
_KIND = {  # Span.kind, the field with its value
    SpanKind.INTERNAL: b"\x30\x01",
    SpanKind.SERVER: b"\x30\x02",
    SpanKind.CLIENT: b"\x30\x03",
    SpanKind.PRODUCER: b"\x30\x04",
    SpanKind.CONSUMER: b"\x30\x05",
}
_FLAGS = b"\x85\x01" + _U32(0x100)  # Span.flags: SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK, parent not remote
_FLAGS_REMOTE = b"\x85\x01" + _U32(0x300)
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# KeyValue.value heads: (0x12 len) then AnyValue's string_value (0x0a len), int_value (0x18), bool_value (0x10).
_TEXT_HEAD = [bytes((0x12, n + 2, 0x0A, n)) for n in range(126)]
_SMALL_INT = [bytes((0x12, 2, 0x18, n)) for n in range(128)]
_BOOL = {False: b"\x12\x02\x10\x00", True: b"\x12\x02\x10\x01"}
_MAX_KEYS = 4096  # attribute keys kept encoded (a few dozen in practice)
_keys: dict[str, bytes] = {}
_headers: dict[tuple[int, int], tuple[Any, Any, bytes, bytes]] = {}


class Unsupported(ValueError):
    """A span this encoder does not write exactly as the SDK would: use the SDK's encoder."""


class HTTPSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/HTTP exporter (its endpoint, headers, compression, TLS and retries, from
    arguments or `OTEL_EXPORTER_OTLP_*`) sending `encode_request`'s bytes. Where its HTTP client
    is not where SDK 1.45 keeps it, or a batch is `Unsupported`, the SDK's own `export` runs. The
    SDK's opt-in self-metrics (`OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED`) do not count the
    requests sent here."""

    # Spans a receiver accepted the request of but refused (OTLP `partial_success`: too old, over a
    # quota), and its message about the last of them. The SDK reads no response body: a replay
    # said "sent" of spans the backend had dropped.
    rejected_spans = 0
    rejection: str | None = None
    # What the receiver answered to the last request it did not take (its first 300 characters):
    # a replay's error quotes it.
    refusal_body: str | None = None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        client = getattr(self, "_client", None)
        if getattr(self, "_shutdown", True) or not hasattr(client, "export"):
            return super().export(spans)
        try:
            data = encode_request(spans)
        except Unsupported:
            return super().export(spans)
        if 0 < getattr(self, "_max_request_size", 0) < len(data):
            return super().export(spans)  # the SDK logs the batch as too large and drops it
        answers = self._watch_answers(client)
        sent = client.export(data)
        if sent.success and answers is not None and answers:
            self._count_rejected(answers[-1])
        elif not sent.success and answers:
            self.refusal_body = _body_text(answers[-1])
        return SpanExportResult.SUCCESS if sent.success else SpanExportResult.FAILURE

    def _watch_answers(self, client: Any) -> list[Any] | None:
        """A list the client's HTTP transport appends each response of this thread to (None
        where the transport is not where SDK 1.45 keeps it)."""
        transport = getattr(client, "_transport", None)
        if transport is None or not callable(getattr(transport, "request", None)):
            return None
        local = self.__dict__.setdefault("_answers", threading.local())
        if not getattr(transport, "_honed_watched", False):
            request = transport.request

            def watched(*args: Any, **kwargs: Any) -> Any:
                answer = request(*args, **kwargs)
                answers = getattr(local, "answers", None)
                if answers is not None:
                    answers.append(answer)
                return answer

            transport.request, transport._honed_watched = watched, True
        local.answers = []
        return local.answers

    def _count_rejected(self, answer: Any) -> None:
        try:
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

            body = answer.content()
            partial = ExportTraceServiceResponse.FromString(body).partial_success if body else None
        except Exception:  # not protobuf (some receivers answer JSON or nothing): nothing said
            return
        if partial is not None and partial.rejected_spans > 0:
            self.rejected_spans += partial.rejected_spans
            self.rejection = partial.error_message[:500] or None
            log.warning(
                "honed: the OTLP receiver refused %d spans: %s",
                partial.rejected_spans,
                self.rejection or "it gave no reason",
            )


def _body_text(answer: Any) -> str | None:
    try:
        body = answer.content()
    except Exception:  # an answer with no body (a connection error) has nothing to quote
        return None
    if not body:
        return None
    text = body[:300].decode("utf-8", "replace") if isinstance(body, bytes) else str(body)[:300]
    return text.strip() or None


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """An `ExportTraceServiceRequest` of `spans` (one resource, one scope) as bytes."""
    if not spans:
        return b""
    first = spans[0]
    resource, scope = first.resource, first.instrumentation_scope
    body = []
    try:
        for span in spans:
            if span.resource is not resource or span.instrumentation_scope is not scope:
                raise Unsupported("spans of several resources or scopes")
            body.append(_delimited(b"\x12", _span(span)))  # ScopeSpans.spans
    except UnicodeEncodeError as exc:  # the SDK drops such an attribute (or the span): let it
        raise Unsupported("text that is not valid UTF-8") from exc
    resource_bytes, scope_bytes = _header(first)
    scope_spans = _delimited(b"\x12", b"".join((scope_bytes, *body, _string(b"\x1a", scope.schema_url))))
    resource_spans = b"".join((resource_bytes, scope_spans, _string(b"\x1a", resource.schema_url)))
    return _delimited(b"\x0a", resource_spans)


def _header(span: ReadableSpan) -> tuple[bytes, bytes]:
    """`ResourceSpans.resource` and `ScopeSpans.scope` of `span`, encoded by the SDK once per
    resource and scope (the objects are kept, so an id is never reused while cached)."""
    resource, scope = span.resource, span.instrumentation_scope
    if scope is None:
        raise Unsupported("a span without an instrumentation scope")
    cached = _headers.get((id(resource), id(scope)))
    if cached is None:
        (resource_spans,) = encode_spans([span]).resource_spans
        resource_pb = resource_spans.resource.SerializeToString()
        scope_pb = resource_spans.scope_spans[0].scope.SerializeToString()
        cached = (resource, scope, _delimited(b"\x0a", resource_pb), _delimited(b"\x0a", scope_pb))
        if len(_headers) > 64:
            _headers.clear()
        _headers[(id(resource), id(scope))] = cached
    return cached[2], cached[3]


def _span(span: ReadableSpan) -> bytes:
    context = span.context
    if span.links or span.dropped_attributes or span.dropped_events:
        raise Unsupported("links or dropped counts")
    parts = [
        b"\x0a\x10",
        context.trace_id.to_bytes(16, "big"),
        b"\x12\x08",
        context.span_id.to_bytes(8, "big"),
    ]
    if context.trace_state:
        parts.append(_string(b"\x1a", ",".join(f"{k}={v}" for k, v in context.trace_state.items())))
    parent = span.parent
    if parent:
        parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    parts.append(_string(b"\x2a", span.name))
    parts.append(_KIND[span.kind])
    if span.start_time:
        parts += (b"\x39", _U64(span.start_time))
    if span.end_time:
        parts += (b"\x41", _U64(span.end_time))
    attributes = span.attributes
    if attributes:
        parts.append(_attributes(b"\x4a", attributes))
    for event in span.events:
        if event.dropped_attributes:
            raise Unsupported("dropped event attributes")
        fields = [b"\x09", _U64(event.timestamp)] if event.timestamp else []
        fields.append(_string(b"\x12", event.name))
        if event.attributes:
            fields.append(_attributes(b"\x1a", event.attributes))
        parts.append(_delimited(b"\x5a", b"".join(fields)))
    status = span.status
    if status is not None and status.description is None and not status.status_code.value:
        parts.append(b"\x7a\x00")  # UNSET, the status of most spans
    elif status is not None:
        code = status.status_code.value
        parts.append(
            _delimited(
                b"\x7a", _string(b"\x12", status.description) + (b"\x18" + _BYTE[code] if code else b"")
            )
        )
    parts.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS)
    return b"".join(parts)


def _attributes(tag: bytes, attributes: Mapping[str, Any]) -> bytes:
    """Repeated `KeyValue`s under `tag`. Text under 126 bytes, small integers, booleans and
    floats (nearly every value) are written from precomputed heads, with one-byte lengths."""
    keys = _keys
    parts: list[bytes] = []
    for key, value in attributes.items():
        encoded_key = keys.get(key) or _key(key)
        cls = value.__class__
        if cls is str:
            data = value.encode()  # UnicodeEncodeError: encode_request falls back
            n = len(data)
            size = len(encoded_key) + 4 + n
            if n < 126 and size < 128:
                parts += (tag, _BYTE[size], encoded_key, _TEXT_HEAD[n], data)
                continue
        elif (cls is int and 0 <= value < 128) or cls is bool:
            size = len(encoded_key) + 4
            if size < 128:
                parts += (tag, _BYTE[size], encoded_key, _SMALL_INT[value] if cls is int else _BOOL[value])
                continue
        elif cls is float:
            size = len(encoded_key) + 11
            if size < 128:
                parts += (tag, _BYTE[size], encoded_key, b"\x12\x09\x21", _F64(value))
                continue
        key_value = encoded_key + _delimited(b"\x12", _value(value))
        parts += (tag, _varint(len(key_value)), key_value)
    return b"".join(parts)


def _key(key: str) -> bytes:
    encoded = _string(b"\x0a", key)
    if len(_keys) < _MAX_KEYS:
        _keys[key] = encoded
    return encoded


def _value(value: Any) -> bytes:
    """An `AnyValue`'s fields (a oneof: written even when empty or zero, as the SDK's are)."""
    if value.__class__ is str:
        return _string(b"\x0a", value, keep_empty=True)
    if value is True or value is False:
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int) and not isinstance(value, bool):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise Unsupported("an integer beyond int64")
        return b"\x18" + _varint(value if value >= 0 else value + 2**64)
    if isinstance(value, float):
        return b"\x21" + _F64(value)
    if isinstance(value, bytes):
        return _delimited(b"\x3a", value)
    if value is None:
        return b""
    if isinstance(value, str):
        return _string(b"\x0a", value, keep_empty=True)
    if isinstance(value, tuple | list):
        return _delimited(b"\x2a", b"".join(_delimited(b"\x0a", _value(v)) for v in value))
    raise Unsupported(f"an attribute value of type {type(value).__name__}")


def _string(tag: bytes, text: str | None, *, keep_empty: bool = False) -> bytes:
    """A string field; proto3 leaves an empty one out, except inside a oneof."""
    if not text:
        return tag + b"\x00" if keep_empty and text is not None else b""
    data = text.encode()
    return tag + _varint(len(data)) + data


def _delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _BYTE[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
