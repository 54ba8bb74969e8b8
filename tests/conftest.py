"""Shared fixtures: a tiny, fast config (seconds per stage on CPU) written to a temp dir."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("DISTILL_PROGRESS", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]


def tiny_tree(run_dir: Path, **top) -> dict:
    hp = {"lr": 3e-3, "max_steps": 4, "batch_size": 8, "checkpoint_every": 2}
    tree = {
        "run_dir": str(run_dir),
        "method": "dckd",
        "models": {"teacher": {"preset": "tiny-teacher"}, "student": {"preset": "tiny-student"}},
        "data": {"sft": {"source": "builtin:numbers"}, "preferences": {"source": "builtin:numbers"},
                 "eval": {"source": "builtin:numbers"}, "validation": {"source": "builtin:numbers"},
                 "numbers": {"n_sft": 48, "n_pairs": 24, "n_eval": 12, "n_validation": 8, "max_value": 9999},
                 "max_length": 48},
        "sft": {"teacher": hp, "student": hp},
        "teacher_dpo": {**hp, "beta": 0.1},
        "rollouts": {"max_new_tokens": 6, "batch_size": 8},
        "teacher_logits": {"top_k": 8, "batch_tokens": 256, "store": str(run_dir.parent / "store")},
        "train": {**hp},
        "evaluate": {"max_new_tokens": 6, "batch_size": 16},
        "ray": {"num_cpus": 2},
    }
    tree.update(top)
    return tree


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need a CUDA device: skipped (not failed) where none is visible, as in CI."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "tiny.yaml", tiny_tree(tmp_path / "run"))


@pytest.fixture(scope="session")
def adpa_run(tmp_path_factory):
    """One tiny ADPA run, every node, in process (~15 s on an idle 2-core machine), shared by the
    tests that only read its outputs (stage outputs, model cards, the run report). Its store is
    beside it."""
    from distill_pipeline.config import load_config
    from distill_pipeline.pipeline import runner

    tmp = tmp_path_factory.mktemp("adpa_run")
    cfg = load_config(write_config(tmp / "c.yaml", tiny_tree(tmp / "run", method="adpa")))
    plan = runner.make_plan(cfg)
    ran = runner.run(plan, ["all"], use_ray=False, echo=lambda s: None)
    assert ran == [n.name for n in plan.nodes]
    return plan
