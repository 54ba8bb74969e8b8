"""The replication benchmark: its seeds, the paired bootstrap interval and its verdict."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("replicate", ROOT / "benchmarks/replicate.py")
replicate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(replicate)


def test_interval_of_a_clear_difference_excludes_zero_and_holds():
    rng = np.random.default_rng(1)
    diffs = [rng.normal(0.05, 0.1, 200) for _ in range(5)]
    point, lo, hi = replicate.paired_bootstrap(diffs, n_boot=4000)
    assert point == pytest.approx(np.mean([d.mean() for d in diffs]))
    assert 0 < lo < point < hi
    assert replicate.verdict(lo, hi) == "holds"
    point, lo, hi = replicate.paired_bootstrap([-d for d in diffs], n_boot=4000)
    assert lo < hi < 0 and replicate.verdict(lo, hi) == "reversed"


def test_interval_covers_seed_to_seed_spread_not_only_prompt_noise():
    # every seed's prompts agree tightly, but the seeds disagree on the sign: inconclusive
    diffs = [np.full(200, m) + np.random.default_rng(k).normal(0, 0.01, 200)
             for k, m in enumerate([0.06, -0.04, 0.05, -0.05, 0.02])]
    _, lo, hi = replicate.paired_bootstrap(diffs, n_boot=4000)
    assert lo < 0 < hi and replicate.verdict(lo, hi) == "inconclusive"
    assert hi - lo > 0.04  # the seeds' spread, not the prompts' (~0.002)


def test_interval_matches_a_plain_two_level_bootstrap():
    rng = np.random.default_rng(3)
    diffs = [rng.normal(m, 0.2, 50) for m in (0.0, 0.1, 0.02)]
    _, lo, hi = replicate.paired_bootstrap(diffs, n_boot=20_000, seed=5)
    plain = []
    for _ in range(20_000):  # the definition, one resample at a time
        seeds = rng.integers(3, size=3)
        plain.append(np.mean([diffs[s][rng.integers(50, size=50)].mean() for s in seeds]))
    assert lo == pytest.approx(np.percentile(plain, 2.5), abs=0.006)
    assert hi == pytest.approx(np.percentile(plain, 97.5), abs=0.006)


def test_a_seed_covers_the_whole_pipeline_unless_the_task_seed_pins_it(tmp_path):
    tree = replicate.task_tree("numbers-ranked", tmp_path, smoke=True)
    paths = [".".join(p) for p in replicate.TRAIN_SECTIONS]

    def seeds(t: dict) -> dict:
        return {"data": t["data"]["numbers"]["seed"],
                **{".".join(path): node["seed"] for path, node in replicate.sections(t)}}

    assert seeds(replicate.seeded(tree, 4, None)) == {"data": 4, **{p: 4 for p in paths}}
    pinned = seeds(replicate.seeded(tree, 4, 1))
    assert pinned == {"data": 1, "sft.teacher": 1, "sft.student": 1, "teacher_dpo": 1, "train": 4}
    assert tree["teacher_dpo"]["beta"] == 0.05  # the paper's protocol on every training node
    for _, node in replicate.sections(tree):
        assert (node["warmup_ratio"], node["weight_decay"], node["max_grad_norm"]) == (0.1, 0.0, 1.0)


def test_each_row_trains_what_its_name_says(tmp_path):
    tree = replicate.seeded(replicate.task_tree("numbers-ranked", tmp_path, smoke=True), 0, None)
    st = replicate.setting_tree
    plus = st(tree, "adpa+", {"alpha": 0.5, "gamma": 2.0, "lr": 3e-4})
    assert plus["method"] == "adpa+" and plus["train"]["dckd_loss"] == {"alpha": 0.5}
    assert plus["train"]["loss"] == {"gamma": 2.0} and plus["train"]["lr"] == 3e-4
    assert st(tree, "adpa-no-sft", {"gamma": 2.0, "lr": 1e-3})["train"]["loss"] == {"gamma": 2.0, "sft_weight": 0.0}
    no_yl = st(tree, "dckd-no-yl", {"alpha": 0.5, "lr": 1e-3})
    assert no_yl["method"] == "vanilla_kd" and no_yl["train"]["loss"] == {"alpha": 0.5}
    assert st(tree, "sft-yw", {"lr": 1e-4})["method"] == "sft"
    assert st(tree, "dckd", {"alpha": 2.0, "lr": 1e-4})["train"]["loss"] == {"alpha": 2.0}
    assert "teacher_dpo" not in st(tree, "dckd", {"alpha": 2.0, "lr": 1e-4})["models"]
    swapped = st(tree, "dckd-sft-teacher", {"alpha": 2.0, "lr": 1e-4})  # trains the seed's SFT teacher
    plan = replicate.runner.make_plan(replicate.config_from_dict({**tree, "method": "dckd"}))
    assert swapped["method"] == "dckd"
    assert swapped["models"]["teacher_dpo"] == {"name_or_path": str(plan.folder("sft.teacher") / "model")}
