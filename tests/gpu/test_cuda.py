"""GPU checks (marker `gpu`; skipped where no CUDA device is visible — CI has none).

Run on a GPU machine with `python -m pytest -q -m gpu`.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _tiny_teacher():
    from distill_pipeline.models import load_model, load_tokenizer
    from distill_pipeline.pipeline.config import ModelSpec

    spec = ModelSpec(preset="tiny-teacher")
    return load_model(spec, seed=0), load_tokenizer(spec)


def test_extraction_on_cuda_matches_cpu():
    from distill_pipeline.cache.extract import make_request, topk_for_batch
    from distill_pipeline.cache.format import CacheFormat

    model, tok = _tiny_teacher()
    fmt = CacheFormat(8)
    batch = [make_request("t", (3, 4, 5), (6, 7, 8, tok.eos_token_id), fmt), make_request("t", (3, 9), (10, 11), fmt)]
    on_gpu = topk_for_batch(model.cuda(), batch, tok.pad_token_id, 8)
    on_cpu = topk_for_batch(model.cpu(), batch, tok.pad_token_id, 8)
    for g, c in zip(on_gpu, on_cpu):
        assert abs(g["logp"] - c["logp"]).max() < 1e-2
        assert abs(g["lse"] - c["lse"]).max() < 1e-2


def test_a_training_step_on_cuda_matches_cpu(tmp_path):
    from distill_pipeline.batches import Batches, Field, loss_fn_for
    from distill_pipeline.losses import LOSSES
    from distill_pipeline.pipeline.config import TrainHP
    from distill_pipeline.training import train_loop

    hp = TrainHP(lr=1e-3, max_steps=2, batch_size=2, checkpoint_every=2)
    examples = [{"prompt_ids": [3, 4, 5], "response_ids": [6, 7, 8]}, {"prompt_ids": [3, 9], "response_ids": [10, 11]}]
    losses = []
    for dev in ("cuda", "cpu"):
        model, tok = _tiny_teacher()
        stream = Batches(examples, [Field("response", "w")], batch_size=2, pad_id=tok.pad_token_id)
        out = train_loop(model.to(dev), hp=hp, examples=2, batches=stream.epoch,
                         loss_fn=loss_fn_for(LOSSES["sft"], {}), counts=stream.counts,
                         work_dir=tmp_path / dev, desc=dev)
        losses.append(out["final_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
