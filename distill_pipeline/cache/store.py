"""A teacher-logit store in a local (or shared-filesystem) directory, and `CacheStore`, what
every store offers. A store's layout (SCHEMA_VERSION; a segment's own files: `segment.py`, the
key index files: `index.py`):

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

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Protocol

from distill_pipeline.cache import index as key_index
from distill_pipeline.cache.format import SCHEMA_VERSION
from distill_pipeline.cache.index import KEY_COLUMNS, LocalIndexFiles
from distill_pipeline.cache.segment import (CacheError, SegmentData, SegmentRejected, check_against_record,
                                            check_offered, check_segment, damage_advice, record_for,
                                            validate_segment_file, validate_segment_name, write_segment)
from distill_pipeline.env import default_root

STORE_META = {"schema_version": SCHEMA_VERSION, "kind": "distill-pipeline teacher-logit cache"}


class NoStore(CacheError):
    """No store where one was named (and creating one was not asked for)."""


class CacheStore(Protocol):
    """What every store offers, whatever its backend (`Store` here, `remote.MirroredStore` for an
    object store or the cache service): what extraction, training, the service and the admin
    commands use. `url` is how users name the store (`--store`, `teacher_logits.store`)."""
    url: str

    def segment_names(self) -> list[str]: ...
    def index_table(self, *, damaged: dict[str, str] | None = None) -> Any: ...  # KEY_COLUMNS + segment
    def index(self, columns: list[str] | None = None, *, damaged: dict[str, str] | None = None) -> Any: ...
    def lookup(self, keys: Iterable[str]) -> Any: ...  # the rows of `keys` (KEY_COLUMNS + segment)
    def missing(self, keys: Iterable[str]) -> set[str]: ...
    def publish(self, segment_id: str, data: SegmentData, manifest: dict) -> bool: ...
    def open_segment(self, name: str) -> Any: ...   # a use of the segment begins (…
    def segment_path(self, name: str) -> Path: ...
    def release(self, name: str) -> None: ...        # … and ends: a mirror may then evict it
    def commit_record(self, name: str) -> dict: ...
    def segment_files(self, name: str) -> dict[str, bytes]: ...
    def import_segment(self, name: str, files: dict[str, bytes], *, max_bytes: int | None = None) -> bool: ...
    def remove_segment(self, name: str) -> None: ...
    def disk_bytes(self) -> int: ...


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
            raise NoStore(f"no teacher-logit cache at {self.root} ({where}); check --store, "
                             "$DISTILL_CACHE_DIR or teacher_logits.store — to start an empty one there, "
                             f"run `distill-pipeline cache init {self.root}` (a run's extraction also "
                             "creates a local store)")

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

    def _index_files(self) -> LocalIndexFiles:
        return LocalIndexFiles(self.root / "index")

    def _live(self, names: Iterable[str]) -> set[str]:
        """Of `names`, the published segments (a stat each: lookups never list the store)."""
        return {n for n in names if (self.root / "commits" / f"{n}.json").exists()
                or (self.root / "segments" / n / "index.parquet").exists()}

    def lookup(self, keys: Iterable[str]):
        """The index rows (KEY_COLUMNS + `segment`) of `keys` in published segments: reads what
        the keys touch (index.py), whatever the size of the store."""
        return key_index.lookup(self._index_files(), keys, self._live)

    def index_table(self, *, damaged: dict[str, str] | None = None):
        """Every row of the consolidated index (the whole catalogue; key lookups use `lookup`):
        KEY_COLUMNS + `segment`. A published segment no index file covers (written before the
        consolidated index, or by a writer that died before indexing it) has its own
        index.parquet read and indexed; one whose index cannot be read is left out (its entries
        count as absent) and recorded in `damaged`."""
        import pyarrow as pa
        import pyarrow.compute as pc

        table = key_index.read_all(self._index_files(), self._live)
        covered = set(pc.unique(table.column("segment")).to_pylist())
        extra = [t for name in sorted(set(self.segment_names()) - covered)
                 if (t := self._segment_keys(name, damaged)) is not None]
        if not extra:
            return table
        return pa.concat_tables([table, *extra], promote_options="permissive")

    def _segment_keys(self, name: str, damaged: dict[str, str] | None):
        """One segment's rows of the consolidated index, from its own index.parquet (and indexed,
        so the next lookup finds them)."""
        try:
            t = key_index.segment_rows(name, self.root / "segments" / name / "index.parquet")
        except Exception as exc:  # noqa: BLE001 - ArrowInvalid, OSError, missing column, …
            if damaged is not None:
                damaged[name] = f"index.parquet is unreadable ({type(exc).__name__}: {exc})"
            return None
        try:
            key_index.add(self._index_files(), name, t)
        except OSError:
            pass  # a read-only store: looked up from the segments every time
        return t

    def _pack_index(self) -> None:
        try:
            key_index.pack(self._index_files(), self._live)
        except OSError:
            pass  # a read-only or full store: packing is an optimisation, lookups still work

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
        them would have to compute again. Looked up in the consolidated index: the cost follows
        the keys asked, not the size of the store."""
        import pyarrow as pa
        import pyarrow.compute as pc

        wanted = pa.array(sorted(set(keys)), pa.string())
        if not len(wanted):
            return set()
        index = self.lookup(wanted.to_pylist())
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
            key_index.drop(self._index_files(), name)
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
                                      "(deleted or damaged); " + damage_advice(self.url)) from None
        try:
            check_against_record(name, out, record, str(self.root))
        except SegmentRejected as exc:
            raise SegmentRejected(f"{exc}; {damage_advice(self.url)}") from None
        return out

    def import_segment(self, name: str, files: dict[str, bytes], *, max_bytes: int | None = None) -> bool:
        """Publish a segment given as its files (a pull, a push, an upload to the service), after
        verifying all of it: the name and every file name, the size bound, then — written under
        tmp/ — every chunk decoded (CRC32C), every entry key recomputed from its teacher, format,
        prompt length and token ids, every entry checksum, offsets and shapes. A failure is a
        SegmentRejected naming the problem, and nothing is published. False if the segment was
        already there (content addressed: the same)."""
        check_offered(name, files, max_bytes=max_bytes)
        final = self.root / "segments" / name
        if final.exists() and self._readable(final):
            self._reindex(name, final)
            return False
        tmp = self.root / "tmp" / f"{name}.{os.getpid()}.{time.time_ns()}"
        with writer_lock(tmp):
            try:
                for rel, data in files.items():
                    p = tmp / rel
                    p.parent.mkdir(parents=True, exist_ok=True)
                    p.write_bytes(bytes(data))
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

    def _reindex(self, name: str, final: Path) -> None:
        """A segment asked to be published again is already here: its entries were looked up as
        missing, so make sure they are indexed (a writer that died between the rename and the
        index write left it unindexed) and it has its commit record."""
        self._segment_keys(name, None)
        if not (self.root / "commits" / f"{name}.json").exists():
            self._write_commit(name, final)

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
                self._reindex(segment_id, final)
                return False
            self.remove_segment(segment_id)  # incomplete or unreadable: its entries are written again
        tmp = self.root / "tmp" / f"{segment_id}.{os.getpid()}.{time.time_ns()}"
        with writer_lock(tmp):
            return self._write(tmp, final, data, manifest)

    def _write(self, tmp: Path, final: Path, data: SegmentData, manifest: dict) -> bool:
        write_segment(tmp, data, manifest)
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

    def release(self, name: str) -> None:
        """Nothing to do: a local store keeps every segment until it is removed."""

    def disk_bytes(self) -> int:
        seg = self.root / "segments"
        return sum(f.stat().st_size for f in seg.rglob("*") if f.is_file()) if seg.is_dir() else 0
