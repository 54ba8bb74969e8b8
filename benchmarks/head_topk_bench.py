"""Extraction's post-head step (`extract._head_topk`) against the implementation it replaced
(logsumexp over the whole (n, V) chunk, in-place subtraction, topk, gather; kept here), side by
side in one process, interleaved, medians and minima of wall and CPU time.

    python benchmarks/head_topk_bench.py                    # per 1024 x 32k float32 chunk, 1 thread
    python benchmarks/head_topk_bench.py --threads 2
    python benchmarks/head_topk_bench.py --extraction       # cache_bench's extraction vs its baselines, old and new step

`--extraction`: cache_bench's bench teacher, sequences and batches; four sides interleaved
(trunk + head, full forward, extraction with the old step, extraction with the new step), the
fastest of `--repeats` passes of each kept.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from distill_pipeline.cache import extract  # noqa: E402


def old_head_topk(logits, labels, top_k: int) -> tuple:
    """The step before: one logsumexp over the chunk (an (n, V) temporary), then the log-probs."""
    lse = torch.logsumexp(logits, dim=-1)
    logits -= lse[:, None]
    top = logits.topk(top_k, dim=-1)
    label_logp = logits.gather(1, labels[:, None]).squeeze(1)
    return (top.indices.int().cpu().numpy(), top.values.cpu().numpy(), lse.cpu().numpy(),
            label_logp.cpu().numpy(), int(logits.shape[-1]))


def timed(sides: dict, repeats: int, arg=None) -> dict:
    """Wall and CPU seconds of each side, interleaved (the order reversed every other pass)."""
    wall, cpu = {k: [] for k in sides}, {k: [] for k in sides}
    for rep in range(repeats):
        for name, fn in (list(sides.items()) if rep % 2 == 0 else list(sides.items())[::-1]):
            x = arg() if arg else None
            t0, c0 = time.perf_counter(), time.process_time()
            fn(x) if arg else fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {"wall": wall, "cpu": cpu}


def chunk(args) -> dict:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.rows, args.vocab, generator=g) * 3  # (n, V)
    labels = torch.randint(0, args.vocab, (args.rows,), generator=g)
    sides = {"old": lambda x: old_head_topk(x, labels, args.top_k),
             "new": lambda x: extract._head_topk(x, labels, args.top_k)}
    t = timed(sides, args.repeats, arg=logits.clone)
    return {k: {f"{kind}_ms_{stat.__name__}": round(stat(t[kind][k]) * 1e3, 1)
                for kind in ("wall", "cpu") for stat in (statistics.median, min)} for k in sides}


def extraction(args) -> dict:
    import cache_bench as cb

    from distill_pipeline.cache.extract import Extractor, _batches, make_request, plan_units
    from distill_pipeline.data.tokenize import collate
    from distill_pipeline.models import load_checkpoint, teacher_identity

    with tempfile.TemporaryDirectory() as d:
        teacher = cb.bench_teacher(Path(d) / "teacher", args.vocab, args.hidden, 4)
        ident = teacher_identity(teacher)
        reqs = [make_request(ident, p, r, cb.FMT) for p, r in cb.random_sequences(args.sequences, args.vocab, seed=1)]
        units = plan_units(reqs, set(), unit_tokens=16384)
        model, _ = load_checkpoint(teacher)
        model.eval()
        head = model.get_output_embeddings()
        batches = [(ids, mask, cb._positions(b)) for u in units for b in _batches(u.requests, 4096)
                   for ids, mask, _ in [collate([r.prompt_ids for r in b], [r.response_ids for r in b], 0)]]

        def trunk_head():
            with torch.no_grad():
                for ids, mask, (rows, cols) in batches:
                    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[rows, cols]
                    for s in range(0, len(hidden), 1024):
                        head(hidden[s:s + 1024]).float()

        def full_forward():
            with torch.no_grad():
                for ids, mask, _ in batches:
                    model(input_ids=ids, attention_mask=mask).logits

        def extraction_with(step):
            def run():
                extract._head_topk = step
                with tempfile.TemporaryDirectory() as store:
                    worker = Extractor(store, {ident: str(teacher)}, fmt=cb.FMT, batch_tokens=4096,
                                       head_chunk_rows=1024)
                    worker.models[ident] = (model, 0)
                    for u in units:
                        worker.run(u)
            return run

        new = extract._head_topk
        sides = {"trunk_head": trunk_head, "full_forward": full_forward,
                 "extraction_old": extraction_with(old_head_topk), "extraction_new": extraction_with(new)}
        try:
            t = timed(sides, args.repeats)
        finally:
            extract._head_topk = new
    tokens = sum(r.n_tokens for r in reqs)
    out = {"response_tokens": tokens}
    for kind in ("wall", "cpu"):
        best = {k: min(v) for k, v in t[kind].items()}
        out[kind] = {"tok_per_s": {k: round(tokens / v, 1) for k, v in best.items()},
                     **{f"{s}_over_trunk_head": round(best["trunk_head"] / best[f"extraction_{s}"], 3)
                        for s in ("old", "new")},
                     **{f"{s}_over_full_forward": round(best["full_forward"] / best[f"extraction_{s}"], 3)
                        for s in ("old", "new")},
                     "seconds": {k: [round(x, 2) for x in v] for k, v in t[kind].items()}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help="passes of each side (default 11; --extraction 7)")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--extraction", action="store_true")
    ap.add_argument("--hidden", type=int, default=256, help="--extraction: the bench teacher's hidden size")
    ap.add_argument("--sequences", type=int, default=192, help="--extraction: as cache_bench")
    args = ap.parse_args()
    args.repeats = args.repeats or (7 if args.extraction else 11)
    torch.set_num_threads(args.threads)
    result = extraction(args) if args.extraction else chunk(args)
    print(json.dumps({"config": vars(args), **result}, indent=1))


if __name__ == "__main__":
    main()
