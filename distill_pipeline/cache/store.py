"""The teacher-logit cache on disk. The only module that knows the layout (SCHEMA_VERSION).

    <root>/store.json                      {"schema_version", "kind"}
    <root>/segments/<segment id>/          one immutable segment, published by atomic rename
        zarr.json                          zarr v3 group; attrs = the segment manifest
        ids/        (N, K) int32           top-K token ids per response token, by probability
        logp/       (N, K) uint16|uint32   bit patterns of the top-K log-probs (attrs.logp_dtype:
                                           float16 | bfloat16 | float32, or <dtype>-keep<n> for
                                           the lossy mode); Delta + zstd
        lse/        (N,)   float32         full-vocabulary logsumexp of the raw logits
        label_logp/ (N,)   float32         log-prob of the actual next token
        index.parquet                      one row per (sequence, teacher) entry: key, teacher,
                                           offset, n_tokens, prompt_len, token_ids, checksum
    <root>/tmp/                            segments being written (never read; `cache gc` clears)

Arrays are chunked along the token axis; every chunk carries a CRC32C. An entry's key hashes
(schema version, teacher identity, K, dtype, prompt length, exact token ids): the same teacher on
the same tokens is extracted once, whichever run, dataset or team asks. Row r of an entry is the
teacher's prediction of token `prompt_len + r` (response tokens only, raw T = 1 values).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1
CHUNK_ROWS = 4096
FIELDS = ("ids", "logp", "lse", "label_logp")
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")


class CacheError(RuntimeError):
    """The cache store is missing, unreadable or inconsistent."""


def default_root() -> Path:
    base = os.environ.get("DISTILL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "distill-pipeline")
    return Path(base) / "teacher-logits"


def entry_key(teacher: str, token_ids: Iterable[int], prompt_len: int, top_k: int, dtype: str) -> str:
    import numpy as np

    h = hashlib.sha256(f"{SCHEMA_VERSION}|{teacher}|{top_k}|{dtype}|{prompt_len}|".encode())
    h.update(np.asarray(list(token_ids), dtype="<i4").tobytes())
    return h.hexdigest()


def entry_checksum(ids, logp_bits, lse, label) -> str:
    h = hashlib.sha256()
    for a in (ids, logp_bits, lse, label):
        h.update(a.tobytes())
    return h.hexdigest()[:32]


MANTISSA_BITS = {"float16": 10, "bfloat16": 7, "float32": 23}


def storage_code(dtype: str, keep_bits: int | None = None) -> str:
    """How log-probs are stored: the dtype, or `<dtype>-keep<n>` for the lossy mode that keeps
    n mantissa bits (rounded to nearest). The code is part of every entry key."""
    if keep_bits is None or keep_bits >= MANTISSA_BITS[dtype]:
        return dtype
    return f"{dtype}-keep{keep_bits}"


def parse_code(code: str) -> tuple[str, int | None]:
    base, _, keep = code.partition("-keep")
    if base not in MANTISSA_BITS:
        raise CacheError(f"unknown log-prob storage {code!r}; expected float16, bfloat16 or float32")
    return base, int(keep) if keep else None


def to_bits(logp_f32, code: str):
    """float32 numpy log-probs → stored bit patterns: an exact view of the stored dtype, with the
    low mantissa bits rounded away in the lossy `-keep<n>` modes."""
    import numpy as np

    base, keep = parse_code(code)
    if base == "float32":
        bits = logp_f32.astype(np.float32).view(np.uint32)
    elif base == "float16":
        bits = logp_f32.astype(np.float16).view(np.uint16)
    else:
        import torch  # numpy has no bfloat16

        bits = torch.from_numpy(logp_f32.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if keep is None:
        return bits
    drop = MANTISSA_BITS[base] - keep
    wide = bits.astype(np.uint64)
    wide = ((wide + (1 << (drop - 1))) >> drop) << drop  # round to nearest; a carry moves the exponent
    return wide.astype(bits.dtype)


def from_bits(bits, code: str):
    """Stored bit patterns → float32 numpy log-probs."""
    import numpy as np

    base, _ = parse_code(code)
    if base == "float32":
        return bits.view(np.float32)
    if base == "float16":
        return bits.view(np.float16).astype(np.float32)
    return (bits.astype(np.uint32) << 16).view(np.float32)


def reconstruction_kl(logp_f32, stored_f32) -> float:
    """Mean over tokens of KL(original K+1 bins ‖ stored K+1 bins): what storage loses."""
    import numpy as np

    def bins(lp):
        p = np.exp(lp.astype(np.float64))
        return np.clip(np.concatenate([p, np.clip(1 - p.sum(-1, keepdims=True), 0, None)], -1), 1e-8, 1)

    if len(logp_f32) == 0:
        return 0.0
    p, q = bins(logp_f32), bins(stored_f32)
    return float((p * (np.log(p) - np.log(q))).sum(-1).mean())


@dataclass
class SegmentData:
    """What a worker hands to `Store.publish`: concatenated rows and one index row per entry."""
    ids: Any          # (N, K) int32
    logp_bits: Any    # (N, K) uint16/uint32
    lse: Any          # (N,) float32
    label_logp: Any   # (N,) float32
    entries: list[dict]  # key, teacher, offset, n_tokens, prompt_len, token_ids


class Store:
    """A cache root. Safe for many concurrent readers and writers: writers build segments under
    tmp/ and publish them with one rename; readers only ever see published segments."""

    def __init__(self, root: str | Path | None = None, *, create: bool = True):
        self.root = Path(root).expanduser() if root else default_root()
        meta = self.root / "store.json"
        if meta.exists():
            found = json.loads(meta.read_text()).get("schema_version")
            if found != SCHEMA_VERSION:
                raise CacheError(f"{self.root}: cache schema {found}, this version reads "
                                 f"{SCHEMA_VERSION}; point teacher_logits.store elsewhere")
        elif create:
            (self.root / "segments").mkdir(parents=True, exist_ok=True)
            (self.root / "tmp").mkdir(exist_ok=True)
            tmp = self.root / f"store.json.{os.getpid()}"
            tmp.write_text(json.dumps({"schema_version": SCHEMA_VERSION,
                                       "kind": "distill-pipeline teacher-logit cache"}))
            os.replace(tmp, meta)
        else:
            raise CacheError(f"no teacher-logit cache at {self.root}")

    # ------------------------------------------------------------------ index

    def segments(self) -> list[Path]:
        seg = self.root / "segments"
        return sorted(p for p in seg.iterdir() if (p / "index.parquet").exists()) if seg.exists() else []

    def index(self, columns: list[str] | None = None):
        """All entries of all published segments as one Arrow table (+ `segment` column)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for seg in self.segments():
            t = pq.read_table(seg / "index.parquet", columns=columns)
            tables.append(t.append_column("segment", pa.array([seg.name] * len(t))))
        if not tables:
            cols = columns or ["key", "teacher", "offset", "n_tokens", "prompt_len", "token_ids", "checksum"]
            return pa.table({c: [] for c in cols + ["segment"]})
        return pa.concat_tables(tables)

    def existing_keys(self) -> set[str]:
        return set(self.index(columns=["key"]).column("key").to_pylist())

    # ------------------------------------------------------------------ write

    def publish(self, segment_id: str, data: SegmentData, manifest: dict) -> bool:
        """Write a segment under tmp/ and rename it into segments/. False if it already exists
        (another writer published the same unit first: content addressed, so identical)."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq
        import zarr
        from zarr.codecs import BloscCodec, Crc32cCodec
        from zarr.codecs.numcodecs import Delta

        final = self.root / "segments" / segment_id
        if final.exists():
            return False
        tmp = self.root / "tmp" / f"{segment_id}.{os.getpid()}.{time.time_ns()}"
        group = zarr.open_group(str(tmp), mode="w", attributes=manifest)
        zstd = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
        n = len(data.lse)
        rows = max(1, min(CHUNK_ROWS, n))
        specs = {
            "ids": (data.ids, [], (rows, data.ids.shape[1])),
            "logp": (data.logp_bits, [Delta(dtype=data.logp_bits.dtype.str)], (rows, data.ids.shape[1])),
            "lse": (data.lse, [], (rows,)),
            "label_logp": (data.label_logp, [], (rows,)),
        }
        for name, (arr, filters, chunks) in specs.items():
            z = group.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=chunks,
                                   filters=filters, compressors=[zstd, Crc32cCodec()])
            z[...] = arr
        offsets = np.array([e["offset"] for e in data.entries])
        checks = []
        for e in data.entries:
            s = slice(e["offset"], e["offset"] + e["n_tokens"])
            checks.append(entry_checksum(data.ids[s], data.logp_bits[s], data.lse[s], data.label_logp[s]))
        table = pa.table({
            "key": [e["key"] for e in data.entries],
            "teacher": [e["teacher"] for e in data.entries],
            "offset": pa.array(offsets, pa.int64()),
            "n_tokens": pa.array([e["n_tokens"] for e in data.entries], pa.int32()),
            "prompt_len": pa.array([e["prompt_len"] for e in data.entries], pa.int32()),
            "token_ids": pa.array([list(e["token_ids"]) for e in data.entries], pa.list_(pa.int32())),
            "checksum": checks,
        })
        pq.write_table(table, tmp / "index.parquet")  # written last: marks the segment complete
        try:
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        return True

    # ------------------------------------------------------------------ read

    def open_segment(self, name: str):
        import zarr

        return zarr.open_group(str(self.root / "segments" / name), mode="r")

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in (self.root / "segments").rglob("*") if f.is_file())
