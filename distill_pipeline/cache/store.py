"""The teacher-logit cache on disk. The only module that knows the layout (SCHEMA_VERSION).

    <root>/store.json                      {"schema_version", "kind"}
    <root>/segments/<segment id>/          one immutable segment, published by atomic rename
        zarr.json                          zarr v3 group; attrs = the segment manifest
        ids/        (N, K) int32           top-K token ids per response token, by probability
        logp/       (N, K) uint16|uint32   bit patterns of the top-K log-probs in the segment's
                                           format (attrs.format: top_k, dtype, logp_keep_bits;
                                           cache/format.py); Delta + zstd
        lse/        (N,)   float32         full-vocabulary logsumexp of the raw logits
        label_logp/ (N,)   float32         log-prob of the actual next token
        index.parquet                      one row per (sequence, teacher) entry: key, teacher,
                                           offset, n_tokens, prompt_len, token_ids, checksum
    <root>/tmp/<segment id>.<pid>.<ns>     segments being written by process <pid> (never read;
                                           `cache gc` removes those whose process is gone)

Arrays are chunked along the token axis; every chunk carries a CRC32C. An entry's key
(`CacheFormat.key`) hashes (schema version, teacher identity, format, prompt length, exact token ids): the same teacher on
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill_pipeline.cache.format import SCHEMA_VERSION, CacheFormat

CHUNK_ROWS = 4096
FIELDS = ("ids", "logp", "lse", "label_logp")
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")


class CacheError(RuntimeError):
    """The cache store is missing, unreadable or inconsistent."""


STORE_META = {"schema_version": SCHEMA_VERSION, "kind": "distill-pipeline teacher-logit cache"}
INDEX_COLUMNS = ["key", "teacher", "offset", "n_tokens", "prompt_len", "token_ids", "checksum"]


def default_root() -> Path:
    base = os.environ.get("DISTILL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "distill-pipeline")
    return Path(base) / "teacher-logits"


def entry_checksum(ids, logp_bits, lse, label) -> str:
    h = hashlib.sha256()
    for a in (ids, logp_bits, lse, label):
        h.update(a.tobytes())
    return h.hexdigest()[:32]


@contextmanager
def writer_lock(tmp: Path):
    """Hold an exclusive flock on `<tmp>.lock` while `tmp` is being written. `cache gc` takes the
    same lock before it removes a write: held means the writer is alive, on this host or (on a
    filesystem with working flock, e.g. NFSv4) another."""
    import fcntl

    lock = tmp.with_name(tmp.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock, "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        lock.unlink(missing_ok=True)
        fh.close()  # releases the flock


def writer_alive(tmp: Path) -> bool | None:
    """Is the write `tmp` still owned by a live process? None when it has no lock file (writes
    of older versions, and folders set aside by `remove_segment`)."""
    import fcntl

    lock = tmp.with_name(tmp.name + ".lock")
    try:
        fh = open(lock, "r+")
    except FileNotFoundError:
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def segment_format(attrs: dict) -> CacheFormat:
    """The format a segment was written in, from its manifest (zarr group attributes)."""
    return CacheFormat.from_manifest(attrs)


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
        if self.root.exists() and not self.root.is_dir():
            raise CacheError(f"{self.root} is a file, not a teacher-logit cache directory; point --store "
                             "(or teacher_logits.store, $DISTILL_CACHE_DIR) at a directory")
        meta = self.root / "store.json"
        if meta.exists():
            found = self._read_meta(meta).get("schema_version")
            if found != SCHEMA_VERSION:
                raise CacheError(f"{self.root}: cache schema {found}, this version of distill-pipeline "
                                 f"reads schema {SCHEMA_VERSION} (entry keys differ); point "
                                 "teacher_logits.store / --store at a new directory, or delete this "
                                 "one, and the entries are extracted again")
            if create:  # a writer needs both (a publish into a missing segments/ would be lost)
                self._mkdirs()
        elif create:
            self._mkdirs()
            tmp = self.root / f"store.json.{os.getpid()}"
            try:
                tmp.write_text(json.dumps(STORE_META))
                os.replace(tmp, meta)
            except OSError as exc:
                raise CacheError(f"cannot create a teacher-logit cache at {self.root}: {exc.strerror or exc}; "
                                 "point teacher_logits.store / --store at a writable directory") from None
        else:
            where = "the directory does not exist" if not self.root.exists() else "no store.json in it"
            raise CacheError(f"no teacher-logit cache at {self.root} ({where}); check --store, "
                             "$DISTILL_CACHE_DIR or teacher_logits.store — `distill-pipeline run "
                             "teacher_logits` creates the store")

    def _mkdirs(self) -> None:
        try:
            (self.root / "segments").mkdir(parents=True, exist_ok=True)
            (self.root / "tmp").mkdir(exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create a teacher-logit cache at {self.root}: {exc.strerror or exc} "
                             f"({exc.filename}); point teacher_logits.store / --store at a writable "
                             "directory") from None

    @staticmethod
    def _read_meta(meta: Path) -> dict:
        try:
            data = json.loads(meta.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            data = exc
        if not isinstance(data, dict):
            why = f"{type(data).__name__}: {data}" if isinstance(data, Exception) else "not a JSON object"
            raise CacheError(
                f"{meta} is damaged ({why}). It only marks the directory as a cache: rewrite it with "
                f"`echo '{json.dumps(STORE_META)}' > {meta}`, then check the segments with "
                f"`distill-pipeline cache verify --store {meta.parent}` (or point --store / "
                "teacher_logits.store at a new directory and the entries are extracted again)")
        return data

    # ------------------------------------------------------------------ index

    def segments(self) -> list[Path]:
        """Published segments (complete: their index.parquet exists), by name."""
        seg = self.root / "segments"
        if not seg.is_dir():
            return []
        return sorted(p for p in seg.iterdir() if p.is_dir() and (p / "index.parquet").exists())

    def index(self, columns: list[str] | None = None, *, damaged: dict[str, str] | None = None):
        """All entries of all published segments as one Arrow table (+ `segment` column). A segment
        whose index cannot be read (truncated, corrupt) is left out — its entries count as absent —
        and, if `damaged` is given, recorded there (segment name → why)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for seg in self.segments():
            try:
                t = pq.read_table(seg / "index.parquet", columns=columns)
            except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError, missing column, …
                if damaged is not None:
                    damaged[seg.name] = f"index.parquet is unreadable ({type(exc).__name__}: {exc})"
                continue
            tables.append(t.append_column("segment", pa.array([seg.name] * len(t), pa.string())))
        if not tables:
            cols = columns or INDEX_COLUMNS
            return pa.table({c: pa.array([], pa.string()) for c in cols + ["segment"]})
        return pa.concat_tables(tables)

    def existing_keys(self) -> set[str]:
        return set(self.index(columns=["key"]).column("key").to_pylist())

    def missing(self, keys) -> set[str]:
        """The keys not in any published segment with a readable index: what an extraction of
        them would have to compute again. Reads only the key column of each index."""
        wanted = set(keys)
        return wanted - self.existing_keys() if wanted else set()

    def remove_segment(self, name: str) -> None:
        """Take a segment out of the store: one rename out of segments/ (readers stop seeing it at
        once), then delete it. The renamed folder is named like a write of this process, so an
        interrupted delete is finished by a later `cache gc`."""
        path = self.root / "segments" / name
        aside = self.root / "tmp" / f"{name}.{os.getpid()}.{time.time_ns()}"
        try:
            aside.parent.mkdir(exist_ok=True)
            os.rename(path, aside)
        except FileNotFoundError:
            return  # someone else removed it
        shutil.rmtree(aside, ignore_errors=True)

    def _readable(self, segment: Path) -> bool:
        import pyarrow.parquet as pq

        try:
            pq.read_table(segment / "index.parquet", columns=["key"])
            return True
        except Exception:  # noqa: BLE001
            return False

    # ------------------------------------------------------------------ write

    def publish(self, segment_id: str, data: SegmentData, manifest: dict) -> bool:
        """Write a segment under tmp/ and rename it into segments/. False if it already exists
        (another writer published the same unit first: content addressed, so identical)."""
        final = self.root / "segments" / segment_id
        if final.exists():
            if self._readable(final):
                return False
            self.remove_segment(segment_id)  # incomplete or unreadable: its entries are written again
        tmp = self.root / "tmp" / f"{segment_id}.{os.getpid()}.{time.time_ns()}"
        with writer_lock(tmp):
            return self._write(tmp, final, data, manifest)

    def _write(self, tmp: Path, final: Path, data: SegmentData, manifest: dict) -> bool:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq
        import zarr
        from zarr.codecs import BloscCodec, Crc32cCodec
        from zarr.codecs.numcodecs import Delta

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
        seg = self.root / "segments"
        return sum(f.stat().st_size for f in seg.rglob("*") if f.is_file()) if seg.is_dir() else 0
