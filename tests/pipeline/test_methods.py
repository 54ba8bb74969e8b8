"""Every method's recipe runs end to end on the tiny config (in process), the DPO-teacher
extraction on y_w/y_l is shared by DCKD, TVKD, VanillaKD and DPKD, and ADPA+ expands into its
named nodes."""
from __future__ import annotations

import json
import math

import pytest

from distill_pipeline.losses import LOSSES, METHODS, method_loss
from distill_pipeline.pipeline import runner
from distill_pipeline.config import load_config
from tests.conftest import tiny_tree, write_config
from tests.loss_inputs import random_inputs


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("methods")


def run_method(shared, method):
    cfg = load_config(write_config(shared / f"{method}.yaml", tiny_tree(shared / "run", method=method)))
    plan = runner.make_plan(cfg)
    ran = runner.run(plan, ["all"], use_ray=False, echo=lambda s: None)
    return plan, ran


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_method_runs_end_to_end(shared, method):
    plan, _ = run_method(shared, method)
    assert all(plan.done(n.name) for n in plan.nodes)
    summary = json.loads((plan.folder("train") / "manifest.json").read_text())["summary"]
    assert summary["loss"] == method_loss(method)
    results = json.loads((plan.folder("evaluate") / "results.json").read_text())
    assert "train" in results and 0 <= results["train"]["task_accuracy"] <= 1
    metrics = [json.loads(l) for l in (plan.folder("train") / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4
    # every component the loss reports is logged, and the loss is finite
    spec = LOSSES[method_loss(method)]
    components = set(spec.fn(*random_inputs(spec.name).values(), **spec.options)[1])
    assert components | {"loss", "lr", "grad_norm"} <= set(metrics[-1])
    assert all(math.isfinite(m["loss"]) for m in metrics)


@pytest.mark.slow
def test_one_extraction_serves_every_pairs_method(shared):
    """DCKD, TVKD, VanillaKD and DPKD read one and the same DPO-teacher extraction on y_w/y_l."""
    pair_methods = [m for m in METHODS if LOSSES[method_loss(m)].cache == "pairs"]
    assert {"dckd", "tvkd", "vanilla_kd", "dpkd"} <= set(pair_methods)
    plans = {m: runner.make_plan(load_config(write_config(shared / f"{m}.yaml", tiny_tree(shared / "run", method=m))))
             for m in pair_methods}
    assert len({p.fingerprints["teacher_logits"] for p in plans.values()}) == 1
    run_method(shared, pair_methods[0])
    assert all(p.done("teacher_logits") for p in plans.values())


@pytest.mark.slow
def test_adpa_plus_nodes(shared):
    plan, _ = run_method(shared, "adpa+")
    names = [n.name for n in plan.nodes]
    assert names == ["sft.teacher", "sft.student", "teacher_dpo", "teacher_logits", "train.dckd",
                     "rollouts.dckd", "teacher_logits.rollouts", "train", "evaluate"]
    assert plan.node("train").needs["init"] == "train.dckd"
    assert plan.node("rollouts.dckd").needs["policy"] == "train.dckd"
    results = json.loads((plan.folder("evaluate") / "results.json").read_text())
    assert {"train.dckd", "train"} <= set(results)
    # each node reruns by name
    again = runner.make_plan(plan.cfg)
    assert runner.run(again, ["rollouts.dckd"], force=True, use_ray=False, echo=lambda s: None) == ["rollouts.dckd"]


def test_unknown_loss_option_is_a_config_error(shared):
    from distill_pipeline.config import ConfigError
    path = write_config(shared / "bad.yaml", tiny_tree(shared / "run", method="tvkd"))
    with pytest.raises(ConfigError, match="train.loss.potential: 'nope' is not one of teacher_value, student_entropy"):
        load_config(path, ["train.loss.potential=nope"])
    with pytest.raises(ConfigError, match="train.dckd_loss: only used by method adpa\\+"):
        load_config(path, ["train.dckd_loss.alpha=0.2"])


@pytest.mark.slow
def test_compare_table_and_plot(shared, tmp_path):
    import subprocess
    import sys
    for m in ("dckd", "adpa+"):
        run_method(shared, m)
    out = subprocess.run([sys.executable, "-m", "distill_pipeline.cli.main", "compare", str(shared / "run"),
                          "--out", str(tmp_path / "c.png")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["method", "task_accuracy", "reward_accuracy", "mean_length", "task_reward",
                                "judge_reward", "judge_win_rate"]
    labels = {l.split()[0] for l in lines[1:] if l and not l.startswith("wrote")}
    assert {"sft.student", "sft.teacher", "teacher_dpo", "dckd", "adpa+"} <= labels
    png = (tmp_path / "c.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["sft.student"]["judge_win_rate"] == 0.5 and 0 <= data["adpa+"]["judge_win_rate"] <= 1
    assert data["adpa+"]["curve"] and data["dckd"]["curve"]
