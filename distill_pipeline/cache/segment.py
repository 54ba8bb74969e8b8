"""One cache segment: its files, how they are written, and everything that checks them.

A segment is one immutable unit of extraction output (the layout is in `store.py`'s docstring):

    zarr.json                     zarr v3 group; its attributes are the segment manifest
    ids/, logp/, lse/, label_logp/ [, counts/]   the arrays, chunked along the token axis
    index.parquet                 one row per entry (INDEX_COLUMNS), written last

This module is the segment protocol: the layout constants, the errors, which names a segment and
its files may have, entry checksums, segment ids, commit records, `write_segment` (the only code
that writes a segment's files) and `check_segment` (the only code that judges them: cheap checks
for listings, deep ones — every chunk, key and checksum — for verification and for every segment
that arrives from elsewhere). Stores (`store.py`, `remote.py`) decide *where* segments live.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill_pipeline.cache.format import CacheFormat, NewerFormat

CHUNK_ROWS = 4096
FLAT_CHUNK = CHUNK_ROWS * 32  # slots per chunk of an adaptive-K segment's flat ids/logp arrays
FIELDS = ("ids", "logp", "lse", "label_logp")
INDEX_COLUMNS = ["key", "teacher", "offset", "n_tokens", "prompt_len", "token_ids", "checksum"]
_SEGMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SEGMENT_FILE = re.compile(r"(zarr\.json|index\.parquet|(ids|logp|lse|label_logp|counts)/(zarr\.json|c(/[0-9]{1,9}){1,2}))")
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")


class CacheError(RuntimeError):
    """The cache store is missing, unreadable or inconsistent."""


class SegmentRejected(CacheError):
    """A segment offered for publishing (an upload, a pull) failed verification; nothing of it
    was published."""


def damage_advice(store: Any, *, listed: bool = False) -> str:
    """What to do about a damaged segment of `store` (how users name it); `listed`: the damage
    was just listed by a full verify, so that step is left out."""
    remove = (f"run `distill-pipeline cache gc --damaged --store {store}` to remove the damaged segment(s)"
              if listed else f"run `distill-pipeline cache verify --store {store}` to list the damage, then "
              f"`distill-pipeline cache gc --damaged --store {store}`")
    return remove + " and rerun `distill-pipeline run teacher_logits -c <config>` to extract the removed entries again"


# ---------------------------------------------------------------------------- names and ids

def validate_segment_name(name: Any) -> str:
    """A segment id as a path component: letters, digits, `._-`, no `..`, ≤ 128 characters."""
    if not isinstance(name, str) or not _SEGMENT_NAME.fullmatch(name) or ".." in name:
        raise SegmentRejected(f"invalid segment id {str(name)[:80]!r}: expected 1-128 characters of "
                              "letters, digits, '.', '_' or '-' (no '..', no path separators)")
    return name


def validate_segment_file(rel: Any) -> str:
    """A file of a segment, relative to it: one of the names a segment holds (zarr.json,
    index.parquet, <array>/zarr.json, <array>/c/<i>[/<j>]) — nothing else is ever written."""
    if not isinstance(rel, str) or not _SEGMENT_FILE.fullmatch(rel):
        raise SegmentRejected(f"invalid segment file name {str(rel)[:80]!r}: a segment holds only "
                              "zarr.json, index.parquet and <array>/zarr.json, <array>/c/<chunk>")
    return rel


def segment_id(keys: list[str]) -> str:
    """A segment's id: the hash of its entries' keys in order (an extraction unit's id), so the
    same entries are one segment in every store."""
    return hashlib.sha256("".join(keys).encode()).hexdigest()[:32]


def entry_checksum(ids, logp_bits, lse, label, counts=None) -> str:
    """One entry's data: (n, K) ids and bits, or for adaptive K its (n,) counts and flat slots."""
    h = hashlib.sha256()
    for a in ((counts,) if counts is not None else ()) + (ids, logp_bits, lse, label):
        h.update(a.tobytes())
    return h.hexdigest()[:32]


def segment_format(attrs: dict) -> CacheFormat:
    """The format a segment was written in, from its manifest (zarr group attributes)."""
    return CacheFormat.from_manifest(attrs)


# ---------------------------------------------------------------------------- array layout

def chunk_shape(shape: tuple, *, flat: bool = False) -> tuple:
    """The chunk shape `write_segment` gives an array of `shape`: CHUNK_ROWS rows (FLAT_CHUNK slots
    for an adaptive-K segment's flat ids/logp, `flat`), fewer when the array is shorter, and the
    whole of every other dimension. Verification accepts exactly this shape and nothing else."""
    return (max(1, min(FLAT_CHUNK if flat else CHUNK_ROWS, int(shape[0]))),) + tuple(int(d) for d in shape[1:])


def array_layout(fmt: CacheFormat, n_tokens: int, n_slots: int | None = None) -> dict[str, tuple]:
    """Every array a segment of this format and size holds: name → (shape, zarr data type, chunk
    shape). Fixed K: ids/logp (N, K); adaptive K: flat (n_slots,) and counts (N,)."""
    slots = (n_slots,) if fmt.adaptive else (n_tokens, fmt.top_k)
    bits = "uint32" if fmt.dtype == "float32" else "uint16"
    out = {"ids": (slots, "int32"), "logp": (slots, bits),
           "lse": ((n_tokens,), "float32"), "label_logp": ((n_tokens,), "float32")}
    if fmt.adaptive:
        out["counts"] = ((n_tokens,), "uint16")
    return {name: (shape, dtype, chunk_shape(shape, flat=fmt.adaptive and name in ("ids", "logp")))
            for name, (shape, dtype) in out.items()}


_ITEMSIZE = {"int32": 4, "uint32": 4, "float32": 4, "uint16": 2}
_SHUFFLES = ("noshuffle", "shuffle", "bitshuffle")


def _ints(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def _codecs_problem(codecs: Any, name: str, dtype: str) -> str | None:
    """The codec chain `write_segment` writes, and nothing else: [numcodecs.delta of the array's
    own dtype (logp only)], bytes (little-endian), blosc zstd of the array's item size, crc32c.
    So decoding a chunk allocates what its chunk shape holds (blosc's header is checked against
    it before a chunk is decoded: `chunk_header_problem`) and no codec can expand it further."""
    if not isinstance(codecs, list) or not all(isinstance(c, dict) for c in codecs):
        return f"has codecs {str(codecs)[:80]}, not a list of codecs"
    want = ["numcodecs.delta"] if name == "logp" else []
    want += ["bytes", "blosc", "crc32c"]
    names = [c.get("name") for c in codecs]
    if names != want:
        return f"has codecs {names}, not the ones a segment is written with ({want})"
    conf = [c.get("configuration") or {} for c in codecs]
    item = _ITEMSIZE[dtype]
    if name == "logp":
        delta = f"<u{item}"
        if conf[0].get("dtype") != delta or conf[0].get("astype", delta) != delta or set(conf[0]) - {"dtype", "astype"}:
            return f"has a delta filter {conf[0]}, not one over its own dtype {delta}"
        conf = conf[1:]
    if conf[0] != {"endian": "little"}:
        return f"has a bytes codec {conf[0]}, not a little-endian one"
    blosc = conf[1]
    if (blosc.get("cname") != "zstd" or blosc.get("typesize") != item or blosc.get("shuffle") not in _SHUFFLES
            or type(blosc.get("clevel")) is not int or not 0 <= blosc["clevel"] <= 9
            or type(blosc.get("blocksize", 0)) is not int or blosc.get("blocksize", 0) < 0
            or set(blosc) - {"cname", "clevel", "shuffle", "typesize", "blocksize"}):
        return f"has a blosc codec {str(blosc)[:120]}, not zstd over {item}-byte items"
    if conf[2]:
        return f"has a crc32c codec with a configuration {str(conf[2])[:80]}"
    return None


def array_meta_problem(meta: Any, name: str, shape: tuple, dtype: str, chunks: tuple) -> str | None:
    """What is wrong with an array's zarr.json (parsed, never handed to zarr before this passes),
    given the shape, data type and chunk shape the manifest implies (`array_layout`), or None."""
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
        return "has a zarr.json that is not a zarr v3 array's"
    if not _ints(meta.get("shape")) or tuple(meta["shape"]) != tuple(shape):
        return f"has shape {str(meta.get('shape'))[:80]}, the manifest implies {list(shape)}"
    if meta.get("data_type") != dtype:
        return f"has data type {str(meta.get('data_type'))[:40]}, a segment stores {name} as {dtype}"
    grid = meta.get("chunk_grid")
    declared = grid.get("configuration", {}).get("chunk_shape") if isinstance(grid, dict) else None
    if (not isinstance(grid, dict) or grid.get("name") != "regular" or not _ints(declared)
            or tuple(declared) != tuple(chunks)):
        return (f"declares chunks {str(declared if declared is not None else grid)[:80]}, an array of shape "
                f"{list(shape)} is written in chunks {list(chunks)}")
    enc = meta.get("chunk_key_encoding")
    separator = (enc.get("configuration") or {}).get("separator", "/") if isinstance(enc, dict) else None
    if not isinstance(enc, dict) or enc.get("name") != "default" or separator != "/":
        return f"has chunk key encoding {str(enc)[:80]}, not the default one (separator '/')"
    if meta.get("storage_transformers") not in (None, []):
        return "declares storage transformers (a segment has none)"
    return _codecs_problem(meta.get("codecs"), name, dtype)


def chunk_keys(shape: tuple, chunks: tuple) -> list[str]:
    """The chunk files of an array whose chunks span every dimension but the first."""
    n = -(-int(shape[0]) // int(chunks[0])) if shape[0] else 0
    tail = "/0" * (len(shape) - 1)
    return [f"c/{i}{tail}" for i in range(n)]


def chunk_header_problem(path: Path, nbytes: int) -> str | None:
    """A chunk file is a blosc frame and its CRC32C (4 bytes). Blosc allocates what its 16-byte
    header declares, so before a chunk is decoded that header must declare exactly the chunk's
    `nbytes` (its shape × item size) and the compressed size the file holds."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as exc:
        return f"cannot be read ({_why(exc)})"
    if len(head) < 16:
        return f"is {size} bytes, too short for a compressed chunk (truncated)"
    declared, block, cbytes = struct.unpack_from("<III", head, 4)
    if declared != nbytes:
        return f"declares {declared} decoded bytes, its chunk shape holds {nbytes}"
    if cbytes != size - 4:
        return f"declares {cbytes} compressed bytes, the file holds {size - 4} (truncated or padded)"
    if not 0 < block <= nbytes:
        return f"declares blocks of {block} bytes for {nbytes} bytes"
    return None


# ---------------------------------------------------------------------------- commit records

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_for(name: str, files: dict[str, bytes]) -> dict:
    """The commit record of a segment given as its files: {"segment", "manifest", "files":
    {relative path: {"size", "sha256"}}} — what a copy of it is checked against."""
    manifest = json.loads(files["zarr.json"]).get("attributes", {})
    return {"segment": name, "manifest": manifest,
            "files": {rel: {"size": len(data), "sha256": sha256_bytes(data)}
                      for rel, data in sorted(files.items())}}


def check_against_record(name: str, files: dict[str, bytes], record: dict, where: str) -> None:
    """Every file the record lists, with its size and sha256, and nothing else."""
    listed = record.get("files") or {}
    if set(files) != set(listed):
        missing, extra = sorted(set(listed) - set(files)), sorted(set(files) - set(listed))
        raise SegmentRejected(f"segment {name} from {where}: files differ from its commit record "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for rel, meta in listed.items():
        data = files[rel]
        if len(data) != meta["size"] or sha256_bytes(data) != meta["sha256"]:
            raise SegmentRejected(f"segment {name} from {where}: {rel} does not match its commit "
                                  "record (damaged in the store or in transit)")


def check_offered(name: str, files: dict[str, Any], *, max_bytes: int | None = None) -> int:
    """A segment offered as its files (an upload, a pull), before anything is written or
    decoded: the name and every file name, bytes only, within `max_bytes`, a manifest and an
    index, the id the hash of the segment's keys (nobody can take the id of entries it does not
    hold), and the sizes its manifest declares within what the bytes sent can hold (decoding is
    bounded by what was uploaded, not by what a manifest claims). Returns the total bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    validate_segment_name(name)
    total = 0
    for rel, data in files.items():
        validate_segment_file(rel)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise SegmentRejected(f"segment {name}: {rel} is not bytes")
        total += len(data)
    if max_bytes is not None and total > max_bytes:
        raise SegmentRejected(f"segment {name} is {total} bytes, over the limit of {max_bytes}")
    for required in ("zarr.json", "index.parquet"):
        if required not in files:
            raise SegmentRejected(f"segment {name}: {required} is missing")
    # every entry holds a 64-hex-digit key and a 32-hex-digit checksum, which no encoding shrinks
    # much: an index claiming more rows than that is not what its bytes can hold
    max_rows = total // 32 + 1024
    try:
        meta = pq.read_metadata(pa.BufferReader(files["index.parquet"]))
        if meta.num_rows > max_rows:
            raise SegmentRejected(f"segment {name}: index.parquet claims {meta.num_rows} rows, more than "
                                  f"{total} bytes of upload can hold ({max_rows})")
        keys = pq.read_table(pa.BufferReader(files["index.parquet"]), columns=["key"]).column("key")
        if not (pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type)) or keys.null_count:
            raise ValueError(f"its key column is {keys.type} with {keys.null_count} null(s), not strings")
        keys = keys.to_pylist()
        manifest = json.loads(files["zarr.json"]).get("attributes", {})
        n_tokens, top_k = int(manifest["n_tokens"]), segment_format(manifest).top_k
    except SegmentRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - unparsable index or manifest
        raise SegmentRejected(f"segment {name}: its index or manifest cannot be read "
                              f"({type(exc).__name__}: {exc})") from None
    if segment_id(keys) != name:
        raise SegmentRejected(f"segment id {name} is not the hash of its entries' keys "
                              f"({segment_id(keys)}); segments are named by their content")
    decoded = n_tokens * (top_k * 8 + 10)
    if n_tokens < 0 or top_k < 1 or decoded > 64 * total + (1 << 20):
        raise SegmentRejected(f"segment {name}: its manifest declares {n_tokens} tokens x K={top_k} "
                              f"({decoded} bytes decoded), more than {total} bytes of upload can hold")
    return total


# ---------------------------------------------------------------------------- writing

@dataclass
class SegmentData:
    """What a worker hands to `Store.publish`: concatenated rows and one index row per entry.
    Adaptive K: `counts` (N,) uint16 and ids/logp_bits flat (Σ counts,), a token's slots in a row."""
    ids: Any          # (N, K) int32, or (M,) flat with counts
    logp_bits: Any    # (N, K) uint16/uint32, or (M,) flat with counts
    lse: Any          # (N,) float32
    label_logp: Any   # (N,) float32
    entries: list[dict]  # key, teacher, offset, n_tokens, prompt_len, token_ids
    counts: Any = None   # (N,) uint16: slots kept per token (adaptive K only)

    def slots(self, offset: int, n: int) -> tuple[int, int]:
        """Where rows [offset, offset + n) lie in the flat arrays (adaptive K)."""
        start = int(self.counts[:offset].sum(dtype="int64"))
        return start, start + int(self.counts[offset:offset + n].sum(dtype="int64"))

    def checksum(self, offset: int, n: int) -> str:
        s = slice(offset, offset + n)
        if self.counts is None:
            return entry_checksum(self.ids[s], self.logp_bits[s], self.lse[s], self.label_logp[s])
        a, b = self.slots(offset, n)
        return entry_checksum(self.ids[a:b], self.logp_bits[a:b], self.lse[s], self.label_logp[s],
                              self.counts[s])


def write_segment(folder: Path, data: SegmentData, manifest: dict) -> None:
    """Write a segment's files into `folder` (a private staging folder: the store publishes it).
    index.parquet is written last: its presence marks the segment complete."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec
    from zarr.codecs.numcodecs import Delta

    group = zarr.open_group(str(folder), mode="w", attributes=manifest)
    flat = data.counts is not None  # ragged: a token's slots follow each other in flat arrays
    rows = chunk_shape(data.lse.shape)
    slot_chunks = chunk_shape(data.ids.shape, flat=flat)
    specs = {
        "ids": (data.ids, [], slot_chunks),
        "logp": (data.logp_bits, [Delta(dtype=data.logp_bits.dtype.str)], slot_chunks),
        "lse": (data.lse, [], rows),
        "label_logp": (data.label_logp, [], rows),
    }
    if data.counts is not None:
        specs["counts"] = (data.counts, [], rows)
    for name, (arr, filters, chunks) in specs.items():
        # one blosc block per chunk: zstd sees the whole chunk (ids 103.1 → 102.4 B/token on
        # the synthetic sample, within 5% of their order-0 entropy; benchmarks/id_coding_bench.py)
        block = int(np.prod(chunks)) * arr.dtype.itemsize
        zstd = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", blocksize=block)
        z = group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=chunks,
                               filters=filters, compressors=[zstd, Crc32cCodec()])
        z[...] = arr
    table = pa.table({
        "key": [e["key"] for e in data.entries],
        "teacher": [e["teacher"] for e in data.entries],
        "offset": pa.array(np.array([e["offset"] for e in data.entries]), pa.int64()),
        "n_tokens": pa.array([e["n_tokens"] for e in data.entries], pa.int32()),
        "prompt_len": pa.array([e["prompt_len"] for e in data.entries], pa.int32()),
        "token_ids": pa.array([list(e["token_ids"]) for e in data.entries], pa.list_(pa.int32())),
        "checksum": [data.checksum(e["offset"], e["n_tokens"]) for e in data.entries],
    })
    pq.write_table(table, folder / "index.parquet")


# ---------------------------------------------------------------------------- checking

def _why(exc: Exception, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return text if len(text) <= limit else text[:limit - 1] + "…"


def topk_mass_sum(fmt: CacheFormat, logp_bits: Any) -> float:
    """Σ over a segment's stored slots of the probability they keep (rows of a fixed-K array, or
    an adaptive-K segment's flat slots), decoded CHUNK_ROWS at a time: a segment's manifest
    records it per token (`topk_mass`), and `cache info` computes it the same way from files."""
    import numpy as np

    return float(sum(np.exp(fmt.decode(logp_bits[s:s + CHUNK_ROWS]).astype(np.float64)).sum()
                     for s in range(0, len(logp_bits), CHUNK_ROWS)))


def read_manifest(seg: Path) -> dict:
    return json.loads((seg / "zarr.json").read_text()).get("attributes", {})


@dataclass
class SegmentCheck:
    """What `check_segment` found: the parts it could read, and every problem (each names the
    segment and what is broken)."""
    name: str
    path: Path
    manifest: dict | None = None
    fmt: Any = None
    index: list[dict] | None = None
    arrays: dict = field(default_factory=dict)  # deep checks only: field → decoded array
    problems: list[str] = field(default_factory=list)
    newer: bool = False  # written by a newer version: listed as unreadable, never removed as damaged

    @property
    def damaged(self) -> bool:
        return bool(self.problems)

    def problem(self, text: str) -> None:
        self.problems.append(f"{self.name}: {text}")


def read_array(check: SegmentCheck, group: Any, name: str):
    """One array decoded chunk by chunk (so a bad chunk is named), or None (problem recorded).
    Call it on an array `check_segment` found as the manifest implies (its chunks span every
    dimension but the first): each chunk file's blosc header is checked against the chunk's shape
    before the chunk is decoded (`chunk_header_problem`), so decoding allocates what the checked
    metadata says, never what a chunk file claims."""
    import numpy as np

    try:
        arr = group[name]
        rows = arr.chunks[0]
        nbytes = int(np.prod(arr.chunks)) * np.dtype(arr.dtype).itemsize
    except Exception as exc:  # noqa: BLE001
        check.problem(f"array {name} missing or unreadable: {_why(exc)}")
        return None
    parts = []
    tail = "/0" * (len(arr.shape) - 1)
    for i, c in enumerate(range(0, arr.shape[0], rows)):
        where = f"array {name} chunk {i} (rows {c}–{min(c + rows, arr.shape[0]) - 1})"
        bad = chunk_header_problem(check.path / name / f"c/{i}{tail}", nbytes)
        if bad:
            check.problem(f"{where} is corrupt: it {bad}")
            return None
        try:
            parts.append(arr[c:c + rows])
        except Exception as exc:  # noqa: BLE001 - CRC32C mismatch, bad compressed data, …
            check.problem(f"{where} is corrupt: {_why(exc)}")
            return None
    return np.concatenate(parts) if parts else np.zeros((0,) + tuple(arr.shape[1:]), arr.dtype)


ARRAYS = FIELDS + ("counts",)
ID_LIMIT = 2 ** 31  # ids are int32: without a recorded vocabulary, the only bound there is


def _count(manifest: dict, key: str) -> int:
    value = manifest[key]
    if type(value) is not int or value < 0:
        raise ValueError(f"{key} {str(value)[:40]!r} is not a count")
    return value


def check_segment(seg: Path, *, deep: bool = True) -> SegmentCheck:
    """Cheap checks (always): manifest readable with a format and counts, index readable with its
    columns, entries tiling the arrays, and every array's zarr.json exactly what the manifest
    implies — shape, data type, chunk shape, codecs (`array_layout`, `array_meta_problem`) — with
    every chunk file there and no other; all before zarr reads any of it, so nothing a segment
    declares makes decoding allocate more than its manifest's sizes (which `check_offered` bounds
    by the bytes of an upload). Deep (verify): also decode every chunk (its blosc header checked
    first, then its CRC32C), check every key and per-entry checksum, and the values: ids in
    [0, vocab_size), log-probs finite, sorted descending and ≤ 0, lse and the label log-prob
    finite (the label's ≤ 0), adaptive counts in [min_k, top_k]."""
    check = SegmentCheck(seg.name, seg)
    try:
        _check_segment(check, seg, deep)
    except Exception as exc:  # noqa: BLE001 - whatever a hostile segment provokes is damage, not a crash
        check.problem(f"cannot be checked: {_why(exc)}")
    return check


_INDEX_TYPES = {"key": "string", "teacher": "string", "offset": "integer", "n_tokens": "integer",
                "prompt_len": "integer", "token_ids": "list<int32>", "checksum": "string"}


def index_problem(table: Any) -> str | None:
    """An index.parquet's columns of the types `write_segment` writes, without nulls, or why not."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for name, kind in _INDEX_TYPES.items():
        col = table.column(name)
        t = col.type
        ok = (pa.types.is_string(t) or pa.types.is_large_string(t) if kind == "string" else
              pa.types.is_integer(t) if kind == "integer" else
              (pa.types.is_list(t) or pa.types.is_large_list(t)) and t.value_type == pa.int32())
        if not ok:
            return f"column {name} is {t}, not {kind}"
        if col.null_count or (kind.startswith("list") and pc.list_flatten(col).null_count):
            return f"column {name} has nulls"
    return None


def read_manifest_fields(check: SegmentCheck, manifest: Any) -> tuple[int, int]:
    """Set `check.manifest` and `check.fmt` from a segment manifest and return its (n_tokens,
    n_entries); raises (NewerFormat, ValueError, …) when it has no readable format or counts."""
    if not isinstance(manifest, dict):
        raise ValueError("the manifest is not a JSON object")
    check.manifest = manifest
    check.fmt = segment_format(manifest)
    return _count(manifest, "n_tokens"), _count(manifest, "n_entries")


def manifest_layout(check: SegmentCheck) -> dict[str, tuple] | None:
    """The arrays a segment with `check`'s manifest (already read: `read_manifest_fields`) must
    hold (`array_layout`), or None with the problem recorded: the recorded vocabulary, the
    adaptive slot count and the top-K mass checked against what the format allows. Segments
    written before the manifest recorded the teacher's vocabulary (or the top-K mass) have none:
    their ids can only be checked to be ≥ 0 (and < 2**31, which int32 storage guarantees)."""
    m, fmt = check.manifest, check.fmt
    n_tokens = _count(m, "n_tokens")
    vocab = m.get("vocab_size")
    if vocab is not None and (type(vocab) is not int or not fmt.top_k <= vocab < ID_LIMIT):
        check.problem(f"manifest vocab_size {str(vocab)[:40]!r} is not an integer in [top_k={fmt.top_k}, 2**31)")
        return None
    mass = m.get("topk_mass")
    # each stored slot keeps at most probability 1; their sum may pass 1 by a lossy format's rounding
    if mass is not None and (type(mass) not in (int, float) or not 0 <= mass <= fmt.top_k):
        check.problem(f"manifest topk_mass {str(mass)[:40]!r} is not a mass the top-{fmt.top_k} can hold")
        return None
    n_slots = None
    if fmt.adaptive:
        try:
            n_slots = _count(m, "n_slots")
        except Exception as exc:  # noqa: BLE001 - missing or not a number
            check.problem(f"adaptive-K segment without a readable n_slots in its manifest: {_why(exc)}")
            return None
        if not n_tokens * fmt.min_k <= n_slots <= n_tokens * fmt.top_k:
            check.problem(f"manifest n_slots {n_slots} is outside [{n_tokens * fmt.min_k}, "
                          f"{n_tokens * fmt.top_k}] for {n_tokens} tokens of k in [{fmt.min_k}, {fmt.top_k}]")
            return None
    return array_layout(fmt, n_tokens, n_slots)


def check_record(name: str, record: Any) -> SegmentCheck:
    """The cheap checks a commit record allows without the segment's files (`cache ls/info` on a
    remote store): its manifest as `check_segment` reads it, and the files it lists exactly those
    a segment of that manifest has. What the files hold is checked when they are fetched (every
    segment that arrives is verified in full) and by `cache verify`."""
    check = SegmentCheck(name, Path(name))
    try:
        if isinstance(record, dict) and "unreadable" in record:
            raise ValueError(record["unreadable"])
        if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
            raise ValueError("not a commit record with a file list")
        read_manifest_fields(check, record.get("manifest"))
        layout = manifest_layout(check)
        if layout is None:
            return check
        expected = {"zarr.json", "index.parquet"} | {
            f"{a}/{rel}" for a, (shape, _, chunks) in layout.items() for rel in ["zarr.json", *chunk_keys(shape, chunks)]}
        listed = set(record["files"])
        if listed != expected:
            missing, extra = sorted(expected - listed), sorted(listed - expected)
            check.problem("its commit record lists other files than its manifest implies"
                          + (f" (missing {', '.join(missing[:3])})" if missing else "")
                          + (f" (unexpected {', '.join(extra[:3])})" if extra else ""))
    except NewerFormat as exc:
        check.newer = True
        check.problem(str(exc))
    except Exception as exc:  # noqa: BLE001 - whatever a hostile record holds is damage, not a crash
        check.problem(f"commit record unreadable: {_why(exc)}")
    return check


def _check_segment(check: SegmentCheck, seg: Path, deep: bool) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    if not (seg / "index.parquet").exists():
        check.problem("no index.parquet (incomplete segment; `cache gc` removes it)")
        return
    n_tokens = n_entries = 0
    try:
        group_meta = json.loads((seg / "zarr.json").read_text())
        if not isinstance(group_meta, dict) or group_meta.get("node_type") != "group" \
                or not isinstance(group_meta.get("attributes", {}), dict):
            raise ValueError("not a zarr group with attributes")
        if group_meta.get("consolidated_metadata") is not None:  # zarr would read arrays' metadata from it
            raise ValueError("it holds consolidated metadata; a segment's arrays are described by their "
                             "own zarr.json only")
        n_tokens, n_entries = read_manifest_fields(check, group_meta.get("attributes", {}))
    except FileNotFoundError:
        check.problem("zarr.json (the segment manifest) is missing")
    except NewerFormat as exc:
        check.newer = True
        check.problem(str(exc))
    except Exception as exc:  # noqa: BLE001 - bad JSON, missing fields
        check.problem(f"zarr.json (the segment manifest) is unreadable: {_why(exc)}")
    try:
        table = pq.read_table(seg / "index.parquet", columns=INDEX_COLUMNS)
        bad = index_problem(table)
        if bad:
            raise ValueError(bad)
        check.index = table.to_pylist()
    except Exception as exc:  # noqa: BLE001 - truncated (ArrowInvalid), missing columns
        check.problem(f"index.parquet is unreadable (truncated or corrupt): {_why(exc)}")
    if check.problems:
        return
    index, fmt = check.index, check.fmt
    vocab = check.manifest.get("vocab_size")
    if len(index) != n_entries:
        check.problem(f"index.parquet has {len(index)} entries, manifest says {n_entries}")
    expected_offset = 0
    for i, row in enumerate(index):
        where = f"entry {i} ({row['key'][:12]}…)"
        if row["offset"] != expected_offset:
            check.problem(f"{where}: offset {row['offset']} ≠ {expected_offset} (entries must tile the arrays)")
        expected_offset = row["offset"] + row["n_tokens"]
        if row["n_tokens"] != len(row["token_ids"]) - row["prompt_len"]:
            check.problem(f"{where}: n_tokens {row['n_tokens']} ≠ response length "
                          f"{len(row['token_ids']) - row['prompt_len']}")
        if deep and fmt.key(row["teacher"], row["token_ids"], row["prompt_len"]) != row["key"]:
            check.problem(f"{where}: key does not match its teacher/tokens/K/dtype")
    if expected_offset != n_tokens:
        check.problem(f"entries cover {expected_offset} rows of {n_tokens}")
    layout = manifest_layout(check)
    if layout is None:
        return
    n_slots = check.manifest.get("n_slots")
    for name in ARRAYS:
        if name not in layout and (seg / name).exists():
            check.problem(f"array {name} is not part of a {'fixed' if not fmt.adaptive else 'adaptive'}-K segment")
    for name, (shape, dtype, chunks) in layout.items():
        folder = seg / name
        try:
            meta = json.loads((folder / "zarr.json").read_bytes())
        except FileNotFoundError:
            check.problem(f"array {name} missing or unreadable: no {name}/zarr.json")
            continue
        except Exception as exc:  # noqa: BLE001 - not JSON
            check.problem(f"array {name} missing or unreadable: {name}/zarr.json is not JSON ({_why(exc)})")
            continue
        bad = array_meta_problem(meta, name, shape, dtype, chunks)
        if bad:
            check.problem(f"array {name} {bad}")
            continue
        # zarr reads a missing chunk file as zeros: every chunk must be there, and nothing else
        expected = set(chunk_keys(shape, chunks))
        present = {f.relative_to(folder).as_posix() for f in folder.rglob("*") if not f.is_dir()} - {"zarr.json"}
        if present != expected:
            missing, extra = sorted(expected - present), sorted(present - expected)
            check.problem(f"array {name} has {len(present)} chunk file(s), its shape needs {len(expected)}"
                          + (f" (missing {', '.join(missing[:3])})" if missing else "")
                          + (f" (unexpected {', '.join(extra[:3])})" if extra else ""))
    if check.problems:  # decode nothing whose metadata or tiling is already wrong (sizes are untrusted)
        return
    try:
        import zarr

        group = zarr.open_group(str(seg), mode="r", use_consolidated=False)
    except Exception as exc:  # noqa: BLE001
        check.problem(f"zarr group cannot be opened: {_why(exc)}")
        return
    if not deep:
        return
    for name in layout:
        data = read_array(check, group, name)
        if data is None:
            return
        check.arrays[name] = data
    a = check.arrays
    starts = None
    if fmt.adaptive:
        counts = a["counts"].astype(np.int64)
        if len(counts) and (counts.min() < fmt.min_k or counts.max() > fmt.top_k):
            check.problem(f"counts outside [{fmt.min_k}, {fmt.top_k}] (min {counts.min()}, max {counts.max()})")
            return
        if int(counts.sum()) != n_slots:
            check.problem(f"counts add up to {int(counts.sum())} slots, manifest says {n_slots}")
            return
        starts = np.concatenate([[0], np.cumsum(counts)])
    limit = vocab if vocab is not None else ID_LIMIT
    for i, row in enumerate(index):
        where = f"entry {i} ({row['key'][:12]}…)"
        s = slice(row["offset"], row["offset"] + row["n_tokens"])
        if starts is None:
            f = s
            ok = entry_checksum(a["ids"][s], a["logp"][s], a["lse"][s], a["label_logp"][s]) == row["checksum"]
        else:
            f = slice(int(starts[s.start]), int(starts[s.stop]))
            ok = entry_checksum(a["ids"][f], a["logp"][f], a["lse"][s], a["label_logp"][s],
                                a["counts"][s]) == row["checksum"]
        if not ok:
            check.problem(f"{where}: checksum mismatch (data changed after it was written)")
        for problem in _value_problems(fmt, a["ids"][f], a["logp"][f], a["lse"][s], a["label_logp"][s],
                                       None if starts is None else starts[s.start:s.stop + 1] - f.start,
                                       limit, vocab is not None):
            check.problem(f"{where}: {problem}")
    return


def _value_problems(fmt: CacheFormat, ids, bits, lse, label, starts, limit: int, recorded: bool) -> list[str]:
    """What is wrong with one entry's values. Stored top-K log-probs are always finite: the −inf
    slots of adaptive K are added when a batch is read (`reader.pad_slots`), never stored.
    `starts`: adaptive K, where each token's slots start in `ids`/`bits` (flat), with the end."""
    import numpy as np

    out = []
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= limit):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        out.append(f"teacher id {bad} is outside " + (f"the teacher's vocabulary [0, {limit})" if recorded
                                                       else "[0, 2**31)"))
    lp = fmt.decode(bits)
    if not np.isfinite(lp).all():
        out.append("top-K log-probs are not finite (NaN or ±inf stored)")
    else:
        if starts is None:
            unsorted = (np.diff(lp, axis=1) > 0).any()
        else:  # descending within each token's slots: a rise is allowed only where a token starts
            rise = np.flatnonzero(np.diff(lp) > 0) + 1
            unsorted = not np.isin(rise, starts).all()
        if unsorted or (lp > 1e-3).any():
            out.append("top-K log-probs not sorted descending / not ≤ 0")
    if not np.isfinite(lse).all():
        out.append("lse (the logsumexp) is not finite (NaN or ±inf)")
    if not np.isfinite(label).all() or (label > 1e-3).any():
        out.append("label log-probs are not finite / not ≤ 0")
    return out
