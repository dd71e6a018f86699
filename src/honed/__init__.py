"""honed: LangGraph agents that get better at their job from their own verified experience.

import honed
honed.instrument(store="sqlite:///honed.db")      # capture every LangChain/LangGraph run
store = honed.open_store("sqlite:///honed.db")
store.trajectories(limit=10)
"""

from honed.plugin import CallbackHandler, Middleware, flush, instrument, stats, uninstrument, wrap
from honed.store import StoreUnavailable, TrajectoryNotFound, TrajectoryStore, open_store
from honed.tracing.recorder import Recorder
from honed.trajectory import ModelVersion, Step, Trajectory, Verdict

__version__ = "0.1.0"

__all__ = [
    "CallbackHandler",
    "Middleware",
    "ModelVersion",
    "Recorder",
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
