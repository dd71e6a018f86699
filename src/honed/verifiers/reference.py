"""`ReferenceMatch`: the final answer against the task's reference, `metadata["expected"]`.

    >>> ReferenceMatch().verify(trajectory)            # mode chosen from the reference's shape
    >>> ReferenceMatch("regex"); ReferenceMatch("set")  # or fixed; metadata["match"] overrides per task

Modes: `exact` (stripped text equality), `normalized` (case, Unicode form, whitespace and edge
punctuation ignored), `contains` (normalized reference appears as words in the answer), `numeric`
(the last number in the answer within `rel_tol`/`abs_tol`, or metadata["tolerance"]), `regex`
(`re.search`), `list`/`set` (items from a JSON array or a comma/newline separated answer; a set
scores its Jaccard overlap), `json` (parsed answer equals the reference). `auto` picks numeric for
numbers and numeric-looking strings, list for lists, json for dicts and JSON objects as text,
normalized otherwise.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterable
from typing import Any, Literal

import regex

from honed.trajectory import Trajectory, Verdict
from honed.verifiers import patterns
from honed.verifiers.outcome import agent_failed, final_answer, last_code_block, reference
from honed.verifiers.protocol import BaseVerifier, CannotTell, Unreadable, verdict

Mode = Literal["auto", "exact", "normalized", "contains", "numeric", "regex", "list", "set", "json"]
MODES: tuple[str, ...] = (
    "auto",
    "exact",
    "normalized",
    "contains",
    "numeric",
    "regex",
    "list",
    "set",
    "json",
)

# A number starts a word: "mp3", "x7f2a" and the "ect6end" of an untrained model's byte soup hold no
# answer (a QA pass, session 17: each passed its digit's reference). A unit may follow ("6km").
_NUMBER = re.compile(
    r"(?<![\w.])(?:[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?)"
)
_EDGE_PUNCTUATION = " \t\n.,;:!?\"'`*_()[]"
_SEPARATORS = re.compile(r"[\n,;]")
_PREVIEW = 500


class ReferenceMatch(BaseVerifier):
    """Compares the final answer with `metadata[key]`; see the module docstring for the modes."""

    def __init__(
        self,
        mode: Mode = "auto",
        *,
        key: str = "expected",
        rel_tol: float = 1e-6,
        abs_tol: float = 1e-9,
        name: str = "reference",
        version: str = "1",
        tags: Iterable[str] = (),
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.mode, self.key, self.rel_tol, self.abs_tol = mode, key, rel_tol, abs_tol
        self.name, self.version, self.tags = name, version, frozenset(tags)

    def applies_to(self, trajectory: Trajectory) -> bool:
        return self.key in (trajectory.metadata or {})

    def check(self, t: Trajectory) -> Verdict:
        failed = agent_failed(t)
        if failed is not None:
            return verdict(False, f"the agent run failed: {failed}"[:500], agent_error=failed[:2000])
        expected = reference(t, self.key)
        answer = final_answer(t)
        mode = (t.metadata or {}).get("match") or self.mode
        if mode not in MODES:
            raise CannotTell(f"unknown match mode metadata['match']={mode!r}; use one of {MODES}")
        if mode == "auto":
            mode = auto_mode(expected)
        tolerance = (t.metadata or {}).get("tolerance")
        try:
            result = _MATCHERS[mode](self, answer, expected, tolerance)
        except (ValueError, RecursionError, OverflowError) as exc:
            # Python refuses 5,000-digit integers and JSON nested 3,000 deep: what the agent wrote
            # must not make the verdict "could not tell" (`label` skips that), so it fails.
            raise Unreadable(
                f"the answer could not be read ({type(exc).__name__}: {exc})"[:300], mode=mode
            ) from exc
        result.evidence = {"mode": mode, "expected": _preview(expected), "answer": _preview(answer)} | (
            result.evidence or {}
        )
        return result

    # -- modes --------------------------------------------------------------------------------

    def _exact(self, answer: str, expected: Any, _tol: Any) -> Verdict:
        want = _text(expected)
        ok = answer.strip() == want.strip()
        return verdict(
            ok, "exact match" if ok else "answer differs from the reference", diff=_diff(want, answer)
        )

    def _normalized(self, answer: str, expected: Any, _tol: Any) -> Verdict:
        want = _text(expected)
        ok = normalize(answer) == normalize(want)
        reason = (
            "match after normalisation" if ok else "answer differs from the reference after normalisation"
        )
        return verdict(ok, reason, diff=_diff(normalize(want), normalize(answer)))

    def _contains(self, answer: str, expected: Any, _tol: Any) -> Verdict:
        want = normalize(_text(expected))
        if not want:
            raise CannotTell("the reference is empty after normalisation")
        ok = re.search(rf"(?<!\w){re.escape(want)}(?!\w)", normalize(answer)) is not None
        return verdict(ok, "reference found in the answer" if ok else "reference not found in the answer")

    def _numeric(self, answer: str, expected: Any, tolerance: Any) -> Verdict:
        want = _number(expected)
        if want is None:
            raise CannotTell(f"the reference {expected!r} is not a number")
        # NFKC and the minus signs: "−5" (U+2212) read as 5 and passed where 5 was expected.
        found = _NUMBER.findall(unicodedata.normalize("NFKC", answer).translate(_MINUS_SIGNS))
        if not found:
            return verdict(False, "no number in the answer", want=want)
        got = _number(found[-1])
        abs_tol = float(tolerance) if isinstance(tolerance, int | float) else self.abs_tol
        whole = _integer(expected), _integer(found[-1])
        if tolerance is None and None not in whole:
            # An integer reference (a count, an id) is exact: 1e-6 relative let 4815162342 pass as 4815160000.
            ok = whole[0] == whole[1]
            return verdict(ok, f"{whole[1]} {'==' if ok else '!='} {whole[0]}", got=whole[1], want=whole[0])
        ok = got is not None and math.isclose(got, want, rel_tol=self.rel_tol, abs_tol=abs_tol)
        reason = f"{got:g} {'==' if ok else '!='} {want:g}" + (f" (±{abs_tol:g})" if abs_tol > 1e-9 else "")
        return verdict(ok, reason, got=got, want=want, tolerance=abs_tol)

    def _regex(self, answer: str, expected: Any, _tol: Any) -> Verdict:
        pattern = _text(expected)
        try:
            patterns.compiled(pattern, regex.S)
        except regex.error as exc:
            raise CannotTell(f"invalid regex in metadata[{self.key!r}]: {exc}") from exc
        # The whole answer, within a deadline: its head alone (10,000 characters) let `^\d+$` pass
        # digits followed by prose, its end anchor matching where the head was cut (a QA pass, session 24).
        ok = patterns.search(pattern, answer, regex.S)
        return verdict(ok, "answer matches the pattern" if ok else "answer does not match the pattern")

    def _list(self, answer: str, expected: Any, _tol: Any) -> Verdict:
        want, got = (
            [normalize(_text(x)) for x in _items(expected)],
            [normalize(_text(x)) for x in _items(answer)],
        )
        ok = want == got
        missing, extra = [x for x in want if x not in got], [x for x in got if x not in want]
        reason = "same items in the same order" if ok else "items differ from the reference"
        return verdict(
            ok, reason, missing=missing[:50], extra=extra[:50], order_only=not missing and not extra
        )

    def _set(self, answer: str, expected: Any, _tol: Any) -> Verdict:
        want, got = (
            {normalize(_text(x)) for x in _items(expected)},
            {normalize(_text(x)) for x in _items(answer)},
        )
        ok = want == got
        jaccard = len(want & got) / len(want | got) if want | got else 1.0
        reason = "same set of items" if ok else f"item sets differ (Jaccard {jaccard:.2f})"
        return verdict(
            ok, reason, score=jaccard, missing=sorted(want - got)[:50], extra=sorted(got - want)[:50]
        )

    def _json(self, answer: str, expected: Any, _tol: Any) -> Verdict:
        want = parse_json(expected) if isinstance(expected, str) else expected
        try:
            parsed = answer_json(answer)
        except CannotTell as exc:  # the agent's answer, not the reference: a fail, never "could not tell"
            return verdict(False, f"the answer is not the JSON asked for: {exc.reason}")
        ok = json_equal(parsed, want)
        got_text = json.dumps(parsed, indent=1, sort_keys=True, default=str)
        want_text = json.dumps(want, indent=1, sort_keys=True, default=str)
        return verdict(
            ok,
            "same JSON value" if ok else "JSON differs from the reference",
            diff=_diff(want_text, got_text),
        )


_MATCHERS: dict[str, Callable[[ReferenceMatch, str, Any, Any], Verdict]] = {
    "exact": ReferenceMatch._exact,
    "normalized": ReferenceMatch._normalized,
    "contains": ReferenceMatch._contains,
    "numeric": ReferenceMatch._numeric,
    "regex": ReferenceMatch._regex,
    "list": ReferenceMatch._list,
    "set": ReferenceMatch._set,
    "json": ReferenceMatch._json,
}


def auto_mode(expected: Any) -> str:
    """The mode a reference's shape implies (see the module docstring)."""
    if isinstance(expected, bool):
        return "normalized"
    if isinstance(expected, int | float):
        return "numeric"
    if isinstance(expected, list | tuple):
        return "list"
    if isinstance(expected, dict):
        return "json"
    text = expected.strip() if isinstance(expected, str) else ""
    if _NUMBER.fullmatch(text) and not _ZERO_PADDED.match(text):  # "00123" is an id, not 123
        return "numeric"
    if text.startswith("{") and text.endswith("}"):
        # A JSON object written as text (an `expected` kept in a JSON string): a structured answer
        # with its keys in another order failed "after normalisation" (a QA pass, session 27).
        try:
            if isinstance(json.loads(text), dict):
                return "json"
        except (ValueError, RecursionError):
            pass
    return "normalized"


def normalize(text: str) -> str:
    """Casefolded NFKC text with runs of whitespace collapsed and edge punctuation stripped."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return re.sub(r"\s+", " ", text).strip(_EDGE_PUNCTUATION)


def parse_json(text: Any) -> Any:
    """JSON from an answer, tolerating a ```json fence around it; `CannotTell` when malformed."""
    if not isinstance(text, str):
        return text
    body = last_code_block(text, ("", "json")) or text
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise CannotTell(f"malformed JSON: {exc}", text=_preview(body)) from exc


def answer_json(text: Any) -> Any:
    """An agent's answer as JSON, as `parse_json` reads it but stricter, since the agent chose it:
    a key given twice (parsers disagree on which counts) is malformed too. `CannotTell` when
    malformed, which a verifier turns into a fail: an agent must not pick "could not tell"."""
    if not isinstance(text, str):
        return text
    body = last_code_block(text, ("", "json")) or text
    try:
        return json.loads(
            body, object_pairs_hook=_no_duplicate_keys, parse_constant=_not_json, parse_float=_finite
        )
    except (ValueError, RecursionError) as exc:
        raise CannotTell(f"malformed JSON: {exc}", text=_preview(body)) from exc


def _not_json(name: str) -> Any:
    """`NaN` and `Infinity`, which Python's parser takes and JSON has not: every bound of a schema
    compares false with `NaN`, so `{"price": NaN}` passed `minimum`/`maximum` (a QA pass, session 25)."""
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # `1e400`: a number no JSON reader holds, equal to `Infinity`
        raise ValueError(f"{text[:40]} is out of a double's range")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"the key {twice!r} is given twice")
    return out


def json_equal(a: Any, b: Any) -> bool:
    """JSON values equal as JSON means them: `true` is not `1` (Python's `==` says it is)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _items(value: Any) -> list[Any]:
    if isinstance(value, list | tuple | set):
        return list(value)
    text = _text(value).strip()
    try:
        parsed = json.loads(last_code_block(text, ("", "json")) or text)
        if isinstance(parsed, list):
            return parsed
    except (ValueError, RecursionError):
        pass
    # Split, then strip: `\s*(?:\n|,|;)\s*` took quadratic time on a long run of spaces, holding
    # the GIL (30,000 spaces froze a worker past its timeout and its lease).
    parts = (part.strip() for part in _SEPARATORS.split(text))
    return [part for part in parts if part.strip(_EDGE_PUNCTUATION)]


def _integer(value: Any) -> int | None:
    """An integer written as one ("42", "-1,000", 42), else None ("4.0" and 4.0 are not)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip().replace(",", "") if isinstance(value, str) else ""
    return int(text) if _INTEGER.fullmatch(text) else None


_INTEGER = re.compile(r"[-+]?\d+")
_ZERO_PADDED = re.compile(r"[-+]?0\d")
_MINUS_SIGNS = str.maketrans({"\u2212": "-"})  # NFKC leaves the minus sign itself; not dashes (3–5)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value).strip().replace(",", ""))
    except ValueError:
        return None


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict | list) else str(value)


def _diff(expected: str, answer: str) -> str:
    lines = difflib.unified_diff(
        expected.splitlines(), answer.splitlines(), "expected", "answer", lineterm="", n=1
    )
    return "\n".join(lines)[:2000]


def _preview(value: Any) -> str:
    text = _text(value)
    return text if len(text) <= _PREVIEW else text[: _PREVIEW - 1] + "…"
