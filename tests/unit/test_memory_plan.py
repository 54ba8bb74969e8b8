"""The memory plan: parameter counts from the config alone (meta device), a line per node,
and nodes that cannot fit refused — by `plan` and by `run`'s preflight, before any compute."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from distill_pipeline.pipeline import runner
from distill_pipeline.config import ModelSpec, config_from_dict
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
    assert parts["logits (B x T x V)"] == 3 * 15 * 100 * 4


def test_training_options_change_the_estimate():
    from types import SimpleNamespace

    from distill_pipeline.pipeline.memory import Shape

    shape = Shape(params=8000, layers=4, hidden=8, intermediate=16, vocab=100, kv_hidden=8, bytes_per_param=4)

    def hp(**kw):
        return SimpleNamespace(**{"precision": "fp32", "gradient_checkpointing": False, "workers": 1,
                                  "strategy": "ddp", "lora": None, **kw})

    base = training(shape, 3, 5, hp())
    assert base == training(shape, 3, 5)  # the defaults
    ckpt = training(shape, 3, 5, hp(gradient_checkpointing=True))
    assert ckpt["activations"] == 15 * (4 * 8 + 10 * 8 + 4 * 16) * 4 < base["activations"]
    bf16 = training(shape, 3, 5, hp(precision="bf16"))
    assert bf16["weights"] == 8000 * 2 and bf16["optimizer (AdamW)"] == 4 * 8000
    mixed = training(shape, 3, 5, hp(precision="bf16-mixed"))
    assert mixed["weights"] == base["weights"] and mixed["activations"] == base["activations"] // 2
    assert mixed["logits (B x T x V)"] == 3 * 15 * 100 * 2 + 3 * 15 * 100 * 4  # + float32 chunks
    fsdp = training(shape, 3, 5, hp(workers=4, strategy="fsdp"))
    assert fsdp["weights"] == base["weights"] // 4 and fsdp["optimizer (AdamW)"] == base["optimizer (AdamW)"] // 4
    assert fsdp["FSDP gathered (root + 2 layers)"] == (2 * 100 * 8 + 2 * 2000) * 4
    ddp = training(shape, 3, 5, hp(workers=4))
    assert ddp["weights"] == base["weights"] and ddp["DDP gradient buckets"] == base["gradients"]


def _llama_8b(folder):
    """A local model directory holding only Llama-3.1-8B's config.json and a tokenizer."""
    import json

    from distill_pipeline.models import TINY_TOKENIZER

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16"}))
    (folder / "tokenizer.json").write_text(TINY_TOKENIZER.read_text())
    return folder


def test_an_8b_teacher_is_refused_on_one_80gb_gpu_and_fits_sharded_over_8(tmp_path):
    teacher = _llama_8b(tmp_path / "llama-8b")
    tree = tiny_tree(tmp_path / "run", method="dckd")
    tree["models"]["teacher"] = {"name_or_path": str(teacher), "dtype": "bfloat16"}
    tree["data"]["max_length"] = 1024
    tree["sft"]["teacher"] = {"batch_size": 8, "grad_accum": 16, "precision": "bf16"}  # bf16 weights
    tree["resources"] = {"gpus": 1, "gpu_memory_gb": 80}
    estimate = {e.node: e for e in plan_memory(runner.make_plan(config_from_dict(tree)))}["sft.teacher"]
    assert estimate.parts["weights"] == 8_030_261_248 * 2  # Llama-3.1-8B, counted on the meta device
    problems = check(runner.make_plan(config_from_dict(tree)))
    assert problems and problems[0].startswith("sft.teacher: needs about 122.48 GB")
    assert "`workers: N` with `strategy: fsdp` on sft.teacher" in problems[0]
    tree["sft"]["teacher"].update(workers=8, strategy="fsdp")
    sharded = runner.make_plan(config_from_dict(tree))
    assert not [p for p in check(sharded) if p.startswith("sft.teacher")]
    assert "sft.teacher" in report(sharded) and "FSDP gathered" in report(sharded)
    # float32 master weights (bf16-mixed) double weights, gradients and AdamW state: on 8 FSDP
    # workers it still fits; on one GPU the advice names sharding and checkpointing
    def teacher(plan):
        return {e.node: e for e in plan_memory(plan)}["sft.teacher"]

    tree["sft"]["teacher"].update(precision="bf16-mixed")
    mixed = runner.make_plan(config_from_dict(tree))
    assert teacher(mixed).parts["weights"] == 8_030_261_248 * 4 // 8
    assert not [p for p in check(mixed) if p.startswith("sft.teacher")]
    tree["sft"]["teacher"].update(workers=1)
    single = check(runner.make_plan(config_from_dict(tree)))
    assert single[0].startswith("sft.teacher") and "bf16 weight copies (autocast)" in single[0]
    assert "`workers: N` with `strategy: fsdp`" in single[0] and "`gradient_checkpointing: true`" in single[0]


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


@pytest.mark.parametrize("field, value", [("hidden_size", -64), ("num_hidden_layers", 0),
                                          ("vocab_size", 0), ("num_attention_heads", -1)])
def test_plan_refuses_a_model_config_with_impossible_sizes(tmp_path, field, value):
    """A negative hidden size used to crash `plan` ("unexpected RuntimeError … this is a bug");
    zero layers planned an empty model and exited 0. Refused, naming the model and the field."""
    import json

    teacher = _llama_8b(tmp_path / "teacher")
    config = json.loads((teacher / "config.json").read_text())
    config[field] = value
    (teacher / "config.json").write_text(json.dumps(config))
    tree = tiny_tree(tmp_path / "run", method="dckd")
    tree["models"]["teacher"] = {"name_or_path": str(teacher)}
    cli = [sys.executable, "-m", "distill_pipeline.cli.main", "plan", "-c",
           str(write_config(tmp_path / "c.yaml", tree))]
    out = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT, timeout=120, env=os.environ)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"model '{teacher}'" in out.stderr and f"{field} is {value}" in out.stderr, out.stderr
    assert str(teacher / "config.json") in out.stderr, out.stderr
    assert "bug" not in out.stderr and "Traceback" not in out.stderr, out.stderr


def _llama_1b(folder):
    """Llama-3.2-1B's config.json (tied embeddings) and a tokenizer."""
    import json

    _llama_8b(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, tie_word_embeddings=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_lora_adapters_are_counted_exactly():
    from distill_pipeline.config import LoraSpec, TrainHP
    from distill_pipeline.pipeline.memory import Shape, lora_params

    llama_8b = Shape(params=8_030_261_248, layers=32, hidden=4096, intermediate=14336, vocab=128256,
                     kv_hidden=1024, bytes_per_param=2)
    # peft's count for r=16 on every linear layer of Llama-3-8B: 41,943,040 (print_trainable_parameters)
    assert lora_params(llama_8b, LoraSpec(r=16, target_modules="all-linear")) == 41_943_040
    assert lora_params(llama_8b, LoraSpec(r=8, target_modules=["q_proj", "v_proj"])) == 8 * 32 * (8192 + 5120)
    shape = Shape(params=10_000, layers=2, hidden=8, intermediate=16, vocab=100, kv_hidden=8, bytes_per_param=4)
    full, adapted = training(shape, 3, 5, TrainHP()), training(shape, 3, 5, TrainHP(lora={"r": 2}))
    trained = lora_params(shape, LoraSpec(r=2))
    assert adapted["gradients"] == trained * 4 and adapted["optimizer (AdamW)"] == 2 * trained * 4
    assert adapted["weights"] == full["weights"] + trained * 4 and adapted["activations"] == full["activations"]


def test_the_paper_recipe_fits_one_80gb_gpu_with_lora_and_not_without(tmp_path):
    """configs/paper-llama3-dpomix-lora.yaml (8B teacher, 1B student) on one 80 GB GPU: every node
    fits, extraction holds the teachers' base once; the full fine-tune on one GPU does not fit."""
    from distill_pipeline.config import load_config

    teacher, student = _llama_8b(tmp_path / "llama-8b"), _llama_1b(tmp_path / "llama-1b")
    sets = [f"models.teacher.name_or_path={teacher}", f"models.student.name_or_path={student}",
            f"run_dir={tmp_path / 'run'}"]
    lora = runner.make_plan(load_config(ROOT / "configs/paper-llama3-dpomix-lora.yaml", sets))
    assert check(lora) == [], report(lora)
    extraction = {e.node: e for e in plan_memory(lora)}["teacher_logits.rollouts"].parts
    assert extraction["teachers' shared base weights"] == 8_030_261_248 * 2
    assert not [k for k in extraction if k.startswith("teacher 2")]
    full = runner.make_plan(load_config(ROOT / "configs/paper-llama3-dpomix.yaml", sets + [
        "resources.gpu_memory_gb=80", *(f"{s}.workers=1" for s in ("sft.teacher", "sft.student", "teacher_dpo", "train"))]))
    refused = check(full)
    assert any(p.startswith("sft.teacher: needs about") for p in refused), refused
