"""Train-step speed, measured side by side in one run on the same student and batches:

- SFT step: NLL on the chosen and rejected sequences (the tokens a DCKD step processes);
- cached DCKD step: teacher tensors streamed from the teacher-logit cache (prefetch thread on,
  as in training) + the DCKD loss;
- online DCKD step: the teacher computed live for the same loss, computing what the cache
  stores and nothing more — the trunk over every position, then the LM head, log-softmax and
  top-K on the response positions only (those the cache holds an entry row for), scattered into
  the same (B, T-1, K) tensors the cached step gets.

Reports median step times and the ratios cached/SFT (target ≤ 1.05) and online/cached (the
speed-up the cache buys). Writes benchmarks/out/train_speed.json. `cached_dckd_throughput` is
the cached DCKD step alone, for other benchmarks (id_coding_bench.py) to measure in their own run.

    python benchmarks/train_speed.py
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cache_bench import bench_teacher, random_sequences  # noqa: E402

from distill_pipeline.batches import Batches, Field, TeacherSource  # noqa: E402
from distill_pipeline.cache.extract import extract, make_request  # noqa: E402
from distill_pipeline.cache.format import CacheFormat  # noqa: E402
from distill_pipeline.cache.reader import CacheReader  # noqa: E402
from distill_pipeline.cache.store import Store  # noqa: E402
from distill_pipeline.losses import IGNORE, dckd_loss, sft_nll  # noqa: E402
from distill_pipeline.models import load_checkpoint, teacher_identity  # noqa: E402

TOP_K = 50


@contextmanager
def setup(vocab: int = 32_000, teacher_hidden: int = 512, student_hidden: int = 128, steps: int = 8,
          batch: int = 8):
    """The bench's teacher (4 layers), student (2 layers), a store holding the teacher's top-K
    for `steps × batch` random pairs, the cached batch stream over them, and the optimizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as d:
        tdir = bench_teacher(Path(d) / "teacher", vocab, teacher_hidden, 4)
        teacher, _ = load_checkpoint(tdir)
        teacher.eval()
        torch.manual_seed(0)
        student = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=student_hidden,
                                               intermediate_size=student_hidden * 3, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=2,
                                               tie_word_embeddings=False))
        n = steps * batch
        chosen = random_sequences(n, vocab, seed=11)
        rejected = [(p, r2) for (p, _), (_, r2) in zip(chosen, random_sequences(n, vocab, seed=12))]
        ident = teacher_identity(tdir)
        fmt = CacheFormat(TOP_K, "float16")
        reqs = [make_request(ident, p, r, fmt) for p, r in chosen + rejected]
        extract(reqs, Store(Path(d) / "store"), {ident: str(tdir)}, fmt)
        # keys are computed by Batches from each example's own tokens (prompt + response)
        examples = [{"prompt_ids": p, "chosen_ids": rc, "rejected_ids": rr}
                    for (p, rc), (_, rr) in zip(chosen, rejected)]
        stream = Batches(examples, [Field("chosen", "w", ("teacher",)), Field("rejected", "l", ("teacher",))],
                         batch_size=batch, pad_id=0,
                         cache=TeacherSource(CacheReader(Path(d) / "store"), fmt, {"teacher": ident}))
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
        yield {"teacher": teacher, "student": student, "stream": stream, "opt": opt}


class Steps:
    """The three kinds of step on one student and optimizer."""

    def __init__(self, teacher, student, opt, **_):
        self.teacher, self.student, self.opt = teacher, student, opt
        self.head = teacher.get_output_embeddings()

    def _step(self, loss):
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def _fwd(self, b, f):  # f: batch suffix, "w" (chosen) or "l" (rejected)
        ids, mask, labels = b[f]["student"]
        return self.student(input_ids=ids, attention_mask=mask).logits[:, :-1], labels[:, 1:]

    def cached(self, b):
        lw, yw = self._fwd(b, "w")
        ll, yl = self._fwd(b, "l")
        self._step(dckd_loss(lw, yw, b["w"]["teacher"]["ids"], b["w"]["teacher"]["logp"],
                             ll, yl, b["l"]["teacher"]["ids"], b["l"]["teacher"]["logp"])[0])

    def sft(self, b):
        lw, yw = self._fwd(b, "w")
        ll, yl = self._fwd(b, "l")
        self._step(sft_nll(lw, yw) + sft_nll(ll, yl))

    def online_teacher(self, ids, mask, labels):
        """What the cache stores, computed live: (B, T-1, K) ids and log-probs at the positions
        predicting response tokens, zeros elsewhere (as `reader.aligned_teacher_tensors`)."""
        pos = labels[:, 1:] != IGNORE  # (B, T-1): the positions the cache holds rows for
        hidden = self.teacher.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        top = torch.log_softmax(self.head(hidden[:, :-1][pos]).float(), -1).topk(TOP_K, -1)  # (N, K)
        t_ids = torch.zeros((*pos.shape, TOP_K), dtype=torch.long)
        t_logp = torch.zeros((*pos.shape, TOP_K), dtype=torch.float32)
        t_ids[pos], t_logp[pos] = top.indices, top.values
        return t_ids, t_logp

    def online(self, b):
        with torch.no_grad():
            tw, tl = (self.online_teacher(*b[f]["student"]) for f in ("w", "l"))
        lw, yw = self._fwd(b, "w")
        ll, yl = self._fwd(b, "l")
        self._step(dckd_loss(lw, yw, *tw, ll, yl, *tl)[0])


def teacher_rows(b) -> int:
    """Response tokens of a DCKD batch, chosen + rejected: the cache rows one step reads."""
    return sum(int((b[f]["student"][2][:, 1:] != IGNORE).sum()) for f in ("w", "l"))


def cached_dckd_throughput(*, epochs: int = 1, **kw) -> dict:
    """The cached DCKD step alone (reader prefetching, as `main` measures it): median step time
    and the teacher rows (response tokens) it consumes per second, over `epochs` epochs."""
    with setup(**kw) as s:
        steps = Steps(**s)
        times, rows = [], []
        for epoch in range(epochs):
            t0 = time.perf_counter()
            for b in s["stream"].epoch(epoch):
                steps.cached(b)
                t1 = time.perf_counter()
                times.append(t1 - t0)
                rows.append(teacher_rows(b))
                t0 = t1
    med = statistics.median(times)
    return {"config": {"epochs": epochs, **kw}, "steps": len(times), "median_step_s": round(med, 4),
            "teacher_rows_per_step": round(statistics.fmean(rows), 1),
            "teacher_rows_per_s": round(statistics.fmean(rows) / med, 1),
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out/train_speed.json")
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--teacher-hidden", type=int, default=512)
    ap.add_argument("--student-hidden", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    with setup(args.vocab, args.teacher_hidden, args.student_hidden, args.steps, args.batch) as s:
        n_t = sum(p.numel() for p in s["teacher"].parameters())
        n_s = sum(p.numel() for p in s["student"].parameters())
        steps = Steps(**s)
        times = {"sft": [], "cached_dckd": [], "online_dckd": []}
        rows = []
        for epoch in range(args.epochs):  # interleave: every kind sees the same machine conditions
            batches = []
            t0 = time.perf_counter()
            for b in s["stream"].epoch(epoch):  # cached: the reader (prefetching) is part of the measured loop
                steps.cached(b)
                t1 = time.perf_counter()
                times["cached_dckd"].append(t1 - t0)
                t0 = t1
                batches.append(b)
                rows.append(teacher_rows(b))
            for kind, fn in (("sft", steps.sft), ("online_dckd", steps.online)):
                for b in batches:
                    t0 = time.perf_counter()
                    fn(b)
                    times[kind].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"config": vars(args), "teacher_params": n_t, "student_params": n_s,
              "teacher_over_student_params": round(n_t / n_s, 2),
              "torch_threads": torch.get_num_threads(),
              "teacher_rows_per_step": round(statistics.fmean(rows), 1),
              "median_step_s": {k: round(v, 4) for k, v in med.items()},
              "cached_over_sft": round(med["cached_dckd"] / med["sft"], 3),
              "online_over_cached": round(med["online_dckd"] / med["cached_dckd"], 3),
              "steps_measured": len(times["sft"])}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
