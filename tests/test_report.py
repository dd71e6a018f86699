"""The learning report: its content from a real store, its escaping, `honed report`, and its plots
rendered by a real headless Chromium (layout and hit-testing through the DOM; pixels when Pillow is there)."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import honed
from honed import Step, Trajectory, Verdict
from honed.cli import app
from honed.report import PALETTE, build_report
from test_registry import fake_model

MODEL = "calc-agent"
GATE_OK = "held-out pass@1 0.300 -> 0.420 (+0.120 over 20 tasks, 95% lower bound +0.050)"
GATE_NO = (
    "held-out pass@1 0.420 -> 0.400 (-0.020 over 20 tasks, 95% lower bound -0.090): the gain is below "
    "the margin +0.020; output diversity collapsed: distinct_answers 0.800 -> 0.300 (below 50% of the "
    "live version's)"
)
GATE_OK_3 = "held-out pass@1 0.420 -> 0.550 (+0.130 over 20 tasks, 95% lower bound +0.060)"
EVIL = "<script>alert('pwned')</script> the sum is 6"
# (method, trajectories, train pass rate, candidate pass@1, pass@8, diversity, promoted?, gate reason)
CYCLES = [
    ("sft", 120, 0.30, 0.42, 0.70, (0.80, 0.70), True, GATE_OK),
    ("kto", 150, 0.45, 0.40, 0.72, (0.30, 0.65), False, GATE_NO),
    ("sft", 180, 0.48, 0.55, 0.81, (0.75, 0.72), True, GATE_OK_3),
]
runner = CliRunner(env={"COLUMNS": "300"})


def heldout(pass1: float, pass8: float, diversity: tuple[float, float]) -> dict[str, Any]:
    """Metrics as `honed.learn.evaluate.Scores.to_dict` writes them."""
    answers, calls = diversity
    return {
        "pass_at_1": pass1,
        "pass_at_8": pass8,
        "samples": 8,
        "tasks": 20,
        "slices": {"all": pass1},
        "diversity": {"distinct_answers": answers, "distinct_tool_calls": calls, "mean_length": 12.0},
    }


def trajectory(i: int, *, reply: str, answer: str, version: str) -> Trajectory:
    start = datetime.now(UTC) - timedelta(minutes=10 - i)
    steps = [
        Step(id=f"s{i}-0", index=0, kind="model", name="qwen", model_version=version,
             output={"role": "assistant", "content": ""}, tool_calls=[{"name": "add", "args": {"a": 2, "b": 3}, "id": "c1"}],
             started_at=start, ended_at=start + timedelta(seconds=1)),
        Step(id=f"s{i}-1", index=1, kind="tool", name="add", input={"a": 2, "b": 3}, output="5",
             started_at=start + timedelta(seconds=1), ended_at=start + timedelta(seconds=2)),
        Step(id=f"s{i}-2", index=2, kind="model", name="qwen", model_version=version,
             output={"role": "assistant", "content": reply}, started_at=start + timedelta(seconds=2),
             ended_at=start + timedelta(seconds=3)),
    ]  # fmt: skip
    return Trajectory(
        id=f"t{i}", agent="calc", task={"messages": [{"role": "user", "content": f"what is 2 + 3? (#{i})"}]},
        task_id=f"add-{i}", split="train", steps=steps, output=answer, started_at=start,
        ended_at=start + timedelta(seconds=3), model_version=version,
    )  # fmt: skip


def populate(url: str, models: Path) -> None:
    """Three training cycles of `calc-agent` through the public store API, the way `Cycle` records
    them, plus captured trajectories with verdicts (one whose reply tries to inject a script)."""
    with honed.open_store(url) as store:
        base = store.register_model(MODEL, fake_model(models / "v1"), reason="the base model", actor="alice")
        store.promote(MODEL, base.version, reason="start serving the base model", actor="alice")
        store.record_eval(MODEL, base.ref, "heldout", heldout(0.30, 0.55, (0.80, 0.70)))
        live = base
        for n, (method, count, rate, p1, p8, div, promoted, reason) in enumerate(CYCLES, start=1):
            run = store.start_training_run(
                MODEL, method, parent=live.ref, config={"method": {"name": method}}
            )
            passed = round(count * rate)
            data = {"trajectories": count, "passed": passed, "failed": count - passed, "rows": passed}
            store.update_training_run(run.id, data={**data, "train_pass_rate": rate})
            candidate = store.register_model(
                MODEL, fake_model(models / f"v{n + 1}"), parent=live, training_run=run.id,
                reason=f"training run {run.id} ({method})", actor="trainer",
            )  # fmt: skip
            store.update_training_run(
                run.id, candidate=candidate.ref, metrics={"train_loss": 0.5, "tokens": 9000}
            )
            store.record_eval(MODEL, candidate.ref, "heldout", heldout(p1, p8, div), training_run=run.id)
            gate = {"promote": promoted, "reason": reason, "gain": 0.1, "lower_bound": 0.05}
            store.update_training_run(run.id, metrics={"gate": gate, "heldout": heldout(p1, p8, div)})
            if promoted:
                store.promote(
                    MODEL, candidate.version, expected_live=live.version, reason=reason, actor="trainer"
                )
                live = candidate
            else:
                store.reject(MODEL, candidate.version, reason=reason, actor="trainer")
            store.update_training_run(run.id, status="promoted" if promoted else "rejected", reason=reason)
        store.save(trajectory(1, reply="the sum is 5", answer="5", version="calc-agent@v4"))
        store.save(trajectory(2, reply=EVIL, answer="6", version="calc-agent@v4"))
        store.add_verdict("t1", Verdict(passed=True, score=1.0, verifier="reference", reason="5 == 5"))
        store.add_verdict(
            "t2", Verdict(passed=False, verifier="reference", reason="expected 5, got <b>6</b>")
        )


class Cells(HTMLParser):
    """The text of each cell of the tables, row by row: what a reader sees, not the markup."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def table_rows(page: str) -> list[list[str]]:
    parser = Cells()
    parser.feed(page)
    return parser.rows


def test_report_shows_cycles_reasons_history_and_escaped_trajectories(
    sqlite_url: str, tmp_path: Path
) -> None:
    populate(sqlite_url, tmp_path / "models")
    with honed.open_store(sqlite_url) as store:
        path = build_report(store, path=tmp_path / "out" / "report.html")
    page = path.read_text()
    rows = table_rows(page)
    cycles = [r for r in rows if len(r) == 9 and r[0].isdigit()]
    assert [r[0] for r in cycles] == ["0", "1", "2", "3"]
    assert cycles[0][1:3] == ["calc-agent@v1", "base"] and cycles[0][5:7] == ["0.300", "0.550 (k=8)"]
    assert [r[2:8] for r in cycles[1:]] == [
        ["sft", "120", "0.300", "0.420", "0.700 (k=8)", "promoted"],
        ["kto", "150", "0.450", "0.400", "0.720 (k=8)", "rejected"],
        ["sft", "180", "0.480", "0.550", "0.810 (k=8)", "promoted"],
    ]
    assert [r[8] for r in cycles[1:]] == [GATE_OK, GATE_NO, GATE_OK_3]  # the gate's reasons, in full
    # the header: live version, its held-out pass@1, cycles, trajectories
    assert "calc-agent@v4" in page and ">0.550<" in page and "3 (2 promoted, 1 rejected)" in page
    # version history, with actor and reason
    history = [r for r in rows if len(r) == 5 and r[1] in ("register", "promote", "reject")]
    assert [r[1:3] for r in history[:3]] == [["register", "v1"], ["promote", "v1"], ["register", "v2"]]
    assert ["promote", "v1 → v2", "trainer", GATE_OK] in [r[1:] for r in history]
    assert ["reject", "v3", "trainer", GATE_NO] in [r[1:] for r in history]
    assert ["promote", "v1", "alice", "start serving the base model"] in [r[1:] for r in history]
    # model output is text, never markup: the page has no script at all
    assert "<script" not in page.lower() and html.escape(EVIL) in page
    assert "expected 5, got &lt;b&gt;6&lt;/b&gt;" in page and "what is 2 + 3? (#2)" in page
    assert 'add</b>(<span class="text">{&quot;a&quot;: 2, &quot;b&quot;: 3}' in page  # tool call and args
    assert '<div class="result text">= 5</div>' in page
    assert 'class="trajectory pass"' in page and 'class="trajectory fail"' in page
    # no network: nothing is loaded from anywhere
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page


def test_a_store_without_training_still_gives_a_page(sqlite_url: str, tmp_path: Path) -> None:
    with honed.open_store(sqlite_url) as store:
        empty = build_report(store, path=tmp_path / "empty.html").read_text()
        assert "No model is registered in this store yet" in empty and "<svg" not in empty
        base = store.register_model(MODEL, fake_model(tmp_path / "v1"))
        store.promote(MODEL, base.version, reason="first")
        page = build_report(store, path=tmp_path / "base.html").read_text()
    assert "No training runs yet for calc-agent" in page and "calc-agent@v1" in page
    assert "not evaluated" in page and "<svg" not in page and "No labelled trajectories yet" in page
    # A round that measured nothing (its attempts went to another store) is no 0.0% score (a QA
    # pass, session 19: the report and `honed status` showed one).
    with honed.open_store(sqlite_url) as store:
        store.record_eval(MODEL, base.ref, "heldout", {"pass_at_1": 0.0, "trajectories": 0, "unjudged": 2})
        page = build_report(store, path=tmp_path / "unmeasured.html").read_text()
    assert "not evaluated" in page and "<svg" not in page
    status = CliRunner().invoke(app, ["status", MODEL, "--store", sqlite_url, "--json"])
    assert json.loads(status.output)["models"][0]["live_heldout_pass_at_1"] is None, status.output
    with honed.open_store(sqlite_url) as store:
        run = store.start_training_run(MODEL, "sft", parent=base.ref, config={})
        store.update_training_run(
            run.id, status="nothing_to_learn", reason="NOTHING TO LEARN: 0 verified passes"
        )
        page = build_report(store, path=tmp_path / "idle.html").read_text()
    assert "No held-out evaluation or train pass rate recorded yet" in page and "<svg" not in page
    cycle = next(r for r in table_rows(page) if r[:1] == ["1"])
    assert cycle[7:] == ["nothing to learn", "NOTHING TO LEARN: 0 verified passes"]


def test_cli_writes_the_report(sqlite_url: str, tmp_path: Path) -> None:
    populate(sqlite_url, tmp_path / "models")
    out = tmp_path / "r.html"
    result = runner.invoke(app, ["report", "--store", sqlite_url, "--out", str(out), "--model", MODEL])
    assert result.exit_code == 0, result.output
    assert "report written to" in result.output and str(out) in result.output
    assert out.read_text().count('class="cycle ') == 4
    result = runner.invoke(app, ["report", "--help"])
    assert result.exit_code == 0 and "--model" in result.output and "--out" in result.output
    # A mistyped model name is an error, not an empty page written over the last good one.
    typo = runner.invoke(app, ["report", "--store", sqlite_url, "--out", str(out), "--model", MODEL + "x"])
    assert typo.exit_code == 1 and f"{MODEL}x has no model versions" in typo.output and MODEL in typo.output
    assert out.read_text().count('class="cycle ') == 4


# -- a real browser ------------------------------------------------------------------------------

# Runs in the page after layout: each plot's size, each line's length and colour, and what the
# browser hit-tests at points along the line (the line itself, unless something covers it). It runs
# on a copy: the report itself has no script.
PROBE = """<script>
const found = [];
for (const svg of document.querySelectorAll("svg.plot")) {
  const box = svg.getBoundingClientRect(), area = svg.querySelector("rect.plot-area").getBoundingClientRect();
  const series = [...svg.querySelectorAll("path.series")].map((p) => {
    const length = p.getTotalLength(), ctm = p.getScreenCTM(), r = p.getBoundingClientRect();
    const stroke = getComputedStyle(p).stroke;
    p.style.strokeDasharray = "none";  // hit-testing of dashes is unreliable; coverage is the question
    let hits = 0;
    for (let i = 1; i < 40; i++) {
      const at = p.getPointAtLength((length * i) / 40).matrixTransform(ctm);
      const el = document.elementFromPoint(at.x, at.y);
      if (el && el.dataset.series === p.dataset.series) hits++;
    }
    return {key: p.dataset.series, stroke, length, width: r.width, height: r.height, hits};
  });
  found.push({id: svg.id, width: box.width, height: box.height, series,
    area: [area.left + scrollX, area.top + scrollY, area.width, area.height],
    markers: svg.querySelectorAll("circle.marker").length,
    hollow: svg.querySelectorAll("circle.marker[data-status=rejected]").length});
}
const pre = document.createElement("pre");
pre.id = "probe";
pre.textContent = JSON.stringify(found);
document.body.appendChild(pre);
</script>"""
WINDOW = (1280, 1400)


def chromium() -> str | None:
    return next(
        (p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None
    )


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The report of a three-cycle store, with the probe appended, and the browser's findings."""
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH: `make browser` installs Debian's chromium")
    tmp = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{tmp / 'honed.db'}"
    populate(url, tmp / "models")
    with honed.open_store(url) as store:
        page = build_report(store, path=tmp / "report.html").read_text()
    probe = tmp / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = run_chromium(browser, tmp, "--dump-dom", probe)
    start = dom.index('<pre id="probe">') + len('<pre id="probe">')
    plots = json.loads(html.unescape(dom[start : dom.index("</pre>", start)]))
    return {"browser": browser, "tmp": tmp, "probe": probe, "plots": {p["id"]: p for p in plots}}


def run_chromium(browser: str, tmp: Path, *args: Any) -> str:
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
        "--force-device-scale-factor=1", f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--user-data-dir={tmp / 'chromium-profile'}", *args[:-1], args[-1].as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def test_plots_render_in_a_real_browser(probed: dict[str, Any]) -> None:
    plots = probed["plots"]
    assert set(plots) == {"plot-heldout", "plot-diversity"}
    expected = {
        "plot-heldout": ["pass_at_1", "pass_at_k", "train_pass_rate"],
        "plot-diversity": ["distinct_answers", "distinct_tool_calls"],
    }
    for plot_id, keys in expected.items():
        plot = plots[plot_id]
        assert plot["width"] > 300 and plot["height"] > 150, plot
        assert [s["key"] for s in plot["series"]] == keys
        for s in plot["series"]:
            assert s["length"] > 100 and s["width"] > 100 and s["height"] > 10, s
            assert s["stroke"] == _rgb(PALETTE[s["key"]]), s
            assert s["hits"] >= 10, f"{plot_id}/{s['key']}: the line is hidden where it is drawn ({s})"
    # 4 held-out points (base + 3 candidates) for pass@1 and pass@k, 3 train rates; the rejected
    # cycle's marker is hollow on every line
    assert plots["plot-heldout"]["markers"] == 4 + 4 + 3 and plots["plot-heldout"]["hollow"] == 3
    assert plots["plot-diversity"]["markers"] == 8 and plots["plot-diversity"]["hollow"] == 2


def test_screenshot_shows_the_plot_lines(probed: dict[str, Any]) -> None:
    image_module = pytest.importorskip(
        "PIL.Image", reason="the pixel check needs Pillow (pip install pillow)"
    )
    shot = probed["tmp"] / "shot.png"
    run_chromium(probed["browser"], probed["tmp"], f"--screenshot={shot}", probed["probe"])
    image = image_module.open(shot).convert("RGB")
    assert image.size == WINDOW
    for plot_id, own, other in (
        ("plot-heldout", ("pass_at_1", "pass_at_k", "train_pass_rate"), "distinct_answers"),
        ("plot-diversity", ("distinct_answers", "distinct_tool_calls"), "pass_at_1"),
    ):
        x, y, w, h = probed["plots"][plot_id]["area"]
        assert y + h < WINDOW[1], "the plot is below the screenshot: make the window taller"
        raw = image.crop((round(x), round(y), round(x + w), round(y + h))).tobytes()
        pixels = [tuple(raw[i : i + 3]) for i in range(0, len(raw), 3)]
        for key in own:
            assert _near(pixels, PALETTE[key]) > 150, f"{plot_id}: too few {key} pixels"
        assert _near(pixels, PALETTE[other]) == 0  # the count tells the lines apart


def _rgb(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


def _near(pixels: list[tuple[int, int, int]], hex_colour: str, tolerance: int = 24) -> int:
    target = tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return sum(1 for p in pixels if all(abs(a - b) <= tolerance for a, b in zip(p, target, strict=True)))


def test_a_cycle_that_made_no_attempts_has_no_train_pass_rate() -> None:
    """A QA pass (session 23): a distillation (it learns from a teacher's runs, none of its own)
    read a train pass rate of 1.000 from its selection's passes alone, beside 0 trajectories."""
    from honed.learn.cycle import CycleResult

    distilled = CycleResult(
        "promoted", "", data={"train_pass_rate": None, "trajectories": 0, "passed": 4, "failed": 0}
    )
    assert distilled.train_pass_rate is None
    older = CycleResult("promoted", "", data={"passed": 3, "failed": 1})  # a record from before the field
    assert older.train_pass_rate == 0.75
