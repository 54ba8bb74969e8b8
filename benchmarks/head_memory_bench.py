"""Peak memory of the extraction head at a 128k vocabulary: the whole batch's (rows x V)
float32 logits at once vs `teacher_logits.head_chunk_rows` rows at a time.

    python benchmarks/head_memory_bench.py                       # V = 128,256, 4096 response tokens
    python benchmarks/head_memory_bench.py --vocab 32000 --tokens 1024

Each setting runs in a fresh process (peak RSS, `ru_maxrss`); reported as the peak above the
process's RSS once the teacher is loaded and the requests are built, so it is the extraction's
own working memory. Same requests and teacher everywhere; the outputs are compared too.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(teacher: str, tokens: int, chunk: int | None, out: str) -> None:
    import resource

    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cache_bench import random_sequences

    from distill_pipeline.cache.extract import make_request, topk_for_batch
    from distill_pipeline.cache.format import CacheFormat
    from distill_pipeline.models import load_checkpoint

    torch.set_num_threads(1)
    model, _ = load_checkpoint(Path(teacher))
    model.eval()
    vocab = model.config.vocab_size
    seqs, n = [], 0
    for p, r in random_sequences(10_000, vocab, seed=3):
        if n >= tokens:
            break
        seqs.append((p, r))
        n += len(r)
    reqs = [make_request("t" * 64, p, r, CacheFormat(50, "float16")) for p, r in seqs]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = topk_for_batch(model, reqs, 0, 50, chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.savez(out, ids=np.concatenate([r["ids"] for r in res]), lse=np.concatenate([r["lse"] for r in res]))
    print(json.dumps({"rows": n, "extra_MB": round((peak - base) / 1024, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunks", default="none,1024,256")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        teacher, tokens, chunk, out = args.child
        child(teacher, int(tokens), None if chunk == "none" else int(chunk), out)
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import numpy as np
    from cache_bench import bench_teacher

    with tempfile.TemporaryDirectory() as d:
        teacher = bench_teacher(Path(d) / "teacher", args.vocab, 256, 2)
        results, arrays = {}, {}
        for chunk in args.chunks.split(","):
            out = str(Path(d) / f"{chunk}.npz")
            run = subprocess.run([sys.executable, __file__, "--child", str(teacher), str(args.tokens), chunk, out],
                                 capture_output=True, text=True, check=True)
            results[chunk] = json.loads(run.stdout.strip().splitlines()[-1])
            arrays[chunk] = np.load(out)
        first = arrays[args.chunks.split(",")[0]]
        for chunk, a in arrays.items():
            results[chunk]["same_ids"] = bool(np.array_equal(a["ids"], first["ids"]))
            results[chunk]["max_lse_diff"] = float(np.abs(a["lse"] - first["lse"]).max())
    print(json.dumps({"vocab": args.vocab, "response_tokens": args.tokens,
                      "by_head_chunk_rows": results}, indent=2))


if __name__ == "__main__":
    main()
