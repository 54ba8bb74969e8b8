"""Train-step speed, measured side by side in one run on the same student and batches:

- SFT step: NLL on the chosen and rejected sequences (the tokens a DCKD step processes);
- cached DCKD step: teacher tensors streamed from the teacher-logit cache (prefetch thread on,
  as in training) + the DCKD loss;
- online DCKD step: the teacher computed live (forward + top-K) for the same loss.

Reports median step times and the ratios cached/SFT (target ≤ 1.05) and online/cached (the
speed-up the cache buys). Writes benchmarks/out/train_speed.json.

    python benchmarks/train_speed.py
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
from cache_bench import bench_teacher, random_sequences  # noqa: E402

from distill_pipeline.batches import Batches, Field, TeacherSource  # noqa: E402
from distill_pipeline.cache.extract import extract, make_request  # noqa: E402
from distill_pipeline.cache.format import CacheFormat  # noqa: E402
from distill_pipeline.cache.reader import CacheReader  # noqa: E402
from distill_pipeline.cache.store import Store  # noqa: E402
from distill_pipeline.losses import dckd_loss, sft_nll  # noqa: E402
from distill_pipeline.models import load_checkpoint, teacher_identity  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out/train_speed.json")
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--teacher-hidden", type=int, default=512)
    ap.add_argument("--student-hidden", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as d:
        tdir = bench_teacher(Path(d) / "teacher", args.vocab, args.teacher_hidden, 4)
        teacher, _ = load_checkpoint(tdir)
        torch.manual_seed(0)
        student = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.student_hidden,
                                               intermediate_size=args.student_hidden * 3, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=2,
                                               tie_word_embeddings=False))
        n_t = sum(p.numel() for p in teacher.parameters())
        n_s = sum(p.numel() for p in student.parameters())
        n = args.steps * args.batch
        chosen = random_sequences(n, args.vocab, seed=11)
        rejected = [(p, r2) for (p, _), (_, r2) in zip(chosen, random_sequences(n, args.vocab, seed=12))]
        ident = teacher_identity(tdir)
        fmt = CacheFormat(50, "float16")
        reqs = [make_request(ident, p, r, fmt) for p, r in chosen + rejected]
        extract(reqs, Store(Path(d) / "store"), {ident: str(tdir)}, fmt)
        # keys are computed by Batches from each example's own tokens (prompt + response)
        examples = [{"prompt_ids": p, "chosen_ids": rc, "rejected_ids": rr}
                    for (p, rc), (_, rr) in zip(chosen, rejected)]
        stream = Batches(examples, [Field("chosen", "w", ("teacher",)), Field("rejected", "l", ("teacher",))],
                         batch_size=args.batch, pad_id=0,
                         cache=TeacherSource(CacheReader(Path(d) / "store"), fmt, {"teacher": ident}))
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5)

        def step(loss):
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def fwd(b, f):  # f: batch suffix, "w" (chosen) or "l" (rejected)
            ids, mask, labels = b[f]["student"]
            return student(input_ids=ids, attention_mask=mask).logits[:, :-1], labels[:, 1:]

        times = {"sft": [], "cached_dckd": [], "online_dckd": []}
        for epoch in range(3):  # interleave: every kind sees the same machine conditions
            it = stream.epoch(epoch)
            batches = []
            t_cached = []
            t0 = time.perf_counter()
            for b in it:  # cached: the reader (prefetching) is part of the measured loop
                lw, yw = fwd(b, "w")
                ll, yl = fwd(b, "l")
                step(dckd_loss(lw, yw, b["w"]["teacher"]["ids"], b["w"]["teacher"]["logp"],
                               ll, yl, b["l"]["teacher"]["ids"], b["l"]["teacher"]["logp"])[0])
                t1 = time.perf_counter()
                t_cached.append(t1 - t0)
                t0 = t1
                batches.append(b)
            times["cached_dckd"] += t_cached
            for b in batches:
                t0 = time.perf_counter()
                lw, yw = fwd(b, "w")
                ll, yl = fwd(b, "l")
                step(sft_nll(lw, yw) + sft_nll(ll, yl))
                times["sft"].append(time.perf_counter() - t0)
            for b in batches:
                t0 = time.perf_counter()
                tops = {}
                with torch.no_grad():
                    for f in ("w", "l"):
                        ids, mask, _ = b[f]["student"]
                        lp = torch.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
                        tops[f] = lp.topk(50, -1)
                lw, yw = fwd(b, "w")
                ll, yl = fwd(b, "l")
                step(dckd_loss(lw, yw, tops["w"].indices, tops["w"].values,
                               ll, yl, tops["l"].indices, tops["l"].values)[0])
                times["online_dckd"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"config": vars(args), "teacher_params": n_t, "student_params": n_s,
              "teacher_over_student_params": round(n_t / n_s, 2),
              "median_step_s": {k: round(v, 4) for k, v in med.items()},
              "cached_over_sft": round(med["cached_dckd"] / med["sft"], 3),
              "online_over_cached": round(med["online_dckd"] / med["cached_dckd"], 3),
              "steps_measured": len(times["sft"])}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
