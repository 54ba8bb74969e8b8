"""Stage `train`: the student trained with the method's loss, streaming teacher tensors from the
teacher-logit cache (nodes `train`, and `train.dckd` for ADPA+'s first phase).

Inputs by role: `init` (the student to start from), `cache` (a teacher_logits node: store, K,
teacher identities), `reference` (DPO/WPO: the SFT student), `rollouts` (ADPA: the states).
Every cached row's token ids are checked against the student batch. Produces `model/`,
`metrics.jsonl` (every loss component per step) and `validation.jsonl` (reward accuracy — and
task accuracy on the built-in task — on the validation split at every checkpoint).
Run alone: `distill-pipeline run train -c …`.
"""
from __future__ import annotations

import json
from pathlib import Path

NAME = "train"
VERSION = 1
KIND = "train"


def _examples(spec, view: dict, inputs: dict, tok) -> tuple[list[dict], list]:
    """Tokenised examples and the batch fields (which responses, which teachers) of a loss."""
    from distill_pipeline.cache.reader import Field
    from distill_pipeline.data import pair_examples, rollout_examples

    if spec.teacher == "rollouts":
        return rollout_examples(inputs["rollouts"]), [Field("chosen", ()), Field("rollout", ("teacher", "reference"))]
    examples = pair_examples(view["data"], tok)
    teacher = ("teacher",) if spec.teacher == "pairs" else ()
    if spec.data == "sft":
        return examples, [Field("chosen", teacher)]
    return examples, [Field("chosen", teacher), Field("rejected", teacher)]


def _attach_keys(examples: list[dict], fields: list, cache_dir: Path) -> tuple:
    """Content keys for every (example, field, teacher role), from the student's own tokens."""
    from distill_pipeline.cache.reader import CacheReader
    from distill_pipeline.cache.store import entry_key

    meta = json.loads((cache_dir / "teachers.json").read_text())
    ids = {role: t["identity"] for role, t in meta["teachers"].items()}
    for e in examples:
        e["keys"] = {}
        for f in fields:
            for role in f.teachers:
                seq = list(e["prompt_ids"]) + list(e[f"{f.name}_ids"])
                e["keys"][(f.name, role)] = entry_key(ids[role], seq, len(e["prompt_ids"]),
                                                      meta["top_k"], meta["dtype"])
    return CacheReader(meta["store"]), meta["top_k"]


def _loss_fn(name: str, spec, options: dict):
    """Adapter from a streamed batch to the pure loss function of `name`."""
    import torch

    def fwd(model, entry):
        ids, mask, labels = entry["student"]
        return model(input_ids=ids, attention_mask=mask).logits[:, :-1], labels[:, 1:]

    def loss_fn(model, batch):
        if name == "adpa":
            lw, yw = fwd(model, batch["chosen"])
            lr, yr = fwd(model, batch["rollout"])
            t, r = batch["rollout"]["teacher"], batch["rollout"]["reference"]
            return spec.fn(lw, yw, lr, yr, t["ids"], t["logp"], r["ids"], r["logp"], **options)
        lw, yw = fwd(model, batch["chosen"])
        if name == "sft":
            return spec.fn(lw, yw, **options)
        if name == "vanilla_kd":
            t = batch["chosen"]["teacher"]
            return spec.fn(lw, yw, t["ids"], t["logp"], **options)
        ll, yl = fwd(model, batch["rejected"])
        if spec.reference:
            return spec.fn(lw, yw, ll, yl, batch["ref_w"], batch["ref_l"], **options)
        if not spec.teacher:
            return spec.fn(lw, yw, ll, yl, **options)
        tw, tl = batch["chosen"]["teacher"], batch["rejected"]["teacher"]
        if name == "dpkd":
            return spec.fn(lw, yw, tw["label_logp"], ll, yl, tl["label_logp"], **options)
        return spec.fn(lw, yw, tw["ids"], tw["logp"], ll, yl, tl["ids"], tl["logp"], **options)

    def with_refs(model, batch):
        if spec.reference:
            dev = next(model.parameters()).device
            batch["ref_w"] = torch.tensor(batch["_ref_w"], dtype=torch.float32, device=dev)
            batch["ref_l"] = torch.tensor(batch["_ref_l"], dtype=torch.float32, device=dev)
        return loss_fn(model, batch)
    return with_refs


def run(view: dict, inputs: dict, out: Path) -> dict:
    from distill_pipeline.cache.reader import TeacherBatches
    from distill_pipeline.data import pair_examples
    from distill_pipeline.losses import LOSSES
    from distill_pipeline.metrics import evaluate_model
    from distill_pipeline.models import load_checkpoint, save_model
    from distill_pipeline.pipeline.config import TrainHP
    from distill_pipeline.training import finish, train_loop

    name, options = view["loss"], view["options"]
    spec = LOSSES[name]
    hp = TrainHP(**view["hp"])
    model, tok = load_checkpoint(inputs["init"] / "model")
    examples, fields = _examples(spec, view, inputs, tok)
    reader, top_k = (_attach_keys(examples, fields, inputs["cache"]) if "cache" in inputs
                     else (None, view["top_k"]))
    if spec.reference:
        from distill_pipeline.metrics import reference_logps

        ref_model, _ = load_checkpoint(inputs["reference"] / "model")
        for e, w, l in zip(examples, *reference_logps(ref_model, examples, tok.pad_token_id)):
            e["ref_w"], e["ref_l"] = w, l
        del ref_model
    stream = TeacherBatches(reader, examples, fields, batch_size=hp.batch_size, pad_id=tok.pad_token_id,
                            top_k=top_k, seed=hp.seed)

    def batches(epoch: int):
        for b in stream.epoch(epoch):
            if spec.reference:
                b["_ref_w"] = [examples[i]["ref_w"] for i in b["index"]]
                b["_ref_l"] = [examples[i]["ref_l"] for i in b["index"]]
            yield b

    validation = pair_examples(view["validation"], tok, kind="validation") if view.get("validation") else []

    def validate(step: int) -> dict:
        if not validation:
            return {}
        model.eval()
        r = evaluate_model(model, tok, validation, batch_size=64, max_new_tokens=view["max_new_tokens"])
        model.train()
        row = {"step": step, **{f"val_{k}": v for k, v in r.items() if k != "n"}}
        with open(out / "validation.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        return row

    summary = train_loop(model, hp=hp, examples=len(examples), batches=batches,
                         loss_fn=_loss_fn(name, spec, options), work_dir=out,
                         desc=f"train {name}", on_checkpoint=validate)
    save_model(model, tok, out / "model")
    finish(out)
    final = {}  # the last checkpoint (always the final step) validated the final weights
    if validation:
        final = json.loads((out / "validation.jsonl").read_text().splitlines()[-1])
    return {**summary, "loss": name, "examples": len(examples),
            **{k: round(v, 4) for k, v in final.items() if k != "step"}}
