"""Trainers: verified trajectories -> TRL datasets -> a candidate model -> the held-out gate -> promotion.

    from honed.learn import Cycle, SFTMethod
    result = Cycle(store, model="support-agent", method=SFTMethod(), agent=make_agent,
                   verifiers=[ReferenceMatch()]).run()

Needs the `honed[train]` extra (torch, transformers, TRL); nothing in capture imports this package.
"""

from __future__ import annotations

from honed._lazy import lazy_attributes

_EXPORTS = {
    "Cycle": "honed.learn.cycle",
    "CycleResult": "honed.learn.cycle",
    "DataConfig": "honed.learn.cycle",
    "GateConfig": "honed.learn.cycle",
    "tasks_from_store": "honed.learn.cycle",
    "local_chat_model": "honed.learn.cycle",
    "GateDecision": "honed.learn.gate",
    "decide": "honed.learn.gate",
    "build_dataset": "honed.learn.datasets",
    "prepare": "honed.learn.datasets",
    "TrainingData": "honed.learn.datasets",
    "MissingLogprobs": "honed.learn.datasets",
    "HeldOut": "honed.store.select",
    "HeldOutLeak": "honed.store.select",
    "is_heldout": "honed.store.select",
    "Selection": "honed.store.select",
    "select_trajectories": "honed.store.select",
    "task_pass_rates": "honed.learn.datasets",
    "curriculum_weights": "honed.learn.datasets",
    "SFTMethod": "honed.learn.methods",
    "KTOMethod": "honed.learn.methods",
    "DPOMethod": "honed.learn.methods",
    "GRPOMethod": "honed.learn.methods",
    "OffPolicyMethod": "honed.learn.methods",
    "DistillMethod": "honed.learn.methods",
    "NothingToLearn": "honed.learn.methods",
    "TrainResult": "honed.learn.methods",
}

__all__ = sorted([*_EXPORTS, "quiet_progress_bars"])


def quiet_progress_bars() -> None:
    """Switch off the libraries' own progress bars (datasets' map, transformers' weight loading):
    a caller showing its own display (the CLI) wants one display, not three interleaved."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


# Lazy: `honed.learn.gate` is cheap, the methods import torch and TRL.
__getattr__ = lazy_attributes(__name__, _EXPORTS)
