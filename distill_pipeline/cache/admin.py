"""`distill-pipeline cache ls | info | verify | gc`: inspect, check and clean a cache store.

Every command looks at a segment through `segment.check_segment`: the cheap checks (manifest,
index, array shapes, entries tiling the arrays) for `ls`/`info`, plus every chunk, key and
per-entry checksum for `verify` and `gc --damaged`. A segment that fails any of them is
*damaged*: listed, counted, and removable with `cache gc --damaged` so its entries can be
extracted again. A remote store is inspected through its mirror, brought in line with it first
(`inspect`). `verify` also checks a run dir's extraction nodes against the stores they name.
The CLI (`cli/cache.py`) only prints what these functions return.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill_pipeline.cache.format import SCHEMA_VERSION
from distill_pipeline.cache.node import node_keys, node_store, run_nodes
from distill_pipeline.cache.remote import MirroredStore, open_store
from distill_pipeline.cache.segment import (CacheError, SegmentCheck, check_record,
                                            check_segment, damage_advice, read_array, read_manifest,
                                            topk_mass_sum)
from distill_pipeline.cache.store import CacheStore, Store, writer_alive
from distill_pipeline.identity import IDENTITY_VERSION


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


def segment_dirs(store: Store) -> list[Path]:
    """Every folder under segments/, complete or not."""
    seg = store.root / "segments"
    return sorted(p for p in seg.iterdir() if p.is_dir()) if seg.is_dir() else []


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@dataclass
class Listed:
    """One segment as `ls`/`info` see it: the cheap checks of its files (`local`), or of a remote
    store's commit record — nothing of a remote segment is fetched to list it."""
    check: SegmentCheck
    bytes: int
    local: bool


def listed(store: CacheStore) -> list[Listed]:
    """Every segment folder of a local store; every committed segment of a remote one, from the
    commit records (manifest and file sizes), read together."""
    if not isinstance(store, MirroredStore):
        return [Listed(check_segment(seg, deep=False), folder_bytes(seg), True) for seg in segment_dirs(store)]
    names = store.remote.segment_names()
    records = store.remote.commit_records(names)
    out = []
    for name in names:
        if name not in records:  # removed since it was listed
            continue
        check = check_record(name, records[name])
        try:
            size = sum(int(f["size"]) for f in records[name]["files"].values())
        except Exception:  # noqa: BLE001 - a damaged record (reported by check_record)
            size = 0
        out.append(Listed(check, size, False))
    return out


def listing_notes(store: CacheStore) -> list[str]:
    """What `ls`/`info` say on stderr before their table."""
    if isinstance(store, MirroredStore) or (store.root / "segments").is_dir():
        return []
    return [missing_segments_note(store)]


def ls(store: CacheStore) -> list[dict]:
    """One row per segment; damaged ones (cheap checks) have `damaged` set to the reason."""
    rows = []
    for seg in listed(store):
        m, fmt = seg.check.manifest or {}, seg.check.fmt
        rows.append({"segment": seg.check.name, "teacher": str(m.get("teacher", "?"))[:12],
                     "entries": m.get("n_entries", "?"), "tokens": m.get("n_tokens", "?"), "bytes": seg.bytes,
                     "top_k": (fmt.top_k if not fmt.adaptive else fmt.label) if fmt else "?",
                     "dtype": fmt.storage if fmt else "?",
                     "damaged": "; ".join(p.split(": ", 1)[1] for p in seg.check.problems) or None})
    return rows


def info(store: CacheStore, name: str | None = None) -> dict:
    """Entries, tokens, bytes in the store and per token, K, dtype, teachers, and the mean
    probability mass the top-K keeps (quality of the truncation). Counts cover healthy segments;
    damaged ones (cheap checks, or — in a local store — a log-prob chunk that does not decode)
    are listed under `damaged`. The top-K mass is decoded from a local store's files, and read
    from a remote segment's manifest (`topk_mass`); remote segments written before manifests
    recorded it are left out of it (`mass_not_recorded`: how many).
    `mean_k`: slots stored per token (K for a fixed K; an adaptive format's `top_k` entry reads
    e.g. `≤50 @ mass 0.999 (mean k 32.9)`, its mean over that format's tokens)."""
    entries = tokens = slots = mass_tokens = 0
    mass_sum = kl_sum = 0.0
    adaptive: dict[Any, list[int]] = {}  # format → [tokens, slots]
    teachers: dict[str, dict] = {}
    ks, dtypes = set(), set()
    damaged: dict[str, list[str]] = {}
    stale: dict[str, int] = {}  # segment → entries
    healthy = unrecorded = 0
    listed_ = listed(store)
    for seg in listed_:
        check = seg.check
        lp = None
        if seg.local and not check.damaged:
            lp = read_array(check, store.open_segment(check.name), "logp")
        if check.damaged:
            damaged[check.name] = check.problems
            continue
        healthy += 1
        m, fmt = check.manifest, check.fmt
        if stale_reason(m):
            stale[check.name] = int(m["n_entries"])
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
        if lp is not None:
            mass_sum, mass_tokens = mass_sum + topk_mass_sum(fmt, lp), mass_tokens + n
        elif m.get("topk_mass") is not None:
            mass_sum, mass_tokens = mass_sum + m["topk_mass"] * n, mass_tokens + n
        else:
            unrecorded += 1
    disk = store.disk_bytes() if not isinstance(store, MirroredStore) else sum(s.bytes for s in listed_)
    return {"root": name or store.url, "schema_version": SCHEMA_VERSION, "segments": healthy,
            "entries": entries, "tokens": tokens, "bytes_on_disk": disk,
            "bytes_per_token": round(disk / tokens, 2) if tokens else None,
            "top_k": sorted(ks) + sorted(f"{fmt.label} (mean k {a[1] / a[0]:.2f})" if a[0] else fmt.label
                                         for fmt, a in adaptive.items()),
            "mean_k": round(slots / tokens, 2) if tokens else None, "dtype": sorted(dtypes),
            "teachers": {k[:16]: v for k, v in teachers.items()},
            "mean_topk_mass": round(mass_sum / mass_tokens, 6) if mass_tokens else None,
            "mass_not_recorded": unrecorded,
            "reconstruction_kl": float(f"{kl_sum / tokens:.3g}") if tokens else None,
            "stale_segments": len(stale), "stale_entries": sum(stale.values()), "damaged": damaged}


def dangling_segments(store: Store) -> dict[str, list[str]]:
    """Segments the store still records as published — a commit record under commits/, or their
    own file under index/ — whose folder under segments/ is gone (deleted by hand, or lost): name
    → what remains. Readers still look their entries up there, and fail. (Rows of a removed
    segment in an index *pack* are normal: `remove_segment` leaves them, readers skip them.)
    Without segments/ at all the store reads as empty (`missing_segments_note`): nothing is
    looked up there, so nothing is reported."""
    seg = store.root / "segments"
    found: dict[str, list[str]] = {}
    if not seg.is_dir():
        return found
    for folder, suffix in (("commits", ".json"), ("index", ".parquet")):
        d = store.root / folder
        for p in sorted(d.iterdir()) if d.is_dir() else []:
            name = p.name[:-len(suffix)]
            if (p.name.endswith(suffix) and not p.name.startswith((".", "packed-"))
                    and not (seg / name).exists()):
                found.setdefault(name, []).append(f"{folder}/{p.name}")
    return found


def dangling_check(store: Store, name: str, remains: list[str]) -> SegmentCheck:
    check = SegmentCheck(name, store.root / "segments" / name)
    check.problem(f"its folder segments/{name} is gone, but {' and '.join(remains)} still record it as "
                  "published (readers look its entries up there and fail); `cache gc --damaged` drops "
                  "the record, and the next extraction computes its entries again")
    return check


def check_segments(store: Store, *, deep: bool = True, dangling: bool = True) -> list[SegmentCheck]:
    """Every segment folder checked, and (`dangling`) every segment recorded as published whose
    folder is gone."""
    gone = dangling_segments(store) if dangling else {}
    return ([check_segment(seg, deep=deep) for seg in segment_dirs(store)]
            + [dangling_check(store, name, remains) for name, remains in gone.items()])


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
    notes: list[str] = field(default_factory=list)     # for stderr: what is odd about the store
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


def gc(store: CacheStore, *, older_than_s: float = 3600, drop_teacher: str | None = None,
       damaged: bool = False, stale: bool = False, dry_run: bool = False) -> GcReport:
    """`cache gc` on any store: `gc_local` for a local one, `gc_remote` for an object store or the
    service (through its mirror)."""
    clean = gc_remote if isinstance(store, MirroredStore) else gc_local
    return clean(store, older_than_s=older_than_s, drop_teacher=drop_teacher, damaged=damaged,
                 stale=stale, dry_run=dry_run)


def gc_local(store: Store, *, older_than_s: float = 3600, drop_teacher: str | None = None,
             damaged: bool = False, stale: bool = False, dry_run: bool = False) -> GcReport:
    """Remove abandoned in-flight writes (tmp/ entries older than `older_than_s` whose writing
    process is gone — a live writer's are never touched), incomplete segments, and, if asked,
    every segment of one teacher, every segment `verify` flags (`damaged`) and every segment
    keyed under an older teacher identity scheme (`stale`, see `stale_reason`)."""
    report = GcReport()
    if not (store.root / "segments").is_dir():
        report.notes.append(missing_segments_note(store))
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
                manifest = read_manifest(seg)
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
    if damaged:  # records of segments whose folder is gone: their entries count as absent again
        for name, remains in dangling_segments(store).items():
            report.damaged[name] = dangling_check(store, name, remains).problems
            report.removed.append(f"{' and '.join(remains)} (segment folder gone)")
            if not dry_run:
                store.remove_segment(name)
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



def gc_remote(store: MirroredStore, *, older_than_s: float = 3600, drop_teacher: str | None = None,
              damaged: bool = False, stale: bool = False, dry_run: bool = False) -> GcReport:
    """`gc` for a remote store (`remote.MirroredStore`): the files of segments that were never
    committed (a writer died mid-upload) once older than `older_than_s`, and, if asked, one
    teacher's, stale or damaged segments (damaged: fetched and verified in full through the mirror;
    a segment that fails is removed from the remote)."""
    report = GcReport()
    remote = store.remote
    uncommitted = remote.uncommitted()
    if uncommitted is None:
        report.kept.append("uploads to the service are written under its store's tmp/ and renamed "
                           "into place: run `cache gc --store <its store>` on the server")
    else:
        for name, age in sorted(uncommitted.items()):
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


@dataclass
class Inspected:
    """A store as local files, for ls/info/verify: a local store itself, or a remote store's
    mirror brought in line with it (every committed segment fetched and verified)."""
    store: Store
    url: str                                   # how users name the store
    fetch_failures: dict[str, str] = field(default_factory=dict)  # remote segments that failed
    notes: list[str] = field(default_factory=list)  # for stderr: what was done, what is odd

    def failures(self) -> list[str]:
        return [f"{name}: DAMAGED in the remote store: {why}" for name, why in self.fetch_failures.items()]


def inspect(store: CacheStore) -> Inspected:
    if isinstance(store, MirroredStore):
        failed = store.sync()
        out = Inspected(store.local, store.url, failed,
                        [f"note: {store.url}: {len(store.local.segment_names())} segment(s) fetched into "
                         f"its mirror {store.local.root}"])
    else:
        out = Inspected(store, store.url)
    if not (out.store.root / "segments").is_dir():
        out.notes.append(missing_segments_note(out.store))
    return out


def missing_segments_note(store: Store) -> str:
    return (f"note: {store.root / 'segments'} is missing: the store holds no entries "
            "(`distill-pipeline run teacher_logits` extracts them again)")


@dataclass
class Verification:
    """What `verify_all` found, line by line as it went (kind "info", "problem" or "note"), and its
    verdict: `failure()` is the closing message when anything is wrong, else None."""
    lines: list[tuple[str, str]] = field(default_factory=list)
    checked: int = 0     # entries decoded and checked
    problems: int = 0
    nodes: int = 0       # published extraction nodes of the run dir
    lacking: list[NodeCheck] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)
    run_dir: Path | None = None

    def add(self, kind: str, text: str) -> None:
        self.lines.append((kind, text))

    def failure(self) -> str | None:
        if not self.problems and not self.lacking:
            return None
        parts = [f"{self.problems} problem(s) in {self.checked} entries"]
        if self.lacking:
            parts.append(f"{len(self.lacking)} teacher_logits node(s) of {self.run_dir} lack entries")
        return "; ".join(parts) + (". To fix: " + "; then ".join(self.advice) if self.advice else "")

    def summary(self) -> str:
        return f"ok: {self.checked} entries verified" + (
            f", {self.nodes} teacher_logits node(s) complete" if self.run_dir else "")


def verify_all(store: str | None, run_dir: Path | None = None) -> Verification:
    """`cache verify`: every segment of `store` decoded and checked (a remote store through its
    mirror); with `run_dir`, also every entry its published extraction nodes stand for looked up
    in the store each names (without `store`: those stores are the ones verified)."""
    v = Verification(run_dir=run_dir)
    nodes = run_nodes(run_dir) if run_dir else []
    v.nodes = len(nodes)
    roots: list = [store]
    if run_dir and store is None:
        found = set()
        for folder in nodes:
            try:
                found.add(node_store(folder))
            except CacheError:
                pass  # reported with the node below
        roots = sorted(found) or [None]
    bad_keys: dict[str, set[str]] = {}
    for root in roots:
        try:
            opened = open_store(root, create=False)
        except CacheError as exc:
            if not (run_dir and store is None):
                raise
            v.add("problem", str(exc))  # a store a node names that is gone: reported, go on
            v.problems += 1
            continue
        seen = inspect(opened)
        for note in seen.notes:
            v.add("note", note)
        for text in seen.failures():
            v.add("problem", text)
        v.problems += len(seen.fetch_failures)
        # a mirror's record without its folder is not damage: the segment is fetched again on use
        checks = check_segments(seen.store, dangling=not isinstance(opened, MirroredStore))
        for c in checks:
            v.checked += len(c.index or [])
            for p in c.problems:
                v.add("problem", p)
            v.problems += len(c.problems)
        if any(c.damaged for c in checks) or seen.fetch_failures:
            v.advice.append(damage_advice(seen.url, listed=True))
        bad_keys[store_id(seen.url)] = damaged_keys(checks)
        if run_dir:
            v.add("info", f"store {seen.url}: {len(checks)} segment(s) checked")
    if not run_dir:
        return v
    if not nodes:
        v.add("info", f"{run_dir}: no published teacher_logits node (nothing of the run to check)")
    for nc in check_nodes(run_dir, bad_keys):
        if nc.error:
            v.add("problem", nc.error)
            v.lacking.append(nc)
        elif not nc.ok:
            more = f"; {nc.in_damaged} more in damaged segments" if nc.in_damaged else ""
            v.add("problem", f"node {nc.folder}: {nc.missing} of {nc.expected} entries missing from "
                             f"{nc.store}{more}")
            v.lacking.append(nc)
        else:
            v.add("info", f"node {nc.folder}: all {nc.expected} entries present in {nc.store}")
    if v.lacking:
        names = sorted({nc.node for nc in v.lacking})
        v.advice.append(f"rerun `distill-pipeline run {' '.join(names)} -c <the run's config>` to "
                        "re-extract the missing entries (the node is out of date while any is missing)")
    return v
