"""The memory plan: parameter counts from the config alone (meta device), a line per node,
and nodes that cannot fit refused — by `plan` and by `run`'s preflight, before any compute."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from distill_pipeline.pipeline import runner
from distill_pipeline.pipeline.config import ModelSpec, config_from_dict
from distill_pipeline.pipeline.memory import check, model_shape, plan_memory, report, training
from tests.conftest import ROOT, tiny_tree, write_config


def test_parameters_are_counted_without_weights(tmp_path):
    from distill_pipeline.models import load_model, load_tokenizer, save_model

    for preset in ("tiny-teacher", "tiny-student"):
        spec = ModelSpec(preset=preset)
        model = load_model(spec)
        real = sum(p.numel() for p in model.parameters())
        assert model_shape(spec).params == real
        save_model(model, load_tokenizer(spec), tmp_path / preset)
        assert model_shape(ModelSpec(name_or_path=str(tmp_path / preset))).params == real


def test_training_estimate_adds_its_parts():
    from distill_pipeline.pipeline.memory import Shape

    shape = Shape(params=1000, layers=2, hidden=8, intermediate=16, vocab=100, kv_hidden=8, bytes_per_param=4)
    parts = training(shape, sequences=3, length=5)
    assert parts["weights"] == parts["gradients"] == 4000 and parts["optimizer (AdamW)"] == 8000
    assert parts["activations"] == 15 * 2 * (10 * 8 + 4 * 16) * 4
    assert parts["logits (B x T x V, float32)"] == 3 * 15 * 100 * 4


def test_every_node_is_estimated_and_small_devices_refused(tmp_path):
    tree = tiny_tree(tmp_path / "run", method="adpa")
    plan = runner.make_plan(config_from_dict(tree))
    estimates = {e.node: e for e in plan_memory(plan)}
    assert list(estimates) == [n.name for n in plan.nodes]
    assert estimates["teacher_dpo"].total > estimates["sft.teacher"].total > 0  # pairs: twice the sequences
    assert check(plan) == [] and "device: RAM" in report(plan)
    tree["resources"] = {"gpus": 1, "gpu_memory_gb": 0.001}
    small = runner.make_plan(config_from_dict(tree))
    problems = check(small)
    assert problems and problems[0].startswith("sft.teacher: needs about")
    assert "smaller batch_size with a larger grad_accum" in problems[0]
    with pytest.raises(runner.PipelineError, match="not enough memory"):
        runner.run(small, ["all"], use_ray=False, echo=lambda s: None)
    assert not any((tmp_path / "run").glob("sft.*-*"))  # refused before any stage ran
    ran = runner.run(small, ["sft.student"], use_ray=False, echo=lambda s: None, memory_check=False)
    assert ran == ["sft.student"]  # the user's call: run anyway


def test_plan_command(tmp_path):
    tree = tiny_tree(tmp_path / "run", method="dckd")
    config = write_config(tmp_path / "c.yaml", tree)
    cli = [sys.executable, "-m", "distill_pipeline.cli.main", "plan", "-c", str(config)]
    ok = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT, timeout=120, env=os.environ)
    assert ok.returncode == 0 and "teacher_logits" in ok.stdout and "DOES NOT FIT" not in ok.stdout
    bad = subprocess.run(cli + ["--set", "resources.gpus=1", "--set", "resources.gpu_memory_gb=0.001"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120, env=os.environ)
    assert bad.returncode == 1 and "DOES NOT FIT" in bad.stdout and "needs about" in bad.stderr
    assert "Traceback" not in bad.stderr
