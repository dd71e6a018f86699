"""Which verifiers meet which trajectory.

Rules, in order:
1. `metadata["verifier"]` (a name or a list of names) picks exactly those verifiers: a named
   verifier runs even when its requirements are missing, and then says why it could not tell.
2. A verifier with `tags` only meets trajectories whose `metadata["tags"]` share one of them.
3. Otherwise a verifier meets every trajectory whose requirements it finds (`applies_to`):
   `ReferenceMatch` needs `metadata["expected"]`, `TestSuite` needs `metadata["tests"]`,
   `JsonSchema` a schema (given, or `metadata["schema"]`); `GoalCheck` and `Judge` meet all unless
   given `when=`.
A worker without the named verifier leaves the trajectory to a worker that has it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from honed.trajectory import Trajectory
from honed.verifiers.protocol import verifier_name

log = logging.getLogger("honed.verifiers")


def requested_names(trajectory: Trajectory) -> set[str] | None:
    """The verifier names a trajectory asks for in `metadata["verifier"]`, or None."""
    named = (trajectory.metadata or {}).get("verifier")
    if named is None or named == [] or named == "":
        return None
    if isinstance(named, str):
        return {n.strip() for n in named.split(",") if n.strip()}
    if isinstance(named, Iterable):
        return {str(n) for n in named}
    return {str(named)}


def applicable(verifiers: Sequence[Any], trajectory: Trajectory) -> list[Any]:
    """The verifiers that meet this trajectory, in the given order (see the module docstring)."""
    named = requested_names(trajectory)
    if named is not None:
        return [v for v in verifiers if verifier_name(v) in named]
    raw_tags = (trajectory.metadata or {}).get("tags") or ()
    tags = (
        {raw_tags}
        if isinstance(raw_tags, str)
        else {str(t) for t in raw_tags}
        if isinstance(raw_tags, Iterable)
        else set()
    )
    chosen = []
    for verifier in verifiers:
        wanted = frozenset(getattr(verifier, "tags", None) or ())
        if wanted and not wanted & tags:
            continue
        if _requirements_met(verifier, trajectory):
            chosen.append(verifier)
    return chosen


def _requirements_met(verifier: Any, trajectory: Trajectory) -> bool:
    applies = getattr(verifier, "applies_to", None)
    if applies is None:
        return True
    try:
        return bool(applies(trajectory))
    except Exception:
        # Run it anyway: its own error, recorded with a traceback, says more than a silent skip.
        log.warning(
            "honed: %s.applies_to raised on %s", verifier_name(verifier), trajectory.id, exc_info=True
        )
        return True
