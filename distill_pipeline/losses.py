"""Training objectives as pure tensor functions (docs/METHODS.md is the specification).

Conventions: every tensor is *aligned* — `logits_<s>[:, t]` predicts `labels_<s>[:, t]` (callers do
the causal shift); `labels == -100` marks positions that do not count. The suffix names the
response: `w` chosen, `l` rejected, `r` the student's rollout. Teacher tensors come from the
teacher-logit cache at the same positions: `teacher_ids_<s>` / `teacher_logp_<s>` (B, T, K) and
`teacher_label_logp_<s>` (B, T) for the DPO teacher, `ref_teacher_*` for the reference (SFT)
teacher. `policy_ref_logp_w/l` (B,) are summed log-probs of the reference of the model being
trained (DPO-style losses). Log-probabilities are computed in float32 (float64 stays float64).
Teacher and reference tensors never receive gradient.

Memory: no loss materialises a (B, T, V) log-softmax. Every log-probability a loss reads is at a
few ids per position (the label, the teacher's top-K), so `gather_logp` takes the log-softmax
`CHUNK_ROWS` positions at a time and keeps only those ids, and its backward replays the same ops
(cast, log-softmax, gather) on one chunk at a time into one gradient buffer of the logits' dtype —
so values and gradients are bit for bit those of the unchunked path. Autograd keeps the logits
themselves (not a float32 copy); forward and backward add one gradient of the logits' dtype and a
few chunks' float32 temporaries, whatever the batch (benchmarks/loss_memory_bench.py). WPO's
weight, which needs all of V, is computed chunk by chunk without gradient.

Normalisation (docs/METHODS.md, "Normalisation"): every loss is a weighted sum of terms, each a
sum over valid tokens of one response or over pairs, divided by a count. `norm=None` uses the
batch's own counts (a batch mean — the worked numbers); the training loop passes the counts of the
whole optimizer step (`tokens_w`, `tokens_l`, `tokens_r`, `pairs`), so micro-batch contributions
add up to exactly the step's mean however the step is split into micro-batches or workers.

Each function returns `(loss, metrics)`: a scalar tensor and a dict of detached scalar tensors,
normalised the same way (the loop sums them over micro-batches and calls `.item()` when it logs).

`LOSSES` maps a method's loss name to its function. What a loss needs is read from its signature:
its tensor arguments (by the names above) decide which responses are batched, which cache
extraction it reads and whether a reference model is scored; its keyword-only arguments are its
options, with their defaults and types (validated by the config). Adding a loss = the function,
its `LOSSES` entry and its tests.

Example::

    import torch
    from distill_pipeline.losses import dckd_loss
    logits_w = torch.randn(1, 2, 5, requires_grad=True)           # (B, T, V)
    labels_w = torch.tensor([[0, 2]])                              # (B, T)
    t_ids = torch.tensor([[[0, 1, 2], [2, 4, 1]]])                 # (B, T, K)
    t_logp = torch.log(torch.tensor([[[.5, .2, .15], [.6, .2, .1]]]))
    loss, metrics = dckd_loss(logits_w, labels_w, t_ids, t_logp,
                              logits_w, labels_w, t_ids, t_logp, alpha=0.1)
    loss.backward()
"""
from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal, Mapping

from pydantic import BeforeValidator, Field

if TYPE_CHECKING:
    from torch import Tensor


class _LazyModule:
    """Imports a module on first attribute access: `LOSSES` is read by config validation and
    `status`, which must answer without paying torch's ~1.7 s import."""

    def __init__(self, name: str):
        self._name, self._module = name, None

    def __getattr__(self, attr: str):
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


torch = _LazyModule("torch")
F = _LazyModule("torch.nn.functional")

IGNORE = -100  # label of a position that does not count (prompt, padding)
EPS = 1e-8
Norm = Mapping[str, Any] | None



def _number(value: Any) -> Any:
    if isinstance(value, bool):  # YAML's yes/true would otherwise pass as 1.0
        raise ValueError(f"expected a number, got the boolean {value}")
    return value


# Option types: validated (with these bounds) when the config is loaded.
Positive = Annotated[float, BeforeValidator(_number), Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, BeforeValidator(_number), Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, BeforeValidator(_number), Field(ge=0, le=1, allow_inf_nan=False)]


# ---------------------------------------------------------------------------- helpers

CHUNK_ROWS = 256  # positions per chunk of the vocabulary-wide work (gather_logp, WPO's weight)


def _compute_dtype(logits: Tensor):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _chunk_logsoftmax(x: Tensor) -> Tensor:
    """log_softmax over the vocabulary in float32 (float64 stays float64), as the unchunked path
    always computed it: the same cast, then the same kernel."""
    return torch.log_softmax(x if x.dtype == torch.float64 else x.float(), dim=-1)


def _as_3d(x: Tensor) -> Tensor:
    """(…, V) → (B, T, V) as a view where possible (a (B, T, V) slice such as `logits[:, :-1]`
    stays a view: flattening it to rows would copy the whole tensor)."""
    if x.dim() == 3:
        return x
    if x.dim() < 3:
        return x.reshape((1,) * (3 - x.dim()) + tuple(x.shape))
    return x.flatten(0, -3)


def _blocks(B: int, T: int, rows: int):
    """(batch slice, position slice) blocks of at most `rows` positions covering (B, T)."""
    rows = max(1, int(rows))
    if T <= rows:
        step = rows // max(T, 1)
        for b in range(0, B, step):
            yield slice(b, min(b + step, B)), slice(None)
    else:
        for b in range(B):
            for t in range(0, T, rows):
                yield slice(b, b + 1), slice(t, min(t + rows, T))


_GATHER_LOGP = None


def _gather_logp_function():
    """The autograd Function behind `gather_logp`, defined on first use (a class deriving from
    torch.autograd.Function at import time would import torch, which `status` must not pay)."""
    global _GATHER_LOGP
    if _GATHER_LOGP is not None:
        return _GATHER_LOGP

    class GatherLogp(torch.autograd.Function):
        """log_softmax(logits)[index] without a (B, T, V) log-softmax; see `gather_logp`."""

        @staticmethod
        def forward(ctx, logits, index, rows):
            B, T, _ = logits.shape
            out = torch.empty(index.shape, dtype=_compute_dtype(logits), device=logits.device)  # (B, T, K)
            for b, t in _blocks(B, T, rows):
                out[b, t] = _chunk_logsoftmax(logits[b, t]).gather(-1, index[b, t])  # one chunk
            ctx.save_for_backward(logits, index)
            ctx.rows = rows
            return out

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_out):
            logits, index = ctx.saved_tensors
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # (B, T, V)
            B, T, _ = logits.shape
            for b, t in _blocks(B, T, ctx.rows):
                # the unchunked path's own ops (cast, log_softmax, gather) replayed on one chunk:
                # rows are independent, so the gradient is bit for bit the unchunked one
                with torch.enable_grad():
                    x = logits[b, t].detach().requires_grad_(True)
                    _chunk_logsoftmax(x).gather(-1, index[b, t]).backward(grad_out[b, t])
                grad[b, t] = x.grad
                del x  # before the next chunk's temporaries are allocated
            return grad, None, None

    _GATHER_LOGP = GatherLogp
    return GatherLogp


def gather_logp(logits: Tensor, index: Tensor, chunk_rows: int | None = None) -> Tensor:
    """log softmax(logits)[…, index]: (…, K) for `logits` (…, V) and `index` (…, K), in float32
    (float64 stays float64), differentiable w.r.t. `logits`.

    `log_softmax(logits.float(), -1).gather(-1, index)` — literally, for float32/float64 logits
    (there is no upcast copy to save) — and for narrower logits without its memory: the log-softmax runs
    on `chunk_rows` positions at a time (default `CHUNK_ROWS`, read at call time; it is computed
    row by row, so the values do not depend on the chunk), autograd keeps the logits themselves
    (no float32 copy), and the backward replays the unchunked path's ops on one chunk at a time,
    writing into one gradient buffer of the logits' dtype: values and gradients are bit for bit
    the full path's. The float32 temporaries are a few chunks' (chunk_rows × V each), whatever
    the number of positions."""
    if logits.dtype in (torch.float32, torch.float64):
        # no upcast copy to save: the full path keeps one log-softmax the size of the logits, the
        # chunked one a gradient buffer plus chunk temporaries — no smaller, measured
        if chunk_rows is not None and int(chunk_rows) < 1:
            raise ValueError(f"chunk_rows must be ≥ 1, got {chunk_rows}")
        return _chunk_logsoftmax(logits).gather(-1, index.long())
    return gather_logp_chunked(logits, index, chunk_rows)


def gather_logp_chunked(logits: Tensor, index: Tensor, chunk_rows: int | None = None) -> Tensor:
    """`gather_logp`'s chunked path, for logits of any dtype: (…, K). What `gather_logp` runs
    for logits narrower than float32; tests drive it in every dtype."""
    rows = CHUNK_ROWS if chunk_rows is None else int(chunk_rows)
    if rows < 1:
        raise ValueError(f"chunk_rows must be ≥ 1, got {chunk_rows}")
    shape = index.shape
    x = _as_3d(logits)
    idx = index.long().reshape(*x.shape[:2], shape[-1])  # (B, T, K)
    return _gather_logp_function().apply(x, idx, rows).reshape(shape)  # (…, K)


def _valid(labels: Tensor) -> Tensor:
    return labels != IGNORE  # (B, T)


def _tokens(norm: Norm, s: str, valid: Tensor):
    """Denominator of a token mean over response `s`: the step's count, or the batch's own."""
    return valid.sum().clamp(min=1) if norm is None else norm[f"tokens_{s}"]


def _pairs(norm: Norm, n: int):
    return n if norm is None else norm["pairs"]


def token_mean(x: Tensor, labels: Tensor, norm: Norm = None, s: str = "w") -> Tensor:
    """Σ x over valid positions of response `s` ÷ its token count (see module docstring). Scalar."""
    valid = _valid(labels)
    return (x * valid).sum() / _tokens(norm, s, valid)


def pair_mean(x: Tensor, norm: Norm = None) -> Tensor:
    """Σ x over pairs ÷ the pair count. Scalar."""
    return x.sum() / _pairs(norm, x.shape[0])


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log π(label_t | s_t), zero at ignored positions: (B, T)."""
    logp = gather_logp(logits, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return logp * _valid(labels)


def present(t_logp: Tensor) -> Tensor:
    """Teacher slots that hold a token: (…, K) bool. An adaptive-K cache pads each token's slots
    past its own k with −inf log-probs (cache/reader.py: pad_slots); such a slot is in no bin."""
    return t_logp > float("-inf")


def tail_mass(t_logp: Tensor) -> Tensor:
    """1 − Σ exp(top-K log-probs), computed stably: (…)."""
    return (-torch.expm1(torch.logsumexp(t_logp, dim=-1))).clamp(min=0)


def teacher_bins(t_logp: Tensor) -> Tensor:
    """Teacher K+1 bins (top-K probabilities + tail), clamped: (B, T, K+1). No gradient."""
    t_logp = t_logp.detach()
    p = torch.cat([t_logp.exp(), tail_mass(t_logp).unsqueeze(-1)], dim=-1)  # (B, T, K+1)
    return p.clamp(EPS, 1 - EPS)


def student_bins(logits: Tensor, t_ids: Tensor, t_logp: Tensor | None = None) -> Tensor:
    """Student K+1 bins: full softmax gathered at the teacher ids + the rest, clamped: (B, T, K+1).
    Gathers K log-probs before exponentiating (no full-vocabulary exp). A slot absent from the
    teacher (`t_logp` −inf) holds no student mass: it stays in the last bin."""
    return _bins_from_topk(gather_logp(logits, t_ids), t_logp)  # (B, T, K+1)


def _bins_from_topk(q_logp: Tensor, t_logp: Tensor | None = None) -> Tensor:
    """Student K+1 bins from its log-probs at the teacher's top-K ids (B, T, K), clamped. An
    absent teacher slot gets 0 here and EPS in `teacher_bins`: both clamp to EPS, KL term 0."""
    q = q_logp.exp()
    if t_logp is not None:
        q = q * present(t_logp.detach()).to(q.dtype)
    rest = (1 - q.sum(-1, keepdim=True)).clamp(min=0)
    return torch.cat([q, rest], dim=-1).clamp(EPS, 1 - EPS)


def _kl_per_token(q: Tensor, t_logp: Tensor) -> Tensor:
    """KL(teacher bins ‖ q) per position for student bins q (B, T, K+1): (B, T)."""
    p = teacher_bins(t_logp.to(q.dtype))
    return (p * (p.log() - q.log())).sum(-1)


def binned_kl(logits: Tensor, labels: Tensor, t_ids: Tensor, t_logp: Tensor, norm: Norm = None,
              s: str = "w") -> Tensor:
    """Token-mean forward KL(teacher ‖ student) on K+1 bins (METHODS §1). Scalar."""
    return token_mean(_kl_per_token(student_bins(logits, t_ids, t_logp), t_logp), labels, norm, s)


def sft_and_kl(logits: Tensor, labels: Tensor, t_ids: Tensor, t_logp: Tensor, norm: Norm = None,
               s: str = "w") -> tuple[Tensor, Tensor]:
    """(token-mean NLL, token-mean K+1-bin KL) on one response with a single gather over the
    vocabulary: label and top-K ids together, so the backward pass scatters into the
    (B, T, V) gradient once — a cached KD step then costs about what an SFT step costs."""
    index = torch.cat([labels.clamp(min=0).unsqueeze(-1), t_ids.long()], dim=-1)  # (B, T, 1+K)
    picked = gather_logp(logits, index)  # (B, T, 1+K)
    nll = -token_mean(picked[..., 0], labels, norm, s)
    return nll, token_mean(_kl_per_token(_bins_from_topk(picked[..., 1:], t_logp), t_logp), labels, norm, s)


def sft_nll(logits: Tensor, labels: Tensor, norm: Norm = None, s: str = "w") -> Tensor:
    """Token-mean negative log-likelihood over valid positions. Scalar."""
    return -token_mean(token_logps(logits, labels), labels, norm, s)


def _seq(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-prob and length per sequence: (B,), (B,)."""
    return token_logps(logits, labels).sum(-1), _valid(labels).sum(-1)


def _metrics(**values: Tensor) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in values.items()}


# ---------------------------------------------------------------------------- objectives

def sft_loss(logits_w: Tensor, labels_w: Tensor, norm: Norm = None) -> tuple[Tensor, dict]:
    """SFT: L = −mean_t log π_θ(y_t | s_t) (METHODS §2)."""
    loss = sft_nll(logits_w, labels_w, norm)
    return loss, _metrics(sft=loss)


def dpo_loss(logits_w: Tensor, labels_w: Tensor, logits_l: Tensor, labels_l: Tensor,
             policy_ref_logp_w: Tensor, policy_ref_logp_l: Tensor, norm: Norm = None, *,
             beta: Positive = 0.1) -> tuple[Tensor, dict]:
    """DPO (Rafailov et al. 2023, Eq. 7): −log σ(β [(logp_w − ref_w) − (logp_l − ref_l)]).
    `policy_ref_logp_*` (B,): summed log-probs of the trained model's reference (no gradient)."""
    lw, _ = _seq(logits_w, labels_w)
    ll, _ = _seq(logits_l, labels_l)
    margin = (lw - policy_ref_logp_w.detach()) - (ll - policy_ref_logp_l.detach())  # (B,)
    loss = pair_mean(-F.logsigmoid(beta * margin), norm)
    return loss, _metrics(dpo=loss, reward_margin=pair_mean(beta * margin, norm),
                          reward_acc=pair_mean((margin > 0).to(margin.dtype), norm))


def simpo_loss(logits_w: Tensor, labels_w: Tensor, logits_l: Tensor, labels_l: Tensor,
               norm: Norm = None, *, beta: Positive = 2.0, gamma: NonNegative = 1.0) -> tuple[Tensor, dict]:
    """SimPO (Meng et al. 2024, Eq. 6): −log σ(β (avg_w − avg_l) − γ), avg = logp / |y|."""
    lw, nw = _seq(logits_w, labels_w)
    ll, nl = _seq(logits_l, labels_l)
    margin = beta * (lw / nw.clamp(min=1) - ll / nl.clamp(min=1)) - gamma  # (B,)
    loss = pair_mean(-F.logsigmoid(margin), norm)
    return loss, _metrics(simpo=loss, reward_acc=pair_mean((margin + gamma > 0).to(margin.dtype), norm))


def _wpo_weight(logits: Tensor, labels: Tensor, chunk_rows: int | None = None) -> Tensor:
    """w(y) = exp(mean_t [log π(y_t) − log Σ_v π(v)²]), no gradient: (B,). Σ_v needs the whole
    distribution: log-softmax `chunk_rows` positions (default `CHUNK_ROWS`) at a time."""
    with torch.no_grad():
        x = _as_3d(logits.detach())
        target = labels.clamp(min=0).reshape(x.shape[:2])  # (B, T)
        cd = _compute_dtype(x)
        norm = torch.empty(x.shape[:2], dtype=cd, device=x.device)  # (B, T)
        tok = torch.empty(x.shape[:2], dtype=cd, device=x.device)  # (B, T)
        for b, t in _blocks(*x.shape[:2], CHUNK_ROWS if chunk_rows is None else chunk_rows):
            lp = torch.log_softmax(x[b, t].to(cd), dim=-1)  # (b, t, V)
            tok[b, t] = lp.gather(-1, target[b, t].unsqueeze(-1)).squeeze(-1)
            norm[b, t] = torch.logsumexp(lp.mul_(2), dim=-1)
            del lp
        norm, tok = norm.reshape(labels.shape), tok.reshape(labels.shape)
        valid = _valid(labels)
        return torch.exp(((tok - norm) * valid).sum(-1) / valid.sum(-1).clamp(min=1))


def wpo_loss(logits_w: Tensor, labels_w: Tensor, logits_l: Tensor, labels_l: Tensor,
             policy_ref_logp_w: Tensor, policy_ref_logp_l: Tensor, norm: Norm = None, *,
             beta: Positive = 0.1) -> tuple[Tensor, dict]:
    """WPO (Zhou et al. 2024): per-pair DPO loss weighted by w(y_w)·w(y_l) (no gradient through w)."""
    lw, _ = _seq(logits_w, labels_w)
    ll, _ = _seq(logits_l, labels_l)
    margin = (lw - policy_ref_logp_w.detach()) - (ll - policy_ref_logp_l.detach())  # (B,)
    weight = _wpo_weight(logits_w, labels_w) * _wpo_weight(logits_l, labels_l)  # (B,)
    loss = pair_mean(weight * -F.logsigmoid(beta * margin), norm)
    return loss, _metrics(wpo=loss, wpo_weight=pair_mean(weight, norm),
                          reward_acc=pair_mean((margin > 0).to(margin.dtype), norm))


def vanilla_kd_loss(logits_w: Tensor, labels_w: Tensor, teacher_ids_w: Tensor, teacher_logp_w: Tensor,
                    norm: Norm = None, *, alpha: NonNegative = 0.1) -> tuple[Tensor, dict]:
    """VanillaKD: L_SFT(y_w) + α · KL(teacher bins ‖ student bins) on y_w (METHODS §2)."""
    sft, kl = sft_and_kl(logits_w, labels_w, teacher_ids_w, teacher_logp_w, norm, "w")
    return sft + alpha * kl, _metrics(sft=sft, kl_w=kl)


def dckd_loss(logits_w: Tensor, labels_w: Tensor, teacher_ids_w: Tensor, teacher_logp_w: Tensor,
              logits_l: Tensor, labels_l: Tensor, teacher_ids_l: Tensor, teacher_logp_l: Tensor,
              norm: Norm = None, *, alpha: NonNegative = 0.1) -> tuple[Tensor, dict]:
    """DCKD (ADPA paper, Eq. 5–7): L_SFT(y_w) + α (KL_w + KL_l), token-mean K+1-bin forward KL
    against the DPO teacher on the dataset's y_w and y_l."""
    sft, kl_w = sft_and_kl(logits_w, labels_w, teacher_ids_w, teacher_logp_w, norm, "w")
    kl_l = binned_kl(logits_l, labels_l, teacher_ids_l, teacher_logp_l, norm, "l")
    loss = sft + alpha * (kl_w + kl_l)
    return loss, _metrics(sft=sft, kl_w=kl_w, kl_l=kl_l)


def adpa_advantages(t_ids: Tensor, t_logp: Tensor, r_ids: Tensor, r_logp: Tensor, *,
                    missing: str = "ref_min") -> Tensor:
    """A(s_t, a) = log π_dpo(a|s_t) − log π_ref(a|s_t) for a in the DPO top-K: (B, T, K).
    A DPO top-K id absent from the reference top-K takes the reference's lowest top-K
    log-prob (`ref_min`, the paper) or the DPO teacher's lowest (`dpo_min`, the released code)."""
    t_in, r_in = present(t_logp), present(r_logp)  # adaptive K: −inf slots are absent
    match = (t_ids.unsqueeze(-1) == r_ids.unsqueeze(-2)) & r_in.unsqueeze(-2)  # (B, T, K, K_ref)
    found = match.any(-1)  # (B, T, K)
    ref_at = torch.where(match, r_logp.unsqueeze(-2), 0.0).sum(-1)  # (B, T, K)
    if missing == "ref_min":
        fill = r_logp.masked_fill(~r_in, float("inf")).min(-1, keepdim=True).values.expand_as(ref_at)
    elif missing == "dpo_min":
        fill = t_logp.masked_fill(~t_in, float("inf")).min(-1, keepdim=True).values.expand_as(ref_at)
    else:
        raise ValueError(f"adpa missing-token rule {missing!r}; accepted: ref_min, dpo_min")
    # an absent DPO slot is outside the support S_t: advantage 0, it adds nothing
    return torch.where(t_in, t_logp - torch.where(found, ref_at, fill), 0.0)


def adpa_loss(logits_w: Tensor, labels_w: Tensor, logits_r: Tensor, labels_r: Tensor,
              teacher_ids_r: Tensor, teacher_logp_r: Tensor,
              ref_teacher_ids_r: Tensor, ref_teacher_logp_r: Tensor, norm: Norm = None, *,
              gamma: NonNegative = 1.6, sft_weight: NonNegative = 1.0,
              code_compat: bool = False) -> tuple[Tensor, dict]:
    """ADPA (ADPA paper, Eq. 8–10): sft_weight·L_SFT(y_w) − γ · mean_t Σ_{a∈S_t} π_θ(a|s_t) A(s_t, a)
    on the student's rollout states (`*_r`), S_t = the DPO teacher's top-K; the advantage is
    against the reference *teacher* (`ref_teacher_*`). Default: the paper (signed advantages,
    reference-minimum rule). `code_compat=True`: the released code (DPO-minimum rule,
    advantages clamped to [1e-8, 1 − 1e-8])."""
    adv = adpa_advantages(teacher_ids_r, teacher_logp_r, ref_teacher_ids_r, ref_teacher_logp_r,
                          missing="dpo_min" if code_compat else "ref_min").detach()  # (B, T, K)
    if code_compat:
        adv = torch.where(present(teacher_logp_r), adv.clamp(EPS, 1 - EPS), 0.0)
    probs = gather_logp(logits_r, teacher_ids_r).exp()  # (B, T, K)
    adv_term = -token_mean((probs * adv.to(probs.dtype)).sum(-1), labels_r, norm, "r")
    sft = sft_nll(logits_w, labels_w, norm, "w")
    loss = sft_weight * sft + gamma * adv_term
    return loss, _metrics(sft=sft, advantage=adv_term)


def _tvkd_score(logits: Tensor, labels: Tensor, t_ids: Tensor, t_logp: Tensor, *,
                potential: str, gamma: float, alpha: float) -> Tensor:
    """S(y) = Σ_t [q_t − γ Φ(s_{t+1})], Φ after the last token = 0: (B,)."""
    q = student_bins(logits, t_ids, t_logp)  # (B, T, K+1)
    bins_in = F.pad(present(t_logp), (0, 1), value=True)  # (B, T, K+1): absent slots are no bins
    slot = (t_ids == labels.unsqueeze(-1)) & bins_in[..., :-1]  # (B, T, K)
    in_topk = slot.any(-1, keepdim=True)
    index = torch.where(in_topk, slot.float().argmax(-1, keepdim=True),
                        torch.full_like(in_topk, t_ids.shape[-1], dtype=torch.long))  # (B, T, 1)
    q_label = q.gather(-1, index).squeeze(-1).log()  # (B, T)
    valid = _valid(labels)
    with torch.no_grad():
        if potential == "teacher_value":
            p = teacher_bins(t_logp.to(q.dtype))
            phi = torch.logsumexp((alpha * p.log()).masked_fill(~bins_in, float("-inf")), dim=-1)  # (B, T) log Σ_b P^α
        elif potential == "student_entropy":
            phi = -(q * q.log() * bins_in).sum(-1)
        else:
            raise ValueError(f"tvkd potential {potential!r}; accepted: teacher_value, student_entropy")
        phi = phi * valid
        phi_next = torch.cat([phi[:, 1:], torch.zeros_like(phi[:, :1])], dim=1)  # (B, T)
    return ((q_label - gamma * phi_next) * valid).sum(-1)


def tvkd_loss(logits_w: Tensor, labels_w: Tensor, teacher_ids_w: Tensor, teacher_logp_w: Tensor,
              logits_l: Tensor, labels_l: Tensor, teacher_ids_l: Tensor, teacher_logp_l: Tensor,
              norm: Norm = None, *, gamma: NonNegative = 1.0,
              potential: Literal["teacher_value", "student_entropy"] = "teacher_value",
              alpha: Positive = 0.7) -> tuple[Tensor, dict]:
    """TVKD (arXiv 2509.16965, released configuration): Bradley–Terry over potential-shaped
    scores, −log σ(S(y_w) − S(y_l)). `potential`: `teacher_value` Φ = log Σ_b P_T^α (default,
    the paper's idea) or `student_entropy` (the released code). Potentials carry no gradient."""
    kw = dict(potential=potential, gamma=gamma, alpha=alpha)
    sw = _tvkd_score(logits_w, labels_w, teacher_ids_w, teacher_logp_w, **kw)
    sl = _tvkd_score(logits_l, labels_l, teacher_ids_l, teacher_logp_l, **kw)
    loss = pair_mean(-F.logsigmoid(sw - sl), norm)
    return loss, _metrics(tvkd=loss, reward_acc=pair_mean((sw > sl).to(sw.dtype), norm))


def dpkd_loss(logits_w: Tensor, labels_w: Tensor, teacher_label_logp_w: Tensor,
              logits_l: Tensor, labels_l: Tensor, teacher_label_logp_l: Tensor, norm: Norm = None, *,
              beta: Positive = 0.1, rho: Fraction = 0.5, length_normalize: bool = False,
              ) -> tuple[Tensor, dict]:
    """DPKD (arXiv 2406.19774), sequence form: (1−ρ) L_SFT + ρ · −log σ(β h),
    h = [logp_θ(y_w) − logp_T(y_w)] − [logp_θ(y_l) − logp_T(y_l)], logp_T = Σ_t label_logp."""
    tok_w = token_logps(logits_w, labels_w)  # (B, T), read once for the SFT and preference terms
    lw, nw = tok_w.sum(-1), _valid(labels_w).sum(-1)
    ll, nl = _seq(logits_l, labels_l)
    tw = (teacher_label_logp_w.detach().to(lw.dtype) * _valid(labels_w)).sum(-1)  # (B,)
    tl = (teacher_label_logp_l.detach().to(ll.dtype) * _valid(labels_l)).sum(-1)
    dw, dl = lw - tw, ll - tl
    if length_normalize:
        dw, dl = dw / nw.clamp(min=1), dl / nl.clamp(min=1)
    pref = pair_mean(-F.logsigmoid(beta * (dw - dl)), norm)
    sft = -token_mean(tok_w, labels_w, norm, "w")  # = sft_nll(logits_w, labels_w, norm)
    loss = (1 - rho) * sft + rho * pref
    return loss, _metrics(sft=sft, dpkd_pref=pref, reward_acc=pair_mean((dw > dl).to(dw.dtype), norm))


# ---------------------------------------------------------------------------- registry

RESPONSES = {"w": "chosen", "l": "rejected", "r": "rollout"}  # suffix → batch field
TEACHER_ROLES = {"teacher": "teacher", "ref_teacher": "reference"}  # argument prefix → cache role
STUDENT_TENSORS = ("logits", "labels")
POLICY_REF = "policy_ref_logp"


def _parse_input(name: str) -> tuple[str, str, str]:
    """`teacher_logp_w` → ('teacher', 'logp', 'w'); `logits_r` → ('student', 'logits', 'r')."""
    base, _, s = name.rpartition("_")
    if s not in RESPONSES:
        raise ValueError(f"loss input {name!r}: expected a _w, _l or _r suffix")
    if base in STUDENT_TENSORS:
        return "student", base, s
    if base == POLICY_REF:
        return "policy_ref", base, s
    for prefix in sorted(TEACHER_ROLES, key=len, reverse=True):  # ref_teacher_ before teacher_
        if base.startswith(prefix + "_"):
            return TEACHER_ROLES[prefix], base[len(prefix) + 1:], s
    raise ValueError(f"loss input {name!r}: not a student, teacher, ref_teacher or policy_ref tensor")


@dataclass(frozen=True)
class LossSpec:
    """A method's loss. Everything but `fn` and `doc` is read from `fn`'s signature."""
    name: str
    fn: Callable[..., tuple[Tensor, dict]]
    doc: str = ""

    @cached_property
    def _params(self) -> list[inspect.Parameter]:
        return list(inspect.signature(self.fn).parameters.values())

    @cached_property
    def inputs(self) -> tuple[str, ...]:
        """Tensor arguments, by name (everything before `norm`)."""
        return tuple(p.name for p in self._params if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "norm")

    @cached_property
    def responses(self) -> tuple[str, ...]:
        """Response suffixes the loss reads, in w, l, r order."""
        used = {_parse_input(n)[2] for n in self.inputs}
        return tuple(s for s in RESPONSES if s in used)

    @cached_property
    def teachers(self) -> dict[str, tuple[str, ...]]:
        """Cache roles per response suffix, e.g. {'r': ('teacher', 'reference')}."""
        out: dict[str, list[str]] = {}
        for n in self.inputs:
            role, _, s = _parse_input(n)
            if role in TEACHER_ROLES.values() and role not in out.setdefault(s, []):
                out[s].append(role)
        return {s: tuple(r) for s, r in out.items() if r}

    @property
    def cache(self) -> str | None:
        """The extraction it reads: 'pairs' (DPO teacher on y_w/y_l), 'rollouts' (teachers on ŷ)."""
        if not self.teachers:
            return None
        return "rollouts" if "r" in self.teachers else "pairs"

    @property
    def policy_ref(self) -> bool:
        """Needs summed log-probs of the trained model's reference (the SFT student)."""
        return any(_parse_input(n)[0] == "policy_ref" for n in self.inputs)

    @cached_property
    def options(self) -> dict[str, Any]:
        """Option defaults: the keyword-only arguments."""
        return {p.name: p.default for p in self._params if p.kind is p.KEYWORD_ONLY}

    @cached_property
    def options_model(self) -> type:
        """A pydantic model of the options (types and bounds from the annotations)."""
        from pydantic import ConfigDict, create_model

        module = vars(sys.modules[__name__])
        fields = {p.name: (eval(p.annotation, module) if isinstance(p.annotation, str) else p.annotation,
                           p.default)
                  for p in self._params if p.kind is p.KEYWORD_ONLY}
        return create_model(f"{self.name}_options", __config__=ConfigDict(extra="forbid", frozen=True),
                            **fields)

    def check(self) -> None:
        """Refuse a signature the pipeline cannot feed (run at import: a new loss fails fast)."""
        for n in self.inputs:
            _parse_input(n)
        if "r" in self.teachers and set(self.teachers) != {"r"}:
            raise ValueError(f"loss {self.name}: teacher tensors on rollouts and on y_w/y_l at once")
        if self.cache == "rollouts" and set(self.teachers["r"]) != set(TEACHER_ROLES.values()):
            raise ValueError(f"loss {self.name}: the rollouts extraction holds both teachers")
        self.options_model  # noqa: B018 - annotations must resolve


def _register(*specs: tuple[Callable, str]) -> dict[str, LossSpec]:
    out = {}
    for fn, doc in specs:
        spec = LossSpec(fn.__name__.removesuffix("_loss"), fn, doc)
        spec.check()
        out[spec.name] = spec
    return out


LOSSES: dict[str, LossSpec] = _register(
    (sft_loss, "NLL on y_w"),
    (dpo_loss, "DPO vs the SFT student"),
    (simpo_loss, "reference-free, length-normalised"),
    (wpo_loss, "DPO weighted by on-policy probability"),
    (vanilla_kd_loss, "SFT + forward KL on y_w"),
    (dckd_loss, "SFT + α(KL_w + KL_l)"),
    (adpa_loss, "SFT − γ·E_θ[A] on rollouts"),
    (tvkd_loss, "Bradley–Terry on value-shaped scores"),
    (dpkd_loss, "teacher as DPO reference"),
)
TWO_PHASE = {"adpa+": ("dckd", "adpa")}  # Algorithm 2 of the ADPA paper: (first phase, second phase)
METHODS = tuple(LOSSES) + tuple(TWO_PHASE)


def method_loss(method: str) -> str:
    """The loss of a method's final `train` node."""
    return TWO_PHASE[method][1] if method in TWO_PHASE else method


def methods_table() -> str:
    """The README's methods table, generated from LOSSES (tests keep the README in sync)."""
    rows = ["| method | trains on | teacher signal (cache) | needs SFT-student reference | options (defaults) | what |",
            "|---|---|---|---|---|---|"]
    signal = {None: "—", "pairs": "DPO teacher on y_w/y_l", "rollouts": "DPO + reference teacher on rollouts"}
    names = {"w": "y_w", "l": "y_l", "r": "rollouts"}
    for name, spec in LOSSES.items():
        opts = ", ".join(f"`{k}={v}`" for k, v in spec.options.items()) or "—"
        data = ", ".join(names[s] for s in spec.responses)
        rows.append(f"| `{name}` | {data} | {signal[spec.cache]} | {'yes' if spec.policy_ref else 'no'} | {opts} | {spec.doc} |")
    rows.append("| `adpa+` | y_w, y_l, then y_w + rollouts | DCKD phase, then ADPA on the DCKD student's rollouts | no | "
                "`train.loss` (ADPA), `train.dckd_loss` (DCKD) | Algorithm 2 of the ADPA paper |")
    return "\n".join(rows)
