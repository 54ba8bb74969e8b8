"""Stage `evaluate`: score every model of the run on the held-out set.

Metrics per model: `task_accuracy` (built-in numbers task: greedy answer == digits), `reward_accuracy`
(share of held-out pairs where the model gives the chosen response the higher mean log-prob) and
`mean_length` (generated tokens, EOS included). Produces `results.json` and prints a table.
Run alone: `distill-pipeline run evaluate -c configs/quickstart.yaml`.
"""
from __future__ import annotations

import json
from pathlib import Path

from distill_pipeline.data import DataView, data_view
from distill_pipeline.pipeline.config import Evaluate
from distill_pipeline.stages import ANY_ROLE, Stage, View


class EvaluateView(View):
    evaluate: Evaluate
    data: DataView

    def origins(self) -> dict[str, str | None]:
        return {"evaluate": "evaluate", "data": None}


def view_for(cfg) -> EvaluateView:
    return EvaluateView(evaluate=cfg.evaluate, data=data_view(cfg, "eval"))


def run(view: EvaluateView, inputs: dict, out: Path) -> dict:
    from distill_pipeline.data import pair_examples
    from distill_pipeline.metrics import evaluate_model, results_table
    from distill_pipeline.models import load_checkpoint

    cfg = view.evaluate
    results = {}
    examples = None
    for role, folder in inputs.items():
        model, tok = load_checkpoint(folder / "model")
        if examples is None:  # every model of a run shares one tokenizer (checked before running)
            examples = pair_examples(view.data, tok)
        results[role] = evaluate_model(model, tok, examples, batch_size=cfg.batch_size,
                                       max_new_tokens=cfg.max_new_tokens, desc=f"evaluate {role}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.txt").write_text(results_table(results) + "\n")
    return {"models": len(results)}


def report(folder: Path) -> str:
    """The table the driver prints after the stage (a Ray worker's stdout is prefixed)."""
    return (folder / "table.txt").read_text().rstrip()


STAGE = Stage(version=1, kind="generate", view=EvaluateView,
              inputs={ANY_ROLE: "every model of the run, by node name"},
              outputs=("results.json", "table.txt"), run=run, report=report)
