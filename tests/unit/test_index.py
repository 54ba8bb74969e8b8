"""The consolidated key index (cache/index.py): lookups read only what their keys touch and agree
with the whole index, across packing tiers, removed and republished segments, and the first
(unpartitioned parquet) layout."""
from __future__ import annotations

import hashlib

import pyarrow as pa
import pytest

from distill_pipeline.cache import index as ix


def rows(segment: str, keys: list[str], checksum: str = "c") -> pa.Table:
    n = len(keys)
    return pa.table({"key": keys, "teacher": ["t"] * n, "offset": pa.array(range(n), pa.int64()),
                     "n_tokens": pa.array([1] * n, pa.int32()), "prompt_len": pa.array([1] * n, pa.int32()),
                     "checksum": [checksum] * n, "segment": [segment] * n})


def keys_of(s: int, n: int = 40) -> list[str]:
    return [hashlib.sha256(f"{s}:{j}".encode()).hexdigest() for j in range(n)]


def everything(segment: set[str]) -> set[str]:
    return set(segment)


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(ix, "PACK_AT", 4)
    monkeypatch.setattr(ix, "FANOUT", 3)
    monkeypatch.setattr(ix, "BATCH_ROWS", 8)


def build(files, n_segments: int, live=everything) -> dict[str, str]:
    where = {}
    for s in range(n_segments):
        name = f"seg{s:04d}"
        ix.add(files, name, rows(name, keys_of(s)))
        ix.pack(files, live)
        where.update({k: name for k in keys_of(s)})
    return where


def as_dict(table) -> dict[str, str]:
    return dict(zip(table.column("key").to_pylist(), table.column("segment").to_pylist()))


def test_lookup_agrees_with_the_whole_index_across_tiers(tmp_path, small):
    files = ix.LocalIndexFiles(tmp_path / "index")
    where = build(files, 50)
    packs = sorted(p.name.split("-")[1] for p in (tmp_path / "index").glob("*/pack-*.arrow"))
    assert len({int(r) for r in packs}) > 1  # packs of several sizes: tiers were merged
    assert len(list((tmp_path / "index").glob("*.parquet"))) < ix.PACK_AT  # loose rows were packed
    assert as_dict(ix.read_all(files, everything)) == where
    probe = list(where)[::3] + ["f" * 64, "0" * 64]
    assert as_dict(ix.lookup(files, probe, everything)) == {k: where[k] for k in probe if k in where}
    assert ix.lookup(files, [], everything).num_rows == 0


def test_lookup_reads_only_the_batches_its_keys_touch(tmp_path, small, monkeypatch):
    files = ix.LocalIndexFiles(tmp_path / "index")
    where = build(files, 50)
    read = []
    original = ix._pack_batches

    def counting(files_, name, wanted):
        batches = original(files_, name, wanted)
        read.extend(b.num_rows for b in batches or [])
        return batches
    monkeypatch.setattr(ix, "_pack_batches", counting)
    key = next(iter(where))
    assert as_dict(ix.lookup(files, [key], everything)) == {key: where[key]}
    packs_in_partition = len(list((tmp_path / "index" / key[:2]).glob("pack-*.arrow")))
    assert 0 < len(read) <= packs_in_partition  # at most one batch per pack of one partition
    assert sum(read) <= packs_in_partition * ix.BATCH_ROWS < len(where)


def test_rows_of_removed_segments_are_not_found(tmp_path, small):
    files = ix.LocalIndexFiles(tmp_path / "index")
    where = build(files, 20)
    gone = "seg0003"
    live = lambda names: set(names) - {gone}  # noqa: E731
    ix.drop(files, gone)
    found = as_dict(ix.lookup(files, list(where), live))
    assert gone not in found.values() and len(found) == len(where) - 40
    assert gone not in set(ix.read_all(files, live).column("segment").to_pylist())


def test_a_republished_segment_is_read_with_its_newest_rows(tmp_path, small):
    files = ix.LocalIndexFiles(tmp_path / "index")
    build(files, 12)  # seg0000's rows are packed by now
    ix.add(files, "seg0000", rows("seg0000", keys_of(0), checksum="new"))
    table = ix.lookup(files, keys_of(0), everything)
    assert table.num_rows == 40 and set(table.column("checksum").to_pylist()) == {"new"}
    for _ in range(3 * ix.PACK_AT):  # packed and merged again: still the newest
        s = 100 + _
        ix.add(files, f"seg{s}", rows(f"seg{s}", keys_of(s)))
        ix.pack(files, everything)
    assert set(ix.lookup(files, keys_of(0), everything).column("checksum").to_pylist()) == {"new"}


def test_the_first_layout_is_read_and_moved_into_partitions(tmp_path, small):
    """A store indexed before partitions: `packed-<ns>-<pid>.parquet` at the top of index/ is read
    as a loose file, and the next packing moves its rows into the partitions."""
    files = ix.LocalIndexFiles(tmp_path / "index")
    old = pa.concat_tables([rows(f"old{s}", keys_of(1000 + s)) for s in range(3)])
    files.write("packed-1-1.parquet", ix.parquet_bytes(old))
    where = as_dict(old)
    assert as_dict(ix.lookup(files, list(where), everything)) == where
    where.update(build(files, ix.PACK_AT))
    assert not list((tmp_path / "index").glob("packed-*.parquet"))
    assert as_dict(ix.lookup(files, list(where), everything)) == where


def test_a_damaged_pack_is_skipped_not_fatal(tmp_path, small):
    files = ix.LocalIndexFiles(tmp_path / "index")
    where = build(files, 12)
    pack = next((tmp_path / "index").glob("*/pack-*.arrow"))
    pack.write_bytes(b"not arrow")
    found = as_dict(ix.lookup(files, list(where), everything))
    assert 0 < len(found) < len(where)  # that pack's rows count as absent: extracted again


def test_a_lookup_racing_a_merge_still_finds_every_row(tmp_path, small, monkeypatch):
    """A pack merged away between the listing and its reading: the partition is listed again and
    the merged pack read (a merge writes its pack before removing the ones it replaces)."""
    files = ix.LocalIndexFiles(tmp_path / "index")
    where = build(files, 12)
    original = ix._pack_batches
    raced = []

    def merge_first(files_, name, wanted):  # the first pack read is merged away just before
        if not raced:
            raced.append(name)
            table = pa.Table.from_batches(original(files_, name, None))
            files_.write(ix._pack_name(name.split("/")[0], table.num_rows), ix.pack_bytes(table))
            files_.remove([name])
        return original(files_, name, wanted)
    monkeypatch.setattr(ix, "_pack_batches", merge_first)
    assert as_dict(ix.lookup(files, list(where), everything)) == where
    assert raced
