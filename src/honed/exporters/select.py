"""Which trajectories an export takes: the store's filters, several task ids, held-out exclusion.

Every exporter pages through the store with the same selection, so a dataset export and a span
replay given the same filters see the same trajectories, oldest first, in bounded memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from honed.store import TrajectoryStore
from honed.trajectory import Trajectory

HELDOUT = "heldout"
DEFAULT_PAGE_SIZE = 500


@dataclass(frozen=True, slots=True)
class Selection:
    """Filters of an export; `None` means any. `task_ids` matches any of them.

    Held-out trajectories (`split == "heldout"`) are left out unless `include_heldout` is true or
    `split="heldout"` asks for them: they are what a trained model is gated on, so a dataset must
    never pick them up by accident.
    """

    verdict: str | None = None
    split: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    model_version: str | None = None
    task_ids: tuple[str, ...] | None = None
    agent: str | None = None
    status: str | None = None
    include_heldout: bool = False

    @property
    def store_filters(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "split": self.split,
            "since": self.since,
            "until": self.until,
            "model_version": self.model_version,
            "agent": self.agent,
            "status": self.status,
        }

    def keeps(self, trajectory: Trajectory) -> bool:
        return trajectory.split != HELDOUT or self.include_heldout or self.split == HELDOUT


def select_trajectories(
    store: TrajectoryStore,
    selection: Selection | None = None,
    *,
    limit: int | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    **filters: Any,
) -> Iterator[Trajectory]:
    """Trajectories matching `selection` (or the same fields as keywords), oldest first, with
    steps and verdicts, read `page_size` at a time.

        for t in select_trajectories(store, verdict="pass", task_ids=["t1", "t2"]): ...
    """
    selection = _as_selection(selection, filters)
    produced = 0
    for task_id in selection.task_ids or (None,):
        offset = 0
        while limit is None or produced < limit:
            size = page_size if limit is None else min(page_size, max(limit - produced, 1))
            page = store.trajectories(
                limit=size, offset=offset, task_id=task_id, oldest_first=True, **selection.store_filters
            )
            offset += len(page)
            for trajectory in page:
                if selection.keeps(trajectory):
                    yield trajectory
                    produced += 1
                    if limit is not None and produced >= limit:
                        return
            if len(page) < size:
                break


def count_selected(store: TrajectoryStore, selection: Selection | None = None, **filters: Any) -> int:
    """How many trajectories `select_trajectories` will yield (for progress bars)."""
    selection = _as_selection(selection, filters)
    store_filters = selection.store_filters
    total = 0
    for task_id in selection.task_ids or (None,):
        total += store.count(task_id=task_id, **store_filters)
        if selection.split is None and not selection.include_heldout:
            total -= store.count(task_id=task_id, **{**store_filters, "split": HELDOUT})
    return total


def _as_selection(selection: Selection | None, filters: dict[str, Any]) -> Selection:
    if selection is not None and filters:
        raise TypeError("give either a Selection or filter keywords, not both")
    if selection is not None:
        return selection
    task_ids = filters.pop("task_ids", None)
    return Selection(**filters, task_ids=_unique(task_ids) if task_ids is not None else None)


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(str(v) for v in values))
