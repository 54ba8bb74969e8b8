"""Extraction's post-head step (`extract._head_topk`): top-K ids and log-probs, lse and the label
log-prob from float32 logits, against a float64 log-softmax reference and against the plain
implementation it replaced (logsumexp, subtract, topk, gather) — same ids, same bits — whatever
the rows beside a row, the block boundaries, ties or the vocabulary's last, shorter id group."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distill_pipeline.cache import extract

K = 50


def logits_and_labels(n: int, vocab: int, seed: int = 0, step: float | None = None):
    """(n, vocab) float32 logits (rounded to multiples of `step`: many exact ties) and labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=g) * 3  # (n, V)
    if step:
        x = (x / step).round() * step
    x[0, -1] = 40.0  # the top logit in the last id (the shorter last group when V % group != 0)
    x[1, 0] = 40.0
    return x, torch.randint(0, vocab, (n,), generator=g)


def run(x, labels, block_rows: int, monkeypatch) -> tuple:
    monkeypatch.setattr(extract, "POST_HEAD_BLOCK_BYTES", 4 * x.shape[1] * block_rows)
    return extract._head_topk(x.clone(), labels, K)


def plain(x, labels) -> tuple:
    """The implementation _head_topk replaced: log-softmax over the whole row, then topk."""
    lse = torch.logsumexp(x, dim=-1)
    logp = x - lse[:, None]
    top = logp.topk(K, dim=-1)
    return (top.indices.int().numpy(), top.values.numpy(), lse.numpy(),
            logp.gather(1, labels[:, None]).squeeze(1).numpy())


@pytest.mark.parametrize("vocab", [5120, 4003, 183])  # 160 groups; 125 + a 3-id last group; too few groups
def test_matches_a_float64_reference(vocab, monkeypatch):
    x, labels = logits_and_labels(37, vocab)
    ids, logp, lse, label_logp, v = run(x, labels, 8, monkeypatch)  # blocks of 8, 8, 8, 8, 5 rows
    ref = torch.log_softmax(x.double(), dim=-1)  # (n, V)
    top = ref.topk(K, dim=-1)
    assert v == vocab and ids.dtype == np.int32 and logp.dtype == lse.dtype == label_logp.dtype == np.float32
    assert np.array_equal(ids, top.indices.numpy()) and ids[0, 0] == vocab - 1 and ids[1, 0] == 0
    np.testing.assert_allclose(logp, top.values.numpy(), atol=1e-5)
    np.testing.assert_allclose(lse, torch.logsumexp(x.double(), -1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(label_logp, ref.gather(1, labels[:, None]).squeeze(1).numpy(), atol=1e-5)


@pytest.mark.parametrize("step", [None, 0.25])  # distinct logits; many ties (bf16-like spacing)
@pytest.mark.parametrize("vocab", [5120, 4003])
def test_same_ids_and_bits_as_the_plain_implementation(vocab, step, monkeypatch):
    """Ties among the top K+1 are ordered as torch.topk orders them (rows with ties take the
    whole-row topk), so the ids, not only the values, are those of the plain implementation."""
    x, labels = logits_and_labels(37, vocab, seed=1, step=step)
    got, want = run(x, labels, 8, monkeypatch)[:4], plain(x, labels)
    if step:  # the case is real: most rows tie within their top K+1
        top = x.topk(K + 1, dim=-1).values
        assert (top[:, 1:] == top[:, :-1]).any(-1).float().mean() > 0.5
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_a_row_does_not_depend_on_the_rows_beside_it(monkeypatch):
    """Block boundaries and neighbours change nothing: the cache is compared bit for bit across
    shard counts, batch sizes and crash + resume."""
    x, labels = logits_and_labels(23, 4003, seed=2)
    whole = run(x, labels, 1000, monkeypatch)  # one block
    for rows in (1, 3, 8):
        blocks = run(x, labels, rows, monkeypatch)
        assert all(np.array_equal(a, b) for a, b in zip(whole[:4], blocks[:4])), rows
    order = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    shuffled = run(x[order], labels[order], 5, monkeypatch)
    assert all(np.array_equal(a[order.numpy()], b) for a, b in zip(whole[:4], shuffled[:4]))
    alone = [run(x[i:i + 1], labels[i:i + 1], 8, monkeypatch) for i in (0, 1, 22)]
    for i, one in zip((0, 1, 22), alone):
        assert all(np.array_equal(a[i:i + 1], b) for a, b in zip(whole[:4], one[:4])), i


def test_no_rows():
    ids, logp, lse, label_logp, v = extract._head_topk(torch.empty(0, 4003), torch.empty(0, dtype=torch.long), K)
    assert ids.shape == logp.shape == (0, K) and lse.shape == label_logp.shape == (0,) and v == 4003
