"""LoRA (peft) on every training node: adapters published over their bases, only adapters trained
and checkpointed, the DPO teacher's reference as its base with the adapter off, both teachers
extracted from one loaded base, adapters imported, and the config's errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill_pipeline.config import LoraSpec, ModelSpec, TrainHP, config_from_dict
from distill_pipeline.models import (AdapterSide, ModelError, ModelRef, adapter_over, base_dir,
                                     load_checkpoint, load_model, model_ref, teacher_identity)
from distill_pipeline.pipeline import runner
from tests.conftest import tiny_tree

LORA = {"r": 4, "alpha": 8}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """ADPA with LoRA on both SFT nodes, the teacher DPO and the student's training (in process)."""
    root = tmp_path_factory.mktemp("lora")
    hp = {"lr": 3e-3, "max_steps": 2, "batch_size": 8, "checkpoint_every": 1, "lora": LORA}
    tree = tiny_tree(root / "run", method="adpa", sft={"teacher": hp, "student": hp},
                     teacher_dpo={**hp, "beta": 0.1}, train=hp)
    plan = runner.make_plan(config_from_dict(tree))
    runner.run(plan, ["all"], use_ray=False, echo=lambda s: None)
    return {"root": root, "plan": plan, "tree": tree}


def folder(run, node: str) -> Path:
    return run["plan"].folder(node)


def test_every_trained_node_publishes_an_adapter_over_its_base(lora_run):
    bases = {"sft.teacher": folder(lora_run, "sft.teacher") / "base",
             "sft.student": folder(lora_run, "sft.student") / "base",
             "teacher_dpo": folder(lora_run, "sft.teacher") / "model",
             "train": folder(lora_run, "sft.student") / "model"}
    for node, base in bases.items():
        model = folder(lora_run, node) / "model"
        files = {p.name for p in model.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files, node
        assert not [f for f in files if f.startswith("model") and f.endswith(".safetensors")], node
        assert base_dir(model) == base.resolve(), node
        weights = load_file(model / "adapter_model.safetensors")
        assert weights and all("lora_A" in k or "lora_B" in k for k in weights), node
    summary = json.loads((folder(lora_run, "teacher_logits.rollouts") / "manifest.json").read_text())["summary"]
    assert summary["one_base"] is True  # the DPO teacher is an adapter over the reference
    assert (folder(lora_run, "evaluate") / "results.json").is_file()


def test_only_the_adapters_train(lora_run):
    """The base a student adapter names is the preset's random init, untouched; the adapter moved
    the model away from it."""
    base, _ = load_checkpoint(folder(lora_run, "sft.student") / "base")
    init = load_model(ModelSpec(preset="tiny-student"), seed=0)
    for (name, a), b in zip(base.state_dict().items(), init.state_dict().values()):
        assert torch.equal(a, b), name
    merged, _ = load_checkpoint(folder(lora_run, "sft.student") / "model")
    assert any(not torch.equal(a, b) for a, b in zip(merged.state_dict().values(), base.state_dict().values()))


def test_adapter_identity_is_its_content_and_its_base_not_their_places(lora_run, tmp_path):
    model = folder(lora_run, "teacher_dpo") / "model"
    identity = teacher_identity(model)
    moved = tmp_path / "moved"
    shutil.copytree(model, moved / "adapter")
    shutil.copytree(folder(lora_run, "sft.teacher"), moved / "sft-teacher")
    config = json.loads((moved / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "../sft-teacher/model"  # relative: resolved from the adapter
    (moved / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    assert teacher_identity(moved / "adapter") == identity
    # another base under the same adapter files: another teacher
    weights = moved / "sft-teacher" / "base" / "model.safetensors"
    tensors = load_file(weights)
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1
    from safetensors.torch import save_file

    save_file(tensors, weights, metadata={"format": "pt"})
    assert teacher_identity(moved / "adapter") != identity


def test_checkpoints_hold_the_adapters_and_resume_exactly(tmp_path):
    from distill_pipeline import lora
    from distill_pipeline.training import train_loop

    def setup():
        model = lora.wrap(load_model(ModelSpec(preset="tiny-student"), seed=0), LoraSpec(**LORA))
        g = torch.Generator().manual_seed(1)
        data = [torch.randint(6, 180, (4, 12), generator=g) for _ in range(4)]

        def loss_fn(m, ids, norm):
            loss = m(input_ids=ids, labels=ids).loss / norm["micro_batches"]
            return loss, {"nll": loss}
        return model, (lambda epoch: iter(data)), loss_fn

    counts = lambda epoch: [{"micro_batches": 1}] * 4  # noqa: E731
    hp = TrainHP(lr=1e-2, max_steps=4, batch_size=4, checkpoint_every=2, lora=LORA)
    straight, batches, loss_fn = setup()
    train_loop(straight, hp=hp, examples=16, batches=batches, counts=counts, loss_fn=loss_fn,
               work_dir=tmp_path / "a", desc="a")

    class Stop(Exception):
        pass

    def crash(step):
        if step == 2:
            state = torch.load(tmp_path / "b" / "checkpoint" / "state.pt", weights_only=False)["model"]
            trainable = {n for n, p in crashed.named_parameters() if p.requires_grad}
            assert set(state) == trainable and all("lora_" in k for k in state)  # the adapters only
            raise Stop()
    crashed, batches, loss_fn = setup()
    (tmp_path / "b").mkdir()
    with pytest.raises(Stop):
        train_loop(crashed, hp=hp, examples=16, batches=batches, counts=counts, loss_fn=loss_fn,
                   work_dir=tmp_path / "b", desc="b", on_checkpoint=crash)
    resumed, batches, loss_fn = setup()
    train_loop(resumed, hp=hp, examples=16, batches=batches, counts=counts, loss_fn=loss_fn,
               work_dir=tmp_path / "b", desc="b")
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_one_base_extraction_equals_two_merged_teachers(lora_run, tmp_path):
    """The DPO teacher (adapter on) and its reference (adapter off) from one loaded base give the
    entries two separately loaded merged models give, to float tolerance."""
    from distill_pipeline.cache.extract import extract, make_request
    from distill_pipeline.cache.reader import CacheReader
    from distill_pipeline.cache.store import Store
    from distill_pipeline.models import save_model
    from tests.invariants.helpers import FMT, sequences

    dpo = model_ref(folder(lora_run, "teacher_dpo"))
    ref = model_ref(folder(lora_run, "sft.teacher"))
    assert adapter_over(dpo, ref) and not adapter_over(ref, dpo)
    merged_dpo, tok = load_checkpoint(Path(dpo.path))
    save_model(merged_dpo, tok, tmp_path / "merged-dpo")
    merged_ref, _ = load_checkpoint(Path(ref.path))
    save_model(merged_ref, tok, tmp_path / "merged-ref")
    ids = {"dpo": teacher_identity(Path(dpo.path)), "ref": teacher_identity(Path(ref.path))}
    seqs = sequences(12)
    reqs = [make_request(ids[r], p, resp, FMT) for r in ids for p, resp in seqs]
    extract(reqs, Store(tmp_path / "one"), {ids["dpo"]: AdapterSide(dpo.path, True),
                                            ids["ref"]: AdapterSide(dpo.path, False)}, FMT)
    extract(reqs, Store(tmp_path / "two"), {ids["dpo"]: ModelRef(str(tmp_path / "merged-dpo")),
                                            ids["ref"]: ModelRef(str(tmp_path / "merged-ref"))}, FMT)
    one, two = CacheReader(tmp_path / "one"), CacheReader(tmp_path / "two")
    for r in reqs:
        a, b = one.get(r.key), two.get(r.key)
        np.testing.assert_allclose(a["lse"], b["lse"], atol=1e-4)
        np.testing.assert_allclose(a["logp"], b["logp"], atol=2e-3)  # float16 storage
        gaps = np.abs(np.diff(b["logp"], axis=1)) > 1e-2  # where the order is not a near tie
        # (the K-th slot is left out: its rival, the (K+1)-th id, is not stored, so a tie is unseen)
        clear = np.concatenate([gaps[:, :1], gaps[:, 1:] & gaps[:, :-1], np.zeros_like(gaps[:, -1:])], axis=1)
        assert (a["ids"][clear] == b["ids"][clear]).all()


def test_an_imported_adapter_is_loaded_over_its_base(lora_run, tmp_path):
    """models.teacher_dpo may be a PEFT adapter directory naming its base (here: by absolute path)."""
    adapter = tmp_path / "dpo-adapter"
    shutil.copytree(folder(lora_run, "teacher_dpo") / "model", adapter)
    tree = json.loads(json.dumps(lora_run["tree"]))
    tree.update(run_dir=str(tmp_path / "run"), method="dckd")
    tree["models"]["teacher_dpo"] = {"name_or_path": str(adapter)}
    plan = runner.make_plan(config_from_dict(tree))
    assert plan.node("teacher_dpo").stage == "import_model"
    runner.run(plan, ["teacher_dpo"], use_ray=False, echo=lambda s: None)
    ref = model_ref(plan.folder("teacher_dpo"))
    assert ref.identity == teacher_identity(folder(lora_run, "teacher_dpo") / "model")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="base model .*gone.* of the LoRA adapter"):
        teacher_identity(adapter)
    del config["base_model_name_or_path"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="names no base model"):
        load_checkpoint(adapter)


def test_merge_publishes_merged_weights_and_the_adapter(lora_run, tmp_path):
    from distill_pipeline import lora
    from distill_pipeline.models import load_tokenizer

    spec = LoraSpec(**LORA, merge=True)
    tok = load_tokenizer(ModelSpec(preset="tiny-student"))
    model, base = lora.prepare(load_model(ModelSpec(preset="tiny-student")), tok, spec, None, tmp_path)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    x = torch.randint(6, 180, (2, 9))
    with torch.no_grad():
        trained = model.eval()(input_ids=x).logits  # the adapted model as it was trained
    lora.save(model, tok, tmp_path, spec, base)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "model" / "model.safetensors").is_file() and not (tmp_path / "model" / "adapter_config.json").exists()
    merged, _ = load_checkpoint(tmp_path / "model")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, trained, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(trained, load_checkpoint(tmp_path / "base")[0](input_ids=x).logits)


@pytest.mark.parametrize("lora, words", [
    ({"r": 0}, "sft.student.lora.r"), ({"target_modules": []}, "name at least one module"),
    ({"rank": 4}, "sft.student.lora.rank"),
])
def test_bad_lora_settings_are_config_errors(tmp_path, lora, words):
    from distill_pipeline.config import ConfigError

    tree = tiny_tree(tmp_path / "run", method="dckd")
    tree["sft"]["student"] = {**tree["sft"]["student"], "lora": lora}
    with pytest.raises(ConfigError, match=words):
        config_from_dict(tree)


def test_target_modules_that_match_nothing_are_named():
    from distill_pipeline import lora

    with pytest.raises(ValueError, match="lora.target_modules.*nope"):
        lora.wrap(load_model(ModelSpec(preset="tiny-student")), LoraSpec(target_modules=["nope"]))


def _dp_worker(rank: int, world: int, port: int, work: str, strategy: str, crash_at: int | None, out: str) -> None:
    """One of `world` gloo workers training a LoRA student (train_loop as a Ray Train worker runs it)."""
    import os

    import torch.distributed as dist

    from distill_pipeline import lora
    from distill_pipeline.training import train_loop

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = lora.wrap(load_model(ModelSpec(preset="tiny-student"), seed=0), LoraSpec(**LORA))
        g = torch.Generator().manual_seed(1)
        data = [torch.randint(6, 180, (2, 12), generator=g) for _ in range(8)]

        def batches(epoch, keep=None):
            return (d for i, d in enumerate(data) if keep is None or keep(i))

        def loss_fn(m, ids, norm):
            loss = m(input_ids=ids, labels=ids).loss / norm["micro_batches"]
            return loss, {"nll": loss}

        def crash(step):
            if step == crash_at:
                raise SystemExit(3)
        hp = TrainHP(lr=1e-2, max_steps=4, batch_size=2, checkpoint_every=2, workers=world,
                     strategy=strategy, lora=LORA)
        train_loop(model, hp=hp, examples=16, batches=batches, counts=lambda e: [{"micro_batches": 1}] * 8,
                   loss_fn=loss_fn, work_dir=Path(work), desc="dp", on_checkpoint=crash)
        state = {n: p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
                 for n, p in model.named_parameters() if p.requires_grad}
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, *args) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_dp_worker, args=(world, port, *args), nprocs=world, join=True, start_method="spawn")


@pytest.mark.parametrize("strategy", ["fsdp"])  # (DDP takes the same checkpoint path: DCP)
def test_two_workers_resume_a_lora_run_from_its_adapter_checkpoint(tmp_path, strategy):
    """Two gloo workers (FSDP2): a run killed after its step-2 checkpoint resumes from the
    adapters alone (the checkpoint leaves the frozen base out) to the same adapters."""
    _spawn(2, str(tmp_path / "a"), strategy, None, str(tmp_path / "a.pt"))
    with pytest.raises(Exception):  # noqa: B017 - a worker exits 3 at step 2 (ProcessExitedException)
        _spawn(2, str(tmp_path / "b"), strategy, 2, str(tmp_path / "b.pt"))
    _spawn(2, str(tmp_path / "b"), strategy, None, str(tmp_path / "b.pt"))
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a.keys() == b.keys() and all("lora_" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_tied_embedding_stays_out_of_the_adapter_checkpoint(tmp_path):
    """A tied LM head is the frozen embedding under a second name: not saved (a 1B student's
    checkpoint would otherwise carry its 0.5 GB embedding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill_pipeline import checkpoint, lora

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))
    model = lora.wrap(model, LoraSpec(**LORA))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    checkpoint.save(tmp_path / "ckpt", model, opt, {"step": 1, "epoch": 0, "consumed": 1})
    saved = torch.load(tmp_path / "ckpt" / "state.pt", weights_only=False)["model"]
    assert saved and all("lora_" in k for k in saved), [k for k in saved if "lora_" not in k]
    assert checkpoint.load(tmp_path / "ckpt", model, opt)["step"] == 1


def test_an_adapters_identity_does_not_depend_on_the_order_peft_wrote_its_module_sets(tmp_path):
    """peft writes target_modules (a set) in hash-seed order: the same adapter, another order."""
    from distill_pipeline.identity import content_identity, forget

    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj", "k_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    first = content_identity(adapter)
    config["target_modules"] = ["v_proj", "k_proj", "q_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    forget(adapter)
    assert content_identity(adapter) == first
    config["target_modules"] = ["v_proj", "k_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    forget(adapter)
    assert content_identity(adapter) != first
