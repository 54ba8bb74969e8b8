"""Stage `sft`: supervised fine-tuning of the teacher or the student (two nodes, `sft.teacher`
and `sft.student`). Produces `model/` (save_pretrained: weights, tokenizer, chat template) and
`metrics.jsonl`. Run alone: `distill-pipeline run sft -c configs/quickstart.yaml`.
"""
from __future__ import annotations

from pathlib import Path

NAME = "sft"
VERSION = 1
KIND = "train"


def run(view: dict, inputs: dict, out: Path) -> dict:
    from distill_pipeline.data import sft_examples
    from distill_pipeline.data.tokenize import collate
    from distill_pipeline.losses import sft_loss
    from distill_pipeline.models import describe, load_model, load_tokenizer, save_model
    from distill_pipeline.training import epoch_batches, finish, train_loop

    hp = view["hp"]
    tok = load_tokenizer(view["model"])
    model = load_model(view["model"], seed=hp.seed)
    examples = sft_examples(view["data"], tok)
    print(f"sft: {describe(model)}, {len(examples)} examples")

    def batches(epoch: int):
        for idx in epoch_batches(len(examples), hp.batch_size, hp.seed, epoch):
            chunk = [examples[i] for i in idx]
            yield collate([e["prompt_ids"] for e in chunk], [e["response_ids"] for e in chunk],
                          tok.pad_token_id)

    def loss_fn(model, batch):
        ids, mask, labels = batch
        logits = model(input_ids=ids, attention_mask=mask).logits
        return sft_loss(logits[:, :-1], labels[:, 1:])

    summary = train_loop(model, hp=hp, examples=len(examples), batches=batches, loss_fn=loss_fn,
                         work_dir=out, desc=f"sft {view['role']}")
    save_model(model, tok, out / "model")
    finish(out)
    return {**summary, "examples": len(examples)}
