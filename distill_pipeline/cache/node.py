"""An extraction node's published files, and what they say about the store it wrote into.

    <node folder>/teachers.json   {"store": the store's URL, "format": CacheFormat, "source",
                                   "teachers": role → {"identity", "path"}}
    <node folder>/keys.parquet    every entry key the node stands for, with the segment that held
                                  it when the node was published (what its dependents read)

Written by the `teacher_logits` stage (`write_node_file`), read by `train` (`open_node`), by the
stage's own up-to-date check (`node_segments_missing`) and by `cache verify/push/pull --run`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from distill_pipeline.cache.format import CacheFormat
from distill_pipeline.cache.reader import CacheReader
from distill_pipeline.cache.remote import open_store
from distill_pipeline.cache.segment import CacheError
from distill_pipeline.cache.store import CacheStore

NODE_FILE = "teachers.json"
KEYS_FILE = "keys.parquet"


def write_node_file(out: Any, store: CacheStore, fmt: Any, source: str, teachers: dict[str, dict],
                    keys: Sequence[str]) -> None:
    """teachers: role → {"identity", "path"}. Written once per extraction node, with each key's
    segment, so that checking the node against its store later costs a stat per segment."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (Path(out) / NODE_FILE).write_text(json.dumps(
        {"store": store.url, "format": fmt.to_json(), "source": source, "teachers": teachers},
        indent=2))
    wanted = pa.array(sorted(set(keys)), pa.string())
    index = store.lookup(wanted.to_pylist())
    where = dict(zip(index.column("key").to_pylist(), index.column("segment").to_pylist()))
    pq.write_table(pa.table({"key": wanted, "segment": pa.array([where.get(k) for k in wanted.to_pylist()],
                                                                 pa.string())}), Path(out) / KEYS_FILE)


def node_segments(folder: Any) -> list[str | None]:
    """Per key of the node, the segment that held it when the node was published (None: not in
    the store then)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(Path(folder) / KEYS_FILE, columns=["segment"]).column("segment").to_pylist()
    except Exception as exc:  # noqa: BLE001 - missing, truncated, written before segments were recorded
        raise _node_damaged(folder, KEYS_FILE, exc) from None


def node_segments_missing(folder: Any) -> tuple[int, int]:
    """(segments gone, segments) of those that held the node's entries when it was published."""
    segments = node_segments(folder)
    held = set(segments) - {None}  # None: an entry that was not in the store when published
    gone = len(held - set(open_store(node_store(folder), create=False).segment_names()))
    return gone + (None in segments), len(held) + (None in segments)


def _node_damaged(folder: Any, name: str, exc: Exception) -> CacheError:
    return CacheError(f"extraction node {folder}: {name} cannot be read ({type(exc).__name__}: {exc}); "
                      f"delete the folder {folder} and rerun `distill-pipeline run teacher_logits -c <config>` to "
                      "write it again")


def node_keys(folder: Any) -> list[str]:
    """The entry keys an extraction node's dependents read."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(Path(folder) / KEYS_FILE, columns=["key"]).column("key").to_pylist()
    except Exception as exc:  # noqa: BLE001 - missing, truncated, no key column
        raise _node_damaged(folder, KEYS_FILE, exc) from None


def _node_meta(folder: Any) -> dict:
    try:
        meta = json.loads((Path(folder) / NODE_FILE).read_text())
        meta["store"], meta["format"], meta["teachers"]  # noqa: B018 - required fields
        return meta
    except Exception as exc:  # noqa: BLE001 - missing file, bad JSON, missing field
        raise _node_damaged(folder, NODE_FILE, exc) from None


def node_meta(folder: Any) -> dict:
    """teachers.json: {"store", "format", "source", "teachers": role → {"identity", "path"}}."""
    return _node_meta(folder)


def node_store(folder: Any) -> str:
    return _node_meta(folder)["store"]


def open_node(folder: Any) -> tuple[CacheReader, Any, dict[str, str]]:
    """(reader over the node's store, its CacheFormat, teacher identity by role)."""
    meta = _node_meta(folder)
    return (CacheReader(meta["store"], keys=node_keys(folder)), CacheFormat.from_json(meta["format"]),
            {role: t["identity"] for role, t in meta["teachers"].items()})


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


def node_stats(folder: Any) -> dict:
    """What an extraction node's entries cost and keep, from the manifests of the segments that
    held them when it was published (cheap checks; no log-probs decoded): tokens, bytes on disk
    per token, stored slots per token (`mean_k`: K for a fixed K) and storage KL (the segments'
    `reconstruction_kl`, token-weighted). A segment may also hold other nodes' entries: the figures
    are those of the segments. A remote store is read from its local mirror (no network), so
    segments never fetched there count as `absent`, like segments deleted from a local store."""
    from distill_pipeline.cache.remote import is_remote, mirror_root
    from distill_pipeline.cache.segment import check_segment
    from distill_pipeline.cache.store import Store

    url = node_store(folder)
    held = sorted(set(node_segments(folder)) - {None})
    root = mirror_root(url) if is_remote(url) else url
    out = {"store": url, "read_from": str(root), "segments": len(held), "absent": 0, "damaged": 0,
           "tokens": 0, "bytes": 0, "bytes_per_token": None, "mean_k": None, "storage_kl": None}
    try:
        store = Store(root, create=False)
    except CacheError:  # gone, or never mirrored here: every segment is absent
        out["absent"] = len(held)
        return out
    slots, kl = 0, 0.0
    for name in held:
        seg = store.segment_path(name)
        if not seg.is_dir():
            out["absent"] += 1
            continue
        check = check_segment(seg, deep=False)
        if check.damaged:
            out["damaged"] += 1
            continue
        n = int(check.manifest["n_tokens"])
        out["tokens"] += n
        slots += int(check.manifest["n_slots"]) if check.fmt.adaptive else n * check.fmt.top_k
        kl += float(check.manifest.get("reconstruction_kl", 0.0)) * n
        out["bytes"] += sum(f.stat().st_size for f in seg.rglob("*") if f.is_file())
    if out["tokens"]:
        out.update(bytes_per_token=round(out["bytes"] / out["tokens"], 2),
                   mean_k=round(slots / out["tokens"], 2),
                   storage_kl=float(f"{kl / out['tokens']:.3g}"))
    return out
