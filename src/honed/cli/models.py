"""`honed versions | register | promote | rollback | serve`: the model registry and the server.

Promotion and rollback are recorded with who (`--by`, default `$HONED_ACTOR` or user@host) and
why (`--reason`); every `ServedModel` and `honed serve` following the name swaps to the new
version within its poll interval (at once on PostgreSQL, through NOTIFY).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
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
    print_table,
)
from honed.store.registry import (
    ModelVersionInvalid,
    ModelVersionNotFound,
    NoLiveVersion,
    NoPreviousVersion,
    PromotionConflict,
    parse_model_ref,
    validate_model_files,
)
from honed.trajectory import ModelVersion

ReasonOption = Annotated[str, typer.Option("--reason", "-m", help="Why: recorded in the history.")]
ActorOption = Annotated[str | None, typer.Option("--by", help="Who: default $HONED_ACTOR, else user@host.")]
_STATUS_STYLE = {"live": "bold green", "candidate": "cyan", "retired": "dim", "rejected": "red"}
_REGISTRY_ERRORS = (
    ModelVersionNotFound,
    ModelVersionInvalid,
    PromotionConflict,
    NoLiveVersion,
    NoPreviousVersion,
    ValueError,
)


@app.command()
def versions(
    name: Annotated[str, typer.Argument(help="The served model's name.")],
    store: StoreOption = None,
    history: Annotated[
        bool, typer.Option("--history", help="Also list every change, who made it and why.")
    ] = False,
    learned_from: Annotated[
        bool,
        typer.Option(
            "--learned-from", help="Also list the captured runs each version was trained on (their ids)."
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """The versions of NAME: status (candidate | live | retired | rejected), parent, metrics, path."""
    with open_store_or_exit(store) as s:
        found = s.versions(name)
        events = s.model_history(name) if history or as_json else []
        known = s.model_names() if not found else []
        examples = {
            v.ref: s.training_examples(v.training_run)
            for v in found
            if learned_from and v.training_run is not None
        }
    if not found:
        console().print(
            f"[yellow]{escape(name)} has no versions[/yellow] (models: {escape(', '.join(known) or 'none')}): "
            "register one with honed register"
        )
        raise typer.Exit(1)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "versions": [v.to_dict() for v in found],
                    "history": [_event_dict(e) for e in events],
                    **({"learned_from": examples} if learned_from else {}),
                },
                ensure_ascii=False,
                default=str,
            )
        )
        return
    ids = {v.id: v for v in found}
    table = Table(title=f"{name}: {counted(len(found), 'version')}", pad_edge=False)
    for column in ("version", "status", "created", "parent", "metrics", "path"):
        table.add_column(column, overflow="fold", no_wrap=column in ("version", "status"))
    for v in found:
        parent = ids[v.parent].ref if v.parent in ids else ("" if v.parent is None else f"id {v.parent}")
        style = _STATUS_STYLE.get(v.status, "")
        table.add_row(
            f"v{v.version}",
            f"[{style}]{v.status}[/{style}]" if style else v.status,
            v.created_at.astimezone().strftime("%Y-%m-%d %H:%M") if v.created_at else "-",
            escape(parent),
            escape(json.dumps(v.metrics, default=str)) if v.metrics else "",
            escape(v.path),
        )
    print_table(console(), table)
    for ref, ids in examples.items():  # lineage read back: what each version learned from
        console().print(f"{escape(ref)} learned from {counted(len(ids), 'run')}: {escape(' '.join(ids))}")
    if learned_from and not examples:
        console().print(f"no version of {escape(name)} was trained from captured runs here")
    if history:
        for e in events:
            moved = f"v{e.from_version} → v{e.version}" if e.from_version else f"v{e.version}"
            reason = f": {escape(e.reason)}" if e.reason else ""
            when = e.created_at.astimezone().strftime("%Y-%m-%d %H:%M:%S")
            console().print(f"{when}  {e.action:<8} {moved:<12} by {escape(e.actor)}{reason}")


@app.command()
def register(
    name: Annotated[str, typer.Argument(help="The served model's name.")],
    path: Annotated[
        str, typer.Argument(help="A folder saved with save_pretrained (weights or a LoRA adapter).")
    ],
    store: StoreOption = None,
    parent: Annotated[
        str | None, typer.Option(help="The version it was trained from: vN or NAME@vN.")
    ] = None,
    metrics: Annotated[str | None, typer.Option(help="A JSON object of evaluation figures.")] = None,
    reason: ReasonOption = "",
    by: ActorOption = None,
) -> None:
    """Register a folder as the next candidate version of NAME (it is checked when promoted)."""
    figures = _metrics(metrics) if metrics else None
    with open_store_or_exit(store, create=True) as s:
        version = _run(
            lambda: s.register_model(name, path, parent=parent, metrics=figures, actor=by, reason=reason)
        )
    console().print(f"registered [bold]{escape(version.ref)}[/bold] ({escape(version.path)})")


@app.command()
def promote(
    ref: Annotated[str, typer.Argument(help="NAME@vN, the version to make live.")],
    store: StoreOption = None,
    expect: Annotated[
        int | None, typer.Option("--expect", help="Only if vN is still the live version (guards a race).")
    ] = None,
    reason: ReasonOption = "",
    by: ActorOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Also a version the gate rejected or a rollback retired.")
    ] = False,
) -> None:
    """Make NAME@vN live, after checking its files; everything following NAME swaps to it."""
    name, number = _ref(ref)
    with open_store_or_exit(store) as s:
        before = s.live_version(name)
        target = _run(lambda: s.model_version(name, number))
        if target.status == "rejected" and not force and (before is None or before.id != target.id):
            # A typo (v2 for v12) redeployed a known-worse model without a word (a QA pass, session 21).
            err_console().print(
                f"[red]{escape(target.ref)} was rejected (by the gate, or retired by a rollback: `honed "
                f"versions {escape(name)} --history` says why); promote it anyway with --force[/red]"
            )
            raise typer.Exit(1)
        kwargs = {} if expect is None else {"expected_live": expect}
        version = _run(lambda: s.promote(name, number, reason=reason, actor=by, **kwargs))
    _moved(before, version)


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="The served model's name.")],
    store: StoreOption = None,
    reason: ReasonOption = "",
    by: ActorOption = None,
) -> None:
    """Return NAME to the version live before the current one (which is marked rejected)."""
    with open_store_or_exit(store) as s:
        before = s.live_version(name)
        known = s.model_names() if before is None else [name]
        if name not in known:
            console().print(
                f"[red]{escape(name)} has no versions (models: {escape(', '.join(known) or 'none')})[/red]"
            )
            raise typer.Exit(1)
        version = _run(lambda: s.rollback(name, reason=reason, actor=by))
    _moved(before, version)


def _port_free_or_exit(host: str, port: int) -> None:
    """Before the weights load and "serving" is said (a QA pass, session 23: uvicorn's own error
    came after both, with its exit code 3)."""
    if port == 0:
        return
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return  # uvicorn says what is wrong with the host
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            err_console().print(
                f"[red]cannot listen on {escape(host)}:{port}: {escape(exc.strerror or str(exc))} "
                "(another server holds it? choose one with --port)[/red]",
                soft_wrap=True,
            )
            raise typer.Exit(1) from exc


@app.command()
def serve(
    names: Annotated[list[str], typer.Argument(help="The served model name(s).")],
    store: StoreOption = None,
    host: Annotated[
        str, typer.Option(help="Interface to bind; loopback unless told otherwise.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=0, max=65535)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="HONED_API_KEY", help="Require 'Authorization: Bearer KEY'."),
    ] = None,
    label_key: Annotated[
        list[str] | None,
        typer.Option(
            "--label-key",
            envvar="HONED_LABEL_KEY",
            help="A key whose requests' metadata labels the captured run (task_id, split, expected, tests...); "
            "also an API key. Other clients' metadata is kept apart, under metadata.client. Repeatable.",
        ),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label",
            help="KEY=VALUE: a label on every captured run (VALUE read as JSON if it is). Repeatable.",
        ),
    ] = None,
    poll: Annotated[
        float | None, typer.Option(help="Seconds between checks for a new live version.", min=0.01)
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Default completion budget.", min=1)
    ] = None,
    no_capture: Annotated[bool, typer.Option("--no-capture", help="Do not store served requests.")] = False,
    max_body_mb: Annotated[
        float,
        typer.Option(
            "--max-body-mb", envvar="HONED_MAX_BODY_MB", help="Largest request body (413 beyond).", min=0.001
        ),
    ] = 8.0,
    body_timeout: Annotated[
        float,
        typer.Option(
            "--body-timeout",
            envvar="HONED_BODY_TIMEOUT",
            help="Seconds a request body may take to arrive (408 beyond).",
            min=0.01,
        ),
    ] = 30.0,
    header_timeout: Annotated[
        float,
        typer.Option(
            "--header-timeout",
            envvar="HONED_HEADER_TIMEOUT",
            help="Seconds a request's headers may take to arrive.",
            min=0.01,
        ),
    ] = 10.0,
    limit_concurrency: Annotated[
        int,
        typer.Option(
            "--limit-concurrency",
            envvar="HONED_LIMIT_CONCURRENCY",
            help="Requests in flight at once (503 beyond); past as many connections, idle ones are closed.",
            min=1,
        ),
    ] = 1000,
) -> None:
    """An OpenAI-compatible endpoint (/v1/chat/completions, /v1/models) over the live version of NAME."""
    # A promoted version that fails to load is logged ("still serving ..."): the operator must see it.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        from honed.serving.app import serve as run_server
    except ImportError as exc:
        said = f"honed serve needs the serve and train extras: pip install 'honed[serve,train]' ({exc})"
        err_console().print(f"[red]{escape(said)}[/red]", soft_wrap=True)
        raise typer.Exit(2) from exc
    _port_free_or_exit(host, port)
    with open_store_or_exit(store) as s:
        url = s.url
        known = s.model_names()
        unknown = [name for name in names if name not in known]
        if (
            unknown
        ):  # a typo served 503s forever, naming a version that does not exist (a QA pass, session 22)
            err_console().print(
                f"[red]{escape(', '.join(unknown))}: no such model in this store "
                f"(models: {escape(', '.join(known) or 'none')}); register one with honed register[/red]",
                soft_wrap=True,
            )
            raise typer.Exit(1)
        for name in names:
            live = s.live_version(name)
            if live is None:
                console().print(
                    f"[yellow]{escape(name)} has no live version yet: requests get 503 until one is promoted[/yellow]"
                )
                continue
            try:  # before saying "serving" (a QA pass, session 19: it said so, then died on the load)
                validate_model_files(live.path, live.ref)
            except ModelVersionInvalid as exc:
                err_console().print(
                    f"[red]{escape(str(exc))} (`honed rollback {escape(name)}`, or promote another version)[/red]"
                )
                raise typer.Exit(1) from exc
            console().print(f"serving [bold]{escape(live.ref)}[/bold] as {escape(name)}")
    if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
        console().print(
            f"[yellow]listening on {escape(host)} without --api-key: anyone who can reach it can use it[/yellow]"
        )
    settings = {} if max_tokens is None else {"max_tokens": max_tokens}
    run_server(
        url,
        names,
        host=host,
        port=port,
        api_key=api_key,
        label_keys=label_key or (),
        labels=_labels(label or ()),
        capture=not no_capture,
        poll_interval=poll,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        body_timeout_s=body_timeout,
        header_timeout_s=header_timeout,
        limit_concurrency=limit_concurrency,
        announce=lambda url: console().print(
            f"OpenAI-compatible endpoint: {url}"
            + (f" (listening on every interface, {host})" if host in ("0.0.0.0", "::") else "")
        ),
        **settings,
    )


def _labels(pairs: Sequence[str]) -> dict[str, object]:
    labels: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            console().print(f"[red]--label takes KEY=VALUE ({escape(pair)!s} given)[/red]")
            raise typer.Exit(2)
        try:
            labels[key.strip()] = json.loads(value)
        except ValueError:
            labels[key.strip()] = value
    return labels


def _ref(ref: str) -> tuple[str, int]:
    try:
        return parse_model_ref(ref)
    except ValueError as exc:
        console().print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from exc


def _run(change):  # type: ignore[no-untyped-def]
    try:
        return change()
    except _REGISTRY_ERRORS as exc:
        console().print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from exc


def _moved(before: ModelVersion | None, after: ModelVersion) -> None:
    was = f" (was {escape(before.ref)})" if before is not None and before.id != after.id else ""
    same = " (already live)" if before is not None and before.id == after.id else ""
    console().print(f"[green]{escape(after.name)} now serves {escape(after.ref)}[/green]{was}{same}")


def _event_dict(event: object) -> dict[str, object]:
    from dataclasses import asdict

    data = asdict(event)  # type: ignore[call-overload]
    data["created_at"] = data["created_at"].isoformat()
    return data


def _metrics(text: str) -> dict[str, Any]:
    try:
        figures = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--metrics is not JSON: {exc}") from exc
    if not isinstance(figures, dict):
        raise ValueError(
            f"--metrics must be a JSON object of figures, like '{{\"pass@1\": 0.4}}', not {text!r}"
        )
    return figures
