"""The real loading paths on local files: models from checkpoint directories, datasets from
JSONL / Parquet files and from a `datasets` folder through the hf:// path — end to end."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from distill_pipeline.data.readers import read_dataset
from distill_pipeline.data.toy import make_task
from distill_pipeline.pipeline import runner
from distill_pipeline.config import DataSpec, load_config
from tests.conftest import tiny_tree, write_config


def test_pipeline_on_local_models_and_files(tmp_path, monkeypatch):
    from distill_pipeline.models import load_model, load_tokenizer, save_model
    from distill_pipeline.config import ModelSpec

    for role in ("teacher", "student"):
        spec = ModelSpec(preset=f"tiny-{role}")
        save_model(load_model(spec, seed=3), load_tokenizer(spec), tmp_path / f"{role}-ckpt")
    task = make_task(n_sft=40, n_pairs=20, n_eval=10, n_validation=5, max_value=9999, noise=0.5, seed=1)
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                    {"role": "assistant", "content": r["completion"]}]}) + "\n"
                           for r in task["sft"]))
    prefs = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist(task["preferences"]), prefs)
    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps(r) + "\n" for r in task["eval"]))
    tree = tiny_tree(tmp_path / "run", method="dckd")
    tree["models"] = {"teacher": {"name_or_path": str(tmp_path / "teacher-ckpt")},
                      "student": {"name_or_path": str(tmp_path / "student-ckpt")}}
    tree["data"].update(sft={"source": str(sft)}, preferences={"source": str(prefs)},
                        eval={"source": str(ev)}, validation=None)
    plan = runner.make_plan(load_config(write_config(tmp_path / "c.yaml", tree)))
    ran = runner.run(plan, ["all"], use_ray=False, echo=lambda s: None)
    assert ran == ["sft.teacher", "sft.student", "teacher_dpo", "teacher_logits", "train", "evaluate"]
    results = json.loads((plan.folder("evaluate") / "results.json").read_text())
    assert results["train"]["n"] == 10 and "task_accuracy" in results["train"]  # eval rows carry `answer`
    manifest = json.loads((plan.folder("sft.student") / "manifest.json").read_text())
    assert manifest["config"]["model"]["name_or_path"] == str(tmp_path / "student-ckpt")
    assert len(manifest["config"]["data"]["sha256"]) == 64


def test_hf_path_reads_a_local_datasets_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "my-prefs"
    folder.mkdir()
    rows = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(5)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, bad = read_dataset(DataSpec(source=f"hf://{folder}", split="train"), "preferences")
    assert len(out) == 5 and bad.count == 0 and out[0]["chosen"] == "good"
