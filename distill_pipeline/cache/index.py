"""The consolidated key index of a store: which segment holds each entry key.

    <store>/index/<segment id>.parquet             loose: one small file per newly published
                                                   segment (its rows), until PACK_AT of them
    <store>/index/<pp>/pack-<rows>-<ns>-<pid>.arrow  packs of partition <pp> (the keys' first
                                                   PARTITION_CHARS hex characters): Arrow IPC
                                                   files, rows sorted by key, record batches of
                                                   BATCH_ROWS rows whose first keys ("fences")
                                                   are in the schema's metadata

Rows are KEY_COLUMNS + `segment`. A lookup of some keys (`lookup`) reads the loose files (at most
PACK_AT small ones), and in each partition its keys fall in, from each pack only the batches the
fences say may hold them — memory-mapped on a local store, range reads on an object store — so it
costs what the query touches, not the size of the index. Packing moves the loose rows into one
new pack per partition; a partition's packs of one size tier (rows // FANOUT**tier) are merged
once FANOUT of them exist, so each row is rewritten O(log rows) times and a merge holds one
partition, never the whole index. Packs and loose files may still hold rows of segments removed
since: every reader keeps only the rows of segments the store says are live. A pack is written
before the files it replaces are removed, so every row is always in some file (the newest copy of
a (key, segment) row wins).

The same code serves every store through `IndexFiles` (`LocalIndexFiles` for a directory,
`FsspecIndexFiles` for an object store).
"""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Protocol

KEY_COLUMNS = ["key", "teacher", "offset", "n_tokens", "prompt_len", "checksum"]  # + segment
PACK_AT = 64           # loose per-segment files that are packed into the partitions
FANOUT = 8             # packs of one size tier in a partition that are merged into one
PARTITION_CHARS = 2    # partitions by the keys' first hex characters: 16**2 = 256
BATCH_ROWS = 512       # rows per record batch of a pack: the unit a lookup reads
FENCES = b"distill.fences"


class IndexFiles(Protocol):
    """A store's index/ folder. Names are relative to it (`<segment>.parquet`,
    `<pp>/pack-….arrow`). `threads`: partitions a lookup reads at once (each read is a request
    on an object store, a page fault on a local disk)."""
    threads: int

    def names(self, sub: str = "") -> list[str]: ...          # files directly in index/<sub>
    def listing(self) -> dict[str, list[str]]: ...            # every file: folder ("" or <pp>) → names
    def read(self, names: list[str]) -> dict[str, bytes]: ...   # those still there
    def open(self, name: str) -> Any: ...                       # random access (FileNotFoundError)
    def write(self, name: str, data: bytes) -> None: ...        # whole or not at all
    def remove(self, names: list[str]) -> None: ...


class LocalIndexFiles:
    """index/ of a local store: written under a temporary name and renamed into place; packs are
    memory-mapped (a lookup's resident memory is the pages it touches)."""
    threads = 1

    def __init__(self, folder: Path):
        self.folder = folder

    def names(self, sub: str = "") -> list[str]:
        d = self.folder / sub if sub else self.folder
        try:
            return [f"{sub}/{e.name}" if sub else e.name for e in os.scandir(d)
                    if e.is_file() and not e.name.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def listing(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"": self.names()}
        try:
            subs = [e.name for e in os.scandir(self.folder) if e.is_dir()]
        except FileNotFoundError:
            return out
        for sub in subs:
            out[sub] = self.names(sub)
        return out

    def read(self, names: list[str]) -> dict[str, bytes]:
        out = {}
        for n in names:
            try:
                out[n] = (self.folder / n).read_bytes()
            except OSError:  # packed away by another writer meanwhile: its rows are in the new pack
                continue
        return out

    def open(self, name: str):
        import pyarrow as pa

        return pa.memory_map(str(self.folder / name))

    def write(self, name: str, data: bytes) -> None:
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.time_ns()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def remove(self, names: list[str]) -> None:
        for n in names:
            (self.folder / n).unlink(missing_ok=True)


class FsspecIndexFiles:
    """index/ of an object store (fsspec): a put is atomic; packs are read by range requests,
    `threads` partitions at a time (a request's latency, not its bytes, is what a lookup waits on)."""
    threads = 16

    def __init__(self, fs: Any, folder: str):
        self.fs, self.folder = fs, folder
        self._sizes: dict[str, int] = {}  # from the last listing

    def _path(self, name: str) -> str:
        return f"{self.folder}/{name}"

    def names(self, sub: str = "") -> list[str]:
        try:
            listed = self.fs.ls(self._path(sub) if sub else self.folder, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for info in listed:
            if info.get("type") == "directory":
                continue
            name = str(info["name"]).rstrip("/").rsplit("/", 1)[-1]
            out.append(f"{sub}/{name}" if sub else name)
        return out

    def listing(self) -> dict[str, list[str]]:
        """One recursive listing (one request, paginated), not one per partition; it also notes
        each file's size for `open`."""
        try:
            found = self.fs.find(self.folder, detail=True)
        except FileNotFoundError:
            return {"": []}
        out: dict[str, list[str]] = {"": []}
        prefix = self.folder.rstrip("/") + "/"
        for path, info in found.items():
            rel = str(path).split(prefix, 1)[-1]
            sub, _, name = rel.rpartition("/")
            if name.startswith("."):
                continue
            out.setdefault(sub, []).append(rel)
            self._sizes[rel] = int(info.get("size") or 0)
        return out

    def read(self, names: list[str]) -> dict[str, bytes]:
        paths = {self._path(n): n for n in names}
        data = self.fs.cat(list(paths), on_error="omit") if paths else {}
        return {n: data[p] for p, n in paths.items()  # in the order asked
                if p in data and not isinstance(data[p], Exception)}

    def open(self, name: str):
        # a pack of a few MB in one request; a larger one by range requests of the batches read
        whole = 0 < self._sizes.get(name, 1 << 62) <= 8 << 20
        return self.fs.open(self._path(name), "rb", cache_type="all" if whole else "readahead",
                            block_size=1 << 16)

    def write(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name), data)

    def remove(self, names: list[str]) -> None:
        if names:
            self.fs.rm([self._path(n) for n in names])


# ---------------------------------------------------------------------------- rows

def empty_rows():
    import pyarrow as pa

    return pa.table({c: pa.array([], pa.string()) for c in KEY_COLUMNS + ["segment"]})


def _keep_newest(table):
    """Rows once per (key, segment), the newest one kept (`table` holds its files' rows oldest
    first): a segment removed and published again — its values may differ in the last bits,
    computed elsewhere — is read with its new checksums."""
    cols = [c for c in KEY_COLUMNS if c != "key"]
    out = table.group_by(["key", "segment"], use_threads=False).aggregate([(c, "last") for c in cols])
    return out.rename_columns(["key", "segment"] + cols).select(KEY_COLUMNS + ["segment"])


def segment_rows(name: str, index_parquet: bytes | Path):
    """A segment's rows of the consolidated index, from its own index.parquet (bytes or path)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = pa.BufferReader(index_parquet) if isinstance(index_parquet, (bytes, bytearray)) else index_parquet
    t = pq.read_table(source, columns=KEY_COLUMNS)
    return t.append_column("segment", pa.array([name] * len(t), pa.string()))


def parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def partition(key: str) -> str:
    return key[:PARTITION_CHARS]


def _pack_name(part: str, rows: int) -> str:
    return f"{part}/pack-{rows:012d}-{time.time_ns():020d}-{os.getpid()}.arrow"


def _pack_rows(name: str) -> int:
    return int(name.rsplit("/", 1)[-1].split("-")[1])


def _tier(rows: int) -> int:
    tier = 0
    while rows >= PACK_AT * FANOUT ** (tier + 1):
        tier += 1
    return tier


def pack_bytes(table) -> bytes:
    """A pack: `table` (KEY_COLUMNS + segment) sorted by key, in zstd-compressed record batches
    of BATCH_ROWS rows (a lookup decompresses only the batches it reads), each batch's first key in
    the schema metadata."""
    import pyarrow as pa

    table = table.select(KEY_COLUMNS + ["segment"]).sort_by("key").combine_chunks()
    keys = table.column("key")
    fences = [keys[i].as_py() for i in range(0, len(table), BATCH_ROWS)]
    schema = table.schema.with_metadata({FENCES: json.dumps(fences)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table.replace_schema_metadata(schema.metadata), max_chunksize=BATCH_ROWS)
    return sink.getvalue().to_pybytes()


def _loose(files: IndexFiles) -> list[str]:
    """Loose files, oldest first: packs of the index's first layout (`packed-<ns>-<pid>.parquet`,
    read as loose files until the next packing moves their rows into partitions) by the time in
    their names, then the per-segment files."""
    names = [n for n in files.names() if n.endswith(".parquet")]
    old = sorted(n for n in names if n.startswith("packed-"))
    return old + sorted(n for n in names if not n.startswith("packed-"))


def _packs(files: IndexFiles, part: str) -> list[str]:
    """A partition's packs, oldest first (by the creation time in their names)."""
    return sorted((n for n in files.names(part) if n.endswith(".arrow")), key=_pack_time)


def _parse_loose(blobs: dict[str, bytes]) -> list[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for name in blobs:  # in the order read: `_loose`'s, oldest first
        try:
            tables.append(pq.read_table(pa.BufferReader(blobs[name]), columns=KEY_COLUMNS + ["segment"]))
        except Exception:  # noqa: BLE001 - a damaged file: its segment is indexed again by the store
            continue
    return tables


def _pack_batches(files: IndexFiles, name: str, wanted: list[str] | None) -> list[Any] | None:
    """The record batches of one pack that may hold `wanted` (sorted; None: every batch); None
    when the pack is gone (merged away by another packer since it was listed). A damaged pack
    gives no batch: its rows count as absent (extracted again; `cache verify` reports them)."""
    import numpy as np
    import pyarrow as pa

    try:
        source = files.open(name)
    except (FileNotFoundError, OSError):
        return None
    try:
        try:
            reader = pa.ipc.open_file(source)
            fences = np.array(json.loads(reader.schema.metadata[FENCES]), dtype=object)
        except Exception:  # noqa: BLE001 - damaged
            return []
        if wanted is None:
            chosen = range(reader.num_record_batches)
        else:
            at = np.searchsorted(fences, np.array(wanted, dtype=object), side="right") - 1
            chosen = sorted(set(int(i) for i in at if i >= 0))
        return [reader.get_batch(i) for i in chosen]
    finally:
        source.close()


def _partition_batches(files: IndexFiles, part: str, wanted: list[str] | None,
                       listed: list[str] | None = None) -> list[Any]:
    """The batches (of `wanted`, or all) of every pack of one partition, oldest pack first
    (`listed`: the partition's files from a listing just made). A pack merged away between the
    listing and its reading is made up for by listing again: a merge writes its pack before it
    removes the ones it replaces, so the rows are in a pack the new listing holds."""
    read: dict[str, list[Any]] = {}
    for attempt in range(100):
        gone = False
        names = (sorted((n for n in listed if n.endswith(".arrow")), key=_pack_time)
                 if attempt == 0 and listed is not None else _packs(files, part))
        for name in names:
            if name not in read:
                batches = _pack_batches(files, name, wanted)
                if batches is None:
                    gone = True
                else:
                    read[name] = batches
        if not gone:
            break
    return [b for name in sorted(read, key=_pack_time) for b in read[name]]


def _pack_time(name: str) -> str:
    return name.rsplit("/", 1)[-1].split("-")[2]


# ---------------------------------------------------------------------------- reading

def lookup(files: IndexFiles, keys: Iterable[str], live: Callable[[Collection[str]], set[str]]):
    """The index rows of `keys` (KEY_COLUMNS + segment), only of segments `live(names)` keeps,
    newest copy of each (key, segment). Reads the loose files and, in the partitions the keys fall
    in, the pack batches that may hold them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = sorted(set(keys))
    if not wanted:
        return empty_rows()
    value_set = pa.array(wanted, pa.string())
    # loose files first: a packing that runs meanwhile writes their rows into packs before it
    # removes them, so a row is read from one or the other (packs are read after)
    loose = [hit for t in _parse_loose(files.read(_loose(files)))
             if (hit := t.filter(pc.is_in(t.column("key"), value_set=value_set))).num_rows]
    by_part: dict[str, list[str]] = {}
    for k in wanted:
        by_part.setdefault(partition(k), []).append(k)
    listing = files.listing()  # after the loose files were read (see above): one listing

    def hits(item: tuple[str, list[str]]):
        part, ks = item
        batches = _partition_batches(files, part, ks, listing.get(part, []))
        if not batches:
            return None
        table = pa.Table.from_batches(batches)
        hit = table.filter(pc.is_in(table.column("key"), value_set=pa.array(ks, pa.string())))
        return hit if hit.num_rows else None

    parts = sorted(by_part.items())
    if files.threads > 1 and len(parts) > 1:  # an object store: partitions read concurrently
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(files.threads, len(parts))) as pool:
            found = list(pool.map(hits, parts))
    else:
        found = [hits(item) for item in parts]
    packed = [t for t in found if t is not None]
    return _live_newest(packed + loose, live)  # loose rows are the newer ones


def _live_newest(parts: list[Any], live: Callable[[Collection[str]], set[str]]):
    import pyarrow as pa
    import pyarrow.compute as pc

    if not parts:
        return empty_rows()
    table = pa.concat_tables([p.replace_schema_metadata(None) for p in parts], promote_options="permissive")
    segments = set(pc.unique(table.column("segment")).to_pylist())
    alive = live(segments)
    if alive != segments:
        table = table.filter(pc.is_in(table.column("segment"), value_set=pa.array(sorted(alive), pa.string())))
    return _keep_newest(table)  # a (key, segment) in several files: its newest row


def read_all(files: IndexFiles, live: Callable[[Collection[str]], set[str]]):
    """Every row of the index (the whole catalogue: memory follows the store's size — for
    listings and copies of everything, never for key lookups)."""
    import pyarrow as pa

    loose = _parse_loose(files.read(_loose(files)))  # first: see `lookup`
    parts = [pa.Table.from_batches(bs) for part in _subdirs(files)
             if (bs := _partition_batches(files, part, None))]
    return _live_newest(parts + loose, live)


def _subdirs(files: IndexFiles) -> list[str]:
    """Partition folders that exist (all PARTITION_CHARS-hex names)."""
    hexdigits = "0123456789abcdef"
    out = []
    for a in hexdigits:
        for b in hexdigits:
            part = a + b
            if files.names(part):
                out.append(part)
    return out


# ---------------------------------------------------------------------------- writing

def add(files: IndexFiles, name: str, rows) -> None:
    """Index a newly published segment: its rows as a loose file."""
    files.write(f"{name}.parquet", parquet_bytes(rows.select(KEY_COLUMNS + ["segment"])))


def drop(files: IndexFiles, name: str) -> None:
    """A removed segment's loose file (rows already in packs are dropped by readers and merges)."""
    files.remove([f"{name}.parquet"])


def pack(files: IndexFiles, live: Callable[[Collection[str]], set[str]]) -> None:
    """Once PACK_AT loose files exist, move their rows into one new pack per partition, then merge
    each touched partition's size tiers (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    loose = _loose(files)
    if len(loose) < PACK_AT:
        return
    blobs = files.read(loose)
    tables = _parse_loose(blobs)
    if tables:
        table = _live_newest(tables, live)
        parts = pc.utf8_slice_codeunits(table.column("key"), 0, PARTITION_CHARS)
        for part in sorted(set(parts.to_pylist())):
            rows = table.filter(pc.equal(parts, pa.scalar(part)))
            files.write(_pack_name(part, rows.num_rows), pack_bytes(rows))
            _merge_tiers(files, part, live)
    files.remove(list(blobs))  # read whole (damaged ones too: their segments are indexed again)


def _merge_tiers(files: IndexFiles, part: str, live: Callable[[Collection[str]], set[str]]) -> None:
    import pyarrow as pa

    while True:
        tiers: dict[int, list[str]] = {}
        for name in _packs(files, part):
            tiers.setdefault(_tier(_pack_rows(name)), []).append(name)
        full = [names for _, names in sorted(tiers.items()) if len(names) >= FANOUT]
        if not full:
            return
        names = full[0]
        read = {n: _pack_batches(files, n, None) for n in names}
        read = {n: bs for n, bs in read.items() if bs is not None}  # merged away by another packer
        tables = [pa.Table.from_batches(read[n]) for n in sorted(read, key=_pack_time) if read[n]]
        if tables:
            table = _live_newest(tables, live)
            files.write(_pack_name(part, table.num_rows), pack_bytes(table))
        files.remove(list(read))
