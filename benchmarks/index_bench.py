"""Key lookups on a large store: the consolidated index vs one index read per segment, and
`missing()` on simulated indexes of millions of entries.

    python benchmarks/index_bench.py                          # 10,000 segments x 100 entries, local
    python benchmarks/index_bench.py --s3                     # also on S3 (moto's server on loopback)
    python benchmarks/index_bench.py --segments 500 --entries 20   # quick
    python benchmarks/index_bench.py --simulate 1000000 10000000 100000000

--simulate N …: for each N, a fresh local store whose index holds N entries spread over
SIM_SEGMENTS segments (index files only: each segment is a folder with a commit record and an
empty index.parquet, so `missing()` runs its whole path — index lookup, liveness, footer checks —
without segment arrays), then `missing()` of 10,000 keys (half present) in a fresh process,
printing `entries N missing_10k_s X peak_rss_mb Y` (best of 3 calls; peak RSS of that process,
interpreter and imports included; `baseline_rss_mb` is the same process before the lookup). The
index files are written in the layout of the code being measured (partitioned packs when
`cache/index.py` has them, else one packed parquet file), so the same command measures before and
after a change of layout.

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


SIM_SEGMENTS = 1000
PROBE = 10_000


def _sim_keys(part: str, n: int, seed: int):
    """n random 64-hex-character keys starting with `part` (numpy: no Python loop per key)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 16, size=(n, 64 - len(part)), dtype=np.uint8)
    hexchars = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    body = hexchars[raw]
    prefix = np.frombuffer(part.encode(), dtype=np.uint8)
    return np.hstack([np.broadcast_to(prefix, (n, len(part))), body]).copy().view("S64").ravel()


def _sim_table(keys, seed: int):
    import numpy as np
    import pyarrow as pa

    n = len(keys)
    rng = np.random.default_rng(seed)
    seg = rng.integers(0, SIM_SEGMENTS, n)
    names = np.array([f"{i:032x}" for i in range(SIM_SEGMENTS)], dtype="S32")
    return pa.table({
        "key": pa.array(keys.astype(object)).cast(pa.string()) if n else pa.array([], pa.string()),
        "teacher": pa.array(["t" * 64] * n, pa.string()),
        "offset": pa.array(rng.integers(0, 1 << 20, n), pa.int64()),
        "n_tokens": pa.array(rng.integers(1, 200, n).astype(np.int32), pa.int32()),
        "prompt_len": pa.array(rng.integers(1, 200, n).astype(np.int32), pa.int32()),
        "checksum": pa.array(["c" * 32] * n, pa.string()),
        "segment": pa.array(names[seg].astype(object)).cast(pa.string()),
    })


def simulate_build(root: Path, entries: int) -> list[str]:
    """A store of `entries` index rows over SIM_SEGMENTS segments (see the module docstring);
    returns PROBE keys, half of them present."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distill_pipeline.cache import index as key_index
    from distill_pipeline.cache.store import Store

    Store(root)  # store.json, segments/, tmp/
    empty = pa.table({c: pa.array([], t) for c, t in [("key", pa.string()), ("teacher", pa.string()),
                                                      ("offset", pa.int64()), ("n_tokens", pa.int32()),
                                                      ("prompt_len", pa.int32()), ("token_ids", pa.list_(pa.int32())),
                                                      ("checksum", pa.string())]})
    (root / "commits").mkdir(exist_ok=True)
    for i in range(SIM_SEGMENTS):
        name = f"{i:032x}"
        (root / "segments" / name).mkdir(parents=True)
        pq.write_table(empty, root / "segments" / name / "index.parquet")
        (root / "commits" / f"{name}.json").write_text(json.dumps({"segment": name, "files": {}, "manifest": {}}))
    present: list[str] = []
    parts = [f"{i:02x}" for i in range(256)]
    per = [entries // 256 + (1 if i < entries % 256 else 0) for i in range(256)]
    files = key_index.LocalIndexFiles(root / "index")
    partitioned = hasattr(key_index, "pack_bytes")
    writer = None
    for i, (part, n) in enumerate(zip(parts, per)):
        keys = _sim_keys(part, n, seed=i)
        present += [k.decode() for k in keys[: (PROBE // 2) // 256 + 1]]
        table = _sim_table(keys, seed=1000 + i)
        if partitioned:
            files.write(f"{part}/pack-{n:012d}-{i:020d}-0.arrow", key_index.pack_bytes(table))
        else:  # the first layout: one packed parquet file, read whole by every lookup
            if writer is None:
                (root / "index").mkdir(exist_ok=True)
                writer = pq.ParquetWriter(root / "index" / "packed-0-0.parquet", table.schema)
            writer.write_table(table)
    if writer is not None:
        writer.close()
    absent = [k.decode() for k in _sim_keys("", PROBE - PROBE // 2, seed=99)]
    return present[: PROBE // 2] + absent


def simulate_measure(root: str, probe_file: str) -> None:
    """In a fresh process: missing() of the probe keys, best of 3, and this process's peak RSS
    (VmHWM: unlike getrusage's ru_maxrss, which keeps the forking parent's peak across exec, it
    starts afresh with the new program)."""
    from distill_pipeline.cache.store import Store

    def hwm_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")

    probe = json.loads(Path(probe_file).read_text())
    store = Store(root, create=False)
    base = hwm_mb()
    t, missing = timed(lambda: store.missing(probe))
    assert len(missing) == PROBE - PROBE // 2, len(missing)
    print(json.dumps({"seconds": t, "peak_rss_mb": hwm_mb(), "baseline_rss_mb": base}))


def simulate(sizes: list[int]) -> None:
    import subprocess

    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "store"
            t = time.perf_counter()
            probe = simulate_build(root, n)
            built = time.perf_counter() - t
            (Path(tmp) / "probe.json").write_text(json.dumps(probe))
            disk = sum(f.stat().st_size for f in (root / "index").rglob("*") if f.is_file())
            out = subprocess.run([sys.executable, __file__, "--measure", str(root), str(Path(tmp) / "probe.json")],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"entries {n} missing_10k_s {r['seconds']:.3f} peak_rss_mb {r['peak_rss_mb']:.0f} "
                  f"baseline_rss_mb {r['baseline_rss_mb']:.0f} index_mb {disk / 1e6:.0f} built_s {built:.0f}",
                  flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        simulate_measure(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--segments", type=int, default=10_000)
    ap.add_argument("--entries", type=int, default=100)
    ap.add_argument("--s3", action="store_true", help="also on S3 through moto's server")
    ap.add_argument("--simulate", type=int, nargs="+", metavar="N",
                    help="simulated indexes of N entries: missing() of 10,000 keys, time and peak RSS")
    args = ap.parse_args()
    if args.simulate:
        simulate(args.simulate)
        return
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
                from distill_pipeline.cache.index import FsspecIndexFiles

                s3 = open_store("s3://bench/store")
                t_idx, found = timed(s3.existing_keys, repeat=1)
                assert found == old
                concurrent = FsspecIndexFiles.threads
                FsspecIndexFiles.threads = 1  # the same lookup, one partition at a time
                t_seq, missing = timed(lambda: s3.missing(probe))
                assert len(missing) == 5000
                FsspecIndexFiles.threads = concurrent
                t_miss, missing = timed(lambda: s3.missing(probe))
                assert len(missing) == 5000
                print(f"  existing_keys(): {t_idx:.2f} s; missing() of {len(probe)} keys: {t_miss:.2f} s "
                      f"({concurrent} partitions at a time) vs {t_seq:.2f} s (one at a time)")


if __name__ == "__main__":
    main()
