"""Batched generation: Hugging Face `generate` on CPU (the parity reference) and vLLM on a GPU.

Both take prompt token ids and return response token ids (ending with EOS when the model
stopped), in the input order. Prompts are sorted by length so batches carry little padding.
"""
from __future__ import annotations

from typing import Any, Sequence

from distill_pipeline.progress import progress


class BackendError(RuntimeError):
    """The requested generation backend cannot run here."""


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pick_backend(requested: str) -> str:
    if requested == "hf":
        return "hf"
    has_gpu = gpu_available()
    if requested == "vllm":
        if not has_gpu:
            raise BackendError("rollouts.backend=vllm needs a CUDA GPU and none is visible; "
                               "use backend: hf (or auto) on CPU")
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise BackendError("rollouts.backend=vllm needs the gpu extra: "
                               "pip install 'distill-pipeline[gpu]'") from exc
        return "vllm"
    if has_gpu:
        try:
            import vllm  # noqa: F401
            return "vllm"
        except ImportError:
            return "hf"
    return "hf"


def generate_hf(model: Any, tok: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 32, seed: int = 0,
                desc: str = "generate") -> list[list[int]]:
    import torch

    from distill_pipeline.data.tokenize import left_pad

    torch.manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    sample = temperature > 0
    model.eval()
    with torch.no_grad(), progress(total=len(prompts), desc=desc, unit="seq") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
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


def generate_vllm(model_dir: str, tok: Any, prompts: Sequence[Sequence[int]], *,
                  dtype: str = "auto", max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0) -> list[list[int]]:  # pragma: no cover - needs a GPU
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, seed=seed, dtype=dtype)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            seed=seed, stop_token_ids=[tok.eos_token_id])
    results = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params)
    return [list(r.outputs[0].token_ids) for r in results]
