"""Stage `teacher_logits`: top-K log-probs of the teacher(s) into the shared teacher-logit cache.

Node `teacher_logits` (DCKD, TVKD, VanillaKD, DPKD, and ADPA+'s first phase): the DPO teacher on
the dataset's y_w and y_l. Node `teacher_logits.rollouts` (ADPA, ADPA+): the DPO teacher *and*
the reference (SFT) teacher on the student's rollouts, same tokens. Only entries missing from the
store are extracted (content addressed), sharded over `teacher_logits.num_workers` Ray workers.
Produces `teachers.json` (store root, K, dtype, teacher identities by role); the train stage
computes the same keys from its own tokens and streams the entries from the store.
Run alone: `distill-pipeline run teacher_logits -c configs/quickstart.yaml`.
"""
from __future__ import annotations

import json
from pathlib import Path

NAME = "teacher_logits"
VERSION = 1
KIND = "orchestrate"  # holds no CPU/GPU itself: its Ray workers do
# Value- and layout-neutral: 1 vs 3 workers give a bit-identical store (tests/invariants).
UNFINGERPRINTED = ("teacher_logits.num_workers", "teacher_logits.batch_tokens",
                   "teacher_logits.threads_per_worker")


def sequences(source: str, view: dict, inputs: dict, tok) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids) of every response this extraction covers."""
    from distill_pipeline.data import pair_examples, rollout_examples

    if source == "rollouts":
        return [(e["prompt_ids"], e["rollout_ids"]) for e in rollout_examples(inputs["rollouts"])]
    ex = pair_examples(view["data"], tok)
    return [(e["prompt_ids"], e[f]) for e in ex for f in ("chosen_ids", "rejected_ids")]


def run(view: dict, inputs: dict, out: Path) -> dict:
    from distill_pipeline.cache.extract import extract, gpus_per_worker, make_request
    from distill_pipeline.cache.store import Store, storage_code
    from distill_pipeline.models import load_tokenizer_dir, teacher_identity

    cfg = view["teacher_logits"]
    code = storage_code(cfg.dtype, cfg.logp_keep_bits)
    roles = ["teacher", "reference"] if view["source"] == "rollouts" else ["teacher"]
    dirs = {role: inputs[role] / "model" for role in roles}
    identities = {role: teacher_identity(d) for role, d in dirs.items()}
    tok = load_tokenizer_dir(dirs["teacher"])
    seqs = sequences(view["source"], view, inputs, tok)
    store = Store(cfg.store)
    requests = [make_request(identities[role], p, r, cfg.top_k, code) for role in roles for p, r in seqs]
    stats = extract(requests, store, {identities[r]: str(d) for r, d in dirs.items()},
                    top_k=cfg.top_k, dtype=code, num_workers=cfg.num_workers,
                    batch_tokens=cfg.batch_tokens, unit_tokens=cfg.unit_tokens,
                    threads_per_worker=cfg.threads_per_worker,
                    gpus_per_worker=gpus_per_worker())
    (out / "teachers.json").write_text(json.dumps({
        "store": str(store.root), "top_k": cfg.top_k, "dtype": code, "source": view["source"],
        "teachers": {role: {"identity": identities[role], "path": str(dirs[role])} for role in roles},
    }, indent=2))
    return {**stats, "store": str(store.root)}
