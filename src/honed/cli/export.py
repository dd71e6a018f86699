"""`honed export otlp|jsonl|hf`: stored trajectories as OpenTelemetry spans or fine-tuning data."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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
)
from honed.store import TrajectoryStore
from honed.store.select import Selection, count_selected, select_trajectories, unmatched_names

export_app = typer.Typer(
    no_args_is_help=True, help="Export trajectories: OTLP spans, OpenAI-format JSONL, Hugging Face datasets."
)
app.add_typer(export_app, name="export")


SinceOption = Annotated[
    str | None,
    typer.Option(
        help="Only runs started since: an ISO date/time (local time unless it names a zone) or an age such as 30m, 12h, 7d."
    ),
]
UntilOption = Annotated[
    str | None, typer.Option(help="Only runs started before this (same forms as --since).")
]
AgentOption = Annotated[str | None, typer.Option(help="Only this agent.")]
TaskIdOption = Annotated[list[str] | None, typer.Option("--task-id", help="Only these tasks (repeatable).")]
SplitOption = Annotated[str | None, typer.Option(help="train | heldout")]
StatusOption = Annotated[
    Literal["ok", "error", "interrupted"] | None,
    typer.Option(help="ok | error | interrupted"),
]
ModelVersionOption = Annotated[
    str | None, typer.Option("--model-version", help="Only runs of this model version.")
]
LimitOption = Annotated[
    int | None,
    typer.Option(
        "--limit",
        "-n",
        min=1,
        help="At most this many trajectories, the oldest first (with --since for the latest).",
    ),
]
HeldoutOption = Annotated[
    bool, typer.Option("--include-heldout", help="Also export held-out trajectories (left out by default).")
]
ReasoningOption = Annotated[
    bool, typer.Option("--reasoning", help="Add reasoning_content to assistant turns (TRL templates use it).")
]


def _verdict_option(default: str) -> Any:
    return typer.Option(help=f"pass | fail | labeled | unlabeled | any (default {default})")


@export_app.command("otlp")
def export_otlp(
    store: StoreOption = None,
    endpoint: Annotated[
        str | None,
        typer.Option(help="OTLP base URL, e.g. http://localhost:4318 (default: OTEL_EXPORTER_OTLP_*)."),
    ] = None,
    protocol: Annotated[
        Literal["http/protobuf", "grpc"] | None,
        typer.Option(help="http/protobuf (default) | grpc"),
    ] = None,
    header: Annotated[
        list[str] | None, typer.Option("--header", help="key=value, sent with every request.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds per request (default: OTEL_EXPORTER_OTLP_TIMEOUT, else 10).")
    ] = None,
    capture_content: Annotated[
        bool | None,
        typer.Option(
            "--capture-content/--no-capture-content",
            help="Messages, tool arguments and results (default: OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT).",
        ),
    ] = None,
    service_name: Annotated[
        str | None, typer.Option("--service-name", help="service.name (default honed).")
    ] = None,
    project: Annotated[str | None, typer.Option(help="Phoenix project (default: the service name).")] = None,
    batch_mib: Annotated[
        float,
        typer.Option(
            "--batch-mib",
            help="Largest request, in MiB (a receiver's limit: 4 for gRPC and the Collector).",
            min=0.01,
        ),
    ] = 3.0,
    since: SinceOption = None,
    until: UntilOption = None,
    agent: AgentOption = None,
    task_id: TaskIdOption = None,
    split: SplitOption = None,
    status: StatusOption = None,
    verdict: Annotated[str, _verdict_option("any")] = "any",
    model_version: ModelVersionOption = None,
    limit: LimitOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send stored trajectories as OpenTelemetry GenAI spans (re-sending never duplicates)."""
    from honed.exporters.otel import (
        OTLPExportError,
        check_endpoint,
        effective_endpoint,
        header_pair,
        replay,
        shown_endpoint,
    )
    from honed.exporters.spans import capture_content_from_env

    if endpoint is not None:
        try:
            check_endpoint(endpoint)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--endpoint") from None
    if timeout is not None and not timeout > 0:
        raise typer.BadParameter(
            f"must be a positive number of seconds, not {timeout}", param_hint="--timeout"
        )
    selection = _selection(
        since, until, agent, task_id, split, status, verdict, model_version, include_heldout=True
    )
    try:  # each --header is one pair: a value may hold commas (a QA pass, session 26: it was cut there)
        headers = dict(header_pair(h) for h in header) if header else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--header") from None
    with open_store_or_exit(store) as s, _progress(s, selection, limit, "sending spans", as_json) as advance:
        try:
            if capture_content is None:
                capture_content = capture_content_from_env()
            result = replay(
                select_trajectories(s, selection, limit=limit, step_content=capture_content),
                endpoint,
                protocol=protocol,
                headers=headers,
                timeout_s=timeout,
                capture_content=capture_content,
                service_name=service_name,
                project=project,
                on_trajectory=advance,
                untrusted=s.untrusted_verifiers(),
                batch_bytes=int(batch_mib * 2**20),
            )
        except OTLPExportError as exc:
            err_console().print(f"[red]{escape(str(exc))}[/red]")
            raise typer.Exit(1) from exc
        missing = unmatched_names(s, task_ids=task_id, agent=agent, model_version=model_version, split=split)
    # With none given, where the SDK sent (its variables, else localhost), as a failure says it.
    where = shown_endpoint(endpoint or effective_endpoint(endpoint, protocol)[0])
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "trajectories": result.trajectories,
                    "spans": result.spans,
                    "rejected": result.rejected,
                    "rejection": result.rejection,
                    "endpoint": where,
                }
            )
        )
    else:
        console().print(
            f"sent {counted(result.spans, 'span')} of {counted(result.trajectories, 'trajectory')} to {escape(where)}"
        )
    if missing and not result.trajectories:  # a typo'd name sent nothing and said nothing
        err_console().print(f"[red]{escape(missing)}: nothing sent[/red]")
        raise typer.Exit(1)  # as `export jsonl` has it (a QA pass, session 26: rc 0 here)
    if result.rejected:
        err_console().print(
            f"[yellow]the receiver refused {result.rejected} of them: "
            f"{escape(result.rejection or 'it gave no reason')}[/yellow]"
        )
        raise typer.Exit(1)


def _dataset_command(
    name: str, output_help: str, what: str, write: Callable[..., Any], *, dash_is_stdout: bool = False
) -> Callable[..., None]:
    """`honed export jsonl` and `honed export hf`: one selection, written by `write` (whose
    docstring is the command's help)."""

    def command(
        output: str,
        store: StoreOption = None,
        verdict: Annotated[str, _verdict_option("pass")] = "pass",
        split: SplitOption = None,
        since: SinceOption = None,
        until: UntilOption = None,
        model_version: ModelVersionOption = None,
        task_id: TaskIdOption = None,
        agent: AgentOption = None,
        status: StatusOption = None,
        include_heldout: HeldoutOption = False,
        reasoning: ReasoningOption = False,
        limit: LimitOption = None,
        as_json: JsonOption = False,
    ) -> None:
        selection = _selection(
            since, until, agent, task_id, split, status, verdict, model_version, include_heldout
        )
        to_stdout = dash_is_stdout and output == "-"
        with open_store_or_exit(store) as s:
            # A name no stored run has is a typo: refused before anything is written (a QA pass,
            # session 25: `--agent calcc` replaced a good export with an empty file, exit 0).
            missing = unmatched_names(
                s, task_ids=task_id, agent=agent, model_version=model_version, split=split
            )
            if missing:
                kept = "" if to_stdout else f"; {output} is left as it was"
                err_console().print(f"[red]{escape(missing)}: nothing written{escape(kept)}[/red]")
                raise typer.Exit(1)
            seen = 0

            def read() -> Iterator[Any]:
                nonlocal seen
                for t in select_trajectories(s, selection, limit=limit):
                    seen += 1
                    yield t

            with _progress(s, selection, limit, what, as_json or to_stdout) as advance:
                result = write(read(), output, reasoning, advance)
            # What the held-out policy left out, said whatever was written: `"skipped": {}` with
            # 7 held-out runs left out read as "nothing left out" (a QA pass, session 28).
            held = 0 if include_heldout or limit is not None else max(_held_out_only(s, selection) - seen, 0)
        _report({**result.to_dict(), "heldout_excluded": held}, output, as_json, to_stderr=to_stdout)
        if not result.written and output.endswith(".parquet"):  # a QA pass (session 19)
            err_console().print(
                "[yellow]the parquet file holds no rows: pyarrow and pandas read it, but `datasets` refuses "
                'an empty parquet file ("corresponds to no data")[/yellow]'
            )
        if held and not as_json:  # so did a held-out task's id (a QA pass, session 19)
            err_console().print(
                f"[yellow]{counted(held, 'matching run')} left out: held out (their task, split or request is "
                "the gate's), for evaluation; --include-heldout exports them anyway[/yellow]"
            )

    # Each command's own help for `output` (a string annotation could not name `output_help`).
    command.__annotations__["output"] = Annotated[str, typer.Argument(help=output_help)]
    return export_app.command(name, help=write.__doc__)(command)


def _write_jsonl(
    trajectories: Iterator[Any], output: str, reasoning: bool, advance: Callable[[Any], None]
) -> Any:
    """Write verified trajectories as OpenAI chat fine-tuning JSONL (messages, tool calls, tools)."""
    import sys

    from honed.exporters.datasets import write_jsonl

    target: Any = sys.stdout if output == "-" else Path(output)
    return write_jsonl(trajectories, target, reasoning=reasoning, on_trajectory=advance)


# What a user typing `export hf out.csv` means as a file; `export hf` would make it a folder.
_FILE_SUFFIXES = frozenset(
    {".csv", ".tsv", ".json", ".jsonl", ".txt", ".arrow", ".pq", ".gz", ".zip", ".xlsx"}
)


def _write_hf(
    trajectories: Iterator[Any], output: str, reasoning: bool, advance: Callable[[Any], None]
) -> Any:
    """Write verified trajectories as a Hugging Face dataset (parquet or a saved folder) for TRL."""
    import datasets

    from honed.exporters.datasets import to_hf_dataset, write_parquet, written

    datasets.disable_progress_bars()  # ours is on screen
    if output == "-":  # `export jsonl -` is standard output; this made a folder named "-"
        raise ValueError(
            "`export hf` writes a .parquet file or a folder, not standard output (`export jsonl -` does)"
        )
    if not output.endswith(".parquet") and (Path(output).is_file() or Path(output).suffix in _FILE_SUFFIXES):
        raise ValueError(
            f"{output} names a file: `export hf` writes a .parquet file or a folder (`export jsonl` writes JSONL)"
        )
    if output.endswith(".parquet"):
        return write_parquet(trajectories, output, reasoning=reasoning, on_trajectory=advance)
    import tempfile

    target = Path(output)
    # Rows go to a parquet file a row group at a time, and the saved dataset is built from it by
    # `datasets` in batches: memory stays flat (a list of every row took ~5.5x the data: 1.5 GB
    # for 3,000 long runs; a QA pass, session 20). Saved beside the target and moved into place
    # when whole (a failed re-export kept a folder that looked complete and could not be loaded);
    # one shard even when empty (with none, `load_from_disk` failed on a quiet day's export).
    with written(target) as folder, tempfile.TemporaryDirectory(dir=folder.parent, prefix=".honed-") as work:
        staged = Path(work) / "rows.parquet"
        result = write_parquet(trajectories, staged, reasoning=reasoning, on_trajectory=advance)
        result.path = output
        if result.written:
            dataset = datasets.Dataset.from_parquet(str(staged), cache_dir=str(Path(work) / "cache"))
            dataset.save_to_disk(str(folder))
        else:  # `datasets` reads no empty parquet file: the empty dataset, with the same features
            to_hf_dataset([], reasoning=reasoning).save_to_disk(str(folder), num_shards=1)
    return result


export_jsonl = _dataset_command(
    "jsonl",
    "The .jsonl file to write, or - for standard output.",
    "writing JSONL",
    _write_jsonl,
    dash_is_stdout=True,
)
export_hf = _dataset_command(
    "hf", "A .parquet file, or a folder for datasets.load_from_disk.", "writing dataset", _write_hf
)


# -- helpers -----------------------------------------------------------------------------------


def _held_out_only(store: TrajectoryStore, selection: Selection) -> int:
    """How many runs the selection would match were held-out ones included."""
    return count_selected(store, dataclasses.replace(selection, include_heldout=True))


def _selection(
    since: str | None,
    until: str | None,
    agent: str | None,
    task_ids: list[str] | None,
    split: str | None,
    status: str | None,
    verdict: str,
    model_version: str | None,
    include_heldout: bool,
) -> Selection:
    verdicts = ("pass", "fail", "labeled", "unlabeled", "any")
    if verdict not in verdicts:
        raise typer.BadParameter(f"--verdict must be one of {', '.join(verdicts)}, not {verdict!r}")
    return Selection(
        verdict=None if verdict == "any" else verdict,
        split=split,
        since=parse_when(since) if since else None,
        until=parse_when(until) if until else None,
        model_version=model_version,
        task_ids=tuple(dict.fromkeys(task_ids)) if task_ids else None,
        agent=agent,
        status=status,
        include_heldout=include_heldout,
    )


@contextmanager
def _progress(
    store: TrajectoryStore, selection: Selection, limit: int | None, what: str, quiet: bool
) -> Iterator[Callable[[Any], None]]:
    """A progress bar on standard error (so `-` output stays clean) that each trajectory advances."""
    if quiet:
        yield lambda _trajectory: None
        return
    total = count_selected(store, selection)
    total = min(total, limit) if limit is not None else total
    columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(what, total=total)
        yield lambda _trajectory: progress.advance(task)


def _report(result: dict[str, Any], output: str, as_json: bool, to_stderr: bool = False) -> None:
    if as_json:
        typer.echo(json.dumps(result), err=to_stderr)
        return
    skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(result["skipped"].items()))
    line = f"wrote {counted(result['written'], 'example')} to {escape(output)}" + (
        f" (skipped: {skipped})" if skipped else ""
    )
    (err_console() if to_stderr else console()).print(line)
