"""Training batches for every training stage, and the adapter from a batch to a loss's inputs.

`Batches` yields per-epoch deterministic micro-batches of tokenised examples: for each `Field`
(a response of the example: chosen, rejected, the student's rollout, or an SFT response) the
padded student tensors and, when the field has teachers, the cached teacher tensors aligned with
the student's shifted logits (read through a `TeacherSource`; every cached row's token ids are
checked against the student's). Batches are built ahead by a background thread.

`loss_fn_for(spec, options)` turns a batch into the named tensors a loss asks for in its signature
(`logits_w`, `teacher_logp_r`, `policy_ref_logp_l`, …; see `losses.py`) and calls it;
`Batches.counts` gives the token and pair counts the loss is normalised by. SFT, teacher DPO and
every student method go through these two functions: there is no per-loss plumbing.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from distill_pipeline.losses import POLICY_REF, RESPONSES, TEACHER_ROLES, LossSpec


@dataclass(frozen=True)
class Field:
    """One response of an example: read from `example[f"{name}_ids"]`, passed to the loss with
    suffix `suffix` (w, l, r), with the cached tensors of the given teacher roles attached."""
    name: str
    suffix: str
    teachers: tuple[str, ...] = ()


@dataclass(frozen=True)
class TeacherSource:
    """Where teacher tensors come from: a cache reader, the cache's format, and the teacher
    identity of each role (the key of an entry is computed from the student's own tokens)."""
    reader: Any                 # cache.reader.CacheReader
    fmt: Any                    # cache.format.CacheFormat
    identities: dict[str, str]  # role → teacher identity


def fields_for(spec: LossSpec) -> list[Field]:
    """The fields a loss reads, with the teacher roles it needs on each."""
    return [Field(RESPONSES[s], s, spec.teachers.get(s, ())) for s in spec.responses]


class Batches:
    """Per-epoch deterministic micro-batches. Each batch:
    {"index": [...], "pairs": B, <suffix>: {"student": (ids, mask, labels), <role>: {tensors}},
     <extra>: (B,) float32 for each name in `extras`}."""

    def __init__(self, examples: list[dict], fields: Sequence[Field], *, batch_size: int, pad_id: int,
                 seed: int = 0, cache: TeacherSource | None = None, extras: Sequence[str] = (),
                 prefetch: int = 4):
        if any(f.teachers for f in fields) and cache is None:
            raise ValueError("fields with teachers need a TeacherSource")
        self.examples, self.fields, self.cache, self.extras = examples, list(fields), cache, tuple(extras)
        self.batch_size, self.pad_id, self.seed, self.prefetch = batch_size, pad_id, seed, prefetch

    def _groups(self, epoch: int) -> list[list[int]]:
        from distill_pipeline.training import epoch_batches

        return epoch_batches(len(self.examples), self.batch_size, self.seed, epoch)

    def counts(self, epoch: int) -> list[dict[str, int]]:
        """What each micro-batch of `epoch` holds, from lengths alone (no tensors built): its
        examples (`pairs`) and the valid label positions of each response after the causal shift
        (`tokens_w`, …) — what the training loop normalises a whole step's loss by."""
        out = []
        for g in self._groups(epoch):
            c = {"pairs": len(g)}
            for f in self.fields:
                # labels[:, 1:] keeps every response token unless the prompt is empty
                c[f"tokens_{f.suffix}"] = sum(len(self.examples[i][f"{f.name}_ids"])
                                              - (len(self.examples[i]["prompt_ids"]) == 0) for i in g)
            out.append(c)
        return out

    def build(self, idx: list[int]) -> dict:
        import torch

        from distill_pipeline.cache.reader import aligned_teacher_tensors, teacher_id_bounds
        from distill_pipeline.data.tokenize import collate

        chunk = [self.examples[i] for i in idx]
        prompts = [e["prompt_ids"] for e in chunk]
        batch: dict[str, Any] = {"index": idx, "pairs": len(idx)}
        for f in self.fields:
            responses = [e[f"{f.name}_ids"] for e in chunk]
            student = collate(prompts, responses, self.pad_id)
            entry: dict[str, Any] = {"student": student}
            for role in f.teachers:
                ident = self.cache.identities[role]
                rows = [(self.cache.fmt.key(ident, list(p) + list(r), len(p)), list(p) + list(r), len(p))
                        for p, r in zip(prompts, responses)]
                entry[role] = aligned_teacher_tensors(self.cache.reader, rows, student[0].shape[1],
                                                      self.cache.fmt.top_k)
                entry.setdefault("teacher_ids", {})[role] = teacher_id_bounds(self.cache.reader, rows,
                                                                              entry[role]["ids"])
            batch[f.suffix] = entry
        for name in self.extras:
            batch[name] = torch.tensor([e[name] for e in chunk], dtype=torch.float32)  # (B,)
        return batch

    def epoch(self, epoch: int, keep: Callable[[int], bool] | None = None) -> Iterator[dict | None]:
        """Batches of one epoch, built ahead by a background thread (bounded queue). With `keep`,
        only batches i with `keep(i)` are built; the others come as None, in their place."""
        groups = self._groups(epoch)
        skipped = object()
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            try:
                for i, g in enumerate(groups):
                    if stop.is_set():
                        return
                    q.put(self.build(g) if keep is None or keep(i) else skipped)
                q.put(None)
            except BaseException as exc:  # surface reader errors in the training thread
                q.put(exc)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield None if item is skipped else item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


def check_teacher_ids(bounds: dict | None, vocab: int, role: str) -> None:
    """The teacher ids of a batch (`reader.teacher_id_bounds`, computed when it was built) within
    the student's `vocab` logits, or a CacheError naming the entry, its segment and store, and
    what to do — instead of the bare index error (or device-side assert) of the gather."""
    from distill_pipeline.cache.segment import CacheError

    if not bounds or "max" not in bounds:
        return
    (lo, lo_where), (hi, hi_where) = bounds["min"], bounds["max"]
    if lo >= 0 and hi < vocab:
        return
    bad, where = (hi, hi_where) if hi >= vocab else (lo, lo_where)
    store = bounds["store"]
    raise CacheError(
        f"teacher id {bad} in {where} ({role} teacher) is outside the student's vocabulary of {vocab} "
        "tokens: the cache was extracted with a teacher whose vocabulary is not the student's, or the "
        "segment is damaged. Distil only between models that share one tokenizer and vocabulary (check "
        f"models.* in the config), and run `distill-pipeline cache verify --store {store}` (a damaged "
        f"segment is then removed with `distill-pipeline cache gc --damaged --store {store}`)")


def loss_fn_for(spec: LossSpec, options: dict) -> Callable[[Any, dict, dict], tuple[Any, dict]]:
    """`loss_fn(model, batch, norm)`: run the model on every field the loss reads and call the
    loss with its named inputs and `options`."""
    prefixes = {role: prefix for prefix, role in TEACHER_ROLES.items()}

    def loss_fn(model, batch, norm):
        named: dict[str, Any] = {}
        for s in spec.responses:
            ids, mask, labels = batch[s]["student"]
            named[f"logits_{s}"] = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            named[f"labels_{s}"] = labels[:, 1:]
            for role in spec.teachers.get(s, ()):
                check_teacher_ids(batch[s].get("teacher_ids", {}).get(role), named[f"logits_{s}"].shape[-1],
                                  role)
                for tensor, value in batch[s][role].items():
                    named[f"{prefixes[role]}_{tensor}_{s}"] = value
        for s in ("w", "l"):
            if f"{POLICY_REF}_{s}" in batch:
                named[f"{POLICY_REF}_{s}"] = batch[f"{POLICY_REF}_{s}"]
        return spec.fn(*(named[n] for n in spec.inputs), norm, **options)
    return loss_fn
