"""Would orjson plus one prefilter over the JSON text beat the writer's one-walk serialiser per field?

    .venv/bin/python benchmarks/field_fastpath.py [--trajectories 100] [--repeats 5]

The writer turns every captured payload into a stored field (`Serializer._field`: convert, redact,
cap). The candidate tried here encodes a payload with orjson (refusing anything but plain JSON
types), decodes it back as the stored copy (a copy that does not equal the payload, e.g. a tuple or
NaN, falls back), and runs redaction's prefilter once over the whole JSON text, plus the words that
name a secret key, with separators dropped (a key `pass_word` names a password). Only a clean text
skips the walk. It feeds the fields of `capture.py`'s synthetic runs (as the writer sees them)
through both, on this thread, and prints the best of `--repeats` per field, with how many fields
the candidate would have taken.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).parent))
import capture  # the ingest benchmark's payloads and feed

_OPTIONS = (
    orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
)
_SEPARATORS = re.compile(r"[^a-z0-9]+")


def _refuse(obj: Any) -> Any:
    raise TypeError(type(obj).__name__)


def fields(trajectories: int) -> list[Any]:
    """Every payload the writer's serialiser is handed for `trajectories` synthetic runs."""
    import honed
    from honed.capture import serialize
    from honed.capture.recorder import Recorder

    seen: list[Any] = []
    original = serialize.Serializer._field

    def grab(self: Any, obj: Any) -> Any:
        seen.append(obj)
        return original(self, obj)

    serialize.Serializer._field = grab  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = honed.open_store(f"sqlite:///{tmp}/fields.db")
            recorder = Recorder(store, flush_interval=3600)
            handler = honed.CallbackHandler(recorder=recorder)
            for seed in range(trajectories):
                capture._feed_trajectory(handler, capture._payloads(seed), seed)
            recorder._drain()
            recorder.close()
            store.close()
    finally:
        serialize.Serializer._field = original  # type: ignore[method-assign]
    return seen


def candidate(obj: Any, words: tuple[str, ...], anchors: Any) -> tuple[Any, str] | None:
    """(stored copy, JSON text) when `obj` is plain JSON data no redaction rule could touch, else None."""
    try:
        raw = orjson.dumps(obj, option=_OPTIONS, default=_refuse)
    except (TypeError, orjson.JSONEncodeError):
        return None
    copy = orjson.loads(raw)
    if copy != obj:
        return None
    text = raw.decode()
    if anchors.search(text) is not None:
        return None
    joined = _SEPARATORS.sub("", text.lower())
    for word in words:
        if word in joined:
            return None
    return copy, text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trajectories", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from honed.capture.serialize import Serializer
    from honed.redaction import redact

    payloads = fields(args.trajectories)
    serializer = Serializer(redactor=redact.Redactor())
    # The prefilter's words, and the words that name a secret key but hold none of them.
    words = (*redact._KEYWORDS, "auth", "cred", "passc")
    taken = sum(candidate(obj, words, redact._ANCHORS) is not None for obj in payloads)
    arms = {
        "one walk (honed)": lambda obj: serializer._field(obj),
        "orjson + text prefilter": lambda obj: candidate(obj, words, redact._ANCHORS),
    }
    print(f"{len(payloads)} fields; the candidate takes {taken} ({taken / len(payloads):.0%}) without a walk")
    for name, run in arms.items():
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            for obj in payloads:
                run(obj)
            best = min(best, time.perf_counter() - started)
        print(f"{name:<26} {best / len(payloads) * 1e6:6.2f} us per field (best of {args.repeats})")


if __name__ == "__main__":
    main()
