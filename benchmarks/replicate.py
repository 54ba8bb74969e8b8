"""Tiny-scale replication of the ADPA paper's comparison, with the paper's protocol.

Per seed the whole pipeline runs again (`--task-seed each`, the default): the task's data is
regenerated with the seed, SFT teacher and student and the DPO teacher are retrained with it, and
every method trains from that seed's SFT student. Protocol (ADPA paper §5, Appendix F): the DPO
teacher at beta 0.05; AdamW (0.9, 0.999), weight decay 0, gradient clipping 1.0, cosine schedule
with warmup ratio 0.1 for every training node; the same batch for every student method (the task
config's). Each method's own knob is searched with the learning rate — DCKD alpha in
{0.1, 0.2, 0.5, 1, 2, 5}, ADPA gamma in {0.5, 1, 1.5, 2, 3, 5}; ADPA+ takes DCKD's alpha and ADPA's
gamma and searches the learning rate; DPO and SFT on y_w search the learning rate — on the first
seed's validation split (by the task's metric), and the picked setting trains with every seed.
The DPO teacher's learning rate is picked first, the same way, by the teacher's own validation
score (`--teacher-lrs`; none: the task config's), before any student trains.
The `sft` row is the SFT student itself; `sft-yw` is further SFT on the pairs' chosen answers.
Ablations (the paper's Table 3): ADPA without its SFT term, DCKD without its y_l term (= forward-KL
KD on y_w at DCKD's alpha) and DCKD with the SFT teacher in place of the DPO teacher.

Each relation of the paper's ordering (ADPA+ >= ADPA > DCKD >= DPO >= SFT) gets a paired bootstrap
95% interval of the difference in the task's metric — seeds resampled, then the eval prompts
within each seed (the two methods share a seed's prompts) — and a verdict: holds (interval above
0), reversed (below 0) or inconclusive (contains 0).

    python benchmarks/replicate.py --list-tasks
    python benchmarks/replicate.py --task numbers-ranked --seeds 0 1 2 3 4
    python benchmarks/replicate.py --task numbers-ranked --smoke      # what CI runs

Writes <out>/<task>/replication.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill_pipeline.config import config_from_dict  # noqa: E402
from distill_pipeline.pipeline import runner  # noqa: E402

# task → (its config, the metric the verdicts and the selection use)
TASKS = {"numbers": ("configs/quickstart.yaml", "task_accuracy"),
         "numbers-ranked": ("configs/numbers-ranked.yaml", "task_reward")}
GRIDS = {"dckd": ("alpha", [0.1, 0.2, 0.5, 1.0, 2.0, 5.0]), "adpa": ("gamma", [0.5, 1.0, 1.5, 2.0, 3.0, 5.0])}
BASELINES = ["sft", "sft-yw", "dpo", "dckd", "adpa", "adpa+"]
ABLATIONS = ["adpa-no-sft", "dckd-no-yl", "dckd-sft-teacher"]
OTHERS = ["simpo", "wpo", "tvkd", "dpkd", "vanilla_kd"]  # their papers' defaults; lr searched
CLAIM = [("adpa+", ">=", "adpa"), ("adpa", ">", "dckd"), ("dckd", ">=", "dpo"), ("dpo", ">=", "sft")]
ABLATION_RELATIONS = [("adpa", ">", "adpa-no-sft"), ("dckd", ">", "dckd-no-yl"), ("dckd", ">", "dckd-sft-teacher")]
CONTEXT = [("adpa", ">", "sft-yw"), ("dckd", ">", "sft-yw")]
TRAIN_SECTIONS = (("sft", "teacher"), ("sft", "student"), ("teacher_dpo",), ("train",))
# the method each name trains, and what it takes from another method's picked setting
PIPELINE_METHOD = {"sft-yw": "sft", "dckd-no-yl": "vanilla_kd", "adpa-no-sft": "adpa",
                   "dckd-sft-teacher": "dckd"}
PARENT = {"adpa-no-sft": "adpa", "dckd-no-yl": "dckd", "dckd-sft-teacher": "dckd"}


def sections(tree: dict):
    """(path, section dict) of every training node of `tree` (created empty where absent)."""
    for path in TRAIN_SECTIONS:
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        yield path, node


def task_tree(task: str, out: Path, smoke: bool) -> dict:
    tree = yaml.safe_load((ROOT / TASKS[task][0]).read_text())
    tree["run_dir"] = str(out / "run")
    tree.setdefault("teacher_logits", {})["store"] = str(out / "store")
    tree["teacher_dpo"] = {**tree.get("teacher_dpo", {}), "beta": 0.05}
    for _, node in sections(tree):
        node.update(warmup_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0)
        if smoke:
            node.update(max_steps=3, batch_size=8, checkpoint_every=3)
    if smoke:
        tree["data"]["numbers"] = {**tree["data"]["numbers"], "n_sft": 64, "n_pairs": 32, "n_eval": 16,
                                   "n_validation": 8, "max_value": 9999}
    return tree


def seeded(tree: dict, seed: int, task_seed: int | None) -> dict:
    """The tree of one seed: the data (unless --task-seed pins it) and every training node's seed."""
    t = json.loads(json.dumps(tree))
    t["data"]["numbers"]["seed"] = seed if task_seed is None else task_seed
    for path, node in sections(t):
        node["seed"] = seed if task_seed is None or path == ("train",) else task_seed
    return t


def setting_tree(tree: dict, name: str, setting: dict) -> dict:
    """The tree that trains `name` with `setting` ({lr, and alpha / gamma where it has one})."""
    t = json.loads(json.dumps(tree))
    t["method"] = PIPELINE_METHOD.get(name, name)
    loss: dict = {}
    if "alpha" in setting:
        loss["alpha"] = setting["alpha"]
    if "gamma" in setting:
        loss["gamma"] = setting["gamma"]
    if name == "adpa+":
        t["train"]["dckd_loss"] = {"alpha": setting["alpha"]}
        loss = {"gamma": setting["gamma"]}
    if name == "adpa-no-sft":
        loss["sft_weight"] = 0.0
    t["train"] = {**t["train"], "lr": setting["lr"], "loss": loss}
    if name == "dckd-sft-teacher":  # the SFT teacher stands in for the DPO teacher
        plan = runner.make_plan(config_from_dict({**tree, "method": "dckd"}))
        runner.run(plan, ["sft.teacher"], use_ray=False, echo=lambda s: None)
        t["models"]["teacher_dpo"] = {"name_or_path": str(plan.folder("sft.teacher") / "model")}
    return t


def teacher_validation(tree: dict, node: str = "teacher_dpo") -> dict:
    """Train `node` (the DPO teacher, or its SFT reference) of `tree` and score it on the
    validation split, as evaluate scores models on the eval split."""
    from distill_pipeline.data import data_view, pair_examples
    from distill_pipeline.metrics import evaluate_model
    from distill_pipeline.models import load_ref, model_ref

    plan = runner.make_plan(config_from_dict({**tree, "method": "dpo"}))
    runner.run(plan, [node], use_ray=False, echo=lambda s: None)
    model, tok = load_ref(model_ref(plan.folder(node)))
    examples = pair_examples(data_view(plan.cfg.data, "validation"), tok)
    return evaluate_model(model.eval(), tok, examples, batch_size=plan.cfg.evaluate.batch_size,
                          max_new_tokens=plan.cfg.evaluate.max_new_tokens, desc=f"{node} validation")


def train_only(tree: dict) -> dict:
    """Train (no evaluate) and return the train node's final validation row."""
    plan = runner.make_plan(config_from_dict(tree))
    runner.run(plan, ["train"], use_ray=False, echo=lambda s: None)
    summary = json.loads((plan.folder("train") / "manifest.json").read_text())["summary"]
    return {k.removeprefix("val_"): v for k, v in summary.items() if k.startswith("val_")}


def evaluated(tree: dict) -> dict:
    """Run everything (evaluate included); every model's eval row and per-prompt partial credits."""
    plan = runner.make_plan(config_from_dict(tree))
    runner.run(plan, ["all"], use_ray=False, echo=lambda s: None)
    folder = plan.folder("evaluate")
    results = json.loads((folder / "results.json").read_text())
    rows = [json.loads(line) for line in (folder / "responses.jsonl").read_text().splitlines()]
    return {role: {"eval": r, "credit": [x["task_reward"] for x in rows if x["model"] == role]}
            for role, r in results.items()}


def per_item(run: dict, metric: str) -> np.ndarray:
    credit = np.asarray(run["credit"], dtype=np.float64)
    return credit if metric == "task_reward" else (credit == 1.0).astype(np.float64)


def paired_bootstrap(diffs: list[np.ndarray], n_boot: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean paired difference over seeds (each seed: the mean over its prompts) and its 95%
    percentile interval: seeds drawn with replacement, then prompts within each drawn seed."""
    rng = np.random.default_rng(seed)
    point = float(np.mean([d.mean() for d in diffs]))
    picks = rng.integers(len(diffs), size=(n_boot, len(diffs)))
    stats = np.zeros(n_boot)
    for k, d in enumerate(diffs):
        drawn = (picks == k).sum(axis=1)  # how often seed k was drawn, per resample
        for times in np.unique(drawn[drawn > 0]):
            rows = np.flatnonzero(drawn == times)
            means = d[rng.integers(len(d), size=(len(rows), times, len(d)))].mean(axis=2).sum(axis=1)
            stats[rows] += means
    stats /= len(diffs)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return point, float(lo), float(hi)


def verdict(lo: float, hi: float) -> str:
    return "holds" if lo > 0 else "reversed" if hi < 0 else "inconclusive"


def relation_line(a: str, op: str, b: str, r: dict) -> str:
    return (f"relation {a} {op} {b}: {r['verdict']} (diff {r['diff']:+.4f}, "
            f"95% CI [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}])")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="numbers-ranked", choices=sorted(TASKS))
    ap.add_argument("--list-tasks", action="store_true", help="print the task names, one a line")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/out/replication"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--task-seed", default="each",
                    help="'each' (default): every seed regenerates the data and retrains SFT and "
                         "teachers; a number: that seed's data, SFT and teachers for every seed")
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3])
    ap.add_argument("--teacher-lrs", type=float, nargs="*", default=[1e-4, 3e-4, 1e-3],
                    help="the DPO teacher's learning rate is picked from these on the first seed's "
                         "validation split, by the teacher's own score (none given: the task config's)")
    ap.add_argument("--methods", nargs="+", default=BASELINES + ABLATIONS,
                    help=f"of {' '.join(BASELINES + ABLATIONS + OTHERS)}")
    ap.add_argument("--smoke", action="store_true", help="one seed, one setting per method, 3 steps")
    args = ap.parse_args()
    if args.list_tasks:
        print("\n".join(TASKS))
        return
    unknown = sorted(set(args.methods) - set(BASELINES + ABLATIONS + OTHERS))
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {' '.join(BASELINES + ABLATIONS + OTHERS)}")
    task_seed = None if args.task_seed == "each" else int(args.task_seed)
    grids = {m: (k, v[:1] if args.smoke else v) for m, (k, v) in GRIDS.items()}
    if args.smoke:
        args.seeds, args.lrs = args.seeds[:1], args.lrs[:1]
    metric = TASKS[args.task][1]
    out = Path(args.out) / args.task
    out.mkdir(parents=True, exist_ok=True)
    tree = task_tree(args.task, out, args.smoke)
    t0 = time.perf_counter()
    first = args.seeds[0]
    teacher: dict = {"lr": tree["teacher_dpo"].get("lr"), "validation": {}}
    if args.teacher_lrs:
        lrs = args.teacher_lrs[:1] if args.smoke else args.teacher_lrs
        teacher["validation"] = {lr: teacher_validation(seeded({**tree, "teacher_dpo": {**tree["teacher_dpo"], "lr": lr}},
                                                               first, task_seed)) for lr in lrs}
        teacher["lr"] = max(lrs, key=lambda lr: (teacher["validation"][lr].get(metric) or 0,
                                                 teacher["validation"][lr]["reward_accuracy"]))
        tree["teacher_dpo"]["lr"] = teacher["lr"]
        teacher["reference"] = teacher_validation(seeded(tree, first, task_seed), "sft.teacher")
        print(f"teacher_dpo lr {teacher['lr']:g} (validation {metric}: "
              + ", ".join(f"{lr:g} → {v.get(metric):.4f}" for lr, v in teacher["validation"].items())
              + f"; its SFT reference {teacher['reference'].get(metric):.4f})", flush=True)
    trees = {s: seeded(tree, s, task_seed) for s in args.seeds}
    # methods whose setting another method takes come first
    # (the SFT student's row comes from any other method's evaluation of the same seed)
    methods = sorted(args.methods, key=lambda m: (m == "sft", m not in ("dckd", "adpa"),
                                                  m in ABLATIONS or m == "adpa+"))
    models_of_seed: dict[int, dict] = {}
    report: dict = {"command": " ".join(sys.argv), "task": args.task, "metric": metric, "seeds": args.seeds,
                    "task_seed": args.task_seed, "lr_grid": args.lrs, "grids": grids, "methods": {},
                    "teacher_dpo": {"lr": teacher["lr"],
                                    "validation": {str(lr): v for lr, v in teacher["validation"].items()},
                                    "reference_validation": teacher.get("reference")},
                    "protocol": "teacher DPO beta 0.05; AdamW (0.9, 0.999), weight decay 0, clip 1.0, "
                                "cosine with warmup ratio 0.1 on every training node; student batch "
                                f"{tree['train'].get('batch_size')} for every method"}
    picked: dict[str, dict] = {}
    for name in methods:
        t_method = time.perf_counter()
        if name == "sft":
            setting, tuning = {}, {}
        elif name in PARENT:
            if PARENT[name] not in picked:
                ap.error(f"{name} takes {PARENT[name]}'s picked setting: add {PARENT[name]} to --methods")
            setting, tuning = dict(picked[PARENT[name]]), {}
        else:
            candidates = [{"lr": lr} for lr in args.lrs]
            if name in grids:
                knob, values = grids[name]
                candidates = [{knob: v, "lr": lr} for v in values for lr in args.lrs]
            if name == "adpa+":
                for m in ("dckd", "adpa"):
                    if m not in picked:
                        ap.error(f"adpa+ takes dckd's alpha and adpa's gamma: add {m} to --methods")
                candidates = [{"alpha": picked["dckd"]["alpha"], "gamma": picked["adpa"]["gamma"], "lr": lr}
                              for lr in args.lrs]
            tuning = {json.dumps(c): train_only(setting_tree(trees[first], name, c)) for c in candidates}
            best = max(candidates, key=lambda c: (tuning[json.dumps(c)].get(metric) or 0,
                                                  tuning[json.dumps(c)].get("reward_accuracy") or 0))
            setting = best
        picked[name] = setting
        runs = {}
        for s in args.seeds:
            if name == "sft":
                if s not in models_of_seed:
                    models_of_seed[s] = evaluated(setting_tree(trees[s], "sft-yw", {"lr": args.lrs[0]}))
                runs[s] = models_of_seed[s]["sft.student"]
            else:
                models = evaluated(setting_tree(trees[s], name, setting))
                runs[s] = models["train"]
                if name != "dckd-sft-teacher":  # its teacher_dpo row is the SFT teacher
                    models_of_seed.setdefault(s, models)
        evals = [runs[s]["eval"] for s in args.seeds]
        report["methods"][name] = {
            "setting": setting, "validation": tuning,
            **{m: mean_sd([e.get(m) for e in evals]) for m in
               ("task_reward", "task_accuracy", "reward_accuracy", "judge_win_rate")},
            "per_seed": {str(s): runs[s]["eval"] for s in args.seeds},
            "seconds": round(time.perf_counter() - t_method, 1)}
        report["methods"][name]["_items"] = {s: per_item(runs[s], metric) for s in args.seeds}
        r = report["methods"][name]
        print(f"{name:17s} {json.dumps(setting):45s} {metric} {r[metric][0]:.4f} ± {r[metric][1]:.4f} "
              f"({r['seconds']:.0f} s)", flush=True)
    relations = []
    for group, rels in (("paper ordering", CLAIM), ("ablations", ABLATION_RELATIONS), ("context", CONTEXT)):
        for a, op, b in rels:
            if a not in report["methods"] or b not in report["methods"]:
                continue
            ia, ib = report["methods"][a]["_items"], report["methods"][b]["_items"]
            diff, lo, hi = paired_bootstrap([ia[s] - ib[s] for s in args.seeds])
            rel = {"group": group, "relation": f"{a} {op} {b}", "diff": diff, "ci": [lo, hi],
                   "verdict": verdict(lo, hi)}
            relations.append(rel)
    report["relations"] = relations
    order = [m for m in BASELINES + ABLATIONS + OTHERS if m in report["methods"]]
    report["methods"] = {m: report["methods"][m] for m in order}
    report["references"] = {f"{role} (seed {s})": models[role]["eval"] for s, models in models_of_seed.items()
                            for role in ("sft.teacher", "teacher_dpo") if role in models}
    for r in report["methods"].values():
        del r["_items"]
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "replication.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / "replication.md").write_text(md)
    plot(report, out / "replication.png")
    print(md.split("\nRelations on")[0])
    print("\n".join(relation_line(*rel["relation"].split(" "), rel) for rel in relations))
    print(f"wrote {out}/replication.{{json,md,png}} in {report['seconds']} s")


def mean_sd(values: list) -> list | None:
    vals = [v for v in values if isinstance(v, (int, float))]
    if not vals:
        return None
    return [statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0]


def fmt(v: list | None) -> str:
    return "–" if v is None else f"{v[0]:.3f} ± {v[1]:.3f}"


def markdown(report: dict) -> str:
    metric, n = report["metric"], len(report["seeds"])
    md = [f"Task `{report['task']}`, {n} seed(s) over the whole pipeline (task seed: {report['task_seed']}); "
          f"mean ± sd over seeds on the eval split; settings picked on seed {report['seeds'][0]}'s validation "
          f"split by {metric}; DPO teacher (beta 0.05) at lr {report['teacher_dpo']['lr']:g}"
          + teacher_note(report["teacher_dpo"], metric) + ".", "",
          "| method | picked setting | task reward | task accuracy | reward accuracy | judge win rate vs SFT student |",
          "|---|---|---|---|---|---|"]
    for name, r in report["methods"].items():
        setting = ", ".join(f"{k} {v:g}" for k, v in r["setting"].items()) or "–"
        md.append(f"| {name} | {setting} | {fmt(r['task_reward'])} | {fmt(r['task_accuracy'])} | "
                  f"{fmt(r['reward_accuracy'])} | {fmt(r['judge_win_rate'])} |")
    md += ["", f"Relations on {metric} (paired bootstrap over seeds and prompts, 10,000 resamples):", "", "```"]
    md += [relation_line(*rel["relation"].split(" "), rel) for rel in report["relations"]]
    md += ["```", ""]
    return "\n".join(md)


def teacher_note(teacher: dict, metric: str) -> str:
    if not teacher["validation"]:
        return " (the task config's)"
    picked = teacher["validation"][str(teacher["lr"])].get(metric)
    return (f", picked on that validation split from {', '.join(teacher['validation'])} by its own {metric} "
            f"({picked:.4f}; its SFT reference: {teacher['reference_validation'].get(metric):.4f})")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = report["metric"]
    names = list(report["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1.2, 1]})
    ax = axes[0]
    for i, name in enumerate(names):
        per_seed = [r.get(metric) for r in report["methods"][name]["per_seed"].values()]
        ax.bar(i, np.mean(per_seed), color="#3a7" if name not in ABLATIONS else "#9bc", alpha=0.8)
        ax.plot([i] * len(per_seed), per_seed, "k.", ms=4)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    lo = min(r.get(metric) for m in names for r in report["methods"][m]["per_seed"].values())
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_title(f"{report['task']}: {metric} on eval (bars: mean, dots: seeds)", fontsize=9)
    ax = axes[1]
    rels = report["relations"]
    for i, rel in enumerate(rels):
        color = {"holds": "#3a7", "reversed": "#c44", "inconclusive": "#888"}[rel["verdict"]]
        ax.errorbar(rel["diff"], i, xerr=[[rel["diff"] - rel["ci"][0]], [rel["ci"][1] - rel["diff"]]],
                    fmt="o", color=color, capsize=3)
    ax.axvline(0, color="#555", lw=0.8)
    ax.set_yticks(range(len(rels)), [r["relation"] for r in rels], fontsize=8)
    ax.invert_yaxis()
    ax.set_title("difference a − b, 95% paired bootstrap CI (green holds, red reversed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
