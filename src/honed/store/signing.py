"""Signed labels: verdicts that code holding only the store's URL cannot forge.

The agent's process writes its runs to the store, so whatever runs in it (a tool, a plugin, code a
prompt injection wrote) holds the store's credentials: it could write a `pass` for its own run,
raise a model judge's trust, store a flattering audit, or edit a run after it was judged. With
`HONED_VERDICT_KEY` set in the processes that judge and learn (`honed verify`, `honed label`, the
trainer) and not in the agent's, every verdict, verifier policy and audit honed writes carries an
HMAC-SHA256 of its fields (a verdict also of the content it judged, `content_digest`), and a store
opened with the key counts only what checks out: a verdict whose signature or run does not match
reads as if it was never written, a policy as low trust, an audit as none. Without the key nothing
is signed or checked (one trust domain: a notebook, the demo, tests).

A shared secret, not a key pair: whoever may judge may also check, and the standard library has it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from honed.trajectory import Trajectory

KEY_ENV = "HONED_VERDICT_KEY"
MIN_KEY_BYTES = 16


class Signer:
    """Signs and checks rows with one secret key (its text never printed)."""

    __slots__ = ("_key",)

    def __init__(self, key: str | bytes) -> None:
        # Stripped: a key read from a secret file ends with a newline, and was another key.
        raw = (key.encode() if isinstance(key, str) else bytes(key)).strip()
        if len(raw) < MIN_KEY_BYTES:  # (sixteen spaces were a key)
            raise ValueError(
                f"{KEY_ENV} must be at least {MIN_KEY_BYTES} bytes "
                '(make one with: python -c "import secrets; print(secrets.token_urlsafe(32))")'
            )
        self._key = raw

    def __repr__(self) -> str:
        return "Signer(<key hidden>)"

    @property
    def fingerprint(self) -> str:
        """Names the key without telling it (the worker's queue: runs a worker with another key
        judged are judged again under this one)."""
        return self.sign("fingerprint")[:12]

    def sign(self, kind: str, *fields: Any) -> str:
        return hmac.new(self._key, _canonical([kind, *fields]), hashlib.sha256).hexdigest()

    def checks(self, signature: str | None, kind: str, *fields: Any) -> bool:
        # Bytes: `compare_digest` raises on non-ASCII text, and one such row stopped every reader.
        if not isinstance(signature, str) or len(signature) != 64:
            return False
        expected = self.sign(kind, *fields).encode()
        return hmac.compare_digest(signature.encode("utf-8", "replace"), expected)

    # -- what each row's signature covers --------------------------------------------------------

    def verdict(self, row: Mapping[str, Any]) -> str:
        return self.sign("verdict", *_verdict_fields(row))

    def verdict_checks(self, row: Mapping[str, Any]) -> bool:
        return self.checks(row.get("signature"), "verdict", *_verdict_fields(row))

    def policy(self, verifier: str, trust: str, min_precision: float | None) -> str:
        return self.sign("policy", verifier, trust, min_precision)

    def policy_checks(self, row: Mapping[str, Any]) -> bool:
        return self.checks(
            row.get("signature"), "policy", row["verifier"], row["trust"], row["min_precision"]
        )

    def audit(self, row: Mapping[str, Any]) -> str:
        return self.sign("audit", *(row[k] for k in _AUDIT_FIELDS))

    def audit_checks(self, row: Mapping[str, Any]) -> bool:
        return self.checks(row.get("signature"), "audit", *(row[k] for k in _AUDIT_FIELDS))


def signer_from_env() -> Signer | None:
    key = os.environ.get(KEY_ENV)
    return Signer(key) if key else None


def content_digest(t: Trajectory) -> str:
    """SHA-256 of what a verdict judged and training learns from: the run's task, labels and
    metadata (the held-out policy reads it), its steps (their ids and parents, which tell a
    subagent's calls; their `extra`: the token ids and log-probabilities training uses) and
    outcome; not its timings. A run is never changed once finished, except a resumed one (which
    is judged again), so a digest that differs from its verdict's means the run was edited after
    it was judged."""
    steps = [
        [s.id, s.index, s.parent_id, s.kind, s.name, s.input, s.output, s.error, s.reasoning, s.tool_calls,
         s.usage, s.model_version, s.extra]
        for s in t.steps
    ]  # fmt: skip
    content = [
        t.id, t.agent, t.task, t.task_id, t.split, t.metadata, t.output, t.status, t.error, t.model_version,
        t.thread_id, steps,
    ]  # fmt: skip
    return hashlib.sha256(_canonical(content)).hexdigest()


_AUDIT_FIELDS = (
    "verifier",
    "version",
    "gold",
    "tp",
    "fp",
    "tn",
    "fn",
    "undecided",
    "precision",
    "created_at",
)


def _verdict_fields(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        row["trajectory_id"], row["verifier"], row["version"], row["passed"], row["score"],
        row["reason"], row["evidence"], row["created_at"], row["digest"],
    )  # fmt: skip


def _canonical(value: Any) -> bytes:
    """One byte string per value, whoever computes it: orjson with sorted keys (~10x the standard
    library: a signed read digests every run), the standard library for what orjson refuses
    (integers beyond 64 bits, lone surrogates), each value always taking the same path."""
    try:
        return orjson.dumps(
            value, default=_plain, option=orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME
        )
    except (TypeError, orjson.JSONEncodeError):
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_plain)
        return b"std:" + text.encode("utf-8", "surrogatepass")


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):  # the instant, however the database hands it back
        aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return aware.isoformat()
    return str(value)
