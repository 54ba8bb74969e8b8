"""Gradient accumulation: 1 micro-batch of 4 ≡ 4 micro-batches of 1, step by step.

Losses are normalised by the whole optimizer step's token / pair counts (training.py), so the
two splits compute the same loss and the same gradient at every step, up to float32 summation
order — for pair-mean (DPO), token-mean (DCKD) and rollout-based (ADPA) losses alike.
"""
from __future__ import annotations

import json

import pytest
import torch

from distill_pipeline import training
from distill_pipeline.models import load_checkpoint
from distill_pipeline.pipeline import runner
from distill_pipeline.config import load_config
from tests.conftest import tiny_tree, write_config

RTOL = 1e-5
pytestmark = pytest.mark.slow  # trains the tiny pipeline several times


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    return tmp_path_factory.mktemp("accum")


def trajectory(root, method, batch, accum, checkpoint_every=3):
    """(per-step losses, per-step grad norms, final weights) of the train node. Any
    checkpoint_every ≥ 3 gives the same run (the last step always checkpoints) in its own folder."""
    tree = tiny_tree(root / "run", method=method)
    tree["train"] = {"lr": 1e-3, "max_steps": 3, "batch_size": batch, "grad_accum": accum,
                     "checkpoint_every": checkpoint_every}
    cfg = load_config(write_config(root / f"{method}-{batch}x{accum}-{checkpoint_every}.yaml", tree))
    plan = runner.make_plan(cfg)
    runner.run(plan, ["train"], use_ray=False, echo=lambda s: None)
    lines = [json.loads(l) for l in (plan.folder("train") / "metrics.jsonl").read_text().splitlines()]
    weights = load_checkpoint(plan.folder("train") / "model")[0].state_dict()
    return [l["loss"] for l in lines], [l["grad_norm"] for l in lines], weights


def same(a, b) -> bool:
    (la, ga, wa), (lb, gb, wb) = a, b
    return (la == pytest.approx(lb, rel=RTOL) and ga == pytest.approx(gb, rel=RTOL)
            and all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5) for k in wa))


@pytest.mark.parametrize("method", ["dpo", "dckd", "adpa"])
def test_one_by_four_equals_four_by_one(run_root, method):
    one = trajectory(run_root, method, 4, 1)
    four = trajectory(run_root, method, 1, 4)
    assert one[0] == pytest.approx(four[0], rel=RTOL)  # every step's loss
    assert one[1] == pytest.approx(four[1], rel=RTOL)  # every step's gradient norm
    for k in one[2]:
        assert torch.allclose(one[2][k], four[2][k], rtol=0, atol=1e-5), k


def test_the_check_fails_on_a_loop_that_keeps_only_the_last_micro_batch(run_root, monkeypatch):
    """The invariant can fail: a loop that zeroes the gradient before every micro-batch (so only
    the last micro-batch's gradient reaches the optimizer) is caught at the first step."""
    reference = trajectory(run_root, "dckd", 4, 1)
    assert same(reference, trajectory(run_root, "dckd", 1, 4, checkpoint_every=5))  # unmutated: equal
    real = training.train_loop

    def last_micro_batch_only(model, *, loss_fn, **kw):
        def mutated(m, batch, norm):
            m.zero_grad(set_to_none=True)
            return loss_fn(m, batch, norm)
        return real(model, loss_fn=mutated, **kw)

    monkeypatch.setattr(training, "train_loop", last_micro_batch_only)
    mutated = trajectory(run_root, "dckd", 1, 4, checkpoint_every=4)
    assert not same(reference, mutated)
    assert mutated[1][0] != pytest.approx(reference[1][0], rel=RTOL)  # the very first grad norm differs
