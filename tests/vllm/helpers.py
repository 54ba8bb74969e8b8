"""What the vLLM tests share: whether vLLM imports here, the engine's environment, tiny models.

The engine runs in the test process (no engine-core process to spawn, each of which would import
vLLM again: ~35 s per engine here) with a 1 GiB CPU KV cache, and `enforce_eager` (vLLM's CPU
warm-up compiles the model with torch.compile: ~70 s per engine here, and nothing is cached on a
fresh CI machine)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

try:
    import vllm  # noqa: F401
    WHY_NOT: str | None = None
except Exception as exc:  # ImportError; a CUDA build beside a CPU torch fails in other ways
    WHY_NOT = f"vLLM does not import here ({type(exc).__name__}: {exc}); .ci/vllm runs these tests"
else:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

VLLM = [pytest.mark.vllm, pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]
MAX_NEW = 16


def prompts(n: int) -> list[list[int]]:
    """Chat-formatted prompts of the numbers task, of varied lengths."""
    from distill_pipeline.config import ModelSpec
    from distill_pipeline.data.tokenize import encode_prompt
    from distill_pipeline.data.toy import number_to_words
    from distill_pipeline.models import load_tokenizer

    tok = load_tokenizer(ModelSpec(preset="tiny-teacher"))
    return [encode_prompt(tok, [{"role": "user", "content": f"digits: {number_to_words((i * 7919) % 10 ** (1 + i % 5))}"}])
            for i in range(n)]


def tiny_llama(folder: Path, seed: int = 0):
    """(model, tokenizer) of a random-initialised tiny Llama (the tiny-teacher preset: head size
    32, one vLLM's CPU attention supports — the tiny student's 12 is not), saved with the
    project's tokenizer so that vLLM loads the directory. A random model never says EOS: the
    LM head's EOS row is set to 1.3 x the row of one of the tokens greedy decoding emits most —
    the one after which about half of the responses stop — so both endings are exercised."""
    import collections

    import torch

    from distill_pipeline.config import ModelSpec
    from distill_pipeline.generation import generate_hf
    from distill_pipeline.models import load_model, load_tokenizer, save_model

    spec = ModelSpec(preset="tiny-teacher")
    model, tok, ps = load_model(spec, seed=seed), load_tokenizer(spec), prompts(16)
    seen = collections.Counter(t for r in generate_hf(model, tok, ps, max_new_tokens=MAX_NEW, batch_size=16)
                               for t in r)
    eos_row = model.lm_head.weight[tok.eos_token_id].clone()

    def stops_after(token: int) -> float:
        with torch.no_grad():
            model.lm_head.weight[tok.eos_token_id] = 1.3 * model.lm_head.weight[token]
        out = generate_hf(model, tok, ps, max_new_tokens=MAX_NEW, batch_size=16)
        return sum(r[-1] == tok.eos_token_id for r in out) / len(out)

    token = min((t for t, _ in seen.most_common(6)), key=lambda t: abs(stops_after(t) - 0.5))
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = eos_row
    stops_after(token)
    save_model(model, tok, folder)
    return model, tok


def lora_adapter(base_dir: Path, base_model, folder: Path, r: int = 8):
    """A PEFT LoRA adapter (q_proj, v_proj) over the model saved in `base_dir`, with random nonzero
    B weights (PEFT initialises B to zero: the adapter would change nothing); returns the merged
    model, HF's reference for the adapter."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(base_model),
                                LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                           target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    peft_model.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return peft_model.merge_and_unload()


FIGURES: list[str] = []  # measured agreements, printed at the end of the run (conftest.py)


def report(line: str) -> None:
    FIGURES.append(line)
    print("\n" + line)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    assert len(a) == len(b)
    return sum(x == y for x, y in zip(a, b)) / len(a)
