"""Importing models instead of training them (issue 10's done-when): after a run, a second run
importing its three model folders — copied elsewhere, memo files removed, a README added — runs
no SFT or teacher DPO, extracts nothing (same identities, one store), trains and evaluates."""
from __future__ import annotations

import json
import shutil

import pytest

from distill_pipeline.identity import MEMO_NAME, content_identity
from distill_pipeline.models import ModelError
from distill_pipeline.pipeline import runner
from distill_pipeline.config import load_config
from tests.conftest import tiny_tree, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imports")
    tree = tiny_tree(tmp / "run", method="adpa")
    plan = runner.make_plan(load_config(write_config(tmp / "first.yaml", tree)))
    runner.run(plan, ["all"], use_ray=False, echo=lambda s: None)
    return tmp, tree, plan


def _import_tree(tmp, tree, copies):
    second = json.loads(json.dumps(tree))
    second["run_dir"] = str(tmp / "second-run")
    second["models"] = {role: {"name_or_path": str(path)} for role, path in copies.items()}
    return second


@pytest.fixture(scope="module")
def copies(first_run):
    tmp, _, plan = first_run
    out = {}
    for role, node in (("teacher_dpo", "teacher_dpo"), ("reference", "sft.teacher"),
                       ("student_init", "sft.student")):
        dst = tmp / "elsewhere" / role
        shutil.copytree(plan.folder(node) / "model", dst)
        (dst / MEMO_NAME).unlink()
        out[role] = dst
    (out["teacher_dpo"] / "README.md").write_text("# my aligned teacher\n")
    return out


def test_imported_models_train_and_evaluate_without_sft_dpo_or_extraction(first_run, copies):
    tmp, tree, first = first_run
    cfg = load_config(write_config(tmp / "second.yaml", _import_tree(tmp, tree, copies)))
    plan = runner.make_plan(cfg)
    stages = {n.name: n.stage for n in plan.nodes}
    assert stages["teacher_dpo"] == stages["sft.teacher"] == stages["sft.student"] == "import_model"
    assert "sft" not in stages.values() and "teacher_dpo" not in stages.values()
    for node in ("teacher_dpo", "sft.teacher", "sft.student"):  # the trained folders' identities
        assert plan.node(node).view.identity == content_identity(first.folder(node) / "model")
    lines: list[str] = []
    ran = runner.run(plan, ["all"], use_ray=False, echo=lines.append)
    assert ran == ["sft.teacher", "sft.student", "teacher_dpo", "rollouts", "teacher_logits.rollouts",
                   "train", "evaluate"]
    summary = json.loads((plan.folder("teacher_logits.rollouts") / "manifest.json").read_text())["summary"]
    assert summary["extracted"] == 0 and summary["cached"] == summary["entries"] > 0
    teachers = [json.loads((p.folder("teacher_logits.rollouts") / "teachers.json").read_text())
                for p in (first, plan)]
    first_ids, second_ids = ({r: t["identity"] for r, t in ts["teachers"].items()} for ts in teachers)
    assert first_ids == second_ids and len(first_ids) == 2
    # same student start, same greedy rollouts, same cache entries: the student trains the same
    assert ((plan.folder("rollouts") / "rollouts.jsonl").read_text()
            == (first.folder("rollouts") / "rollouts.jsonl").read_text())
    results = json.loads((plan.folder("evaluate") / "results.json").read_text())
    assert set(results) == {"sft.student", "sft.teacher", "teacher_dpo", "train"}
    rows = dict((n, text) for n, _, text in runner.status(plan))
    ident = plan.node("teacher_dpo").view.identity
    assert rows["teacher_dpo"].startswith(f"imported {ident[:12]} from {copies['teacher_dpo']}")


def test_import_moved_elsewhere_reruns_only_the_import(first_run, copies):
    tmp, tree, _ = first_run
    cfg = load_config(write_config(tmp / "second.yaml", _import_tree(tmp, tree, copies)))
    before = runner.make_plan(cfg)
    moved = tmp / "moved-teacher"
    shutil.copytree(copies["teacher_dpo"], moved)
    tree2 = _import_tree(tmp, tree, {**copies, "teacher_dpo": moved})
    after = runner.make_plan(load_config(write_config(tmp / "moved.yaml", tree2)))
    changed = {n for n in before.fingerprints if before.fingerprints[n] != after.fingerprints[n]}
    assert changed == {"teacher_dpo"}  # the path is layout: nothing downstream reruns


def test_weights_changed_in_place_change_the_identity_and_are_refused_at_load(first_run, copies, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from distill_pipeline.models import model_ref, ref_identity

    tmp, tree, _ = first_run
    victim = tmp_path / "student"
    shutil.copytree(copies["student_init"], victim)
    tree2 = _import_tree(tmp, tree, {**copies, "student_init": victim})
    tree2["run_dir"] = str(tmp_path / "run")
    plan = runner.make_plan(load_config(write_config(tmp_path / "c.yaml", tree2)))
    runner.run(plan, ["sft.student"], use_ray=False, echo=lambda s: None)
    ref = model_ref(plan.folder("sft.student"))
    assert ref_identity(ref) == plan.node("sft.student").view.identity
    weights = victim / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + torch.ones_like(tensors[name])
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelError, match="changed after it was imported"):
        ref_identity(ref)
    replanned = runner.make_plan(load_config(write_config(tmp_path / "c.yaml", tree2)))
    assert replanned.node("sft.student").view.identity != plan.node("sft.student").view.identity
    assert not replanned.done("sft.student")
