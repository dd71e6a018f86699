"""What an agent author touches: middleware, callback handler, one-line instrument()."""

from honed.capture.callbacks import CallbackHandler
from honed.capture.instrument import flush, instrument, stats, uninstrument, wrap
from honed.capture.middleware import Middleware

__all__ = ["CallbackHandler", "Middleware", "flush", "instrument", "stats", "uninstrument", "wrap"]
