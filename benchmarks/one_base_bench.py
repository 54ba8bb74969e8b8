"""One-base extraction: what loading a LoRA DPO teacher and its reference from one base saves.

    python benchmarks/one_base_bench.py              # the teacher below, 24 layers
    python benchmarks/one_base_bench.py --layers 8   # a shallower one: activations weigh more
    (--keep: leave the models and stores in the temporary folder, and print where)

Builds, in a temporary folder, a float32 Llama teacher (hidden 512, intermediate 1536, 24 layers,
vocabulary 32000: 114.6M parameters, 458 MB, so its weights outweigh what one forward holds at
the stage's default batch_tokens and head_chunk_rows; initializer_range 0.1, so its next-token
distributions are peaked enough for the ids check below to bite), saved as the "reference" (the
SFT teacher's model directory), and a DPO teacher that is a LoRA adapter over it (r 16 on every
linear layer, lora_B drawn at random so the adapter changes the outputs), published by the
product's `lora.publish` with `merge: true`: the adapter in `dpo/adapter`, the merged copy in
`dpo/model`. Then, each in a fresh process, extracts sequences for both teachers with
`cache.extract.extract` into a fresh local store (`teacher_logits`' defaults: top-K 50,
float16, batch_tokens 4096, head_chunk_rows 1024; one thread):

  (a) two models: `ModelRef` of the reference and of the merged DPO teacher, loaded separately;
  (b) one base:   `AdapterSide(adapter, True)` and `AdapterSide(adapter, False)` — what the
      `teacher_logits` stage uses when the DPO teacher is an adapter over its reference.

Each case runs twice: on one short sequence per teacher (what holding the teachers costs: the
forward is negligible, but it touches every weight — transformers maps float32 safetensors into
memory without copying them, so a weight counts in RSS, file-backed, once it is read) and on N
sequences of PROMPT + RESPONSE tokens per teacher. Prints the
process's RSS after its imports (the baseline), its peak (VmHWM of /proc/self/status), the peak
above the baseline and the wall time of `extract` (loading included); then `two_models_peak_mb X
one_base_peak_mb Y ratio Z` (the N-sequence peaks above the baseline), and checks that both
stores hold the same entries: lse within 1e-4, top-K ids equal wherever neighbouring log-probs
are more than 1e-2 apart (elsewhere the order is a near tie that float rounding may swap) — but
for the K-th id, whose rival, the (K+1)-th, is not stored, so a near tie there cannot be seen.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 24, "num_attention_heads": 8,
           "num_key_value_heads": 8, "vocab_size": 32_000, "tie_word_embeddings": False,
           "initializer_range": 0.1}
LORA = {"r": 16, "alpha": 32.0, "target_modules": "all-linear", "merge": True}
N, PROMPT, RESPONSE, TOP_K = 64, 32, 64, 50
MB = 1e6


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def sequences(n: int = N) -> list[tuple[list[int], list[int]]]:
    """n deterministic (prompt, response) id lists of PROMPT and RESPONSE tokens."""
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(10, TEACHER["vocab_size"], size=(n, PROMPT + RESPONSE)).tolist()
    return [(row[:PROMPT], row[PROMPT:]) for row in ids]


def build(root: Path) -> dict:
    """The reference, the DPO adapter over it and its merged copy; their identities."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill_pipeline import lora
    from distill_pipeline.config import LoraSpec, ModelSpec
    from distill_pipeline.models import (
        ModelRef,
        adapter_over,
        load_tokenizer,
        save_model,
        teacher_identity,
    )

    tok = load_tokenizer(ModelSpec(preset="tiny-teacher"))  # the shipped tokenizer: its pad id
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TEACHER))
    params = sum(p.numel() for p in model.parameters())
    save_model(model, tok, root / "reference")
    spec = LoraSpec(**LORA)
    policy = lora.wrap(model, spec)
    for name, p in policy.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (the adapter = the base): a trained one is not
            torch.nn.init.normal_(p, std=0.05)
    adapter_params = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    lora.publish(policy, tok, root / "dpo", spec, str((root / "reference").resolve()))
    adapter, merged, reference = root / "dpo" / "adapter", root / "dpo" / "model", root / "reference"
    assert adapter_over(ModelRef(str(adapter)), ModelRef(str(reference))), "the adapter's base is not the reference"
    return {"reference": str(reference), "adapter": str(adapter), "merged": str(merged),
            "dpo_id": teacher_identity(adapter), "ref_id": teacher_identity(reference),
            "params": params, "adapter_params": adapter_params}


def child(case: str, n: int, info: dict, store_dir: str) -> None:
    # everything extraction imports, before the baseline: the difference is the models' part
    import peft  # noqa: F401
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    sys.path.insert(0, str(ROOT))
    from distill_pipeline.cache.extract import extract, make_request
    from distill_pipeline.cache.store import Store
    from distill_pipeline.config import TeacherLogits
    from distill_pipeline.models import AdapterSide, ModelRef

    defaults = TeacherLogits(top_k=TOP_K)  # the stage's settings: format, batch and chunk sizes
    fmt = defaults.format
    seqs = sequences(n)
    reqs = [make_request(info[t], p, r, fmt) for t in ("dpo_id", "ref_id") for p, r in seqs]
    if case == "two":
        teachers = {info["dpo_id"]: ModelRef(info["merged"]), info["ref_id"]: ModelRef(info["reference"])}
    else:
        teachers = {info["dpo_id"]: AdapterSide(info["adapter"], True),
                    info["ref_id"]: AdapterSide(info["adapter"], False)}
    torch.set_num_threads(1)
    base = proc_status()
    t0 = time.perf_counter()
    stats = extract(reqs, Store(store_dir), teachers, fmt, batch_tokens=defaults.batch_tokens,
                    head_chunk_rows=defaults.head_chunk_rows, unit_tokens=defaults.unit_tokens)
    wall = time.perf_counter() - t0
    end = proc_status()  # the extractor (and its models) is gone by now: only the peak tells
    print(json.dumps({"baseline_rss": base["VmRSS"], "baseline_hwm": base["VmHWM"], "peak": end["VmHWM"],
                      "wall_s": wall, "entries": stats["extracted"], "tokens": stats["tokens_extracted"]}))


def compare(one: Path, two: Path, keys: dict[str, list[str]]) -> dict:
    """Entries of the one-base store against the two-model store, per teacher (`keys`: teacher →
    its entries' keys): the largest lse and log-prob differences, and how many top-K ids were
    compared (those not in a near tie) and how many of those differ."""
    import numpy as np

    from distill_pipeline.cache.reader import CacheReader

    a, b = CacheReader(one), CacheReader(two)
    out = {}
    for teacher, ks in keys.items():
        lse, logp, checked, differ, slots = 0.0, 0.0, 0, 0, 0
        for key in ks:
            x, y = a.get(key), b.get(key)
            lse = max(lse, float(np.abs(x["lse"] - y["lse"]).max()))
            logp = max(logp, float(np.abs(x["logp"].astype(np.float32) - y["logp"].astype(np.float32)).max()))
            gaps = np.abs(np.diff(y["logp"].astype(np.float32), axis=1)) > 1e-2  # not a near tie
            # the K-th id's rival is the (K+1)-th, which is not stored: a tie there is invisible
            clear = np.concatenate([gaps[:, :1], gaps[:, 1:] & gaps[:, :-1], np.zeros_like(gaps[:, -1:])], axis=1)
            checked += int(clear.sum())
            differ += int((x["ids"][clear] != y["ids"][clear]).sum())
            slots += clear.size
        out[teacher] = {"entries": len(ks), "lse_max_abs_diff": lse, "logp_max_abs_diff": logp,
                        "ids_compared": checked, "ids_differ": differ, "id_slots": slots}
    return out


def main() -> None:
    if "--layers" in sys.argv:
        TEACHER["num_hidden_layers"] = int(sys.argv[sys.argv.index("--layers") + 1])
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), json.loads(Path(sys.argv[4]).read_text()), sys.argv[5])
        return
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from distill_pipeline.cache.extract import make_request
    from distill_pipeline.cache.reader import CacheReader
    from distill_pipeline.config import TeacherLogits

    root = Path(tempfile.mkdtemp(prefix="one-base-bench-"))
    info = build(root)
    (root / "info.json").write_text(json.dumps(info))
    print(f"teacher: Llama {TEACHER}, {info['params'] / 1e6:.1f}M parameters, float32 "
          f"({info['params'] * 4 / MB:.0f} MB of weights per copy); DPO adapter r {LORA['r']} "
          f"all-linear: {info['adapter_params'] / 1e6:.2f}M parameters ({info['adapter_params'] * 4 / MB:.1f} MB)")
    print(f"extraction: {N} sequences x ({PROMPT} prompt + {RESPONSE} response) tokens, 2 teachers, top-K {TOP_K}")
    results = {}
    for n, what in ((1, "load"), (N, "extract")):
        for case in ("two", "one"):
            store = root / f"store-{case}-{what}"
            out = subprocess.run([sys.executable, __file__, "--child", case, str(n), str(root / "info.json"),
                                  str(store)], capture_output=True, text=True, check=True)
            r = results[case, what] = json.loads(out.stdout.strip().splitlines()[-1])
            label = ("two models (merged DPO + reference)" if case == "two"
                     else "one base (AdapterSide on/off)   ")
            print(f"{label}, {n:>2} sequence(s) per teacher: baseline RSS {r['baseline_rss'] / MB:.0f} MB, "
                  f"peak {r['peak'] / MB:.0f} MB, above the baseline {(r['peak'] - r['baseline_rss']) / MB:.0f} MB, "
                  f"{r['wall_s']:.1f} s ({r['entries']} entries, {r['tokens']} tokens)", flush=True)
    above = {k: (r["peak"] - r["baseline_rss"]) / MB for k, r in results.items()}
    print(f"the models alone (1 sequence per teacher): two models {above['two', 'load']:.0f} MB, one base "
          f"{above['one', 'load']:.0f} MB, ratio {above['one', 'load'] / above['two', 'load']:.2f}")
    two, one = above["two", "extract"], above["one", "extract"]
    print(f"two_models_peak_mb {two:.0f} one_base_peak_mb {one:.0f} ratio {one / two:.2f}")
    fmt = TeacherLogits(top_k=TOP_K).format
    keys = {t: [make_request(info[t + "_id"], p, r, fmt).key for p, r in sequences()] for t in ("dpo", "ref")}
    agree = compare(root / "store-one-extract", root / "store-two-extract", keys)
    print("one base vs two models:", json.dumps(agree))
    ok = all(v["lse_max_abs_diff"] <= 1e-4 and v["ids_differ"] == 0 for v in agree.values())
    print("stores agree" if ok else "STORES DIFFER (lse beyond 1e-4 or top-K ids outside near ties)")
    reader = CacheReader(root / "store-one-extract")  # the teachers must differ, or the check proves little
    pairs = [(reader.get(d), reader.get(r)) for d, r in zip(keys["dpo"], keys["ref"])]
    gap = np.mean([np.abs(d["lse"] - r["lse"]).mean() for d, r in pairs])
    top1 = np.mean(np.concatenate([d["ids"][:, 0] != r["ids"][:, 0] for d, r in pairs]))
    print(f"DPO teacher vs reference: mean |lse difference| {gap:.3f}, top-1 id differs at {top1:.0%} of positions")
    if "--keep" in sys.argv:
        print(f"(files under {root})")
    else:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
