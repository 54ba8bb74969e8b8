"""Stage `evaluate`: score every model of the run on the held-out set.

Metrics per model: `task_accuracy` (built-in numbers task: greedy answer == digits), `reward_accuracy`
(share of held-out pairs where the model gives the chosen response the higher mean log-prob) and
`mean_length` (generated tokens, EOS included). Produces `results.json` and prints a table.
Run alone: `distill-pipeline run evaluate -c configs/quickstart.yaml`.
"""
from __future__ import annotations

import json
from pathlib import Path

NAME = "evaluate"
VERSION = 1
KIND = "generate"


def format_table(results: dict[str, dict]) -> str:
    cols = ["task_accuracy", "reward_accuracy", "mean_length"]
    width = max(len(m) for m in results) + 2
    lines = ["model".ljust(width) + "".join(c.rjust(17) for c in cols)]
    for name, r in results.items():
        cells = [f"{r[c]:.3f}" if c in r else "-" for c in cols]
        lines.append(name.ljust(width) + "".join(c.rjust(17) for c in cells))
    return "\n".join(lines)


def run(view: dict, inputs: dict, out: Path) -> dict:
    from distill_pipeline.data import pair_examples
    from distill_pipeline.metrics import evaluate_model
    from distill_pipeline.models import load_checkpoint

    cfg = view["evaluate"]
    results = {}
    examples = None
    for role, folder in inputs.items():
        model, tok = load_checkpoint(folder / "model")
        if examples is None:  # every model of a run shares one tokenizer (checked before running)
            examples = pair_examples(view["data"], tok, kind="eval")
        results[role] = evaluate_model(model, tok, examples, batch_size=cfg.batch_size,
                                       max_new_tokens=cfg.max_new_tokens, desc=f"evaluate {role}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.txt").write_text(format_table(results) + "\n")
    return {"models": len(results)}


def report(folder: Path) -> str:
    """The table the driver prints after the stage (a Ray worker's stdout is prefixed)."""
    return (folder / "table.txt").read_text().rstrip()
