"""The losses without a (B, T, V) log-softmax (losses.gather_logp, issue 9 item 4): the same loss,
metrics and gradient w.r.t. the logits as the full log-softmax path for every loss, every chunk
size and float64 / float32 / bfloat16 logits; and the memory they hold, counted exactly on CPU
(tensors saved for backward; live tensor bytes over forward + backward).

`gather_logp` itself takes the chunked path only for logits narrower than float32 (float32 and
float64 logits use the full expression: nothing to save). So that every dtype exercises the
chunked code — not the full expression compared with itself — the comparisons below route every
loss through `gather_logp_chunked`; `test_gather_logp_dispatch` checks which path each dtype takes."""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from functools import lru_cache

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distill_pipeline import losses as L
from tests.loss_inputs import random_inputs

CHUNKS = (1, 4, 10, 64)  # one position; < T and not dividing B·T = 15; several rows, uneven; > B·T
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6}


# ---------------------------------------------------------------- the full log-softmax path

def full_gather_logp(logits, index, chunk_rows=None):
    """The path before gather_logp: a float32 (float64) log-softmax over the whole vocabulary."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    return torch.log_softmax(x, dim=-1).gather(-1, index.long())


def full_wpo_weight(logits, labels, chunk_rows=None):
    """WPO's weight as computed before the chunking."""
    with torch.no_grad():
        lp = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
        norm = torch.logsumexp(2 * lp, dim=-1)
        tok = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        valid = labels != L.IGNORE
        return torch.exp(((tok - norm) * valid).sum(-1) / valid.sum(-1).clamp(min=1))


@contextmanager
def path(reference: bool, chunk_rows: int = L.CHUNK_ROWS):
    """Run the losses on the full log-softmax path, or on gather_logp with `chunk_rows`."""
    with pytest.MonkeyPatch.context() as mp:
        if reference:
            mp.setattr(L, "gather_logp", full_gather_logp)
            mp.setattr(L, "_wpo_weight", full_wpo_weight)
        else:  # the chunked path in every dtype (gather_logp keeps float32/64 unchunked)
            mp.setattr(L, "gather_logp", L.gather_logp_chunked)
            mp.setattr(L, "CHUNK_ROWS", chunk_rows)
        yield


@lru_cache(maxsize=32)
def _random(name, B, T, V, K, seed):
    return {k: v.detach() for k, v in random_inputs(name, B=B, T=T, V=V, K=K, seed=seed).items()}


def inputs(name, dtype, *, B=3, T=5, V=40, K=4, seed=1, sliced=False):
    """random_inputs with logits of `dtype` (scaled: log-probs down to about −15) as fresh
    leaves, teacher and reference tensors in float32 (float64 with float64 logits). `sliced`:
    the logits are `full[:, :-1]` of a (B, T+1, V) leaf, as the training loop passes them."""
    other = torch.float64 if dtype == torch.float64 else torch.float32
    out, leaves = {}, {}
    for k, v in _random(name, B, T, V, K, seed).items():
        if k.startswith("logits_"):
            x = (3 * v).to(dtype)
            if sliced:
                x = torch.cat([x, torch.randn(B, 1, V).to(dtype)], dim=1)
            leaves[k] = x.requires_grad_(True)
            out[k] = leaves[k][:, :-1] if sliced else leaves[k]
        else:
            out[k] = v.to(other) if v.is_floating_point() else v.clone()
    return out, leaves


def run(name, dtype, reference, chunk_rows=L.CHUNK_ROWS, **kw):
    args, leaves = inputs(name, dtype, **kw)
    with path(reference, chunk_rows):
        loss, metrics = L.LOSSES[name].fn(*args.values())
        loss.backward()
    return loss, metrics, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_every_loss_matches_the_full_log_softmax_path(name, dtype, chunk):
    loss, metrics, grads = run(name, dtype, False, chunk)
    ref_loss, ref_metrics, ref_grads = run(name, dtype, True)
    tol = TOL[dtype]
    assert loss.dtype == ref_loss.dtype
    assert loss.item() == pytest.approx(ref_loss.item(), abs=tol)
    assert {k: v.item() for k, v in metrics.items()} == pytest.approx(
        {k: v.item() for k, v in ref_metrics.items()}, abs=tol)
    assert grads.keys() == ref_grads.keys() and grads
    for k, g in grads.items():
        assert g.dtype == dtype and g.shape == ref_grads[k].shape, k
        assert g.abs().sum() > 0, k
        if name == "dpkd":  # reads the chosen log-probs once where the full path read them twice
            torch.testing.assert_close(g, ref_grads[k], atol=tol, rtol=2 ** -7 if dtype == torch.bfloat16 else 0,
                                       msg=f"{name} {k}")
        else:  # the backward replays the full path's ops chunk by chunk: bit for bit
            assert torch.equal(g, ref_grads[k]), f"{name} {k}"
        if name != "dpkd" and dtype != torch.float64:
            assert loss.item() == ref_loss.item()


@pytest.mark.parametrize("chunk", (4, 64))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_sliced_logits_as_the_training_loop_passes_them(name, dtype, chunk):
    """`model(...).logits[:, :-1]` is not contiguous: same values and gradient on the full leaf,
    through the chunked path, in every dtype."""
    loss, _, grads = run(name, dtype, False, chunk, sliced=True)
    ref_loss, _, ref_grads = run(name, dtype, True, sliced=True)
    tol = TOL[dtype]
    assert loss.item() == pytest.approx(ref_loss.item(), abs=tol)
    for k, g in grads.items():
        assert g.dtype == dtype, k
        torch.testing.assert_close(g, ref_grads[k], atol=tol, rtol=2 ** -7 if dtype == torch.bfloat16 else 0)
        if name != "dpkd":
            assert torch.equal(g, ref_grads[k]), k
        assert g[:, -1].abs().sum() == 0  # the dropped last position gets no gradient


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_gather_logp_is_the_log_softmax_at_the_ids(dtype, chunk):
    g = torch.Generator().manual_seed(2)
    x = (20 * torch.randn(3, 5, 300, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
    idx = torch.randint(0, 300, (3, 5, 6), generator=g)
    idx[..., 1] = idx[..., 0]  # the label among the teacher's ids: a repeated id
    w = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    out = L.gather_logp_chunked(x, idx.int(), chunk_rows=chunk)
    ref = full_gather_logp(x, idx)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(out, ref)  # log_softmax itself, one chunk of rows at a time
    (grad,) = torch.autograd.grad((out * w.to(out.dtype)).sum(), x)
    (ref_grad,) = torch.autograd.grad((ref * w.to(ref.dtype)).sum(), x)
    assert grad.dtype == dtype
    assert torch.equal(grad, ref_grad)  # bit for bit: the same ops on a chunk of rows


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gather_logp_dispatch(dtype, monkeypatch):
    """float32/float64 logits: the full expression (there is no upcast copy to save); narrower
    logits: the chunked path, with the same values."""
    calls = []
    monkeypatch.setattr(L, "gather_logp_chunked", lambda *a, **k: calls.append(1) or full_gather_logp(*a[:2]))
    x = torch.randn(2, 3, 20, dtype=torch.float64).to(dtype)
    idx = torch.randint(0, 20, (2, 3, 4))
    out = L.gather_logp(x, idx)
    assert calls == ([] if dtype in (torch.float32, torch.float64) else [1])
    assert torch.equal(out, full_gather_logp(x, idx))


def test_gather_logp_shapes_and_chunk_option():
    x = torch.randn(7, 50, dtype=torch.float64)
    idx = torch.tensor([[3, 1]] * 7)
    assert torch.equal(L.gather_logp_chunked(x, idx, chunk_rows=3), torch.log_softmax(x, -1).gather(-1, idx))
    v = torch.randn(50, dtype=torch.float64)
    assert L.gather_logp_chunked(v, torch.tensor([4]), chunk_rows=1).item() == pytest.approx(
        torch.log_softmax(v, -1)[4].item(), abs=1e-15)
    for fn in (L.gather_logp, L.gather_logp_chunked):
        with pytest.raises(ValueError, match="chunk_rows"):
            fn(x, idx, chunk_rows=0)


def test_blocks_cover_every_position_once():
    for B, T, rows in [(3, 5, 1), (3, 5, 4), (3, 5, 10), (3, 5, 64), (1, 0, 4), (2, 7, 7)]:
        seen = torch.zeros(B, T, dtype=torch.long)
        for b, t in L._blocks(B, T, rows):
            block = seen[b, t]
            assert block.numel() <= rows
            seen[b, t] += 1
        assert bool((seen == 1).all()), (B, T, rows)


# ---------------------------------------------------------------- memory

class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storage allocated by ops inside the mode and still alive; the peak.
    Storages that existed before (the inputs) are not counted, views add nothing."""

    def __init__(self, existing=()):
        super().__init__()
        self.live, self.peak = 0, 0
        self._seen = {t.untyped_storage().data_ptr() for t in existing}

    def _free(self, ptr, n):
        self._seen.discard(ptr)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr, n = storage.data_ptr(), storage.nbytes()
                if n and ptr not in self._seen:
                    self._seen.add(ptr)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, ptr, n)
        return out


V, K = 4096, 8
MEMORY_LOSSES = ("dckd", "adpa", "tvkd", "vanilla_kd", "sft", "dpo", "wpo", "dpkd")


def _bytes_of_btv(args, itemsize=4):
    """One (B, T, V) copy per response with logits, at `itemsize` bytes."""
    return sum(v.numel() for k, v in args.items() if k.startswith("logits_")) * itemsize


def peak_beyond_gradients(name, dtype, reference, *, B, chunk_rows=8, T=16):
    """Peak live bytes of the loss's forward + backward minus the logits' gradients (which
    training needs whatever the loss), and the size of one float32 (B, T, V) per response."""
    args, leaves = inputs(name, dtype, B=B, T=T, V=V, K=K)
    tracker = LiveBytes(existing=[v for v in args.values()])
    with path(reference, chunk_rows), tracker:
        loss, _ = L.LOSSES[name].fn(*args.values())
        loss.backward()
        del loss
    grads = sum(v.grad.untyped_storage().nbytes() for v in leaves.values())
    return tracker.peak - grads, _bytes_of_btv(args)


# float32/float64 logits take the unchunked path (no upcast copy to save): bfloat16 is the case
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", MEMORY_LOSSES)
def test_peak_memory_follows_the_chunk_not_the_batch(name, dtype):
    chunk_bytes = lambda rows: rows * V * 4  # noqa: E731 - one float32 chunk of positions
    small = 64 * 1024  # (B, T) statistics, (B, T, K) ids and outputs, the scalars
    excess = {}
    for B in (2, 8):
        for rows in (8, 32):
            excess[B, rows], _ = peak_beyond_gradients(name, dtype, False, B=B, chunk_rows=rows)
            # the backward replays the unchunked ops on one chunk (its log-softmax, gather's zero
            # gradient, log-softmax's gradient; bfloat16 adds the upcast): four chunks at most
            assert excess[B, rows] <= 4 * chunk_bytes(rows) + small, (B, rows, excess)
    assert excess[2, 32] > excess[2, 8] + chunk_bytes(16)  # it is the chunk that costs
    assert excess[8, 32] <= excess[2, 32] + small          # not the batch
    # the full log-softmax path, same inputs: several float32 (B, T, V) beyond the gradients,
    # growing with the batch (what the bound above would catch)
    old, btv = peak_beyond_gradients(name, dtype, True, B=8)
    assert old >= 0.99 * btv > 4 * chunk_bytes(8) + small and old > excess[8, 8]


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", MEMORY_LOSSES)
def test_autograd_keeps_no_copy_of_the_logits(name, dtype):
    """Tensors saved for backward: the logits themselves (no float32 copy) and (B, T)-sized
    statistics, vs the full path's float32 log-softmax per call."""
    def saved(reference):
        args, _ = inputs(name, dtype, B=4, T=16, V=V, K=K)
        inputs_ptr = {v.untyped_storage().data_ptr() for v in args.values()}
        storages = {}

        def pack(t):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
            return t

        with path(reference), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            L.LOSSES[name].fn(*args.values())
        new = sum(n for p, n in storages.items() if p not in inputs_ptr)
        total = sum(storages.values())
        logits = sum(v.untyped_storage().nbytes() for k, v in args.items() if k.startswith("logits_"))
        return new, total, logits, _bytes_of_btv(args)

    new, total, logits, btv = saved(False)
    assert new <= 0.02 * btv  # nothing the size of the vocabulary beyond the inputs
    assert total <= logits + 0.02 * btv
    old_new, _, _, _ = saved(True)
    assert old_new >= 0.99 * btv > 0.02 * btv  # a float32 (B, T, V) per response, at least


def test_float32_logits_take_the_unchunked_path():
    """Nothing to save there (no upcast copy): exactly the full path, whatever the chunk."""
    x = torch.randn(2, 5, 50, requires_grad=True)
    idx = torch.randint(0, 50, (2, 5, 3))
    out = L.gather_logp(x, idx, chunk_rows=1)
    assert out.grad_fn is not None and "GatherLogp" not in type(out.grad_fn).__name__
    assert torch.equal(out, torch.log_softmax(x, -1).gather(-1, idx))
