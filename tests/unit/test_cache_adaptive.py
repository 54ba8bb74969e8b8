"""Mass-adaptive K: per-token k in the format and the key, ragged segments, the reader's padding
to the batch's largest k with absent (−inf, zero-probability) slots, and what the losses compute
on those padded tensors compared with each token's own k_t slots."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distill_pipeline.cache.admin import info, verify
from distill_pipeline.cache.extract import segment_data
from distill_pipeline.cache.format import SCHEMA_VERSION, CacheFormat, FormatError, reconstruction_kl
from distill_pipeline.cache.reader import CacheReader, aligned_teacher_tensors, pad_slots
from distill_pipeline.cache.segment import check_segment, segment_id
from distill_pipeline.cache.store import Store

V, K = 40, 12
ADAPTIVE = CacheFormat(K, top_mass=0.9)


def teacher_rows(n: int, seed: int = 0):
    """float32 top-K (ids, log-probs, lse, label log-prob) of peaked and flat distributions."""
    g = np.random.default_rng(seed)
    conc = np.where(g.random(n) < 0.5, 0.05, 1.0)[:, None]  # peaked ↔ flat tokens
    p = np.stack([g.dirichlet(np.full(V, c)) for c in conc[:, 0]])  # (n, V)
    lp = np.log(np.clip(p, 1e-30, None)).astype(np.float32)
    ids = np.argsort(-lp, axis=1, kind="stable")[:, :K].astype(np.int32)
    top = np.take_along_axis(lp, ids, 1)
    labels = g.integers(0, V, n)
    return ids, top, g.normal(size=n).astype(np.float32), lp[np.arange(n), labels].astype(np.float32)


def publish(root, fmt: CacheFormat, seqs, rows) -> list[str]:
    """One segment holding `seqs` ((prompt, response) id lists) with `rows` as their teacher."""
    entries, offset = [], 0
    for p, r in seqs:
        entries.append({"key": fmt.key("t", p + r, len(p)), "teacher": "t", "offset": offset,
                        "n_tokens": len(r), "prompt_len": len(p), "token_ids": p + r})
        offset += len(r)
    data, kl = segment_data(fmt, *rows, entries, V)
    manifest = {"schema_version": SCHEMA_VERSION, "teacher": "t", "format": fmt.to_json(),
                "n_entries": len(entries), "n_tokens": offset, "reconstruction_kl": kl,
                **({"n_slots": len(data.ids)} if fmt.adaptive else {})}
    Store(root).publish(segment_id([e["key"] for e in entries]), data, manifest)
    return [e["key"] for e in entries]


SEQS = [([1, 2, 3], [4, 5, 6, 7, 8]), ([9, 10], [11, 12, 13, 14, 15, 16, 17, 18])]
N_TOKENS = sum(len(r) for _, r in SEQS)


def test_format_fields_key_and_manifest():
    fixed = CacheFormat(50)
    assert fixed.to_json() == {"top_k": 50, "dtype": "float16", "logp_keep_bits": None}  # schema-1 bytes
    assert fixed.shape == "50" and not fixed.adaptive
    a, b = CacheFormat(50, top_mass=0.999), CacheFormat(50, top_mass=0.99)
    keys = {f.key("t", [1, 2], 1) for f in (fixed, a, b, CacheFormat(50, top_mass=0.999, min_k=4))}
    assert len(keys) == 4  # mass and min_k are part of the key
    assert CacheFormat.from_json(a.to_json()) == a and a.to_json()["top_mass"] == 0.999
    assert a.label == "≤50 @ mass 0.999"
    for bad, words in [(dict(top_mass=1.0), "strictly between 0 and 1"), (dict(top_mass=0), "strictly"),
                       (dict(top_mass=0.9, min_k=51), "min_k must be"),
                       (dict(min_k=3), "min_k applies to an adaptive K only")]:
        with pytest.raises(FormatError, match=words):
            CacheFormat(50, **bad)


def test_kept_is_the_smallest_k_reaching_the_mass():
    lp = np.log(np.array([[0.5, 0.3, 0.15, 0.04, 0.01], [0.97, 0.01, 0.01, 0.005, 0.005],
                          [0.3, 0.2, 0.1, 0.1, 0.05]], np.float32))
    assert CacheFormat(5, top_mass=0.9).kept(lp).tolist() == [3, 1, 5]  # the last: never reaches it
    assert CacheFormat(5, top_mass=0.9, min_k=2).kept(lp).tolist() == [3, 2, 5]
    assert CacheFormat(5, top_mass=0.78).kept(lp).tolist() == [2, 1, 5]


def test_adaptive_reconstruction_kl_prices_the_dropped_slots():
    ids, lp, _, _ = teacher_rows(64)
    fmt = CacheFormat(K, "float32", top_mass=0.9)
    stored = fmt.decode(fmt.encode(lp))
    kls = [reconstruction_kl(lp, stored, CacheFormat(K, "float32", top_mass=m).kept(stored), V)
           for m in (0.5, 0.9, 0.99)]
    assert kls[0] > kls[1] > kls[2] > 0  # more mass kept, less lost
    every = np.full(len(lp), K)
    assert reconstruction_kl(lp, stored, every, V) == pytest.approx(reconstruction_kl(lp, stored), abs=1e-7)


def test_pad_slots_names_distinct_absent_tokens():
    ids = np.array([0, 1, 2, 7, 3, 0, 1], np.int32)  # flat: k = 3, 1, 3
    lp = np.log(np.array([.5, .3, .1, .9, .6, .2, .1], np.float32))
    out_ids, out_lp = pad_slots(ids, lp, [3, 1, 3], 5)
    assert out_ids.tolist() == [[0, 1, 2, 3, 4], [7, 0, 1, 2, 3], [3, 0, 1, 2, 4]]
    assert np.isneginf(out_lp[0, 3:]).all() and np.isneginf(out_lp[1, 1:]).all()
    np.testing.assert_array_equal(out_lp[2, :3], lp[4:])
    again_ids, again_lp = pad_slots(out_ids, out_lp, [3, 1, 3], 6)  # padded further (batch max)
    assert again_ids[:, :5].tolist() == out_ids.tolist() and np.isneginf(again_lp[:, 5]).all()
    for row, k in zip(again_ids, [3, 1, 3]):
        assert len(set(row.tolist())) == 6 and not set(row[k:]) & set(row[:k])


def test_ragged_round_trip_equals_fixed_truncated(tmp_path):
    rows = teacher_rows(N_TOKENS)
    fixed_keys = publish(tmp_path / "fixed", CacheFormat(K), SEQS, rows)
    ad_keys = publish(tmp_path / "ad", ADAPTIVE, SEQS, rows)
    store = Store(tmp_path / "ad")
    assert verify(store) == (2, [])
    r = info(store)
    counts = ADAPTIVE.kept(ADAPTIVE.decode(ADAPTIVE.encode(rows[1])))
    assert 1 <= counts.min() < counts.max() <= K  # the data has both peaked and flat tokens
    assert r["mean_k"] == round(counts.mean(), 2) and r["top_k"] == [f"≤{K} @ mass 0.9 (mean k {counts.mean():.2f})"]
    assert info(Store(tmp_path / "fixed"))["mean_k"] == K
    assert r["reconstruction_kl"] > info(Store(tmp_path / "fixed"))["reconstruction_kl"]
    fixed, ad = CacheReader(tmp_path / "fixed"), CacheReader(tmp_path / "ad")
    seen = 0
    for fk, ak in zip(fixed_keys, ad_keys):
        f, a = fixed.get(fk), ad.get(ak)
        k = counts[seen:seen + len(f["lse"])]
        seen += len(f["lse"])
        assert a["k"].tolist() == k.tolist() and a["ids"].shape[1] == k.max()
        for row in range(len(k)):
            np.testing.assert_array_equal(a["ids"][row, :k[row]], f["ids"][row, :k[row]])
            np.testing.assert_array_equal(a["logp"][row, :k[row]], f["logp"][row, :k[row]])
            assert np.isneginf(a["logp"][row, k[row]:]).all()
        np.testing.assert_array_equal(a["lse"], f["lse"])
        np.testing.assert_array_equal(a["label_logp"], f["label_logp"])


def test_ragged_segment_damage_is_found(tmp_path):
    import json

    publish(tmp_path / "ad", ADAPTIVE, SEQS, teacher_rows(N_TOKENS))
    seg = Store(tmp_path / "ad").segments()[0]
    meta = json.loads((seg / "zarr.json").read_text())
    meta["attributes"]["n_slots"] += 1
    (seg / "zarr.json").write_text(json.dumps(meta))
    assert any("array ids has shape" in p for p in check_segment(seg, deep=False).problems)


def padded_and_truncated(tmp_path, fmt=ADAPTIVE, seed=0):
    """Teacher tensors of one batch from an adaptive store (padded to the batch's max k) and,
    per valid position, the same token's own k_t slots from a fixed-K store."""
    rows = teacher_rows(N_TOKENS, seed)
    fixed_keys = publish(tmp_path / f"fixed{seed}", CacheFormat(K), SEQS, rows)
    ad_keys = publish(tmp_path / f"ad{seed}", fmt, SEQS, rows)
    width = max(len(p) + len(r) for p, r in SEQS)
    batch = [(key, p + r, len(p)) for key, (p, r) in zip(ad_keys, SEQS)]
    padded = aligned_teacher_tensors(CacheReader(tmp_path / f"ad{seed}"), batch, width, fmt.top_k)
    full = aligned_teacher_tensors(CacheReader(tmp_path / f"fixed{seed}"),
                                   [(k, s, p) for k, (_, s, p) in zip(fixed_keys, batch)], width, K)
    labels = torch.full((len(SEQS), width - 1), -100)
    for b, (p, r) in enumerate(SEQS):
        labels[b, len(p) - 1:len(p) - 1 + len(r)] = torch.tensor(r)
    return padded, full, labels


def test_reader_pads_the_batch_to_its_largest_k(tmp_path):
    padded, full, labels = padded_and_truncated(tmp_path)
    m = padded["mask"]
    assert torch.equal(m, full["mask"]) and torch.equal(m, labels != -100)
    kept = torch.isfinite(padded["logp"]) & m.unsqueeze(-1)  # (B, T, Kb)
    k = kept.sum(-1)
    assert padded["ids"].shape[-1] == int(k.max()) <= K and 1 <= int(k[m].min()) < int(k.max())
    for b, t in m.nonzero().tolist():
        n = int(k[b, t])
        assert torch.equal(padded["ids"][b, t, :n], full["ids"][b, t, :n])
        assert torch.equal(padded["logp"][b, t, :n], full["logp"][b, t, :n])
        assert not set(padded["ids"][b, t, n:].tolist()) & set(padded["ids"][b, t, :n].tolist())
    assert torch.equal(padded["lse"], full["lse"]) and torch.equal(padded["label_logp"], full["label_logp"])


# ---------------------------------------------------------------------------- losses

def _own_slots(t: dict, b: int, pos: int):
    """Token (b, pos)'s own k_t slots, as (1, 1, k_t) tensors."""
    keep = torch.isfinite(t["logp"][b, pos])
    return t["ids"][b, pos][keep].view(1, 1, -1), t["logp"][b, pos][keep].view(1, 1, -1)


def check_padded_equals_own_k(losses, tmp_path) -> None:
    """Every cache loss on the padded batch ≡ the same loss with each token's own k_t slots
    (token by token: per-token KL, advantage and TVKD score parts, then the loss's own means)."""
    torch.manual_seed(0)
    padded, _, labels = padded_and_truncated(tmp_path)
    ref_pad, _, _ = padded_and_truncated(tmp_path, CacheFormat(K, top_mass=0.8), seed=1)
    logits = torch.randn(labels.shape + (V,), dtype=torch.float64)
    valid = (labels != -100).nonzero().tolist()
    one = lambda b, t: (logits[b, t].view(1, 1, -1), labels[b, t].view(1, 1))  # noqa: E731
    # K+1-bin KL (VanillaKD, DCKD: sft_and_kl and binned_kl)
    per = [losses.binned_kl(*one(b, t), *_own_slots(padded, b, t)) for b, t in valid]
    want = torch.stack(per).mean()
    assert losses.binned_kl(logits, labels, padded["ids"], padded["logp"]).item() == pytest.approx(want.item(), abs=1e-9)
    assert losses.sft_and_kl(logits, labels, padded["ids"], padded["logp"])[1].item() == pytest.approx(want.item(), abs=1e-9)
    # ADPA: support = the DPO teacher's stored top-k_t; reference-missing rule on the stored reference
    for compat in (False, True):
        kw = dict(gamma=1.0, code_compat=compat)
        per = [losses.adpa_loss(*one(b, t), *one(b, t), *_own_slots(padded, b, t), *_own_slots(ref_pad, b, t),
                                **kw)[1]["advantage"] for b, t in valid]
        got = losses.adpa_loss(logits, labels, logits, labels, padded["ids"], padded["logp"],
                               ref_pad["ids"], ref_pad["logp"], **kw)[1]["advantage"]
        assert got.item() == pytest.approx(torch.stack(per).mean().item(), abs=1e-9), compat
    # TVKD: S(y) = Σ_t q_t − γ Σ_{t ≥ 1} Φ_t, q_t and Φ_t each from token t's own bins
    for potential in ("teacher_value", "student_entropy"):
        kw = dict(potential=potential, gamma=1.0, alpha=0.7)
        got = losses._tvkd_score(logits, labels, padded["ids"], padded["logp"], **kw)
        for b in range(len(SEQS)):
            ts = [t for bb, t in valid if bb == b]
            q, phi = [], []
            for t in ts:
                ids, lp = _own_slots(padded, b, t)
                lg, lb = one(b, t)
                s1 = losses._tvkd_score(lg, lb, ids, lp, **kw)  # q_t (Φ after the last token = 0)
                s2 = losses._tvkd_score(lg.repeat(1, 2, 1), lb.repeat(1, 2), ids.repeat(1, 2, 1),
                                        lp.repeat(1, 2, 1), **kw)  # 2 q_t − Φ_t
                q.append(s1)
                phi.append(2 * s1 - s2)
            want = sum(q) - sum(phi[1:])
            assert got[b].item() == pytest.approx(want.item(), abs=1e-9), potential


def test_losses_on_padded_adaptive_tensors_equal_each_tokens_own_k(tmp_path):
    from distill_pipeline import losses

    check_padded_equals_own_k(losses, tmp_path)


def test_ragged_segments_copy_between_stores_verified(tmp_path):
    """push/pull/upload path: every file name is accepted, the segment is decoded, re-keyed and
    checksummed on arrival (Store.import_segment), and reads back the same."""
    from distill_pipeline.cache.transfer import copy_segments

    keys = publish(tmp_path / "src", ADAPTIVE, SEQS, teacher_rows(N_TOKENS))
    out = copy_segments(Store(tmp_path / "src"), Store(tmp_path / "dst"), echo=lambda *a, **k: None)
    assert out["copied"] == 1 and verify(Store(tmp_path / "dst")) == (2, [])
    a, b = CacheReader(tmp_path / "src").get(keys[1]), CacheReader(tmp_path / "dst").get(keys[1])
    assert all(np.array_equal(a[f], b[f]) for f in ("ids", "logp", "lse", "label_logp", "k"))
