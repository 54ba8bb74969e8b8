"""Reading the teacher-logit cache: random access by key, and teacher tensors aligned with a
student batch.

`CacheReader` maps keys to (segment, offset) and decodes zarr chunks lazily through a bounded LRU,
so memory stays bounded whatever the cache size. `aligned_teacher_tensors` places entries at the
student's shifted positions, checking every cached row's token ids against the student sequence
(`distill_pipeline/batches.py` streams whole training batches with it).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

from distill_pipeline.cache.format import NewerFormat
from distill_pipeline.cache.remote import open_store
from distill_pipeline.cache.segment import CacheError, damage_advice, entry_checksum, segment_format
from distill_pipeline.cache.store import CacheStore


class TokenMismatch(CacheError):
    """A cached entry's token ids differ from the student sequence it is paired with."""


class CacheReader:
    """Entries by key. Each entry's data is checked against the checksum written with it the first
    time this reader decodes it (so chunks that are intact but swapped or replaced are caught);
    any failure to read raises `CacheError` naming the segment, the entry and the fix."""

    def __init__(self, store: CacheStore | str | os.PathLike | None, *, keys: Iterable[str] | None = None,
                 max_cached_bytes: int = 256 << 20, max_open_segments: int = 8):
        """`store`: an open store, or how users name one (a path or URL, opened read-only).
        `keys`: the entries it will be asked for, looked up in the store's index — what they touch,
        whatever the store's size (a key asked for later is looked up then); without them the whole
        index is read (every key of the store: for small stores and tools).
        `max_cached_bytes`: decoded chunks kept (LRU). `max_open_segments`: segments kept open
        between reads; the least recently used beyond it are released to the store (a mirror of
        a remote store may then evict them to stay within DISTILL_MIRROR_GB, and fetches them
        again if they are read again)."""
        self.store = open_store(store, create=False) if store is None or isinstance(store, (str, os.PathLike)) else store
        self.damaged: dict[str, str] = {}  # segments left out: their index cannot be read
        self._where: dict[str, tuple] = {}
        self._by_key = keys is not None
        if keys is None:
            self._add(self.store.index(columns=["key", "offset", "n_tokens", "prompt_len", "checksum"],
                                       damaged=self.damaged))
        else:
            self._add(self.store.lookup(keys))
        self._groups: OrderedDict = OrderedDict()  # open segments, least recently used first
        self._uses: dict[str, int] = {}  # reads in progress, per open segment
        self._paths: dict[str, Any] = {}
        self._arrays: dict[tuple, Any] = {}
        self._chunk_rows: dict[tuple, int] = {}
        self._max_open = max(1, int(max_open_segments))
        self._open_lock = threading.Lock()
        self._formats: dict[str, Any] = {}
        self._chunks: OrderedDict = OrderedDict()
        self._budget, self._held = max_cached_bytes, 0
        self._tokens: OrderedDict = OrderedDict()
        self._verified: set[str] = set()  # keys whose data matched their checksum
        self._lock = threading.Lock()

    def _add(self, rows) -> None:
        idx = rows.to_pydict()
        self._where.update({k: (s, o, n, p, c) for k, s, o, n, p, c in zip(
            idx["key"], idx["segment"], idx["offset"], idx["n_tokens"], idx["prompt_len"], idx["checksum"])})

    def __contains__(self, key: str) -> bool:
        if key not in self._where and self._by_key:
            self._add(self.store.lookup([key]))
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def describe(self, key: str) -> str:
        """Where an entry lives, for messages: `cache segment <id> (entry <key>…) of <store>`."""
        segment = self._where[key][0] if key in self._where else "?"
        return f"cache segment {segment} (entry {key[:16]}…) of {self.store.url}"

    def _damage(self, segment: str, key: str | None, what: str) -> CacheError:
        entry = f", entry {key[:16]}…," if key else ""
        return CacheError(f"cache segment {segment}{entry} in {self.store.url} is damaged: {what}; "
                          + damage_advice(self.store.url))

    @contextmanager
    def _using(self, segment: str) -> Iterator[Any]:
        """The segment's open zarr group, held open (in a mirror: pinned) while it is read; after
        its use at most `max_open_segments` stay open, the least recently used idle ones released."""
        with self._open_lock:
            if segment not in self._groups:
                self._groups[segment] = self.store.open_segment(segment)  # a use of it begins
                self._paths[segment] = self.store.segment_path(segment)
                self.store.release(segment)  # (segment_path's own use: the open group holds it)
            self._groups.move_to_end(segment)
            self._uses[segment] = self._uses.get(segment, 0) + 1
            group = self._groups[segment]
        try:
            yield group
        finally:
            with self._open_lock:
                self._uses[segment] -= 1
                while len(self._groups) > self._max_open:
                    idle = next((name for name in self._groups if not self._uses.get(name)), None)
                    if idle is None:
                        break
                    self._close(idle)

    def _close(self, segment: str) -> None:  # (with _open_lock held)
        del self._groups[segment], self._paths[segment]
        self._uses.pop(segment, None)
        for key in [k for k in list(self._arrays) if k[0] == segment]:
            del self._arrays[key]
        self.store.release(segment)

    def open_segments(self) -> list[str]:
        with self._open_lock:
            return list(self._groups)

    def close(self) -> None:
        """Release every segment still open (a mirror may then evict them); the reader stays
        usable (segments are opened again when read)."""
        with self._open_lock:
            for segment in [s for s in list(self._groups) if not self._uses.get(s)]:
                self._close(segment)

    def _array(self, group: Any, segment: str, field: str):
        with self._open_lock:
            arr = self._arrays.get((segment, field))
            if arr is None:
                arr = self._arrays[(segment, field)] = group[field]
                self._chunk_rows[(segment, field)] = arr.chunks[0]
        return arr

    def _format(self, segment: str):
        fmt = self._formats.get(segment)
        if fmt is None:
            try:
                with self._using(segment) as group:
                    fmt = self._formats[segment] = segment_format(dict(group.attrs))
            except NewerFormat as exc:  # not damage: nothing to remove, a version to upgrade
                raise CacheError(f"cache segment {segment} was {exc}") from None
        return fmt

    def _chunk(self, segment: str, field: str, c: int):
        """Decoded chunk `c` of one array, through the LRU."""
        def read():
            with self._using(segment) as group:
                arr = self._array(group, segment, field)
                rows = arr.chunks[0]
                return arr[c * rows:(c + 1) * rows]
        return self._cached((segment, field, c), read)

    def _rows_per_chunk(self, segment: str, field: str) -> int:
        rows = self._chunk_rows.get((segment, field))
        if rows is None:
            with self._using(segment) as group:
                rows = self._array(group, segment, field).chunks[0]
        return rows

    def _starts(self, segment: str):
        """Adaptive K: where each token's slots start in the flat arrays, (N + 1,) int64, through
        the LRU (one segment's counts, decoded and summed once)."""
        import numpy as np

        def read():
            with self._using(segment) as group:
                counts = self._array(group, segment, "counts")[...]
            starts = np.zeros(len(counts) + 1, dtype=np.int64)
            np.cumsum(counts, out=starts[1:])
            return starts
        return self._cached((segment, "starts", 0), read)

    def _cached(self, key: tuple, read):
        with self._lock:
            if key in self._chunks:
                self._chunks.move_to_end(key)
                return self._chunks[key]
        data = read()
        with self._lock:
            self._chunks[key] = data
            self._held += data.nbytes
            while self._held > self._budget and len(self._chunks) > 1:
                _, old = self._chunks.popitem(last=False)
                self._held -= old.nbytes
        return data

    def _rows(self, segment: str, field: str, offset: int, n: int):
        import numpy as np

        rows = self._rows_per_chunk(segment, field)
        parts = []
        pos = offset
        while pos < offset + n:
            c = pos // rows
            chunk = self._chunk(segment, field, c)
            take = min(offset + n, (c + 1) * rows) - pos
            parts.append(chunk[pos - c * rows:pos - c * rows + take])
            pos += take
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else self._chunk(segment, field, 0)[:0]

    def token_ids(self, key: str) -> list[int]:
        segment = self._where[key][0]
        with self._lock:
            table = self._tokens.get(segment)
        if table is None:
            import pyarrow.parquet as pq

            try:
                with self._using(segment):
                    t = pq.read_table(self._paths[segment] / "index.parquet",
                                      columns=["key", "token_ids"]).to_pydict()
            except CacheError:
                raise
            except Exception as exc:  # noqa: BLE001 - truncated, deleted, corrupt
                raise self._damage(segment, key, f"its index.parquet cannot be read "
                                                 f"({type(exc).__name__}: {exc})") from None
            table = dict(zip(t["key"], t["token_ids"]))
            with self._lock:
                self._tokens[segment] = table
                while len(self._tokens) > 64:
                    self._tokens.popitem(last=False)
        if key not in table:
            raise self._damage(segment, key, "its index.parquet changed while it was being read")
        return table[key]

    def get(self, key: str, expect_tokens: Sequence[int] | None = None) -> dict:
        """One entry: ids (n, K) int32, logp (n, K) float32, lse (n,), label_logp (n,), k (n,) the
        slots each token keeps. Adaptive K: K is the entry's largest k, and a token's slots past
        its own k are absent — log-prob −inf, ids distinct from its kept ones (`pad_slots`)."""
        import numpy as np

        if key not in self:  # (looked up now when the reader was opened for some keys)
            if self.damaged:
                names = ", ".join(sorted(self.damaged)[:3]) + (" …" if len(self.damaged) > 3 else "")
                raise CacheError(f"cache entry {key[:16]}… is not in {self.store.url}, which has "
                                 f"{len(self.damaged)} damaged segment(s) whose entries cannot be read "
                                 f"({names}); " + damage_advice(self.store.url))
            raise CacheError(f"cache entry {key[:16]}… is not in {self.store.url}; run "
                             "`distill-pipeline run teacher_logits -c <config>` for this data and teacher")
        segment, offset, n, prompt_len, checksum = self._where[key]
        if expect_tokens is not None:
            stored = self.token_ids(key)
            if list(stored) != list(expect_tokens):
                first = next((i for i, (a, b) in enumerate(zip(stored, expect_tokens)) if a != b),
                             min(len(stored), len(expect_tokens)))
                raise TokenMismatch(
                    f"cache entry {key[:16]}… (segment {segment}) holds token ids that differ from "
                    f"the student sequence at position {first} (cached {list(stored[first:first + 5])}, "
                    f"student {list(expect_tokens[first:first + 5])}; lengths {len(stored)} vs "
                    f"{len(expect_tokens)}). Teacher and student tokenisation disagree — rerun "
                    "teacher_logits for this data, and check both models share one tokenizer")
        counts = None
        try:
            fmt = self._format(segment)
            lse, label = (self._rows(segment, f, offset, n) for f in ("lse", "label_logp"))
            if fmt.adaptive:
                counts = self._rows(segment, "counts", offset, n)
                starts = self._starts(segment)
                a, b = int(starts[offset]), int(starts[offset + n])
                ids, bits = (self._rows(segment, f, a, b - a) for f in ("ids", "logp"))
            else:
                ids, bits = (self._rows(segment, f, offset, n) for f in ("ids", "logp"))
        except CacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - zarr checksum mismatch, missing files, bad JSON, …
            raise self._damage(segment, key, f"reading it failed ({type(exc).__name__}: {exc})") from None
        if key not in self._verified:  # once per entry per reader: a hash of ~n·(6K+8) bytes
            if len(lse) != n or entry_checksum(ids, bits, lse, label, counts) != checksum:
                raise self._damage(segment, key, "its data does not match the checksum written with it "
                                                 "(chunks changed, replaced or swapped after it was written)")
            self._verified.add(key)
        logp = fmt.decode(bits)
        if counts is None:
            k = np.full(n, ids.shape[1] if ids.ndim == 2 else 0, dtype=np.int64)
        else:
            k = counts.astype(np.int64)
            ids, logp = pad_slots(ids, logp, k, int(k.max()) if n else 0)
        return {"ids": ids, "logp": logp, "lse": lse, "label_logp": label, "k": k,
                "prompt_len": prompt_len}


def pad_slots(ids, logp, k, width: int):
    """Adaptive K: (n, ≥k) or flat (Σk,) slots → (n, width) numpy ids and log-probs, token r keeping
    its first k[r] slots. The others are absent, *zero-probability* slots: log-prob −inf and ids
    that name none of the token's kept ids (the smallest such ids, each once), so every K+1-bin
    loss sees the same bins as with the token's own k_t slots — a duplicated id would count its
    student probability twice. Which ids they name is arbitrary: losses must treat a −inf teacher
    slot as absent (docs/METHODS.md §1, adaptive K)."""
    import numpy as np

    k = np.asarray(k, dtype=np.int64)
    n = len(k)
    keep = np.arange(width)[None, :] < k[:, None]  # (n, width)
    out_ids = np.zeros((n, width), dtype=np.int32)
    out_lp = np.full((n, width), -np.inf, dtype=np.float32)
    if ids.ndim == 1:  # flat, a token's slots in a row
        out_ids[keep], out_lp[keep] = ids, logp
    else:
        w = min(width, ids.shape[1])
        out_ids[:, :w] = np.where(keep[:, :w], ids[:, :w], 0)
        out_lp[:, :w] = np.where(keep[:, :w], logp[:, :w], -np.inf)
    short = np.flatnonzero(k < width)
    if len(short):
        cand = np.arange(2 * width, dtype=np.int32)  # ≥ width of them are not kept ids
        used = ((out_ids[short, :, None] == cand[None, None, :]) & keep[short, :, None]).any(1)  # (s, 2w)
        free = cand[np.argsort(used, axis=1, kind="stable")]  # unused candidates first, ascending
        j = np.arange(width)[None, :] - k[short, None]  # (s, width): index among a token's pads
        pads = np.take_along_axis(free, np.clip(j, 0, None), axis=1)
        out_ids[short] = np.where(j >= 0, pads, out_ids[short])
    return out_ids, out_lp


def aligned_teacher_tensors(reader: CacheReader, rows: list[tuple[str, list[int], int]], width: int, top_k: int):
    """Teacher tensors aligned with the student's shifted logits (position j predicts token j+1):
    ids/logp (B, width-1, K), lse/label_logp/mask (B, width-1). K is `top_k` for a fixed-K cache;
    for an adaptive-K cache it is the batch's largest k, each token's slots past its own k padded
    as absent, zero-probability slots (`pad_slots`: log-prob −inf)."""
    import torch

    B, T = len(rows), width - 1
    entries = []
    for key, seq, prompt_len in rows:
        e = reader.get(key, expect_tokens=seq)
        if e["prompt_len"] != prompt_len:
            raise TokenMismatch(f"cache entry {key[:16]}…: prompt length {e['prompt_len']} ≠ {prompt_len}")
        entries.append(e)
    ragged = any(e["ids"].shape[1] != top_k or (e["k"] != top_k).any() for e in entries)
    K = max((e["ids"].shape[1] for e in entries), default=top_k) if ragged else top_k
    ids = torch.zeros((B, T, K), dtype=torch.long)  # (B, T, K)
    logp = torch.zeros((B, T, K), dtype=torch.float32)  # (B, T, K)
    lse = torch.zeros((B, T), dtype=torch.float32)  # (B, T)
    label = torch.zeros((B, T), dtype=torch.float32)  # (B, T)
    mask = torch.zeros((B, T), dtype=torch.bool)  # (B, T)
    for b, ((key, seq, prompt_len), e) in enumerate(zip(rows, entries)):
        n = len(e["lse"])
        s = slice(prompt_len - 1, prompt_len - 1 + n)
        e_ids, e_lp = e["ids"], e["logp"]
        if ragged and e_ids.shape[1] != K:
            e_ids, e_lp = pad_slots(e_ids, e_lp, e["k"], K)
        ids[b, s] = torch.from_numpy(e_ids).long()
        logp[b, s] = torch.from_numpy(e_lp)
        lse[b, s] = torch.from_numpy(e["lse"])
        label[b, s] = torch.from_numpy(e["label_logp"])
        mask[b, s] = True
    return {"ids": ids, "logp": logp, "lse": lse, "label_logp": label, "mask": mask}


def teacher_id_bounds(reader: CacheReader, rows: list[tuple[str, list[int], int]], ids: Any) -> dict:
    """The smallest and the largest teacher id of one batch's (B, T, K) `ids`, each with the entry
    it comes from (`reader.describe`), and the store: what the loss checks against the student's
    vocabulary before it gathers with them (`batches.check_teacher_ids`), so an id the student
    has no logit for is an error naming its segment, not a bare index error. One reduction of
    the batch's ids on the CPU, in the prefetch thread."""
    out: dict[str, Any] = {"store": reader.store.url}
    if ids.numel():
        flat = ids.flatten(1)  # (B, T·K)
        hi, lo = flat.amax(1), flat.amin(1)  # (B,)
        b, c = int(hi.argmax()), int(lo.argmin())
        out["max"] = (int(hi[b]), reader.describe(rows[b][0]))
        out["min"] = (int(lo[c]), reader.describe(rows[c][0]))
    return out
