"""honed: LangGraph agents that get better at their job from their own verified experience.

import honed
honed.instrument(store="sqlite:///honed.db")      # capture every LangChain/LangGraph run
store = honed.open_store("sqlite:///honed.db")
store.trajectories(limit=10)
"""

from typing import TYPE_CHECKING

from honed._lazy import lazy_attributes

if TYPE_CHECKING:
    from honed.capture import CallbackHandler, Middleware, flush, instrument, stats, uninstrument, wrap
    from honed.capture.recorder import Recorder
    from honed.serving.local import LocalChatModel
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


# Each name loads its module on first use: `honed.LocalChatModel` imports torch (capture never needs
# it), and the store's own process (`honed.capture.store_process`) needs neither LangChain nor FastAPI.
__getattr__ = lazy_attributes(
    __name__,
    {
        "CallbackHandler": "honed.capture.callbacks",
        "Middleware": "honed.capture.middleware",
        **dict.fromkeys(("flush", "instrument", "stats", "uninstrument", "wrap"), "honed.capture.instrument"),
        "Recorder": "honed.capture.recorder",
        "LocalChatModel": "honed.serving.local",
        "ServedModel": "honed.serving.served",
        **dict.fromkeys(
            ("StoreUnavailable", "TrajectoryNotFound", "TrajectoryStore", "open_store"), "honed.store"
        ),
        **dict.fromkeys(
            ("ModelVersionInvalid", "NoLiveVersion", "PromotionConflict"), "honed.store.registry"
        ),
        **dict.fromkeys(("ModelVersion", "Step", "Trajectory", "Verdict"), "honed.trajectory"),
    },
)


def __dir__() -> list[str]:  # the lazy names too, for completion and `help(honed)`
    return sorted({*globals(), *__all__})
