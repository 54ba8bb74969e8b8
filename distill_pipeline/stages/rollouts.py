"""Stage `rollouts`: the student's generations for the preference prompts (greedy by default).
HF `generate` with length-sorted batching on CPU; vLLM when a GPU is present (`gpu` extra).
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

    def origins(self) -> dict[str, str | None]:
        sampling = self.temperature > 0
        return {"backend": "rollouts.backend", "max_new_tokens": "rollouts.max_new_tokens",
                "temperature": "rollouts.temperature", "top_p": "rollouts.top_p" if sampling else None,
                "seed": "rollouts.seed" if sampling else None, "batch_size": "rollouts.batch_size",
                "data": None}


def view_for(cfg) -> RolloutsView:
    r, sampling = cfg.rollouts, cfg.rollouts.temperature > 0
    return RolloutsView(backend=r.backend, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                        top_p=r.top_p if sampling else None, seed=r.seed if sampling else None,
                        batch_size=r.batch_size, data=data_view(cfg, "preferences"))


def run(view: RolloutsView, inputs: dict, out: Path) -> dict:
    from distill_pipeline.data import pair_examples
    from distill_pipeline.data.tokenize import decode_response
    from distill_pipeline.generation import generate_hf, generate_vllm, pick_backend
    from distill_pipeline.models import load_ref, model_ref

    backend = pick_backend(view.backend)
    top_p, seed = view.top_p or 1.0, view.seed or 0  # unread by greedy decoding
    policy = model_ref(inputs["policy"])
    model, tok = load_ref(policy)
    examples = pair_examples(view.data, tok)
    prompts = [e["prompt_ids"] for e in examples]
    if backend == "vllm":  # pragma: no cover - GPU only
        del model
        responses = generate_vllm(policy.path, tok, prompts, dtype=policy.dtype,
                                  max_new_tokens=view.max_new_tokens,
                                  temperature=view.temperature, top_p=top_p, seed=seed)
    else:
        responses = generate_hf(model, tok, prompts, max_new_tokens=view.max_new_tokens,
                                temperature=view.temperature, top_p=top_p,
                                batch_size=view.batch_size, seed=seed, desc="rollouts")
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
    return {"backend": backend, "rollouts": len(responses),
            "mean_length": round(sum(lengths) / max(1, len(lengths)), 3),
            "stopped_fraction": round(stopped / max(1, len(responses)), 4)}



STAGE = Stage(version=1, kind="generate", view=RolloutsView,
              inputs={"policy": "the student that generates (SFT student; ADPA+: the DCKD student)"},
              outputs=("rollouts.jsonl",), run=run)
