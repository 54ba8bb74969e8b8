"""Gradient accumulation: 1 micro-batch of 4 ≡ 4 micro-batches of 1 (same trajectory)."""
from __future__ import annotations

import json

import pytest
import torch

from distill_pipeline.models import load_checkpoint
from distill_pipeline.pipeline import runner
from distill_pipeline.pipeline.config import load_config
from tests.conftest import tiny_tree, write_config


@pytest.mark.parametrize("method, atol", [("dpo", 1e-5), ("dckd", 5e-3)])
def test_one_by_four_equals_four_by_one(tmp_path, method, atol):
    trajectories, weights = [], []
    for batch, accum in ((4, 1), (1, 4)):
        tree = tiny_tree(tmp_path / "run", method=method)
        tree["train"] = {"lr": 1e-3, "max_steps": 3, "batch_size": batch, "grad_accum": accum,
                         "checkpoint_every": 3}
        cfg = load_config(write_config(tmp_path / f"{batch}x{accum}.yaml", tree))
        plan = runner.make_plan(cfg)
        runner.run(plan, ["train"], use_ray=False, echo=lambda s: None)
        lines = [json.loads(l) for l in (plan.folder("train") / "metrics.jsonl").read_text().splitlines()]
        trajectories.append([l["loss"] for l in lines])
        weights.append(load_checkpoint(plan.folder("train") / "model")[0].state_dict())
    # token-mean losses (DCKD's SFT and KL terms) weight tokens per micro-batch, so they match
    # to a tolerance; pair-mean losses (DPO) match to float precision
    assert trajectories[0] == pytest.approx(trajectories[1], abs=atol * 10)
    for k in weights[0]:
        assert torch.allclose(weights[0][k], weights[1][k], atol=atol), k
