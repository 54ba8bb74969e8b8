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


def generate_vllm(model_dir: str, tok: Any, prompts: Sequence[Sequence[int]], *,
                  dtype: str = "auto", max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                  max_model_len: int | None = None) -> list[list[int]]:  # pragma: no cover - needs a GPU
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, seed=seed, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
              gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            seed=seed, stop_token_ids=[tok.eos_token_id])
    results = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params)
    return [list(r.outputs[0].token_ids) for r in results]
