"""Stage `teacher_dpo`: DPO-train the teacher from the SFT teacher, which stays on disk as the
reference teacher. Produces `model/` and `metrics.jsonl`.
Run alone: `distill-pipeline run teacher_dpo -c configs/quickstart.yaml`.
"""
from __future__ import annotations

from pathlib import Path

from distill_pipeline.data import DataView, data_view
from distill_pipeline.config import HP_ADDED, TeacherDpo
from distill_pipeline.stages import Stage, View


class TeacherDpoView(View):
    hp: TeacherDpo
    data: DataView

    # Checkpoints only: a resumed run is bit-identical (tests/stages/test_training_resume.py), and
    # these stages write nothing per checkpoint (train does: its validation rows).
    NEUTRAL = frozenset({"hp.checkpoint_every"})
    ADDED = HP_ADDED

    def origins(self) -> dict[str, str | None]:
        return {"hp": "teacher_dpo", "data": None}


def view_for(cfg) -> TeacherDpoView:
    return TeacherDpoView(hp=cfg.teacher_dpo, data=data_view(cfg.data, "preferences"))


def run(view: TeacherDpoView, inputs: dict, out: Path) -> dict:
    from distill_pipeline.batches import Batches, fields_for, loss_fn_for
    from distill_pipeline.data import pair_examples
    from distill_pipeline.losses import LOSSES, POLICY_REF
    from distill_pipeline.metrics import attach_policy_ref
    from distill_pipeline import lora
    from distill_pipeline.models import load_ref, model_ref
    from distill_pipeline.training import finish, train_loop

    hp, spec = view.hp, LOSSES["dpo"]
    reference = model_ref(inputs["reference"])
    policy, tok = load_ref(reference)
    examples = pair_examples(view.data, tok)
    # the policy starts as the reference: score the pairs with it before training (no second copy)
    attach_policy_ref(examples, reference, tok.pad_token_id, hp.strategy, model=policy,
                      batch_size=hp.batch_size)
    stream = Batches(examples, fields_for(spec), batch_size=hp.batch_size, pad_id=tok.pad_token_id,
                     seed=hp.seed, extras=(f"{POLICY_REF}_w", f"{POLICY_REF}_l"))
    # LoRA: adapters over the reference (their base), which the policy's start already scored
    policy, base = lora.prepare(policy, tok, hp.lora, lora.base_of_ref(reference), out)
    summary = train_loop(policy, hp=hp, examples=len(examples), batches=stream.epoch,
                         loss_fn=loss_fn_for(spec, {"beta": hp.beta}), counts=stream.counts,
                         work_dir=out, desc="teacher_dpo")
    lora.save(policy, tok, out, hp.lora, base)
    finish(out)
    return {**summary, "pairs": len(examples)}


STAGE = Stage(version=1, kind="train", view=TeacherDpoView,
              inputs={"reference": "the SFT teacher (trained or imported): the policy's start and "
                                   "its DPO reference"},
              outputs=("model", "metrics.jsonl"), run=run)
