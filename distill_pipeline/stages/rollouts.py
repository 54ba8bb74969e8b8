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

from distill_pipeline.data import DataView, data_view
from distill_pipeline.pipeline.config import Rollouts
from distill_pipeline.stages import Stage, View


class RolloutsView(View):
    rollouts: Rollouts
    data: DataView

    def origins(self) -> dict[str, str | None]:
        return {"rollouts": "rollouts", "data": None}


def view_for(cfg) -> RolloutsView:
    return RolloutsView(rollouts=cfg.rollouts, data=data_view(cfg, "preferences"))


def run(view: RolloutsView, inputs: dict, out: Path) -> dict:
    from distill_pipeline.data import pair_examples
    from distill_pipeline.data.tokenize import decode_response
    from distill_pipeline.generation import generate_hf, generate_vllm, pick_backend
    from distill_pipeline.models import load_checkpoint

    cfg = view.rollouts
    backend = pick_backend(cfg.backend)
    policy_dir = inputs["policy"] / "model"
    model, tok = load_checkpoint(policy_dir)
    examples = pair_examples(view.data, tok)
    prompts = [e["prompt_ids"] for e in examples]
    if backend == "vllm":  # pragma: no cover - GPU only
        del model
        responses = generate_vllm(str(policy_dir), tok, prompts, max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    else:
        responses = generate_hf(model, tok, prompts, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, top_p=cfg.top_p,
                                batch_size=cfg.batch_size, seed=cfg.seed, desc="rollouts")
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
