"""Batches: the counts a step is normalised by match the built tensors, and a loss fed by
`loss_fn_for` with one micro-batch's own counts equals the plain batch loss."""
from __future__ import annotations

import pytest
import torch

from distill_pipeline.batches import Batches, Field, fields_for, loss_fn_for
from distill_pipeline.losses import LOSSES, POLICY_REF


def _examples(n=7):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 50, (1 + i % 3,), generator=g).tolist()
        out.append({"prompt_ids": prompt,
                    "chosen_ids": torch.randint(3, 50, (1 + (i * 5) % 4,), generator=g).tolist(),
                    "rejected_ids": torch.randint(3, 50, (2 + (i * 3) % 5,), generator=g).tolist(),
                    f"{POLICY_REF}_w": -float(i), f"{POLICY_REF}_l": -2.0 * i})
    return out


def test_counts_match_the_built_labels():
    stream = Batches(_examples(), [Field("chosen", "w"), Field("rejected", "l")], batch_size=3, pad_id=0, seed=4)
    for epoch in (0, 1):
        built = list(stream.epoch(epoch))
        counts = stream.counts(epoch)
        assert len(built) == len(counts) == 3
        for b, c in zip(built, counts):
            assert c == {"pairs": len(b["index"]),
                         "tokens_w": int((b["w"]["student"][2][:, 1:] != -100).sum()),
                         "tokens_l": int((b["l"]["student"][2][:, 1:] != -100).sum())}


@pytest.mark.parametrize("name", ["sft", "dpo", "simpo", "wpo"])
def test_a_single_micro_batch_with_its_counts_is_the_batch_mean(name):
    from distill_pipeline.models import load_model
    from distill_pipeline.config import ModelSpec

    model = load_model(ModelSpec(preset="tiny-student"))
    spec = LOSSES[name]
    extras = (f"{POLICY_REF}_w", f"{POLICY_REF}_l") if spec.policy_ref else ()
    stream = Batches(_examples(), fields_for(spec), batch_size=4, pad_id=0, extras=extras)
    batch, counts = next(iter(stream.epoch(0))), stream.counts(0)[0]
    fn = loss_fn_for(spec, {})
    with torch.no_grad():
        plain, plain_m = fn(model, batch, None)
        normed, normed_m = fn(model, batch, counts)
    assert normed.item() == pytest.approx(plain.item(), rel=1e-6)
    assert {k: v.item() for k, v in normed_m.items()} == pytest.approx({k: v.item() for k, v in plain_m.items()}, rel=1e-6)
