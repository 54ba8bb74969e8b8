"""`distill-pipeline cache ls | info | verify | gc`: inspect, check and clean a cache store."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from distill_pipeline.cache.format import SCHEMA_VERSION
from distill_pipeline.cache.store import CHUNK_ROWS, Store, entry_checksum, segment_format


def _manifest(store: Store, seg: Path) -> dict:
    return json.loads((seg / "zarr.json").read_text()).get("attributes", {})


def ls(store: Store) -> list[dict]:
    rows = []
    for seg in store.segments():
        m = _manifest(store, seg)
        fmt = segment_format(m)
        size = sum(f.stat().st_size for f in seg.rglob("*") if f.is_file())
        rows.append({"segment": seg.name, "teacher": m.get("teacher", "?")[:12], "entries": m.get("n_entries"),
                     "tokens": m.get("n_tokens"), "bytes": size, "top_k": fmt.top_k,
                     "dtype": fmt.storage})
    return rows


def info(store: Store) -> dict:
    """Entries, tokens, bytes on disk and per token, K, dtype, teachers, and the mean probability
    mass the top-K keeps (quality of the truncation)."""
    import numpy as np

    entries = tokens = 0
    mass_sum = kl_sum = 0.0
    teachers: dict[str, dict] = {}
    ks, dtypes = set(), set()
    for seg in store.segments():
        m = _manifest(store, seg)
        group = store.open_segment(seg.name)
        fmt = segment_format(m)
        ks.add(fmt.top_k)
        dtypes.add(fmt.storage)
        n = int(m["n_tokens"])
        t = teachers.setdefault(m["teacher"], {"entries": 0, "tokens": 0})
        t["entries"] += m["n_entries"]
        t["tokens"] += n
        entries += m["n_entries"]
        tokens += n
        kl_sum += m.get("reconstruction_kl", 0.0) * n
        for start in range(0, n, CHUNK_ROWS):
            lp = fmt.decode(group["logp"][start:start + CHUNK_ROWS]).astype(np.float64)
            mass_sum += float(np.exp(lp).sum(axis=1).sum())
    disk = store.disk_bytes() if store.segments() else 0
    return {"root": str(store.root), "schema_version": SCHEMA_VERSION, "segments": len(store.segments()),
            "entries": entries, "tokens": tokens, "bytes_on_disk": disk,
            "bytes_per_token": round(disk / tokens, 2) if tokens else None,
            "top_k": sorted(ks), "dtype": sorted(dtypes),
            "teachers": {k[:16]: v for k, v in teachers.items()},
            "mean_topk_mass": round(mass_sum / tokens, 6) if tokens else None,
            "reconstruction_kl": float(f"{kl_sum / tokens:.3g}") if tokens else None}


def verify(store: Store) -> tuple[int, list[str]]:
    """Decode every chunk (CRC32C), and check shapes, offsets, keys and per-entry checksums.
    Returns (entries checked, problems) — each problem names the segment and what is broken."""
    import numpy as np
    import pyarrow.parquet as pq

    problems: list[str] = []
    checked = 0
    for seg in sorted((store.root / "segments").iterdir()) if (store.root / "segments").exists() else []:
        name = seg.name
        if not (seg / "index.parquet").exists():
            problems.append(f"{name}: no index.parquet (incomplete segment; `cache gc` removes it)")
            continue
        try:
            m = _manifest(store, seg)
            fmt = segment_format(m)
            group = store.open_segment(name)
            index = pq.read_table(seg / "index.parquet").to_pylist()
        except Exception as exc:
            problems.append(f"{name}: unreadable manifest or index: {exc}")
            continue
        arrays = {}
        for field in ("ids", "logp", "lse", "label_logp"):
            try:
                arr = group[field]
                rows = arr.chunks[0]
                parts = []
                for c in range(0, arr.shape[0], rows):  # chunk by chunk, so a bad one is named
                    try:
                        parts.append(arr[c:c + rows])
                    except Exception as exc:
                        problems.append(f"{name}: array {field} chunk {c // rows} (rows {c}–"
                                        f"{min(c + rows, arr.shape[0]) - 1}) is corrupt: {type(exc).__name__}: {exc}")
                        parts = None
                        break
                if parts is not None:
                    arrays[field] = np.concatenate(parts) if parts else np.zeros((0,))
            except Exception as exc:
                problems.append(f"{name}: array {field} missing or unreadable: {exc}")
        n = int(m.get("n_tokens", -1))
        for field, arr in arrays.items():
            if arr.shape[0] != n:
                problems.append(f"{name}: array {field} has {arr.shape[0]} rows, manifest says {n}")
        if {"ids", "logp"} <= set(arrays) and arrays["ids"].shape[1:] != (fmt.top_k,):
            problems.append(f"{name}: ids has K={arrays['ids'].shape[1:]} but manifest top_k={fmt.top_k}")
        expected_offset = 0
        for i, row in enumerate(index):
            checked += 1
            where = f"{name}: entry {i} ({row['key'][:12]}…)"
            if row["offset"] != expected_offset:
                problems.append(f"{where}: offset {row['offset']} ≠ {expected_offset} (entries must tile the arrays)")
            expected_offset = row["offset"] + row["n_tokens"]
            if row["n_tokens"] != len(row["token_ids"]) - row["prompt_len"]:
                problems.append(f"{where}: n_tokens {row['n_tokens']} ≠ response length "
                                f"{len(row['token_ids']) - row['prompt_len']}")
            key = fmt.key(row["teacher"], row["token_ids"], row["prompt_len"])
            if key != row["key"]:
                problems.append(f"{where}: key does not match its teacher/tokens/K/dtype")
            if len(arrays) == 4:
                s = slice(row["offset"], row["offset"] + row["n_tokens"])
                if entry_checksum(arrays["ids"][s], arrays["logp"][s], arrays["lse"][s],
                                  arrays["label_logp"][s]) != row["checksum"]:
                    problems.append(f"{where}: checksum mismatch (data changed after it was written)")
                lp = fmt.decode(arrays["logp"][s])
                if (np.diff(lp, axis=1) > 0).any() or (lp > 1e-3).any():
                    problems.append(f"{where}: top-K log-probs not sorted descending / not ≤ 0")
        if len(arrays) == 4 and expected_offset != n:
            problems.append(f"{name}: entries cover {expected_offset} rows of {n}")
    return checked, problems


def gc(store: Store, *, older_than_s: float = 3600, drop_teacher: str | None = None,
       dry_run: bool = False) -> list[str]:
    """Remove abandoned in-flight writes (tmp/ older than `older_than_s`), incomplete segments,
    and, if asked, every segment of one teacher. Returns what was (or would be) removed."""
    removed = []
    now = time.time()
    tmp = store.root / "tmp"
    for p in sorted(tmp.iterdir()) if tmp.exists() else []:
        if now - p.stat().st_mtime > older_than_s:
            removed.append(f"tmp/{p.name} (abandoned write)")
            if not dry_run:
                shutil.rmtree(p, ignore_errors=True)
    for seg in sorted((store.root / "segments").iterdir()):
        why = None
        if not (seg / "index.parquet").exists():
            why = "incomplete segment"
        elif drop_teacher and _manifest(store, seg).get("teacher", "").startswith(drop_teacher):
            why = f"teacher {drop_teacher}"
        if why:
            removed.append(f"segments/{seg.name} ({why})")
            if not dry_run:
                shutil.rmtree(seg, ignore_errors=True)
    return removed


def human_bytes(n: Any) -> str:
    n = float(n or 0)
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1024
        if n < 1024 or unit == "TB":
            break
    return f"{n:.1f} {unit}"
