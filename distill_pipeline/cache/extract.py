"""Sharded, resumable top-K extraction into the teacher-logit cache.

`extract(requests, store, …)` looks up which entries already exist, groups the missing ones into
*units* (deterministic: the same work always forms the same units, whatever the worker count or
how often the run was interrupted), and has N workers — Ray actors, each holding its own
teacher(s), one per GPU on a GPU machine — compute and publish one segment per unit. A `kill -9`
loses only the units in flight; the rerun recomputes exactly those, giving a bit-identical cache.
Within a unit, sequences are sorted by length and packed into batches of ≤ `batch_tokens` padded
tokens, so padding waste stays bounded.
"""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np
from dataclasses import dataclass, field
from typing import Any, Sequence

from distill_pipeline.cache.format import SCHEMA_VERSION, CacheFormat, reconstruction_kl
from distill_pipeline.cache.remote import open_store
from distill_pipeline.cache.segment import SegmentData, topk_mass_sum
from distill_pipeline.cache.store import CacheStore
from distill_pipeline.env import ray_running, worker_options
from distill_pipeline.identity import IDENTITY_VERSION
from distill_pipeline.progress import progress
from distill_pipeline.provenance import package_versions


@dataclass(frozen=True)
class Request:
    """One (sequence, teacher) entry to extract, keyed in one cache format (`make_request`)."""
    teacher: str          # teacher identity (weights + tokenizer + chat template hash)
    prompt_ids: tuple
    response_ids: tuple
    key: str

    @property
    def n_tokens(self) -> int:
        return len(self.response_ids)


def make_request(teacher: str, prompt_ids: Sequence[int], response_ids: Sequence[int],
                 fmt: CacheFormat) -> Request:
    p, r = tuple(prompt_ids), tuple(response_ids)
    return Request(teacher, p, r, fmt.key(teacher, p + r, len(p)))


@dataclass
class Unit:
    id: str
    teacher: str
    requests: list[Request] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(r.n_tokens for r in self.requests)


def plan_units(requests: Sequence[Request], existing: set[str], unit_tokens: int) -> list[Unit]:
    """Deterministic units over *all* requested entries, then filtered to the missing ones, so an
    interrupted run replans the same units for what it had not finished."""
    unique = {r.key: r for r in requests}.values()
    ordered = sorted(unique, key=lambda r: (r.teacher, len(r.prompt_ids) + r.n_tokens, r.key))
    chunks: list[list[Request]] = []
    current: list[Request] = []
    tokens, teacher = 0, None
    for r in ordered:
        if current and (tokens >= unit_tokens or r.teacher != teacher):
            chunks.append(current)
            current, tokens = [], 0
        current.append(r)
        tokens += r.n_tokens
        teacher = r.teacher
    if current:
        chunks.append(current)
    units = []
    for chunk in chunks:
        missing = [r for r in chunk if r.key not in existing]
        if missing:
            uid = hashlib.sha256("".join(r.key for r in missing).encode()).hexdigest()[:32]
            units.append(Unit(uid, missing[0].teacher, missing))
    return units


def _batches(requests: list[Request], batch_tokens: int) -> list[list[Request]]:
    """Length-sorted packing: each batch's padded size (rows × longest) stays ≤ batch_tokens."""
    out, cur, longest = [], [], 0
    for r in sorted(requests, key=lambda r: len(r.prompt_ids) + r.n_tokens):
        length = len(r.prompt_ids) + r.n_tokens
        if cur and max(longest, length) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(r)
        longest = max(longest, length)
    if cur:
        out.append(cur)
    return out


def _head_only_ok(model: Any) -> bool:
    """The LM head can be applied to response positions only when logits are a plain linear map
    of the last hidden state (no soft-capping or scaling)."""
    cfg = model.config
    return (getattr(cfg, "final_logit_softcapping", None) is None and not hasattr(model, "logit_scale")
            and model.get_output_embeddings() is not None and hasattr(model, "base_model"))


def topk_for_batch(model: Any, batch: list[Request], pad_id: int, top_k: int,
                   chunk_rows: int | None = None) -> list[dict]:
    """Teacher-forced top-K on one batch. Per request: float32 numpy ids (n, K), logp (n, K),
    lse (n,), label_logp (n,). Log-softmax in float32 from the raw logits. With an LM head that
    can be applied to response positions alone, it runs `chunk_rows` positions at a time, so
    the (rows, vocabulary) float32 logits never exist for the whole batch: the peak grows with
    the chunk, not with batch_tokens. Everything after the head is row-wise, so chunking changes
    only the head matmul's float32 rounding (same ids; tests/invariants/test_cache_invariants.py)."""
    import torch

    from distill_pipeline.data.tokenize import collate

    if hasattr(model, "get_base_model"):  # a peft model: its causal LM, adapters inside (on or off)
        model = model.get_base_model()
    ids, mask, _ = collate([r.prompt_ids for r in batch], [r.response_ids for r in batch], pad_id)
    dev = next(model.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)
    rows = torch.cat([torch.full((r.n_tokens,), i) for i, r in enumerate(batch)])  # (N,)
    cols = torch.cat([torch.arange(len(r.prompt_ids) - 1, len(r.prompt_ids) - 1 + r.n_tokens)
                      for r in batch])  # (N,) positions predicting the response tokens
    rows, cols = rows.to(dev), cols.to(dev)
    labels = ids[rows, cols + 1]  # (N,)
    parts = []
    with torch.no_grad():
        if _head_only_ok(model):
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
            hidden = hidden[rows, cols]  # (N, H)
            del ids, mask
            head = model.get_output_embeddings()
            step = chunk_rows or len(hidden) or 1
            for s in range(0, len(hidden), step):
                parts.append(_head_topk(head(hidden[s:s + step]).float(), labels[s:s + step], top_k))
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits[rows, cols].float()  # (N, V)
            parts.append(_head_topk(logits, labels, top_k))
    t_ids, t_lp, lse_np, lab_np = (np.concatenate([p[i] for p in parts]) for i in range(4))
    vocab = parts[0][4] if parts else 0
    out, start = [], 0
    for r in batch:
        s = slice(start, start + r.n_tokens)
        out.append({"ids": t_ids[s], "logp": t_lp[s], "lse": lse_np[s], "label_logp": lab_np[s],
                    "vocab": vocab})
        start += r.n_tokens
    return out


# Post-head work runs on blocks of rows holding about this many bytes of float32 logits, so the
# passes after the first over a block (shift, exp, sum, gathers) read cache, not memory; with
# the grouped top-K, the step is ~2x cheaper than a logsumexp and topk over a whole 1024-row
# chunk (docs/BENCHMARKS.md, benchmarks/head_topk_bench.py). Every step is row-wise, so a row's
# result does not depend on which rows share its block (tests/unit/test_head_topk.py).
POST_HEAD_BLOCK_BYTES = 4 << 20
TOPK_GROUP = 32  # ids per group whose maximum pre-selects the top-K candidates on CPU


def _head_topk(logits: Any, labels: Any, top_k: int) -> tuple:
    """(top-K ids, top-K log-probs, lse, label log-prob, V) as numpy, from (n, V) float32 logits,
    which it overwrites. The same values as log_softmax, topk, gather: a per-row shift keeps
    the order, so the top-K is taken on the raw logits and lse is subtracted from the K values
    and the label logit only (the same float32 subtraction, so the same bits)."""
    import torch

    n, vocab = logits.shape
    on_cpu = logits.device.type == "cpu"
    rows = max(1, POST_HEAD_BLOCK_BYTES // (4 * vocab)) if on_cpu else max(n, 1)
    parts = [_rows_topk(logits[s:s + rows], labels[s:s + rows], top_k, on_cpu)
             for s in range(0, max(n, 1), rows)]
    ids, logp, lse, label_logp = (torch.cat([p[i] for p in parts]).cpu().numpy() for i in range(4))
    return ids, logp, lse, label_logp, int(vocab)


def _rows_topk(x: Any, labels: Any, k: int, grouped: bool) -> tuple:
    """One block of rows: int32 ids (r, K) by probability descending, float32 log-probs (r, K),
    lse (r,), label log-prob (r,). Leaves exp(x - max) in x."""
    ids, m = _topk_ids(x, k) if grouped else (x.topk(k, dim=-1).indices, x.amax(-1))
    top = x.gather(1, ids)  # (r, K) raw logits, descending
    label = x.gather(1, labels[:, None]).squeeze(1)  # (r,)
    # lse exactly as torch.logsumexp computes it (same ops, same bits), without its (r, V)
    # temporary: x itself is shifted and exponentiated, once the raw values are read
    m = m.masked_fill(m.abs() == float("inf"), 0)
    lse = x.sub_(m[:, None]).exp_().sum(-1).log_().add_(m)  # (r,)
    return ids.int(), top - lse[:, None], lse, label - lse


def _topk_ids(x: Any, k: int) -> tuple:
    """`x.topk(k).indices` (r, K) and the row maxima (r,), cheaper on a CPU: torch's CPU topk
    walks the whole row (~60 us per 32k-vocabulary row). Here the K groups of TOPK_GROUP ids with
    the largest maxima hold every top-K logit (any other group's maximum is below K values), so
    topk runs on those K x TOPK_GROUP candidates. That result is the one whole-row topk gives
    whenever the top K+1 logits are distinct (the order is then unique); a row where they are
    not (ties, which topk orders by its own rule), where group maxima tie at the threshold, or
    with NaN/inf, takes the whole-row topk instead — so the ids never depend on the shortcut."""
    import torch

    r, vocab = x.shape
    n_groups = vocab // TOPK_GROUP
    if n_groups <= k:  # a small vocabulary: nothing to skip
        return x.topk(k, dim=-1).indices, x.amax(-1)
    full = n_groups * TOPK_GROUP
    gmax = x[:, :full].view(r, n_groups, TOPK_GROUP).amax(-1)  # (r, G) each group's maximum
    if full < vocab:  # the last ids form one shorter group
        gmax = torch.cat([gmax, x[:, full:].amax(-1, keepdim=True)], 1)  # (r, G + 1)
    m = gmax.amax(-1)  # (r,) row maxima
    gkey = _sortable(gmax)  # (r, G') integer keys: integer topk is cheaper than float topk
    best = gkey.topk(k, dim=-1, sorted=False)
    ok = ((gkey >= best.values.amin(-1, keepdim=True)).sum(-1) == k) & m.isfinite()  # (r,)
    cand = (best.indices[:, :, None] * TOPK_GROUP
            + torch.arange(TOPK_GROUP, device=x.device)).view(r, k * TOPK_GROUP)  # candidate ids
    past = cand >= vocab  # the shorter last group's missing ids
    ckey = _sortable(x.gather(1, cand.clamp_max_(vocab - 1)))  # (r, K * TOPK_GROUP)
    ckey.masked_fill_(past, torch.iinfo(torch.int32).min)
    top = ckey.topk(k + 1, dim=-1)  # sorted; one more to see a tie at the K-th place
    ids = cand.gather(1, top.indices[:, :k])  # (r, K)
    ok &= (top.values[:, 1:] != top.values[:, :-1]).all(-1)
    if not bool(ok.all()):
        slow = (~ok).nonzero().squeeze(1)
        ids[slow] = x[slow].topk(k, dim=-1).indices
    return ids, m


def _sortable(v: Any) -> Any:
    """float32 → int32 keys in the same order (equal keys for equal floats: -0.0 is made 0.0)."""
    import torch

    bits = (v + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def segment_data(fmt: CacheFormat, ids: Any, logp: Any, lse: Any, label_logp: Any, entries: list[dict],
                 vocab: int) -> tuple[SegmentData, float]:
    """A unit's float32 top-K rows (N, top_k) → what its segment stores, and its reconstruction
    KL. Adaptive K keeps, per token, the first `fmt.kept(...)` slots of the stored values, flat."""
    bits = fmt.encode(logp)
    stored = fmt.decode(bits)
    ids = ids.astype(np.int32)
    lse, label_logp = lse.astype(np.float32), label_logp.astype(np.float32)
    if not fmt.adaptive:
        return (SegmentData(ids=ids, logp_bits=bits, lse=lse, label_logp=label_logp, entries=entries),
                reconstruction_kl(logp, stored))
    counts = fmt.kept(stored)  # (N,)
    keep = np.arange(fmt.top_k)[None, :] < counts[:, None]  # (N, K); row-major: a token's slots in a row
    data = SegmentData(ids=np.ascontiguousarray(ids[keep]), logp_bits=np.ascontiguousarray(bits[keep]),
                       lse=lse, label_logp=label_logp, entries=entries, counts=counts)
    return data, reconstruction_kl(logp, stored, counts, vocab)


class Extractor:
    """Holds teacher models (loaded on first use) and turns units into published segments.
    Used in-process, or as the body of a Ray actor (one per worker)."""

    def __init__(self, store_root: str, teacher_dirs: dict[str, Any], *, fmt: CacheFormat,
                 batch_tokens: int, threads: int | None = None, head_chunk_rows: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.store = open_store(store_root)
        self.teacher_dirs = teacher_dirs
        self.fmt, self.batch_tokens, self.head_chunk_rows = fmt, batch_tokens, head_chunk_rows
        self.models: dict[str, tuple] = {}
        self.throttle = float(os.environ.get("DISTILL_EXTRACT_THROTTLE_S", "0"))

    def _model(self, teacher: str) -> tuple[Any, int, Any]:
        """(model, pad id, context to run it in) of a teacher, loaded on first use. A teacher given
        as a `models.AdapterSide` shares one loaded copy of its adapter's base with the other side:
        the adapter on, or disabled (`peft`'s context) for the base."""
        import contextlib

        from distill_pipeline.models import AdapterSide, ModelRef, load_adapter_pair, load_ref

        ref = self.teacher_dirs[teacher]  # a models.ModelRef or AdapterSide, or a stage's model directory
        key = ("adapter", ref.adapter, ref.dtype) if isinstance(ref, AdapterSide) else teacher
        if key not in self.models:
            if isinstance(ref, AdapterSide):
                model, tok = load_adapter_pair(ref.adapter, dtype=ref.dtype)
            else:
                model, tok = load_ref(ref if isinstance(ref, ModelRef) else ModelRef(str(ref)))
            model.eval()
            self.models[key] = (model, tok.pad_token_id)
        model, pad_id = self.models[key]
        context = (model.disable_adapter() if isinstance(ref, AdapterSide) and not ref.on
                   else contextlib.nullcontext())
        return model, pad_id, context

    def run(self, unit: Unit) -> tuple[str, int, bool]:
        import numpy as np

        model, pad_id, context = self._model(unit.teacher)
        results: dict[str, dict] = {}
        with context:
            for batch in _batches(unit.requests, self.batch_tokens):
                for r, res in zip(batch, topk_for_batch(model, batch, pad_id, self.fmt.top_k,
                                                        self.head_chunk_rows)):
                    results[r.key] = res
        entries, offset = [], 0
        for r in unit.requests:  # unit order, independent of batching
            entries.append({"key": r.key, "teacher": r.teacher, "offset": offset, "n_tokens": r.n_tokens,
                            "prompt_len": len(r.prompt_ids), "token_ids": r.prompt_ids + r.response_ids})
            offset += r.n_tokens
        cat = lambda f: np.concatenate([results[r.key][f] for r in unit.requests])  # noqa: E731
        vocab = max(results[r.key]["vocab"] for r in unit.requests)
        data, kl = segment_data(self.fmt, cat("ids"), cat("logp"), cat("lse"), cat("label_logp"),
                                entries, vocab)
        manifest = {"schema_version": SCHEMA_VERSION, "identity_version": IDENTITY_VERSION,
                    "teacher": unit.teacher, "format": self.fmt.to_json(),
                    "n_entries": len(entries), "n_tokens": offset, "vocab_size": int(vocab),
                    **({"n_slots": int(len(data.ids))} if self.fmt.adaptive else {}),
                    "reconstruction_kl": kl, "topk_mass": topk_mass_sum(self.fmt, data.logp_bits) / max(1, offset),
                    "versions": package_versions()}
        published = self.store.publish(unit.id, data, manifest)
        if self.throttle:
            time.sleep(self.throttle)  # crash tests and demos: widen the window between units
        return unit.id, offset, published


def extract(requests: Sequence[Request], store: CacheStore, teacher_dirs: dict[str, Any], fmt: CacheFormat, *,
            num_workers: int = 1, batch_tokens: int = 4096, unit_tokens: int = 16384,
            threads_per_worker: int = 1, gpus_per_worker: float = 0,
            head_chunk_rows: int | None = None) -> dict:
    """Extract every missing entry of `requests` (built with `make_request(…, fmt)`) into `store`.
    `teacher_dirs`: teacher identity → its `models.ModelRef` (or a saved model's directory).
    Returns counts and throughput."""
    t0 = time.perf_counter()
    for r in requests:  # entries are published under these keys: they must be keys of `fmt`
        if r.key != fmt.key(r.teacher, r.prompt_ids + r.response_ids, len(r.prompt_ids)):
            raise ValueError(f"request {r.key[:12]}… was keyed in another cache format than this "
                             f"extraction's ({fmt}); build requests with make_request(…, fmt)")
    keys = {r.key for r in requests}
    existing = keys - store.missing(keys)
    units = plan_units(requests, existing, unit_tokens)
    todo_tokens = sum(u.n_tokens for u in units)
    stats = {"entries": len(keys), "cached": len(keys & existing),
             "extracted": sum(len(u.requests) for u in units), "units": len(units),
             "tokens_extracted": todo_tokens}
    kw = dict(fmt=fmt, batch_tokens=batch_tokens, threads=threads_per_worker,
              head_chunk_rows=head_chunk_rows)
    with progress(total=todo_tokens, desc=f"teacher_logits ({num_workers} worker(s))", unit="tok") as bar:
        if units and ray_running():
            _extract_ray(units, store, teacher_dirs, kw, num_workers, gpus_per_worker, bar)
        else:
            worker = Extractor(store.url, teacher_dirs, **kw)
            for unit in units:
                bar.update(worker.run(unit)[1])
    seconds = time.perf_counter() - t0
    stats.update(seconds=round(seconds, 3), tokens_per_s=round(todo_tokens / seconds, 1) if units else 0.0)
    return stats


def gpus_per_worker() -> float:
    """One GPU per extraction worker when the Ray cluster (or this machine) has GPUs."""
    if ray_running():
        import ray

        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def _extract_ray(units, store, teacher_dirs, kw, num_workers, gpus, bar) -> None:
    import ray

    n = min(num_workers, len(units))
    actor = ray.remote(Extractor).options(**worker_options(n, gpus))
    workers = [actor.remote(store.url, teacher_dirs, **kw) for _ in range(n)]
    queue = list(units)
    running = {}
    for w in workers:
        if queue:
            running[w.run.remote(queue.pop(0))] = w
    try:
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            w = running.pop(done[0])
            _, tokens, _ = ray.get(done[0])
            bar.update(tokens)
            if queue:
                running[w.run.remote(queue.pop(0))] = w
    finally:
        for w in workers:
            ray.kill(w)
