"""Stage `teacher_dpo`: DPO-train the teacher from the SFT teacher, which stays on disk as the
reference teacher. Produces `model/` and `metrics.jsonl`.
Run alone: `distill-pipeline run teacher_dpo -c configs/quickstart.yaml`.
"""
from __future__ import annotations

from pathlib import Path

NAME = "teacher_dpo"
VERSION = 1
KIND = "train"


def pair_batches(examples, hp, pad_id, extra=()):
    """Deterministic per-epoch batches of (chosen batch, rejected batch, *extra tensors)."""
    import torch

    from distill_pipeline.data.tokenize import collate
    from distill_pipeline.training import epoch_batches

    def batches(epoch: int):
        for idx in epoch_batches(len(examples), hp.batch_size, hp.seed, epoch):
            chunk = [examples[i] for i in idx]
            prompts = [e["prompt_ids"] for e in chunk]
            yield (collate(prompts, [e["chosen_ids"] for e in chunk], pad_id),
                   collate(prompts, [e["rejected_ids"] for e in chunk], pad_id),
                   *[torch.tensor([e[k] for e in chunk], dtype=torch.float32) for k in extra])
    return batches


def run(view: dict, inputs: dict, out: Path) -> dict:
    from distill_pipeline.data import pair_examples
    from distill_pipeline.losses import dpo_loss
    from distill_pipeline.metrics import reference_logps
    from distill_pipeline.models import load_checkpoint, save_model
    from distill_pipeline.training import finish, train_loop

    hp = view["hp"]
    policy, tok = load_checkpoint(inputs["reference"] / "model")
    reference, _ = load_checkpoint(inputs["reference"] / "model")
    examples = pair_examples(view["data"], tok)
    ref_w, ref_l = reference_logps(reference, examples, tok.pad_token_id)
    for e, w, l in zip(examples, ref_w, ref_l):
        e["ref_w"], e["ref_l"] = w, l
    del reference

    def loss_fn(model, batch):
        (iw, mw, lw), (il, ml, ll), ref_w, ref_l = batch
        logits_w = model(input_ids=iw, attention_mask=mw).logits
        logits_l = model(input_ids=il, attention_mask=ml).logits
        return dpo_loss(logits_w[:, :-1], lw[:, 1:], logits_l[:, :-1], ll[:, 1:], ref_w, ref_l,
                        beta=hp.beta)

    summary = train_loop(policy, hp=hp, examples=len(examples),
                         batches=pair_batches(examples, hp, tok.pad_token_id, ("ref_w", "ref_l")),
                         loss_fn=loss_fn, work_dir=out, desc="teacher_dpo")
    save_model(policy, tok, out / "model")
    finish(out)
    return {**summary, "pairs": len(examples)}
