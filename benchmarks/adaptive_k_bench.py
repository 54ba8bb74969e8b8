"""What storage costs the student: the quickstart student trained from a fixed-K cache and from
mass-adaptive caches (teacher_logits.top_mass 0.999 and 0.99), same teachers, same seeds.

One shared run directory holds the SFT/DPO teachers, the SFT student and the rollouts; each
storage format gets its own store (so `cache info` measures it alone) and its own extraction,
training and evaluation nodes. Reports, per format: bytes per token, mean k, storage KL, and the
held-out task / reward accuracy of the trained student (mean, and min..max over the seeds), for
each method.

    python benchmarks/adaptive_k_bench.py                  # adpa and dckd, seeds 0 1 2 (~10 min)
    python benchmarks/adaptive_k_bench.py --smoke          # a few steps, one seed

Writes <out>/adaptive_k.json and prints a markdown table.
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

from distill_pipeline.cache.admin import info  # noqa: E402
from distill_pipeline.cache.store import Store  # noqa: E402
from distill_pipeline.config import config_from_dict  # noqa: E402
from distill_pipeline.pipeline import runner  # noqa: E402

FORMATS = {"fixed K=50": None, "top_mass 0.999": 0.999, "top_mass 0.99": 0.99}


def base_tree(config: Path, out: Path, smoke: bool) -> dict:
    """The config's tree with this benchmark's run dir; with `smoke`, tiny data and 3 steps."""
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
    """Train `method` (the student's seed `seed`; SFT and teachers shared) and evaluate it."""
    t = json.loads(json.dumps(tree))
    t["method"] = method
    t["train"] = {**t.get("train", {}), "lr": lr, "seed": seed}
    plan = runner.make_plan(config_from_dict(t))
    runner.run(plan, ["all"], use_ray=False, echo=lambda s: None)
    return {"eval": json.loads((plan.folder("evaluate") / "results.json").read_text())["train"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/quickstart.yaml"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/out/adaptive_k"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["adpa", "dckd"])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.seeds = args.seeds[:1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict = {"command": " ".join(sys.argv), "seeds": args.seeds, "lr": args.lr, "formats": {}}
    for name, mass in FORMATS.items():
        tree = base_tree(Path(args.config), out, args.smoke)
        store = out / f"store-{mass or 'fixed'}"
        tree["teacher_logits"] = {**tree.get("teacher_logits", {}), "store": str(store), "top_k": 50}
        if mass is not None:
            tree["teacher_logits"]["top_mass"] = mass
        row: dict = {"methods": {}}
        for method in args.methods:
            runs = [run(tree, method, args.lr, seed)["eval"] for seed in args.seeds]
            row["methods"][method] = {
                m: {"mean": statistics.fmean(r[m] for r in runs), "min": min(r[m] for r in runs),
                    "max": max(r[m] for r in runs)} for m in ("task_accuracy", "reward_accuracy")}
            print(f"{name}: {method} {row['methods'][method]}", flush=True)
        stats = info(Store(store))
        row.update(bytes_per_token=stats["bytes_per_token"], mean_k=stats["mean_k"],
                   storage_kl=stats["reconstruction_kl"])
        report["formats"][name] = row
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "adaptive_k.json").write_text(json.dumps(report, indent=2))
    methods = args.methods
    head = "| format | B/token | mean k | storage KL | " + " | ".join(
        f"{m} task acc | {m} reward acc" for m in methods) + " |"
    lines = [head, "|" + "---|" * (4 + 2 * len(methods))]
    for name, row in report["formats"].items():
        cells = []
        for m in methods:
            for metric in ("task_accuracy", "reward_accuracy"):
                v = row["methods"][m][metric]
                cells.append(f"{v['mean']:.3f} ({v['min']:.3f}..{v['max']:.3f})")
        lines.append(f"| {name} | {row['bytes_per_token']:.1f} | {row['mean_k']} | {row['storage_kl']:.2e} | "
                     + " | ".join(cells) + " |")
    print("\n".join(lines))
    print(f"seeds {args.seeds}, lr {args.lr}; wrote {out}/adaptive_k.json in {report['seconds']} s")


if __name__ == "__main__":
    main()
