"""Data-parallel training on this machine, side by side in one run: the `sft.teacher` node of the
tiny pipeline (tiny-teacher, 0.9M params) trained for the same steps on the same examples as
1 worker × accumulation 2, 2 DDP workers × 1, and 2 FSDP workers × 1 (each step sees the same
2 × batch_size examples). Reports the training loop's own seconds (`train_seconds`: steps only)
and the node's wall time (with Ray Train's start-up), and the ratios to one worker.

    python benchmarks/dp_bench.py [--steps 60] [--batch 16]

On a 2-core machine two workers share the cores the single worker had (each worker gets one
torch thread), so no speed-up is expected: the point is what the collectives cost.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill_pipeline.pipeline import runner  # noqa: E402
from distill_pipeline.config import load_config  # noqa: E402
from tests.conftest import tiny_tree  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/out/dp_bench.json")
    args = ap.parse_args()
    settings = {"1 worker x accum 2": dict(grad_accum=2),
                "2 DDP workers x accum 1": dict(workers=2, grad_accum=1),
                "2 FSDP workers x accum 1": dict(workers=2, grad_accum=1, strategy="fsdp")}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="dpbench") as tmp:
        for name, extra in settings.items():
            tree = tiny_tree(Path(tmp) / "run", method="sft")
            tree["data"]["numbers"]["n_sft"] = 2048
            tree["sft"]["teacher"] = {"lr": 1e-3, "max_steps": args.steps, "batch_size": args.batch,
                                      "checkpoint_every": args.steps, **extra}
            path = Path(tmp) / "c.yaml"
            path.write_text(yaml.safe_dump(tree))
            plan = runner.make_plan(load_config(path))
            runner.run(plan, ["sft.teacher"], use_ray=True, echo=lambda s: None)
            manifest = json.loads((plan.folder("sft.teacher") / "manifest.json").read_text())
            rows[name] = {"train_seconds": manifest["summary"]["train_seconds"],
                          "node_seconds": manifest["timings"]["seconds"],
                          "final_loss": manifest["summary"]["final_loss"]}
    base = rows["1 worker x accum 2"]
    print(f"{'setting':26} {'loop s':>8} {'÷ 1 worker':>10} {'node s':>8} {'÷ 1 worker':>10} final loss")
    for name, r in rows.items():
        r["loop_ratio"] = round(r["train_seconds"] / base["train_seconds"], 3)
        r["node_ratio"] = round(r["node_seconds"] / base["node_seconds"], 3)
        print(f"{name:26} {r['train_seconds']:8.2f} {r['loop_ratio']:10.3f} {r['node_seconds']:8.2f} "
              f"{r['node_ratio']:10.3f} {r['final_loss']:.6f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "batch": args.batch, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
