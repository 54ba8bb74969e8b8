"""How long a teacher's content identity takes on a large directory: the first hash (every weight
byte read), the next call (memo re-validated: a stat per file) and a new process (memo file).

    python benchmarks/identity_bench.py              # 4 shards x 512 MB of random bytes
    python benchmarks/identity_bench.py --shard-mb 64 --shards 2

The shards are random bytes named like safetensors shards (the identity hashes bytes, it does
not parse them); they are written just before the first hash, so they are in the page cache —
a cold read is bound by the disk instead.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--shard-mb", type=int, default=512)
    args = ap.parse_args()
    from distill_pipeline.identity import content_identity, forget
    from distill_pipeline.models import load_model, load_tokenizer, save_model
    from distill_pipeline.config import ModelSpec

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "model"
        spec = ModelSpec(preset="tiny-student")
        save_model(load_model(spec), load_tokenizer(spec), d)
        (d / ".distill-identity.json").unlink()
        (d / "model.safetensors").unlink()
        for i in range(args.shards):
            with open(d / f"model-{i + 1:05d}-of-{args.shards:05d}.safetensors", "wb") as f:
                for _ in range(args.shard_mb // 8):
                    f.write(os.urandom(8 << 20))
        time.sleep(0.1)  # older than the memo's racy-clean window
        total = sum(f.stat().st_size for f in d.iterdir())
        forget()
        t = time.perf_counter()
        first = content_identity(d)
        t_first = time.perf_counter() - t
        t = time.perf_counter()
        assert content_identity(d) == first
        t_second = time.perf_counter() - t
        code = ("import sys, time; from distill_pipeline.identity import content_identity as c; "
                "t = time.perf_counter(); i = c(sys.argv[1]); "
                "print(i, (time.perf_counter() - t) * 1000)")
        out = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True,
                             check=True).stdout.split()
        assert out[0] == first
        print(f"{total / 1e9:.2f} GB in {args.shards} shard(s): first hash {t_first:.2f} s "
              f"({total / 1e9 / t_first:.2f} GB/s), next call {t_second * 1000:.2f} ms, "
              f"new process (memo file) {float(out[1]):.2f} ms")


if __name__ == "__main__":
    main()
