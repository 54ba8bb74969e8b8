"""Stage `train`: the student trained with the method's loss, streaming teacher tensors from the
teacher-logit cache (nodes `train`, and `train.dckd` for ADPA+'s first phase).

What a node reads follows from its loss's signature (losses.py): the responses it batches, the
cache extraction it reads, whether the SFT student is scored as a DPO-style reference. Inputs by
role: `init` (the student to start from), `cache` (a teacher_logits node: store, format, teacher
identities), `reference` (DPO/WPO: the SFT student), `rollouts` (ADPA: the states and y_w).
Every cached row's token ids are checked against the student batch. Produces `model/`,
`metrics.jsonl` (every loss component per step) and, with `data.validation`, `validation.jsonl`
(reward accuracy — and task accuracy on the built-in task — at every checkpoint).
Run alone: `distill-pipeline run train -c …`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from distill_pipeline.data import DataView, data_view
from distill_pipeline.losses import LOSSES
from distill_pipeline.config import HP_ADDED, TrainHP
from distill_pipeline.stages import Stage, View


class TrainView(View):
    loss: Literal[tuple(LOSSES)]  # type: ignore[valid-type]
    options_key: Literal["loss", "dckd_loss"] = "loss"  # adpa+'s DCKD phase reads train.dckd_loss
    options: dict[str, Any]
    hp: TrainHP
    data: DataView | None = None        # pairs-based losses (ADPA reads its rollouts node)
    validation: DataView | None = None
    max_new_tokens: int | None = None   # greedy length of the validation task accuracy

    LINEAGE = ("loss",)
    ADDED = HP_ADDED

    def origins(self) -> dict[str, str | None]:
        return {"loss": "method", "options_key": None, "options": f"train.{self.options_key}",
                "hp": "train", "data": None, "validation": None,
                "max_new_tokens": "evaluate.max_new_tokens"}


def view_for(cfg, loss: str, options_key: str = "loss") -> TrainView:
    spec = LOSSES[loss]
    validation = data_view(cfg.data, "validation") if cfg.data.validation is not None else None
    return TrainView(loss=loss, options_key=options_key, options=cfg.loss_options(options_key),
                     hp=TrainHP(**cfg.train.model_dump(include=set(TrainHP.model_fields))),
                     data=data_view(cfg.data, "preferences") if "r" not in spec.responses else None,
                     validation=validation,
                     max_new_tokens=cfg.evaluate.max_new_tokens if validation else None)


def run(view: TrainView, inputs: dict, out: Path) -> dict:
    from distill_pipeline.batches import Batches, TeacherSource, fields_for, loss_fn_for
    from distill_pipeline.cache.node import open_node
    from distill_pipeline.data import pair_examples, rollout_examples
    from distill_pipeline.losses import POLICY_REF
    from distill_pipeline.metrics import attach_policy_ref, evaluate_model
    from distill_pipeline import lora
    from distill_pipeline.models import load_ref, model_ref
    from distill_pipeline.parallel import group
    from distill_pipeline.training import finish, train_loop

    spec, hp = LOSSES[view.loss], view.hp
    init = model_ref(inputs["init"])
    model, tok = load_ref(init)
    examples = (rollout_examples(inputs["rollouts"]) if "r" in spec.responses
                else pair_examples(view.data, tok))
    cache = TeacherSource(*open_node(inputs["cache"])) if spec.cache else None
    extras = ()
    if spec.policy_ref:
        same = inputs["reference"] == inputs["init"]  # DPO/WPO: the SFT student is both
        attach_policy_ref(examples, model_ref(inputs["reference"]), tok.pad_token_id, hp.strategy,
                          model=model if same else None, batch_size=hp.batch_size)
        extras = (f"{POLICY_REF}_w", f"{POLICY_REF}_l")
    stream = Batches(examples, fields_for(spec), batch_size=hp.batch_size, pad_id=tok.pad_token_id,
                     seed=hp.seed, cache=cache, extras=extras)
    model, base = lora.prepare(model, tok, hp.lora, lora.base_of_ref(init), out)  # after the reference scores
    validation = pair_examples(view.validation, tok) if view.validation else []

    def validate(step: int) -> dict | None:
        """On every worker (FSDP's forward is collective), written by rank 0; the row (without its
        step) is what the trackers get."""
        if not validation:
            return None
        model.eval()
        r = evaluate_model(model, tok, validation, batch_size=64, max_new_tokens=view.max_new_tokens)
        model.train()
        if not group().main:
            return None
        row = {"step": step, **{f"val_{k}": v for k, v in r.items() if k != "n"}}
        path = out / "validation.jsonl"  # rewritten whole: a resumed run validates its checkpoint again
        rows = [line for line in (path.read_text().splitlines() if path.exists() else [])
                if line.strip() and json.loads(line)["step"] < step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in [*rows, json.dumps(row)]))
        os.replace(tmp, path)
        return {k: v for k, v in row.items() if k != "step"}

    summary = train_loop(model, hp=hp, examples=len(examples), batches=stream.epoch,
                         loss_fn=loss_fn_for(spec, view.options), counts=stream.counts, work_dir=out,
                         desc=f"train {view.loss}", on_checkpoint=validate)
    lora.save(model, tok, out, hp.lora, base)
    finish(out)
    final = {}  # the last checkpoint (always the final step) validated the final weights
    if validation and group().main:
        final = json.loads((out / "validation.jsonl").read_text().splitlines()[-1])
    return {**summary, "loss": view.loss, "examples": len(examples),
            **{k: round(v, 4) for k, v in final.items() if k != "step"}}


STAGE = Stage(version=1, kind="train", view=TrainView,
              inputs={"init": "the student to start from", "cache": "a teacher_logits node",
                      "reference": "the SFT student (DPO-style reference)",
                      "rollouts": "the student's rollouts (ADPA)"},
              outputs=("model", "metrics.jsonl"), run=run)
