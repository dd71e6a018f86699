"""honed: LangGraph agents that get better at their job from their own verified experience.

import honed
honed.instrument(store="sqlite:///honed.db")      # capture every LangChain/LangGraph run
store = honed.open_store("sqlite:///honed.db")
store.trajectories(limit=10)
"""

from honed._lazy import lazy_attributes
from honed.capture import CallbackHandler, Middleware, flush, instrument, stats, uninstrument, wrap
from honed.capture.recorder import Recorder
from honed.serving.served import ServedModel
from honed.store import StoreUnavailable, TrajectoryNotFound, TrajectoryStore, open_store
from honed.store.registry import ModelVersionInvalid, NoLiveVersion, PromotionConflict
from honed.trajectory import ModelVersion, Step, Trajectory, Verdict

__version__ = "0.1.0"

__all__ = [
    "CallbackHandler",
    "LocalChatModel",
    "Middleware",
    "ModelVersion",
    "ModelVersionInvalid",
    "NoLiveVersion",
    "PromotionConflict",
    "Recorder",
    "ServedModel",
    "Step",
    "StoreUnavailable",
    "Trajectory",
    "TrajectoryNotFound",
    "TrajectoryStore",
    "Verdict",
    "__version__",
    "flush",
    "instrument",
    "open_store",
    "stats",
    "uninstrument",
    "wrap",
]


# `honed.LocalChatModel` imports torch, so only on first use (capture never needs torch).
__getattr__ = lazy_attributes(__name__, {"LocalChatModel": "honed.serving.local"})
