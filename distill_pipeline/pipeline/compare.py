"""`distill-pipeline compare`: the evaluate results of several methods in one table and one PNG.

Collects every published `evaluate` node under the given run directories (or the run directories
of the given configs) — one per method run there — labels each trained student by its loss (ADPA
started from a DCKD student is `adpa+`), prints a table and writes a PNG with metric bars and
training curves.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill_pipeline.metrics import METRICS, SCORES, results_table


def _run_dir(path: str) -> Path:
    p = Path(path)
    if p.suffix in (".yaml", ".yml"):
        from distill_pipeline.config import load_config

        return Path(load_config(p).run_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"{path}: not a run directory or a config file")
    return p


def method_label(train_folder: Path) -> str:
    m = json.loads((train_folder / "manifest.json").read_text())
    loss = m["summary"].get("loss") or m["config"]["loss"]
    init = m["inputs"].get("init", {}).get("node", "")
    if loss == "adpa" and init.startswith("train"):
        return "adpa+"
    if m["node"] == "train.dckd":
        return "dckd (adpa+ phase 1)"
    return loss


def collect(paths: list[str]) -> dict[str, dict[str, Any]]:
    """{label: {metric: value, "curve": [(step, loss)], "run": run_dir}} across all evaluate nodes."""
    rows: dict[str, dict[str, Any]] = {}
    found = []
    for path in paths:
        run = _run_dir(path)
        for ev in run.glob("evaluate-*/manifest.json"):
            manifest = json.loads(ev.read_text())
            found.append((manifest["timings"]["finished"], run, ev, manifest))
    for _, run, ev, manifest in sorted(found, key=lambda f: -f[0]):  # newest result per label wins
        results = json.loads((ev.parent / "results.json").read_text())
        for role, res in results.items():
            folder = Path(manifest["inputs"][role]["path"])
            label = method_label(folder) if role.startswith("train") else role
            if label in rows:
                continue
            curve = []
            if (folder / "metrics.jsonl").exists() and role.startswith("train"):
                curve = [(d["step"], d["loss"]) for d in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]
            rows[label] = {**{k: res.get(k) for k in METRICS},
                           **{k: res[k] for k in SCORES if k in res}, "curve": curve, "run": str(run)}
    order = ["sft.student", "sft.teacher", "teacher_dpo"]
    rows = {k: rows[k] for k in order if k in rows} | {k: v for k, v in sorted(rows.items()) if k not in order}
    if not rows:
        raise FileNotFoundError(f"no published evaluate results under {', '.join(paths)}; "
                                "run `distill-pipeline run all` first")
    return rows


def table(rows: dict[str, dict]) -> str:
    return results_table(rows, first="method")


def plot(rows: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    # rates in [0, 1]: the accuracies, and the win rates vs the SFT student when evaluated
    bars = [*METRICS[:2], *(m for m in SCORES if m.endswith("win_rate")
                            and any(r.get(m) is not None for r in rows.values()))]
    fig, axes = plt.subplots(1, len(bars) + 1, figsize=(5 * (len(bars) + 1), 4.5))
    for ax, metric in zip(axes[:-1], bars):
        values = [rows[k].get(metric) or 0 for k in labels]
        ax.bar(range(len(labels)), values, color=["#888" if not rows[k]["curve"] else "#3a7" for k in labels])
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(metric.replace("_", " "))
        for i, v in enumerate(values):
            ax.text(i, v + 0.01, f"{v:.2f}", ha="center", fontsize=8)
    for k in labels:
        if rows[k]["curve"]:
            steps, losses = zip(*rows[k]["curve"])
            axes[-1].plot(steps, losses, label=k)
    axes[-1].set_title("training loss")
    axes[-1].set_xlabel("step")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
