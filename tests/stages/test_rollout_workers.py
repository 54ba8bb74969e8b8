"""Sharded rollouts: `rollouts.num_workers` Ray workers, each taking whole batches of one
length-sorted plan (sampling seeded per batch), give exactly the rollouts of one worker."""
from __future__ import annotations

import json

import pytest

from distill_pipeline.pipeline import runner
from distill_pipeline.config import load_config
from tests.conftest import tiny_tree, write_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_two_workers_give_the_rollouts_of_one(tmp_path, temperature):
    outputs = {}
    for workers, use_ray in ((1, False), (2, True)):
        tree = tiny_tree(tmp_path / f"run-{workers}", method="adpa")
        tree["rollouts"].update(batch_size=4, num_workers=workers, temperature=temperature)
        plan = runner.make_plan(load_config(write_config(tmp_path / f"c{workers}.yaml", tree)))
        runner.run(plan, ["rollouts"], use_ray=use_ray, echo=lambda s: None)
        outputs[workers] = (plan.folder("rollouts") / "rollouts.jsonl").read_text()
        summary = json.loads((plan.folder("rollouts") / "manifest.json").read_text())["summary"]
        assert summary["workers"] == workers
        assert plan.fingerprints["rollouts"] == runner.make_plan(
            load_config(write_config(tmp_path / "other.yaml", {**tree, "rollouts": {
                **tree["rollouts"], "num_workers": 3 - workers}}))).fingerprints["rollouts"]
    assert outputs[1].count("\n") == 24 and outputs[1] == outputs[2]
