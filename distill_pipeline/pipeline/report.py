"""`distill-pipeline report RUN_DIR [--out FILE.html]`: one self-contained HTML page telling a run
dir's story, from what the run dir records — nothing is recomputed, no model is loaded.

- the graph of nodes (inline SVG): every node lineage's last published folder (`.state/`) and the
  folders it read, with fingerprints and timings; below it, every published folder in a table
  (older fingerprints marked superseded) and any partial output;
- each training node's curves (`metrics.jsonl`: loss by step; `validation.jsonl`), inline SVG;
- every evaluate node's table (`results.json`) and its win rates against the SFT student;
- the teacher-logit cache: per extraction node, entries and the share found already cached (its
  manifest), bytes per token, mean k and storage KL of the segments holding its entries
  (`cache.node.node_stats`: segment manifests, no log-prob decoded).

The page has no script and fetches nothing: CSS and SVG are inline, and its Content-Security-Policy
(`default-src 'none'`) makes a browser refuse any fetch a later change might add.
`tests/pipeline/test_report.py` renders it in headless Chromium.
"""
from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill_pipeline.metrics import METRICS, SCORES
from distill_pipeline.stages import STAGE_NAMES

MANIFEST = "manifest.json"  # the runner's name for it (runner.MANIFEST)
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


class ReportError(ValueError):
    """The path is not a run dir, or the report cannot be written."""


@dataclass
class Folder:
    """One published node folder, as its manifest.json records it."""
    path: Path
    manifest: dict
    latest: bool = False  # the last published folder of its lineage (.state/)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def node(self) -> str:
        return self.manifest["node"]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def seconds(self) -> float | None:
        return self.manifest.get("timings", {}).get("seconds")

    @property
    def finished(self) -> float:
        return self.manifest.get("timings", {}).get("finished") or 0.0


@dataclass
class Run:
    run_dir: Path
    folders: list[Folder]
    partial: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, Folder]:
        return {f.name: f for f in self.folders}

    def graph(self) -> list[Folder]:
        """The latest folder of every lineage and, transitively, the folders they read."""
        names = self.by_name()
        keep = {f.name for f in self.folders if f.latest}
        todo = list(keep)
        while todo:
            for inp in names[todo.pop()].manifest.get("inputs", {}).values():
                up = Path(inp.get("path", "")).name
                if up in names and up not in keep:
                    keep.add(up)
                    todo.append(up)
        return [f for f in self.folders if f.name in keep]


def collect(run_dir: str | Path) -> Run:
    """Read a run dir's published folders; a path that is not a run dir is a ReportError."""
    d = Path(run_dir).expanduser()
    hint = "give the run_dir of a config (its `run_dir:` value, e.g. runs/quickstart)"
    if not d.exists():
        raise ReportError(f"{d} does not exist; {hint}")
    if not d.is_dir():
        raise ReportError(f"{d} is a file, not a run dir; {hint}")
    run = Run(d.resolve(), [])
    for m in sorted(d.glob(f"*/{MANIFEST}")):
        if m.parent.name.startswith("."):
            continue
        try:
            manifest = json.loads(m.read_text())
            manifest["node"], manifest["stage"], manifest["fingerprint"]  # noqa: B018 - required
        except (OSError, ValueError, KeyError, TypeError) as exc:
            run.problems.append(f"{m}: unreadable ({type(exc).__name__}: {exc}); left out")
            continue
        if manifest["stage"] in STAGE_NAMES:
            run.folders.append(Folder(m.parent, manifest))
    if not run.folders:
        raise ReportError(f"{d} holds no published node folders (<node>-<fingerprint>/{MANIFEST}): "
                          f"not a run dir, or nothing has finished in it yet; {hint}, after "
                          "`distill-pipeline run`")
    latest = set()
    for state in d.glob(".state/*/*.json"):
        try:
            latest.add(json.loads(state.read_text())["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError):
            run.problems.append(f"{state}: unreadable; which folders are the latest may be wrong")
    for f in run.folders:
        f.latest = f.fingerprint in latest or not latest  # no .state/: every folder counts
    run.folders.sort(key=lambda f: (f.manifest.get("timings", {}).get("started") or 0, f.name))
    partial = d / ".partial"
    run.partial = sorted(p.name for p in partial.iterdir()) if partial.is_dir() else []
    return run


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of `run_dir` to `out` (default `<run_dir>/report.html`); returns its path."""
    run = collect(run_dir)
    path = Path(out).expanduser() if out else run.run_dir / "report.html"
    page = render(run)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc.strerror or exc}; pass --out with a writable "
                          "path") from None
    return path


# ---------------------------------------------------------------------------- the page

def e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + " UTC" if t else "—"


def _label(f: Folder) -> str:
    """A training folder as people name it: its node, and for `train*` its method."""
    if f.stage != "train":
        return f.node
    from distill_pipeline.pipeline.compare import method_label as method

    try:
        return f"{f.node} ({method(f.path)})"
    except (OSError, KeyError, ValueError):
        return f.node


STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}.muted{color:#666}code,.fp{font-family:ui-monospace,monospace;font-size:12px}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f4f4f4}
td.fp{word-break:break-all;max-width:190px}.graph{overflow-x:auto}
tr.superseded{color:#888}.problem{color:#a00}.charts{display:flex;flex-wrap:wrap;gap:12px}
svg text{font-family:system-ui,sans-serif}
"""
STAGE_COLOURS = {"sft": "#dbeafe", "teacher_dpo": "#fde68a", "rollouts": "#e9d5ff",
                 "teacher_logits": "#fecaca", "train": "#bbf7d0", "evaluate": "#e5e7eb",
                 "import_model": "#fff"}


def render(run: Run) -> str:
    graph = run.graph()
    parts = [f"<h1>Run report: {e(run.run_dir.name)}</h1>",
             f"<p class='muted'>{e(run.run_dir)} — {len(run.folders)} published folder(s), "
             f"generated {e(_when(time.time()))} by <code>distill-pipeline report</code></p>"]
    parts += [f"<p class='problem'>{e(p)}</p>" for p in run.problems]
    parts += ["<h2 id='graph'>Nodes</h2>", f"<div class='graph'>{_graph_svg(graph)}</div>",
              "<p class='muted'>The last published folder of every node lineage, and what it read; "
              "fingerprint (first 12 characters) and seconds from its manifest.json. Every published "
              "folder:</p>", _nodes_table(run)]
    parts += ["<h2 id='curves'>Training curves</h2>", _curves(graph)]
    parts += ["<h2 id='evaluate'>Evaluation</h2>", _evaluations(run)]
    parts += ["<h2 id='cache'>Teacher-logit cache</h2>", _cache(graph)]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
            f"<title>{e(run.run_dir.name)} — distill-pipeline report</title><style>{STYLE}</style>"
            "</head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _graph_svg(graph: list[Folder]) -> str:
    """Nodes in columns by depth (longest path from a node that reads nothing), edges from each
    input to its reader."""
    names = {f.name: f for f in graph}
    inputs = {f.name: [Path(i.get("path", "")).name for i in f.manifest.get("inputs", {}).values()]
              for f in graph}
    depth: dict[str, int] = {}

    def level(n: str, seen: tuple = ()) -> int:
        if n not in depth:
            ups = [u for u in inputs[n] if u in names and u not in seen]
            depth[n] = 1 + max((level(u, seen + (n,)) for u in ups), default=-1)
        return depth[n]

    columns: dict[int, list[str]] = {}
    for f in graph:
        columns.setdefault(level(f.name), []).append(f.name)
    w, h, gx, gy, pad = 184, 58, 36, 18, 10
    pos = {n: (pad + c * (w + gx), pad + r * (h + gy)) for c, col in columns.items()
           for r, n in enumerate(sorted(col))}
    width = pad * 2 + len(columns) * (w + gx) - gx
    height = pad * 2 + max(len(c) for c in columns.values()) * (h + gy) - gy
    out = [f"<svg id='node-graph' role='img' aria-label='node graph' width='{width}' height='{height}' "
           f"viewBox='0 0 {width} {height}'><defs><marker id='arrow' viewBox='0 0 10 10' refX='10' "
           "refY='5' markerWidth='7' markerHeight='7' orient='auto-start-reverse'>"
           "<path d='M0,0L10,5L0,10z' fill='#777'/></marker></defs>"]
    for n in pos:
        x2, y2 = pos[n][0], pos[n][1] + h / 2
        for u in inputs[n]:
            if u in pos:
                x1, y1 = pos[u][0] + w, pos[u][1] + h / 2
                mid = (x1 + x2) / 2
                out.append(f"<path d='M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}' fill='none' "
                           "stroke='#999' stroke-width='1.3' marker-end='url(#arrow)'/>")
    for n, (x, y) in pos.items():
        f = names[n]
        secs = f"{f.seconds:.1f} s" if isinstance(f.seconds, (int, float)) else "—"
        out.append(f"<g class='node' data-folder='{e(n)}'><title>{e(n)}</title>"
                   f"<rect x='{x}' y='{y}' width='{w}' height='{h}' rx='6' "
                   f"fill='{STAGE_COLOURS.get(f.stage, '#fff')}' stroke='#555'/>"
                   f"<text x='{x + 8}' y='{y + 18}' font-size='13' font-weight='bold'>{e(f.node)}</text>"
                   f"<text x='{x + 8}' y='{y + 34}' font-size='11' fill='#444'>{e(f.fingerprint[:12])}</text>"
                   f"<text x='{x + 8}' y='{y + 49}' font-size='11' fill='#444'>{e(f.stage)} · {e(secs)}</text></g>")
    out.append("</svg>")
    return "".join(out)


def _nodes_table(run: Run) -> str:
    rows = ["<table id='nodes'><tr><th>folder</th><th>stage</th><th>fingerprint</th><th>inputs</th>"
            "<th>started</th><th>seconds</th><th>summary</th></tr>"]
    for f in run.folders:
        inputs = ", ".join(f"{role}: {Path(i.get('path', '')).name}"
                           for role, i in f.manifest.get("inputs", {}).items()) or "—"
        summary = ", ".join(f"{k} {v}" for k, v in f.manifest.get("summary", {}).items())
        status = "" if f.latest else " class='superseded' title='an older fingerprint of this node'"
        rows.append(f"<tr{status}><td>{e(f.name)}{'' if f.latest else ' (superseded)'}</td>"
                    f"<td>{e(f.stage)}</td><td class='fp'>{e(f.fingerprint)}</td><td>{e(inputs)}</td>"
                    f"<td>{e(_when(f.manifest.get('timings', {}).get('started')))}</td>"
                    f"<td class='num'>{e(f.seconds if f.seconds is not None else '—')}</td>"
                    f"<td>{e(summary)}</td></tr>")
    rows.append("</table>")
    if run.partial:
        rows.append("<p>Partial output (unfinished or interrupted; rerun to resume): "
                    + ", ".join(f"<code>{e(p)}</code>" for p in run.partial) + "</p>")
    return "".join(rows)


def _rows(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _curves(graph: list[Folder]) -> str:
    charts = []
    for f in graph:
        metrics = _rows(f.path / "metrics.jsonl")
        if not metrics:
            continue
        series = {"loss": [(r["step"], r["loss"]) for r in metrics if "step" in r and "loss" in r]}
        charts.append(_chart(f"{_label(f)}: training loss", series, f"curve-{f.name}"))
        validation = _rows(f.path / "validation.jsonl")
        keys = sorted({k for r in validation for k in r if k.startswith("val_") and "length" not in k})
        if keys:
            charts.append(_chart(f"{_label(f)}: validation", {k: [(r["step"], r[k]) for r in validation
                                                                  if k in r] for k in keys},
                                 f"validation-{f.name}"))
    if not charts:
        return "<p>No training node has published its metrics yet.</p>"
    return "<div class='charts'>" + "".join(charts) + "</div>"


COLOURS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _chart(title: str, series: dict[str, list[tuple[float, float]]], ident: str) -> str:
    """A line chart: one polyline per series, axes with five ticks, a legend."""
    w, h, left, right, top, bottom = 380, 230, 54, 12, 26, 34
    points = [p for s in series.values() for p in s]
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def sy(y: float) -> float:
        return h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    out = [f"<svg id='{e(ident)}' class='chart' width='{w}' height='{h}' viewBox='0 0 {w} {h}' role='img' "
           f"aria-label='{e(title)}'><text x='{left}' y='15' font-size='12' font-weight='bold'>{e(title)}</text>",
           f"<line x1='{left}' y1='{h - bottom}' x2='{w - right}' y2='{h - bottom}' stroke='#333'/>",
           f"<line x1='{left}' y1='{top}' x2='{left}' y2='{h - bottom}' stroke='#333'/>"]
    for v in _ticks(y0, y1):
        out.append(f"<text x='{left - 4}' y='{sy(v) + 4:.1f}' font-size='10' text-anchor='end'>{v:.3g}</text>"
                   f"<line x1='{left}' y1='{sy(v):.1f}' x2='{w - right}' y2='{sy(v):.1f}' stroke='#eee'/>")
    for v in _ticks(x0, x1):
        out.append(f"<text x='{sx(v):.1f}' y='{h - bottom + 14}' font-size='10' text-anchor='middle'>{v:.4g}</text>")
    out.append(f"<text x='{(left + w - right) / 2}' y='{h - 4}' font-size='10' text-anchor='middle'>step</text>")
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(pts))
        out.append(f"<polyline data-series='{e(name)}' points='{coords}' fill='none' stroke='{colour}' "
                   "stroke-width='1.8'/>")
        out.append(f"<text x='{w - right - 4}' y='{top + 12 * (i + 1)}' font-size='10' text-anchor='end' "
                   f"fill='{colour}'>{e(name)}</text>")
    out.append("</svg>")
    return "".join(out)


def _num(metric: str, value: Any) -> str:
    """A number's cell: shown with 4 decimals (a count as it is), exact in `data-value`."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return f"<td class='num' data-metric='{e(metric)}'>—</td>"
    shown = str(value) if isinstance(value, int) else f"{value:.4f}"
    return f"<td class='num' data-metric='{e(metric)}' data-value='{e(repr(value))}'>{shown}</td>"


def _evaluations(run: Run) -> str:
    """Every evaluate folder, newest first: its metrics table and its win rates."""
    folders = sorted((f for f in run.folders if f.stage == "evaluate"), key=lambda f: -f.finished)
    if not folders:
        return "<p>No evaluate node has finished in this run dir: <code>distill-pipeline run evaluate -c …</code></p>"
    names = run.by_name()
    out = []
    for f in folders:
        try:
            results = json.loads((f.path / "results.json").read_text())
        except (OSError, ValueError) as exc:
            out.append(f"<p class='problem'>{e(f.name)}: results.json unreadable ({e(exc)})</p>")
            continue
        columns = [*METRICS, *(m for m in SCORES if any(m in r for r in results.values()))]
        head = "".join(f"<th>{e(c)}</th>" for c in columns)
        out.append(f"<h3>{e(f.name)}{'' if f.latest else ' (superseded)'}</h3>"
                   f"<p class='muted'>finished {e(_when(f.finished))}</p>"
                   f"<table class='evaluate' id='evaluate-{e(f.name)}' data-folder='{e(f.name)}'>"
                   f"<tr><th>model</th><th>folder</th>{head}<th>n</th></tr>")
        for role, r in results.items():
            up = Path(f.manifest.get("inputs", {}).get(role, {}).get("path", "")).name
            label = _label(names[up]) if up in names else role
            out.append(f"<tr data-model='{e(role)}'><td>{e(label)}</td><td>{e(up or '—')}</td>"
                       + "".join(_num(c, r.get(c)) for c in columns) + _num("n", r.get("n")) + "</tr>")
        out.append("</table>")
        wins = [c for c in columns if c.endswith("win_rate")]
        if wins:
            out.append(f"<p>Win rates against <code>sft.student</code> (ties count half):</p>"
                       f"<table class='winrates' id='winrates-{e(f.name)}' data-folder='{e(f.name)}'>"
                       "<tr><th>model</th>" + "".join(f"<th>{e(c)}</th>" for c in wins) + "</tr>")
            for role, r in results.items():
                up = Path(f.manifest.get("inputs", {}).get(role, {}).get("path", "")).name
                label = _label(names[up]) if up in names else role
                out.append(f"<tr data-model='{e(role)}'><td>{e(label)}</td>"
                           + "".join(_num(c, r.get(c)) for c in wins) + "</tr>")
            out.append("</table>")
        else:
            out.append("<p class='muted'>No win rates: set <code>evaluate.reward_model</code>, or keep "
                       "<code>evaluate.teacher_judge</code> with both teachers in the run.</p>")
    return "".join(out)


def _cache(graph: list[Folder]) -> str:
    from distill_pipeline.cache.node import node_meta, node_stats
    from distill_pipeline.cache.segment import CacheError

    folders = [f for f in graph if f.stage == "teacher_logits"]
    if not folders:
        return "<p>No extraction node in this run (methods without a teacher signal read no cache).</p>"
    out = ["<table id='cache-stats'><tr><th>node</th><th>source</th><th>store</th><th>format</th>"
           "<th>teachers</th><th>entries</th><th>hit rate</th><th>extracted</th><th>tokens/s</th>"
           "<th>segments</th><th>bytes/token</th><th>mean k</th><th>storage KL</th></tr>"]
    for f in folders:
        s = f.manifest.get("summary", {})
        try:
            meta, stats = node_meta(f.path), node_stats(f.path)
        except (CacheError, OSError) as exc:
            out.append(f"<tr><td>{e(f.name)}</td><td colspan='12' class='problem'>{e(exc)}</td></tr>")
            continue
        fmt = meta["format"]
        what = f"top-{fmt.get('top_k')}" + (f" @ mass {fmt['top_mass']}" if fmt.get("top_mass") else "")
        what += f", {fmt.get('dtype')}" + (f", keep {fmt['logp_keep_bits']} bits" if fmt.get("logp_keep_bits") else "")
        teachers = "; ".join(f"{role} {t['identity'][:12]}" for role, t in meta["teachers"].items())
        entries, cached = s.get("entries"), s.get("cached")
        hit = cached / entries if isinstance(entries, int) and entries and isinstance(cached, int) else None
        segs = f"{stats['segments']}" + (f" ({stats['absent']} absent)" if stats["absent"] else "") + (
            f" ({stats['damaged']} damaged)" if stats["damaged"] else "")
        out.append(f"<tr data-folder='{e(f.name)}'><td>{e(f.name)}</td><td>{e(meta.get('source'))}</td>"
                   f"<td><code>{e(stats['store'])}</code></td><td>{e(what)}</td><td class='fp'>{e(teachers)}</td>"
                   f"{_num('entries', entries)}{_num('hit_rate', hit)}"
                   f"<td class='num'>{e(s.get('extracted', '—'))}</td><td class='num'>{e(s.get('tokens_per_s', '—'))}</td>"
                   f"<td class='num'>{e(segs)}</td><td class='num'>{e(stats['bytes_per_token'] or '—')}</td>"
                   f"<td class='num'>{e(stats['mean_k'] or '—')}</td><td class='num'>{e(stats['storage_kl'] if stats['storage_kl'] is not None else '—')}</td></tr>")
    out.append("</table><p class='muted'>hit rate: the share of the node's entries already in the store "
               "when it ran (the rest were extracted). Bytes per token, mean k (slots stored per token) "
               "and storage KL (K+1-bin KL of the stored values against float32) are those of the "
               "segments holding the node's entries, from their manifests; a remote store is read from "
               "its local mirror.</p>")
    return "".join(out)
