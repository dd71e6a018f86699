"""Fast JSON text for the writer and the store: orjson when it can, the standard library when not.

orjson is ~10x faster; it refuses what JSON-able data rarely holds (integers beyond 64 bits, lone
surrogates), and then the standard encoder, which takes both, is used.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_std = json.JSONEncoder(ensure_ascii=False).encode
# What no store takes as text: NUL (PostgreSQL) and lone surrogates (UTF-8 cannot encode them).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return _std(value)


def storable(value: Any) -> Any:
    """`value` as a store holds it: itself, or `scrubbed` when it carries NUL or a lone surrogate
    (found by one fast encode, not a walk)."""
    try:
        text = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return scrubbed(value)  # a lone surrogate (or a value orjson does not take: walked anyway)
    return scrubbed(value) if b"\\u0000" in text else value


def scrubbed(value: Any) -> Any:
    """`value` with NUL and lone surrogates in its strings (and keys) replaced by U+FFFD: what a
    hostile or broken input leaves in text that no store can hold. The slow path: used when a
    write failed on them, never on the hot one."""
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {scrubbed(k): scrubbed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrubbed(v) for v in value]
    return value
