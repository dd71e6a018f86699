"""Patterns an application wrote, run on text an agent wrote: bounded in time.

A reference regex (`ReferenceMatch("regex")`) or a JSON Schema `pattern` is the application's; the
answer it is matched against is the agent's, and an answer can be chosen to make an ordinary pattern
backtrack for ever (`^(\\w+\\s?)+$` on 34 letters and a "!"). Python's `re` holds the GIL through a
match and has no deadline, so the worker's timeout, its lease renewal and its signal handlers all
stopped with it, and the next worker to claim the run froze the same way (a QA pass, session 24).
The `regex` package matches with a deadline, releasing the GIL meanwhile; a pattern past it is
"could not tell", never a pass.
"""

from __future__ import annotations

from functools import lru_cache

import regex

from honed.verifiers.protocol import CannotTell

PATTERN_TIMEOUT_S = 2.0


@lru_cache(maxsize=256)
def compiled(pattern: str, flags: int = 0) -> regex.Pattern[str]:
    """The pattern compiled as Python's `re` reads it (`regex`'s version 0); `regex.error` if invalid."""
    return regex.compile(pattern, flags | regex.VERSION0)


def search(pattern: str, text: str, flags: int = 0) -> bool:
    """Whether `pattern` is found in `text`, within `PATTERN_TIMEOUT_S`; `CannotTell` past it."""
    try:
        return compiled(pattern, flags).search(text, timeout=PATTERN_TIMEOUT_S, concurrent=True) is not None
    except TimeoutError as exc:
        shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
        raise CannotTell(
            f"the pattern {shown!r} took over {PATTERN_TIMEOUT_S:g} s on the answer (it backtracks "
            "without end on text like it): not judged"
        ) from exc
