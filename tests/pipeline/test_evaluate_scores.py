"""`evaluate` with a reward model and the teacher judge: per-prompt scores in responses.jsonl,
means and win rates vs the SFT student (ties half) in results.json, checked by hand."""
from __future__ import annotations

import json

import pytest
import torch

from distill_pipeline.models import load_ref, model_ref
from distill_pipeline.pipeline import runner
from distill_pipeline.config import load_config
from tests.conftest import tiny_tree, write_config
from tests.unit.test_reward import _save_reward_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scores")
    tree = tiny_tree(tmp / "run", method="dpkd")
    tree["evaluate"]["reward_model"] = {"name_or_path": str(_save_reward_dir(tmp / "rm")), "batch_size": 5}
    plan = runner.make_plan(load_config(write_config(tmp / "c.yaml", tree)))
    runner.run(plan, ["all"], use_ray=False, echo=lambda s: None)
    folder = plan.folder("evaluate")
    rows = [json.loads(line) for line in (folder / "responses.jsonl").read_text().splitlines()]
    return plan, json.loads((folder / "results.json").read_text()), rows


def test_means_and_win_rates_match_hand_computation(evaluated):
    plan, results, rows = evaluated
    models = ["sft.student", "sft.teacher", "teacher_dpo", "train"]
    assert set(results) == set(models) and {r["model"] for r in rows} == set(models)
    by = {m: [r for r in rows if r["model"] == m] for m in models}
    n = len(by["sft.student"])
    assert n == results["train"]["n"] > 0 and all(len(v) == n for v in by.values())
    for kind in ("rm", "judge"):
        base = [r[kind] for r in by["sft.student"]]
        for m in models:
            s = [r[kind] for r in by[m]]
            wins = sum(1 for a, b in zip(s, base) if a > b) + 0.5 * sum(1 for a, b in zip(s, base) if a == b)
            assert results[m][f"{kind}_reward"] == pytest.approx(sum(s) / n, abs=1e-12)
            assert results[m][f"{kind}_win_rate"] == pytest.approx(wins / n, abs=1e-12)
        assert results["sft.student"][f"{kind}_win_rate"] == 0.5  # every prompt ties with itself
    table = (plan.folder("evaluate") / "table.txt").read_text()
    assert "rm_win_rate" in table and "judge_win_rate" in table


def test_judge_is_the_dpo_teachers_implicit_reward(evaluated):
    """One response, by hand: Σ log π_dpo(y|x) − Σ log π_ref(y|x) over the response tokens."""
    plan, _, rows = evaluated
    policy, tok = load_ref(model_ref(plan.folder("teacher_dpo")))
    reference, _ = load_ref(model_ref(plan.folder("sft.teacher")))
    from distill_pipeline.data.tokenize import encode_prompt

    for row in [r for r in rows if r["model"] == "train"][:3]:
        prompt = encode_prompt(tok, row["prompt"])
        ids = torch.tensor([prompt + row["response_ids"]])
        total = 0.0
        with torch.no_grad():
            for model, sign in ((policy, 1), (reference, -1)):
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
                total += sign * sum(logp[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1]))
        assert row["judge"] == pytest.approx(total, abs=1e-4)


def test_rm_scores_are_the_reward_models_scores_of_the_responses(evaluated):
    from distill_pipeline.reward import load_reward_model, reward_scores

    plan, _, rows = evaluated
    rm, rm_tok = load_reward_model(plan.cfg.evaluate.reward_model.name_or_path)
    some = rows[::7][:4]
    again = [reward_scores(rm, rm_tok, [r["prompt"]], [r["response"]])[0] for r in some]
    assert again == pytest.approx([r["rm"] for r in some], abs=1e-5)
