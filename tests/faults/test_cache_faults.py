"""Damaged teacher-logit caches, through the real CLI: each case breaks a small store one way and
checks the exit code, that no traceback reaches the user, and the words of the message (what is
broken, where, what to do). Also: `cache gc` against a live writer, `verify --run`, `gc --damaged`,
and the reader catching damage (swapped chunks included) as it decodes entries."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill_pipeline.cache.node import write_node_file
from distill_pipeline.cache.reader import CacheReader
from distill_pipeline.cache.segment import CacheError
from distill_pipeline.cache.store import Store
from tests.conftest import ROOT
from tests.invariants.helpers import FMT, make_teacher, requests, run_extraction, sequences

N_SEQ, UNIT_TOKENS = 24, 60  # 4 segments, two of them with the same number of rows


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One extraction per module; every test works on its own copy of it."""
    root = tmp_path_factory.mktemp("cache-faults")
    teacher = make_teacher(root / "teacher")
    run_extraction(teacher, root / "store", N_SEQ, unit_tokens=UNIT_TOKENS)
    reqs, _ = requests(teacher, sequences(N_SEQ))
    return {"root": root, "teacher": teacher, "keys": [r.key for r in reqs],
            "identity": reqs[0].teacher}


@pytest.fixture
def store(base, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(base["root"] / "store", dst)
    return dst


def make_run(base, tmp_path: Path, store: Path) -> Path:
    """A run dir with one published teacher_logits node standing for every entry of the store
    (written with the stage's own writer), and an unrelated node that verify must ignore."""
    run = tmp_path / "run"
    node = run / "teacher_logits-0123abcd"
    node.mkdir(parents=True)
    write_node_file(node, Store(store), FMT, "pairs", {"teacher": {"identity": base["identity"],
                                                            "path": str(base["teacher"])}}, base["keys"])
    (node / "manifest.json").write_text(json.dumps({"node": "teacher_logits", "stage": "teacher_logits"}))
    other = run / "sft.student-4567ef01"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"node": "sft.student", "stage": "sft"}))
    return run


def cache(*args) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "distill_pipeline.cli.main", "cache", *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "DISTILL_PROGRESS": "0"})
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    assert "this is a bug" not in out, out  # the CLI's last line of defence was not reached
    return r.returncode, out


def has(out: str, *words: str) -> None:
    missing = [w for w in words if w not in out]
    assert not missing, f"{missing} not in:\n{out}"


def segments(store: Path) -> list[Path]:
    return sorted(p for p in (store / "segments").iterdir())


def manifest(seg: Path) -> dict:
    return json.loads((seg / "zarr.json").read_text())["attributes"]


def chunk(seg: Path, field: str) -> Path:
    return next(p for p in sorted((seg / field / "c").rglob("*")) if p.is_file())


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def keys_of(seg: Path) -> set[str]:
    import pyarrow.parquet as pq

    return set(pq.read_table(seg / "index.parquet", columns=["key"]).column("key").to_pylist())


# ---------------------------------------------------------------------------- healthy and empty


def test_healthy_store_every_command_succeeds(store):
    code, out = cache("ls", "--store", store)
    assert code == 0 and "4 segment(s)" in out and "DAMAGED" not in out
    code, out = cache("info", "--store", store)
    assert code == 0 and f"entries          {N_SEQ}" in out
    code, out = cache("verify", "--store", store)
    assert code == 0 and f"ok: {N_SEQ} entries verified" in out
    code, out = cache("gc", "--store", store)
    assert code == 0 and "0 item(s)" in out


def test_empty_store(tmp_path):
    Store(tmp_path / "empty")
    code, out = cache("ls", "--store", tmp_path / "empty")
    assert code == 0 and "0 segment(s)" in out
    code, out = cache("info", "--store", tmp_path / "empty")
    assert code == 0 and "entries          0" in out
    code, out = cache("verify", "--store", tmp_path / "empty")
    assert code == 0 and "ok: 0 entries verified" in out


# ---------------------------------------------------------------------------- the store itself


@pytest.mark.parametrize("command", ["ls", "info", "verify", "gc"])
def test_store_path_that_does_not_exist(tmp_path, command):
    code, out = cache(command, "--store", tmp_path / "nowhere")
    assert code == 1
    has(out, "no teacher-logit cache at", str(tmp_path / "nowhere"), "does not exist", "--store")
    assert not (tmp_path / "nowhere").exists()  # looking never creates a store


def test_store_path_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("not a cache")
    for command in ("ls", "verify"):
        code, out = cache(command, "--store", tmp_path / "file")
        assert code == 1
        has(out, str(tmp_path / "file"), "is a file", "--store")
    with pytest.raises(CacheError, match="is a file"):  # the pipeline's writer too
        Store(tmp_path / "file")


def test_directory_without_store_json(tmp_path):
    (tmp_path / "d").mkdir()
    code, out = cache("info", "--store", tmp_path / "d")
    assert code == 1
    has(out, "no teacher-logit cache at", "no store.json", "distill-pipeline cache init")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", "\xff\xfe"])
def test_store_json_not_a_json_object(store, content):
    (store / "store.json").write_text(content, errors="surrogateescape")
    for command in ("ls", "info", "verify", "gc"):
        code, out = cache(command, "--store", store)
        assert code == 1, command
        has(out, str(store / "store.json"), "damaged", "echo '{\"schema_version\": 1",
            "distill-pipeline cache verify --store")
    with pytest.raises(CacheError, match="store.json is damaged"):  # as the pipeline opens it
        Store(store)


def test_missing_segments_dir(store, base, tmp_path):
    shutil.rmtree(store / "segments")
    for command, words in (("ls", "0 segment(s)"), ("info", "entries          0"),
                           ("verify", "ok: 0 entries verified"), ("gc", "0 item(s)")):
        code, out = cache(command, "--store", store)
        assert code == 0, command
        has(out, words, "segments is missing", "distill-pipeline run teacher_logits")
    run = make_run(base, tmp_path, store)  # what a run expects is gone: verify --run says so
    code, out = cache("verify", "--store", store, "--run", run)
    assert code == 1
    has(out, f"{N_SEQ} of {N_SEQ} entries missing", "teacher_logits-0123abcd",
        "distill-pipeline run teacher_logits")
    Store(store)  # a writer recreates it, so a publish is never lost
    assert (store / "segments").is_dir()


# ---------------------------------------------------------------------------- damaged segments


def test_corrupt_chunk(store):
    seg = segments(store)[1]
    flip_byte(chunk(seg, "logp"))
    code, out = cache("info", "--store", store)
    assert code == 1
    has(out, seg.name, "array logp chunk 0", "corrupt", "damaged", "3 healthy, 1 damaged",
        "cache gc --damaged --store", "distill-pipeline run teacher_logits")
    code, out = cache("verify", "--store", store)
    assert code == 1
    has(out, seg.name, "array logp chunk 0", "corrupt", "1 problem(s)", "cache gc --damaged")


def test_info_json_lists_damage(store):
    seg = segments(store)[0]
    flip_byte(chunk(seg, "logp"))  # info decodes the log-probs (for the top-K mass)
    code, out = cache("info", "--store", store, "--json")
    assert code == 1
    data = json.loads(out[: out.index("\nerror:")])
    assert list(data["damaged"]) == [seg.name] and data["segments"] == 3


def test_corrupt_segment_manifest(store):
    seg = segments(store)[2]
    (seg / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gr')
    code, out = cache("ls", "--store", store)
    assert code == 1
    has(out, seg.name, "DAMAGED", "zarr.json", "unreadable", "4 segment(s), 1 damaged",
        "cache verify --store", "cache gc --damaged --store")
    code, out = cache("verify", "--store", store)
    assert code == 1 and seg.name in out and "zarr.json" in out


def test_missing_segment_manifest(store):
    seg = segments(store)[0]
    (seg / "zarr.json").unlink()
    code, out = cache("ls", "--store", store)
    assert code == 1
    has(out, seg.name, "DAMAGED", "zarr.json", "missing", "cache gc --damaged")
    code, out = cache("info", "--store", store)
    assert code == 1 and seg.name in out


def test_corrupt_array_metadata(store):
    seg = segments(store)[3]
    (seg / "lse" / "zarr.json").write_text("garbage")
    code, out = cache("ls", "--store", store)
    assert code == 1
    has(out, seg.name, "DAMAGED", "array lse", "cache gc --damaged")


def test_truncated_index(store):
    seg = segments(store)[0]
    truncate(seg / "index.parquet")
    code, out = cache("ls", "--store", store)
    assert code == 1  # not called healthy
    has(out, seg.name, "DAMAGED", "index.parquet is unreadable", "truncated", "1 damaged",
        "cache gc --damaged")
    code, out = cache("info", "--store", store)
    assert code == 1
    has(out, seg.name, "index.parquet", "3 healthy, 1 damaged")
    code, out = cache("verify", "--store", store)
    assert code == 1 and "index.parquet is unreadable" in out


def test_incomplete_segment_is_named_and_collected(store):
    seg = segments(store)[1]
    (seg / "index.parquet").unlink()
    code, out = cache("ls", "--store", store)
    assert code == 1
    has(out, seg.name, "no index.parquet", "incomplete segment")
    code, out = cache("gc", "--store", store)
    assert code == 0
    has(out, f"removed segments/{seg.name} (incomplete segment)", "1 item(s)")
    assert not seg.exists()


def test_deleted_chunk_file_is_caught_by_checksum(store):
    """zarr reads a missing chunk as zeros without complaint: the chunk count (every check) and
    the entry checksums (the reader) notice."""
    seg = segments(store)[2]
    chunk(seg, "lse").unlink()
    code, out = cache("verify", "--store", store)
    assert code == 1
    has(out, seg.name, "array lse has 0 chunk file(s), its shape needs 1", "cache gc --damaged")


def test_swapped_chunks_are_caught(store):
    """Two chunks, each with a valid CRC, swapped between segments of the same size: verify and
    the reader both notice (the per-entry checksums), before and not after training on them."""
    by_rows: dict[int, list[Path]] = {}
    for seg in segments(store):
        by_rows.setdefault(manifest(seg)["n_tokens"], []).append(seg)
    a, b = next(v for v in by_rows.values() if len(v) >= 2)[:2]
    key = sorted(keys_of(a))[0]
    assert CacheReader(store).get(key)["lse"].shape[0] > 0  # readable before
    ca, cb = chunk(a, "lse"), chunk(b, "lse")
    da, db = ca.read_bytes(), cb.read_bytes()
    ca.write_bytes(db)
    cb.write_bytes(da)
    code, out = cache("verify", "--store", store)
    assert code == 1
    has(out, a.name, b.name, "checksum mismatch")
    with pytest.raises(CacheError) as err:
        CacheReader(store).get(key)
    has(str(err.value), a.name, key[:16], "does not match the checksum",
        f"distill-pipeline cache verify --store {store}", "cache gc --damaged",
        "distill-pipeline run teacher_logits")


def test_reader_names_segment_of_corrupt_chunk(store):
    seg = segments(store)[0]
    flip_byte(chunk(seg, "logp"))
    key = sorted(keys_of(seg))[0]
    with pytest.raises(CacheError) as err:  # not zarr's bare ValueError
        CacheReader(store).get(key)
    has(str(err.value), seg.name, key[:16], "damaged", "cache verify --store", "cache gc --damaged")


def test_reader_with_truncated_index(store):
    seg = segments(store)[1]
    keys = keys_of(seg)
    other = sorted(keys_of(segments(store)[0]))[0]
    import pyarrow.parquet as pq

    tokens = dict(zip(*pq.read_table(seg / "index.parquet", columns=["key", "token_ids"]).to_pydict().values()))
    truncate(seg / "index.parquet")
    reader = CacheReader(store)  # keys come from the consolidated index: the other segments read
    assert reader.get(other)["ids"].shape[1] == FMT.top_k
    key = sorted(keys)[0]
    with pytest.raises(CacheError) as err:  # the token check reads the segment's own index
        reader.get(key, expect_tokens=tokens[key])
    has(str(err.value), seg.name, key[:16], "damaged", "cache gc --damaged")


# ---------------------------------------------------------------------------- gc


def test_gc_never_touches_a_live_writer(store):
    """An in-flight write of a running process survives `gc --older-than 0` whatever its age;
    once the process is gone, it is collected."""
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import os, sys, time\n"
         "p = os.path.join(sys.argv[1], 'tmp', f'abc123.{os.getpid()}.{time.time_ns()}')\n"
         "os.makedirs(os.path.join(p, 'ids'))\n"
         "print(p, flush=True)\n"
         "time.sleep(120)\n", str(store)], stdout=subprocess.PIPE, text=True)
    try:
        tmp = Path(child.stdout.readline().strip())
        old = time.time() - 86400
        os.utime(tmp, (old, old))  # a day old: only its owner being alive protects it
        code, out = cache("gc", "--store", store, "--older-than", "0")
        assert code == 0
        has(out, f"kept tmp/{tmp.name}", f"running process {child.pid}", "0 item(s)")
        assert tmp.is_dir()
    finally:
        child.kill()
        child.wait()
    code, out = cache("gc", "--store", store, "--older-than", "0")
    assert code == 0
    has(out, f"removed tmp/{tmp.name} (abandoned write)", "1 item(s)")
    assert not tmp.exists()


def test_gc_never_touches_a_live_writer_on_another_host(store):
    """A write whose pid means nothing here (another host's process on a shared store) is kept
    while its writer holds the write's flock — what `Store.publish` does — whatever its age."""
    code_ = ("import sys, time; from pathlib import Path; from distill_pipeline.cache.store import writer_lock\n"
             "tmp = Path(sys.argv[1]) / 'tmp' / 'abc123.999999999.1'\n"
             "with writer_lock(tmp):\n    tmp.mkdir()\n    print(tmp, flush=True)\n    time.sleep(120)\n")
    child = subprocess.Popen([sys.executable, "-c", code_, str(store)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        tmp = Path(child.stdout.readline().strip())
        old = time.time() - 86400
        os.utime(tmp, (old, old))
        code, out = cache("gc", "--store", store, "--older-than", "0")
        assert code == 0 and tmp.is_dir()
        has(out, f"kept tmp/{tmp.name}", "being written by a running process", "0 item(s)")
    finally:
        child.kill()
        child.wait()
    code, out = cache("gc", "--store", store, "--older-than", "0")
    has(out, f"removed tmp/{tmp.name} (abandoned write)")
    assert not tmp.exists() and not tmp.with_name(tmp.name + ".lock").exists()


def test_gc_keeps_a_dead_writers_recent_write_within_grace(store):
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True)
    dead = int(child.stdout)
    tmp = store / "tmp" / f"abc123.{dead}.{time.time_ns()}"
    tmp.mkdir()
    (store / "tmp" / "stray-file").write_text("x")  # not named like a write: age alone decides
    code, out = cache("gc", "--store", store)  # default grace: 60 minutes
    assert code == 0 and "0 item(s)" in out and tmp.exists()
    code, out = cache("gc", "--store", store, "--older-than", "0", "--dry-run")
    assert code == 0
    has(out, f"would remove tmp/{tmp.name}", "would remove tmp/stray-file", "2 item(s)")
    assert tmp.exists()


def test_gc_damaged_lists_then_removes(store, base, tmp_path):
    bad = segments(store)[2]
    flip_byte(chunk(bad, "label_logp"))
    lost = keys_of(bad)
    code, out = cache("gc", "--store", store, "--damaged", "--dry-run")
    assert code == 0
    has(out, f"damaged segment {bad.name}", "array label_logp chunk 0", f"would remove segments/{bad.name}",
        "1 item(s)", "without --dry-run")
    assert bad.exists()
    code, out = cache("gc", "--store", store, "--damaged")
    assert code == 0
    has(out, f"removed segments/{bad.name} (damaged", "distill-pipeline run teacher_logits")
    assert not bad.exists() and len(segments(store)) == 3
    assert cache("verify", "--store", store)[0] == 0
    assert Store(store, create=False).missing(base["keys"]) == lost
    run_extraction(base["teacher"], store, N_SEQ, unit_tokens=UNIT_TOKENS)  # what the rerun does
    assert Store(store).missing(base["keys"]) == set()
    assert cache("verify", "--store", store, "--run", make_run(base, tmp_path, store))[0] == 0


def test_gc_drop_teacher_with_a_damaged_manifest(store):
    seg = segments(store)[0]
    (seg / "zarr.json").write_text("{")
    code, out = cache("gc", "--store", store, "--drop-teacher", "ffff")
    assert code == 0 and "0 item(s)" in out and seg.is_dir()  # damaged, but not this teacher's


# ---------------------------------------------------------------------------- verify --run and lost entries


def test_verify_run_after_a_segment_is_deleted(store, base, tmp_path):
    run = make_run(base, tmp_path, store)
    code, out = cache("verify", "--store", store, "--run", run)
    assert code == 0
    has(out, f"all {N_SEQ} entries present", "1 teacher_logits node(s) complete")
    gone = segments(store)[1]
    n = len(keys_of(gone))
    shutil.rmtree(gone)
    code, out = cache("verify", "--store", store)  # its commit record is still there: reported
    assert code == 1
    has(out, gone.name, "cache gc --damaged")
    code, out = cache("verify", "--run", run)  # the store is found through the node's teachers.json
    assert code == 1
    has(out, f"{n} of {N_SEQ} entries missing from {store}", "teacher_logits-0123abcd",
        "distill-pipeline run teacher_logits", "lack entries")
    assert "sft.student" not in out
    code, out = cache("verify", "--help")
    has(out, "--run", "deleted whole", "commit record")


def test_verify_run_counts_entries_in_damaged_segments(store, base, tmp_path):
    run = make_run(base, tmp_path, store)
    seg = segments(store)[0]
    flip_byte(chunk(seg, "ids"))
    code, out = cache("verify", "--run", run)
    assert code == 1
    has(out, f"0 of {N_SEQ} entries missing", f"{len(keys_of(seg))} more in damaged segments",
        "cache gc --damaged", "distill-pipeline run teacher_logits")


def test_verify_run_with_a_damaged_node(store, base, tmp_path):
    run = make_run(base, tmp_path, store)
    truncate(run / "teacher_logits-0123abcd" / "keys.parquet")
    code, out = cache("verify", "--store", store, "--run", run)
    assert code == 1
    has(out, "teacher_logits-0123abcd", "keys.parquet cannot be read", "distill-pipeline run teacher_logits")


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_verify_run_dir_that_is_not_a_directory(store, tmp_path, kind):
    run = tmp_path / "run"
    if kind == "file":
        run.write_text("x")
    code, out = cache("verify", "--store", store, "--run", run)
    assert code == 1
    has(out, f"run dir {run}", "does not exist" if kind == "missing" else "is not a directory", "--run")


def test_store_missing_keys(store, base):
    s = Store(store, create=False)
    assert s.missing(base["keys"]) == set() and s.missing([]) == set()
    assert s.missing(["0" * 64]) == {"0" * 64}
    seg = segments(store)[3]
    lost = keys_of(seg)
    truncate(seg / "index.parquet")  # unreadable index: its entries count as absent
    assert s.missing(base["keys"]) == lost


def test_rerun_replaces_a_segment_with_an_unreadable_index(store, base):
    """Without gc: the rerun extraction sees the entries as missing and republishes the unit over
    the damaged folder (a publish never silently keeps a segment nobody can read)."""
    seg = segments(store)[0]
    truncate(seg / "index.parquet")
    stats = run_extraction(base["teacher"], store, N_SEQ, unit_tokens=UNIT_TOKENS)
    assert stats["extracted"] == len(keys_of(seg)) and stats["units"] == 1
    assert Store(store).missing(base["keys"]) == set()
    code, out = cache("verify", "--store", store)
    assert code == 0 and f"ok: {N_SEQ} entries verified" in out


# ---------------------------------------------------------------------------- stale identities


def test_segments_of_an_older_identity_scheme_are_counted_and_collected(store):
    """A segment without `identity_version` (written before content identities) holds keys no run
    computes any more: `cache info` counts it as stale, `gc --stale` removes only it."""
    assert all(manifest(s)["identity_version"] == 1 for s in segments(store))
    old = segments(store)[0]
    meta = json.loads((old / "zarr.json").read_text())
    del meta["attributes"]["identity_version"]
    (old / "zarr.json").write_text(json.dumps(meta))
    n_old = manifest(old)["n_entries"]
    code, out = cache("info", "--store", store)
    assert code == 0
    has(out, f"stale            1 segment(s), {n_old} entries", "cache gc --stale")
    code, out = cache("gc", "--store", store)  # not without --stale
    assert code == 0 and old.exists() and "0 item(s)" in out
    code, out = cache("gc", "--store", store, "--stale", "--dry-run")
    has(out, f"would remove segments/{old.name} (stale: keyed by an older teacher identity scheme "
             "(no identity version (before content identities)")
    code, out = cache("gc", "--store", store, "--stale")
    assert code == 0 and not old.exists() and len(segments(store)) == 3
    code, out = cache("info", "--store", store)
    assert "stale" not in out


# ---------------------------------------------------------------------------- consolidated index


def test_a_segment_published_again_after_packing_is_read_with_its_new_values(store, monkeypatch):
    """Removed after its index rows were packed, then published again under the same id (same
    keys) with other values (another machine's rounding): the index keeps the newest rows, so
    the reader checks the new checksums and returns the new values."""
    import numpy as np
    import pyarrow.parquet as pq
    import zarr

    from distill_pipeline.cache import index as index_mod
    from distill_pipeline.cache.reader import CacheReader
    from distill_pipeline.cache.segment import SegmentData

    monkeypatch.setattr(index_mod, "PACK_AT", 1)
    s = Store(store)
    first = segments(store)[0]
    s._pack_index()  # every index row is now in a pack
    assert list((store / "index").glob("*/pack-*.arrow"))  # partitioned packs (cache/index.py)
    assert not list((store / "index").glob("*.parquet"))
    g = zarr.open_group(str(first), mode="r")
    rows = pq.read_table(first / "index.parquet").to_pylist()
    data = SegmentData(ids=g["ids"][:], logp_bits=g["logp"][:], lse=g["lse"][:] + np.float32(0.5),
                       label_logp=g["label_logp"][:], entries=rows)
    attrs = dict(g.attrs)
    s.remove_segment(first.name)
    assert s.publish(first.name, data, attrs)
    key = rows[0]["key"]
    got = CacheReader(store).get(key)  # checked against the checksum the index holds for it
    new = zarr.open_group(str(store / "segments" / first.name), mode="r")["lse"][: rows[0]["n_tokens"]]
    assert (got["lse"] == new).all()
    checks = {r["key"]: r["checksum"] for r in s.index_table().to_pylist() if r["segment"] == first.name}
    assert checks[key] == pq.read_table(store / "segments" / first.name / "index.parquet").to_pylist()[0]["checksum"]


def test_store_url_with_a_slash_missing_is_refused():
    from distill_pipeline.cache.remote import open_store

    for url, meant in (("s3:/bucket/x", "s3://bucket/x"), ("grpc:/host:8815", "grpc://host:8815")):
        with pytest.raises(CacheError, match=f"did you mean {meant}"):
            open_store(url)


# ---------------------------------------------------------------------------- issue 18: what segments declare


def test_verify_and_gc_a_committed_segment_whose_folder_is_gone(store, base):
    """Its commit record and index file still say it is published (readers look its entries up
    there and fail): verify names it and the fix, `gc --damaged` drops the records, and its
    entries count as missing, to be extracted again."""
    gone = segments(store)[1]
    lost = keys_of(gone)
    shutil.rmtree(gone)
    assert (store / "commits" / f"{gone.name}.json").exists() and (store / "index" / f"{gone.name}.parquet").exists()
    code, out = cache("verify", "--store", store)
    assert code == 1
    has(out, gone.name, f"segments/{gone.name} is gone", f"commits/{gone.name}.json", "1 problem(s)",
        f"cache gc --damaged --store {store}", "distill-pipeline run teacher_logits")
    code, out = cache("gc", "--store", store, "--damaged", "--dry-run")
    assert code == 0 and (store / "commits" / f"{gone.name}.json").exists()
    code, out = cache("gc", "--store", store, "--damaged")
    assert code == 0
    has(out, f"removed commits/{gone.name}.json and index/{gone.name}.parquet (segment folder gone)",
        "distill-pipeline run teacher_logits")
    assert not (store / "commits" / f"{gone.name}.json").exists()
    assert not (store / "index" / f"{gone.name}.parquet").exists()
    code, out = cache("verify", "--store", store)
    assert code == 0 and f"ok: {N_SEQ - len(lost)} entries verified" in out
    assert Store(store, create=False).missing(base["keys"]) == lost


def rewrite_segment(seg: Path, change) -> None:
    """Write a segment again with `change(arrays)` applied, through `write_segment`, so its entry
    checksums match the changed values (what a writer with bad values produces)."""
    import pyarrow.parquet as pq
    import zarr

    from distill_pipeline.cache.segment import SegmentData, write_segment

    g = zarr.open_group(str(seg), mode="r")
    arrays = {f: g[f][:] for f in ("ids", "logp", "lse", "label_logp")}
    attrs, rows = dict(g.attrs), pq.read_table(seg / "index.parquet").to_pylist()
    change(arrays)
    shutil.rmtree(seg)
    write_segment(seg, SegmentData(ids=arrays["ids"], logp_bits=arrays["logp"], lse=arrays["lse"],
                                   label_logp=arrays["label_logp"], entries=rows), attrs)


@pytest.mark.parametrize("kind", ["nan log-prob", "id past the vocabulary", "inf lse"])
def test_verify_finds_bad_values_whose_checksums_match(store, base, kind):
    """Extraction records the teacher's vocabulary in every manifest; verify checks ids against it
    and that log-probs, lse and label log-probs are finite (a NaN once passed every check)."""
    vocab = json.loads((base["teacher"] / "config.json").read_text())["vocab_size"]
    assert all(manifest(s)["vocab_size"] == vocab for s in segments(store))
    seg = segments(store)[0]

    def change(a):
        if kind == "nan log-prob":
            a["logp"][1, 0] = 0x7E00  # float16 NaN
        elif kind == "inf lse":
            a["lse"][1] = float("inf")
        else:
            a["ids"][1, 0] = vocab

    rewrite_segment(seg, change)
    words = {"nan log-prob": "top-K log-probs are not finite", "inf lse": "lse (the logsumexp) is not finite",
             "id past the vocabulary": f"teacher id {vocab} is outside the teacher's vocabulary [0, {vocab})"}[kind]
    code, out = cache("verify", "--store", store)
    assert code == 1
    has(out, seg.name, "entry 0", words, "1 problem(s)", "cache gc --damaged")


@pytest.mark.parametrize("mass", [FMT.top_k + 0.5, -0.1, "0.9"])
def test_a_manifest_topk_mass_the_top_k_cannot_hold_is_damage(store, mass):
    """Extraction records the mean top-K mass per token (what `cache info` shows for a remote
    store without fetching its segments); one that K slots of probability ≤ 1 cannot hold is named."""
    seg = segments(store)[2]
    assert 0 < manifest(seg)["topk_mass"] <= 1
    meta = json.loads((seg / "zarr.json").read_text())
    meta["attributes"]["topk_mass"] = mass
    (seg / "zarr.json").write_text(json.dumps(meta))
    code, out = cache("ls", "--store", store)
    assert code == 1
    has(out, seg.name, "DAMAGED", "manifest topk_mass", "is not a mass the top-", "1 damaged")


def test_a_lossy_format_may_record_a_mass_above_one(store):
    """Rounding log-probs to a few mantissa bits (logp_keep_bits 1-3) can store slightly more
    than probability 1 in a confident teacher's top-K: that is not damage."""
    seg = segments(store)[1]
    meta = json.loads((seg / "zarr.json").read_text())
    meta["attributes"]["topk_mass"] = 1.024
    (seg / "zarr.json").write_text(json.dumps(meta))
    code, out = cache("ls", "--store", store)
    assert code == 0 and "DAMAGED" not in out, out


def test_a_teacher_id_outside_the_students_vocabulary_names_its_segment(store, base):
    """A cache extracted with a teacher of a larger vocabulary than the student's: the loss's
    gather would fail with a bare index error; the batch's ids are checked first."""
    from types import SimpleNamespace

    import torch

    from distill_pipeline.batches import Batches, TeacherSource, fields_for, loss_fn_for
    from distill_pipeline.losses import LOSSES

    spec = LOSSES["vanilla_kd"]
    examples = [{"prompt_ids": p, "chosen_ids": r} for p, r in sequences(N_SEQ)]
    stream = Batches(examples, fields_for(spec), batch_size=4, pad_id=0,
                     cache=TeacherSource(CacheReader(store), FMT, {"teacher": base["identity"]}))
    batch = next(iter(stream.epoch(0)))
    top = int(batch["w"]["teacher"]["ids"].max())

    def student(vocab):
        return lambda input_ids, attention_mask: SimpleNamespace(
            logits=torch.zeros(*input_ids.shape, vocab, requires_grad=True))

    fn = loss_fn_for(spec, {})
    with pytest.raises(CacheError) as err:
        fn(student(top), batch, None)  # the largest teacher id has no student logit
    text = str(err.value)
    has(text, f"teacher id {top} in cache segment", "entry", str(store), f"vocabulary of {top} tokens",
        "share one tokenizer", f"distill-pipeline cache verify --store {store}")
    assert any(s.name in text for s in segments(store))
    loss, _ = fn(student(top + 1), batch, None)  # every id within the vocabulary: a loss
    assert torch.isfinite(loss)
