"""Fast JSON text for the writer and the store: orjson when it can, the standard library when not.

orjson is ~10x faster; it refuses what JSON-able data rarely holds (integers beyond 64 bits, lone
surrogates), and then the standard encoder, which takes both, is used.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_std = json.JSONEncoder(ensure_ascii=False).encode


def dumps(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except (TypeError, orjson.JSONEncodeError):
        return _std(value)
