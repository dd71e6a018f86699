"""`honed report`: the learning report, one self-contained HTML page rebuilt from the store."""

from __future__ import annotations

import webbrowser
from pathlib import Path
from typing import Annotated

import typer

from honed.cli.common import StoreOption, app, captured_runs_hint, console, escape, open_store_or_exit
from honed.report import build_report


@app.command()
def report(
    store: StoreOption = None,
    model: Annotated[
        str | None, typer.Option("--model", help="The served model's name (default: the one trained last).")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the page.")] = Path(
        "honed-report.html"
    ),
    examples: Annotated[int, typer.Option(help="How many example trajectories to show.", min=0)] = 4,
    open_page: Annotated[bool, typer.Option("--open/--no-open", help="Open it in a web browser.")] = False,
) -> None:
    """Write the learning report: curves per cycle, the gate's reasons, version history, examples."""
    with open_store_or_exit(store) as s:
        known = s.model_names()
        if model is not None and model not in known and not s.training_runs(model, limit=1):
            listed = ", ".join(known) or "none"
            raise LookupError(
                f"{model} has no model versions or training runs in this store (models: {listed})"
                f"{captured_runs_hint(s, model)}"
            )
        path = build_report(s, model=model, path=out, examples=examples)
    console().print(f"report written to [bold]{escape(str(path))}[/bold]")
    if open_page:
        webbrowser.open(path.resolve().as_uri())
