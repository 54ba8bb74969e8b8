"""Model and tokenizer loading: Hugging Face hub ids, local checkpoints, and tiny offline presets.

`load_model(spec)` / `load_tokenizer(spec)` accept a `ModelSpec` (config tree). Tiny presets are
random-initialised Llama configs sharing the tokenizer shipped in `assets/tokenizer.json`
(rebuild it deterministically with `python -m distill_pipeline.models`). `teacher_identity`
hashes weights + tokenizer + chat template: the teacher part of every teacher-logit cache key.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).parent / "assets"
TINY_TOKENIZER = ASSETS / "tokenizer.json"
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Presets: the teacher is several times the student (parameter ratio printed by `describe`).
PRESETS: dict[str, dict[str, int]] = {
    "tiny-teacher": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4),
    "tiny-student": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4),
}


class ModelError(ValueError):
    """A model or tokenizer cannot be loaded or used as asked."""


def build_tiny_tokenizer_json() -> str:
    """Train the tiny BPE tokenizer on the toy corpus; deterministic (same JSON every time)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from distill_pipeline.data.toy import corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    alphabet = [chr(c) for c in range(32, 127)] + ["▁"]
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok.to_str(pretty=False)


def _tiny_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(TINY_TOKENIZER)),
                                  pad_token="<|pad|>", eos_token="<|end|>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _quiet_transformers() -> None:
    """Per-file 'Loading weights' bars drown the stage progress bars; the stage reports instead."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _is_local(name_or_path: str) -> bool:
    return name_or_path.startswith((".", "/", "~")) or Path(name_or_path).expanduser().exists()


def load_tokenizer(spec: Any):
    """Tokenizer for a ModelSpec (preset, local directory or hub id), with pad and chat template."""
    if spec.preset:
        return _tiny_tokenizer()
    from transformers import AutoTokenizer

    path = spec.name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(path))
    except Exception as exc:  # transformers raises many types; the user needs one message
        raise ModelError(f"cannot load tokenizer from {path!r}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise ModelError(f"tokenizer {path!r} has no chat template; add one to its "
                         "tokenizer_config.json (the pipeline formats every prompt with it)")
    return tok


def load_model(spec: Any, *, seed: int = 0):
    """A causal LM for a ModelSpec: random-initialised preset, or from_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    dtype = getattr(torch, spec.dtype)
    if spec.preset:
        tok = _tiny_tokenizer()
        config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=256,
                             bos_token_id=None, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                             **PRESETS[spec.preset])
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).to(dtype).to(device())
    path = os.path.expanduser(spec.name_or_path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device())
    except Exception as exc:
        raise ModelError(f"cannot load model from {spec.name_or_path!r}: {exc}") from exc


def device():
    """The accelerator when one is visible (CUDA), else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_checkpoint(path: Path, *, dtype: str = "auto"):
    """Model (in the dtype it was saved in, on `device()`) + tokenizer saved by a stage."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype).to(device())
    return model, AutoTokenizer.from_pretrained(str(path))


def load_tokenizer_dir(path: Path):
    """Tokenizer saved by a stage next to its model."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    return AutoTokenizer.from_pretrained(str(path))


def tokenizer_fingerprint(tok) -> str:
    """Hash of the vocabulary, special tokens and chat template: equal iff ids mean the same."""
    payload = json.dumps({"vocab": sorted(tok.get_vocab().items()),
                          "special": sorted(map(str, tok.all_special_tokens)),
                          "eos": tok.eos_token, "pad": tok.pad_token,
                          "template": tok.chat_template}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def check_same_tokenizer(teacher_tok, student_tok, *, teacher: str, student: str) -> None:
    """Refuse a teacher/student pair whose token ids mean different things."""
    if tokenizer_fingerprint(teacher_tok) == tokenizer_fingerprint(student_tok):
        return
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    differing = sorted(k for k in set(tv) | set(sv) if tv.get(k) != sv.get(k))[:5]
    why = (f"vocabularies differ ({len(tv)} vs {len(sv)} entries; e.g. {differing})" if differing
           else "special tokens or chat templates differ")
    raise ModelError(
        f"teacher {teacher!r} and student {student!r} use different tokenizers: {why}. "
        "Cached teacher token ids must mean the same thing to the student; pick models that "
        "share a tokenizer (e.g. one model family).")


def describe(model) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__} {n / 1e6:.2f}M params"


def directory_digest(path: Path) -> str:
    """sha256 over every file (name + bytes) in a model directory, in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name != ".identity"):
        h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def teacher_identity(model_dir: Path) -> str:
    """Teacher part of a cache key: weights + tokenizer + chat template of a saved checkpoint.
    Stages write it beside the weights when they save (`save_model`); other directories are hashed."""
    memo = Path(model_dir) / ".identity"
    if memo.exists():
        return memo.read_text().strip()
    return directory_digest(model_dir)


def save_model(model, tok, folder: Path) -> None:
    """save_pretrained for weights and tokenizer, plus the identity hash used by cache keys."""
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (Path(folder) / ".identity").write_text(directory_digest(folder))


if __name__ == "__main__":
    TINY_TOKENIZER.write_text(build_tiny_tokenizer_json())
    print(f"wrote {TINY_TOKENIZER}")
