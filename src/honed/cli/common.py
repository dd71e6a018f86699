"""What every `honed` command shares: the app, the `--store` option, a console, store opening."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.markup import escape as _markup_escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from sqlalchemy.exc import DatabaseError, OperationalError
from typer.core import TyperGroup

from honed.store import InvalidStoreURL, StoreUnavailable, TrajectoryStore, open_store
from honed.store.store import SUPPORTED_SCHEMES


class _Group(TyperGroup):
    """Every command's user mistakes (a path that does not exist, an unknown suite or verdict, a
    module that does not import, an invalid checkpoint) as one red line and status 1, not a
    traceback. `HONED_TRACEBACK=1` shows the traceback instead."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as exc:  # `honed runs --json | head -1`: the reader has all it wanted
            # Anything still buffered goes nowhere (else Python reports the pipe again at exit);
            # the status is click's own for a closed pipe (its `--help` output gets the same).
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(1) from exc
        except _USER_ERRORS as exc:
            if os.environ.get("HONED_TRACEBACK"):
                raise
            text = str(exc).splitlines()[0] if str(exc) else ""
            extra = _EXTRAS.get((getattr(exc, "name", None) or "").partition(".")[0])
            if (
                isinstance(exc, ModuleNotFoundError) and extra
            ):  # a capture-only install (a QA pass, session 22)
                text += f": this command needs pip install 'honed[{extra}]'"
            if not text or isinstance(exc, KeyError):  # a KeyError's text is only the key
                text = f"{type(exc).__name__}: {text}"  # else a sentence, no class name before it
            err_console().print(f"[red]{escape(text)}[/red]", soft_wrap=True)
            raise typer.Exit(1) from exc
        except DatabaseError as exc:
            if not os.environ.get("HONED_TRACEBACK") and _damaged(exc):
                # Pages overwritten (a disk fault, a copy taken mid-write): a traceback of the
                # query was all it said (a QA pass, session 25).
                err_console().print(
                    "[red]the store's file is damaged (database disk image is malformed): recover what "
                    "it still holds with `sqlite3 FILE .recover | sqlite3 NEW.db`, then use --store "
                    "sqlite:///NEW.db[/red]",
                    soft_wrap=True,
                )
                raise typer.Exit(2) from exc
            denied = _permission_denied(exc)
            if denied and not os.environ.get("HONED_TRACEBACK"):
                # A PostgreSQL role that may not read or write what this command does: the agent's
                # capture role, say (a QA pass, session 26: a 227-line traceback).
                err_console().print(
                    f"[red]this database role may not use {escape(denied)}: a capture role (`honed init "
                    "--capture-role`) only captures; run this command as the store's owner[/red]",
                    soft_wrap=True,
                )
                raise typer.Exit(1) from exc
            if (
                os.environ.get("HONED_TRACEBACK")
                or not isinstance(exc, OperationalError)
                or "readonly database" not in str(exc)
            ):
                raise
            # The store's file (or its folder) is not writable by this user: what they can fix.
            err_console().print(
                "[red]the store is read-only for this user: this command writes to it "
                "(reading commands such as runs, show and export work)[/red]",
                soft_wrap=True,
            )
            raise typer.Exit(1) from exc


def _permission_denied(exc: DatabaseError) -> str | None:
    """The table of PostgreSQL's "permission denied for table X" (or "must be owner of table X")."""
    match = re.search(
        r"(?:permission denied for|must be owner of) (?:table|relation|schema) (\S+)", str(exc.orig or exc)
    )
    return match.group(1) if match else None


def _damaged(exc: DatabaseError) -> bool:
    text = str(exc.orig if exc.orig is not None else exc).lower()
    return "malformed" in text or "file is not a database" in text


# Control characters other than tab and newline: a captured message holding ESC sequences
# (set the terminal's title, clear the screen) reached the operator's terminal raw.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape(text: str) -> str:
    """`text` safe to print through rich: its markup escaped, control characters shown as `\\xNN`."""
    return _markup_escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text))


# Raised by what a user typed; a bug raises something else (and keeps its traceback).
_USER_ERRORS = (OSError, ValueError, LookupError, ImportError)
# The extra that installs a module a command imports when it runs.
_EXTRAS = {
    **dict.fromkeys(("torch", "transformers", "trl", "datasets", "peft", "accelerate"), "train"),
    **dict.fromkeys(("opentelemetry",), "otlp"),
    **dict.fromkeys(("fastapi", "uvicorn", "httpx", "openai", "langchain_openai"), "serve"),
    **dict.fromkeys(("psycopg",), "postgres"),
}

app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    help="honed: agents that learn from verified experience.",
)

StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store", envvar="HONED_STORE", help="Store URL (sqlite:///PATH or postgresql://USER@HOST/DB)."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """ "1 trajectory", "2 trajectories", "1 spool", "0 examples"."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {plural or (noun[:-1] + 'ies' if noun.endswith('y') else noun + 's')}"


def console() -> Console:
    """A console made per command, so the terminal width (or COLUMNS) is read when it runs."""
    return _unwrapped_off_terminal(Console())


def err_console() -> Console:
    """Where errors go: stderr, so that `--json` or `export jsonl -` output stays data."""
    return _unwrapped_off_terminal(Console(stderr=True))


def _unwrapped_off_terminal(out: Console) -> Console:
    """Off a terminal (a log, a pipe, CI) rich wraps text at 80 columns, which split a message
    over lines a `grep` no longer finds (a QA pass, session 19): there, one message is one line."""
    if not out.is_terminal:
        out.soft_wrap = True
    return out


def _in_memory(url: str | None) -> bool:
    from sqlalchemy.engine import make_url

    from honed.capture.recorder import _in_memory as in_memory
    from honed.store import check_store_url, resolve_store_url

    try:
        resolved = check_store_url(resolve_store_url(url))  # a URL it refuses says why itself
        return not make_url(resolved).host and in_memory(resolved)
    except Exception:  # not a URL: opening it says why
        return False


def open_store_or_exit(url: str | None, *, create: bool = False) -> TrajectoryStore:
    """Open the store, or print why not in one line and exit with status 2. Only commands that
    write a store's first data (capture, `init`, `register`, `verify`, `train`) pass `create=True`:
    pointed at a mistyped path, a reading command must say so, not show an empty new store."""
    try:
        if _in_memory(url):
            # A store in memory is gone when the command ends: `honed init --store sqlite://` said
            # "ready" of nothing (a QA pass, session 25).
            raise InvalidStoreURL(
                f"{url} is a store in memory, gone when this command ends: use "
                f"{' or '.join(SUPPORTED_SCHEMES)}"
            )
        return open_store(url, create=create)
    except (StoreUnavailable, InvalidStoreURL) as exc:
        err_console().print(
            f"[red]{escape(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}[/red]",
            soft_wrap=True,
        )
        raise typer.Exit(2) from exc


def open_store_waiting(url: str | None, *, max_delay_s: float = 60.0) -> TrajectoryStore:
    """`open_store_or_exit(url, create=True)` for a command that runs for good (`honed verify
    --watch`): a store that is down (a worker started before PostgreSQL, after a reboot) is
    waited for, said once, then tried again every few seconds; a URL that cannot work still exits.
    A QA pass (session 27): it exited at once, where a worker already running waited."""
    delay, said = 2.0, False
    while True:
        try:
            if _in_memory(url):
                return open_store_or_exit(url, create=True)  # says why not, and exits
            return open_store(url, create=True)
        except InvalidStoreURL:
            return open_store_or_exit(url, create=True)
        except StoreUnavailable as exc:
            if not said:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                err_console().print(
                    f"[yellow]{escape(first)}: waiting for it (Ctrl-C to stop)[/yellow]", soft_wrap=True
                )
                said = True
            time.sleep(delay)
            delay = min(delay * 2, max_delay_s)


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """An ISO date/time (local time when no zone is given: what `honed runs` and `honed show`
    print) or an age back from now: `90s`, `30m`, `12h`, `7d`, `2w`, or combined (`1d12h`)."""
    value = text.strip()
    if value and not _DURATION.sub("", value).strip():
        delta = timedelta()
        for amount, unit in _DURATION.findall(value):
            delta += timedelta(**{_UNITS[unit]: float(amount)})
        return (now or datetime.now(UTC)) - delta
    try:
        when = datetime.fromisoformat(value)
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is neither an ISO date/time nor an age like 7d or 12h") from exc
    # A QA pass (session 26): read as UTC, a time copied from `honed runs` (local) missed its runs.
    return when if when.tzinfo is not None else when.astimezone()


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def progress_display(out: Console, *, transient: bool) -> Progress:
    """The bars long commands (`demo`, `train`, `verify`) show: spinner, description, done/total, time."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    return Progress(*columns, console=out, transient=transient)


# Off a terminal (a log, a pipe, CI) rich assumes 80 columns and squeezes the table's last column
# to a few characters a line; a log has no width to respect, so print the table this wide there.
OFF_TERMINAL_WIDTH = 160


def print_table(out: Console, table: Table) -> None:
    """Print a table; off a terminal, at least `OFF_TERMINAL_WIDTH` wide so no column is crushed."""
    if not out.is_terminal and out.width < OFF_TERMINAL_WIDTH:
        out = Console(file=out.file, width=OFF_TERMINAL_WIDTH, no_color=out.no_color)
    out.print(table)


def captured_runs_hint(store: Any, agent: str) -> str:
    """`; its 14 captured runs: honed runs --agent calc` where an agent of that name has runs: a
    name with no model versions said "no versions or runs" of an agent with 14 (a QA pass,
    session 25: "runs" meant training runs)."""
    from honed.store.select import count_selected

    try:
        n = count_selected(store, agent=agent, include_heldout=True)
    except Exception:  # a hint only
        return ""
    return f"; its {n} captured run{'s' * (n != 1)}: honed runs --agent {agent}" if n else ""
