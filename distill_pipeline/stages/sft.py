"""Stage `sft`: supervised fine-tuning of the teacher or the student (two nodes, `sft.teacher`
and `sft.student`). Produces `model/` (save_pretrained: weights, tokenizer, chat template) and
`metrics.jsonl`. Run alone: `distill-pipeline run sft -c configs/quickstart.yaml`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from distill_pipeline.data import DataView, data_view
from distill_pipeline.config import HP_ADDED, ModelSpec, TrainHP
from distill_pipeline.stages import Stage, View


class SftView(View):
    role: Literal["teacher", "student"]
    model: ModelSpec
    hp: TrainHP
    data: DataView
    chat_template: str | None = None  # data.chat_template's text: replaces the model's own

    # Checkpoints only: a resumed run is bit-identical (tests/stages/test_training_resume.py), and
    # these stages write nothing per checkpoint (train does: its validation rows).
    NEUTRAL = frozenset({"hp.checkpoint_every"})
    ADDED = HP_ADDED

    def origins(self) -> dict[str, str | None]:
        return {"role": None, "model": f"models.{self.role}", "hp": f"sft.{self.role}", "data": None,
                "chat_template": "data.chat_template"}


def view_for(cfg, role: str) -> SftView:
    return SftView(role=role, model=getattr(cfg.models, role), hp=getattr(cfg.sft, role),
                   data=data_view(cfg.data, "sft"), chat_template=cfg.data.template())


def run(view: SftView, inputs: dict, out: Path) -> dict:
    from distill_pipeline import lora
    from distill_pipeline.batches import Batches, Field, loss_fn_for
    from distill_pipeline.data import sft_examples
    from distill_pipeline.losses import LOSSES
    from distill_pipeline.models import describe, load_model, load_tokenizer
    from distill_pipeline.parallel import group
    from distill_pipeline.training import finish, train_loop

    hp = view.hp
    tok = load_tokenizer(view.model, view.chat_template)
    model = load_model(view.model, seed=hp.seed)
    model, base = lora.prepare(model, tok, hp.lora, lora.base_of_spec(view.model), out)
    examples = sft_examples(view.data, tok)
    if group().main:
        print(f"sft: {describe(model)}, {len(examples)} examples")
    stream = Batches(examples, [Field("response", "w")], batch_size=hp.batch_size,
                     pad_id=tok.pad_token_id, seed=hp.seed)
    summary = train_loop(model, hp=hp, examples=len(examples), batches=stream.epoch,
                         loss_fn=loss_fn_for(LOSSES["sft"], {}), counts=stream.counts,
                         work_dir=out, desc=f"sft {view.role}")
    lora.save(model, tok, out, hp.lora, base)
    finish(out)
    return {**summary, "examples": len(examples)}


STAGE = Stage(version=1, kind="train", view=SftView, inputs={}, outputs=("model", "metrics.jsonl"), run=run)
