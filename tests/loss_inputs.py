"""Random, shape-correct inputs for any registered loss, built from its signature (shared by the
loss unit tests and the method end-to-end tests)."""
from __future__ import annotations

import torch

from distill_pipeline import losses as L

D = torch.float64


def random_inputs(name, B=3, T=5, V=7, K=3, seed=0):
    """A batch of B examples with different numbers of valid tokens per row and response."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in L.LOSSES[name].inputs:
        role, base, s = L._parse_input(p)
        if base == "logits":
            out[p] = torch.randn(B, T, V, generator=g, dtype=D, requires_grad=True)
        elif base == "labels":
            lab = torch.randint(0, V, (B, T), generator=g)
            for b in range(B):  # rows of 1..T valid tokens, differing between responses
                lab[b, (b + 2 * "wlr".index(s)) % T + 1:] = -100
            out[p] = lab
        elif base == "ids":
            out[p] = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(B * T)]).view(B, T, K)
        elif base == "logp":
            probs = torch.softmax(torch.randn(B, T, V, generator=g, dtype=D), -1)
            out[p] = probs.sort(-1, descending=True).values[..., :K].log()
        elif base == "label_logp":
            out[p] = -torch.rand(B, T, generator=g, dtype=D)
        else:  # policy_ref_logp
            out[p] = -3 * torch.rand(B, generator=g, dtype=D)
    return out
