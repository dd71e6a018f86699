"""What an agent author touches: middleware, callback handler, one-line instrument()."""

from honed.plugin.callbacks import CallbackHandler
from honed.plugin.middleware import Middleware
from honed.plugin.registry import flush, instrument, stats, uninstrument, wrap

__all__ = ["CallbackHandler", "Middleware", "flush", "instrument", "stats", "uninstrument", "wrap"]
