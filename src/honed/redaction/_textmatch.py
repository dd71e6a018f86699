"""Text-matching helpers shared by honed's own redaction rules and the detect-secrets adapter.

Every pattern built from these must stay linear in the length of the text it scans (see `redact`).
"""

from __future__ import annotations

import re

NOT_REDACTED = r"(?!\[REDACTED:)"
MARKER_SPLIT = re.compile(r"(\[REDACTED:[a-z0-9_]+\])")


def marker(kind: str) -> str:
    return f"[REDACTED:{kind}]"


def lower(text: str) -> str:
    """`text` lowered with every offset kept, so positions found in it hold in `text`."""
    lowered = text.lower()
    if len(lowered) != len(text):  # a few characters lower to two ("İ")
        lowered = text.encode("ascii", "replace").decode("ascii").lower()
    return lowered


def after(*prefixes: str) -> str:
    """A lookbehind alternation: `key` counts only as `api_key`, `private_key`, ... not as `key`."""
    return "(?:" + "|".join(f"(?<={p}{sep})" for p in prefixes for sep in ("", "_", "-")) + ")"


def anchored_matches(
    pattern: re.Pattern[str], anchors: tuple[str, ...], text: str, lowered: str
) -> list[re.Match[str]]:
    """Non-overlapping matches of `pattern` that start where one of `anchors` starts in `lowered`.

    Each start costs what `pattern.match` scans from it: patterns used here must scan a bounded
    distance, or up to a character that cannot occur inside another anchor's match.
    """
    starts: set[int] = set()
    for word in anchors:
        at = lowered.find(word)
        while at >= 0:
            starts.add(at)
            at = lowered.find(word, at + 1)
    matches: list[re.Match[str]] = []
    last = 0
    for start in sorted(starts):
        if start < last:
            continue
        m = pattern.match(text, start)  # lookbehinds still see the text before `start`
        if m is not None and m.end() > start:
            matches.append(m)
            last = m.end()
    return matches
