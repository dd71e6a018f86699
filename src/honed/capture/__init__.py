"""What an agent author touches: middleware, callback handler, one-line instrument()."""

from typing import TYPE_CHECKING

from honed._lazy import lazy_attributes
from honed.capture.instrument import flush, instrument, stats, uninstrument, wrap

if TYPE_CHECKING:
    from honed.capture.callbacks import CallbackHandler
    from honed.capture.middleware import Middleware

__all__ = ["CallbackHandler", "Middleware", "flush", "instrument", "stats", "uninstrument", "wrap"]

# LangChain loads on first use: the store's process (`honed.capture.store_process`) needs none of it.
__getattr__ = lazy_attributes(
    __name__, {"CallbackHandler": "honed.capture.callbacks", "Middleware": "honed.capture.middleware"}
)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
