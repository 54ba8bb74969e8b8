"""The teacher-logit cache's guarantees: identical bits whatever the worker count or a kill -9,
dedup by content, token checks, corruption found by verify, plain zarr/pyarrow readability,
and values equal to the teacher computed live."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from distill_pipeline.cache.admin import info, verify
from distill_pipeline.batches import Batches, Field, TeacherSource
from distill_pipeline.cache.format import CacheFormat
from distill_pipeline.cache.reader import CacheReader, TokenMismatch
from distill_pipeline.cache.segment import CacheError
from distill_pipeline.cache.store import Store
from tests.conftest import ROOT
from tests.invariants.helpers import (DTYPE, FMT, TOP_K, make_teacher, requests, run_extraction,
                                      sequences, tree_bytes)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher") / "model")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_one_vs_three_workers_bit_identical(teacher, tmp_path, ray_local):
    one = run_extraction(teacher, tmp_path / "one", 60, unit_tokens=64, workers=1)
    three = run_extraction(teacher, tmp_path / "three", 60, unit_tokens=64, workers=3)
    assert one["units"] == three["units"] >= 4
    a, b = tree_bytes(tmp_path / "one"), tree_bytes(tmp_path / "three")
    assert a.keys() == b.keys() and a == b


@pytest.mark.slow
def test_in_process_equals_ray_workers(teacher, tmp_path, ray_local):
    import ray
    run_extraction(teacher, tmp_path / "ray", 30, unit_tokens=64, workers=2)
    ray.shutdown()  # the next extraction runs in this process
    try:
        run_extraction(teacher, tmp_path / "inline", 30, unit_tokens=64)
    finally:
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    assert tree_bytes(tmp_path / "ray") == tree_bytes(tmp_path / "inline")


@pytest.mark.slow
def test_kill9_then_resume_is_bit_identical(teacher, tmp_path):
    n, unit = 80, 48
    clean = run_extraction(teacher, tmp_path / "clean", n, unit_tokens=unit)
    env = {**os.environ, "DISTILL_EXTRACT_THROTTLE_S": "0.4", "DISTILL_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "tests.invariants.helpers", str(teacher),
                             str(tmp_path / "crash"), str(n), str(unit)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    segments = tmp_path / "crash" / "segments"
    deadline = time.time() + 120
    while time.time() < deadline and (not segments.exists() or len(list(segments.iterdir())) < 2):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(segments.iterdir()))
    assert 2 <= done_before < clean["units"], "the kill must land mid-extraction"
    resumed = run_extraction(teacher, tmp_path / "crash", n, unit_tokens=unit)
    # only the unfinished units — and, when the kill landed between a segment's rename into place
    # and its index write, that unit too: its keys look missing, it is extracted again and found
    # already there (re-indexed, not rewritten: the bytes below stay identical)
    assert clean["units"] - done_before <= resumed["units"] <= clean["units"] - done_before + 1
    a, b = tree_bytes(tmp_path / "crash"), tree_bytes(tmp_path / "clean")
    assert a == b, ("files only in one", sorted(set(a) ^ set(b))[:5],
                    "files that differ", [k for k in a if k in b and a[k] != b[k]][:5])
    assert verify(Store(tmp_path / "crash"))[1] == []


def test_overlap_extracts_only_the_missing_part(teacher, tmp_path):
    first = run_extraction(teacher, tmp_path / "s", 50, unit_tokens=10_000)
    assert first["extracted"] == 50 and first["cached"] == 0
    second = run_extraction(teacher, tmp_path / "s", 50, unit_tokens=10_000, offset=10)  # 80% overlap
    assert second["cached"] == 40 and second["extracted"] == 10
    again = run_extraction(teacher, tmp_path / "s", 60, unit_tokens=10_000)
    assert again["extracted"] == 0 and again["units"] == 0


def test_values_match_live_teacher(teacher, tmp_path):
    from distill_pipeline.cache.extract import extract
    from distill_pipeline.data.tokenize import collate
    from distill_pipeline.models import load_checkpoint

    seqs = sequences(6)
    reqs, dirs = requests(teacher, seqs, CacheFormat(TOP_K, "float32"))
    extract(reqs, Store(tmp_path / "s"), dirs, CacheFormat(TOP_K, "float32"), batch_tokens=64)
    model, tok = load_checkpoint(teacher)
    reader = CacheReader(tmp_path / "s")
    for req, (p, r) in zip(reqs, seqs):
        e = reader.get(req.key, expect_tokens=p + r)
        ids, mask, _ = collate([p], [r], tok.pad_token_id)
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask).logits[0].float()
        logp = torch.log_softmax(full, -1)
        pos = torch.arange(len(p) - 1, len(p) - 1 + len(r))
        top = logp[pos].topk(TOP_K, -1)
        assert np.array_equal(e["ids"], top.indices.int().numpy())
        np.testing.assert_allclose(e["logp"], top.values.numpy(), atol=1e-5)
        np.testing.assert_allclose(e["label_logp"], logp[pos, torch.tensor(r)].numpy(), atol=1e-5)
        np.testing.assert_allclose(e["lse"], torch.logsumexp(full[pos], -1).numpy(), atol=1e-4)


def test_batch_size_changes_no_stored_log_prob(teacher, tmp_path):
    """Why `batch_tokens` is left out of the fingerprint: other padding gives the same ids and
    stored (float16) log-probs; lse and label log-probs agree to float32 rounding."""
    for bt in (64, 4096):
        run_extraction(teacher, tmp_path / str(bt), 30, unit_tokens=100_000, batch_tokens=bt)
    reqs, _ = requests(teacher, sequences(30))
    small, large = CacheReader(tmp_path / "64"), CacheReader(tmp_path / "4096")
    for r in reqs:
        a, b = small.get(r.key), large.get(r.key)
        assert np.array_equal(a["ids"], b["ids"]) and np.array_equal(a["logp"], b["logp"])
        np.testing.assert_allclose(a["lse"], b["lse"], atol=1e-5)
        np.testing.assert_allclose(a["label_logp"], b["label_logp"], atol=1e-5)


def test_head_chunks_change_no_value(teacher):
    """Why `head_chunk_rows` is left out of the fingerprint, as `batch_tokens` is: the LM head,
    log-softmax, top-K and label log-prob are row-wise, so chunking changes only the matmul's
    float32 rounding (a 1- or 2-row product takes another BLAS kernel: ≤ 5e-7 here; from 7 rows
    on this machine gives the very same bits) — the same ids, log-probs within 1e-5."""
    from distill_pipeline.cache.extract import topk_for_batch
    from distill_pipeline.models import load_checkpoint

    model, tok = load_checkpoint(teacher)
    reqs, _ = requests(teacher, sequences(12))
    whole = topk_for_batch(model, reqs, tok.pad_token_id, TOP_K, None)
    assert sum(len(r["lse"]) for r in whole) > 40
    for rows in (1, 7, 40, 10_000):
        chunked = topk_for_batch(model, reqs, tok.pad_token_id, TOP_K, rows)
        for a, b in zip(whole, chunked):
            assert np.array_equal(a["ids"], b["ids"]), rows
            for f in ("logp", "lse", "label_logp"):
                np.testing.assert_allclose(a[f], b[f], atol=1e-5, err_msg=f"{rows} {f}")


def test_extract_refuses_keys_of_another_format(teacher, tmp_path):
    from distill_pipeline.cache.extract import extract

    reqs, dirs = requests(teacher, sequences(2), CacheFormat(TOP_K, "float16"))
    with pytest.raises(ValueError, match="keyed in another cache format"):
        extract(reqs, Store(tmp_path / "s"), dirs, CacheFormat(TOP_K, "float32"))


def test_segments_written_before_the_format_object_still_read(teacher, tmp_path):
    """Segment manifests once held `top_k` and `logp_dtype` instead of `format`; keys are
    unchanged, so such stores keep working."""
    import json

    run_extraction(teacher, tmp_path / "s", 6, unit_tokens=1000, fmt=CacheFormat(TOP_K, DTYPE, 6))
    seg = Store(tmp_path / "s").segments()[0]
    meta = json.loads((seg / "zarr.json").read_text())
    fmt = meta["attributes"].pop("format")
    meta["attributes"].update(top_k=fmt["top_k"], logp_dtype=f"{fmt['dtype']}-keep{fmt['logp_keep_bits']}")
    (seg / "zarr.json").write_text(json.dumps(meta))
    assert verify(Store(tmp_path / "s"))[1] == []
    assert info(Store(tmp_path / "s"))["dtype"] == ["float16-keep6"]
    reqs, _ = requests(teacher, sequences(6), CacheFormat(TOP_K, DTYPE, 6))
    assert CacheReader(tmp_path / "s").get(reqs[0].key)["logp"].shape[1] == TOP_K


def test_a_segment_from_a_newer_version_is_kept_not_treated_as_damage(teacher, tmp_path):
    """A format field this version does not know means a newer writer, not damage: verify lists it
    with the upgrade advice, the reader refuses it saying so, `gc --damaged` keeps it."""
    import json

    from distill_pipeline.cache.admin import gc

    run_extraction(teacher, tmp_path / "s", 6, unit_tokens=1000)
    seg = Store(tmp_path / "s").segments()[0]
    meta = json.loads((seg / "zarr.json").read_text())
    meta["attributes"]["format"]["future_field"] = 3
    (seg / "zarr.json").write_text(json.dumps(meta))
    problems = verify(Store(tmp_path / "s"))[1]
    assert len(problems) == 1 and "written by a newer distill-pipeline" in problems[0]
    report = gc(Store(tmp_path / "s"), damaged=True)
    assert not report.removed and any("newer distill-pipeline" in k for k in report.kept)
    assert seg.exists()
    reqs, _ = requests(teacher, sequences(6), CacheFormat(TOP_K, DTYPE))
    with pytest.raises(CacheError, match="upgrade distill-pipeline"):
        CacheReader(tmp_path / "s").get(reqs[0].key)


def test_cached_loss_equals_live_teacher_loss(teacher, tmp_path):
    """DCKD with teacher tensors streamed from a float32 cache ≡ computed from the live teacher."""
    from distill_pipeline.cache.extract import extract
    from distill_pipeline.losses import dckd_loss
    from distill_pipeline.models import load_checkpoint

    seqs = sequences(8)
    fmt = CacheFormat(TOP_K, "float32")
    reqs, dirs = requests(teacher, seqs, fmt)
    extract(reqs, Store(tmp_path / "s"), dirs, fmt, batch_tokens=64)
    model, tok = load_checkpoint(teacher)
    # sequences() has one response per prompt, so each "pair" uses it on both sides
    examples = [{"prompt_ids": p, "chosen_ids": r, "rejected_ids": r} for p, r in seqs]
    source = TeacherSource(CacheReader(tmp_path / "s"), fmt, {"teacher": reqs[0].teacher})
    stream = Batches(examples, [Field("chosen", "w", ("teacher",)), Field("rejected", "l", ("teacher",))],
                     batch_size=4, pad_id=tok.pad_token_id, cache=source)
    batch = next(iter(stream.epoch(0)))
    torch.manual_seed(0)
    args_cached, args_live = [], []
    for f in ("w", "l"):
        ids, mask, labels = batch[f]["student"]
        with torch.no_grad():
            teacher_logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        live = torch.log_softmax(teacher_logits, -1).topk(TOP_K, -1)
        m = batch[f]["teacher"]["mask"]
        assert torch.equal(batch[f]["teacher"]["ids"][m], live.indices[m])
        student = torch.randn_like(teacher_logits)  # any student
        args_cached += [student, labels[:, 1:], batch[f]["teacher"]["ids"], batch[f]["teacher"]["logp"]]
        args_live += [student, labels[:, 1:], live.indices, live.values]
    cached = dckd_loss(*args_cached, alpha=0.1)[0]
    live = dckd_loss(*args_live, alpha=0.1)[0]
    assert cached.item() == pytest.approx(live.item(), abs=1e-6)


def test_token_mismatch_detected(teacher, tmp_path):
    run_extraction(teacher, tmp_path / "s", 4, unit_tokens=1000)
    reqs, _ = requests(teacher, sequences(4))
    reader = CacheReader(tmp_path / "s")
    p, r = sequences(4)[0]
    with pytest.raises(TokenMismatch, match="differ from the student sequence at position"):
        reader.get(reqs[0].key, expect_tokens=p + r[:-1] + [r[-1] + 1])
    # a batch whose teacher entry holds other tokens is refused while batching (here: the
    # index's token ids of the entry are made to disagree with the student's)
    reader.token_ids = lambda key: list(p) + list(r[:-1]) + [r[-1] + 1]
    stream = Batches([{"prompt_ids": p, "chosen_ids": r}], [Field("chosen", "w", ("teacher",))], batch_size=1,
                     pad_id=0, cache=TeacherSource(reader, FMT, {"teacher": reqs[0].teacher}))
    with pytest.raises(TokenMismatch):
        next(iter(stream.epoch(0)))


def test_verify_names_a_corrupted_chunk(teacher, tmp_path):
    run_extraction(teacher, tmp_path / "s", 20, unit_tokens=1000)
    store = Store(tmp_path / "s")
    assert verify(store)[1] == []
    seg = store.segments()[0]
    chunk = next(p for p in (seg / "logp").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    checked, problems = verify(store)
    assert checked == 20 and problems
    assert any(seg.name in p and "array logp chunk 0" in p and "corrupt" in p for p in problems), problems
    out = subprocess.run([sys.executable, "-m", "distill_pipeline.cli.main", "cache", "verify",
                          "--store", str(tmp_path / "s")], capture_output=True, text=True)
    assert out.returncode == 1 and "array logp chunk 0" in out.stdout


def test_plain_zarr_and_pyarrow_read_the_store(teacher, tmp_path):
    import pyarrow.parquet as pq
    import zarr

    run_extraction(teacher, tmp_path / "s", 10, unit_tokens=1000)
    seg = next((tmp_path / "s" / "segments").iterdir())
    index = pq.read_table(seg / "index.parquet").to_pylist()
    group = zarr.open_group(str(seg), mode="r")
    assert group.attrs["format"] == {"top_k": TOP_K, "dtype": DTYPE, "logp_keep_bits": None}
    row = index[3]
    s = slice(row["offset"], row["offset"] + row["n_tokens"])
    logp = group["logp"][s].view(np.float16)  # stored as float16 bit patterns
    ours = CacheReader(tmp_path / "s").get(row["key"])
    np.testing.assert_array_equal(logp.astype(np.float32), ours["logp"])
    np.testing.assert_array_equal(group["ids"][s], ours["ids"])
    assert group["ids"].shape == (sum(r["n_tokens"] for r in index), TOP_K)


def test_info_reports_sizes_and_quality(teacher, tmp_path):
    run_extraction(teacher, tmp_path / "s", 20, unit_tokens=1000)
    r = info(Store(tmp_path / "s"))
    assert r["entries"] == 20 and r["tokens"] > 20 and r["top_k"] == [TOP_K] and r["dtype"] == [DTYPE]
    assert 0 < r["mean_topk_mass"] <= 1.0001 and r["bytes_per_token"] > 0
    assert len(r["teachers"]) == 1


def test_reader_memory_is_bounded(teacher, tmp_path):
    run_extraction(teacher, tmp_path / "s", 60, unit_tokens=64)
    reader = CacheReader(tmp_path / "s", max_cached_bytes=4096)
    reqs, _ = requests(teacher, sequences(60))
    for r in reqs:
        reader.get(r.key)
    assert reader._held <= 4096 + max(c.nbytes for c in reader._chunks.values())


def test_lossy_mode_is_smaller_and_reports_its_kl(teacher, tmp_path):
    run_extraction(teacher, tmp_path / "exact", 40, unit_tokens=10_000)
    run_extraction(teacher, tmp_path / "lossy", 40, unit_tokens=10_000, fmt=CacheFormat(TOP_K, DTYPE, 3))
    exact, lossy = info(Store(tmp_path / "exact")), info(Store(tmp_path / "lossy"))
    assert lossy["dtype"] == ["float16-keep3"] and lossy["tokens"] == exact["tokens"]
    assert lossy["reconstruction_kl"] > exact["reconstruction_kl"] >= 0
    seg = lambda root: sum(f.stat().st_size for f in (root / "segments").rglob("logp/**/*") if f.is_file())  # noqa: E731
    assert seg(tmp_path / "lossy") < seg(tmp_path / "exact")
    assert verify(Store(tmp_path / "lossy"))[1] == []


ADAPTIVE = CacheFormat(TOP_K, DTYPE, top_mass=0.035)  # the tiny teacher is flat: ~4 of 8 slots


def test_adaptive_k_store_is_bit_identical_after_lost_units_and_other_batches(teacher, tmp_path):
    """Adaptive K keeps each token's k from the *stored* log-probs, so the ragged store is as
    reproducible as a fixed-K one: other batch sizes and units lost mid-run (removed, as after a
    kill -9, then extracted again) give the same bytes; and it reads back as the fixed-K store
    truncated to each token's k."""
    clean = run_extraction(teacher, tmp_path / "clean", 40, unit_tokens=64, fmt=ADAPTIVE)
    assert clean["units"] >= 4
    run_extraction(teacher, tmp_path / "other", 40, unit_tokens=64, fmt=ADAPTIVE, batch_tokens=4096)
    assert tree_bytes(tmp_path / "other") == tree_bytes(tmp_path / "clean")
    store = Store(tmp_path / "other")
    for seg in store.segments()[1::2]:
        store.remove_segment(seg.name)
    again = run_extraction(teacher, tmp_path / "other", 40, unit_tokens=64, fmt=ADAPTIVE, batch_tokens=4096)
    assert again["extracted"] < 40 and again["units"] == clean["units"] // 2
    assert tree_bytes(tmp_path / "other") == tree_bytes(tmp_path / "clean")
    assert verify(store)[1] == []
    r = info(store)
    assert 1 <= r["mean_k"] < TOP_K and r["top_k"] == [f"≤{TOP_K} @ mass 0.035 (mean k {r['mean_k']:.2f})"]

    run_extraction(teacher, tmp_path / "fixed", 40, unit_tokens=64)
    fixed, ad = CacheReader(tmp_path / "fixed"), CacheReader(tmp_path / "clean")
    ks = set()
    for f, a in zip(requests(teacher, sequences(40))[0], requests(teacher, sequences(40), ADAPTIVE)[0]):
        ef, ea = fixed.get(f.key), ad.get(a.key)
        for row, k in enumerate(ea["k"]):
            ks.add(int(k))
            assert np.array_equal(ef["ids"][row, :k], ea["ids"][row, :k])
            assert np.array_equal(ef["logp"][row, :k], ea["logp"][row, :k])
        assert np.array_equal(ef["lse"], ea["lse"]) and np.array_equal(ef["label_logp"], ea["label_logp"])
    assert len(ks) > 1  # k really varies on this data


def test_adaptive_k_streams_padded_batches(teacher, tmp_path):
    """Training batches from an adaptive-K store: padded to the batch's largest k with −inf
    (absent) slots; every kept slot is the fixed-K store's."""
    seqs = sequences(8)
    run_extraction(teacher, tmp_path / "ad", 8, unit_tokens=1000, fmt=ADAPTIVE)
    run_extraction(teacher, tmp_path / "fixed", 8, unit_tokens=1000)
    ident = requests(teacher, seqs)[0][0].teacher
    examples = [{"prompt_ids": p, "chosen_ids": r} for p, r in seqs]

    def first(root, fmt):
        source = TeacherSource(CacheReader(root), fmt, {"teacher": ident})
        return next(iter(Batches(examples, [Field("chosen", "w", ("teacher",))], batch_size=8, pad_id=0,
                                 cache=source).epoch(0)))["w"]["teacher"]
    ad, fixed = first(tmp_path / "ad", ADAPTIVE), first(tmp_path / "fixed", FMT)
    m = ad["mask"]
    kept = torch.isfinite(ad["logp"])
    assert ad["ids"].shape[-1] == int(kept[m].sum(-1).max()) <= TOP_K and int(kept[m].sum(-1).min()) < TOP_K
    assert torch.equal(ad["ids"][kept & m[..., None]],
                       fixed["ids"][..., :ad["ids"].shape[-1]][kept & m[..., None]])
    assert torch.equal(ad["lse"], fixed["lse"]) and torch.equal(ad["mask"], fixed["mask"])
