"""Tiny-scale replication of the ADPA paper's comparison on the built-in numbers task.

From the same SFT student and teachers (one shared run directory), trains students with SFT,
DPO, DCKD, ADPA, ADPA+ and TVKD. The learning rate of each method is picked on the validation
split (seed 0; by validation task accuracy, then validation reward accuracy); the picked setting
is then trained with every seed and scored on the held-out eval split. Reports mean ± sd and
whether the paper's ordering ADPA+ ≥ ADPA > DCKD ≥ DPO ≥ SFT holds — whichever way it falls.

    python benchmarks/replicate.py                 # 3 seeds, full quickstart data (~15 min, 2 cores)
    python benchmarks/replicate.py --smoke         # one seed, a few steps (what CI runs)

Writes <out>/replication.json, <out>/replication.md and <out>/replication.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill_pipeline.pipeline import runner  # noqa: E402
from distill_pipeline.config import config_from_dict  # noqa: E402

METHODS = ["sft", "dpo", "dckd", "tvkd", "adpa", "adpa+"]
CLAIM = [("adpa+", ">=", "adpa"), ("adpa", ">", "dckd"), ("dckd", ">=", "dpo"), ("dpo", ">=", "sft")]


def base_tree(config: Path, out: Path, smoke: bool) -> dict:
    tree = yaml.safe_load(config.read_text())
    tree["run_dir"] = str(out / "run")
    tree.setdefault("teacher_logits", {})["store"] = str(out / "store")
    if smoke:
        tree["data"]["numbers"] = {"n_sft": 64, "n_pairs": 32, "n_eval": 16, "n_validation": 8, "max_value": 9999}
        tiny = {"max_steps": 3, "batch_size": 8, "checkpoint_every": 3}
        tree["sft"] = {"teacher": {**tiny, "lr": 3e-3}, "student": {**tiny, "lr": 3e-3}}
        tree["teacher_dpo"] = {**tiny, "lr": 1e-3}
        tree["train"] = {**tree.get("train", {}), **tiny}
    return tree


def run(tree: dict, method: str, lr: float, seed: int) -> dict:
    t = json.loads(json.dumps(tree))
    t["method"] = method
    t["train"] = {**t.get("train", {}), "lr": lr, "seed": seed}
    plan = runner.make_plan(config_from_dict(t))
    runner.run(plan, ["all"], use_ray=False, echo=lambda s: None)
    summary = json.loads((plan.folder("train") / "manifest.json").read_text())["summary"]
    results = json.loads((plan.folder("evaluate") / "results.json").read_text())
    return {"val": {k: summary.get(f"val_{k}") for k in ("task_accuracy", "reward_accuracy")},
            "eval": results["train"], "baselines": {k: v for k, v in results.items() if not k.startswith("train")}}


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/quickstart.yaml"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/out/replication"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--smoke", action="store_true", help="one seed, one lr, a few steps")
    args = ap.parse_args()
    if args.smoke:
        args.seeds, args.lrs = args.seeds[:1], args.lrs[:1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tree = base_tree(Path(args.config), out, args.smoke)
    t0 = time.perf_counter()
    report: dict = {"command": " ".join(sys.argv), "seeds": args.seeds, "lr_grid": args.lrs, "methods": {}}
    for method in args.methods:
        tuning = {lr: run(tree, method, lr, args.seeds[0]) for lr in args.lrs}
        best = max(args.lrs, key=lambda lr: (tuning[lr]["val"]["task_accuracy"] or 0,
                                              tuning[lr]["val"]["reward_accuracy"] or 0))
        runs = [tuning[best] if s == args.seeds[0] else run(tree, method, best, s) for s in args.seeds]
        report["methods"][method] = {
            "lr": best, "validation_by_lr": {str(lr): r["val"] for lr, r in tuning.items()},
            **{m: mean_sd([r["eval"][m] for r in runs]) for m in ("task_accuracy", "reward_accuracy")},
            "per_seed": [r["eval"] for r in runs]}
        report["baselines"] = runs[0]["baselines"]
        print(f"{method:6s} lr={best:g} task {report['methods'][method]['task_accuracy']} "
              f"reward {report['methods'][method]['reward_accuracy']}", flush=True)
    ms = report["methods"]
    report["claim"] = [{"claim": f"{a} {op} {b}", "holds": (ms[a]["task_accuracy"][0] >= ms[b]["task_accuracy"][0]
                                                           if op == ">=" else ms[a]["task_accuracy"][0] > ms[b]["task_accuracy"][0])}
                       for a, op, b in CLAIM if a in ms and b in ms]
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "replication.json").write_text(json.dumps(report, indent=2))
    md = [f"| method | lr (picked on validation) | task accuracy | reward accuracy |", "|---|---|---|---|"]
    for k, v in report["baselines"].items():
        md.append(f"| {k} (reference) | – | {v['task_accuracy']:.3f} | {v['reward_accuracy']:.3f} |")
    for m, r in ms.items():
        md.append(f"| {m} | {r['lr']:g} | {r['task_accuracy'][0]:.3f} ± {r['task_accuracy'][1]:.3f} | "
                  f"{r['reward_accuracy'][0]:.3f} ± {r['reward_accuracy'][1]:.3f} |")
    md.append("")
    md += [f"- {c['claim']} (task accuracy, means): {'holds' if c['holds'] else 'does not hold'}" for c in report["claim"]]
    (out / "replication.md").write_text("\n".join(md) + "\n")
    plot(report, out / "replication.png")
    print("\n".join(md))
    print(f"wrote {out}/replication.{{json,md,png}} in {report['seconds']} s")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("task_accuracy", "reward_accuracy")):
        means = [report["methods"][m][metric][0] for m in names]
        sds = [report["methods"][m][metric][1] for m in names]
        ax.bar(names, means, yerr=sds, capsize=4, color="#3a7")
        for ref, style in (("sft.student", ":"), ("teacher_dpo", "--")):
            if ref in report["baselines"]:
                ax.axhline(report["baselines"][ref][metric], ls=style, color="#555", label=ref)
        ax.set_title(f"{metric.replace('_', ' ')} (held-out, mean ± sd over {len(report['seeds'])} seed(s))", fontsize=9)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
