"""`honed verify`, `honed label`, `honed verifiers list|audit|policy`: labelling outcomes from a terminal."""

from __future__ import annotations

import getpass
import json
import logging
import time
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
    open_store_waiting,
    print_table,
    progress_display,
)
from honed.store import TrajectoryNotFound, TrajectoryStore
from honed.store.store import AmbiguousTrajectoryId
from honed.trajectory import Verdict, current_verdicts, label_word
from honed.trajectory import label as label_of

DEFAULT_VERIFIERS = "reference,schema,tests"  # honed.verifiers.catalog.DEFAULT, without importing it here

verifiers_app = typer.Typer(no_args_is_help=True, help="Inspect verifiers, audit them against gold labels.")
app.add_typer(verifiers_app, name="verifiers")

VerifierOption = Annotated[
    str,
    typer.Option(
        "--verifier",
        "-v",
        help="Comma list of built-ins (reference, schema, tests) and/or module:attr of your own.",
    ),
]


PROGRESS_LINE_S = 60.0  # how often a worker off a terminal says how far it got


@app.command()
def verify(
    store: StoreOption = None,
    verifier: VerifierOption = DEFAULT_VERIFIERS,
    watch: Annotated[
        bool, typer.Option("--watch/--once", help="Keep labelling new runs, or label what is there and exit.")
    ] = False,
    concurrency: Annotated[int, typer.Option(min=1, help="Trajectories verified at once.")] = 2,
    batch: Annotated[int | None, typer.Option(min=1, help="Trajectories claimed per round trip.")] = None,
    timeout: Annotated[float, typer.Option(min=0.001, help="Deadline of one verifier call, seconds.")] = 60.0,
    lease: Annotated[
        float,
        typer.Option(min=1.0, help="Claim lease, seconds; a dead worker's work returns after it."),
    ] = 60.0,
    max_attempts: Annotated[int, typer.Option(min=1, help="Tries before a verifier error is final.")] = 3,
    poll: Annotated[float, typer.Option(min=0.01, help="Seconds between polls with --watch.")] = 2.0,
) -> None:
    """Label unlabeled trajectories with verifiers (safe to run on many machines at once)."""
    from honed.verifiers import UnknownVerifier, Worker
    from honed.verifiers.catalog import resolve

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        chosen = resolve(verifier)
    except UnknownVerifier as exc:
        console().print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from exc
    out = console()
    # A worker that keeps watching may start before the first capture creates the store; one that
    # labels what is there and exits, pointed at a store that does not exist, was mistyped.
    with open_store_waiting(store) if watch else open_store_or_exit(store) as s:
        _refuse_labels_that_would_not_count(s)
        worker = Worker(
            s,
            chosen,
            concurrency=concurrency,
            batch_size=batch,
            timeout_s=timeout,
            lease_s=lease,
            max_attempts=max_attempts,
            poll_s=poll,
        )
        backlog = s.verification_backlog(worker.queue)
        todo = backlog["unqueued"] + backlog["due"] + backlog["claimed"]
        with progress_display(out, transient=False) as progress:
            task = progress.add_task(f"verifying with {escape(worker.queue)}", total=None if watch else todo)

            said_at = [time.monotonic()]

            def show(stats) -> None:
                progress.update(
                    task,
                    completed=stats.settled,
                    description=(
                        f"[green]{stats.passed} pass[/green] [red]{stats.failed} fail[/red] "
                        f"[yellow]{stats.undecided} unsure[/yellow] {stats.errors} error(s)"
                    ),
                )
                # Off a terminal (a service's log) the bar draws nothing: a line a minute says
                # the worker works (a QA pass, session 27: 8 minutes of an empty log, 634 runs).
                if not out.is_terminal and time.monotonic() - said_at[0] >= PROGRESS_LINE_S:
                    said_at[0] = time.monotonic()
                    out.print(
                        f"{stats.settled} checked so far: {stats.passed} pass, {stats.failed} fail, "
                        f"{stats.undecided} could not tell, {stats.errors} errors"
                    )

            worker.on_progress = show
            try:
                settled = worker.run_forever() if watch else worker.run_once(install_signal_handlers=True)
                interrupted = worker.stopped  # before `close`, which stops it too
            finally:
                worker.close()
        stats = worker.stats
    out.print(
        f"[bold]{settled}[/bold] {'trajectory' if settled == 1 else 'trajectories'} checked: "
        f"{counted(stats.verdicts, 'new verdict')} "
        f"({stats.passed} pass, {stats.failed} fail, {stats.undecided} could not tell, {stats.errors} errors, "
        f"{stats.retries} to retry)"
    )
    if not watch and interrupted:
        # `verify --once && train` must not carry on as if everything had been labelled.
        out.print("[yellow]stopped before the end (interrupted): the rest is left unlabelled[/yellow]")
        raise typer.Exit(130)
    if not watch and stats.errors and stats.passed + stats.failed - stats.failed_runs == 0:
        # No verdict but errors: the verifier is broken, not the runs (a QA pass, session 21: rc 0,
        # and the runs' errors took them out of training without a word; session 23: so with one
        # crashed run among them, which fails without a check being run).
        crashed = f", {stats.failed_runs} runs that raised failed" if stats.failed_runs else ""
        err_console().print(
            f"[red]no run was judged ({stats.errors} errors, {stats.undecided} could not tell{crashed}): "
            "the verifier is broken; `honed show ID` has its error[/red]"
        )
        raise typer.Exit(1)


@app.command()
def label(
    trajectory_id: Annotated[
        str, typer.Argument(help="A trajectory id, or a unique prefix or suffix of one.")
    ],
    outcome: Annotated[str, typer.Argument(help="pass | fail")],
    store: StoreOption = None,
    note: Annotated[str, typer.Option("--note", "-m", help="Why: kept as the verdict's reason.")] = "",
    by: Annotated[str | None, typer.Option("--by", help="Who labels (default: your login).")] = None,
    verifier: Annotated[str, typer.Option("--as", help="Label source name: gold for audits.")] = "human",
) -> None:
    """Record a human (gold) label for one trajectory; it replaces that person's earlier label
    (each labeller's is kept: where two disagree, the trajectory's label is a fail)."""
    if outcome not in ("pass", "fail"):
        err_console().print(f"[red]outcome must be pass or fail, not {escape(outcome)!r}[/red]")
        raise typer.Exit(2)
    labeler = by or _login()
    with open_store_or_exit(store) as s:
        _refuse_labels_that_would_not_count(s)
        try:
            t = s.get(trajectory_id)
            if not t.finished:  # it was accepted, and the report showed the paused run as a pass
                err_console().print(
                    f"[red]{escape(t.id)} is paused at an interrupt, waiting for a resume: label it "
                    "once it has finished[/red]"
                )
                raise typer.Exit(1)
            v = s.add_verdict(
                t.id,
                Verdict(
                    passed=outcome == "pass",
                    score=1.0 if outcome == "pass" else 0.0,
                    reason=note,
                    evidence={"labeler": labeler},
                    verifier=verifier,
                    version=labeler,  # one verdict per (trajectory, source, version): per person
                ),
            )
            now = label_of(s.get(t.id).verdicts, untrusted=s.untrusted_verifiers())
            failing = [w for w in current_verdicts(s.get(t.id).verdicts) if w.passed is False]
            failed_by = sorted({w.verifier for w in failing})
            by_people = all((w.evidence or {}).get("labeler") for w in failing)
        except TrajectoryNotFound as exc:
            said = str(exc) if isinstance(exc, AmbiguousTrajectoryId) else f"no trajectory {exc}"
            err_console().print(f"[red]{escape(said)}[/red]")
            raise typer.Exit(1) from exc
    mark = "[green]pass[/green]" if v.passed else "[red]fail[/red]"
    console().print(f"{t.id}: {mark} by {escape(labeler)} ({escape(verifier)}) {escape(note)}")
    if v.passed and now is not True:  # a QA pass (session 20): it read as if the pass had won
        why = (
            f"{', '.join(map(escape, failed_by))} failed it, and any fail fails a run"
            if failed_by
            else "a verifier's verdict on it is an error or could not tell"
        )
        # A person's fail is not a verifier's to fix (a QA pass, session 27: "fix the verifier"
        # of a fail another labeller gave).
        fix = (
            "a person's label stands until that person labels it again"
            if failed_by and by_people
            else "fix the verifier and verify again: its new version judges anew"
        )
        err_console().print(
            f"[yellow]the run is still labelled {label_word(now)} for training and export: {why} "
            f"({fix})[/yellow]"
        )


@verifiers_app.command("list")
def list_verifiers(store: StoreOption = None, as_json: JsonOption = False) -> None:
    """Verdict counts per verifier and version, with each verifier's trust and training policy."""
    with open_store_or_exit(store) as s:
        counts = s.verifier_counts()
        policies = {p.verifier: p for p in s.verifier_policies()}
        # What `honed status` and training go by (a policy that does not check out under a key
        # too): the list said "trains yes" of a verifier status called untrusted (a QA pass,
        # session 27).
        untrusted = s.untrusted_verifiers()
    if as_json:
        for row in counts:
            row["latest"] = row["latest"].isoformat() if row["latest"] else None
            row["usable_for_training"] = row["verifier"] not in untrusted
            typer.echo(json.dumps(row))
        return
    table = Table(title="verifiers")
    for column in (
        "verifier",
        "version",
        "verdicts",
        "pass",
        "fail",
        "unsure",
        "trust",
        "min precision",
        "audited precision",
        "trains",
    ):
        table.add_column(
            column, justify="right" if column not in ("verifier", "version", "trust") else "left"
        )
    for row in counts:
        p = policies.get(row["verifier"])
        table.add_row(
            escape(row["verifier"]),
            escape(row["version"]),
            str(row["total"]),
            str(row["pass"]),
            str(row["fail"]),
            str(row["undecided"]),
            p.trust if p else "high",
            _num(p.min_precision if p else None),
            _num(p.precision if p else None),
            "yes" if row["verifier"] not in untrusted else f"[red]no[/red] ({escape(_why_not(p))})",
        )
    print_table(console(), table)


def _why_not(p: Any) -> str:
    """Why a verifier's passes do not train, in a few words."""
    if p is None or p.usable:
        return "its policy does not check out with this store's key"
    if p.min_precision is None:
        return "trust low, no minimum precision"
    if p.precision is None:
        return f"not audited; min precision {p.min_precision:.2f}"
    return f"audited {p.precision:.2f} < min {p.min_precision:.2f}"


@verifiers_app.command("audit")
def audit(
    name: Annotated[str, typer.Argument(help="The verifier to audit.")],
    store: StoreOption = None,
    gold: Annotated[str, typer.Option(help="The label source taken as truth.")] = "human",
    version: Annotated[str | None, typer.Option(help="Verifier version (default: its newest).")] = None,
    min_precision: Annotated[
        float | None,
        typer.Option(
            "--min-precision", help="Also set the precision its passes need to train.", min=0.0, max=1.0
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Precision, recall and false-positive rate (Wilson 95% intervals) against gold labels; stored."""
    with open_store_or_exit(store) as s:
        judged = sorted({row["verifier"] for row in s.verifier_counts()})
        if name not in judged:  # a typo would store an empty audit of a verifier that never ran
            raise LookupError(
                f"no verdicts from a verifier named {name!r} (verifiers: {', '.join(judged) or 'none'})"
            )
        result = s.audit_verifier(name, gold=gold, version=version)
        if min_precision is not None:
            s.set_min_precision(name, min_precision)
        policy = s.verifier_policy(name)
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "usable_for_training": policy.usable}))
        return
    out = console()
    title = f"{name}@{result.version or '?'} vs {gold}: {result.n} labelled trajectories, {result.undecided} undecided"
    table = Table(title=escape(title))
    for column in ("measure", "value", "95% interval", "counts"):
        table.add_column(column)
    for label_, rate in (
        ("precision", result.precision),
        ("recall", result.recall),
        ("false-positive rate", result.false_positive_rate),
    ):
        if rate is None:
            table.add_row(label_, "-", "-", "no data")
        else:
            table.add_row(
                label_, f"{rate.value:.3f}", f"[{rate.low:.3f}, {rate.high:.3f}]", f"{rate.k}/{rate.n}"
            )
    print_table(out, table)
    out.print(f"tp={result.tp} fp={result.fp} tn={result.tn} fn={result.fn}")
    if result.n == 0:
        out.print(f"[yellow]no trajectory has both a {escape(name)} verdict and a {escape(gold)} label[/yellow]; "
                  f"label some with [cyan]honed label ID pass|fail[/cyan]")  # fmt: skip
    usable = "[green]used[/green]" if policy.usable else "[red]not used[/red]"
    minimum = "none" if policy.min_precision is None else f"{policy.min_precision:.3f}"
    out.print(f"training: its passes are {usable} (min precision {minimum}, trust {policy.trust})")


@verifiers_app.command("policy")
def policy(
    name: Annotated[str, typer.Argument(help="The verifier.")],
    min_precision: Annotated[
        float | None, typer.Option("--min-precision", help="Minimum audited precision.", min=0.0, max=1.0)
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the minimum.")] = False,
    trust: Annotated[
        str | None,
        typer.Option(
            "--trust",
            help="high or low: a person's word on the verifier (sets right a policy another key wrote).",
        ),
    ] = None,
    note: Annotated[str, typer.Option(help="Why.")] = "",
    store: StoreOption = None,
) -> None:
    """Set (or clear) the audited precision below which a verifier's passes are not training data,
    or its trust."""
    if min_precision is None and not clear and trust is None:
        console().print("[red]give --min-precision X, --clear or --trust high|low[/red]")
        raise typer.Exit(2)
    if trust is not None and trust not in ("high", "low"):
        raise typer.BadParameter("high or low", param_hint="--trust")
    with open_store_or_exit(store, create=True) as s:
        _refuse_labels_that_would_not_count(s)
        judged = sorted({row["verifier"] for row in s.verifier_counts()})
        if trust is not None:
            p = s.set_trust(name, trust, note=note)
        if min_precision is not None or clear:
            p = s.set_min_precision(name, None if clear else min_precision, note=note)
    if name not in judged:  # set ahead of a new verifier, or a typo: say which
        console().print(
            f"[yellow]no verdicts from a verifier named {escape(repr(name))} yet "
            f"(verifiers: {escape(', '.join(judged) or 'none')}); the policy applies once it labels[/yellow]"
        )
    state = "[green]used[/green]" if p.usable else "[red]not used[/red]"
    console().print(
        f"{escape(name)}: min precision {_num(p.min_precision)}, audited {_num(p.precision)}; passes {state}"
    )


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _login() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def _refuse_labels_that_would_not_count(store: TrajectoryStore) -> None:
    """A store whose labels are signed, and no key (or another key) here: what this would write
    counts for nothing, and said nothing (a QA pass, session 26: `honed label` printed its label)."""
    state = store.label_signing()
    if state in ("elsewhere", "other-key"):
        why = (
            "HONED_VERDICT_KEY is not set here"
            if state == "elsewhere"
            else "HONED_VERDICT_KEY here is another key"
        )
        err_console().print(
            f"[red]this store's labels are signed and {why}: what this writes would count for nothing; "
            "run it with the store's key[/red]"
        )
        raise typer.Exit(2)
