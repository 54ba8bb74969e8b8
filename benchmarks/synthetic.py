"""Synthetic teacher distributions for cache-size benchmarks: Zipf-shaped next-token
distributions over a large vocabulary (default 128k), not near-uniform random weights.

Each position's logits are a Zipf prior over a frequency-ordered vocabulary (BPE vocabularies are
roughly frequency ordered) plus per-position Gumbel noise and a context boost for a few hundred
random tokens, giving top-1 probabilities spread over (0, 1) and top-50 mass ~0.8–0.99 as in real
LM outputs. Returns the cache's per-token fields for teacher-forced labels sampled from the
distribution itself.
"""
from __future__ import annotations


def zipf_teacher_tokens(n_tokens: int, *, vocab: int = 128_256, top_k: int = 50, seed: int = 0,
                        chunk: int = 256):
    import torch

    g = torch.Generator().manual_seed(seed)
    prior = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))  # (V,)
    ids, logp, lse, label = [], [], [], []
    for start in range(0, n_tokens, chunk):
        n = min(chunk, n_tokens - start)
        gumbel = -torch.log(-torch.log(torch.rand(n, vocab, generator=g).clamp(1e-9, 1 - 1e-9)))
        logits = prior + 1.5 * gumbel  # (n, V)
        boost = torch.randint(0, vocab, (n, 256), generator=g)  # the context's plausible tokens
        logits.scatter_add_(1, boost, 4.0 + 6.0 * torch.rand(n, 256, generator=g))
        logits *= 0.5 + 2.0 * torch.rand(n, 1, generator=g)  # per-position temperature: peaked ↔ flat
        total = torch.logsumexp(logits, -1)  # (n,)
        lp = logits - total[:, None]
        top = lp.topk(top_k, dim=-1)
        labels = torch.multinomial(lp.exp(), 1, generator=g).squeeze(1)  # (n,)
        ids.append(top.indices.int())
        logp.append(top.values)
        lse.append(total)
        label.append(lp.gather(1, labels[:, None]).squeeze(1))
    return (torch.cat(ids).numpy(), torch.cat(logp).numpy(), torch.cat(lse).numpy(),
            torch.cat(label).numpy())
