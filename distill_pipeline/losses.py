"""Training objectives as pure tensor functions (docs/METHODS.md is the specification).

Conventions: every tensor is *aligned* — `logits[:, t]` predicts `labels[:, t]` (callers do the
causal shift); `labels == -100` marks positions that do not count. Teacher tensors come from the
teacher-logit cache at the same positions: `t_ids`/`t_logp` (B, T, K) top-K ids and log-probs,
`t_label_logp` (B, T). Log-softmax is computed in float32 (float64 stays float64). Teacher tensors
never receive gradient. Each function returns `(loss, metrics)`: a scalar tensor and a dict of
floats for logging.

`LOSSES` maps a method's loss name to its function, its inputs and its default options — the one
source for config validation, error messages and the README table.

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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

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

IGNORE = -100
EPS = 1e-8


# ---------------------------------------------------------------------------- helpers

def _logsoftmax(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)


def _valid(labels: Tensor) -> Tensor:
    return labels != IGNORE  # (B, T)


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log π(label_t | s_t), zero at ignored positions: (B, T)."""
    logp = _logsoftmax(logits).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return logp * _valid(labels)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over mask positions across the whole batch (token mean)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def tail_mass(t_logp: Tensor) -> Tensor:
    """1 − Σ exp(top-K log-probs), computed stably: (…)."""
    return (-torch.expm1(torch.logsumexp(t_logp, dim=-1))).clamp(min=0)


def teacher_bins(t_logp: Tensor) -> Tensor:
    """Teacher K+1 bins (top-K probabilities + tail), clamped: (B, T, K+1). No gradient."""
    t_logp = t_logp.detach()
    p = torch.cat([t_logp.exp(), tail_mass(t_logp).unsqueeze(-1)], dim=-1)  # (B, T, K+1)
    return p.clamp(EPS, 1 - EPS)


def student_bins(logits: Tensor, t_ids: Tensor) -> Tensor:
    """Student K+1 bins: full softmax gathered at the teacher ids + the rest, clamped: (B, T, K+1).
    Gathers K log-probs before exponentiating (no full-vocabulary exp)."""
    return _bins_from_topk(_logsoftmax(logits).gather(-1, t_ids.long()))  # (B, T, K+1)


def binned_kl(logits: Tensor, labels: Tensor, t_ids: Tensor, t_logp: Tensor) -> Tensor:
    """Token-mean forward KL(teacher ‖ student) on K+1 bins (METHODS §1). Scalar."""
    q = student_bins(logits, t_ids)
    return _kl(q, t_logp, labels)


def _kl(q: Tensor, t_logp: Tensor, labels: Tensor) -> Tensor:
    """Token-mean KL(teacher bins ‖ q) for student bins q (B, T, K+1)."""
    p = teacher_bins(t_logp.to(q.dtype))
    kl = (p * (p.log() - q.log())).sum(-1)  # (B, T)
    return masked_mean(kl, _valid(labels))


def _bins_from_topk(q_logp: Tensor) -> Tensor:
    """Student K+1 bins from its log-probs at the teacher's top-K ids (B, T, K), clamped."""
    q = q_logp.exp()
    rest = (1 - q.sum(-1, keepdim=True)).clamp(min=0)
    return torch.cat([q, rest], dim=-1).clamp(EPS, 1 - EPS)


def sft_and_kl(logits: Tensor, labels: Tensor, t_ids: Tensor, t_logp: Tensor) -> tuple[Tensor, Tensor]:
    """(token-mean NLL, token-mean K+1-bin KL) on one response with a single gather over the
    vocabulary: label and top-K ids together, so the backward pass scatters into the
    (B, T, V) gradient once — a cached KD step then costs about what an SFT step costs."""
    lp = _logsoftmax(logits)  # (B, T, V)
    index = torch.cat([labels.clamp(min=0).unsqueeze(-1), t_ids.long()], dim=-1)  # (B, T, 1+K)
    picked = lp.gather(-1, index)  # (B, T, 1+K)
    valid = _valid(labels)
    nll = -masked_mean(picked[..., 0] * valid, valid)
    return nll, _kl(_bins_from_topk(picked[..., 1:]), t_logp, labels)


def sft_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Token-mean negative log-likelihood over valid positions. Scalar."""
    return -masked_mean(token_logps(logits, labels), _valid(labels))


def _seq(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-prob and length per sequence: (B,), (B,)."""
    return token_logps(logits, labels).sum(-1), _valid(labels).sum(-1)


# ---------------------------------------------------------------------------- objectives

def sft_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, dict]:
    """SFT: L = −mean_t log π_θ(y_t | s_t) (METHODS §2)."""
    loss = sft_nll(logits, labels)
    return loss, {"sft": loss.item()}


def dpo_loss(logits_w: Tensor, labels_w: Tensor, logits_l: Tensor, labels_l: Tensor,
             ref_logp_w: Tensor, ref_logp_l: Tensor, *, beta: float = 0.1) -> tuple[Tensor, dict]:
    """DPO (Rafailov et al. 2023, Eq. 7): −log σ(β [(logp_w − ref_w) − (logp_l − ref_l)]).
    `ref_logp_*` (B,) are summed reference log-probs (no gradient)."""
    lw, _ = _seq(logits_w, labels_w)
    ll, _ = _seq(logits_l, labels_l)
    margin = (lw - ref_logp_w.detach()) - (ll - ref_logp_l.detach())  # (B,)
    loss = -F.logsigmoid(beta * margin).mean()
    return loss, {"dpo": loss.item(), "reward_margin": (beta * margin).mean().item(),
                  "reward_acc": (margin > 0).float().mean().item()}


def simpo_loss(logits_w: Tensor, labels_w: Tensor, logits_l: Tensor, labels_l: Tensor, *,
               beta: float = 2.0, gamma: float = 1.0) -> tuple[Tensor, dict]:
    """SimPO (Meng et al. 2024, Eq. 6): −log σ(β (avg_w − avg_l) − γ), avg = logp / |y|."""
    lw, nw = _seq(logits_w, labels_w)
    ll, nl = _seq(logits_l, labels_l)
    margin = beta * (lw / nw.clamp(min=1) - ll / nl.clamp(min=1)) - gamma  # (B,)
    loss = -F.logsigmoid(margin).mean()
    return loss, {"simpo": loss.item(), "reward_acc": (margin + gamma > 0).float().mean().item()}


def _wpo_weight(logits: Tensor, labels: Tensor) -> Tensor:
    """w(y) = exp(mean_t [log π(y_t) − log Σ_v π(v)²]), no gradient: (B,)."""
    with torch.no_grad():
        lp = _logsoftmax(logits)  # (B, T, V)
        norm = torch.logsumexp(2 * lp, dim=-1)  # (B, T)
        tok = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
        valid = _valid(labels)
        return torch.exp(((tok - norm) * valid).sum(-1) / valid.sum(-1).clamp(min=1))


def wpo_loss(logits_w: Tensor, labels_w: Tensor, logits_l: Tensor, labels_l: Tensor,
             ref_logp_w: Tensor, ref_logp_l: Tensor, *, beta: float = 0.1) -> tuple[Tensor, dict]:
    """WPO (Zhou et al. 2024): per-pair DPO loss weighted by w(y_w)·w(y_l) (no gradient through w)."""
    lw, _ = _seq(logits_w, labels_w)
    ll, _ = _seq(logits_l, labels_l)
    margin = (lw - ref_logp_w.detach()) - (ll - ref_logp_l.detach())  # (B,)
    weight = _wpo_weight(logits_w, labels_w) * _wpo_weight(logits_l, labels_l)  # (B,)
    loss = (weight * -F.logsigmoid(beta * margin)).mean()
    return loss, {"wpo": loss.item(), "wpo_weight": weight.mean().item(),
                  "reward_acc": (margin > 0).float().mean().item()}


def vanilla_kd_loss(logits_w: Tensor, labels_w: Tensor, t_ids_w: Tensor, t_logp_w: Tensor, *,
                    alpha: float = 0.1) -> tuple[Tensor, dict]:
    """VanillaKD: L_SFT(y_w) + α · KL(teacher bins ‖ student bins) on y_w (METHODS §2)."""
    sft, kl = sft_and_kl(logits_w, labels_w, t_ids_w, t_logp_w)
    return sft + alpha * kl, {"sft": sft.item(), "kl_w": kl.item()}


def dckd_loss(logits_w: Tensor, labels_w: Tensor, t_ids_w: Tensor, t_logp_w: Tensor,
              logits_l: Tensor, labels_l: Tensor, t_ids_l: Tensor, t_logp_l: Tensor, *,
              alpha: float = 0.1) -> tuple[Tensor, dict]:
    """DCKD (ADPA paper, Eq. 5–7): L_SFT(y_w) + α (KL_w + KL_l), token-mean K+1-bin forward KL
    against the DPO teacher on the dataset's y_w and y_l."""
    sft, kl_w = sft_and_kl(logits_w, labels_w, t_ids_w, t_logp_w)
    kl_l = binned_kl(logits_l, labels_l, t_ids_l, t_logp_l)
    loss = sft + alpha * (kl_w + kl_l)
    return loss, {"sft": sft.item(), "kl_w": kl_w.item(), "kl_l": kl_l.item()}


def adpa_advantages(t_ids: Tensor, t_logp: Tensor, r_ids: Tensor, r_logp: Tensor, *,
                    missing: str = "ref_min") -> Tensor:
    """A(s_t, a) = log π_dpo(a|s_t) − log π_ref(a|s_t) for a in the DPO top-K: (B, T, K).
    A DPO top-K id absent from the reference top-K takes the reference's lowest top-K
    log-prob (`ref_min`, the paper) or the DPO teacher's lowest (`dpo_min`, the released code)."""
    match = t_ids.unsqueeze(-1) == r_ids.unsqueeze(-2)  # (B, T, K, K_ref)
    found = match.any(-1)  # (B, T, K)
    ref_at = (match * r_logp.unsqueeze(-2)).sum(-1)  # (B, T, K)
    if missing == "ref_min":
        fill = r_logp.min(-1, keepdim=True).values.expand_as(ref_at)
    elif missing == "dpo_min":
        fill = t_logp.min(-1, keepdim=True).values.expand_as(ref_at)
    else:
        raise ValueError(f"adpa missing-token rule {missing!r}; accepted: ref_min, dpo_min")
    return t_logp - torch.where(found, ref_at, fill)


def adpa_loss(logits_w: Tensor, labels_w: Tensor, logits_r: Tensor, labels_r: Tensor,
              t_ids_r: Tensor, t_logp_r: Tensor, ref_ids_r: Tensor, ref_logp_r: Tensor, *,
              gamma: float = 1.6, sft_weight: float = 1.0,
              code_compat: bool = False) -> tuple[Tensor, dict]:
    """ADPA (ADPA paper, Eq. 8–10): sft_weight·L_SFT(y_w) − γ · mean_t Σ_{a∈S_t} π_θ(a|s_t) A(s_t, a)
    on the student's rollout states (`*_r`), S_t = the DPO teacher's top-K.
    Default: the paper (signed advantages, reference-minimum rule). `code_compat=True`: the
    released code (DPO-minimum rule, advantages clamped to [1e-8, 1 − 1e-8])."""
    adv = adpa_advantages(t_ids_r, t_logp_r, ref_ids_r, ref_logp_r,
                          missing="dpo_min" if code_compat else "ref_min").detach()  # (B, T, K)
    if code_compat:
        adv = adv.clamp(EPS, 1 - EPS)
    probs = _logsoftmax(logits_r).gather(-1, t_ids_r.long()).exp()  # (B, T, K)
    adv_term = -masked_mean((probs * adv.to(probs.dtype)).sum(-1), _valid(labels_r))
    sft = sft_nll(logits_w, labels_w)
    loss = sft_weight * sft + gamma * adv_term
    return loss, {"sft": sft.item(), "advantage": adv_term.item()}


def _tvkd_score(logits: Tensor, labels: Tensor, t_ids: Tensor, t_logp: Tensor, *,
                potential: str, gamma: float, alpha: float) -> Tensor:
    """S(y) = Σ_t [q_t − γ Φ(s_{t+1})], Φ after the last token = 0: (B,)."""
    q = student_bins(logits, t_ids)  # (B, T, K+1)
    slot = (t_ids == labels.unsqueeze(-1))  # (B, T, K)
    in_topk = slot.any(-1, keepdim=True)
    index = torch.where(in_topk, slot.float().argmax(-1, keepdim=True),
                        torch.full_like(in_topk, t_ids.shape[-1], dtype=torch.long))  # (B, T, 1)
    q_label = q.gather(-1, index).squeeze(-1).log()  # (B, T)
    valid = _valid(labels)
    with torch.no_grad():
        if potential == "teacher_value":
            p = teacher_bins(t_logp.to(q.dtype))
            phi = torch.logsumexp(alpha * p.log(), dim=-1)  # (B, T) log Σ_b P^α
        elif potential == "student_entropy":
            phi = -(q * q.log()).sum(-1)
        else:
            raise ValueError(f"tvkd potential {potential!r}; accepted: teacher_value, student_entropy")
        phi = phi * valid
        phi_next = torch.cat([phi[:, 1:], torch.zeros_like(phi[:, :1])], dim=1)  # (B, T)
    return ((q_label - gamma * phi_next) * valid).sum(-1)


def tvkd_loss(logits_w: Tensor, labels_w: Tensor, t_ids_w: Tensor, t_logp_w: Tensor,
              logits_l: Tensor, labels_l: Tensor, t_ids_l: Tensor, t_logp_l: Tensor, *,
              gamma: float = 1.0, potential: str = "teacher_value", alpha: float = 0.7,
              ) -> tuple[Tensor, dict]:
    """TVKD (arXiv 2509.16965, released configuration): Bradley–Terry over potential-shaped
    scores, −log σ(S(y_w) − S(y_l)). `potential`: `teacher_value` Φ = log Σ_b P_T^α (default,
    the paper's idea) or `student_entropy` (the released code). Potentials carry no gradient."""
    kw = dict(potential=potential, gamma=gamma, alpha=alpha)
    sw = _tvkd_score(logits_w, labels_w, t_ids_w, t_logp_w, **kw)
    sl = _tvkd_score(logits_l, labels_l, t_ids_l, t_logp_l, **kw)
    loss = -F.logsigmoid(sw - sl).mean()
    return loss, {"tvkd": loss.item(), "reward_acc": (sw > sl).float().mean().item()}


def dpkd_loss(logits_w: Tensor, labels_w: Tensor, t_label_logp_w: Tensor,
              logits_l: Tensor, labels_l: Tensor, t_label_logp_l: Tensor, *,
              beta: float = 0.1, rho: float = 0.5, length_normalize: bool = False,
              ) -> tuple[Tensor, dict]:
    """DPKD (arXiv 2406.19774), sequence form: (1−ρ) L_SFT + ρ · −log σ(β h),
    h = [logp_θ(y_w) − logp_T(y_w)] − [logp_θ(y_l) − logp_T(y_l)], logp_T = Σ_t label_logp."""
    lw, nw = _seq(logits_w, labels_w)
    ll, nl = _seq(logits_l, labels_l)
    tw = (t_label_logp_w.detach().to(lw.dtype) * _valid(labels_w)).sum(-1)  # (B,)
    tl = (t_label_logp_l.detach().to(ll.dtype) * _valid(labels_l)).sum(-1)
    dw, dl = lw - tw, ll - tl
    if length_normalize:
        dw, dl = dw / nw.clamp(min=1), dl / nl.clamp(min=1)
    pref = -F.logsigmoid(beta * (dw - dl)).mean()
    sft = sft_nll(logits_w, labels_w)
    loss = (1 - rho) * sft + rho * pref
    return loss, {"sft": sft.item(), "dpkd_pref": pref.item(),
                  "reward_acc": (dw > dl).float().mean().item()}


# ---------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class LossSpec:
    """What a method's loss needs. `data`: 'sft' (y_w only), 'pairs' or 'rollouts' (y_w + the
    student's rollouts); `teacher`: the cache
    extraction it reads ('pairs' = DPO teacher on y_w/y_l, 'rollouts' = both teachers on rollouts);
    `reference`: needs the student's SFT model log-probs (DPO-style)."""
    fn: Callable[..., tuple[Tensor, dict]]
    data: str
    teacher: str | None = None
    reference: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    doc: str = ""


OPTION_CHOICES = {"potential": ("teacher_value", "student_entropy")}

LOSSES: dict[str, LossSpec] = {
    "sft": LossSpec(sft_loss, "sft", doc="NLL on y_w"),
    "dpo": LossSpec(dpo_loss, "pairs", reference=True, options={"beta": 0.1}, doc="DPO vs the SFT student"),
    "simpo": LossSpec(simpo_loss, "pairs", options={"beta": 2.0, "gamma": 1.0}, doc="reference-free, length-normalised"),
    "wpo": LossSpec(wpo_loss, "pairs", reference=True, options={"beta": 0.1}, doc="DPO weighted by on-policy probability"),
    "vanilla_kd": LossSpec(vanilla_kd_loss, "sft", teacher="pairs", options={"alpha": 0.1}, doc="SFT + forward KL on y_w"),
    "dckd": LossSpec(dckd_loss, "pairs", teacher="pairs", options={"alpha": 0.1}, doc="SFT + α(KL_w + KL_l)"),
    "adpa": LossSpec(adpa_loss, "rollouts", teacher="rollouts",
                     options={"gamma": 1.6, "sft_weight": 1.0, "code_compat": False},
                     doc="SFT − γ·E_θ[A] on rollouts"),
    "tvkd": LossSpec(tvkd_loss, "pairs", teacher="pairs",
                     options={"gamma": 1.0, "potential": "teacher_value", "alpha": 0.7},
                     doc="Bradley–Terry on value-shaped scores"),
    "dpkd": LossSpec(dpkd_loss, "pairs", teacher="pairs",
                     options={"beta": 0.1, "rho": 0.5, "length_normalize": False},
                     doc="teacher as DPO reference"),
}


def methods_table() -> str:
    """The README's methods table, generated from LOSSES (tests keep the README in sync)."""
    rows = ["| method | trains on | teacher signal (cache) | needs SFT-student reference | options (defaults) | what |",
            "|---|---|---|---|---|---|"]
    signal = {None: "—", "pairs": "DPO teacher on y_w/y_l", "rollouts": "DPO + reference teacher on rollouts"}
    for name, spec in LOSSES.items():
        opts = ", ".join(f"`{k}={v}`" for k, v in spec.options.items()) or "—"
        data = {"sft": "y_w", "pairs": "y_w, y_l", "rollouts": "y_w + rollouts"}[spec.data]
        rows.append(f"| `{name}` | {data} | {signal[spec.teacher]} | {'yes' if spec.reference else 'no'} | {opts} | {spec.doc} |")
    rows.append("| `adpa+` | y_w, y_l, then y_w + rollouts | DCKD phase, then ADPA on the DCKD student's rollouts | no | "
                "`train.loss` (ADPA), `train.dckd_loss` (DCKD) | Algorithm 2 of the ADPA paper |")
    return "\n".join(rows)
