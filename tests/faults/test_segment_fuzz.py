"""Hostile and damaged segments offered to `Store.import_segment` (what a pull, a push, an upload to
the service and a mirror's fetch all go through), fixed K and adaptive K: a valid segment, then
mutated — array metadata (shapes, chunk shapes, data types, codecs), the manifest, missing, extra,
truncated and flipped files, and values written with checksums that match them (NaN and ±inf
log-probs, unsorted or positive log-probs, ids outside the teacher's vocabulary, non-finite lse
and label log-probs). Every offer is refused with `SegmentRejected` and leaves nothing behind, or
is published and reads back exactly as the valid segment; hostile chunk declarations are refused
without decoding (peak memory of a fresh process, measured)."""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from distill_pipeline.cache.format import SCHEMA_VERSION, CacheFormat
from distill_pipeline.cache.reader import CacheReader
from distill_pipeline.cache.segment import (SegmentData, SegmentRejected, check_segment, segment_id,
                                            write_segment)
from distill_pipeline.cache.store import Store
from tests.conftest import ROOT

V, K = 64, 6  # the teacher's vocabulary, top-K
SEQS = [([1, 2, 3], [4, 5, 6, 7, 8]), ([9, 10], [11, 12, 13, 14, 15, 16, 17, 18]), ([5], [6, 7, 8])]
N = sum(len(r) for _, r in SEQS)
FORMATS = {"fixed": CacheFormat(K), "fixed-float32": CacheFormat(K, "float32"),
           "adaptive": CacheFormat(K, top_mass=0.9), "adaptive-bfloat16": CacheFormat(K, "bfloat16", top_mass=0.9)}
FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def teacher_values(fmt: CacheFormat, seed: int = 0) -> dict:
    """Valid rows: distinct ids < V, strictly decreasing log-probs exact in every storage dtype
    (multiples of 1/4), and for adaptive K per-token counts (the first token keeps all K)."""
    g = np.random.default_rng(seed)
    ids = np.stack([g.permutation(V)[:K] for _ in range(N)]).astype(np.int32)
    lp = -(np.arange(K, dtype=np.float32)[None, :] * 0.5 + g.integers(1, 8, (N, 1)) * 0.25).astype(np.float32)
    counts = None
    if fmt.adaptive:
        counts = g.integers(1, K + 1, N).astype(np.uint16)
        counts[0] = K
    return {"ids": ids, "lp": lp, "lse": g.normal(size=N).astype(np.float32),
            "label": (-g.random(N) * 4).astype(np.float32), "counts": counts}


def segment_files(fmt: CacheFormat, values: dict, folder: Path, *, vocab_size: int | None = V) -> tuple[str, dict]:
    """A segment of SEQS holding `values`, written by `write_segment` (so its checksums match
    whatever the values are): (its name, its files)."""
    ids, bits, counts = values["ids"], fmt.encode(values["lp"]), values["counts"]
    if counts is not None:
        keep = np.arange(K)[None, :] < counts[:, None].astype(np.int64)
        ids, bits = np.ascontiguousarray(ids[keep]), np.ascontiguousarray(bits[keep])
    entries, offset = [], 0
    for p, r in SEQS:
        entries.append({"key": fmt.key("t", p + r, len(p)), "teacher": "t", "offset": offset,
                        "n_tokens": len(r), "prompt_len": len(p), "token_ids": p + r})
        offset += len(r)
    data = SegmentData(ids=ids, logp_bits=bits, lse=values["lse"], label_logp=values["label"],
                       entries=entries, counts=counts)
    manifest = {"schema_version": SCHEMA_VERSION, "teacher": "t", "format": fmt.to_json(),
                "n_entries": len(entries), "n_tokens": offset, "reconstruction_kl": 0.0,
                **({"vocab_size": vocab_size} if vocab_size is not None else {}),
                **({"n_slots": int(len(ids))} if fmt.adaptive else {})}
    shutil.rmtree(folder, ignore_errors=True)
    write_segment(folder, data, manifest)
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return segment_id([e["key"] for e in entries]), files


ARRAYS_OF = {label: ["ids", "logp", "lse", "label_logp"] + (["counts"] if fmt.adaptive else [])
             for label, fmt in FORMATS.items()}
def blosc_chunk(values: np.ndarray, rows: int) -> bytes:
    """A chunk file of `rows` rows (zero-padded), as zarr writes it: blosc zstd + CRC32C. The
    padding is never touched (zero pages), so building a 480 MB chunk costs no memory here."""
    import google_crc32c
    from numcodecs import Blosc

    raw = np.zeros((rows,) + values.shape[1:], values.dtype)
    raw[:len(values)] = values
    frame = bytes(Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE).encode(raw))
    return frame + np.uint32(google_crc32c.value(frame)).tobytes()


def chunk_files(name: str, values: np.ndarray, chunks: list) -> dict | None:
    """The chunk files of `values` as zarr writes them in `chunks` — zero-padded, blosc zstd,
    CRC32C — or None where that is not one chunk grid over rows (or over blosc's 2 GB). What a
    writer declaring those chunks uploads: valid data that decodes, at the declared size."""
    if (len(chunks) != values.ndim or list(chunks[1:]) != list(values.shape[1:]) or chunks[0] < 1
            or chunks[0] * int(np.prod(values.shape[1:])) * values.itemsize > 2**31 - 64):
        return None
    rows, tail = chunks[0], "/0" * (values.ndim - 1)
    return {f"{name}/c/{i}{tail}": blosc_chunk(values[i * rows:(i + 1) * rows], rows)
            for i in range(-(-len(values) // rows))}


def read_all(store: Store | Path, name: str) -> dict:
    """Every entry of segment `name`, through the reader (checksums checked)."""
    import pyarrow.parquet as pq

    reader = CacheReader(store)
    root = store.root if isinstance(store, Store) else store
    keys = pq.read_table(root / "segments" / name / "index.parquet", columns=["key"]).column("key").to_pylist()
    return {k: reader.get(k) for k in keys}


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """Per format: the valid segment's name, files, stored arrays, and its entries as read back."""
    import zarr

    root = tmp_path_factory.mktemp("segment-fuzz")
    out = {}
    for label, fmt in FORMATS.items():
        name, files = segment_files(fmt, teacher_values(fmt), root / f"seg-{label}")
        ref = Store(root / f"ref-{label}")
        assert ref.import_segment(name, files)  # the valid segment is accepted …
        group = zarr.open_group(str(ref.root / "segments" / name), mode="r")
        out[label] = {"name": name, "files": files, "entries": read_all(ref, name), "root": root,
                      "arrays": {a: group[a][...] for a in ARRAYS_OF[label]}}
    return out


def offer(root: Path, name: str, files: dict) -> str | None:
    """Offer the files to a fresh store: the refusal's text (and nothing of it in the store), or
    None when published. Any other exception fails the test."""
    dst = Path(tempfile.mkdtemp(dir=root))
    store = Store(dst)
    try:
        try:
            assert store.import_segment(name, files)
        except SegmentRejected as exc:
            left = [p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file() and p.name != "store.json"]
            assert left == [], f"a refused segment left {left}"
            return str(exc)
        return None
    finally:
        if (dst / "segments" / name).exists():
            offer.last = read_all(store, name)  # read before the store is removed
        shutil.rmtree(dst, ignore_errors=True)


def same_entries(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        for f in ("ids", "logp", "lse", "label_logp", "k"):
            np.testing.assert_array_equal(got[k][f], want[k][f])


def refused_or_intact(case: dict, files: dict) -> str | None:
    """The weaker property, for mutations that may be harmless: refused, or read back as valid."""
    why = offer(case["root"], case["name"], files)
    if why is None:
        same_entries(offer.last, case["entries"])
    return why


# ---------------------------------------------------------------------------- the valid ones

def test_valid_segments_are_published_and_read_back(valid, tmp_path):
    for label, case in valid.items():
        assert offer(tmp_path, case["name"], case["files"]) is None, label
        same_entries(offer.last, case["entries"])
        seg = json.loads(case["files"]["zarr.json"])["attributes"]
        assert seg["vocab_size"] == V


def test_segments_without_a_recorded_vocabulary_still_verify(tmp_path):
    """Written before the manifest held vocab_size: ids are then checked to be ≥ 0 only (int32
    storage keeps them < 2**31), so an id past the teacher's vocabulary cannot be told apart."""
    fmt = FORMATS["fixed"]
    values = teacher_values(fmt)
    values["ids"][3, 0] = 10 * V  # no vocabulary recorded: nothing to check it against
    name, files = segment_files(fmt, values, tmp_path / "old", vocab_size=None)
    assert "vocab_size" not in json.loads(files["zarr.json"])["attributes"]
    assert offer(tmp_path, name, files) is None
    values["ids"][3, 0] = -1
    name, files = segment_files(fmt, values, tmp_path / "old", vocab_size=None)
    assert "teacher id -1 is outside [0, 2**31)" in offer(tmp_path, name, files)


# ---------------------------------------------------------------------------- values

VALUE_MUTATIONS = ["logp nan", "logp inf", "logp -inf", "logp positive", "logp unsorted", "id >= vocab",
                   "id < 0", "lse nan", "lse inf", "lse -inf", "label nan", "label inf", "label -inf",
                   "label positive"]


def mutate_values(values: dict, kind: str, row: int, by: int) -> None:
    lp, ids = values["lp"], values["ids"]
    field, what = kind.split(" ", 1)
    if kind == "logp unsorted":  # a token keeping ≥ 2 slots: swap its first two
        rows = [r for r in range(N) if values["counts"] is None or values["counts"][r] >= 2]
        r = rows[row % len(rows)]
        lp[r, [0, 1]] = lp[r, [1, 0]]
    elif field == "id":
        ids[row, 0] = V + by if what == ">= vocab" else -1 - by
    else:
        value = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "positive": 0.5}[what]
        if field == "logp":
            lp[row, 0] = value  # slot 0: kept by every token, also in adaptive K
        else:
            values[field][row] = value


@pytest.mark.parametrize("kind", VALUE_MUTATIONS)
@settings(FUZZ, max_examples=5)
@given(label=st.sampled_from(sorted(FORMATS)), row=st.integers(0, N - 1), by=st.integers(0, 2**31 - V - 1))
def test_values_out_of_bounds_are_refused_even_with_matching_checksums(valid, kind, label, row, by):
    """Whoever holds a write token can upload any values with checksums that match them: NaN
    log-probs once passed both the sort check and the ≤ 0 check."""
    fmt = FORMATS[label]
    values = teacher_values(fmt)
    mutate_values(values, kind, row, by)
    folder = Path(tempfile.mkdtemp(dir=valid[label]["root"]))
    name, files = segment_files(fmt, values, folder / "seg")
    shutil.rmtree(folder)
    why = offer(valid[label]["root"], name, files)
    assert why is not None, f"{kind} at row {row} was published"
    words = {"logp": "log-probs", "id": "teacher id", "lse": "lse", "label": "label log-probs"}[kind.split()[0]]
    assert words in why and "entry" in why and name in why, why


# ---------------------------------------------------------------------------- array metadata

DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16",
          "float32", "float64", "complex64"]
HUGE = [0, 1, 2, 7, 13, 4096, 131072, 20_000_000, 2**31, 2**40]


def codec_mutations(codecs: list) -> list:
    """Ways to change an array's codec chain, none of which `write_segment` ever writes."""
    named = {c["name"]: i for i, c in enumerate(codecs)}
    b = named["blosc"]

    def blosc(**conf):
        return [dict(c, configuration={**c["configuration"], **conf}) if i == b else c for i, c in enumerate(codecs)]
    out = [codecs[:i] + codecs[i + 1:] for i in range(len(codecs))]  # one left out
    out += [codecs[:i] + [codecs[i]] + codecs[i:] for i in range(len(codecs))]  # one doubled
    out += [list(reversed(codecs)), blosc(cname="lz4"), blosc(typesize=8), blosc(clevel=12),
            blosc(extra=1), [dict(c, configuration={"endian": "big"}) if c["name"] == "bytes" else c for c in codecs],
            [{"name": "transpose", "configuration": {"order": [0]}}] + codecs,
            codecs[:-1] + [{"name": "gzip", "configuration": {"level": 1}}, codecs[-1]],
            [{"name": "numcodecs.delta", "configuration": {"dtype": "<u8"}}]
            + [c for c in codecs if c["name"] != "numcodecs.delta"],
            [{"name": "sharding_indexed", "configuration": {"chunk_shape": [20_000_000],
                                                            "codecs": codecs, "index_codecs": codecs[-2:]}}],
            codecs[:-1] + [{"name": "crc32c", "configuration": {"x": 1}}]]
    return out


@pytest.mark.parametrize("kind", ["shape", "chunks", "dtype", "codecs", "key encoding", "transformers",
                                  "not an array", "not json"])
@settings(FUZZ, max_examples=10)
@given(data=st.data(), label=st.sampled_from(sorted(FORMATS)), pick=st.integers(0, 10**6),
       dims=st.lists(st.sampled_from(HUGE), min_size=0, max_size=3))
def test_array_metadata_other_than_written_is_refused(valid, kind, data, label, pick, dims):
    """Shapes, chunk shapes, data types, codecs: anything but what the manifest implies and
    `write_segment` writes is refused before a chunk is decoded."""
    case = valid[label]
    files = case["files"]
    name = data.draw(st.sampled_from(ARRAYS_OF[label]))
    meta = json.loads(case["files"][f"{name}/zarr.json"])
    new = json.loads(json.dumps(meta))
    if kind == "shape":
        new["shape"] = dims
    elif kind == "chunks":  # with chunk files that match them (logp: its delta filter is not redone)
        chunks = new["chunk_grid"]["configuration"]["chunk_shape"] = dims or [20_000_000] + meta["shape"][1:]
        encoded = chunk_files(name, case["arrays"][name], chunks) if name != "logp" else None
        if encoded is not None:
            files = {k: v for k, v in files.items() if not k.startswith(f"{name}/c/")} | encoded
    elif kind == "dtype":
        new["data_type"] = DTYPES[pick % len(DTYPES)]
    elif kind == "codecs":
        options = codec_mutations(meta["codecs"])
        new["codecs"] = options[pick % len(options)]
    elif kind == "key encoding":
        new["chunk_key_encoding"] = [{"name": "v2", "configuration": {"separator": "."}},
                                     {"name": "default", "configuration": {"separator": "."}}][pick % 2]
    elif kind == "transformers":
        new["storage_transformers"] = [{"name": "x"}]
    elif kind == "not an array":
        new["node_type"] = "group"
    blob = b"{" if kind == "not json" else json.dumps(new).encode()
    assume(kind == "not json" or new != meta)
    why = offer(case["root"], case["name"], {**files, f"{name}/zarr.json": blob})
    assert why is not None and f"array {name}" in why, f"{name}: {kind} {new if kind != 'not json' else ''}"


@FUZZ
@given(label=st.sampled_from(sorted(FORMATS)),
       key=st.sampled_from(["n_tokens", "n_entries", "n_slots", "vocab_size", "top_k", "dtype", "consolidated"]),
       value=st.one_of(st.integers(-3, 2**62), st.sampled_from([None, "13", 13.0, True, [], {}]),
                       st.floats(allow_nan=True, allow_infinity=True)))
def test_manifest_changes_are_refused_or_harmless(valid, label, key, value):
    """The manifest's counts, format and vocabulary: a change is refused, unless it is harmless —
    a larger vocabulary (the ids still lie within it), no vocabulary (read as a segment written
    before it was recorded: ids ≥ 0 only; leaving it out gains a writer nothing) or an n_slots
    in a fixed-K manifest (never read)."""
    case = valid[label]
    group = json.loads(case["files"]["zarr.json"])
    attrs = group["attributes"]
    if key in ("top_k", "dtype"):
        attrs["format"][key] = value
    elif key == "consolidated":  # zarr would read the arrays' metadata from here, not their zarr.json
        ids = json.loads(case["files"]["ids/zarr.json"])
        ids["chunk_grid"]["configuration"]["chunk_shape"][0] = 20_000_000
        group["consolidated_metadata"] = {"kind": "inline", "must_understand": False, "metadata": {"ids": ids}}
    else:
        attrs[key] = value
    assume(group != json.loads(case["files"]["zarr.json"]))
    files = {**case["files"], "zarr.json": json.dumps(group).encode()}
    why = refused_or_intact(case, files)
    max_id = max(int(e["ids"].max()) for e in case["entries"].values())
    harmless = (key == "vocab_size" and (value is None or type(value) is int and max(K, max_id + 1) <= value < 2**31)
                or key == "n_slots" and not FORMATS[label].adaptive)
    assert (why is None) == harmless, f"{key}={value!r}: {why}"


# ---------------------------------------------------------------------------- files

@pytest.mark.parametrize("kind", ["missing", "extra", "truncated", "flipped chunk", "flipped"])
@settings(FUZZ, max_examples=8)
@given(data=st.data(), label=st.sampled_from(sorted(FORMATS)), at=st.floats(0, 1, exclude_max=True),
       bit=st.integers(0, 7))
def test_missing_extra_truncated_and_flipped_files(valid, kind, data, label, at, bit):
    """Every file is needed and no other is taken (an extra chunk, an array the format has no
    use for); a truncated or flipped chunk is refused (its blosc header or CRC32C); a flipped
    byte anywhere else is refused or changes nothing that is read."""
    case = valid[label]
    files = dict(case["files"])
    chunks = [n for n in sorted(files) if "/c/" in n]
    if kind == "missing":
        del files[data.draw(st.sampled_from(sorted(files)))]
    elif kind == "extra":
        array = data.draw(st.sampled_from(["ids", "logp", "lse", "label_logp", "counts"]))
        if f"{array}/zarr.json" not in files:  # counts/ in a fixed-K segment
            files[f"{array}/zarr.json"] = files["lse/zarr.json"]
            files[f"{array}/c/0"] = files["lse/c/0"]
        else:  # a chunk past the array's grid (each array here is one chunk)
            two_d = any(n.startswith(f"{array}/c/0/") for n in chunks)
            files[f"{array}/c/{data.draw(st.integers(1, 9))}" + ("/0" if two_d else "")] = \
                files[data.draw(st.sampled_from(chunks))]
    else:
        target = data.draw(st.sampled_from(chunks if kind != "flipped" else sorted(files)))
        blob = bytearray(files[target])
        i = int(at * len(blob))
        if kind == "truncated":
            blob = blob[:i]
        else:
            blob[i] ^= 1 << bit
        files[target] = bytes(blob)
    why = refused_or_intact(case, files)
    if kind != "flipped":
        assert why is not None, f"{kind}: published"


def test_an_array_its_format_has_no_use_for_is_refused(valid, tmp_path):
    """counts/ beside a fixed-K segment's arrays: nothing reads it, and nothing should carry it."""
    case = valid["fixed"]
    files = {**case["files"], "counts/zarr.json": case["files"]["lse/zarr.json"],
             "counts/c/0": case["files"]["lse/c/0"]}
    why = offer(tmp_path, case["name"], files)
    assert why is not None and "array counts is not part of a fixed-K segment" in why, why


# ---------------------------------------------------------------------------- memory

IMPORT = """
import pickle, sys
from distill_pipeline.cache.segment import SegmentRejected
from distill_pipeline.cache.store import Store
name, files, dst = pickle.load(open(sys.argv[1], "rb"))
try:
    outcome = "published" if Store(dst).import_segment(name, files) else "exists"
except SegmentRejected as exc:
    outcome = "rejected: " + str(exc)
# this process's own peak: ru_maxrss survives execve, so it would count the forking test process
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) // 1024)
print(outcome)
"""
ROWS = 20_000_000
LIMIT_MB = 300  # a fresh process importing numpy, pyarrow and zarr peaks near 125 MB (VmHWM)


def import_in_fresh_process(tmp_path: Path, name: str, files: dict) -> tuple[int, str]:
    blob = tmp_path / "offer.pkl"
    blob.write_bytes(pickle.dumps((name, files, str(tmp_path / "dst"))))
    r = subprocess.run([sys.executable, "-c", IMPORT, str(blob)], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    peak, outcome = r.stdout.strip().split("\n", 1)
    return int(peak), outcome


@pytest.mark.parametrize("label", ["fixed", "adaptive"])
def test_declared_huge_chunks_are_refused_without_decoding(valid, tmp_path, label):
    """A valid segment whose ids and lse declare 20,000,000-row chunks (a ~60 KB upload; before
    this check it was published, and verifying it decoded ~480 MB of ids)."""
    case = valid[label]
    files = dict(case["files"])
    for name in ("ids", "lse"):
        meta = json.loads(files[f"{name}/zarr.json"])
        chunks = meta["chunk_grid"]["configuration"]["chunk_shape"] = [ROWS] + meta["shape"][1:]
        files[f"{name}/zarr.json"] = json.dumps(meta).encode()
        files.update(chunk_files(name, case["arrays"][name], chunks))
    peak, outcome = import_in_fresh_process(tmp_path, case["name"], files)
    assert outcome.startswith("rejected: ") and "array ids declares chunks [20000000" in outcome, outcome
    assert peak < LIMIT_MB, f"verifying a {sum(map(len, files.values()))}-byte upload peaked at {peak} MB"


def test_a_chunk_whose_blosc_header_declares_more_than_its_shape_is_refused_without_decoding(valid, tmp_path):
    """Metadata as written, but the chunk file inside compresses 20,000,000 rows: blosc would
    allocate what its header declares before zarr could notice the size."""
    case = valid["fixed"]
    files = {**case["files"], "ids/c/0/0": blosc_chunk(case["arrays"]["ids"], ROWS)}
    peak, outcome = import_in_fresh_process(tmp_path, case["name"], files)
    assert outcome.startswith("rejected: ") and "array ids chunk 0" in outcome and "declares" in outcome, outcome
    assert peak < LIMIT_MB, f"peaked at {peak} MB"


def test_an_index_claiming_more_rows_than_its_bytes_hold_is_refused(tmp_path):
    """One key repeated: dictionary encoding makes 200,000 rows a few KB of parquet, and the
    id is the hash of those keys — refused from the footer, before a row is read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fmt = FORMATS["fixed"]
    name, files = segment_files(fmt, teacher_values(fmt), tmp_path / "seg")
    key = pq.read_table(pa.BufferReader(files["index.parquet"])).column("key")[0].as_py()
    table = pa.table({"key": pa.array([key] * 200_000)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    files["index.parquet"] = sink.getvalue().to_pybytes()
    name = segment_id([key] * 200_000)
    why = offer(tmp_path, name, files)
    assert why is not None and "index.parquet claims 200000 rows" in why, why
