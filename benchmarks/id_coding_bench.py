"""How close can the cache's top-K ids get to their entropy? Codes ≥ 1M synthetic tokens' ids
(K=50, vocab 128,256, the `synthetic.py` teacher) every way listed below, chunk by chunk as the
store's zarr arrays are chunked (4096 rows), and prints B/token beside the ids' order-0 entropy,
encode MB/s (of raw int32) and decode tokens/s (one thread, this CPU). Writes JSON too.

    python benchmarks/id_coding_bench.py [--tokens 1048576] [--order-study] [--trained-store DIR]

Ids come from `fast_zipf_ids`, which samples `synthetic.zipf_teacher_tokens`' top-K ids directly
(same distribution, ~100× faster; see its docstring). Those ids are independent from token to
token, so their order-0 entropy is all the structure there is; `--trained-store` also codes the
ids a fixed-K store of trained teachers holds (e.g. the quickstart's), per teacher, where zstd
finds structure across slots and tokens that an order-0 coder cannot see.

"dec÷train" divides decoding speed by what a cached DCKD training step consumes, measured in
the same run (`train_speed.cached_dckd_throughput`: the train_speed.py setup, its cached step
alone; teacher rows = chosen + rejected response tokens per second).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rans_idcodec import IdModel, decode, encode  # noqa: E402
from distill_pipeline.cache.segment import CHUNK_ROWS  # noqa: E402

def fast_zipf_ids(n_tokens: int, *, vocab: int = 128_256, top_k: int = 50, seed: int = 0,
                  chunk: int = 65_536) -> np.ndarray:
    """(n_tokens, top_k) int32 ids distributed as `synthetic.zipf_teacher_tokens`' ids.

    That teacher's logits are 1.5·(prior/1.5 + boost/1.5 + G) times a positive per-position
    temperature, G i.i.d. standard Gumbel: the temperature does not change which ids are on top,
    and the top-K of (log w + G), in order, is a draw of K ids without replacement, in draw order,
    from p ∝ w (the Gumbel-top-k trick) — here w_i = (i+1)^(-1.1/1.5) · exp(boost_i/1.5), boost
    4–10 on 256 uniform ids per position (repeats add, as scatter_add does). So this draws that
    directly, by rejection of repeats, with numpy. Differs only in: another random stream (not the
    same ids), no clamp of the uniforms to [1e-9, 1 − 1e-9] (changes < 1e-9 of the Gumbels), and no
    float32 ties. Checked against the torch teacher on 3,072 tokens (mean log2(id+1) 12.66 vs 12.66,
    ids < 100: 8.77% vs 8.83%, < 10k: 45.2% vs 45.2%, quartiles within sampling noise)."""
    rng = np.random.default_rng(seed)
    w = np.arange(1, vocab + 1, dtype=np.float64) ** (-1.1 / 1.5)  # (V,)
    cw = np.cumsum(w)
    total_w = cw[-1]
    out = np.empty((n_tokens, top_k), dtype=np.int32)
    for start in range(0, n_tokens, chunk):
        n = min(chunk, n_tokens - start)
        pos = rng.integers(0, vocab, (n, 256))
        boost = 4.0 + 6.0 * rng.random((n, 256))
        uniq, inv = np.unique((np.arange(n)[:, None] * vocab + pos).ravel(), return_inverse=True)
        row, col = uniq // vocab, uniq % vocab
        ce = np.cumsum(w[col] * np.expm1(np.bincount(inv, weights=boost.ravel()) / 1.5))  # extra mass
        row_end = np.searchsorted(row, np.arange(n), side="right")
        before = np.concatenate([[0.0], ce])[np.concatenate([[0], row_end[:-1]])]  # (n,)
        mass = total_w + ce[row_end - 1] - before  # (n,) each row's total weight
        chosen = np.empty((n, top_k), dtype=np.int64)
        for k in range(top_k):
            todo = np.arange(n)
            while len(todo):
                u = rng.random(len(todo)) * mass[todo]
                cand = np.empty(len(todo), dtype=np.int64)
                base = u < total_w
                cand[base] = np.minimum(np.searchsorted(cw, u[base], side="right"), vocab - 1)
                t = todo[~base]
                j = np.searchsorted(ce, before[t] + (u[~base] - total_w), side="right")
                cand[~base] = col[np.minimum(j, row_end[t] - 1)]
                clash = (chosen[todo, :k] == cand[:, None]).any(1) if k else np.zeros(len(todo), bool)
                chosen[todo[~clash], k] = cand[~clash]
                todo = todo[clash]
        out[start:start + n] = chosen
    return out


def entropy_bits(ids: np.ndarray) -> float:
    """Plug-in order-0 entropy, bits per id: −Σ p log2 p over the id histogram."""
    c = np.bincount(ids.ravel().astype(np.int64))
    p = c[c > 0] / ids.size
    return float(-(p * np.log2(p)).sum())


# ------------------------------------------------------------------ the options, one chunk at a time

def blosc(level=5, blocksize=0):
    """What store.py writes (zarr's BloscCodec is numcodecs' Blosc); blocksize 0: blosc's choice."""
    from numcodecs import Blosc

    codec = Blosc(cname="zstd", clevel=level, shuffle=Blosc.SHUFFLE, blocksize=blocksize)
    return (lambda a: codec.encode(a)), (lambda b, n, k: np.frombuffer(codec.decode(b), np.int32).reshape(n, k))


def planes(level=5, remap=None):
    """uint32 → its 3 low byte planes (vocab < 2^24), zstd each; `remap`: id → frequency rank."""
    from numcodecs import Zstd

    z = Zstd(level=level)
    inv = None if remap is None else np.argsort(remap).astype(np.int32)

    def enc(a):
        v = a if remap is None else remap[a]
        b = np.ascontiguousarray(v.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3].T)
        return [z.encode(p) for p in b]

    def dec(parts, n, k):
        out = np.zeros((n * k, 4), np.uint8)
        for i, p in enumerate(parts):
            out[:, i] = np.frombuffer(z.decode(p), np.uint8)
        v = out.view("<u4").reshape(n, k).astype(np.int32)
        return v if inv is None else inv[v]
    return enc, dec


def zstd_dict(sample: np.ndarray, level=5):
    """zstd with a dictionary trained on a sample, over the 3 low byte planes (as `planes`)."""
    import zstandard

    def split(a):
        return np.ascontiguousarray(a.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3].T).tobytes()
    d = zstandard.train_dictionary(112_640, [split(c) for c in np.array_split(sample, 256)])
    cz, dz = zstandard.ZstdCompressor(level=level, dict_data=d), zstandard.ZstdDecompressor(dict_data=d)

    def dec(b, n, k):
        out = np.zeros((n * k, 4), np.uint8)
        out[:, :3] = np.frombuffer(dz.decompress(b), np.uint8).reshape(3, -1).T
        return out.view("<u4").reshape(n, k).astype(np.int32)
    return (lambda a: cz.compress(split(a))), dec, len(d.as_bytes())


def rans(model):
    return (lambda a: encode(a, model)), (lambda b, n, k: decode(b, n, k, model))


def measure(name, ids, enc, dec, table_bytes, entropy, train_tok_s):
    return measure_parts(name, [(ids, enc, dec, table_bytes)], entropy, train_tok_s)


def measure_parts(name, parts, entropy, train_tok_s):
    """Code each part's ids (parts: [(ids, enc, dec, table_bytes)], e.g. one per teacher) chunk by
    chunk; B/token, bits/id and times over all parts together, tables included."""
    size = t_enc = t_dec = 0.0
    exact = True
    for ids, enc, dec, table_bytes in parts:
        chunks = [ids[s:s + CHUNK_ROWS] for s in range(0, len(ids), CHUNK_ROWS)]
        t0 = time.perf_counter()
        blobs = [enc(c) for c in chunks]
        t_enc += time.perf_counter() - t0
        t0 = time.perf_counter()
        outs = [dec(b, *c.shape) for b, c in zip(blobs, chunks)]
        t_dec += time.perf_counter() - t0
        exact &= all(np.array_equal(o, c) for o, c in zip(outs, chunks))
        size += sum(sum(map(len, b)) if isinstance(b, list) else len(b) for b in blobs) + table_bytes
    n = sum(len(p[0]) for p in parts)
    n_ids = sum(p[0].size for p in parts)
    table_bytes = sum(p[3] for p in parts)
    row = {"option": name, "B_per_token": size / n, "bits_per_id": 8 * size / n_ids,
           "over_entropy": 8 * size / n_ids / entropy, "table_bytes": table_bytes,
           "encode_MB_s": 4 * n_ids / t_enc / 1e6, "decode_tok_s": n / t_dec,
           "decode_over_train": n / t_dec / train_tok_s, "lossless": exact}
    print(f"{name:58s} {row['B_per_token']:7.2f} {row['bits_per_id']:6.3f} {row['over_entropy']:6.3f} "
          f"{table_bytes:9d} {row['encode_MB_s']:7.1f} {row['decode_tok_s']:10.0f} "
          f"{row['decode_over_train']:8.0f}× {exact}", flush=True)
    return row


HEADER = (f"{'option (4096-row chunks, table bytes included)':58s} {'B/tok':>7s} {'bit/id':>6s} "
          f"{'÷H0':>6s} {'table B':>9s} {'enc MB/s':>7s} {'dec tok/s':>10s} {'dec÷train':>9s} exact")


def trained_ids(root: str) -> tuple[dict, int]:
    """A fixed-K store's ids by teacher ({teacher: (N, K) int32}, segments in name order, rows in
    stored order) and the vocabulary size its segments name (else the largest id + 1)."""
    from distill_pipeline.cache.store import Store

    store = Store(root, create=False)
    by: dict[str, list] = {}
    vocab = 0
    for seg in sorted(store.segment_names()):
        group = store.open_segment(seg)
        ids = np.asarray(group["ids"][:], dtype=np.int32)
        if ids.ndim != 2:
            raise SystemExit(f"{root}: segment {seg} is adaptive-K; this compares fixed-K ids")
        by.setdefault(group.attrs["teacher"], []).append(ids)
        vocab = max(vocab, int(group.attrs.get("vocab_size", ids.max() + 1)))
    return {t: np.concatenate(v) for t, v in by.items()}, vocab


def trained_study(root: str, train_tok_s: float) -> dict:
    """The store's ids (per teacher) coded each way: the store's blosc, zstd byte planes, and
    order-0 rANS with a per-teacher model fit on all of that teacher's ids (the most favourable
    model it can have: fit on the very ids it codes; table bytes included)."""
    by, vocab = trained_ids(root)
    n = sum(len(v) for v in by.values())
    n_ids = sum(v.size for v in by.values())
    h_teacher = sum(entropy_bits(v) * v.size for v in by.values()) / n_ids  # per-teacher order-0
    h_pooled = entropy_bits(np.concatenate(list(by.values())))
    k = next(iter(by.values())).shape[1]
    print(f"\ntrained store {root}: {len(by)} teacher(s), {n} tokens × K={k}, vocab {vocab}; order-0 "
          f"entropy per teacher {h_teacher:.4f} bits/id = {h_teacher * k / 8:.2f} B/token "
          f"(pooled {h_pooled:.4f}); ÷H0 below is against the per-teacher entropy")
    print(HEADER)

    def each(make):
        return [(v, *make(v)) for v in by.values()]
    rows = [measure_parts("int32, blosc zstd-5 byte shuffle", each(lambda v: (*blosc(5), 0)), h_teacher, train_tok_s),
            measure_parts("same, blosc blocksize = the whole chunk (store.py since issue 12)",
                          each(lambda v: (*blosc(5, 1 << 20), 0)), h_teacher, train_tok_s),
            measure_parts("byte planes (3) + zstd-5", each(lambda v: (*planes(5), 0)), h_teacher, train_tok_s),
            measure_parts("byte planes (3) + zstd-19", each(lambda v: (*planes(19), 0)), h_teacher, train_tok_s)]
    try:
        import constriction  # noqa: F401
    except ImportError:
        print("rANS rows: skipped (pip install constriction)")
    else:
        def fitted(v):
            model = IdModel.fit(v, vocab=vocab)
            return (*rans(model), len(model.to_bytes()))
        rows.append(measure_parts("rANS, per-teacher model fit on all its ids", each(fitted), h_teacher, train_tok_s))
        rows.append(measure_parts("rANS, model fit per chunk and embedded in it", each(lambda v: (*rans(None), 0)),
                                  h_teacher, train_tok_s))
    return {"store": root, "teachers": len(by), "tokens": n, "top_k": k, "vocab": vocab,
            "entropy_bits_per_id_per_teacher": h_teacher, "entropy_B_per_token_per_teacher": h_teacher * k / 8,
            "entropy_bits_per_id_pooled": h_pooled, "rows": rows}


def order_study(n_tokens=3072):
    """Idea (a): ids stored sorted by id (a set: log2 K! bits/token cheaper) would need the
    log-probs stored in that order to recover the probability order — on real synthetic rows,
    what the log-prob field costs then, and how often float16 ties make the order unrecoverable."""
    import math

    import torch
    from numcodecs import Blosc, Delta
    from synthetic import zipf_teacher_tokens

    torch.set_num_threads(1)
    ids, logp, _, _ = zipf_teacher_tokens(n_tokens, seed=3)
    bits = logp.astype(np.float16).view(np.uint16)  # (n, K), descending log-probs
    bl = Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE)

    def stored(b):  # store.py: Delta along the row, then blosc zstd
        return len(bl.encode(Delta(dtype="<u2").encode(np.ascontiguousarray(b)))) / len(b)
    perm = np.argsort(ids, axis=1, kind="stable")
    by_id = np.take_along_axis(bits, perm, 1)
    ties = float((np.diff(bits.astype(np.int32), axis=1) == 0).mean())
    res = {"tokens": n_tokens, "logp_B_tok_prob_order": stored(bits), "logp_B_tok_id_order": stored(by_id),
           "ids_saving_B_tok_at_most": math.log2(math.factorial(ids.shape[1])) / 8,
           "adjacent_float16_ties": ties}
    print("order study:", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1 << 20)
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--ids", help="a cached (N, K) int32 .npy of ids (skips generation)")
    ap.add_argument("--order-study", action="store_true", help="also measure idea (a) on the torch teacher")
    ap.add_argument("--out", default="benchmarks/out/id_coding_bench.json")
    ap.add_argument("--trained-store", help="also code the ids of this fixed-K store (e.g. the quickstart's)")
    ap.add_argument("--train-epochs", type=int, default=1,
                    help="epochs of cached DCKD steps measured for dec÷train (8 steps each)")
    args = ap.parse_args()
    from train_speed import cached_dckd_throughput

    train = cached_dckd_throughput(epochs=args.train_epochs)
    train_tok_s = train["teacher_rows_per_s"]
    print(f"cached DCKD step (train_speed.py setup, measured now): median {train['median_step_s']} s, "
          f"{train['teacher_rows_per_step']} teacher rows/step → {train_tok_s:.0f} tok/s "
          f"({train['steps']} steps, {train['torch_threads']} torch threads)", flush=True)
    t0 = time.perf_counter()
    ids = np.load(args.ids) if args.ids else fast_zipf_ids(args.tokens, vocab=args.vocab)
    print(f"{len(ids)} tokens × K={ids.shape[1]} ids ({time.perf_counter() - t0:.1f} s)", flush=True)
    n, k = ids.shape
    h0 = entropy_bits(ids)
    slot_h = {g: entropy_bits(ids[:, s]) for g, s in (("slot 0", slice(0, 1)), ("slots 1-49", slice(1, None)))}
    h_slot = (slot_h["slot 0"] + (k - 1) * slot_h["slots 1-49"]) / k
    distinct = int((np.bincount(ids.ravel()) > 0).sum())
    print(f"order-0 entropy (plug-in, {ids.size} ids, {distinct} distinct): {h0:.4f} bits/id = "
          f"{h0 * k / 8:.2f} B/token; given slot 0 vs 1-49: {h_slot:.4f} bits/id; log2 vocab "
          f"{np.log2(args.vocab):.3f}")
    print(HEADER)
    rows = [measure("zarr today: int32, blosc zstd-5 byte shuffle", ids, *blosc(5), 0, h0, train_tok_s),
            measure("same, blosc blocksize = the whole chunk (store.py since issue 12)", ids, *blosc(5, 1 << 20), 0, h0,
                    train_tok_s),
            measure("byte planes (3) + zstd-5", ids, *planes(5), 0, h0, train_tok_s),
            measure("byte planes (3) + zstd-19", ids, *planes(19), 0, h0, train_tok_s)]
    rank = np.argsort(np.argsort(-np.bincount(ids.ravel(), minlength=args.vocab), kind="stable")).astype(np.int32)
    from numcodecs import Zstd
    rank_table = len(Zstd(level=19).encode(np.argsort(rank).astype("<u4")))
    rows.append(measure("per-teacher frequency-rank remap + byte planes + zstd-5", ids, *planes(5, rank),
                        rank_table, h0, train_tok_s))
    try:
        enc, dec, dict_bytes = zstd_dict(ids[:16_384])
        rows.append(measure("byte planes + zstd-5 + 110 KB dictionary (16k tokens)", ids, enc, dec, dict_bytes, h0,
                            train_tok_s))
    except ImportError:
        print("zstd + trained dictionary: skipped (pip install zstandard)")
    try:
        import constriction  # noqa: F401 - the rANS rows' entropy coder, not a project dependency
    except ImportError:
        print("rANS rows: skipped (pip install constriction)")
    else:
        for label, sample in (("16k tokens (one segment)", ids[:16_384]), ("128k tokens", ids[:131_072]),
                              (f"all {n} tokens", ids)):
            model = IdModel.fit(sample, vocab=args.vocab)
            rows.append(measure(f"rANS, per-teacher model fit on {label}", ids, *rans(model),
                                len(model.to_bytes()), h0, train_tok_s))
        rows.append(measure("rANS, model fit per chunk and embedded in it", ids, *rans(None), 0, h0, train_tok_s))
    result = {"tokens": n, "top_k": k, "vocab": args.vocab, "entropy_bits_per_id": h0,
              "entropy_B_per_token": h0 * k / 8, "entropy_given_slot_bits_per_id": h_slot,
              "distinct_ids": distinct, "train": train, "train_tok_per_s": train_tok_s, "rows": rows}
    if args.trained_store:
        result["trained"] = trained_study(args.trained_store, train_tok_s)
    if args.order_study:
        result["order_study"] = order_study()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
