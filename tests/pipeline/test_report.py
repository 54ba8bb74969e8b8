"""`distill-pipeline report`: the run report of a real (tiny ADPA) run, rendered in headless Chromium —
it renders, its tables hold the numbers of results.json and the cache's own statistics, the console
stays silent — plus the command's errors. The browser checks skip where Debian's chromium is absent
(`.ci/run` installs it)."""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill_pipeline.cli.main import app
from distill_pipeline.pipeline.report import Folder, collect, render, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium; .ci/run "
    "installs it): the report is checked in a real headless browser")


def headless(page: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Chromium, headless, on a file: (the process, the console messages it logged). Bounded: 60 s."""
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args, page.as_uri()],
            capture_output=True, text=True, timeout=60)
    return proc, [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


class Tables(HTMLParser):
    """Tables by id → rows → cells (the cell's attributes and text); svg elements by tag."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[dict]]] = {}
        self.elements: list[tuple[str, dict]] = []
        self._table: list | None = None
        self._cell: dict | None = None
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"table{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = {**attrs, "text": ""}
            self._table[-1].append(self._cell)
        self._in_title = tag == "title" and not self.title

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th"):
            self._cell = None
        self._in_title = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data
        if self._in_title:
            self.title += data


def parse(text: str) -> Tables:
    p = Tables()
    p.feed(text)
    return p


def check_evaluate_tables(dom: Tables, plan) -> None:
    """Every number of results.json is in the evaluate and win-rate tables, in its model's row."""
    folder = plan.folder("evaluate")
    results = json.loads((folder / "results.json").read_text())
    for kind in ("evaluate", "winrates"):
        rows = {r[0]["text"]: r for r in dom.tables[f"{kind}-{folder.name}"][1:]}
        assert len(rows) == len(results)
        for role, row in zip(results, rows.values()):
            cells = {c["data-metric"]: c for c in row if "data-metric" in c}
            metrics = [m for m in results[role] if kind == "evaluate" or m.endswith("win_rate")]
            assert set(cells) == set(metrics), (role, set(cells), metrics)
            for metric in metrics:
                value = results[role][metric]
                shown = str(value) if isinstance(value, int) else f"{value:.4f}"
                assert cells[metric]["text"] == shown, (role, metric)
                assert float(cells[metric]["data-value"]) == value


@pytest.fixture(scope="module")
def page(adpa_run, tmp_path_factory) -> Path:
    return write_report(adpa_run.run_dir, tmp_path_factory.mktemp("report") / "report.html")


@needs_chromium
def test_report_renders_in_headless_chromium_with_the_run_numbers(adpa_run, page):
    proc, console = headless(page, "--dump-dom")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert console == []  # no script error, no blocked fetch (the page's CSP would log one)
    dom = parse(proc.stdout)  # the DOM after the browser loaded and laid out the page
    assert dom.title.startswith("run — distill-pipeline report")
    check_evaluate_tables(dom, adpa_run)
    # the graph: one box per node, with its fingerprint
    boxes = [a["data-folder"] for tag, a in dom.elements if tag == "g" and "data-folder" in a]
    assert sorted(boxes) == sorted(adpa_run.folder(n.name).name for n in adpa_run.nodes)
    # one loss curve per training node, one point per metrics.jsonl row
    for node in ("sft.teacher", "sft.student", "teacher_dpo", "train"):
        folder = adpa_run.folder(node)
        svg = [a for tag, a in dom.elements if tag == "svg" and a.get("id") == f"curve-{folder.name}"]
        line = next(a for tag, a in dom.elements[dom.elements.index(("svg", svg[0])):]
                    if tag == "polyline")
        steps = (folder / "metrics.jsonl").read_text().splitlines()
        assert line["data-series"] == "loss" and len(line["points"].split()) == len(steps)
    # cache statistics: the extraction's hit rate, and what `cache info` says of its store
    from distill_pipeline.cache.admin import info
    from distill_pipeline.cache.store import Store

    row = {c.get("data-metric"): c for c in dom.tables["cache-stats"][1]}
    summary = json.loads((adpa_run.folder("teacher_logits.rollouts") / "manifest.json").read_text())["summary"]
    assert float(row["hit_rate"]["data-value"]) == summary["cached"] / summary["entries"]
    assert row["entries"]["text"] == str(summary["entries"])
    whole = info(Store(adpa_run.cfg.teacher_logits.store, create=False))  # this run's entries only
    cells = [c["text"] for c in dom.tables["cache-stats"][1]]
    header = [c["text"] for c in dom.tables["cache-stats"][0]]
    assert cells[header.index("bytes/token")] == str(whole["bytes_per_token"])
    assert cells[header.index("mean k")] == str(whole["mean_k"])
    assert cells[header.index("storage KL")] == str(whole["reconstruction_kl"])


@needs_chromium
def test_report_paints_something(page, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    proc, console = headless(page, "--window-size=1280,1600", f"--screenshot={shot}")
    assert proc.returncode == 0 and console == [], proc.stderr[-2000:]
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, boxes and curves, not a blank page


@needs_chromium
def test_console_check_catches_errors_and_blocked_fetches(tmp_path):
    """The console check can fail: a script error and a fetch the report's CSP blocks are seen."""
    from distill_pipeline.pipeline.report import CSP

    bad = tmp_path / "bad.html"
    bad.write_text(f"<!DOCTYPE html><html><head><meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
                   "</head><body><img src='https://example.invalid/x.png'>"
                   "<p>hi</p></body></html>")
    _, console = headless(bad, "--dump-dom")
    assert any("Content Security Policy" in line for line in console), console
    bad.write_text("<!DOCTYPE html><html><body><script>undefined_function()</script></body></html>")
    _, console = headless(bad, "--dump-dom")
    assert any("undefined_function is not defined" in line for line in console), console


def test_report_is_self_contained_and_holds_the_numbers(adpa_run, page):
    """Without a browser: the page's own text, parsed — no script, nothing fetched, the numbers."""
    text = page.read_text()
    assert "<script" not in text
    dom = parse(text)
    fetched = [(tag, v) for tag, a in dom.elements for k, v in a.items()
               if k in ("src", "href") and not v.startswith(("#", "data:"))]
    assert fetched == []
    check_evaluate_tables(dom, adpa_run)


def test_superseded_folders_are_marked_and_left_out_of_the_graph(adpa_run, tmp_path):
    """A folder no lineage's last state points at is listed as superseded, not drawn."""
    run = collect(adpa_run.run_dir)
    rollouts = run.by_name()[adpa_run.folder("rollouts").name]
    run.folders.append(Folder(tmp_path / "rollouts-000000000000",
                              {**rollouts.manifest, "fingerprint": "0" * 64}, latest=False))
    dom = parse(render(run))
    boxes = [a["data-folder"] for tag, a in dom.elements if tag == "g" and "data-folder" in a]
    assert "rollouts-000000000000" not in boxes and adpa_run.folder("rollouts").name in boxes
    rows = {r[0]["text"] for r in dom.tables["nodes"][1:]}
    assert "rollouts-000000000000 (superseded)" in rows


def test_report_command_default_out_and_errors(adpa_run, tmp_path):
    runner = CliRunner()
    out = runner.invoke(app, ["report", str(adpa_run.run_dir)])
    assert out.exit_code == 0, out.output
    assert (adpa_run.run_dir / "report.html").is_file() and "wrote" in out.output

    missing = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    assert "give the run_dir of a config" in missing.output
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert empty.exit_code == 2 and "holds no published node folders" in empty.output
    config = tmp_path / "c.yaml"
    config.write_text("run_dir: runs/x\n")
    as_file = runner.invoke(app, ["report", str(config)])
    assert as_file.exit_code == 2 and "is a file, not a run dir" in as_file.output
    blocked = tmp_path / "file"
    blocked.write_text("")
    unwritable = runner.invoke(app, ["report", str(adpa_run.run_dir), "--out", str(blocked / "r.html")])
    assert unwritable.exit_code == 2 and "cannot write" in unwritable.output
