"""Stage `evaluate`: score every model of the run on the held-out set.

Metrics per model: `task_accuracy` (rows with an `answer`, as the built-in tasks': greedy answer ==
answer), `task_reward` (its partial credit: 1 − edit distance / length, the numbers-ranked task's
reward, per prompt in `responses.jsonl`), `reward_accuracy`
(share of held-out pairs where the model gives the chosen response the higher mean log-prob),
`mean_length` (generated tokens, EOS included); with `evaluate.reward_model`, `rm_reward` (mean
score of the model's greedy responses) and `rm_win_rate` (share of prompts where its response
outscores the SFT student's, ties half); with `evaluate.teacher_judge` and both teachers in the
run, `judge_reward` / `judge_win_rate`, the same with the DPO teacher's implicit reward
log π_dpo(y|x) − log π_ref(y|x) summed over the response. Produces `results.json`,
`responses.jsonl` (every model's response and scores per prompt) and prints a table.
Run alone: `distill-pipeline run evaluate -c configs/quickstart.yaml`.
"""
from __future__ import annotations

import json
from pathlib import Path

from distill_pipeline.data import DataView, data_view
from distill_pipeline.config import Evaluate
from distill_pipeline.stages import ANY_ROLE, Stage, View

BASELINE = "sft.student"                      # what win rates are measured against
JUDGE = ("teacher_dpo", "sft.teacher")        # policy and reference of the implicit reward


class EvaluateView(View):
    evaluate: Evaluate
    data: DataView
    reward_identity: str | None = None  # the reward model's content identity (files, not path)

    def origins(self) -> dict[str, str | None]:
        return {"evaluate": "evaluate", "data": None, "reward_identity": None}


def view_for(cfg) -> EvaluateView:
    rm, identity = cfg.evaluate.reward_model, None
    if rm is not None:
        from distill_pipeline.identity import content_identity
        from distill_pipeline.models import import_path

        identity = content_identity(import_path(rm.name_or_path, f"evaluate.reward_model: "
                                                                 f"{rm.name_or_path!r}"))
    return EvaluateView(evaluate=cfg.evaluate, data=data_view(cfg.data, "eval"), reward_identity=identity)


def run(view: EvaluateView, inputs: dict, out: Path) -> dict:
    from distill_pipeline.data import pair_examples
    from distill_pipeline.data.tokenize import decode_response
    from distill_pipeline.metrics import evaluate_model, results_table, task_rewards
    from distill_pipeline.models import load_ref, model_ref
    from distill_pipeline.trackers import start

    cfg = view.evaluate
    results, responses = {}, {}
    examples = tok = None
    for role, folder in inputs.items():
        model, tok = load_ref(model_ref(folder))
        model.eval()
        if examples is None:  # every model of a run shares one tokenizer (checked before running)
            examples = pair_examples(view.data, tok)
        results[role], responses[role] = evaluate_model(
            model, tok, examples, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
            desc=f"evaluate {role}", with_responses=True)
        del model
    scores: dict[str, dict[str, list[float]]] = {}
    notes = []
    if cfg.reward_model is not None:
        from distill_pipeline.reward import load_reward_model, reward_scores

        rm, rm_tok = load_reward_model(cfg.reward_model.name_or_path, dtype=cfg.reward_model.dtype)
        prompts = [e["prompt"] for e in examples]
        scores["rm"] = {role: reward_scores(rm, rm_tok, prompts, [decode_response(tok, r) for r in rs],
                                            batch_size=cfg.reward_model.batch_size,
                                            desc=f"reward model: {role}")
                        for role, rs in responses.items()}
        del rm
    if cfg.teacher_judge and all(j in inputs for j in JUDGE):
        from distill_pipeline.reward import implicit_rewards

        policy, reference = (load_ref(model_ref(inputs[j]))[0].eval() for j in JUDGE)
        prompt_ids = [e["prompt_ids"] for e in examples]
        scores["judge"] = {role: implicit_rewards(policy, reference, prompt_ids, rs,
                                                  pad_id=tok.pad_token_id, batch_size=cfg.batch_size)
                           for role, rs in responses.items()}
        del policy, reference
    elif cfg.teacher_judge:
        notes.append(f"teacher judge: skipped (needs both {' and '.join(JUDGE)} in the run)")
    for kind, by_role in scores.items():
        _score_columns(results, kind, by_role)
    credit = {role: task_rewards(tok, examples, rs) for role, rs in responses.items()}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    with start(out) as tracker:  # report_to: the table, as <model>/<metric>
        tracker.log(0, {f"{role}/{k}": v for role, r in results.items() for k, v in r.items()})
    with open(out / "responses.jsonl", "w") as fh:
        for role, rs in responses.items():
            for i, (e, r) in enumerate(zip(examples, rs)):
                fh.write(json.dumps({"model": role, "prompt": e["prompt"],
                                     "response": decode_response(tok, r), "response_ids": r,
                                     **({} if credit[role] is None else {"task_reward": credit[role][i]}),
                                     **{kind: by_role[role][i] for kind, by_role in scores.items()}})
                         + "\n")
    (out / "table.txt").write_text("\n".join([results_table(results), *notes]) + "\n")
    return {"models": len(results)}


def _score_columns(results: dict, kind: str, by_role: dict[str, list[float]]) -> None:
    """Mean score and win rate vs the SFT student (ties half) of every model, from per-prompt
    scores (`rm`: reward model, `judge`: the DPO teacher's implicit reward)."""
    from distill_pipeline.reward import win_rate

    baseline = by_role.get(BASELINE)
    for role, s in by_role.items():
        results[role][f"{kind}_reward"] = sum(s) / len(s)
        if baseline is not None:
            results[role][f"{kind}_win_rate"] = win_rate(s, baseline)


def report(folder: Path) -> str:
    """The table the driver prints after the stage (a Ray worker's stdout is prefixed)."""
    return (folder / "table.txt").read_text().rstrip()


STAGE = Stage(version=3, kind="generate", view=EvaluateView,
              inputs={ANY_ROLE: "every model of the run, by node name"},
              outputs=("results.json", "responses.jsonl", "table.txt"), run=run, report=report)
