"""A cycle under a distributed launcher: what happens once, and what every rank does.

`torchrun`, `accelerate launch` and DeepSpeed's launcher start the same script in every process.
A `Cycle` keeps everything that touches the store (the trainer lock, selection, the training run's
record, registering the candidate, the gate, promotion) on the main process; the other ranks only
train. The main process prepares the dataset and hands it to them (`Ranks.share`, pickled through
the process group), so every rank trains on exactly the rows the main process selected, even
while new captures arrive. Every rank loads the live version's folder and the main process writes
the candidate's: across machines, keep the models' folders on a filesystem they share.

    torchrun --nproc_per_node 8 my_cycle.py               # my_cycle.py builds a Cycle and runs it
    accelerate launch --config_file fsdp.yaml my_cycle.py
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

# What launchers set to the number of processes (accelerate reads the same names).
_WORLD_SIZE_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
DDP_TIMEOUT_S = 1800  # transformers' `ddp_timeout` default: how long the other ranks wait for selection


def launched_processes() -> int:
    """How many processes the launcher started (1 without one)."""
    for name in _WORLD_SIZE_ENV:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch: `rank` of `size`; rank 0 is the main process."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, settings: Mapping[str, Any] | None = None) -> Ranks:
        """Join the launch's process group (one process: nothing to join, nothing imported).

        `settings` are the training config's fields that decide the group, as the trainer would
        use them (`use_cpu`, `ddp_backend`, `ddp_timeout`): the group started here is the one TRL's
        trainer then trains in."""
        if launched_processes() <= 1:
            return cls()
        from accelerate import PartialState

        settings = settings or {}
        options: dict[str, Any] = {"timeout": timedelta(seconds=settings.get("ddp_timeout") or DDP_TIMEOUT_S)}
        if settings.get("ddp_backend"):
            options["backend"] = settings["ddp_backend"]
        state = PartialState(cpu=bool(settings.get("use_cpu")), **options)
        return cls(rank=state.process_index, size=state.num_processes)

    def share(self, value: Any = None) -> Any:
        """The main process's `value`, on every rank (what the others pass is ignored)."""
        if self.size <= 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value if self.is_main else None], from_process=0)[0]
