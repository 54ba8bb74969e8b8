"""Fingerprints change exactly when a node's own config, its stage version or an upstream changes."""
from __future__ import annotations

import json

import pytest

from distill_pipeline.pipeline import runner
from distill_pipeline.pipeline.config import load_config
from distill_pipeline.stages import get_stage


def fps(config, *sets):
    return runner.make_plan(load_config(config, list(sets))).fingerprints


def changed(a, b):
    return {k for k in a if a[k] != b[k]}


def test_stable_across_loads(tiny_config):
    assert fps(tiny_config) == fps(tiny_config)


@pytest.mark.parametrize("override, expected", [
    ("teacher_dpo.beta=0.3", {"teacher_dpo", "evaluate", "teacher_logits", "train"}),
    ("sft.student.lr=0.01", {"sft.student", "evaluate", "train", "rollouts"}),
    ("rollouts.max_new_tokens=9", {"rollouts"}),
    ("evaluate.max_new_tokens=9", {"evaluate", "train"}),  # train validates with it
    ("models.teacher.dtype=bfloat16", {"sft.teacher", "teacher_dpo", "evaluate", "teacher_logits", "train"}),
    ("data.numbers.seed=5", None),  # every node reads the built-in task
    ("ray.num_cpus=1", set()),
    ("resources.train_cpus=2", set()),
])
def test_exactly_the_right_nodes_change(tiny_config, override, expected):
    base, new = fps(tiny_config), fps(tiny_config, override)
    if expected is None:
        assert changed(base, new) == set(base)
    else:
        assert changed(base, new) == expected & set(base)


def test_stage_version_bump_changes_node_and_dependents(tiny_config, monkeypatch):
    base = fps(tiny_config)
    monkeypatch.setattr(get_stage("teacher_dpo"), "VERSION", 99)
    assert changed(base, fps(tiny_config)) == {"teacher_dpo", "evaluate"} | ({"teacher_logits", "train"} & set(base))


def test_dataset_file_content_is_fingerprinted(tmp_path, tiny_config):
    import yaml
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "digits: one", "completion": "1"}\n')
    tree = yaml.safe_load(tiny_config.read_text())
    tree["data"]["sft"] = {"source": str(data)}
    tiny_config.write_text(yaml.safe_dump(tree))
    base = fps(tiny_config)
    data.write_text('{"prompt": "digits: two", "completion": "2"}\n')
    assert {"sft.teacher", "sft.student"} <= changed(base, fps(tiny_config))


def test_status_explains_why(tiny_config, tmp_path):
    plan = runner.make_plan(load_config(tiny_config))
    assert runner.why(plan, "teacher_dpo") == "never run"
    # pretend teacher_dpo was published with beta 0.1, then ask with beta 0.3
    state = tmp_path / "run" / ".state"
    state.mkdir(parents=True)
    (state / "teacher_dpo.json").write_text(json.dumps({
        "fingerprint": plan.fingerprints["teacher_dpo"], "version": 1,
        "view": runner.fingerprinted_view(plan.node("teacher_dpo")),
        "inputs": {"reference": plan.fingerprints["sft.teacher"]}}))
    plan2 = runner.make_plan(load_config(tiny_config, ["teacher_dpo.beta=0.3"]))
    assert runner.why(plan2, "teacher_dpo") == "teacher_dpo.beta 0.1 → 0.3"
    plan3 = runner.make_plan(load_config(tiny_config, ["sft.teacher.lr=0.5"]))
    assert runner.why(plan3, "teacher_dpo") == "upstream sft.teacher changed"


def test_select_closure_and_unknown_target(tiny_config):
    plan = runner.make_plan(load_config(tiny_config))
    assert runner.select(plan, ["teacher_dpo"]) == ["sft.teacher", "teacher_dpo"]
    assert set(runner.select(plan, ["sft"])) == {"sft.teacher", "sft.student"}
    with pytest.raises(runner.PipelineError, match="no node or stage 'bogus'"):
        runner.select(plan, ["bogus"])


def test_status_names_a_changed_input_node(tmp_path):
    from tests.conftest import tiny_tree, write_config
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_tree(tmp_path / "run", method="adpa")))
    plan = runner.make_plan(cfg)
    state = tmp_path / "run" / ".state"
    state.mkdir(parents=True)
    node = plan.node("train")
    (state / "train.json").write_text(json.dumps({
        "fingerprint": "x", "version": 1, "view": runner.fingerprinted_view(node),
        "inputs": {**{r: plan.fingerprints[u] for r, u in node.needs.items()}, "old": "y"},
        "input_nodes": {**node.needs, "init": "train.dckd", "old": "something"}}))
    assert runner.why(plan, "train") == "input init: train.dckd → sft.student; no longer reads something"
