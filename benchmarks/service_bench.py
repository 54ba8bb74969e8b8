"""The cache service over loopback, side by side with the local store it serves:

- pull: every segment copied (and verified on arrival) from `grpc://` into an empty local store,
  vs the same copy from the local store itself — MB/s and entries/s;
- key lookups: `missing()` of every key through the service vs on the local store;
- training: DCKD steps streaming teacher tensors through a fresh mirror of the service (segments
  fetched on first use, prefetch thread on) ÷ the same steps on the local store (target ≤ 1.10).

    python benchmarks/service_bench.py                 # 512 pairs, vocab 32k, K = 50
    python benchmarks/service_bench.py --pairs 64      # quick

The service is `distill-pipeline cache serve` started as a subprocess on 127.0.0.1 (stopped by
its PID). Writes benchmarks/out/service_bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--unit-tokens", type=int, default=4096)
    ap.add_argument("--out", default="benchmarks/out/service_bench.json")
    args = ap.parse_args()
    import torch
    from cache_bench import bench_teacher, random_sequences
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill_pipeline.batches import Batches, Field, TeacherSource
    from distill_pipeline.cache.extract import extract, make_request
    from distill_pipeline.cache.format import CacheFormat
    from distill_pipeline.cache.reader import CacheReader
    from distill_pipeline.cache.remote import open_store
    from distill_pipeline.cache.transfer import copy_segments
    from distill_pipeline.cache.store import Store
    from distill_pipeline.losses import dckd_loss
    from distill_pipeline.models import teacher_identity

    torch.set_num_threads(1)
    result: dict = {"config": vars(args)}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        os.environ["DISTILL_MIRROR_DIR"] = str(d / "mirror")
        os.environ.setdefault("DISTILL_PROGRESS", "0")
        tdir = bench_teacher(d / "teacher", args.vocab, 256, 4)
        ident, fmt = teacher_identity(tdir), CacheFormat(50, "float16")
        chosen = random_sequences(args.pairs, args.vocab, seed=11)
        rejected = [(p, r) for (p, _), (_, r) in zip(chosen, random_sequences(args.pairs, args.vocab, seed=12))]
        reqs = [make_request(ident, p, r, fmt) for p, r in chosen + rejected]
        extract(reqs, Store(d / "served"), {ident: str(tdir)}, fmt, unit_tokens=args.unit_tokens)
        keys = [r.key for r in reqs]
        server = subprocess.Popen([sys.executable, "-m", "distill_pipeline.cli.main", "cache", "serve",
                                   "--store", str(d / "served"), "--port", "0"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            url = re.search(r"(grpc://\S+)", server.stdout.readline()).group(1)
            local = Store(d / "served", create=False)
            remote = open_store(url)
            # ---------------------------------------------------------------- pull vs local copy
            t = time.perf_counter()
            local_copy = copy_segments(local, Store(d / "copy-local"))
            t_local = time.perf_counter() - t
            t = time.perf_counter()
            pulled = copy_segments(remote, Store(d / "copy-pulled"))
            t_pull = time.perf_counter() - t
            mb, entries = pulled["bytes"] / 1e6, pulled["entries"]
            result["pull"] = {"segments": pulled["segments"], "MB": round(mb, 2), "entries": entries,
                              "grpc_MB_per_s": round(mb / t_pull, 1), "grpc_entries_per_s": round(entries / t_pull),
                              "local_MB_per_s": round(local_copy["bytes"] / 1e6 / t_local, 1),
                              "grpc_over_local_time": round(t_pull / t_local, 3)}
            # ---------------------------------------------------------------- key lookups
            t = time.perf_counter()
            assert local.missing(keys) == set()
            t_lk_local = time.perf_counter() - t
            t = time.perf_counter()
            assert remote.missing(keys) == set()
            t_lk_remote = time.perf_counter() - t
            result["missing_all_keys_s"] = {"local": round(t_lk_local, 4), "grpc": round(t_lk_remote, 4)}
            # ---------------------------------------------------------------- training steps
            torch.manual_seed(0)
            student = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=128,
                                                   intermediate_size=384, num_hidden_layers=2,
                                                   num_attention_heads=2, num_key_value_heads=2,
                                                   tie_word_embeddings=False))
            opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
            examples = [{"prompt_ids": p, "chosen_ids": rc, "rejected_ids": rr}
                        for (p, rc), (_, rr) in zip(chosen, rejected)]
            fields = [Field("chosen", "w", ("teacher",)), Field("rejected", "l", ("teacher",))]

            def epoch_times(store) -> list[float]:
                stream = Batches(examples, fields, batch_size=args.batch, pad_id=0,
                                 cache=TeacherSource(CacheReader(store), fmt, {"teacher": ident}))
                times, t0 = [], time.perf_counter()
                for b in stream.epoch(0):
                    out = []
                    for f in ("w", "l"):
                        ids, mask, labels = b[f]["student"]
                        out += [student(input_ids=ids, attention_mask=mask).logits[:, :-1], labels[:, 1:],
                                b[f]["teacher"]["ids"], b[f]["teacher"]["logp"]]
                    dckd_loss(*out)[0].backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    t1 = time.perf_counter()
                    times.append(t1 - t0)
                    t0 = t1
                return times

            runs = {"local": [], "grpc_fresh_mirror": []}
            for rep in range(2):  # interleaved; every grpc epoch starts from an empty mirror
                runs["local"].append(epoch_times(local))
                os.environ["DISTILL_MIRROR_DIR"] = str(d / f"mirror-{rep}")
                runs["grpc_fresh_mirror"].append(epoch_times(open_store(url)))
            total = {k: statistics.median(sum(e) for e in v) for k, v in runs.items()}
            step = {k: statistics.median(s for e in v for s in e) for k, v in runs.items()}
            result["train"] = {"steps_per_epoch": len(runs["local"][0]),
                               "epoch_s": {k: round(v, 3) for k, v in total.items()},
                               "median_step_s": {k: round(v, 4) for k, v in step.items()},
                               "grpc_over_local_epoch": round(total["grpc_fresh_mirror"] / total["local"], 3),
                               "grpc_over_local_median_step": round(step["grpc_fresh_mirror"] / step["local"], 3)}
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
