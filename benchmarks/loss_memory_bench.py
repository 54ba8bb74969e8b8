"""Peak memory of a cache loss's forward + backward at a 128k vocabulary: the full float32
log-softmax path (before issue 9 item 4) vs `losses.gather_logp`, at two chunk sizes, and against
the batch size.

    python benchmarks/loss_memory_bench.py                          # DCKD, ADPA, TVKD; V = 128,256
    python benchmarks/loss_memory_bench.py --losses dckd --batches 1,2 --dtype float32

Each setting runs in a fresh process (peak RSS, `ru_maxrss`, Linux), reported as the peak above
the process's resident memory once the inputs are built. The logits are computed inside the
measurement by a small head (hidden 16 → V, in `--dtype`) so that, as in training, autograd
decides what stays alive; the head's own parameters and gradients are a few MB. "full" is the
old implementation (a log-softmax over the whole vocabulary, in float32, gathered at the ids),
kept here and patched into `losses` for the run. Same inputs everywhere; the loss and the head's
gradients are compared with the first setting's (`loss_diff`, `grad_rel_diff`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, TOP_K = 16, 50


def full_gather_logp(logits, index, chunk_rows=None):
    """The old path: log_softmax over all V in float32 (float64 stays), then the ids."""
    import torch

    x = logits if logits.dtype == torch.float64 else logits.float()
    return torch.log_softmax(x, dim=-1).gather(-1, index.long())


def child(loss: str, dtype: str, batch: int, length: int, vocab: int, chunk: str, out: str) -> None:
    import resource

    import torch

    sys.path.insert(0, str(ROOT))
    from distill_pipeline import losses as L

    torch.set_num_threads(1)
    dt = getattr(torch, dtype)
    spec = L.LOSSES[loss]
    if chunk == "full":
        L.gather_logp = full_gather_logp
    else:
        L.CHUNK_ROWS = int(chunk)
    g = torch.Generator().manual_seed(0)
    head = (torch.randn(HIDDEN, vocab, generator=g) / HIDDEN ** 0.5).to(dt).requires_grad_(True)
    hidden, named = {}, {}
    for name in spec.inputs:
        role, base, s = L._parse_input(name)
        if base == "logits":
            hidden[s] = (3 * torch.randn(batch, length, HIDDEN, generator=g)).to(dt).requires_grad_(True)
        elif base == "labels":
            named[name] = torch.randint(0, vocab, (batch, length), generator=g)
        elif base == "ids":
            named[name] = torch.randint(0, vocab, (batch, length, TOP_K), generator=g)
        elif base == "logp":
            lp = torch.log_softmax(torch.randn(batch, length, TOP_K + 1, generator=g), -1)[..., :TOP_K]
            named[name] = lp.sort(-1, descending=True).values
    page_kb = os.sysconf("SC_PAGE_SIZE") // 1024
    base = int(Path("/proc/self/statm").read_text().split()[1]) * page_kb  # resident now, kB
    for s, h in hidden.items():
        named[f"logits_{s}"] = h @ head  # (B, T, V) in dtype, as an LM head gives them
    value, _ = spec.fn(*(named[n] for n in spec.inputs))
    named.clear()  # the caller lets go of the logits; autograd keeps what it saved
    value.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save({"loss": value.detach().double(), "head": head.grad.double(),
                **{f"hidden_{s}": h.grad.double() for s, h in hidden.items()}}, out)
    print(json.dumps({"extra_MB": round((peak - base) / 1024, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=128_256)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="batch of the per-loss table")
    ap.add_argument("--losses", default="dckd,adpa,tvkd")
    ap.add_argument("--chunks", default="full,1024,256", help="'full' = the old path")
    ap.add_argument("--batches", default="1,2,4", help="batch sizes of the batch sweep (first loss)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        loss, dtype, b, t, v, chunk, out = args.child
        child(loss, dtype, int(b), int(t), int(v), chunk, out)
        return
    import tempfile

    import torch

    chunks = args.chunks.split(",")
    itemsize = 2 if args.dtype == "bfloat16" else 4

    def measure(loss, batch, d):
        row, first = {}, None
        for chunk in chunks:
            out = str(Path(d) / f"{loss}-{batch}-{chunk}.pt")
            run = subprocess.run([sys.executable, __file__, "--child", loss, args.dtype, str(batch),
                                  str(args.length), str(args.vocab), chunk, out],
                                 capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(f"{loss} batch {batch} chunk {chunk}:\n{run.stderr[-2000:]}")
            r = json.loads(run.stdout.strip().splitlines()[-1])
            res = torch.load(out)
            first = first or res
            r["loss_diff"] = float((res["loss"] - first["loss"]).abs())
            r["grad_rel_diff"] = max(float((res[k] - first[k]).abs().max() / first[k].abs().max())
                                     for k in res if k != "loss")
            row[chunk] = r
            print(f"  {loss} batch {batch} {chunk}: {r}", file=sys.stderr, flush=True)
        return row

    with tempfile.TemporaryDirectory(prefix="lossmem-") as d:
        losses = args.losses.split(",")
        table = {loss: measure(loss, args.batch, d) for loss in losses}
        sweep = {b: (table[losses[0]] if b == args.batch else measure(losses[0], b, d))
                 for b in map(int, args.batches.split(","))}
    btv = lambda b: b * args.length * args.vocab * itemsize / 2 ** 20  # noqa: E731
    print(json.dumps({"vocab": args.vocab, "length": args.length, "dtype": args.dtype,
                      "one_BxTxV_MB": {b: round(btv(b), 1) for b in sweep},
                      "by_loss": {"batch": args.batch, **table},
                      "by_batch": {"loss": losses[0], **sweep}}, indent=2))


if __name__ == "__main__":
    main()
