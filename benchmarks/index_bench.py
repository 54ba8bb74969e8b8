"""Key lookups on a large store: the consolidated index vs one index read per segment.

    python benchmarks/index_bench.py                          # 10,000 segments x 100 entries, local
    python benchmarks/index_bench.py --s3                     # also on S3 (moto's server on loopback)
    python benchmarks/index_bench.py --segments 500 --entries 20   # quick

Builds a store whose segments hold only what lookups read (an index.parquet per segment, its
commit record, its consolidated-index rows — published through the store's own code, so the
per-segment index files are packed every PACK_AT segments as real publishing does), then times
`existing_keys()` and `missing()` of 10,000 keys (half present), against reading every segment's
own index.parquet (the lookup before the consolidated index). Arrays are not written: lookups
never read them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _segment(i: int, entries: int):
    import pyarrow as pa

    keys = [hashlib.sha256(f"{i}:{j}".encode()).hexdigest() for j in range(entries)]
    return keys, pa.table({
        "key": keys, "teacher": ["t" * 64] * entries,
        "offset": pa.array([j * 10 for j in range(entries)], pa.int64()),
        "n_tokens": pa.array([10] * entries, pa.int32()), "prompt_len": pa.array([5] * entries, pa.int32()),
        "token_ids": pa.array([[1] * 15] * entries, pa.list_(pa.int32())),
        "checksum": ["c" * 32] * entries,
    })


def build_local(root: Path, segments: int, entries: int) -> list[str]:
    import pyarrow.parquet as pq

    from distill_pipeline.cache.store import Store

    store = Store(root)
    all_keys = []
    for i in range(segments):
        name = hashlib.sha256(str(i).encode()).hexdigest()[:32]
        keys, table = _segment(i, entries)
        seg = root / "segments" / name
        seg.mkdir(parents=True)
        (seg / "zarr.json").write_text(json.dumps({"attributes": {"n_entries": entries}}))
        pq.write_table(table, seg / "index.parquet")
        store._published(name, seg)
        all_keys += keys
    return all_keys


def build_s3(local_root: Path, url: str) -> None:
    """The local store uploaded as is (one concurrent bulk upload): the same segments, commit
    records and packed index files that publishing to S3 one segment at a time would leave."""
    from distill_pipeline.cache.remote import FsspecRemote

    remote = FsspecRemote(url)
    remote.fs.put(str(local_root) + "/", remote.path, recursive=True)


def per_segment_keys(store) -> set[str]:
    import pyarrow.parquet as pq

    keys: set[str] = set()
    for seg in store.segments():
        keys.update(pq.read_table(seg / "index.parquet", columns=["key"]).column("key").to_pylist())
    return keys


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--segments", type=int, default=10_000)
    ap.add_argument("--entries", type=int, default=100)
    ap.add_argument("--s3", action="store_true", help="also on S3 through moto's server")
    args = ap.parse_args()
    from distill_pipeline.cache.store import Store

    n = args.segments * args.entries
    with tempfile.TemporaryDirectory() as tmp:
        local_root = Path(tmp) / "store"
        t = time.perf_counter()
        keys = build_local(Path(tmp) / "store", args.segments, args.entries)
        print(f"local store: {args.segments} segments, {n} entries, built in {time.perf_counter() - t:.1f} s")
        store = Store(Path(tmp) / "store", create=False)
        probe = keys[::max(1, len(keys) // 5000)][:5000] + [hashlib.sha256(str(i).encode()).hexdigest()
                                                            for i in range(5000)]
        t_idx, found = timed(store.existing_keys)
        t_old, old = timed(lambda: per_segment_keys(store), repeat=1)
        t_miss, missing = timed(lambda: store.missing(probe))
        assert found == old and len(found) == n and len(missing) == 5000
        files = len(list((Path(tmp) / "store" / "index").glob("*.parquet")))
        print(f"  existing_keys(): {t_idx:.2f} s from the consolidated index ({files} files) vs "
              f"{t_old:.2f} s reading every segment's index ({t_old / t_idx:.1f}x)")
        print(f"  missing() of {len(probe)} keys (half present): {t_miss:.2f} s")
        if args.s3:
            from tests.s3server import make_bucket, moto_server, patched_env

            with moto_server() as env, patched_env(env):
                make_bucket(env, "bench")
                from distill_pipeline.cache.remote import open_store

                t = time.perf_counter()
                build_s3(local_root, "s3://bench/store")
                print(f"S3 (moto's server on loopback): uploaded in {time.perf_counter() - t:.1f} s")
                s3 = open_store("s3://bench/store")
                t_idx, found = timed(s3.existing_keys)
                t_miss, missing = timed(lambda: s3.missing(probe))
                assert found == old and len(missing) == 5000
                print(f"  existing_keys(): {t_idx:.2f} s; missing() of {len(probe)} keys: {t_miss:.2f} s")


if __name__ == "__main__":
    main()
