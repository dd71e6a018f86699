"""What every `honed` command shares: the app, the `--store` option, a console, store opening."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from honed.store import StoreUnavailable, TrajectoryStore, open_store

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="honed: agents that learn from verified experience."
)

StoreOption = Annotated[
    str | None,
    typer.Option("--store", envvar="HONED_STORE", help="Store URL (sqlite:///… or postgresql+psycopg://…)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def console() -> Console:
    """A console made per command, so the terminal width (or COLUMNS) is read when it runs."""
    return Console()


def open_store_or_exit(url: str | None) -> TrajectoryStore:
    """Open the store, or print why not and exit with status 2."""
    try:
        return open_store(url)
    except StoreUnavailable as exc:
        console().print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from exc
