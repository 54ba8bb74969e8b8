"""Teacher-logit cache benchmarks — ratios measured side by side in one run (absolute timings on a
shared 2-core machine are noisy). Writes JSON (default benchmarks/out/cache_bench.json):

1. extraction throughput vs what extraction must compute, on the same batches: the teacher's trunk
   over every position and its LM head on the response positions only (as extract.py does it),
   without top-K, encoding or publishing; and, labelled, vs a full forward (head at every position);
2. bytes per token on disk at K=50: a trained tiny model (pass --trained-store, e.g. the
   quickstart's cache) and a synthetic Zipf-shaped distribution over a 128k vocabulary;
3. reader throughput vs what a training step consumes (DCKD batches, tiny student);
4. the 80%-overlap rerun time against the first run.

    python benchmarks/cache_bench.py [--trained-store ~/.cache/distill-pipeline/teacher-logits]
    python benchmarks/cache_bench.py --throughput-only --profile   # item 1 alone, split by part
    python benchmarks/cache_bench.py --sizes-only --trained-run runs/quickstart   # B/token, storage KL
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import zipf_teacher_tokens  # noqa: E402

from distill_pipeline.cache.admin import info  # noqa: E402
from distill_pipeline.cache.extract import Extractor, _batches, extract, make_request, plan_units  # noqa: E402
from distill_pipeline.batches import Batches, Field, TeacherSource  # noqa: E402
from distill_pipeline.cache.format import SCHEMA_VERSION, CacheFormat  # noqa: E402
from distill_pipeline.config import TeacherLogits  # noqa: E402
from distill_pipeline.cache.reader import CacheReader  # noqa: E402
from distill_pipeline.cache.store import Store  # noqa: E402
from distill_pipeline.data.tokenize import collate  # noqa: E402

FMT = CacheFormat(50, "float16")  # K=50, lossless float16: the format every extraction here uses


def bench_teacher(folder: Path, vocab: int, hidden: int, layers: int) -> Path:
    """A random-initialised Llama of the given size saved as a checkpoint (throughput only)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from distill_pipeline.models import save_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>")),
                                  pad_token="<pad>", unk_token="<unk>", eos_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    save_model(model, tok, folder)
    return folder


def random_sequences(n: int, vocab: int, seed: int, offset: int = 0) -> list[tuple[list[int], list[int]]]:
    out = []
    for i in range(offset, offset + n):
        g = np.random.default_rng(seed * 1_000_003 + i)
        p, r = int(g.integers(16, 96)), int(g.integers(16, 96))
        ids = g.integers(2, vocab, size=p + r).tolist()
        out.append((ids[:p], ids[p:]))
    return out


def throughput(teacher: Path, seqs, *, batch_tokens: int, repeats: int, head_chunk_rows: int | None,
               profile: bool = False) -> dict:
    """Extraction (trunk + LM head on response positions + top-K + compress + publish) vs two
    baselines on identical batches, interleaved:

    - `trunk_head`: what extraction must compute, done as `extract.topk_for_batch` does it — the
      trunk (`model.base_model`) over every position, the LM head on the response positions only
      in the same `head_chunk_rows` chunks — with no log-softmax, top-K, encoding or publishing
      (the apples-to-apples baseline);
    - `full_forward`: `model(...).logits`, the LM head at every prompt and response position (more
      matmul work than extraction needs; reported beside it, labelled).

    `profile`: one more extraction pass under cProfile, split into trunk, LM head, log-softmax +
    top-K + label gather (`_head_topk`), encoding (`segment_data`) and publishing (`Store.publish`)."""
    from distill_pipeline.cache.extract import _head_only_ok
    from distill_pipeline.models import load_checkpoint, teacher_identity

    ident = teacher_identity(teacher)
    reqs = [make_request(ident, p, r, FMT) for p, r in seqs]
    units = plan_units(reqs, set(), unit_tokens=16384)
    model, tok = load_checkpoint(teacher)
    model.eval()
    if not _head_only_ok(model):
        raise SystemExit("the bench teacher should take the head-on-response-positions path")
    head = model.get_output_embeddings()
    tokens = sum(r.n_tokens for r in reqs)
    batches = [(ids, mask, _positions(b)) for u in units for b in _batches(u.requests, batch_tokens)
               for ids, mask, _ in [collate([r.prompt_ids for r in b], [r.response_ids for r in b], 0)]]

    def full_forward():
        for ids, mask, _ in batches:
            model(input_ids=ids, attention_mask=mask).logits

    def trunk_head():
        for ids, mask, (rows, cols) in batches:
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[rows, cols]
            step = head_chunk_rows or len(hidden)
            for s in range(0, len(hidden), step):
                head(hidden[s:s + step]).float()

    def extraction():
        with tempfile.TemporaryDirectory() as d:
            worker = Extractor(d, {ident: str(teacher)}, fmt=FMT, batch_tokens=batch_tokens,
                               head_chunk_rows=head_chunk_rows)
            worker.models[ident] = (model, 0)
            t0 = time.perf_counter()
            for u in units:
                worker.run(u)
            return time.perf_counter() - t0

    times: dict[str, list[float]] = {"full_forward": [], "trunk_head": [], "extraction": []}
    for rep in range(repeats):  # interleaved so drift hits every side equally
        with torch.no_grad():
            for name, fn in (("full_forward", full_forward), ("trunk_head", trunk_head)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        times["extraction"].append(extraction())
    f, h, e = (min(times[k]) for k in ("full_forward", "trunk_head", "extraction"))
    out = {"response_tokens": tokens, "batch_tokens": batch_tokens, "head_chunk_rows": head_chunk_rows, "positions": sum(int(m.sum()) for _, m, _ in batches),
           "padded_positions": sum(m.numel() for _, m, _ in batches), "repeats": repeats,
           "seconds_all_repeats": {k: [round(t, 3) for t in v] for k, v in times.items()},
           "full_forward_s": round(f, 3), "trunk_head_s": round(h, 3), "extraction_s": round(e, 3),
           "full_forward_tok_per_s": round(tokens / f, 1), "trunk_head_tok_per_s": round(tokens / h, 1),
           "extraction_tok_per_s": round(tokens / e, 1),
           "extraction_over_trunk_head_throughput": round(h / e, 3),
           "extraction_over_full_forward_throughput": round(f / e, 3)}
    if profile:
        out["profile"] = _profile_extraction(extraction)
    return out


def _positions(batch) -> tuple:
    """(rows, cols) of the positions predicting each request's response tokens, as topk_for_batch."""
    rows = torch.cat([torch.full((r.n_tokens,), i) for i, r in enumerate(batch)])
    cols = torch.cat([torch.arange(len(r.prompt_ids) - 1, len(r.prompt_ids) - 1 + r.n_tokens) for r in batch])
    return rows, cols


def _profile_extraction(extraction) -> dict:
    """Seconds of one extraction pass under cProfile, by part (cumulative times; the LM head is
    topk_for_batch less the trunk and _head_topk, so it also holds collate and the row gather)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    total = extraction()
    prof.disable()
    wanted = {("extract.py", "topk_for_batch"): "topk_for_batch", ("extract.py", "_head_topk"): "head_topk",
              ("extract.py", "segment_data"): "segment_data", ("store.py", "publish"): "publish"}
    cum = {v: 0.0 for v in wanted.values()}
    trunk = 0.0
    for (file, _, fn), (_, _, _, ct, _) in pstats.Stats(prof).stats.items():
        if (Path(file).name, fn) in wanted:
            cum[wanted[Path(file).name, fn]] += ct
        elif Path(file).name == "modeling_llama.py" and fn == "forward":
            trunk = max(trunk, ct)  # LlamaModel.forward: the outermost forward extraction calls
    parts = {"trunk": trunk, "lm_head": cum["topk_for_batch"] - trunk - cum["head_topk"],
             "log_softmax_topk_gather": cum["head_topk"], "encode_segment_data": cum["segment_data"],
             "publish": cum["publish"]}
    parts["other"] = total - sum(parts.values())
    return {"total_s": round(total, 3), "seconds": {k: round(v, 3) for k, v in parts.items()},
            "share": {k: round(v / total, 3) for k, v in parts.items()}}


LOSSY = (CacheFormat(50, "float16", 6), CacheFormat(50, "float16", 4),
         CacheFormat(50, top_mass=0.999), CacheFormat(50, top_mass=0.99),
         CacheFormat(50, "float16", 6, top_mass=0.999), CacheFormat(50, "float16", 4, top_mass=0.99))


def synthetic_bytes_per_token(n_tokens: int) -> dict:
    """Bytes per token of the lossless float16 store, of the lossy `-keep<n>` modes and of
    mass-adaptive K (with their reconstruction KL and mean k), on one synthetic Zipf sample."""
    sample = zipf_teacher_tokens(n_tokens)
    out = {_name(fmt): _synthetic_store(sample, fmt) for fmt in (FMT,) + LOSSY}
    keys = ("bytes_per_token_arrays", "bytes_per_token_by_array", "reconstruction_kl", "mean_k")
    return {**out[_name(FMT)], "lossy": {c: {k: out[c][k] for k in keys} for c in out}}


def _name(fmt: CacheFormat) -> str:
    return fmt.storage + ("" if not fmt.adaptive else f"-mass{fmt.top_mass}")


def _synthetic_store(sample, fmt: CacheFormat, vocab: int = 128_256) -> dict:
    from distill_pipeline.cache.extract import segment_data

    ids, logp, lse, label = sample
    n_tokens = len(lse)
    with tempfile.TemporaryDirectory() as d:
        store = Store(d)
        rows_per_entry = 64
        entries = [{"key": fmt.key("synthetic", [i], 0), "teacher": "synthetic",
                    "offset": o, "n_tokens": min(rows_per_entry, n_tokens - o), "prompt_len": 0,
                    "token_ids": list(range(min(rows_per_entry, n_tokens - o)))}
                   for i, o in enumerate(range(0, n_tokens, rows_per_entry))]
        data, kl = segment_data(fmt, ids, logp, lse, label, entries, vocab)
        store.publish("synthetic", data, {"schema_version": SCHEMA_VERSION, "teacher": "synthetic",
                                          "format": fmt.to_json(), "n_entries": len(entries),
                                          "n_tokens": n_tokens, "reconstruction_kl": kl,
                                          **({"n_slots": len(data.ids)} if fmt.adaptive else {})})
        seg = store.root / "segments" / "synthetic"
        arrays = {name: sum(f.stat().st_size for f in (seg / name).rglob("*") if f.is_file())
                  for name in ("ids", "logp", "lse", "label_logp", "counts") if (seg / name).exists()}
        index = (seg / "index.parquet").stat().st_size
        mean_k = len(data.ids) / n_tokens if fmt.adaptive else fmt.top_k
    per = {k: round(v / n_tokens, 2) for k, v in arrays.items()}
    return {"tokens": n_tokens, "vocab": vocab, "top_k": fmt.top_k, "dtype": fmt.storage,
            "top_mass": fmt.top_mass, "mean_k": round(mean_k, 2),
            "reconstruction_kl": float(f"{kl:.3g}"),
            "bytes_per_token_arrays": round(sum(arrays.values()) / n_tokens, 2),
            "bytes_per_token_by_array": per,
            "index_bytes_per_token_synthetic_ids": round(index / n_tokens, 2),
            "mean_topk_mass": round(float(np.exp(logp.astype(np.float64)).sum(1).mean()), 4),
            "raw_bytes_per_token": 50 * 4 + 50 * 2 + 4 + 4}


def reader_vs_train(teacher: Path, student_hidden: int) -> dict:
    """DCKD batches: streaming reader time vs a student train step on the same batches."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill_pipeline.losses import dckd_loss
    from distill_pipeline.models import load_checkpoint, teacher_identity

    ident = teacher_identity(teacher)
    model, tok = load_checkpoint(teacher)
    vocab = model.config.vocab_size
    seqs = random_sequences(256, vocab, seed=7)
    with tempfile.TemporaryDirectory() as d:
        reqs = [make_request(ident, p, r, FMT) for p, r in seqs]
        extract(reqs, Store(d), {ident: str(teacher)}, FMT)
        # keys are computed by Batches from each example's own tokens (prompt + response)
        examples = [{"prompt_ids": p, "chosen_ids": r, "rejected_ids": r} for p, r in seqs]
        stream = Batches(examples, [Field("chosen", "w", ("teacher",)), Field("rejected", "l", ("teacher",))],
                         batch_size=16, pad_id=0, prefetch=0,
                         cache=TeacherSource(CacheReader(d), FMT, {"teacher": ident}))
        t0 = time.perf_counter()
        batches = [stream.build(list(range(s, s + 16))) for s in range(0, 256, 16)]
        read_s = time.perf_counter() - t0
        student = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=student_hidden,
                                               intermediate_size=student_hidden * 3, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=2,
                                               tie_word_embeddings=False))
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        steps = batches[:4]  # a few steps are enough for a per-step time
        t0 = time.perf_counter()
        for b in steps:
            args = []
            for f in ("w", "l"):  # chosen, rejected
                ids, mask, labels = b[f]["student"]
                args += [student(input_ids=ids, attention_mask=mask).logits[:, :-1], labels[:, 1:],
                         b[f]["teacher"]["ids"], b[f]["teacher"]["logp"]]
            loss, _ = dckd_loss(*args)
            loss.backward()
            opt.step()
            opt.zero_grad()
        train_s = (time.perf_counter() - t0) / len(steps) * len(batches)  # per-step time × batches
    tokens = sum(len(r) for _, r in seqs) * 2
    return {"batches": len(batches), "response_tokens": tokens, "reader_s": round(read_s, 3),
            "train_s_estimated_from_4_steps": round(train_s, 3), "reader_tok_per_s": round(tokens / read_s, 1),
            "train_tok_per_s": round(tokens / train_s, 1),
            "reader_over_train_throughput": round(train_s / read_s, 2)}


def overlap_rerun(teacher: Path, n: int) -> dict:
    from distill_pipeline.models import teacher_identity

    ident = teacher_identity(teacher)
    vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
    with tempfile.TemporaryDirectory() as d:
        first = extract([make_request(ident, p, r, FMT) for p, r in random_sequences(n, vocab, 3)],
                        Store(d), {ident: str(teacher)}, FMT)
        second = extract([make_request(ident, p, r, FMT)
                          for p, r in random_sequences(n, vocab, 3, offset=n // 5)],
                         Store(d), {ident: str(teacher)}, FMT)
    return {"sequences": n, "first": first, "overlap_80": second,
            "rerun_over_first_time": round(second["seconds"] / first["seconds"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out/cache_bench.json")
    ap.add_argument("--trained-store", help="a cache written by a trained model (e.g. the quickstart)")
    ap.add_argument("--trained-run", help="--sizes-only: a run dir whose extraction nodes' teachers "
                    "compute their entries again in float32 (e.g. the quickstart's runs/quickstart)")
    ap.add_argument("--vocab", type=int, default=32_000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--sequences", type=int, default=192)
    ap.add_argument("--synthetic-tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing passes (the minimum is kept)")
    ap.add_argument("--head-chunk-rows", type=int, default=TeacherLogits().head_chunk_rows,
                    help="LM-head chunk of extraction and of the baseline (default: the config's; 0: all rows)")
    ap.add_argument("--profile", action="store_true",
                    help="also split one extraction pass by part under cProfile")
    ap.add_argument("--throughput-only", action="store_true",
                    help="only the extraction-vs-forward comparison (no reader, rerun or size measurements)")
    ap.add_argument("--sizes-only", action="store_true",
                    help="only bytes per token and storage KL (synthetic, and --trained-store): no teacher runs")
    args = ap.parse_args()
    if args.sizes_only:
        return sizes_only(args)
    torch.set_num_threads(1)  # one extraction worker's view of the machine
    result: dict = {"config": vars(args), "torch_threads": 1}
    with tempfile.TemporaryDirectory() as d:
        teacher = bench_teacher(Path(d) / "teacher", args.vocab, args.hidden, args.layers)
        seqs = random_sequences(args.sequences, args.vocab, seed=1)
        result["throughput"] = throughput(teacher, seqs, batch_tokens=TeacherLogits().batch_tokens,
                                          repeats=args.repeats, profile=args.profile,
                                          head_chunk_rows=args.head_chunk_rows or None)
        print("throughput", json.dumps(result["throughput"], indent=1), flush=True)
        if not args.throughput_only:
            result["reader_vs_train"] = reader_vs_train(teacher, student_hidden=args.hidden // 2)
            print("reader", result["reader_vs_train"], flush=True)
            result["overlap"] = overlap_rerun(teacher, args.sequences)
            print("overlap", result["overlap"]["rerun_over_first_time"], flush=True)
    if args.throughput_only:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        return print(f"wrote {args.out}")
    result["bytes_synthetic_zipf_128k"] = synthetic_bytes_per_token(args.synthetic_tokens)
    print("synthetic", result["bytes_synthetic_zipf_128k"], flush=True)
    if args.trained_store:
        r = info(Store(args.trained_store, create=False))
        result["bytes_trained_tiny"] = {k: r[k] for k in ("entries", "tokens", "bytes_on_disk",
                                                           "bytes_per_token", "top_k", "dtype", "mean_topk_mass")}
        print("trained", result["bytes_trained_tiny"], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def sizes_only(args) -> None:
    """B/token, by array, storage KL and mean k of every format on the synthetic sample; with
    --trained-run also of the same formats on the quickstart's trained teachers, from the float32
    top-K those teachers compute again for every entry the run's extraction nodes stored (so the
    storage KL includes the float16 rounding, as extraction's own does); with only
    --trained-store, re-encoded from that store's float16 values (float16 rounding left out)."""
    result: dict = {"config": vars(args)}
    syn = synthetic_bytes_per_token(args.synthetic_tokens)
    result["bytes_synthetic_zipf_128k"] = syn
    _table(f"synthetic Zipf, 128k vocabulary, {args.synthetic_tokens} tokens", syn["lossy"])
    if args.trained_run or args.trained_store:
        if args.trained_run:
            sample, vocab, check = _trained_float32_sample(Path(args.trained_run))
            result["trained_reextraction"] = check
            print("float32 re-extraction vs the stored entries:", json.dumps(check), flush=True)
            title = (f"trained teachers' entries ({len(sample[2])} tokens, vocab {vocab}), from the "
                     "teachers' float32 top-K (storage KL vs float32)")
        else:
            sample, vocab = _trained_sample(args.trained_store)
            title = (f"trained teachers' entries ({len(sample[2])} tokens, vocab ≥ {vocab}), re-encoded "
                     "from the store's float16 values (storage KL leaves float16 rounding out)")
        out = {_name(fmt): _synthetic_store(sample, fmt, vocab) for fmt in (FMT,) + LOSSY}
        keys = ("bytes_per_token_arrays", "bytes_per_token_by_array", "reconstruction_kl", "mean_k")
        result["bytes_trained"] = {c: {k: out[c][k] for k in keys} for c in out}
        result["bytes_trained_source"] = title
        _table(title, result["bytes_trained"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def _trained_float32_sample(run_dir: Path):
    """Every entry the run's extraction nodes (`teacher_logits*/teachers.json`) name, computed
    again by its teacher (`extract.topk_for_batch`, float32, K=50) in one pass per teacher:
    (ids, logp, lse, label) rows ordered by teacher then key, the vocabulary size, and a check
    that the stored float16 entries are these values rounded (same ids, same float16 bits)."""
    import pyarrow.parquet as pq

    from distill_pipeline.cache.extract import Request, topk_for_batch
    from distill_pipeline.cache.node import node_keys
    from distill_pipeline.models import ModelRef, load_ref

    nodes = sorted(run_dir.glob("teacher_logits*/teachers.json"))
    if not nodes:
        raise SystemExit(f"{run_dir}: no extraction node (teacher_logits*/teachers.json)")
    wanted: dict[str, tuple] = {}  # key → (store, teacher identity)
    paths: dict[str, str] = {}  # teacher identity → model directory
    for node in nodes:
        meta = json.loads(node.read_text())
        paths.update({t["identity"]: t["path"] for t in meta["teachers"].values()})
        wanted.update({k: meta["store"] for k in node_keys(node.parent)})
    entries: dict[str, list] = {}  # teacher → [(key, prompt, response, store)]
    for root in sorted(set(wanted.values())):
        store = Store(root, create=False)
        for seg in store.segment_names():
            t = pq.read_table(store.segment_path(seg) / "index.parquet",
                              columns=["key", "teacher", "prompt_len", "token_ids"]).to_pydict()
            for key, teacher, p, ids in zip(t["key"], t["teacher"], t["prompt_len"], t["token_ids"]):
                if wanted.get(key) == root:
                    entries.setdefault(teacher, []).append((key, list(ids[:p]), list(ids[p:]), root))
                    wanted.pop(key)
    if wanted:
        raise SystemExit(f"{len(wanted)} of the nodes' keys are not in their stores")
    rows, vocab = [], 0
    same_ids = same_bits = n_rows = 0
    readers = {}
    for teacher in sorted(entries):
        model, tok = load_ref(ModelRef(paths[teacher]))
        model.eval()
        todo = sorted(entries[teacher])
        reqs = [Request(teacher, tuple(p), tuple(r), key) for key, p, r, _ in todo]
        got: dict[str, dict] = {}
        for b in _batches(reqs, 4096):
            got.update(zip((r.key for r in b), topk_for_batch(model, b, tok.pad_token_id, FMT.top_k, 1024)))
        for key, _, _, root in todo:
            e = got[key]
            vocab = max(vocab, e["vocab"])
            rows.append((e["ids"], e["logp"], e["lse"], e["label_logp"]))
            stored = readers.setdefault(root, CacheReader(root)).get(key)
            same_ids += int((stored["ids"] == e["ids"]).all(1).sum())
            same_bits += int((FMT.encode(stored["logp"]) == FMT.encode(e["logp"])).all(1).sum())
            n_rows += len(e["lse"])
    sample = tuple(np.concatenate([r[i] for r in rows]) for i in range(4))
    check = {"teachers": len(entries), "entries": sum(map(len, entries.values())), "tokens": n_rows,
             "vocab": vocab, "rows_with_stored_ids": same_ids, "rows_with_stored_float16_logp": same_bits}
    return sample, vocab, check


def _table(title: str, rows: dict) -> None:
    print(f"\n{title}\n{'format':<28}{'B/token':>9}{'ids':>8}{'logp':>8}{'mean k':>8}{'storage KL':>12}")
    for name, r in rows.items():
        by = r["bytes_per_token_by_array"]
        print(f"{name:<28}{r['bytes_per_token_arrays']:>9.2f}{by['ids']:>8.2f}{by['logp']:>8.2f}"
              f"{r['mean_k']:>8.2f}{r['reconstruction_kl']:>12.3g}")


def _trained_sample(root: str):
    """Every entry of a fixed-K float16/float32 store as (ids, logp, lse, label) rows, and the
    vocabulary size (the largest id + 1: a lower bound)."""
    reader = CacheReader(root)
    parts = [reader.get(k) for k in sorted(reader._where)]
    rows = tuple(np.concatenate([p[f] for p in parts]) for f in ("ids", "logp", "lse", "label_logp"))
    if rows[0].shape[1] != FMT.top_k:
        raise SystemExit(f"{root}: K={rows[0].shape[1]}, this comparison re-encodes K={FMT.top_k} entries")
    return rows, int(rows[0].max()) + 1


if __name__ == "__main__":
    main()
