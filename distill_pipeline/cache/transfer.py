"""`cache push` / `cache pull`: copy segments between any two stores (local, object store,
service), each verified on arrival and published whole or not at all."""
from __future__ import annotations

import os
import time

from distill_pipeline.cache.store import CacheStore
from distill_pipeline.progress import progress


def copy_segments(src: CacheStore, dst: CacheStore, *, teacher: str | None = None, keys=None, dry_run: bool = False,
                  echo=print) -> dict:
    """Copy the segments `dst` lacks from `src` (any two stores: local, object store, service),
    optionally only one teacher's (identity prefix) or only those holding `keys`. Each segment
    arrives checked against its commit record and verified in full before it is published, and
    is published whole or not at all — so a killed copy leaves nothing half-published, and
    running it again copies what is still missing."""
    import pyarrow.compute as pc

    names = src.segment_names()
    if keys is not None:
        holding = src.lookup(keys)
        names = sorted(set(pc.unique(holding.column("segment")).to_pylist()))
    have = set(dst.segment_names())
    todo = [n for n in names if n not in have]
    records = {n: src.commit_record(n) for n in todo}
    if teacher:
        todo = [n for n in todo if str(records[n]["manifest"].get("teacher", "")).startswith(teacher)]
    total_bytes = sum(sum(f["size"] for f in records[n]["files"].values()) for n in todo)
    stats = {"segments": len(todo), "already_there": len([n for n in names if n in have]),
             "bytes": total_bytes, "entries": sum(int(records[n]["manifest"].get("n_entries", 0)) for n in todo),
             "copied": 0}
    if dry_run or not todo:
        return stats
    t0 = time.perf_counter()
    with progress(total=total_bytes, desc=f"copy {len(todo)} segment(s)", unit="B") as bar:
        entries = 0
        throttle = float(os.environ.get("DISTILL_COPY_THROTTLE_S", "0"))  # crash tests, demos
        for n in todo:
            files = src.segment_files(n)
            if dst.import_segment(n, files):
                stats["copied"] += 1
            entries += int(records[n]["manifest"].get("n_entries", 0))
            bar.update(sum(len(b) for b in files.values()))
            bar.set_postfix(entries=entries)
            if throttle:
                time.sleep(throttle)
    stats["seconds"] = round(time.perf_counter() - t0, 3)
    return stats
