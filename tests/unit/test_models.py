"""Models and tokenizers: tiny presets, local checkpoints, the shipped tokenizer, mismatches."""
from __future__ import annotations

import json

import pytest

from distill_pipeline.models import (TINY_TOKENIZER, ModelError, build_tiny_tokenizer_json,
                                     check_same_tokenizer, load_model, load_tokenizer,
                                     teacher_identity)
from distill_pipeline.config import ModelSpec


def test_shipped_tokenizer_is_the_deterministic_build():
    assert build_tiny_tokenizer_json() == TINY_TOKENIZER.read_text()


def test_presets_share_tokenizer_and_teacher_is_several_times_larger():
    t, s = ModelSpec(preset="tiny-teacher"), ModelSpec(preset="tiny-student")
    check_same_tokenizer(load_tokenizer(t), load_tokenizer(s), first="t", second="s")
    nt = sum(p.numel() for p in load_model(t).parameters())
    ns = sum(p.numel() for p in load_model(s).parameters())
    assert nt >= 5 * ns


def test_chat_template_round_trip():
    tok = load_tokenizer(ModelSpec(preset="tiny-student"))
    text = tok.apply_chat_template([{"role": "user", "content": "digits: seven"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>digits: seven<|end|><|assistant|>"


def test_local_checkpoint_loads_by_path(tmp_path):
    spec = ModelSpec(preset="tiny-student")
    model, tok = load_model(spec, seed=1), load_tokenizer(spec)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    local = ModelSpec(name_or_path=str(tmp_path / "ckpt"))
    again = load_model(local)
    assert all((a == b).all() for a, b in zip(model.parameters(), again.parameters()))
    check_same_tokenizer(tok, load_tokenizer(local), first="a", second="b")
    ident = teacher_identity(tmp_path / "ckpt")
    assert len(ident) == 64 and teacher_identity(tmp_path / "ckpt") == ident


def test_tokenizer_mismatch_refused(tmp_path):
    spec = ModelSpec(preset="tiny-student")
    tok = load_tokenizer(spec)
    tok.save_pretrained(tmp_path / "other")
    load_model(spec).save_pretrained(tmp_path / "other")
    data = json.loads((tmp_path / "other/tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = "1", "2"
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same tokens, different ids
    (tmp_path / "other/tokenizer.json").write_text(json.dumps(data))
    other = load_tokenizer(ModelSpec(name_or_path=str(tmp_path / "other")))
    with pytest.raises(ModelError, match="different tokenizers: vocabularies differ"):
        check_same_tokenizer(tok, other, first="teacher-x", second="student-y")


def test_missing_local_model_is_clear(tmp_path):
    with pytest.raises(ModelError, match="cannot load tokenizer"):
        load_tokenizer(ModelSpec(name_or_path=str(tmp_path / "nope")))
