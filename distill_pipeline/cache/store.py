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
      adaptive K (attrs.format.top_mass set): ragged, a token's slots are consecutive
        counts/     (N,)   uint16          slots kept per token (min_k ≤ k ≤ top_k)
        ids/        (M,)   int32           flat: row r's ids at [Σ counts[:r], Σ counts[:r+1]),
        logp/       (M,)   uint16|uint32   M = Σ counts = attrs.n_slots; chunked FLAT_CHUNK
    <root>/commits/<segment id>.json       the segment's commit record: every file's size and
                                           sha256, and its manifest (written after the segment;
                                           on object stores, the marker that publishes it)
    <root>/index/<segment id>.parquet      the consolidated key index: one small file per new
    <root>/index/packed-<ns>-<pid>.parquet segment (key, teacher, segment, offset, n_tokens,
                                           prompt_len, checksum), packed together every
                                           `PACK_AT` segments, so a key lookup reads a few files,
                                           not one per segment
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
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill_pipeline.cache.format import SCHEMA_VERSION, CacheFormat

CHUNK_ROWS = 4096
FLAT_CHUNK = CHUNK_ROWS * 32  # slots per chunk of an adaptive-K segment's flat ids/logp arrays
PACK_AT = 64    # per-segment index files that are packed into one
MAX_PACKS = 8   # packs that are merged into one
FIELDS = ("ids", "logp", "lse", "label_logp")
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")


class CacheError(RuntimeError):
    """The cache store is missing, unreadable or inconsistent."""


STORE_META = {"schema_version": SCHEMA_VERSION, "kind": "distill-pipeline teacher-logit cache"}
INDEX_COLUMNS = ["key", "teacher", "offset", "n_tokens", "prompt_len", "token_ids", "checksum"]
KEY_COLUMNS = ["key", "teacher", "offset", "n_tokens", "prompt_len", "checksum"]  # + segment
_SEGMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SEGMENT_FILE = re.compile(r"(zarr\.json|index\.parquet|(ids|logp|lse|label_logp|counts)/(zarr\.json|c(/[0-9]{1,9}){1,2}))")


class SegmentRejected(CacheError):
    """A segment offered for publishing (an upload, a pull) failed verification; nothing of it
    was published."""


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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def default_root() -> Path:
    base = os.environ.get("DISTILL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "distill-pipeline")
    return Path(base) / "teacher-logits"


def entry_checksum(ids, logp_bits, lse, label, counts=None) -> str:
    """One entry's data: (n, K) ids and bits, or for adaptive K its (n,) counts and flat slots."""
    h = hashlib.sha256()
    for a in ((counts,) if counts is not None else ()) + (ids, logp_bits, lse, label):
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


def _damage_hint(root: Any) -> str:
    return (f"run `distill-pipeline cache verify --store {root}` and `cache gc --damaged`, then extract "
            "the entries again")


def record_for(name: str, files: dict[str, bytes]) -> dict:
    """The commit record of a segment given as its files."""
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


def index_files_by_age(names: list[str]) -> list[str]:
    """Index file names oldest first: packs by their creation time (in the name), then the
    per-segment files (a segment in both was published again after being packed)."""
    packs = sorted(n for n in names if n.startswith("packed-"))
    return packs + sorted(n for n in names if not n.startswith("packed-"))


def dedupe_index(table):
    """Rows of the consolidated index once per (key, segment), the newest one kept (`table` holds
    its files' rows oldest first): a segment removed and published again — its values may differ
    in the last bits, computed elsewhere — is read with its new checksums."""
    cols = [c for c in KEY_COLUMNS if c != "key"]
    out = table.group_by(["key", "segment"], use_threads=False).aggregate([(c, "last") for c in cols])
    return out.rename_columns(["key", "segment"] + cols).select(KEY_COLUMNS + ["segment"])


def segment_id(keys: list[str]) -> str:
    """A segment's id: the hash of its entries' keys in order (an extraction unit's id), so the
    same entries are one segment in every store."""
    return hashlib.sha256("".join(keys).encode()).hexdigest()[:32]


def _check_claims(name: str, files: dict[str, bytes], total: int) -> None:
    """Before anything is decoded: the id is the hash of the segment's keys (nobody can take the
    id of entries it does not hold), and the sizes its manifest declares fit the bytes sent
    (decoding is bounded by what was uploaded, not by what a manifest claims)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

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


def segment_format(attrs: dict) -> CacheFormat:
    """The format a segment was written in, from its manifest (zarr group attributes)."""
    return CacheFormat.from_manifest(attrs)


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


class Store:
    """A cache root. Safe for many concurrent readers and writers: writers build segments under
    tmp/ and publish them with one rename; readers only ever see published segments."""

    def __init__(self, root: str | Path | None = None, *, create: bool = True):
        self.root = Path(root).expanduser() if root else default_root()
        self.display = str(self.root)  # how messages name it (a remote store's mirror: its URL)
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

    @property
    def url(self) -> str:
        """How users name this store (`--store`, `teacher_logits.store`)."""
        return str(self.root)

    def segments(self) -> list[Path]:
        """Published segments (complete: their index.parquet exists), by name."""
        return [self.root / "segments" / n for n in self.segment_names()]

    def segment_names(self) -> list[str]:
        """Published segments, by name: those with a commit record, and those renamed into place
        by an earlier version or a writer that crashed before its record (index.parquet there)."""
        seg = self.root / "segments"
        if not seg.is_dir():
            return []
        committed = self._committed()
        return sorted(p.name for p in seg.iterdir()
                      if p.name in committed or (p.is_dir() and (p / "index.parquet").exists()))

    def _committed(self) -> set[str]:
        d = self.root / "commits"
        return {p.name[:-5] for p in d.iterdir() if p.name.endswith(".json")} if d.is_dir() else set()

    def has_segment(self, name: str) -> bool:
        return (self.root / "segments" / name / "index.parquet").exists()

    def index_table(self, *, damaged: dict[str, str] | None = None):
        """The consolidated index of every published segment: KEY_COLUMNS + `segment`. Read from
        the packed and per-segment files under index/; a segment without one (written before the
        consolidated index) has its own index.parquet read and its file written. A segment whose
        index cannot be read is left out (its entries count as absent) and recorded in `damaged`."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        names = set(self.segment_names())
        tables, covered, overlap = [], set(), False
        d = self.root / "index"
        files = [d / n for n in index_files_by_age([f.name for f in d.glob("*.parquet")])] if d.is_dir() else []
        for f in files:
            try:
                t = pq.read_table(f, columns=KEY_COLUMNS + ["segment"])
            except FileNotFoundError:
                continue  # packed away by another writer meanwhile: its rows are in the new pack
            except Exception:  # noqa: BLE001 - a damaged index file: rebuilt from the segments
                continue
            tables.append(t)
            segs = set(pc.unique(t.column("segment")).to_pylist())
            overlap = overlap or bool(segs & covered)  # a pack and a file it replaced, both seen
            covered |= segs
        for name in sorted(names - covered):
            t = self._segment_keys(name, damaged)
            if t is not None:
                tables.append(t)
        if not tables:
            return pa.table({c: pa.array([], pa.string()) for c in KEY_COLUMNS + ["segment"]})
        table = pa.concat_tables(tables, promote_options="permissive")
        if covered - names:  # rows of removed segments, packed before their removal
            table = table.filter(pc.is_in(table.column("segment"),
                                          value_set=pa.array(sorted(names), pa.string())))
        return dedupe_index(table) if overlap else table

    def _segment_keys(self, name: str, damaged: dict[str, str] | None):
        """One segment's rows of the consolidated index, from its own index.parquet (and its file
        under index/ written, so the next lookup does not read the segment again)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            t = pq.read_table(self.root / "segments" / name / "index.parquet", columns=KEY_COLUMNS)
        except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError, missing column, …
            if damaged is not None:
                damaged[name] = f"index.parquet is unreadable ({type(exc).__name__}: {exc})"
            return None
        t = t.append_column("segment", pa.array([name] * len(t), pa.string()))
        self._write_index_file(name, t)
        return t

    def _write_index_file(self, name: str, table) -> None:
        import pyarrow.parquet as pq

        d = self.root / "index"
        try:
            d.mkdir(exist_ok=True)
            tmp = d / f".{name}.{os.getpid()}.{time.time_ns()}.tmp"
            pq.write_table(table, tmp)
            os.replace(tmp, d / f"{name}.parquet")
        except OSError:
            pass  # a read-only store: looked up from the segments every time

    def _pack_index(self) -> None:
        """Pack the per-segment index files into one when there are `PACK_AT` of them, and the
        packs into one when there are more than `MAX_PACKS` (so a lookup reads at most about
        PACK_AT + MAX_PACKS files, and each row is rewritten a few times, not once per pack).
        Safe with concurrent packers and readers: a pack is published before the files it
        replaces are deleted, so every row is always in some file (duplicates are dropped)."""
        d = self.root / "index"
        if not d.is_dir():
            return
        loose = [f for f in d.glob("*.parquet") if not f.name.startswith("packed-")]
        if len(loose) >= PACK_AT:
            self._merge(d, loose)
        packs = [d / n for n in index_files_by_age([f.name for f in d.glob("packed-*.parquet")])]
        if len(packs) > MAX_PACKS:
            self._merge(d, packs)

    def _merge(self, d: Path, files: list[Path]) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        parts = []
        for f in files:
            try:
                parts.append(pq.read_table(f, columns=KEY_COLUMNS + ["segment"]))
            except Exception:  # noqa: BLE001 - gone (another packer) or damaged: rebuilt from segments
                pass
        if not parts:
            return
        table = dedupe_index(pa.concat_tables(parts, promote_options="permissive"))
        live = pa.array(sorted(self.segment_names()), pa.string())
        table = table.filter(pc.is_in(table.column("segment"), value_set=live))
        tmp = d / f".packed.{os.getpid()}.{time.time_ns()}.tmp"
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, d / f"packed-{time.time_ns()}-{os.getpid()}.parquet")
        except OSError:
            return
        for f in files:
            f.unlink(missing_ok=True)

    def index(self, columns: list[str] | None = None, *, damaged: dict[str, str] | None = None):
        """The consolidated index's `columns` (of KEY_COLUMNS) + `segment`; a segment whose index
        cannot be read is left out — its entries count as absent — and recorded in `damaged`."""
        columns = list(columns or KEY_COLUMNS)
        if not set(columns) <= set(KEY_COLUMNS):
            raise CacheError(f"the key index holds {', '.join(KEY_COLUMNS)}, not {columns}")
        return self.index_table(damaged=damaged).select(columns + ["segment"])

    def existing_keys(self) -> set[str]:
        return set(self.index_table().column("key").to_pylist())

    def missing(self, keys) -> set[str]:
        """The keys not in any published segment with a readable index: what an extraction of
        them would have to compute again. Looked up in the consolidated index (Arrow, no set of
        every key in the store)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        wanted = pa.array(sorted(set(keys)), pa.string())
        if not len(wanted):
            return set()
        index = self.index_table()
        index = index.filter(pc.is_in(index.column("key"), value_set=wanted))
        # the segments holding them must still be readable (a footer read each): an unreadable
        # one's entries are extracted again and its unit republished over it
        broken = [s for s in pc.unique(index.column("segment")).to_pylist()
                  if not self._footer_ok(self.root / "segments" / s / "index.parquet")]
        if broken:
            index = index.filter(pc.invert(pc.is_in(index.column("segment"),
                                                    value_set=pa.array(broken, pa.string()))))
        present = pc.is_in(wanted, value_set=index.column("key"))
        return set(wanted.filter(pc.invert(present)).to_pylist())

    @staticmethod
    def _footer_ok(path: Path) -> bool:
        import pyarrow.parquet as pq

        try:
            pq.read_metadata(path)
            return True
        except Exception:  # noqa: BLE001 - missing, truncated
            return False

    def remove_segment(self, name: str) -> None:
        """Take a segment out of the store: its commit record goes first, then one rename out of
        segments/ (readers stop seeing it at once), then it is deleted, and its index file. The
        renamed folder is named like a write of this process, so an interrupted delete is finished
        by a later `cache gc`."""
        path = self.root / "segments" / name
        aside = self.root / "tmp" / f"{name}.{os.getpid()}.{time.time_ns()}"
        (self.root / "commits" / f"{name}.json").unlink(missing_ok=True)
        try:
            aside.parent.mkdir(exist_ok=True)
            os.rename(path, aside)
        except FileNotFoundError:
            return  # someone else removed it
        finally:
            (self.root / "index" / f"{name}.parquet").unlink(missing_ok=True)
        shutil.rmtree(aside, ignore_errors=True)

    def _readable(self, segment: Path) -> bool:
        import pyarrow.parquet as pq

        try:
            pq.read_table(segment / "index.parquet", columns=["key"])
            return True
        except Exception:  # noqa: BLE001
            return False

    # ------------------------------------------------------------------ commit records, transfer

    def commit_record(self, name: str) -> dict:
        """{"segment", "files": {relative path: {"size", "sha256"}}, "manifest"} of a published
        segment: what a copy of it is checked against. Written when the segment is published;
        computed (and written) for segments published before records existed."""
        f = self.root / "commits" / f"{name}.json"
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError):
            pass
        seg = self.root / "segments" / validate_segment_name(name)
        if not (seg / "index.parquet").exists():
            raise CacheError(f"no segment {name} in {self.root}")
        return self._write_commit(name, seg)

    def _write_commit(self, name: str, seg: Path) -> dict:
        record = record_for(name, {p.relative_to(seg).as_posix(): p.read_bytes()
                                   for p in sorted(seg.rglob("*")) if p.is_file()})
        d = self.root / "commits"
        try:
            d.mkdir(exist_ok=True)
            tmp = d / f".{name}.{os.getpid()}.{time.time_ns()}.tmp"
            tmp.write_text(json.dumps(record))
            os.replace(tmp, d / f"{name}.json")
        except OSError:
            pass  # read-only store: computed again when asked
        return record

    def segment_files(self, name: str) -> dict[str, bytes]:
        """Every file of a published segment (relative path → bytes), checked against its commit
        record: a copy made from them is what was published, or a SegmentRejected says why not."""
        record = self.commit_record(validate_segment_name(name))
        seg = self.root / "segments" / name
        out = {}
        for rel in record["files"]:
            try:
                out[rel] = (seg / validate_segment_file(rel)).read_bytes()
            except FileNotFoundError:
                raise SegmentRejected(f"segment {name} in {self.root}: {rel} is missing "
                                      "(deleted or damaged); " + _damage_hint(self.root)) from None
        try:
            check_against_record(name, out, record, str(self.root))
        except SegmentRejected as exc:
            raise SegmentRejected(f"{exc}; {_damage_hint(self.root)}") from None
        return out

    def import_segment(self, name: str, files: dict[str, bytes], *, max_bytes: int | None = None) -> bool:
        """Publish a segment given as its files (a pull, a push, an upload to the service), after
        verifying all of it: the name and every file name, the size bound, then — written under
        tmp/ — every chunk decoded (CRC32C), every entry key recomputed from its teacher, format,
        prompt length and token ids, every entry checksum, offsets and shapes. A failure is a
        SegmentRejected naming the problem, and nothing is published. False if the segment was
        already there (content addressed: the same)."""
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
        _check_claims(name, files, total)
        final = self.root / "segments" / name
        if final.exists() and self._readable(final):
            return False
        tmp = self.root / "tmp" / f"{name}.{os.getpid()}.{time.time_ns()}"
        with writer_lock(tmp):
            try:
                for rel, data in files.items():
                    p = tmp / rel
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(bytes(data))
                from distill_pipeline.cache.admin import check_segment

                check = check_segment(tmp, deep=True)
                if check.damaged:
                    raise SegmentRejected(f"segment {name} failed verification: "
                                          + "; ".join(p.split(": ", 1)[1] for p in check.problems[:5]))
                if final.exists():
                    if self._readable(final):
                        return False  # another importer published it meanwhile
                    self.remove_segment(name)  # incomplete or unreadable: replaced
                try:
                    os.rename(tmp, final)
                except OSError:
                    return False  # another writer published it first
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self._published(name, final)
        return True

    def _published(self, name: str, final: Path) -> None:
        """After a segment is in place: its index file, its commit record, and packing."""
        self._segment_keys(name, None)
        self._write_commit(name, final)
        self._pack_index()

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
        offsets = np.array([e["offset"] for e in data.entries])
        checks = [data.checksum(e["offset"], e["n_tokens"]) for e in data.entries]
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
        self._published(final.name, final)
        return True

    # ------------------------------------------------------------------ read

    def segment_path(self, name: str) -> Path:
        return self.root / "segments" / name

    def open_segment(self, name: str):
        import zarr

        return zarr.open_group(str(self.root / "segments" / name), mode="r")

    def disk_bytes(self) -> int:
        seg = self.root / "segments"
        return sum(f.stat().st_size for f in seg.rglob("*") if f.is_file()) if seg.is_dir() else 0
