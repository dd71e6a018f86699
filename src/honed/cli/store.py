"""`honed init`, `honed spool`, `honed prune`: making a store, what waits to reach one, and deleting from one."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from honed.cli.common import (
    JsonOption,
    StoreOption,
    app,
    console,
    counted,
    err_console,
    escape,
    open_store_or_exit,
    parse_when,
    print_table,
)
from honed.store import resolve_store_url
from honed.store.store import InvalidStoreURL, check_store_url, safe_url


@app.command()
def init(
    store: StoreOption = None,
    capture_role: Annotated[
        str | None,
        typer.Option(
            "--capture-role",
            help="A PostgreSQL role for the agent's process: it may capture, and nothing more "
            "(no verdict, policy, audit or registry write; no delete; a finished run out of reach).",
        ),
    ] = None,
) -> None:
    """Create a honed store at --store (reading commands never create one), or migrate an older one."""
    if capture_role is not None:
        _refuse_role_first(store, capture_role)
    with open_store_or_exit(store, create=True) as s:
        console().print(f"honed store ready at {escape(s.safe_url)} ({s.count()} trajectories)")
        if capture_role is not None:
            try:
                s.grant_capture(capture_role)
            except ValueError as exc:
                err_console().print(f"[red]{escape(str(exc))}[/red]")
                raise typer.Exit(1) from exc
            console().print(
                f"{escape(capture_role)} may capture into it and do nothing more: connect the agent's "
                "process as this role"
            )


PREVIOUS_KEY_ENV = "HONED_PREVIOUS_VERDICT_KEY"


@app.command()
def rekey(store: StoreOption = None) -> None:
    """Sign the store's labels again with HONED_VERDICT_KEY, from the key being retired in
    HONED_PREVIOUS_VERDICT_KEY (leaked, or due): nothing is judged again."""
    from honed.store.signing import KEY_ENV, Signer

    previous = os.environ.get(PREVIOUS_KEY_ENV)
    if not os.environ.get(KEY_ENV) or not previous:
        err_console().print(
            f"[red]set {KEY_ENV} to the new key and {PREVIOUS_KEY_ENV} to the one it replaces[/red]"
        )
        raise typer.Exit(2)
    retired = Signer(previous)
    with open_store_or_exit(store) as s:
        if s.signer is not None and s.signer.fingerprint == retired.fingerprint:
            err_console().print(f"[red]{KEY_ENV} and {PREVIOUS_KEY_ENV} are the same key[/red]")
            raise typer.Exit(2)
        counts = s.rekey(retired)
    console().print(
        f"signed again with the new key: {counted(counts['verdicts'], 'verdict')}, "
        f"{counted(counts['policies'], 'policy', 'policies')}, {counted(counts['audits'], 'audit')}; "
        f"{counted(counts['queued'], 'queued run')} moved to its queue. Set {KEY_ENV} to the new key "
        "wherever labels are written or read, and retire the old one."
    )
    # Whoever held a leaked key could sign labels with it: those are signed again too (an attacker
    # pass, session 27). A signature cannot tell them from the rest; a look can.
    err_console().print(
        "[yellow]if the old key leaked, labels forged with it were signed again too: look at the labels "
        "written since it could have leaked (`honed runs --since WHEN`), and label again what is wrong[/yellow]"
    )


def _refuse_role_first(store: str | None, role: str) -> None:
    """Exit 1 before anything is created when `role` cannot be a capture role there (SQLite, a
    missing role, a superuser). A URL that cannot be opened is left to `open_store_or_exit`."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    from honed.store.roles import check_capture_role

    try:
        engine = create_engine(check_store_url(resolve_store_url(store)))
    except (InvalidStoreURL, SQLAlchemyError, ImportError):
        return
    try:
        check_capture_role(engine, role)
    except ValueError as exc:
        err_console().print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from exc
    except SQLAlchemyError:
        return
    finally:
        engine.dispose()


@app.command()
def spool(
    store: StoreOption = None,
    replay: Annotated[
        bool, typer.Option("--replay", help="Write what waits for --store into it now, then empty its spool.")
    ] = False,
    source: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="With --replay: this spool file (as listed) instead of --store's own, e.g. runs captured "
            "under a mistyped store URL.",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """What captured runs wait in the local spool (`$HONED_SPOOL_DIR`) for a store that was down."""
    from honed.capture.spool import Spool, default_spool_path, spools

    url = resolve_store_url(store)
    if source is not None and not replay:  # it listed every spool and said nothing of --from (a QA pass)
        raise typer.BadParameter("--from names the spool to replay: give --replay too", param_hint="--from")
    if source is not None and not source.is_file():
        raise FileNotFoundError(f"no spool file at {source} (`honed spool` lists them)")
    mine = Spool(source if source is not None else default_spool_path(url))
    if replay:
        before = mine.pending()
        summary = {"store": safe_url(url), "spool": str(mine.path), "waiting": before, "replayed": 0}
        if before:  # nothing waiting: no store to open, none to create (a mistyped --store made one)
            with open_store_or_exit(url, create=True) as s:
                try:
                    summary["replayed"] = mine.replay(s.save_records)
                except Exception as exc:  # the store failed mid-way (a full disk, a dropped link)
                    err_console().print(
                        f"[red]the store failed during the replay ({escape(type(exc).__name__)}: "
                        f"{escape(str(exc).splitlines()[0][:300] if str(exc) else '')}); the spool is kept "
                        "as it was: run this again once the store is back[/red]"
                    )
                    raise typer.Exit(1) from None
        replayed = summary["replayed"]
        if as_json:
            typer.echo(json.dumps(summary))
        else:
            already = before - replayed
            console().print(
                f"replayed {counted(replayed, 'trajectory')} from {escape(str(mine.path))} into {escape(summary['store'])}"
                + (f" ({already} already stored there)" if already > 0 else "")
                if before
                else f"nothing waits in the spool for {escape(summary['store'])}"
            )
            if not before and source is None:
                _same_database_elsewhere(url)
        return
    rows = [s.summary() for s in spools()]
    for row in rows:
        row["this_store"] = row["path"] == str(mine.path)
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row))
        return
    waiting = sum(r["pending"] for r in rows)
    table = Table(
        title=f"{counted(waiting, 'trajectory')} waiting in {counted(len(rows), 'spool')}", pad_edge=False
    )
    for column in ("store", "waiting", "oldest", "newest", "spool file"):
        table.add_column(column, overflow="fold", justify="right" if column == "waiting" else "left")
    for row in rows:
        label = escape(row["store"] or "(store not recorded)") + (
            " [bold](--store)[/bold]" if row["this_store"] else ""
        )
        table.add_row(
            label, str(row["pending"]), _when(row["oldest"]), _when(row["newest"]), escape(row["path"])
        )
    print_table(console(), table)
    if waiting:
        console().print(
            "replay one with `honed spool --replay --store URL` (capture also replays it by itself)"
        )


def _same_database_elsewhere(url: str) -> None:
    """Spools waiting for this database under another user (the agent's capture role, when the
    owner replays): each URL has its own spool, and "replayed 0" said nothing of them (a QA pass,
    session 27)."""
    from sqlalchemy.engine import make_url

    from honed.capture.spool import spools

    def database(text: str | None) -> tuple[Any, ...] | None:
        try:
            parsed = make_url(text or "")
        except Exception:
            return None
        return (parsed.get_backend_name(), parsed.host, parsed.port, parsed.database)

    here = database(url)
    for row in (spool.summary() for spool in spools()):
        if row["pending"] and row["store"] != safe_url(url) and database(row["store"]) == here:
            console().print(
                f"[yellow]{counted(row['pending'], 'trajectory')} wait for this database as "
                f"{escape(str(row['store']))} in {escape(row['path'])}: `honed spool --replay --from "
                f"{escape(row['path'])} --store URL` writes them[/yellow]"
            )


def _when(epoch: float | None) -> str:
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S") if epoch else "-"


@app.command()
def prune(
    store: StoreOption = None,
    before: Annotated[
        str | None,
        typer.Option(help="Runs stored before this: an ISO date/time or an age such as 90d (retention)."),
    ] = None,
    agent: Annotated[str | None, typer.Option(help="Only this agent's runs.")] = None,
    task_id: Annotated[str | None, typer.Option("--task-id", help="Only this task's runs.")] = None,
    thread: Annotated[str | None, typer.Option("--thread", help="Every turn of this conversation.")] = None,
    run: Annotated[
        list[str] | None,
        typer.Option("--run", help="This run (an id, or its end as `honed runs` shows it; repeatable)."),
    ] = None,
    include_heldout: Annotated[
        bool,
        typer.Option(
            "--include-heldout", help="Held-out runs too (they define the gate's tasks: kept unless asked)."
        ),
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would go; delete nothing.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before deleting.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Delete captured runs with their steps and verdicts: retention (`--before 90d`) or erasure
    (`--run ID`, `--thread ID`). The filters combine; training lineage keeps the ids it learned from."""
    if before is None and agent is None and task_id is None and thread is None and not run:
        raise typer.BadParameter("say what to delete: --before, --agent, --task-id, --thread or --run")
    with open_store_or_exit(store) as s:
        ids = None if not run else [_run_id(s, given) for given in run]
        found = s.prune(
            ids=ids, agent=agent, task_id=task_id, thread_id=thread,
            until=parse_when(before) if before else None, include_heldout=include_heldout, dry_run=True,
        )  # fmt: skip
        if not found.deleted and not found.kept_heldout:
            # A mistyped thread or task id erased nothing and said "0": read as done (a QA pass, session 28).
            named = {"thread_id": thread, "agent": agent, "task_id": task_id}
            missing = [
                f"{k.replace('_', ' ')} {v!r}" for k, v in named.items() if v and not s.count(**{k: v})
            ]
            if missing:
                err_console().print(f"[red]no stored runs have {' or '.join(missing)}: nothing deleted[/red]")
                raise typer.Exit(1)
        if not as_json:  # what it means, before the question
            _say_what_goes(found, dry_run or not found.deleted)
        go = bool(found.deleted) and not dry_run and _confirmed(found, yes)
        done = (
            s.prune(ids=found.deleted, include_heldout=include_heldout) if go else found
        )  # the ids asked about, so a run captured meanwhile is not deleted unseen
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "deleted": len(done.deleted) if go else 0,
                    "matched": len(found.deleted),
                    "kept_heldout": found.kept_heldout,
                    "learned_from": found.learned_from,
                    "dry_run": not go,
                    "erased": done.erased if go else None,
                }
            )
        )
        return
    if go:
        console().print(
            f"deleted {counted(len(done.deleted), 'trajectory')} (with their steps, verdicts and queue rows)"
        )
    if go and not done.erased:
        err_console().print(
            "[yellow]another process is reading the store: the deleted rows stay in its file until the "
            "next checkpoint once it is done (run this again then, or `sqlite3 FILE 'PRAGMA "
            "wal_checkpoint(TRUNCATE)'`)[/yellow]",
            soft_wrap=True,
        )


def _say_what_goes(found: Any, only_would: bool) -> None:
    out = console()
    if only_would:
        out.print(
            f"would delete {counted(len(found.deleted), 'trajectory')} (with their steps, verdicts and queue rows)"
        )
    if found.learned_from:
        out.print(
            f"{counted(found.learned_from, 'of them', 'of them')} trained a version: its lineage keeps "
            "their ids, not their content (`honed show ID` names the versions, `honed versions NAME "
            "--learned-from` lists each one's runs)"
        )
    if found.kept_heldout:
        out.print(
            f"[yellow]kept {counted(found.kept_heldout, 'held-out run')}: they define the gate's tasks "
            "(--include-heldout deletes them too)[/yellow]"
        )


def _run_id(store: Any, given: str) -> str:
    from honed.store import TrajectoryNotFound
    from honed.store.store import AmbiguousTrajectoryId

    try:
        return store.get(given).id
    except TrajectoryNotFound as exc:
        said = str(exc) if isinstance(exc, AmbiguousTrajectoryId) else f"no trajectory {exc}"
        err_console().print(f"[red]{escape(said)}[/red]")
        raise typer.Exit(1) from exc


def _confirmed(found: Any, yes: bool) -> bool:
    """`--yes`, or a person's yes at a terminal; off a terminal without `--yes`, refused."""
    if yes:
        return True
    if not console().is_terminal:
        raise typer.BadParameter(
            f"this deletes {counted(len(found.deleted), 'trajectory')}: give --yes (or --dry-run to see them)"
        )
    return typer.confirm(f"delete {counted(len(found.deleted), 'trajectory')}?", default=False)
