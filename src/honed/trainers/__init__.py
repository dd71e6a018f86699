"""Trainers: verified trajectories -> TRL datasets -> a candidate model -> the held-out gate -> promotion.

    from honed.trainers import Cycle, SFTMethod
    report = Cycle(store, model="support-agent", method=SFTMethod(), agent=make_agent,
                   verifiers=[ReferenceMatch()]).run()

Needs the `honed[train]` extra (torch, transformers, TRL); nothing in capture imports this package.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Cycle": "honed.trainers.cycle",
    "CycleReport": "honed.trainers.cycle",
    "tasks_from_store": "honed.trainers.cycle",
    "local_chat_model": "honed.trainers.cycle",
    "GateDecision": "honed.trainers.gate",
    "decide": "honed.trainers.gate",
    "build_dataset": "honed.trainers.data",
    "prepare": "honed.trainers.data",
    "TrainingData": "honed.trainers.data",
    "HeldOutLeak": "honed.trainers.data",
    "is_heldout": "honed.trainers.data",
    "task_pass_rates": "honed.trainers.data",
    "curriculum_weights": "honed.trainers.data",
    "SFTMethod": "honed.trainers.methods",
    "KTOMethod": "honed.trainers.methods",
    "DPOMethod": "honed.trainers.methods",
    "GRPOMethod": "honed.trainers.methods",
    "DistillMethod": "honed.trainers.methods",
    "NothingToLearn": "honed.trainers.methods",
    "TrainResult": "honed.trainers.methods",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy: `honed.trainers.gate` is cheap, the methods import torch and TRL.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'honed.trainers' has no attribute {name!r}")
