"""`honed …`: the loop from a terminal (typer + rich).

Every command takes `--store URL` (default `HONED_STORE`, else `sqlite:///honed.db`). Each module
of this package registers its commands on the one `app`; they are all imported here.
"""

from __future__ import annotations

import importlib
import pkgutil

from honed.cli.common import app

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("common", "__main__"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["app"]
