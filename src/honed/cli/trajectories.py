"""`honed runs`, `honed show`: captured trajectories from a terminal."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

import typer
from rich.table import Table
from rich.tree import Tree

from honed.cli.common import (
    JsonOption,
    StoreOption,
    app,
    console,
    counted,
    err_console,
    escape,
    open_store_or_exit,
    print_table,
)
from honed.messages import task_text
from honed.store import TrajectoryNotFound
from honed.store.select import unmatched_names
from honed.store.store import AmbiguousTrajectoryId
from honed.trajectory import Step, Trajectory, label


@app.command()
def runs(
    store: StoreOption = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many, newest first.")] = 20,
    agent: Annotated[str | None, typer.Option(help="Only this agent.")] = None,
    task_id: Annotated[str | None, typer.Option("--task-id", help="Only this task.")] = None,
    split: Annotated[str | None, typer.Option(help="train | heldout")] = None,
    status: Annotated[
        Literal["ok", "error", "interrupted"] | None,
        typer.Option(help="ok | error | interrupted"),
    ] = None,
    verdict: Annotated[
        Literal["pass", "fail", "labeled", "unlabeled"] | None,
        typer.Option(help="pass | fail | labeled | unlabeled"),
    ] = None,
    thread: Annotated[
        str | None, typer.Option("--thread", help="Only this conversation (LangGraph thread_id).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List captured trajectories, newest first (a conversation's turns: `--thread ID`)."""
    with open_store_or_exit(store) as s:
        found = s.trajectories(
            limit=limit,
            agent=agent,
            task_id=task_id,
            split=split,
            status=status,
            verdict=verdict,  # type: ignore[arg-type]
            thread_id=thread,
        )
        if not found:  # a name no run has: a typo, said (an empty table said nothing; a QA pass)
            missing = unmatched_names(s, task_ids=[task_id] if task_id else None, agent=agent, split=split)
            if missing:
                err_console().print(f"[red]{escape(missing)}[/red]")
                raise typer.Exit(1)
        untrusted = s.untrusted_verifiers()
        if s.label_signing() == "other-key":
            # The table shows no verdict where none checks out, while `--verdict` filters in SQL,
            # where a signature cannot be checked (a QA pass, session 28): said, not left to puzzle.
            err_console().print(
                "[red]none of the newest labels' signatures check out with this HONED_VERDICT_KEY: another "
                "key? Verdicts that do not check out are not shown, yet --verdict still matches them[/red]",
                soft_wrap=True,
            )
        matching = (
            len(found)
            if limit is None or len(found) < limit
            else s.count(
                agent=agent, task_id=task_id, split=split, status=status, verdict=verdict, thread_id=thread
            )  # type: ignore[arg-type]
        )
    if as_json:
        for t in found:
            data = t.to_dict()
            data.pop("steps")
            data["n_steps"] = len(t.steps)
            typer.echo(json.dumps(data, ensure_ascii=False, default=str))
        return
    shown = (
        counted(len(found), "trajectory")
        if matching == len(found)
        else f"{len(found)} of {counted(matching, 'trajectory')}"
    )
    table = Table(title=f"{shown}, newest first", show_lines=False, pad_edge=False)
    table.add_column("id", no_wrap=True, min_width=12)
    table.add_column("started", no_wrap=True)
    table.add_column("agent / task", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("steps", justify="right", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("answer / error", overflow="fold", ratio=1)
    for t in found:
        task = f"{escape(t.agent)}\n[dim]{escape(t.task_id or '')} {t.split or ''}[/dim]"
        table.add_row(
            t.id[-12:],
            _when(t.started_at, "%m-%d %H:%M:%S"),
            task,
            f"{_status_word(t)} {_verdict_summary(t, untrusted)}",
            str(len(t.steps)),
            _secs(t.duration_s),
            escape(_preview(_outcome(t), 80)),
        )
    print_table(console(), table)


@app.command()
def show(
    trajectory_id: Annotated[
        str, typer.Argument(help="A trajectory id, or a unique prefix or suffix of one.")
    ],
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """One trajectory as a timeline: model calls with reasoning and tool calls, tool results, errors."""
    with open_store_or_exit(store) as s:
        try:
            t = s.get(trajectory_id)
        except TrajectoryNotFound as exc:
            said = str(exc) if isinstance(exc, AmbiguousTrajectoryId) else f"no trajectory {exc}"
            trained = [] if isinstance(exc, AmbiguousTrajectoryId) else s.trained_on(trajectory_id)
            if trained:  # pruned, and its lineage still says what it trained (a QA pass, session 28)
                said += " stored (pruned?); it trained " + ", ".join(
                    f"{r.candidate or r.model} (training run {r.id})" for r in trained
                )
            err_console().print(f"[red]{escape(said)}[/red]")
            raise typer.Exit(1) from exc
        turns = (
            s.trajectories(None, thread_id=t.thread_id, with_steps=False, oldest_first=True)
            if t.thread_id
            else []
        )
        trained = s.trained_on(t.id)
    if as_json:
        data = t.to_dict()
        if t.thread_id:
            data["thread"] = [turn.id for turn in turns]
        data["trained"] = [
            {"training_run": r.id, "candidate": r.candidate, "status": r.status} for r in trained
        ]
        typer.echo(json.dumps(data, ensure_ascii=False, indent=2, default=str))
        return
    out = console()
    if not out.is_terminal:  # a tree is cut at the console's width, 80 off a terminal: its lines whole
        out.width = 100_000
    out.print(_timeline(t))
    if len(turns) > 1:
        out.print(_thread(t, turns))
    if trained:  # which versions hold what it taught (an erasure's question, a QA pass, session 28)
        runs = ", ".join(
            f"{escape(r.candidate or r.model)} ({r.status}, training run {r.id})" for r in trained
        )
        out.print(f"[bold]trained[/bold] {runs}; the versions trained from those hold it too")


def _thread(shown: Trajectory, turns: list[Trajectory]) -> Tree:
    """The conversation this trajectory is a turn of: every turn on its thread, oldest first."""
    tree = Tree(f"[bold]thread[/bold] {escape(shown.thread_id or '')}: {len(turns)} turns")
    for number, turn in enumerate(turns, 1):
        mark = "[bold]▶[/bold] " if turn.id == shown.id else "  "
        tree.add(
            f"{mark}{number}. {turn.id[-12:]} {_when(turn.started_at, '%m-%d %H:%M:%S')} {_status_word(turn)} "
            f"[cyan]{escape(_preview(task_text(turn.task), 60))}[/cyan] → {escape(_preview(_outcome(turn), 60))}"
        )
    return tree


def _status_word(t: Trajectory) -> str:
    return {"ok": "[green]ok[/green]", "interrupted": "[yellow]interrupted[/yellow]"}.get(
        t.status, "[red]error[/red]"
    )


def _outcome(t: Trajectory) -> str:
    """The answer, the error, or what an interrupted run waits for."""
    if t.status == "error":
        return t.error or ""
    if t.status == "interrupted":
        pause = next(
            (s for s in reversed(t.steps) if s.name == "interrupt" and s.extra.get("synthesised")), None
        )
        return "waiting: " + (_content_text(pause.output) if pause and pause.output else "for a resume")
    return t.answer


def _timeline(t: Trajectory) -> Tree:
    status = {
        "ok": "[green]ok[/green]",
        "interrupted": "[yellow]interrupted: waiting to be resumed[/yellow]",
    }.get(t.status, f"[red]error: {escape(t.error or '')}[/red]")
    thread = f" thread={escape(t.thread_id)}" if t.thread_id else ""
    head = (
        f"[bold]{escape(t.agent)}[/bold]  {t.id}\n"
        f"task_id={escape(t.task_id or '-')} split={t.split or '-'} model={escape(t.model_version or '-')}{thread} "
        f"started {_when(t.started_at)}  {_secs(t.duration_s)}  {status}"
    )
    tree = Tree(head)
    tree.add(f"[cyan]task[/cyan] {escape(_preview(task_text(t.task), 300))}")
    nodes: dict[str | None, Tree] = {None: tree}
    for step in t.steps:
        parent = nodes.get(step.parent_id, tree)
        nodes[step.id] = parent.add(_step_label(step))
    answer = (
        f"[bold]answer[/bold] {escape(_preview(t.answer, 500))}"
        if t.output is not None
        else "[dim]no output[/dim]"
    )
    tree.add(answer)
    for v in t.verdicts:
        mark = {True: "[green]pass[/green]", False: "[red]fail[/red]", None: "[yellow]unknown[/yellow]"}[
            v.passed
        ]
        tree.add(f"[bold]verdict[/bold] {escape(v.verifier)}@{escape(v.version)}: {mark} {escape(v.reason)}")
    return tree


def _step_label(step: Step) -> str:
    took = _secs(step.duration_s)
    error = f"\n[red]error: {escape(_preview(step.error, 400))}[/red]" if step.error else ""
    if step.kind == "model":
        usage = step.usage or {}
        tokens = f" {usage.get('input_tokens', '?')}→{usage.get('output_tokens', '?')} tok" if usage else ""
        version = f" [{escape(step.model_version)}]" if step.model_version else ""
        lines = [f"[magenta]model[/magenta] {escape(step.name)}{version} {took}{tokens}"]
        if step.reasoning:
            lines.append(f"[dim italic]thinking: {escape(_preview(step.reasoning, 300))}[/dim italic]")
        for call in step.tool_calls or []:
            args = json.dumps(call.get("args"), ensure_ascii=False, default=str)
            lines.append(f"→ [yellow]{escape(str(call.get('name')))}[/yellow]({escape(_preview(args, 200))})")
        output = step.output if isinstance(step.output, dict) else {}
        if output.get("content"):
            lines.append(f"says: {escape(_preview(_content_text(output['content']), 300))}")
        return "\n".join(lines) + error
    if step.kind == "tool":
        args = json.dumps(step.input, ensure_ascii=False, default=str)
        result = "" if step.error else f"\n= {escape(_preview(_content_text(step.output), 300))}"
        return (
            f"[yellow]tool[/yellow] {escape(step.name)}({escape(_preview(args, 200))}) {took}{result}{error}"
        )
    synthesised = step.kind == "node" and step.extra.get("synthesised")
    if synthesised and step.name == "interrupt":
        return f"[yellow]⏸ interrupted[/yellow], waiting for: {escape(_preview(_content_text(step.output), 300))}"
    if synthesised and step.name == "resume":
        return f"[yellow]▶ resumed[/yellow] with: {escape(_preview(_content_text(step.input), 300))}"
    return f"[blue]node[/blue] {escape(step.name)} {took}{error}"


def _content_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _verdict_summary(t: Trajectory, untrusted: set[str]) -> str:
    """The trajectory's label (`honed.trajectory.label`: what `--verdict` filters by and training
    uses), "?" when its verdicts tell nothing trusted."""
    if not t.verdicts:
        return ""
    verdict = label(t.verdicts, untrusted=untrusted)
    return {True: "[green]pass[/green]", False: "[red]fail[/red]"}.get(verdict, "[yellow]?[/yellow]")


def _preview(text: str | None, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _when(value: datetime | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return value.astimezone().strftime(fmt) if value else "-"


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.2f}s"
