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
    try:
        meta = pq.read_metadata(pa.BufferReader(files["index.parquet"]))
        if meta.num_rows > 10_000_000:
            raise SegmentRejected(f"segment {name}: index.parquet claims {meta.num_rows} rows")
        keys = pq.read_table(pa.BufferReader(files["index.parquet"]), columns=["key"]).column("key").to_pylist()
        manifest = json.loads(files["zarr.json"]).get("attributes", {})
        n_tokens, top_k = int(manifest["n_tokens"]), int(manifest["format"]["top_k"])
    except SegmentRejected:
        raise
    except Exception as exc:  # noqa: BLE001 - unparsable index or manifest
        raise SegmentRejected(f"segment {name}: its index or manifest cannot be read "
                              f"({type(exc).__name__}: {exc})") from None
    if segment_id(keys) != name:
        raise SegmentRejected(f"segment id {name} is not the hash of its entries' keys "
                              f"({segment_id(keys)}); segments are named by their content")
    decoded = n_tokens * (top_k * 8 + 10)
    if decoded > 64 * total + (1 << 20):
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
    n = len(data.lse)
    rows = max(1, min(CHUNK_ROWS, n))
    if data.counts is None:
        slot_chunks = (rows, data.ids.shape[1])
    else:  # ragged: a token's slots follow each other in flat arrays
        slot_chunks = (max(1, min(FLAT_CHUNK, len(data.ids))),)
    specs = {
        "ids": (data.ids, [], slot_chunks),
        "logp": (data.logp_bits, [Delta(dtype=data.logp_bits.dtype.str)], slot_chunks),
        "lse": (data.lse, [], (rows,)),
        "label_logp": (data.label_logp, [], (rows,)),
    }
    if data.counts is not None:
        specs["counts"] = (data.counts, [], (rows,))
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
    """One array decoded chunk by chunk (so a bad chunk is named), or None (problem recorded)."""
    import numpy as np

    try:
        arr = group[name]
        rows = arr.chunks[0]
    except Exception as exc:  # noqa: BLE001
        check.problem(f"array {name} missing or unreadable: {_why(exc)}")
        return None
    parts = []
    for c in range(0, arr.shape[0], rows):
        try:
            parts.append(arr[c:c + rows])
        except Exception as exc:  # noqa: BLE001 - CRC32C mismatch, bad compressed data, …
            check.problem(f"array {name} chunk {c // rows} (rows {c}–{min(c + rows, arr.shape[0]) - 1}) "
                          f"is corrupt: {_why(exc)}")
            return None
    return np.concatenate(parts) if parts else np.zeros((0,) + tuple(arr.shape[1:]), arr.dtype)


def check_segment(seg: Path, *, deep: bool = True) -> SegmentCheck:
    """Cheap checks (always): manifest readable with a format and counts, index readable with its
    columns, entries tiling the arrays, array shapes as the manifest says. Deep (verify): also
    decode every chunk (CRC32C) and check every key and per-entry checksum."""
    import numpy as np
    import pyarrow.parquet as pq

    check = SegmentCheck(seg.name, seg)
    if not (seg / "index.parquet").exists():
        check.problem("no index.parquet (incomplete segment; `cache gc` removes it)")
        return check
    try:
        check.manifest = read_manifest(seg)
        check.fmt = segment_format(check.manifest)
        n_tokens, n_entries = int(check.manifest["n_tokens"]), int(check.manifest["n_entries"])
    except FileNotFoundError:
        check.problem("zarr.json (the segment manifest) is missing")
    except NewerFormat as exc:
        check.newer = True
        check.problem(str(exc))
    except Exception as exc:  # noqa: BLE001 - bad JSON, missing fields
        check.problem(f"zarr.json (the segment manifest) is unreadable: {_why(exc)}")
    try:
        check.index = pq.read_table(seg / "index.parquet", columns=INDEX_COLUMNS).to_pylist()
    except Exception as exc:  # noqa: BLE001 - truncated (ArrowInvalid), missing columns
        check.problem(f"index.parquet is unreadable (truncated or corrupt): {_why(exc)}")
    if check.problems:
        return check
    index, fmt = check.index, check.fmt
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
    try:
        import zarr

        group = zarr.open_group(str(seg), mode="r")
    except Exception as exc:  # noqa: BLE001
        check.problem(f"zarr group cannot be opened: {_why(exc)}")
        return check
    arrays = {}
    n_slots = None
    if fmt.adaptive:
        try:
            n_slots = int(check.manifest["n_slots"])
        except Exception as exc:  # noqa: BLE001 - missing or not a number
            check.problem(f"adaptive-K segment without a readable n_slots in its manifest: {_why(exc)}")
            return check
        if not n_tokens * fmt.min_k <= n_slots <= n_tokens * fmt.top_k:
            check.problem(f"manifest n_slots {n_slots} is outside [{n_tokens * fmt.min_k}, "
                          f"{n_tokens * fmt.top_k}] for {n_tokens} tokens of k in [{fmt.min_k}, {fmt.top_k}]")
    for name in FIELDS + (("counts",) if fmt.adaptive else ()):
        try:
            arr = arrays[name] = group[name]
        except Exception as exc:  # noqa: BLE001
            check.problem(f"array {name} missing or unreadable: {_why(exc)}")
            continue
        if name in ("ids", "logp") and fmt.adaptive:
            if tuple(arr.shape) != (n_slots,):
                check.problem(f"array {name} has shape {tuple(arr.shape)}, manifest says ({n_slots},) "
                              "slots (adaptive K: flat)")
        elif arr.shape[0] != n_tokens:
            check.problem(f"array {name} has {arr.shape[0]} rows, manifest says {n_tokens}")
        if name in ("ids", "logp") and not fmt.adaptive and tuple(arr.shape[1:]) != (fmt.top_k,):
            check.problem(f"array {name} has K={tuple(arr.shape[1:])} but manifest top_k={fmt.top_k}")
        # zarr reads a missing chunk file as zeros: every chunk must be there
        expected = -(-arr.shape[0] // arr.chunks[0]) if arr.shape[0] else 0
        present = sum(1 for f in (seg / name / "c").rglob("*") if f.is_file()) if (seg / name / "c").is_dir() else 0
        if present != expected:
            check.problem(f"array {name} has {present} chunk file(s), its shape needs {expected}")
    if check.problems:  # decode nothing whose shape or tiling is already wrong (sizes are untrusted)
        return check
    if deep:
        for name, arr in arrays.items():
            data = read_array(check, group, name)
            if data is not None:
                check.arrays[name] = data
    if not deep or len(check.arrays) != len(arrays) or check.damaged:
        return check
    a = check.arrays
    starts = None
    if fmt.adaptive:
        counts = a["counts"].astype(np.int64)
        if len(counts) and (counts.min() < fmt.min_k or counts.max() > fmt.top_k):
            check.problem(f"counts outside [{fmt.min_k}, {fmt.top_k}] (min {counts.min()}, max {counts.max()})")
            return check
        if int(counts.sum()) != n_slots:
            check.problem(f"counts add up to {int(counts.sum())} slots, manifest says {n_slots}")
            return check
        starts = np.concatenate([[0], np.cumsum(counts)])
    for i, row in enumerate(index):
        where = f"entry {i} ({row['key'][:12]}…)"
        s = slice(row["offset"], row["offset"] + row["n_tokens"])
        if starts is None:
            ok = entry_checksum(a["ids"][s], a["logp"][s], a["lse"][s], a["label_logp"][s]) == row["checksum"]
            lp = fmt.decode(a["logp"][s])
            unsorted = (np.diff(lp, axis=1) > 0).any()
        else:
            f = slice(int(starts[s.start]), int(starts[s.stop]))
            ok = entry_checksum(a["ids"][f], a["logp"][f], a["lse"][s], a["label_logp"][s],
                                a["counts"][s]) == row["checksum"]
            lp = fmt.decode(a["logp"][f])
            # descending within each token's slots: a rise is allowed only where a token starts
            rise = np.flatnonzero(np.diff(lp) > 0) + 1 + f.start
            unsorted = not np.isin(rise, starts[s.start:s.stop + 1]).all()
        if not ok:
            check.problem(f"{where}: checksum mismatch (data changed after it was written)")
        if unsorted or (lp > 1e-3).any():
            check.problem(f"{where}: top-K log-probs not sorted descending / not ≤ 0")
    return check
