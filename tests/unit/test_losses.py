"""Every number of docs/METHODS.md §4 to 1e-6, plus invariants of each loss."""
from __future__ import annotations

import pytest
import torch

from distill_pipeline import losses as L
from tests.loss_inputs import random_inputs

D = torch.float64
LW = torch.tensor([[[1.0, 0.5, 0.0, -0.5, -1.0], [0.2, 0.1, 1.5, -0.3, 0.4]]], dtype=D)
YW = torch.tensor([[0, 2]])
TW_IDS = torch.tensor([[[0, 1, 2], [2, 4, 1]]])
TW_LP = torch.tensor([[[.5, .2, .15], [.6, .2, .1]]], dtype=D).log()
LL = torch.tensor([[[0.3, 0.8, -0.2, 0.1, -1.0], [-0.5, 0.0, 0.2, 1.2, 0.3]]], dtype=D)
YL = torch.tensor([[1, 0]])
TL_IDS = torch.tensor([[[1, 0, 3], [4, 3, 2]]])
TL_LP = torch.tensor([[[.4, .3, .15], [.4, .3, .15]]], dtype=D).log()
# ADPA rollout ŷ = [1, 2]
LR = torch.tensor([[[0.5, 1.0, 0.2, 0.0, -0.5], [0.0, 0.3, 0.9, -0.2, 0.1]]], dtype=D)
YR = torch.tensor([[1, 2]])
P_DPO = torch.tensor([[.40, .25, .20, .10, .05], [.10, .15, .50, .20, .05]], dtype=D)
P_REF = torch.tensor([[.30, .35, .05, .25, .05], [.05, .30, .35, .22, .08]], dtype=D)


def top3(p):
    v, i = p.topk(3, dim=-1)
    return i.unsqueeze(0), v.log().unsqueeze(0)


D_IDS, D_LP = top3(P_DPO)
R_IDS, R_LP = top3(P_REF)
close = dict(abs=1e-6)


def test_kl_and_sft_numbers():
    assert L.binned_kl(LW, YW, TW_IDS, TW_LP).item() == pytest.approx(0.034422, **close)
    assert L.binned_kl(LL, YL, TL_IDS, TL_LP).item() == pytest.approx(0.079267, **close)
    assert L.sft_loss(LW, YW)[0].item() == pytest.approx(0.774430, **close)


def test_dckd_number():
    loss, m = L.dckd_loss(LW, YW, TW_IDS, TW_LP, LL, YL, TL_IDS, TL_LP, alpha=0.1)
    assert loss.item() == pytest.approx(0.785799, **close)
    assert m["kl_w"] == pytest.approx(0.034422, **close)


def test_vanilla_kd_is_sft_plus_alpha_kl_w():
    loss, _ = L.vanilla_kd_loss(LW, YW, TW_IDS, TW_LP, alpha=0.1)
    assert loss.item() == pytest.approx(0.774430 + 0.1 * 0.034422, **close)


def test_dpo_number():
    loss, _ = L.dpo_loss(LW, YW, LL, YL, torch.tensor([-2.0], dtype=D), torch.tensor([-2.5], dtype=D), beta=0.1)
    assert loss.item() == pytest.approx(0.623963, **close)


def test_simpo_number():
    assert L.simpo_loss(LW, YW, LL, YL, beta=2.0, gamma=1.0)[0].item() == pytest.approx(0.331124, **close)


@pytest.mark.parametrize("potential, value", [("student_entropy", 0.307263), ("teacher_value", 0.311805)])
def test_tvkd_numbers(potential, value):
    loss, _ = L.tvkd_loss(LW, YW, TW_IDS, TW_LP, LL, YL, TL_IDS, TL_LP, gamma=1.0,
                          potential=potential, alpha=0.7)
    assert loss.item() == pytest.approx(value, **close)


def test_adpa_numbers():
    # position 1: token 2 is in the DPO top-3 but not the reference top-3
    assert 2 in D_IDS[0, 0].tolist() and 2 not in R_IDS[0, 0].tolist()
    _, m = L.adpa_loss(LW, YW, LR, YR, D_IDS, D_LP, R_IDS, R_LP, gamma=1.0)
    assert m["advantage"] == pytest.approx(0.059669, **close)
    adv = L.adpa_advantages(D_IDS, D_LP, R_IDS, R_LP, missing="dpo_min")
    probs = torch.softmax(LR, -1).gather(-1, D_IDS)
    assert (-(probs * adv).sum(-1).mean()).item() == pytest.approx(0.040728, **close)
    loss, m = L.adpa_loss(LW, YW, LR, YR, D_IDS, D_LP, R_IDS, R_LP, gamma=1.6, code_compat=True)
    assert m["advantage"] == pytest.approx(-0.098105, **close)
    assert loss.item() == pytest.approx(0.617462, **close)


def test_wpo_weight_and_reduction_to_dpo():
    ref_w, ref_l = torch.tensor([-2.0], dtype=D), torch.tensor([-2.5], dtype=D)
    loss, m = L.wpo_loss(LW, YW, LL, YL, ref_w, ref_l, beta=0.1)
    w = L._wpo_weight(LW, YW) * L._wpo_weight(LL, YL)
    assert loss.item() == pytest.approx(w.item() * 0.623963, **close)
    # hand check of w(y_w): exp(mean_t [log p(y_t) − log Σ p²])
    lp = torch.log_softmax(LW[0], -1)
    manual = torch.exp(torch.stack([lp[t, YW[0, t]] - torch.logsumexp(2 * lp[t], -1) for t in range(2)]).mean())
    assert L._wpo_weight(LW, YW).item() == pytest.approx(manual.item(), **close)


def test_more_worked_numbers():
    """docs/METHODS.md §4, the rows the original table does not give."""
    ref_w, ref_l = torch.tensor([-2.0], dtype=D), torch.tensor([-2.5], dtype=D)
    assert L.wpo_loss(LW, YW, LL, YL, ref_w, ref_l, beta=0.1)[0].item() == pytest.approx(0.627222, **close)
    assert L.vanilla_kd_loss(LW, YW, TW_IDS, TW_LP, alpha=0.1)[0].item() == pytest.approx(0.777873, **close)
    tw, tl = torch.tensor([[-0.5, -0.7]], dtype=D), torch.tensor([[-1.2, -0.4]], dtype=D)
    assert L.dpkd_loss(LW, YW, tw, LL, YL, tl)[0].item() == pytest.approx(0.696882, **close)
    assert L.dpkd_loss(LW, YW, tw, LL, YL, tl, length_normalize=True)[0].item() == pytest.approx(0.714968, **close)
    assert L.adpa_loss(LW, YW, LR, YR, D_IDS, D_LP, R_IDS, R_LP)[0].item() == pytest.approx(0.869900, **close)


def test_dpkd_against_hand_computation():
    tw = torch.tensor([[-0.5, -0.7]], dtype=D)
    tl = torch.tensor([[-1.2, -0.4]], dtype=D)
    lw = L.token_logps(LW, YW).sum()
    ll = L.token_logps(LL, YL).sum()
    h = (lw - tw.sum()) - (ll - tl.sum())
    expected = 0.5 * 0.774430 + 0.5 * -torch.nn.functional.logsigmoid(0.1 * h).item()
    loss, _ = L.dpkd_loss(LW, YW, tw, LL, YL, tl, beta=0.1, rho=0.5)
    assert loss.item() == pytest.approx(expected, **close)


# ---------------------------------------------------------------- properties

def _padded(x, pad_value):
    """Append one ignored position (label -100) with arbitrary contents."""
    extra = torch.full_like(x[:, :1], pad_value)
    return torch.cat([x, extra], dim=1)


def test_masked_positions_do_not_count():
    lw2 = torch.cat([LW, torch.randn(1, 1, 5, dtype=D) * 5], dim=1)
    yw2 = torch.cat([YW, torch.tensor([[-100]])], dim=1)
    ids2 = torch.cat([TW_IDS, torch.tensor([[[3, 4, 0]]])], dim=1)
    lp2 = torch.cat([TW_LP, torch.tensor([[[.9, .05, .01]]], dtype=D).log()], dim=1)
    ll2 = torch.cat([LL, torch.randn(1, 1, 5, dtype=D)], dim=1)
    yl2 = torch.cat([YL, torch.tensor([[-100]])], dim=1)
    idl2 = torch.cat([TL_IDS, torch.tensor([[[0, 1, 2]]])], dim=1)
    lpl2 = torch.cat([TL_LP, torch.tensor([[[.3, .3, .3]]], dtype=D).log()], dim=1)
    assert L.dckd_loss(lw2, yw2, ids2, lp2, ll2, yl2, idl2, lpl2, alpha=0.1)[0].item() == pytest.approx(0.785799, **close)
    for pot, v in [("student_entropy", 0.307263), ("teacher_value", 0.311805)]:
        assert L.tvkd_loss(lw2, yw2, ids2, lp2, ll2, yl2, idl2, lpl2, potential=pot)[0].item() == pytest.approx(v, **close)
    assert L.simpo_loss(lw2, yw2, ll2, yl2, beta=2.0, gamma=1.0)[0].item() == pytest.approx(0.331124, **close)


def test_kl_zero_at_optimum():
    # student logits whose softmax equals the teacher top-K, tail spread over the rest
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=D)
    logits = probs.log().view(1, 1, 5)
    ids = torch.tensor([[[0, 1, 2]]])
    lp = probs[:3].log().view(1, 1, 3)
    assert L.binned_kl(logits, torch.tensor([[0]]), ids, lp).item() == pytest.approx(0.0, abs=1e-12)


def test_adpa_advantage_zero_when_teachers_agree():
    _, m = L.adpa_loss(LW, YW, LR, YR, D_IDS, D_LP, D_IDS, D_LP, gamma=1.0)
    assert m["advantage"] == pytest.approx(0.0, abs=1e-12)


def test_dpo_at_reference_is_log2():
    lw, _ = L._seq(LW, YW)
    ll, _ = L._seq(LL, YL)
    loss, _ = L.dpo_loss(LW, YW, LL, YL, lw.detach(), ll.detach(), beta=0.1)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), **close)


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_gradient_flows_to_student_only(name):
    lw, ll, lr = (x.clone().requires_grad_(True) for x in (LW, LL, LR))
    teacher = [TW_LP.clone().requires_grad_(True), TL_LP.clone().requires_grad_(True),
               D_LP.clone().requires_grad_(True), R_LP.clone().requires_grad_(True)]
    ref = [torch.tensor([-2.0], dtype=D, requires_grad=True), torch.tensor([-2.5], dtype=D, requires_grad=True)]
    label = [torch.tensor([[-0.5, -0.7]], dtype=D, requires_grad=True), torch.tensor([[-1.2, -0.4]], dtype=D, requires_grad=True)]
    args = {
        "sft": (lw, YW), "dpo": (lw, YW, ll, YL, *ref), "simpo": (lw, YW, ll, YL),
        "wpo": (lw, YW, ll, YL, *ref), "vanilla_kd": (lw, YW, TW_IDS, teacher[0]),
        "dckd": (lw, YW, TW_IDS, teacher[0], ll, YL, TL_IDS, teacher[1]),
        "adpa": (lw, YW, lr, YR, D_IDS, teacher[2], R_IDS, teacher[3]),
        "tvkd": (lw, YW, TW_IDS, teacher[0], ll, YL, TL_IDS, teacher[1]),
        "dpkd": (lw, YW, label[0], ll, YL, label[1]),
    }[name]
    loss, metrics = L.LOSSES[name].fn(*args)
    loss.backward()
    assert lw.grad is not None and lw.grad.abs().sum() > 0
    for t in teacher + ref + label:
        assert t.grad is None or t.grad.abs().sum() == 0
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in metrics.values())


def test_float32_inputs_and_bad_options():
    loss, _ = L.dckd_loss(LW.float(), YW, TW_IDS, TW_LP.half(), LL.float(), YL, TL_IDS, TL_LP.half())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="accepted: teacher_value, student_entropy"):
        L.tvkd_loss(LW, YW, TW_IDS, TW_LP, LL, YL, TL_IDS, TL_LP, potential="nope")


# METHODS.md's defaults, by value (the options and their defaults are read from the signatures)
DEFAULTS = {
    "sft": {}, "dpo": {"beta": 0.1}, "simpo": {"beta": 2.0, "gamma": 1.0}, "wpo": {"beta": 0.1},
    "vanilla_kd": {"alpha": 0.1}, "dckd": {"alpha": 0.1},
    "adpa": {"gamma": 1.6, "sft_weight": 1.0, "code_compat": False},
    "tvkd": {"gamma": 1.0, "potential": "teacher_value", "alpha": 0.7},
    "dpkd": {"beta": 0.1, "rho": 0.5, "length_normalize": False},
}


def test_option_defaults_by_value():
    assert {name: spec.options for name, spec in L.LOSSES.items()} == DEFAULTS


def test_what_each_loss_reads_follows_from_its_signature():
    got = {n: (s.responses, s.cache, s.policy_ref) for n, s in L.LOSSES.items()}
    assert got == {
        "sft": (("w",), None, False), "dpo": (("w", "l"), None, True), "simpo": (("w", "l"), None, False),
        "wpo": (("w", "l"), None, True), "vanilla_kd": (("w",), "pairs", False),
        "dckd": (("w", "l"), "pairs", False), "adpa": (("w", "r"), "rollouts", False),
        "tvkd": (("w", "l"), "pairs", False), "dpkd": (("w", "l"), "pairs", False)}
    assert L.LOSSES["adpa"].teachers == {"r": ("teacher", "reference")}


def test_a_loss_with_an_unknown_input_is_refused_at_registration():
    def bogus_loss(logits_w, labels_w, student_thoughts_w, norm=None):
        raise AssertionError("never called")
    with pytest.raises(ValueError, match="student_thoughts_w"):
        L._register((bogus_loss, ""))


def _counts(inputs, idx):
    c = {"pairs": len(idx)}
    for k, v in inputs.items():
        if k.startswith("labels_"):
            c[f"tokens_{k[-1]}"] = int((v[idx] != -100).sum())
    return c


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_micro_batches_with_step_counts_sum_to_the_batch_loss(name):
    """The training loop's normalisation: contributions of micro-batches, each normalised by the
    whole step's counts, add up to the full batch's loss, metrics and gradient exactly."""
    spec = L.LOSSES[name]
    full = random_inputs(name)
    loss, metrics = spec.fn(*full.values())
    loss.backward()
    grads = {k: v.grad.clone() for k, v in full.items() if v.requires_grad}
    norm = _counts(full, [0, 1, 2])
    parts = random_inputs(name)  # same values, fresh leaves
    total, mtotal = 0.0, {}
    for idx in ([0], [1, 2]):
        sub = [v[idx] for v in parts.values()]
        part, m = spec.fn(*sub, norm)
        part.backward()
        total += part.item()
        mtotal = {k: mtotal.get(k, 0.0) + v.item() for k, v in m.items()}
    assert total == pytest.approx(loss.item(), abs=1e-12)
    assert mtotal == pytest.approx({k: v.item() for k, v in metrics.items()}, abs=1e-12)
    for k, g in grads.items():
        assert torch.allclose(parts[k].grad, g, atol=1e-12), k
