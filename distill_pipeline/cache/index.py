"""The consolidated key index of a store: which segment holds each entry key, in a few files.

    <store>/index/<segment id>.parquet          one small file per newly published segment
    <store>/index/packed-<ns>-<pid>.parquet     PACK_AT of those packed into one; packs merged
                                                into one past MAX_PACKS

Rows are KEY_COLUMNS + `segment`. A key lookup reads a few files, not one per segment. The same
reader and packer serve every store: they work through `IndexFiles`, the four file operations
a store's index folder offers (`LocalIndexFiles` for a directory, `FsspecIndexFiles` for an
object store). Readers trust only *live* segments (committed, given by the store); a segment
without a readable index file is rebuilt from its own index.parquet by the store's `rebuild`.
Packing is safe with concurrent packers and readers: a pack is written before the files it
replaces are removed, so every row is always in some file (duplicates are dropped on read).
"""
from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any, Callable, Collection, Protocol

KEY_COLUMNS = ["key", "teacher", "offset", "n_tokens", "prompt_len", "checksum"]  # + segment
PACK_AT = 64    # per-segment index files that are packed into one
MAX_PACKS = 8   # packs that are merged into one


class IndexFiles(Protocol):
    """A store's index/ folder: `*.parquet` file names, their bytes, atomic writes, removal."""

    def names(self) -> list[str]: ...
    def read(self, names: list[str]) -> dict[str, bytes]: ...   # those still there
    def write(self, name: str, data: bytes) -> None: ...        # whole or not at all
    def remove(self, names: list[str]) -> None: ...


class LocalIndexFiles:
    """index/ of a local store: written under a temporary name and renamed into place."""

    def __init__(self, folder: Path):
        self.folder = folder

    def names(self) -> list[str]:
        return [f.name for f in self.folder.glob("*.parquet")] if self.folder.is_dir() else []

    def read(self, names: list[str]) -> dict[str, bytes]:
        out = {}
        for n in names:
            try:
                out[n] = (self.folder / n).read_bytes()
            except OSError:  # packed away by another writer meanwhile: its rows are in the new pack
                continue
        return out

    def write(self, name: str, data: bytes) -> None:
        self.folder.mkdir(exist_ok=True)
        tmp = self.folder / f".{name}.{os.getpid()}.{time.time_ns()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.folder / name)

    def remove(self, names: list[str]) -> None:
        for n in names:
            (self.folder / n).unlink(missing_ok=True)


class FsspecIndexFiles:
    """index/ of an object store (fsspec): a put is atomic, listings may include any file."""

    def __init__(self, fs: Any, folder: str):
        self.fs, self.folder = fs, folder

    def _path(self, name: str) -> str:
        return f"{self.folder}/{name}"

    def names(self) -> list[str]:
        try:
            listed = self.fs.ls(self.folder, detail=False)
        except FileNotFoundError:
            return []
        return [n for n in (p.rstrip("/").rsplit("/", 1)[-1] for p in listed) if n.endswith(".parquet")]

    def read(self, names: list[str]) -> dict[str, bytes]:
        paths = {self._path(n): n for n in names}
        data = self.fs.cat(list(paths), on_error="omit") if paths else {}
        return {paths[p]: blob for p, blob in data.items()
                if p in paths and not isinstance(blob, Exception)}

    def write(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(name), data)

    def remove(self, names: list[str]) -> None:
        if names:
            self.fs.rm([self._path(n) for n in names])


def files_by_age(names: list[str]) -> list[str]:
    """Index file names oldest first: packs by their creation time (in the name), then the
    per-segment files (a segment in both was published again after being packed)."""
    packs = sorted(n for n in names if n.startswith("packed-"))
    return packs + sorted(n for n in names if not n.startswith("packed-"))


def dedupe(table):
    """Rows of the consolidated index once per (key, segment), the newest one kept (`table` holds
    its files' rows oldest first): a segment removed and published again — its values may differ
    in the last bits, computed elsewhere — is read with its new checksums."""
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


def _tables(files: IndexFiles, names: list[str]) -> tuple[list[str], list[Any]]:
    """(names read, their tables oldest first); a file that does not parse is left out (its
    segments are rebuilt from their own index)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    blobs = files.read(files_by_age(names))
    tables = []
    for name in files_by_age(list(blobs)):
        try:
            tables.append(pq.read_table(pa.BufferReader(blobs[name]), columns=KEY_COLUMNS + ["segment"]))
        except Exception:  # noqa: BLE001 - a damaged index file
            continue
    return list(blobs), tables


def read_index(files: IndexFiles, live: Collection[str], rebuild: Callable[[str], Any]):
    """The index rows of the `live` segments: KEY_COLUMNS + `segment`. `rebuild(name)` gives the
    rows of a live segment no index file covers (or None: unreadable, its entries count as
    absent)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    live = set(live)
    _, tables = _tables(files, files.names())
    covered: set[str] = set()
    overlap = False
    for t in tables:
        segs = set(pc.unique(t.column("segment")).to_pylist())
        overlap = overlap or bool(segs & covered)  # a pack and a file it replaced, both seen
        covered |= segs
    for name in sorted(live - covered):
        t = rebuild(name)
        if t is not None:
            tables.append(t)
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in KEY_COLUMNS + ["segment"]})
    table = pa.concat_tables(tables, promote_options="permissive")
    if covered - live:  # rows of removed segments, packed before their removal
        table = table.filter(pc.is_in(table.column("segment"), value_set=pa.array(sorted(live), pa.string())))
    return dedupe(table) if overlap else table


def pack(files: IndexFiles, live: Callable[[], Collection[str]]) -> None:
    """Pack the per-segment index files into one when there are PACK_AT of them, and the packs
    into one when there are more than MAX_PACKS (so a lookup reads at most about PACK_AT +
    MAX_PACKS files, and each row is rewritten a few times, not once per pack)."""
    loose = [n for n in files.names() if not n.startswith("packed-")]
    if len(loose) >= PACK_AT:
        _merge(files, loose, live)
    packs = [n for n in files.names() if n.startswith("packed-")]
    if len(packs) > MAX_PACKS:
        _merge(files, packs, live)


def _merge(files: IndexFiles, names: list[str], live: Callable[[], Collection[str]]) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    read, tables = _tables(files, names)
    if not tables:
        return
    table = dedupe(pa.concat_tables(tables, promote_options="permissive"))
    table = table.filter(pc.is_in(table.column("segment"), value_set=pa.array(sorted(live()), pa.string())))
    files.write(f"packed-{time.time_ns()}-{os.getpid()}.parquet", parquet_bytes(table))
    files.remove(read)  # read whole (damaged ones too: their segments are rebuilt from themselves)
