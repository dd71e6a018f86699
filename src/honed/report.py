"""The learning report: one self-contained HTML page that shows whether a model is getting better.

    from honed.report import build_report
    build_report(store, model="support-agent", path="report.html")

Everything comes from the store (training runs, held-out evaluations, the registry's history,
captured trajectories), so `honed report` rebuilds it from any store on any machine. The page
loads nothing and runs no script: CSS and the SVG plots are inline, so it can be attached to a CI
run or mailed and opened offline. Every value from the store is escaped: trajectories hold model
output, and a model reply containing `<script>` must show as text, never run.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from honed.messages import task_text
from honed.trajectory import HELDOUT, ModelVersion, Step, Trajectory, Verdict

if TYPE_CHECKING:
    from honed.learn.cycle import CycleResult
    from honed.store.registry import ModelEvent
    from honed.store.training import EvalRun, TrainingRun


# The page's few colours; each plotted series has its own, which the browser test looks for.
PALETTE = {
    "pass_at_1": "#2563eb",
    "pass_at_k": "#ea580c",
    "train_pass_rate": "#16a34a",
    "distinct_answers": "#9333ea",
    "distinct_tool_calls": "#0d9488",
    "text": "#1f2937",
    "muted": "#6b7280",
    "grid": "#e5e7eb",
}
_CLIP = 1500  # characters of one model reply or tool result shown in an example


def build_report(
    store: Any, *, model: str | None = None, path: str | Path = "honed-report.html", examples: int = 4
) -> Path:
    """Write the learning report of `model` (default: the model trained last) to `path` and return it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(store, model=model, examples=examples), encoding="utf-8")
    return out


def render_report(store: Any, *, model: str | None = None, examples: int = 4) -> str:
    """The report as an HTML string (see `build_report`)."""
    names = store.model_names()
    model = model or _default_model(store, names)
    runs = list(reversed(store.training_runs(model, limit=None))) if model else []
    from honed.learn.evaluate import Scores

    # A round that measured nothing (its attempts went to another store) is no 0.0% score: a gap.
    evals = (
        [e for e in store.eval_runs(model, split=HELDOUT) if Scores.measured_in(e.metrics)] if model else []
    )
    versions = store.versions(model) if model else []
    live = store.live_version(model) if model else None
    cycles = collect_cycles(runs, evals, versions, live)
    live_eval = next((e for e in reversed(evals) if live is not None and e.version == live.ref), None)
    history = store.model_history(model) if model else []
    captured = store.count()
    own = sum(store.count(model_version=v.ref) for v in versions)
    sections = [
        _header(store, model, names, live, live_eval, runs, captured, own),
        _curves(cycles) if any(c.run_id is not None for c in cycles) else _no_runs(model),
        _cycle_table(cycles) if cycles else "",
        _watch(store, model),
        _history(history),
        _verifiers(store.verifier_counts()),
        _examples(_pick_examples(store, model, examples)),
    ]
    title = f"honed · {model}" if model else "honed report"
    return _PAGE.format(title=_e(title), css=_CSS, body="\n".join(s for s in sections if s))


def collect_cycles(
    runs: Sequence[TrainingRun],
    evals: Sequence[EvalRun],
    versions: Sequence[ModelVersion],
    live: ModelVersion | None,
) -> list[CycleResult]:
    """Cycle 0 (the version the first run trained from) then one result per training run, oldest
    first, each with the held-out evaluation of the candidate it produced (what the curves plot)."""
    from honed.learn.cycle import CycleResult

    by_run = {e.training_run: e for e in evals if e.training_run is not None}  # later wins
    by_version = {e.version: e.metrics for e in evals}
    base = runs[0].parent if runs else (live.ref if live else (versions[0].ref if versions else None))
    rows: list[CycleResult] = []
    if base is not None:
        reason = "the starting version, before any training run"
        rows.append(
            CycleResult(
                "base", reason, method="base", cycle=0, version=base, heldout=by_version.get(base, {})
            )
        )
    for i, run in enumerate(runs, start=1):
        found = by_run.get(run.id)
        candidate = (
            found.metrics if found else by_version.get(run.candidate or "", run.metrics.get("heldout") or {})
        )
        after = candidate if run.status == "promoted" else by_version.get(run.parent or "", {})
        rows.append(CycleResult.from_records(i, run, heldout=after, candidate=candidate))
    return rows


def _evaluated(c: CycleResult) -> dict[str, Any]:
    """The evaluation a row plots: the base version's, else the candidate the run produced."""
    return c.heldout if c.status == "base" else c.candidate_heldout


def _shown_version(c: CycleResult) -> str | None:
    return c.version if c.status == "base" else c.candidate


# -- gathering -----------------------------------------------------------------------------------


def _default_model(store: Any, names: list[str]) -> str | None:
    latest = store.training_runs(limit=1)
    if latest:
        return latest[0].model
    return names[0] if names else None


def _pass_at_k(metrics: dict[str, Any]) -> tuple[int | None, float | None]:
    """The evaluation's ceiling: pass@samples, else the largest pass@k (k > 1) it recorded."""
    samples = metrics.get("samples")
    if isinstance(samples, int) and samples > 1 and f"pass_at_{samples}" in metrics:
        return samples, _float(metrics[f"pass_at_{samples}"])
    ks = [int(m.group(1)) for key in metrics if (m := re.fullmatch(r"pass_at_(\d+)", key))]
    ks = [k for k in ks if k > 1]
    return (max(ks), _float(metrics[f"pass_at_{max(ks)}"])) if ks else (None, None)


def _pick_examples(store: Any, model: str | None, n: int) -> list[tuple[Trajectory, str]]:
    """Recent passing and failing trajectories (as `honed.trajectory.label` says: the store's
    `verdict=` filter is that rule), the model's own versions first (else any), with the label."""
    if n <= 0:
        return []
    chosen: dict[str, str] = {}
    for verdict, want in (("pass", (n + 1) // 2), ("fail", n // 2)):
        recent = store.trajectories(200, verdict=verdict, with_steps=False, finished=True)
        own = [t for t in recent if model and (t.model_version or "").startswith(f"{model}@")]
        chosen.update((t.id, verdict) for t in (own or recent)[:want])
    if not chosen:
        return []
    loaded = {t.id: t for t in store.trajectories(None, ids=list(chosen), with_steps=True)}
    return [(loaded[i], word) for i, word in chosen.items() if i in loaded]


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) else None


# -- sections ------------------------------------------------------------------------------------


def _header(
    store: Any,
    model: str | None,
    names: list[str],
    live: ModelVersion | None,
    live_eval: EvalRun | None,
    runs: Sequence[TrainingRun],
    captured: int,
    own: int,
) -> str:
    generated = datetime.now(UTC).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    if model is None:
        return (
            "<header><h1>honed learning report</h1>"
            f'<p class="muted">generated {_e(generated)} from {_e(store.safe_url)}</p>'
            '<p class="notice">No model is registered in this store yet: register one with '
            "<code>honed register NAME PATH</code>, promote it, then train with <code>honed train</code>.</p>"
            "</header>"
        )
    outcomes: dict[str, int] = {}
    for run in runs:
        outcomes[run.status] = outcomes.get(run.status, 0) + 1
    breakdown = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(outcomes.items()))
    pass1 = _float(live_eval.metrics.get("pass_at_1")) if live_eval else None
    others = [n for n in names if n != model]
    stats = [
        ("live version", live.ref if live else "none yet"),
        ("held-out pass@1", _fmt(pass1) if live_eval else "not evaluated"),
        ("training cycles", f"{len(runs)}" + (f" ({breakdown})" if breakdown else "")),
        ("trajectories captured", f"{captured}" + (f" ({own} by {model}'s versions)" if own else "")),
    ]
    cards = "".join(f'<div class="stat"><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>' for k, v in stats)
    more = (
        f'<p class="muted">Other models in this store: {_e(", ".join(others))} (<code>honed report --model NAME</code>).</p>'
        if others
        else ""
    )
    return (
        f'<header><h1>{_e(model)} <span class="muted">learning report</span></h1>'
        f'<p class="muted">generated {_e(generated)} from {_e(store.safe_url)}</p>'
        f'<dl class="stats">{cards}</dl>{more}</header>'
    )


def _no_runs(model: str | None) -> str:
    if model is None:
        return ""
    return (
        '<section id="curves"><h2>Learning curves</h2>'
        f'<p class="notice">No training runs yet for {_e(model)}: the curves appear after the first '
        "<code>honed train</code> cycle.</p></section>"
    )


def _curves(cycles: list[CycleResult]) -> str:
    ks = {k for c in cycles if (k := _pass_at_k(_evaluated(c))[0])}
    k_label = f"pass@{ks.pop()}" if len(ks) == 1 else "pass@k"
    main = _line_plot(
        "plot-heldout",
        f"Held-out pass@1, {k_label} and train pass rate per cycle",
        cycles,
        [
            ("pass_at_1", "held-out pass@1 (sampled)", lambda c: _float(_evaluated(c).get("pass_at_1")), ""),
            ("pass_at_k", f"held-out {k_label} (ceiling)", lambda c: _pass_at_k(_evaluated(c))[1], "7 4"),
            ("train_pass_rate", "train pass rate (the cycle's data)", lambda c: c.train_pass_rate, "2 4"),
        ],
        y_label="pass rate",
    )
    diversity = _line_plot(
        "plot-diversity",
        "Held-out output diversity per cycle",
        cycles,
        [
            (
                "distinct_answers",
                "distinct answers",
                lambda c: (_evaluated(c).get("diversity") or {}).get("distinct_answers"),
                "",
            ),
            (
                "distinct_tool_calls",
                "distinct tool calls",
                lambda c: (_evaluated(c).get("diversity") or {}).get("distinct_tool_calls"),
                "6 3",
            ),
        ],
        y_label="distinct ratio",
        height=300,
        width=460,
    )
    if not main:
        return (
            '<section id="curves"><h2>Learning curves</h2><p class="notice">No held-out evaluation or '
            "train pass rate recorded yet: the curves appear once a cycle has evaluated a candidate.</p>"
            "</section>"
        )
    figures = f'<figure class="wide">{main}</figure>' + (f"<figure>{diversity}</figure>" if diversity else "")
    return (
        '<section id="curves"><h2>Learning curves</h2>'
        '<p class="muted">Cycle 0 is the base version; each later cycle is one training run and the '
        "candidate it produced. Filled markers: promoted (or the base); hollow: rejected by the gate. "
        "Runs that produced no candidate leave a gap.</p>"
        f'<div class="plots">{figures}</div></section>'
    )


def _cycle_table(cycles: list[CycleResult]) -> str:
    rows = []
    for c in cycles:
        k_value, pass_at_k = _pass_at_k(_evaluated(c))
        k = f' <span class="muted">(k={k_value})</span>' if k_value else ""
        run = f'<div class="muted">run {c.run_id}</div>' if c.run_id is not None else ""
        pass_at_1 = _float(_evaluated(c).get("pass_at_1"))
        rows.append(
            f'<tr class="cycle status-{_e(c.status)}"><td class="num">{c.cycle}</td>'
            f"<td>{_e(_shown_version(c) or '-')}{run}</td><td>{_e(c.method)}</td>"
            f'<td class="num">{_e(_count(c.trajectories))}</td>'
            f'<td class="num">{_fmt(c.train_pass_rate)}</td><td class="num">{_fmt(pass_at_1)}</td>'
            f'<td class="num">{_fmt(pass_at_k)}{k if pass_at_k is not None else ""}</td>'
            f'<td><span class="badge {_e(c.status)}">{_e(c.status.replace("_", " "))}</span></td>'
            f'<td class="reason">{_e(c.reason)}</td></tr>'
        )
    head = ("cycle", "version", "method", "trajectories", "train pass rate", "held-out pass@1", "pass@k",
            "outcome", "reason")  # fmt: skip
    return _table_section("cycles", "Cycles", head, rows, css="cycles", scroll=True)


def _watch(store: Any, model: str | None) -> str:
    """The reward-hacking watch's flags (`honed.learn.watch`), when there are any."""
    from honed.learn.watch import divergences

    flags = divergences(store, model) if model else []
    if not flags:
        return ""
    items = "".join(f"<li>{_e(str(f))}</li>" for f in flags)
    return f'<section id="watch"><h2>Reward-hacking watch</h2><ul class="notice">{items}</ul></section>'


def _history(events: list[ModelEvent]) -> str:
    if not events:
        return ""
    rows = []
    for e in events:
        moved = f"v{e.from_version} → v{e.version}" if e.from_version else f"v{e.version}"
        rows.append(
            f'<tr><td class="nowrap">{_e(_when(e.created_at))}</td>'
            f'<td><span class="badge {_e(e.action)}">{_e(e.action)}</span></td>'
            f'<td class="nowrap">{_e(moved)}</td><td>{_e(e.actor)}</td><td class="reason">{_e(e.reason)}</td></tr>'
        )
    head = ("when", "change", "version", "by", "reason")
    return _table_section("history", "Version history", head, rows, scroll=True)


def _verifiers(counts: list[dict[str, Any]]) -> str:
    if not counts:
        return ""
    rows = (
        f'<tr><td>{_e(c["verifier"])}@{_e(c["version"])}</td><td class="num">{c["pass"]}</td>'
        f'<td class="num">{c["fail"]}</td><td class="num">{c["undecided"]}</td>'
        f'<td class="num">{c["total"]}</td></tr>'
        for c in counts
    )
    head = ("verifier", "pass", "fail", "undecided", "total")
    return _table_section("verifiers", "Verdicts per verifier", head, rows, css="compact")


def _table_section(
    section: str, title: str, head: Iterable[str], rows: Iterable[str], *, css: str = "", scroll: bool = False
) -> str:
    """A report section that is one table (in a box that scrolls sideways, when it may be wide)."""
    heads = "".join(f"<th>{h}</th>" for h in head)
    classes = f' class="{css}"' if css else ""
    table = f"<table{classes}><thead><tr>{heads}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    if scroll:
        table = f'<div class="scroll">{table}</div>'
    return f'<section id="{section}"><h2>{title}</h2>{table}</section>'


def _examples(trajectories: list[tuple[Trajectory, str]]) -> str:
    if not trajectories:
        return (
            '<section id="examples"><h2>Example trajectories</h2>'
            '<p class="notice">No labelled trajectories yet.</p></section>'
        )
    return (
        '<section id="examples"><h2>Example trajectories</h2>'
        '<p class="muted">Recent passing and failing runs, as captured.</p>'
        + "".join(_trajectory(t, outcome) for t, outcome in trajectories)
        + "</section>"
    )


def _trajectory(t: Trajectory, outcome: str) -> str:
    when = _when(t.started_at)
    head = " · ".join(
        x for x in (t.agent, t.task_id or "", t.split or "", t.model_version or "", when, t.id[-12:]) if x
    )
    steps = "".join(_step(s) for s in t.steps if s.kind != "node" or s.error)
    answer = (
        f'<div class="answer"><b>answer</b> <span class="text">{_e(_clip(t.answer))}</span></div>'
        if t.output is not None
        else '<div class="answer muted">no output</div>'
    )
    error = f'<div class="error">error: {_e(_clip(t.error or ""))}</div>' if t.status == "error" else ""
    verdicts = "".join(
        f'<li><span class="badge {_verdict_class(v)}">{_verdict_word(v)}</span> '
        f"<b>{_e(v.verifier)}@{_e(v.version)}</b> {_e(v.reason)}</li>"
        for v in t.verdicts
    )
    return (
        f'<details class="trajectory {outcome}" open><summary><span class="badge {outcome}">{outcome}</span> '
        f"{_e(head)}</summary>"
        f'<div class="task"><b>task</b> <span class="text">{_e(_clip(task_text(t.task)))}</span></div>'
        f'<ol class="steps">{steps}</ol>{answer}{error}<ul class="verdicts">{verdicts}</ul></details>'
    )


def _step(step: Step) -> str:
    error = f'<div class="error">error: {_e(_clip(step.error))}</div>' if step.error else ""
    if step.kind == "model":
        version = f" [{step.model_version}]" if step.model_version else ""
        parts = [f'<div class="who">model {_e(step.name + version)}</div>']
        if step.reasoning:
            parts.append(f'<div class="thinking text">{_e(_clip(step.reasoning))}</div>')
        output = step.output if isinstance(step.output, dict) else {}
        content = _content_text(output.get("content")) if output.get("content") else ""
        if content:
            parts.append(f'<div class="reply text">{_e(_clip(content))}</div>')
        for call in step.tool_calls or []:
            args = json.dumps(call.get("args"), ensure_ascii=False, default=str)
            parts.append(
                f'<div class="call">→ <b>{_e(str(call.get("name")))}</b>(<span class="text">{_e(_clip(args))}</span>)</div>'
            )
        return f'<li class="step model">{"".join(parts)}{error}</li>'
    if step.kind == "tool":
        args = json.dumps(step.input, ensure_ascii=False, default=str)
        result = (
            "" if step.error else f'<div class="result text">= {_e(_clip(_content_text(step.output)))}</div>'
        )
        return (
            f'<li class="step tool"><div class="who">tool <b>{_e(step.name)}</b>'
            f'(<span class="text">{_e(_clip(args))}</span>)</div>{result}{error}</li>'
        )
    return f'<li class="step node"><div class="who">node {_e(step.name)}</div>{error}</li>'


# -- the SVG line plot ---------------------------------------------------------------------------


def _line_plot(
    plot_id: str,
    title: str,
    cycles: list[CycleResult],
    series: list[tuple[str, str, Any, str]],
    *,
    y_label: str,
    width: int = 680,
    height: int = 300,
) -> str:
    """An inline SVG line chart over cycles: y from 0 to 1 (or the largest value), one path per
    series through the cycles that have a value, markers filled unless the cycle was rejected.
    Drawn by hand so the page needs no plotting library and no script; "" when nothing has a value."""
    left, right, top, bottom = 52, 14, 14 + 18 * math.ceil(len(series) / 2) + 18, 48
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    first, last = cycles[0].cycle or 0, cycles[-1].cycle or 0
    values = [v for c in cycles for _, _, get, _ in series if (v := get(c)) is not None]
    if not values:
        return ""
    y_max = max(1.0, *values)
    y_max = math.ceil(y_max * 5) / 5

    def sx(i: int) -> float:
        pad = 18
        return (
            (x0 + x1) / 2 if last == first else x0 + pad + (i - first) / (last - first) * (x1 - x0 - 2 * pad)
        )

    def sy(v: float) -> float:
        return y1 - max(0.0, min(v, y_max)) / y_max * (y1 - y0)

    out = [
        f'<svg class="plot" id="{plot_id}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{_e(title)}" xmlns="http://www.w3.org/2000/svg" '
        'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif" font-size="12">',
        f"<title>{_e(title)}</title>",
        f'<rect class="plot-area" x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="#fff"/>',
    ]
    steps = 5
    for n in range(steps + 1):
        v = y_max * n / steps
        y = sy(v)
        out.append(f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="{PALETTE["grid"]}"/>')
        out.append(
            f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{PALETTE["muted"]}">{v:.1f}</text>'
        )
    every = max(1, math.ceil(len(cycles) / 12))
    for c in cycles:
        x = sx(c.cycle or 0)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y1}" y2="{y1 + 4}" stroke="{PALETTE["muted"]}"/>')
        if (c.cycle or 0) % every == 0 or c is cycles[-1]:
            version = (_shown_version(c) or "-").rsplit("@", 1)[-1]
            out.append(
                f'<text x="{x:.1f}" y="{y1 + 16}" text-anchor="middle" fill="{PALETTE["text"]}">{c.cycle}</text>'
                f'<text x="{x:.1f}" y="{y1 + 29}" text-anchor="middle" fill="{PALETTE["muted"]}" '
                f'font-size="10">{_e(version)}</text>'
            )
    out.append(
        f'<line x1="{x0}" x2="{x1}" y1="{y1}" y2="{y1}" stroke="{PALETTE["muted"]}"/>'
        f'<text x="{(x0 + x1) / 2:.1f}" y="{height - 4}" text-anchor="middle" fill="{PALETTE["text"]}">'
        "cycle (version evaluated)</text>"
        f'<text transform="translate(13 {(y0 + y1) / 2:.1f}) rotate(-90)" text-anchor="middle" '
        f'fill="{PALETTE["text"]}">{_e(y_label)}</text>'
    )
    for key, label, get, dash in series:
        color = PALETTE[key]
        points = [(c, v) for c in cycles if (v := get(c)) is not None]
        if len(points) > 1:
            d = " ".join(
                f"{'M' if i == 0 else 'L'}{sx(c.cycle or 0):.1f} {sy(v):.1f}"
                for i, (c, v) in enumerate(points)
            )
            dashes = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(
                f'<path class="series" data-series="{key}" d="{d}" fill="none" stroke="{color}" '
                f'stroke-width="2.5" stroke-linejoin="round"{dashes}/>'
            )
        for c, v in points:
            hollow = c.status == "rejected"
            fill = "#fff" if hollow else color
            tip = f"cycle {c.cycle} · {_shown_version(c) or '-'} · {c.status} · {label} {v:.3f}"
            out.append(
                f'<circle class="marker" data-series="{key}" data-status="{_e(c.status)}" cx="{sx(c.cycle or 0):.1f}" '
                f'cy="{sy(v):.1f}" r="4.5" fill="{fill}" stroke="{color}" stroke-width="2"><title>{_e(tip)}</title></circle>'
            )
    out.append(_legend(series, x0, width - right))
    out.append("</svg>")
    return "".join(out)


def _legend(series: list[tuple[str, str, Any, str]], x0: int, x_end: int) -> str:
    """Two series per row above the plot, then the marker key."""
    parts, col = [], (x_end - x0) / 2
    for n, (key, label, _, dash) in enumerate(series):
        x, y = x0 + (n % 2) * col, 14 + 18 * (n // 2)
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(
            f'<g class="legend" data-series="{key}"><line x1="{x:.1f}" x2="{x + 26:.1f}" y1="{y - 4}" y2="{y - 4}" '
            f'stroke="{PALETTE[key]}" stroke-width="2.5"{dashes}/>'
            f'<text x="{x + 32:.1f}" y="{y}" fill="{PALETTE["text"]}">{_e(label)}</text></g>'
        )
    y = 14 + 18 * math.ceil(len(series) / 2)
    muted = PALETTE["muted"]
    parts.append(
        f'<g class="legend-key"><circle cx="{x0 + 5}" cy="{y - 4}" r="4" fill="{muted}" stroke="{muted}" stroke-width="2"/>'
        f'<text x="{x0 + 14}" y="{y}" fill="{muted}">promoted / base</text>'
        f'<circle cx="{x0 + 125}" cy="{y - 4}" r="4" fill="#fff" stroke="{muted}" stroke-width="2"/>'
        f'<text x="{x0 + 134}" y="{y}" fill="{muted}">rejected</text></g>'
    )
    return "".join(parts)


# -- text helpers --------------------------------------------------------------------------------


def _e(value: Any) -> str:
    """Escape for HTML text and attribute values alike."""
    return html.escape(str(value), quote=True)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _clip(text: str | None, limit: int = _CLIP) -> str:
    text = text or ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _content_text(value: Any) -> str:
    """Message content as text: a string, or the text blocks of a content list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(b, dict) for b in value):
        texts = [b.get("text") for b in value if isinstance(b.get("text"), str)]
        if texts:
            return "\n".join(texts)
    return json.dumps(value, ensure_ascii=False, default=str)


def _verdict_class(v: Verdict) -> str:
    return {True: "pass", False: "fail"}.get(v.passed, "unknown")  # type: ignore[arg-type]


def _verdict_word(v: Verdict) -> str:
    return {True: "pass", False: "fail"}.get(v.passed, "undecided")  # type: ignore[arg-type]


_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<main>
{body}
<footer class="muted">Written by <code>honed report</code> from the store; rebuild it any time.</footer>
</main>
</body>
</html>
"""

_CSS = """
:root { color-scheme: light; }
body { margin: 0; background: #f9fafb; color: #1f2937;
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 1160px; margin: 0 auto; padding: 24px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 32px 0 8px; }
.muted { color: #6b7280; } code { font-size: 13px; background: #f3f4f6; padding: 1px 4px; border-radius: 3px; }
.notice { background: #fffbeb; border: 1px solid #fde68a; padding: 10px 14px; border-radius: 6px; }
.stats { display: grid; grid-template-columns: repeat(auto-fit, minmax(200px, 1fr)); gap: 12px; margin: 16px 0; }
.stat { background: #fff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 10px 14px; }
.stat dt { color: #6b7280; font-size: 12px; } .stat dd { margin: 0; font-size: 18px; font-weight: 600; }
.plots { display: grid; grid-template-columns: 3fr 2fr; gap: 16px; }
@media (max-width: 900px) { .plots { grid-template-columns: 1fr; } }
figure { margin: 0; background: #fff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 8px; }
svg.plot { width: 100%; height: auto; display: block; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid #e5e7eb; }
th, td { text-align: left; vertical-align: top; padding: 6px 10px; border-bottom: 1px solid #e5e7eb; }
th { background: #f3f4f6; font-weight: 600; font-size: 13px; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.reason { min-width: 280px; } .nowrap, .cycles td:nth-child(2) { white-space: nowrap; }
table.compact { width: auto; }
.badge { display: inline-block; padding: 0 8px; border-radius: 10px; font-size: 12px; background: #f3f4f6;
  white-space: nowrap; }
.badge.promoted, .badge.promote, .badge.pass, .badge.live { background: #dcfce7; color: #166534; }
.badge.rejected, .badge.reject, .badge.rollback, .badge.fail, .badge.failed { background: #fee2e2; color: #991b1b; }
.badge.nothing_to_learn, .badge.interrupted, .badge.unknown { background: #fef3c7; color: #92400e; }
.badge.base, .badge.register, .badge.running { background: #e0e7ff; color: #3730a3; }
details.trajectory { background: #fff; border: 1px solid #e5e7eb; border-left: 4px solid #9ca3af;
  border-radius: 6px; margin: 12px 0; padding: 8px 14px; }
details.trajectory.pass { border-left-color: #16a34a; } details.trajectory.fail { border-left-color: #dc2626; }
summary { cursor: pointer; font-weight: 600; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, Menlo, Consolas, monospace;
  font-size: 13px; }
.steps { margin: 8px 0; padding-left: 22px; } .step { margin: 4px 0; }
.step .who { color: #6b7280; } .step.model .who { color: #7c3aed; } .step.tool .who { color: #b45309; }
.thinking { color: #6b7280; font-style: italic; } .reply, .result, .call { margin-left: 12px; }
.error { color: #b91c1c; } .verdicts { list-style: none; padding: 0; margin: 6px 0 0; }
footer { margin: 40px 0 8px; font-size: 12px; }
"""
