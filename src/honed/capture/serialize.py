"""Safe serialisation of whatever an agent run holds: JSON-able, redacted, size-capped.

The writer thread calls this on every captured payload, so it must never raise (one odd object must not
lose a whole trajectory), must terminate on cycles and deep graphs, and must bound each field (one huge
tool output must not bloat the store).

    >>> to_jsonable({"when": datetime.date(2024, 1, 2), "ids": {3, 1}})
    {'when': {'__type__': 'datetime.date', 'value': '2024-01-02'}, 'ids': {'__type__': 'set', 'value': [1, 3]}}
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import hashlib
import logging
import math
import os
import pathlib
import types
import uuid
from collections import deque
from collections.abc import Mapping
from functools import lru_cache
from itertools import islice
from typing import TYPE_CHECKING, Any

from honed._json import dumps as fast_json_dumps
from honed.redaction.redact import CUT_MARGIN

if TYPE_CHECKING:
    from honed.redaction.redact import Redactor

logger = logging.getLogger("honed")

DEFAULT_MAX_FIELD_BYTES = 65536
# Below this the truncation marker itself (hash, size, type) would not fit under the cap.
MIN_MAX_FIELD_BYTES = 512
ENV_MAX_FIELD_BYTES = "HONED_MAX_FIELD_BYTES"
DEFAULT_MAX_DEPTH = 32
DEFAULT_MAX_ITEMS = 10_000
# Bytes are rarely useful in a trace beyond their head; 4 KiB keeps magic numbers and small payloads.
BYTES_PREVIEW = 4096

_MAX_TYPE_NAME = 200
_dumps = fast_json_dumps
_FUNCTION_TYPES = (
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    types.BuiltinMethodType,
    types.ModuleType,
)


def to_jsonable(obj: Any, *, max_depth: int = DEFAULT_MAX_DEPTH, max_items: int = DEFAULT_MAX_ITEMS) -> Any:
    """Any Python object as JSON-able data (dict/list/str/int/float/bool/None); never raises.

    Primitives and containers keep their shape; every other object becomes
    `{"__type__": "module.QualName", "value": ...}` (pydantic fields, dataclass fields, public attributes,
    ISO dates, or `repr`). Cycles become `{"__cycle__": type}`, nesting past `max_depth` becomes
    `{"__depth_limit__": type}`, and containers keep at most `max_items` entries plus a `__dropped__` count.
    """
    return _within(obj, max_depth=max_depth, max_items=max_items)[0]


def _within(
    obj: Any, *, max_depth: int = DEFAULT_MAX_DEPTH, max_items: int = DEFAULT_MAX_ITEMS, budget: int = 1 << 62
) -> tuple[Any, bool]:
    """`to_jsonable(obj)` walking at most `budget` nodes, and whether it stopped there. Each node
    is at least a byte of JSON, so a walk that stops at a field's cap has already passed it."""
    walker = _Walker(max_depth, max_items, budget)
    try:
        return walker.walk(obj, 0), walker.nodes_left < 0
    except Exception:  # the walker guards every node; this is only the last net
        return {"__type__": _type_name(type(obj)), "value": _safe_repr(obj)}, False


class Serializer:
    """Turns a payload into a stored field: `to_jsonable`, then the size cap and redaction.

    Args:
        max_field_bytes: the most UTF-8 bytes of JSON one field may take (default 64 KiB, or
            `HONED_MAX_FIELD_BYTES`; bad values are logged and replaced, never raised).
        redactor: replaces secrets. It sees only the head of a field over the cap (the cap plus a
            margin, cut *before* redaction: `Redactor.redact_capped`), so a huge field costs what its
            stored head costs; a secret that straddles the cut is redacted whole (the margin), and the
            preview does not end in part of a token (of up to 256 characters).

    A field over the cap becomes `{"__truncated__": True, "type", "size", "sha256", "preview"}`: `size`
    is of the full JSON bytes before redaction, or of the string's UTF-8 bytes for a plain string, and
    the preview is the head of that (redacted) text, cut so the whole marker stays within the cap.
    `sha256`, of the same full bytes, is there only without a redactor: with one, those bytes are never
    all redacted, and a hash of text holding a secret would let anyone holding the store confirm a
    guess of it.
    """

    def __init__(self, max_field_bytes: int | None = None, redactor: Redactor | None = None) -> None:
        self.max_field_bytes = _resolve_max_field_bytes(max_field_bytes)
        self.redactor = redactor
        # Fields stored otherwise than they came (redacted, the hook's rewrite, cut at the cap):
        # what was recorded beside them (a model's token ids) no longer says what they say.
        self.altered = 0

    def altered_count(self) -> int:
        return self.altered

    def field(self, obj: Any) -> Any:
        """The JSON-able, redacted, size-capped form of `obj`; never raises."""
        return self._field(obj)[0]

    def dumps(self, obj: Any) -> str:
        """`field(obj)` as JSON text (`ensure_ascii=False`), the text the size cap measured."""
        return self._field(obj)[1]

    def _field(self, obj: Any) -> tuple[Any, str]:
        cap = self.max_field_bytes
        if self.redactor is not None:
            if type(obj) is str and len(obj) * 24 + 8 <= cap:  # short: fits even as \uXXXX escapes
                value = self.redactor.redact_text(obj)
                text = _dumps(value)
                if _fits(text, cap):
                    if value != obj:
                        self.altered += 1
                    return value, text
            # The common case in one walk: nothing redacted, and within the cap. Anything else (a
            # secret found, a field that may be over the cap) is decided by the two walks below.
            walker = _RedactingWalker(self.redactor, cap)
            try:
                value = walker.walk(obj, 0)
                if not walker.changed:
                    text = _dumps(value)
                    if _fits(text, cap):
                        return value, text
            except Exception:  # _OverCap, or a bug here: the path below is the reference
                pass
        cut = False
        try:
            # A budget of nodes: shared sub-objects (`[[0] * 10_000] * 10_000`, 10^8 nodes and
            # acyclic) were walked whole before the cap cut them, for minutes, the writer stalled.
            raw, _ = _within(obj, budget=cap + CUT_MARGIN)
            value = raw
            if self.redactor is None:
                text = raw_text = _dumps(raw)
            elif type(raw) is str and len(raw) * 24 + 8 <= cap:  # short: fits even as \uXXXX escapes
                value = self.redactor.redact_text(raw)
                text = raw_text = _dumps(value)
            else:
                raw_text = _dumps(raw)
                if _fits(raw_text, cap):
                    value = self.redactor.redact(raw)
                else:  # cut to the cap (and a margin) first: redaction costs far more per byte
                    value, cut = self.redactor.redact_capped(raw, cap)
                text = _dumps(value)
        except Exception:  # to_jsonable output always dumps; this guards a misbehaving redactor
            logger.exception("honed: could not serialise a %s field", _type_name(type(obj)))
            value = {"__type__": _type_name(type(obj)), "value": "<unserialisable>"}
            self.altered += 1
            return value, _dumps(value)
        if not cut and _fits(text, cap):
            if value is not raw and value != raw:
                self.altered += 1
            return value, text
        self.altered += 1
        if self.redactor is None:
            if isinstance(value, str):
                marker = _truncated_marker(type(obj), value, _utf8(value), cap)
            else:
                marker = _truncated_marker(type(obj), text, _utf8(text), cap)
            return marker, _dumps(marker)
        original = _utf8(raw if isinstance(raw, str) else raw_text)
        preview = value if isinstance(value, str) else text
        marker = _truncated_marker(type(obj), preview, original, cap, hashed=False)
        return marker, _dumps(marker)


def _fits(text: str, cap: int) -> bool:
    # Every character is 1 to 4 UTF-8 bytes: most fields are decided without encoding them.
    return len(text) * 4 <= cap or len(_utf8(text)) <= cap


def _truncated_marker(
    original: type, text: str, data: bytes, cap: int, *, hashed: bool = True
) -> dict[str, Any]:
    """The marker for a field over the cap: `data` is the whole field's bytes, `text` what to preview.

    Without `hashed` (the field was redacted, and `data` was not), there is no sha256 and the preview
    drops a token the cut splits, since the rest of it was never seen beside it.
    """
    marker: dict[str, Any] = {
        "__truncated__": True,
        "type": _type_name(original)[:_MAX_TYPE_NAME],
        "size": len(data),
    }
    if hashed:
        marker["sha256"] = hashlib.sha256(data).hexdigest()
    marker["preview"] = ""
    budget = cap - len(_utf8(_dumps(marker)))
    head = _head_within(text, budget)
    marker["preview"] = head if hashed else _without_split_token(head, text)
    return marker


# A token a cut may split (keys, JWTs, base64): after a cut, at most this much of one is dropped.
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_+/=.-")
_MAX_SPLIT_TOKEN = 256


def _without_split_token(head: str, text: str) -> str:
    """`head` (a head of `text`) without the part of a token that continues past it, up to 256 chars.

    A longer run is kept: it is a blob rather than a credential, and the redactor saw it whole well
    past the cut (`CUT_MARGIN`).
    """
    n = len(head)
    if n == 0 or n >= len(text) or head[-1] not in _TOKEN_CHARS or text[n] not in _TOKEN_CHARS:
        return head
    start = n - 1
    floor = max(0, n - _MAX_SPLIT_TOKEN)
    while start > floor and head[start - 1] in _TOKEN_CHARS:
        start -= 1
    if start == floor and floor > 0 and head[floor - 1] in _TOKEN_CHARS:
        return head
    return head[:start]


def _head_within(text: str, budget: int) -> str:
    """The longest head of `text` whose JSON string body takes at most `budget` UTF-8 bytes."""
    n = min(len(text), max(budget, 0))
    while n > 0:
        head = text[:n]
        size = len(_utf8(_dumps(head))) - 2  # minus the quotes
        if size <= budget:
            return head
        # Escapes and multi-byte characters make bytes outgrow characters: shrink in proportion.
        n = min(n - 1, n * budget // size)
    return ""


def _utf8(text: str) -> bytes:
    # Lone surrogates (from broken decoders upstream) must not make a field unmeasurable.
    return text.encode("utf-8", "surrogatepass")


def _resolve_max_field_bytes(value: Any) -> int:
    source = "max_field_bytes"
    if value is None:
        raw = os.environ.get(ENV_MAX_FIELD_BYTES, "").strip()
        if not raw:
            return DEFAULT_MAX_FIELD_BYTES
        source = ENV_MAX_FIELD_BYTES
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            logger.warning("honed: %s=%r is not an integer; using %d", source, raw, DEFAULT_MAX_FIELD_BYTES)
            return DEFAULT_MAX_FIELD_BYTES
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        logger.warning(
            "honed: %s=%r is not a positive integer; using %d", source, value, DEFAULT_MAX_FIELD_BYTES
        )
        return DEFAULT_MAX_FIELD_BYTES
    if value < MIN_MAX_FIELD_BYTES:
        logger.warning("honed: %s=%d is below the minimum; using %d", source, value, MIN_MAX_FIELD_BYTES)
        return MIN_MAX_FIELD_BYTES
    return value


class _Walker:
    """One conversion: holds the ids on the current path (cycle detection) and the limits."""

    __slots__ = ("max_depth", "max_items", "nodes_left", "path")

    def __init__(self, max_depth: int, max_items: int, budget: int = 1 << 62) -> None:
        self.max_depth = max_depth
        self.max_items = max(max_items, 0)
        self.nodes_left = budget  # below 0: the walk stopped taking nodes (see `_within`)
        self.path: set[int] = set()

    def walk(self, obj: Any, depth: int) -> Any:
        self.nodes_left -= 1
        t = type(obj)
        if t is str or t is bool or obj is None:
            return obj
        if t is int:
            return obj if _MIN_INT <= obj <= _MAX_INT else _big_int(obj)
        if t is float:
            return _float(obj)
        if depth >= self.max_depth:
            return {"__depth_limit__": _type_name(t)}
        oid = id(obj)
        if oid in self.path:
            return {"__cycle__": _type_name(t)}
        self.path.add(oid)
        try:
            if t is dict:
                return self._mapping(obj, depth)
            if t is list or t is tuple:
                return self._sequence(obj, depth)
            return self._object(obj, t, depth)
        except Exception:  # a raising property, a dict mutated under us, ...: keep what can be kept
            return {"__type__": _type_name(t), "value": _safe_repr(obj)}
        finally:
            self.path.discard(oid)

    def _mapping(self, obj: Mapping[Any, Any], depth: int) -> dict[str, Any]:
        total = len(obj)
        # One C-level copy: the agent thread may still be mutating this dict.
        items = list(islice(obj.items(), self.max_items))
        out = {}
        for k, v in items:
            if self.nodes_left < 0:
                break
            out[_key(k)] = self.walk(v, depth + 1)
        if total > len(out):
            out["__dropped__"] = total - len(out)
        return out

    def _sequence(self, obj: Any, depth: int) -> list[Any]:
        total = len(obj)
        items = obj[: self.max_items] if isinstance(obj, (list, tuple)) else list(islice(obj, self.max_items))
        out = []
        for v in items:
            if self.nodes_left < 0:
                break
            out.append(self.walk(v, depth + 1))
        if total > len(out):
            out.append({"__dropped__": total - len(out)})
        return out

    def _set(self, obj: set[Any] | frozenset[Any], depth: int) -> dict[str, Any]:
        total = len(obj)
        items = list(islice(obj, self.max_items))
        items.sort(key=_safe_repr)  # deterministic output for equal sets
        out = [self.walk(v, depth + 1) for v in items]
        if total > len(items):
            out.append({"__dropped__": total - len(items)})
        return {"__type__": _type_name(type(obj)), "value": out}

    def _object(self, obj: Any, t: type, depth: int) -> Any:
        if isinstance(obj, dict):
            return self._mapping(obj, depth)
        if isinstance(obj, (list, tuple, deque)):
            return self._sequence(obj, depth)
        name = _type_name(t)
        if isinstance(obj, type):
            return {"__type__": "type", "value": _type_name(obj)}
        if isinstance(obj, enum.Enum):
            return {"__type__": name, "value": self.walk(obj.value, depth + 1)}
        if getattr(t, "tolist", None) is not None and getattr(t, "dtype", None) is not None:
            return self._array(obj, name, depth)
        if isinstance(obj, str):  # str/int/float subclasses: their plain value, like json.dumps
            return str.__str__(obj)
        if isinstance(obj, int):
            return self.walk(int.__int__(obj), depth)
        if isinstance(obj, float):
            return _float(float.__float__(obj))
        if callable(getattr(t, "model_dump", None)):
            dumped = _pydantic_dump(obj)
            if dumped is not _MISSING:
                return {"__type__": name, "value": self.walk(dumped, depth + 1)}
        if dataclasses.is_dataclass(obj):
            fields = {f.name: self._attribute(obj, f.name, depth) for f in dataclasses.fields(obj)}
            return {"__type__": name, "value": fields}
        if isinstance(obj, (bytes, bytearray, memoryview)):
            return _bytes(obj)
        if isinstance(obj, (datetime.date, datetime.time)):  # datetime is a date
            return {"__type__": name, "value": obj.isoformat()}
        if isinstance(obj, datetime.timedelta):
            return {"__type__": name, "value": obj.total_seconds()}
        if isinstance(obj, (uuid.UUID, decimal.Decimal, pathlib.PurePath)):
            return {"__type__": name, "value": str(obj)}
        if isinstance(obj, BaseException):
            return {"__type__": name, "message": _safe_str(obj)}
        if isinstance(obj, (set, frozenset)):
            return self._set(obj, depth)
        if isinstance(obj, Mapping):
            return self._mapping(obj, depth)
        if isinstance(obj, _FUNCTION_TYPES):
            # A module's or function's attributes are the whole program: its name is what a trace needs.
            qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
            module = getattr(obj, "__module__", None)
            label = f"{module}.{qualname}" if module and qualname else _safe_repr(obj)
            return {"__type__": name, "value": label}
        attributes = _public_attribute_names(obj)
        if attributes:
            return {"__type__": name, "value": {a: self._attribute(obj, a, depth) for a in attributes}}
        return {"__type__": name, "value": _safe_repr(obj)}

    def _attribute(self, obj: Any, attribute: str, depth: int) -> Any:
        try:
            value = getattr(obj, attribute)
        except Exception:
            return f"<unreadable {attribute}>"
        return self.walk(value, depth + 1)

    def _array(self, obj: Any, name: str, depth: int) -> dict[str, Any]:
        # numpy arrays and scalars (and torch tensors) by duck typing: numpy is never imported here.
        out: dict[str, Any] = {"__type__": name, "dtype": _safe_str(obj.dtype)}
        try:
            out["shape"] = [int(n) for n in obj.shape]
        except Exception:
            out["shape"] = None
        size = getattr(obj, "size", None)
        if callable(size):  # torch: size() is the shape, numel() the count
            size = obj.numel()
        if isinstance(size, int) and size > self.max_items and out["shape"]:
            out["value"] = self.walk(obj.ravel()[: self.max_items].tolist(), depth + 1)
            out["__dropped__"] = size - self.max_items
        else:
            out["value"] = self.walk(obj.tolist(), depth + 1)
        return out


class _OverCap(Exception):
    """The strings alone exceed the field cap: `_RedactingWalker` stops before redacting them."""


class _RedactingWalker(_Walker):
    """`to_jsonable` and `Redactor.redact` in one walk, for fields that turn out to hold no secret.

    Plain dicts, lists and tuples are walked once, each string and key redacted as it is met, a
    JSON schema's `properties` by the redactor's own rule for them; one whose values are named by
    their siblings (`Redactor.names_a_secret`) marks the field changed. Any other node (objects,
    non-string keys, cycles, the depth limit) is converted by the plain walker and then redacted,
    as the two-walk path does.
    `changed` says whether redaction (or the hook) altered anything: only an unchanged result is
    used, so a field with a secret, and with it the cap's sizes and preview, goes through the
    two-walk path unchanged. Strings and keys are counted against the cap, and the walk stops
    (`_OverCap`) once they exceed it, so an oversized field is redacted only head first, as before.
    """

    __slots__ = ("_plain", "changed", "left", "redactor")

    def __init__(self, redactor: Redactor, cap: int) -> None:
        super().__init__(DEFAULT_MAX_DEPTH, DEFAULT_MAX_ITEMS)
        self.redactor = redactor
        self.left = cap  # characters of strings and keys still within the cap (each is >= 1 byte)
        self.changed = False
        self._plain: _Walker | None = None

    @property
    def plain(self) -> _Walker:
        """The plain walker, on the same path (cycles are seen across both)."""
        if self._plain is None:
            self._plain = _Walker(self.max_depth, self.max_items, max(self.left, 0) + CUT_MARGIN)
            self._plain.path = self.path
        return self._plain

    def walk(self, obj: Any, depth: int) -> Any:
        self.left -= 1  # every node is at least a byte of JSON: numbers count too
        if self.left < 0:
            raise _OverCap
        t = type(obj)
        if t is str:
            self.left -= len(obj)
            if self.left < 0:
                raise _OverCap
            out = self.redactor.redact_text(obj)
            if out is not obj and out != obj:
                self.changed = True
            return out
        if t is bool or obj is None:
            return obj
        if t is int:
            return obj if _MIN_INT <= obj <= _MAX_INT else _big_int(obj)
        if t is float:
            return _float(obj)
        if (t is dict or t is list or t is tuple) and depth < self.max_depth and id(obj) not in self.path:
            oid = id(obj)
            self.path.add(oid)
            try:
                if self.redactor.names_a_secret(obj):
                    # A value named by its sibling, or bytes: the two walks redact it as a whole.
                    self.changed = True
                if t is not dict:
                    return self._sequence(obj, depth)
                out = self._redacted_mapping(obj, depth)
                if out is not None:
                    return out
            finally:
                self.path.discard(oid)
        plain = self.plain.walk(obj, depth)
        redacted = self.redactor.redact(plain)
        if redacted is not plain and redacted != plain:
            self.changed = True
        return redacted

    def _redacted_mapping(self, obj: dict[Any, Any], depth: int, named: bool = True) -> dict[str, Any] | None:
        """The dict converted and redacted, or None (nothing done) when a key is not a string.
        With `named` False (a JSON schema's `properties`), keys do not name their values."""
        total = len(obj)
        items = list(islice(obj.items(), self.max_items))  # one C-level copy, as in `_mapping`
        out: dict[str, Any] = {}
        redact_key = self.redactor.redact_key
        for key, value in items:
            if type(key) is not str:
                return None
            self.left -= len(key)
            new_key, kind = redact_key(key)
            if new_key is not key and new_key != key:
                self.changed = True
            if key == "properties" and type(value) is dict:
                out[new_key] = self._schema_properties(obj, value, depth + 1)
                continue
            if kind is None or not named:
                out[new_key] = self.walk(value, depth + 1)
                continue
            plain = self.plain.walk(value, depth + 1)
            redacted = self.redactor.redact_named(kind, plain, key)
            if redacted is not plain and redacted != plain:
                self.changed = True
            out[new_key] = redacted
        if total > len(items):
            out["__dropped__"] = total - len(items)
        return out

    def _schema_properties(self, schema: dict[Any, Any], properties: dict[Any, Any], depth: int) -> Any:
        """`properties` of `schema`: in an object schema (a tool's parameters) its keys are
        parameter names, not secrets' names (`Redactor.redact`'s rule, on the same values)."""
        kind = schema.get("type")
        if type(kind) is not str:
            if kind is not None:  # a str subclass, an enum...: left to the two walks
                self.changed = True
            return self.walk(properties, depth)
        if kind != "object":
            return self.walk(properties, depth)
        oid = id(properties)
        if depth >= self.max_depth or oid in self.path:
            return self.walk(properties, depth)  # the limit's or the cycle's marker, redacted
        self.path.add(oid)
        try:
            out = self._redacted_mapping(properties, depth, named=False)
        finally:
            self.path.discard(oid)
        if out is None:  # a key that is not a string: left to the two walks
            self.changed = True
        return out


_MISSING = object()


def _pydantic_dump(obj: Any) -> Any:
    try:
        return obj.model_dump(mode="json", warnings=False)
    except Exception:  # arbitrary-typed fields or cycles: python mode, then the walker, copes
        pass
    try:
        return obj.model_dump()
    except Exception:
        return _MISSING


def _public_attribute_names(obj: Any) -> list[str]:
    names: list[str] = []
    attributes = getattr(obj, "__dict__", None)  # absent with __slots__
    if isinstance(attributes, dict):
        names.extend(k for k in attributes if isinstance(k, str) and not k.startswith("_"))
    for klass in type(obj).__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if isinstance(slot, str) and not slot.startswith("_") and slot not in names:
                names.append(slot)
    return names


def _bytes(obj: bytes | bytearray | memoryview) -> dict[str, Any]:
    view = memoryview(obj)
    size = view.nbytes
    try:
        head = view.cast("B")[:BYTES_PREVIEW].tobytes()
    except TypeError:  # not C-contiguous: copy it whole, then cut
        head = view.tobytes()[:BYTES_PREVIEW]
    out: dict[str, Any] = {
        "__type__": "bytes",
        "size": size,
        "base64": base64.b64encode(head).decode("ascii"),
    }
    if size > len(head):
        out["truncated"] = True
    return out


# What every JSON encoder on the way takes as a number (orjson: 64 bits): larger ints were a
# field's error, and the whole field (a state with the answer beside a checksum) was lost (a QA
# pass, session 20).
_MIN_INT, _MAX_INT = -(2**63), 2**64 - 1


def _big_int(value: int) -> dict[str, Any]:
    try:
        text = str(value)
    except ValueError:  # past Python's int-to-text digit limit
        text = f"an integer of {value.bit_length()} bits"
    return {"__type__": "int", "value": text}


def _float(value: float) -> float | str:
    if math.isfinite(value):
        return value
    if value != value:
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _key(key: Any) -> str:
    if type(key) is str:
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return str(key)
    return _safe_str(key)


def _safe_repr(obj: Any) -> str:
    try:
        text = repr(obj)
        if isinstance(text, str):
            return text
    except Exception:
        pass
    return f"<unprintable {_type_name(type(obj))}>"


def _safe_str(obj: Any) -> str:
    try:
        text = str(obj)
        if isinstance(text, str):
            return text
    except Exception:
        pass
    return _safe_repr(obj)


def _type_name(t: type) -> str:
    try:
        return _cached_type_name(t)
    except Exception:  # unhashable metaclass, raising __module__, ...
        return "<unknown type>"


@lru_cache(maxsize=2048)
def _cached_type_name(t: type) -> str:
    qualname = getattr(t, "__qualname__", None) or getattr(t, "__name__", None)
    if not isinstance(qualname, str):
        qualname = "<unknown type>"
    module = getattr(t, "__module__", None)
    if not isinstance(module, str) or module == "builtins":
        return qualname
    return f"{module}.{qualname}"
