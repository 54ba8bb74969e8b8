"""`distill-pipeline cache ls | info | verify | gc`: inspect, check and clean a cache store.

Every command looks at a segment through `check_segment`: the cheap checks (manifest, index,
array shapes, entries tiling the arrays) for `ls`/`info`, plus every chunk, key and per-entry
checksum for `verify` and `gc --damaged`. A segment that fails any of them is *damaged*: listed,
counted, and removable with `cache gc --damaged` so its entries can be extracted again.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill_pipeline.cache.format import SCHEMA_VERSION, NewerFormat
from distill_pipeline.cache.reader import damage_advice, node_keys, node_store  # noqa: F401 (CLI)
from distill_pipeline.cache.store import (CHUNK_ROWS, FIELDS, INDEX_COLUMNS, CacheError, Store,
                                          entry_checksum, segment_format, writer_alive)
from distill_pipeline.identity import IDENTITY_VERSION


def _manifest(seg: Path) -> dict:
    return json.loads((seg / "zarr.json").read_text()).get("attributes", {})


def stale_reason(manifest: dict) -> str | None:
    """Why a segment's entries can never be looked up again, or None. Keys hold the teacher's
    identity; a segment written under another identity scheme (`identity.IDENTITY_VERSION`; none
    recorded: written before content identities, when a teacher was a hash of every file in its
    directory) holds keys no run computes any more. Its values are still sound — the format and
    the key recipe are unchanged, so SCHEMA_VERSION is too — they are just unreachable."""
    version = manifest.get("identity_version")
    if version == IDENTITY_VERSION:
        return None
    was = f"identity version {version}" if version is not None else "no identity version (before content identities)"
    return (f"keyed by an older teacher identity scheme ({was}; this version computes identity "
            f"version {IDENTITY_VERSION}): no run looks these keys up again")


def _why(exc: Exception, limit: int = 160) -> str:
    text = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return text if len(text) <= limit else text[:limit - 1] + "…"


@dataclass
class SegmentCheck:
    """What `check_segment` found: the parts it could read, and every problem (each names the
    segment and what is broken)."""
    name: str
    path: Path
    manifest: dict | None = None
    fmt: Any = None
    index: list[dict] | None = None
    arrays: dict = field(default_factory=dict)  # deep checks only: field → decoded array
    problems: list[str] = field(default_factory=list)
    newer: bool = False  # written by a newer version: listed as unreadable, never removed as damaged

    @property
    def damaged(self) -> bool:
        return bool(self.problems)

    def problem(self, text: str) -> None:
        self.problems.append(f"{self.name}: {text}")


def segment_dirs(store: Store) -> list[Path]:
    """Every folder under segments/, complete or not."""
    seg = store.root / "segments"
    return sorted(p for p in seg.iterdir() if p.is_dir()) if seg.is_dir() else []


def read_array(check: SegmentCheck, group: Any, name: str):
    """One array decoded chunk by chunk (so a bad chunk is named), or None (problem recorded)."""
    import numpy as np

    try:
        arr = group[name]
        rows = arr.chunks[0]
    except Exception as exc:  # noqa: BLE001
        check.problem(f"array {name} missing or unreadable: {_why(exc)}")
        return None
    parts = []
    for c in range(0, arr.shape[0], rows):
        try:
            parts.append(arr[c:c + rows])
        except Exception as exc:  # noqa: BLE001 - CRC32C mismatch, bad compressed data, …
            check.problem(f"array {name} chunk {c // rows} (rows {c}–{min(c + rows, arr.shape[0]) - 1}) "
                          f"is corrupt: {_why(exc)}")
            return None
    return np.concatenate(parts) if parts else np.zeros((0,) + tuple(arr.shape[1:]), arr.dtype)


def check_segment(seg: Path, *, deep: bool = True) -> SegmentCheck:
    """Cheap checks (always): manifest readable with a format and counts, index readable with its
    columns, entries tiling the arrays, array shapes as the manifest says. Deep (verify): also
    decode every chunk (CRC32C) and check every key and per-entry checksum."""
    import numpy as np
    import pyarrow.parquet as pq

    check = SegmentCheck(seg.name, seg)
    if not (seg / "index.parquet").exists():
        check.problem("no index.parquet (incomplete segment; `cache gc` removes it)")
        return check
    try:
        check.manifest = _manifest(seg)
        check.fmt = segment_format(check.manifest)
        n_tokens, n_entries = int(check.manifest["n_tokens"]), int(check.manifest["n_entries"])
    except FileNotFoundError:
        check.problem("zarr.json (the segment manifest) is missing")
    except NewerFormat as exc:
        check.newer = True
        check.problem(str(exc))
    except Exception as exc:  # noqa: BLE001 - bad JSON, missing fields
        check.problem(f"zarr.json (the segment manifest) is unreadable: {_why(exc)}")
    try:
        check.index = pq.read_table(seg / "index.parquet", columns=INDEX_COLUMNS).to_pylist()
    except Exception as exc:  # noqa: BLE001 - truncated (ArrowInvalid), missing columns
        check.problem(f"index.parquet is unreadable (truncated or corrupt): {_why(exc)}")
    if check.problems:
        return check
    index, fmt = check.index, check.fmt
    if len(index) != n_entries:
        check.problem(f"index.parquet has {len(index)} entries, manifest says {n_entries}")
    expected_offset = 0
    for i, row in enumerate(index):
        where = f"entry {i} ({row['key'][:12]}…)"
        if row["offset"] != expected_offset:
            check.problem(f"{where}: offset {row['offset']} ≠ {expected_offset} (entries must tile the arrays)")
        expected_offset = row["offset"] + row["n_tokens"]
        if row["n_tokens"] != len(row["token_ids"]) - row["prompt_len"]:
            check.problem(f"{where}: n_tokens {row['n_tokens']} ≠ response length "
                          f"{len(row['token_ids']) - row['prompt_len']}")
        if deep and fmt.key(row["teacher"], row["token_ids"], row["prompt_len"]) != row["key"]:
            check.problem(f"{where}: key does not match its teacher/tokens/K/dtype")
    if expected_offset != n_tokens:
        check.problem(f"entries cover {expected_offset} rows of {n_tokens}")
    try:
        import zarr

        group = zarr.open_group(str(seg), mode="r")
    except Exception as exc:  # noqa: BLE001
        check.problem(f"zarr group cannot be opened: {_why(exc)}")
        return check
    arrays = {}
    n_slots = None
    if fmt.adaptive:
        try:
            n_slots = int(check.manifest["n_slots"])
        except Exception as exc:  # noqa: BLE001 - missing or not a number
            check.problem(f"adaptive-K segment without a readable n_slots in its manifest: {_why(exc)}")
            return check
        if not n_tokens * fmt.min_k <= n_slots <= n_tokens * fmt.top_k:
            check.problem(f"manifest n_slots {n_slots} is outside [{n_tokens * fmt.min_k}, "
                          f"{n_tokens * fmt.top_k}] for {n_tokens} tokens of k in [{fmt.min_k}, {fmt.top_k}]")
    for name in FIELDS + (("counts",) if fmt.adaptive else ()):
        try:
            arr = arrays[name] = group[name]
        except Exception as exc:  # noqa: BLE001
            check.problem(f"array {name} missing or unreadable: {_why(exc)}")
            continue
        if name in ("ids", "logp") and fmt.adaptive:
            if tuple(arr.shape) != (n_slots,):
                check.problem(f"array {name} has shape {tuple(arr.shape)}, manifest says ({n_slots},) "
                              "slots (adaptive K: flat)")
        elif arr.shape[0] != n_tokens:
            check.problem(f"array {name} has {arr.shape[0]} rows, manifest says {n_tokens}")
        if name in ("ids", "logp") and not fmt.adaptive and tuple(arr.shape[1:]) != (fmt.top_k,):
            check.problem(f"array {name} has K={tuple(arr.shape[1:])} but manifest top_k={fmt.top_k}")
        # zarr reads a missing chunk file as zeros: every chunk must be there
        expected = -(-arr.shape[0] // arr.chunks[0]) if arr.shape[0] else 0
        present = sum(1 for f in (seg / name / "c").rglob("*") if f.is_file()) if (seg / name / "c").is_dir() else 0
        if present != expected:
            check.problem(f"array {name} has {present} chunk file(s), its shape needs {expected}")
    if check.problems:  # decode nothing whose shape or tiling is already wrong (sizes are untrusted)
        return check
    if deep:
        for name, arr in arrays.items():
            data = read_array(check, group, name)
            if data is not None:
                check.arrays[name] = data
    if not deep or len(check.arrays) != len(arrays) or check.damaged:
        return check
    a = check.arrays
    starts = None
    if fmt.adaptive:
        counts = a["counts"].astype(np.int64)
        if len(counts) and (counts.min() < fmt.min_k or counts.max() > fmt.top_k):
            check.problem(f"counts outside [{fmt.min_k}, {fmt.top_k}] (min {counts.min()}, max {counts.max()})")
            return check
        if int(counts.sum()) != n_slots:
            check.problem(f"counts add up to {int(counts.sum())} slots, manifest says {n_slots}")
            return check
        starts = np.concatenate([[0], np.cumsum(counts)])
    for i, row in enumerate(index):
        where = f"entry {i} ({row['key'][:12]}…)"
        s = slice(row["offset"], row["offset"] + row["n_tokens"])
        if starts is None:
            ok = entry_checksum(a["ids"][s], a["logp"][s], a["lse"][s], a["label_logp"][s]) == row["checksum"]
            lp = fmt.decode(a["logp"][s])
            unsorted = (np.diff(lp, axis=1) > 0).any()
        else:
            f = slice(int(starts[s.start]), int(starts[s.stop]))
            ok = entry_checksum(a["ids"][f], a["logp"][f], a["lse"][s], a["label_logp"][s],
                                a["counts"][s]) == row["checksum"]
            lp = fmt.decode(a["logp"][f])
            # descending within each token's slots: a rise is allowed only where a token starts
            rise = np.flatnonzero(np.diff(lp) > 0) + 1 + f.start
            unsorted = not np.isin(rise, starts[s.start:s.stop + 1]).all()
        if not ok:
            check.problem(f"{where}: checksum mismatch (data changed after it was written)")
        if unsorted or (lp > 1e-3).any():
            check.problem(f"{where}: top-K log-probs not sorted descending / not ≤ 0")
    return check


def ls(store: Store) -> list[dict]:
    """One row per segment folder; damaged ones (cheap checks) have `damaged` set to the reason."""
    rows = []
    for seg in segment_dirs(store):
        check = check_segment(seg, deep=False)
        m = check.manifest or {}
        fmt = check.fmt
        size = sum(f.stat().st_size for f in seg.rglob("*") if f.is_file())
        rows.append({"segment": seg.name, "teacher": str(m.get("teacher", "?"))[:12],
                     "entries": m.get("n_entries", "?"), "tokens": m.get("n_tokens", "?"), "bytes": size,
                     "top_k": (fmt.top_k if not fmt.adaptive else fmt.label) if fmt else "?",
                     "dtype": fmt.storage if fmt else "?",
                     "damaged": "; ".join(p.split(": ", 1)[1] for p in check.problems) or None})
    return rows


def info(store: Store) -> dict:
    """Entries, tokens, bytes on disk and per token, K, dtype, teachers, and the mean probability
    mass the top-K keeps (quality of the truncation). Counts cover healthy segments; damaged
    ones (cheap checks, or a log-prob chunk that does not decode) are listed under `damaged`.
    `mean_k`: slots stored per token (K for a fixed K; an adaptive format's `top_k` entry reads
    e.g. `≤50 @ mass 0.999 (mean k 32.9)`, its mean over that format's tokens)."""
    import numpy as np

    entries = tokens = slots = 0
    mass_sum = kl_sum = 0.0
    adaptive: dict[Any, list[int]] = {}  # format → [tokens, slots]
    teachers: dict[str, dict] = {}
    ks, dtypes = set(), set()
    damaged: dict[str, list[str]] = {}
    stale: dict[str, int] = {}  # segment → entries
    healthy = 0
    for seg in segment_dirs(store):
        check = check_segment(seg, deep=False)
        lp = None
        if not check.damaged:
            lp = read_array(check, store.open_segment(seg.name), "logp")
        if check.damaged:
            damaged[seg.name] = check.problems
            continue
        healthy += 1
        m, fmt = check.manifest, check.fmt
        if stale_reason(m):
            stale[seg.name] = int(m["n_entries"])
        dtypes.add(fmt.storage)
        n = int(m["n_tokens"])
        if fmt.adaptive:
            a = adaptive.setdefault(fmt, [0, 0])
            a[0] += n
            a[1] += int(m["n_slots"])
            slots += int(m["n_slots"])
        else:
            ks.add(fmt.top_k)
            slots += n * fmt.top_k
        t = teachers.setdefault(m.get("teacher", "?"), {"entries": 0, "tokens": 0})
        t["entries"] += int(m["n_entries"])
        t["tokens"] += n
        entries += int(m["n_entries"])
        tokens += n
        kl_sum += m.get("reconstruction_kl", 0.0) * n
        for start in range(0, len(lp), CHUNK_ROWS):  # rows, or flat slots (adaptive K)
            mass_sum += float(np.exp(fmt.decode(lp[start:start + CHUNK_ROWS]).astype(np.float64)).sum())
    disk = store.disk_bytes()
    return {"root": store.display, "schema_version": SCHEMA_VERSION, "segments": healthy,
            "entries": entries, "tokens": tokens, "bytes_on_disk": disk,
            "bytes_per_token": round(disk / tokens, 2) if tokens else None,
            "top_k": sorted(ks) + sorted(f"{fmt.label} (mean k {a[1] / a[0]:.2f})" if a[0] else fmt.label
                                         for fmt, a in adaptive.items()),
            "mean_k": round(slots / tokens, 2) if tokens else None, "dtype": sorted(dtypes),
            "teachers": {k[:16]: v for k, v in teachers.items()},
            "mean_topk_mass": round(mass_sum / tokens, 6) if tokens else None,
            "reconstruction_kl": float(f"{kl_sum / tokens:.3g}") if tokens else None,
            "stale_segments": len(stale), "stale_entries": sum(stale.values()), "damaged": damaged}


def check_segments(store: Store, *, deep: bool = True) -> list[SegmentCheck]:
    return [check_segment(seg, deep=deep) for seg in segment_dirs(store)]


def verify(store: Store) -> tuple[int, list[str]]:
    """Decode every chunk (CRC32C), and check shapes, offsets, keys and per-entry checksums.
    Returns (entries checked, problems) — each problem names the segment and what is broken."""
    checked, problems = 0, []
    for check in check_segments(store):
        checked += len(check.index or [])
        problems += check.problems
    return checked, problems


def store_id(root: Any) -> str:
    """One spelling of a store root, to match the store a node names with the one verified."""
    text = str(root)
    return text.rstrip("/") if "://" in text else str(Path(root).expanduser().resolve())


def damaged_keys(checks: list[SegmentCheck]) -> set[str]:
    """Keys of damaged segments whose index could still be read."""
    return {row["key"] for c in checks if c.damaged and c.index for row in c.index}


@dataclass
class NodeCheck:
    """One published extraction node of a run dir against the store it names."""
    folder: Path
    node: str
    store: str | None = None
    expected: int = 0
    missing: int = 0
    in_damaged: int = 0   # of its keys, how many sit in damaged segments
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.missing == 0 and self.in_damaged == 0


def run_nodes(run_dir: Path) -> list[Path]:
    """Published `teacher_logits` node folders of a run dir (their manifest.json says so)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is not a directory" if run_dir.exists() else "does not exist"
        raise CacheError(f"run dir {run_dir} {what}; give --run the run_dir of a config "
                         "(the folder holding its node folders)")
    nodes = []
    for manifest in sorted(run_dir.glob("*/manifest.json")):
        if manifest.parent.name.startswith("."):
            continue
        try:
            stage = json.loads(manifest.read_text()).get("stage")
        except Exception:  # noqa: BLE001 - not ours to judge here
            continue
        if stage == "teacher_logits":
            nodes.append(manifest.parent)
    return nodes


def check_nodes(run_dir: Path, damaged_keys: dict[str, set[str]] | None = None) -> list[NodeCheck]:
    """For every extraction node of the run: is each key it stands for in its store?
    `damaged_keys`: store root → keys found in damaged segments (counted separately)."""
    out = []
    for folder in run_nodes(run_dir):
        try:
            node = json.loads((folder / "manifest.json").read_text()).get("node", folder.name)
        except Exception:  # noqa: BLE001
            node = folder.name
        nc = NodeCheck(folder, str(node))
        try:
            nc.store = node_store(folder)
            keys = set(node_keys(folder))
            nc.expected = len(keys)
            from distill_pipeline.cache.remote import open_store

            missing = open_store(nc.store, create=False).missing(keys)
        except CacheError as exc:
            nc.error = str(exc)
            out.append(nc)
            continue
        bad = (damaged_keys or {}).get(store_id(nc.store)) or set()
        nc.in_damaged = len((keys - missing) & bad)
        nc.missing = len(missing)
        out.append(nc)
    return out


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)   # "tmp/x (why)", "segments/y (why)"
    kept: list[str] = field(default_factory=list)      # in-flight writes of live processes
    damaged: dict[str, list[str]] = field(default_factory=dict)  # segment → problems


def _owner(name: str) -> int | None:
    """The pid in a tmp/ entry's name `<segment>.<pid>.<ns>`, or None."""
    parts = name.rsplit(".", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1])
    return None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OSError:
        return False
    return True


def gc(store: Store, *, older_than_s: float = 3600, drop_teacher: str | None = None,
       damaged: bool = False, stale: bool = False, dry_run: bool = False) -> GcReport:
    """Remove abandoned in-flight writes (tmp/ entries older than `older_than_s` whose writing
    process is gone — a live writer's are never touched), incomplete segments, and, if asked,
    every segment of one teacher, every segment `verify` flags (`damaged`) and every segment
    keyed under an older teacher identity scheme (`stale`, see `stale_reason`)."""
    report = GcReport()
    now = time.time()
    tmp = store.root / "tmp"
    for p in sorted(tmp.iterdir()) if tmp.is_dir() else []:
        if p.name.endswith(".lock"):
            if not p.with_name(p.name[:-5]).exists() and writer_alive(p.with_name(p.name[:-5])) is False:
                p.unlink(missing_ok=True)  # a lock whose write is gone and whose writer is dead
            continue
        live = writer_alive(p)  # the writer's flock: authoritative, on any host
        pid = _owner(p.name)
        if live is None:  # no lock file (older writes, folders set aside): this host's pid
            live = pid is not None and pid_alive(pid)
        if live:
            report.kept.append(f"tmp/{p.name} (being written by a running process{f' {pid}' if pid else ''})")
            continue
        try:
            age = now - p.stat().st_mtime
        except FileNotFoundError:
            continue  # its writer just published or removed it
        if age > older_than_s:
            report.removed.append(f"tmp/{p.name} (abandoned write)")
            if not dry_run:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
    for seg in segment_dirs(store):
        why = None
        if not (seg / "index.parquet").exists():
            why = "incomplete segment"
        elif drop_teacher or stale:
            try:
                manifest = _manifest(seg)
            except Exception:  # noqa: BLE001 - unreadable manifest: a damaged segment, not this teacher's
                manifest = None
            if manifest is not None and drop_teacher and str(manifest.get("teacher", "")).startswith(drop_teacher):
                why = f"teacher {drop_teacher}"
            elif manifest is not None and stale and stale_reason(manifest):
                why = f"stale: {stale_reason(manifest)}"
        if why is None and damaged:
            check = check_segment(seg, deep=True)
            if check.newer:
                report.kept.append(f"segments/{seg.name} ({check.problems[0].split(': ', 1)[1]})")
            elif check.damaged:
                report.damaged[seg.name] = check.problems
                why = "damaged"
        if why:
            report.removed.append(f"segments/{seg.name} ({why})")
            if not dry_run:
                store.remove_segment(seg.name)
    return report


def human_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return str(n)
    n = float(n or 0)
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1024
        if n < 1024 or unit == "TB":
            break
    return f"{n:.1f} {unit}"



def gc_remote(store: Any, *, older_than_s: float = 3600, drop_teacher: str | None = None,
              damaged: bool = False, stale: bool = False, dry_run: bool = False) -> GcReport:
    """`gc` for a remote store (`remote.MirroredStore`): the files of segments that were never
    committed (a writer died mid-upload) once older than `older_than_s`, and, if asked, one
    teacher's, stale or damaged segments (damaged: fetched and verified in full through the mirror;
    a segment that fails is removed from the remote)."""
    report = GcReport()
    remote = store.remote
    uncommitted = getattr(remote, "uncommitted", None)
    if uncommitted is None:
        report.kept.append("uploads to the service are written under its store's tmp/ and renamed "
                           "into place: run `cache gc --store <its store>` on the server")
    else:
        for name, age in sorted(uncommitted().items()):
            if age > older_than_s:
                report.removed.append(f"segments/{name} (never committed, {age / 60:.0f} min old)")
                if not dry_run and name not in set(remote.segment_names()):  # not committed meanwhile
                    remote.remove_segment(name)
            else:
                report.kept.append(f"segments/{name} (uncommitted, {age:.0f} s old: may be an upload "
                                   "in progress)")
    if drop_teacher or stale or damaged:
        failed = store.sync() if damaged else {}
        for name in remote.segment_names():
            why = None
            if name in failed:
                report.damaged[name] = [f"{name}: {failed[name]}"]
                why = "damaged"
            elif drop_teacher or stale:
                manifest = remote.commit_record(name).get("manifest", {})
                if drop_teacher and str(manifest.get("teacher", "")).startswith(drop_teacher):
                    why = f"teacher {drop_teacher}"
                elif stale and stale_reason(manifest):
                    why = f"stale: {stale_reason(manifest)}"
            if why:
                report.removed.append(f"segments/{name} ({why})")
                if not dry_run:
                    store.remove_segment(name)
    return report
