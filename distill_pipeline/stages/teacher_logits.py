"""Stage `teacher_logits`: top-K log-probs of the teacher(s) into the shared teacher-logit cache.

Node `teacher_logits` (DCKD, TVKD, VanillaKD, DPKD, and ADPA+'s first phase): the DPO teacher on
the dataset's y_w and y_l. Node `teacher_logits.rollouts` (ADPA, ADPA+): the DPO teacher *and*
the reference (SFT) teacher on the student's rollouts, same tokens. Only entries missing from the
store are extracted (content addressed), sharded over `teacher_logits.num_workers` Ray workers.
Produces `teachers.json` (store root, the `CacheFormat`, teacher identities by role) and
`keys.parquet` (every entry key the node covers); the train stage reads the format from the first
and computes the same keys from its own tokens.
Run alone: `distill-pipeline run teacher_logits -c configs/quickstart.yaml`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from distill_pipeline.data import DataView, data_view
from distill_pipeline.config import TeacherLogits
from distill_pipeline.stages import Stage, View


class TeacherLogitsView(View):
    source: Literal["pairs", "rollouts"]
    extraction: TeacherLogits
    data: DataView | None = None  # pairs only: rollouts come from the rollouts node

    # Neutral: 1 vs 3 workers give a bit-identical store. Batch size and threads change only
    # float32 rounding (other padding, other kernels): the tests find identical ids and stored
    # float16 log-probs and lse / label log-probs within 1e-5 (tests/invariants/test_cache_invariants.py);
    # on a large model a rounding difference can still reorder two near-tied top-K entries.
    NEUTRAL = frozenset({"extraction.num_workers", "extraction.batch_tokens",
                         "extraction.threads_per_worker", "extraction.head_chunk_rows"})
    # Which store, and how entries are grouped into segments, decide where the entries live, not
    # their values: a change re-extracts (or finds) the entries, and what trained on them stays.
    LAYOUT = frozenset({"extraction.store", "extraction.unit_tokens"})
    # adaptive K came later: a fixed-K extraction's fingerprint stays what it was (View.ADDED)
    ADDED = {"extraction.top_mass": None, "extraction.min_k": 1}

    def origins(self) -> dict[str, str | None]:
        return {"source": None, "extraction": "teacher_logits", "data": None}


def view_for(cfg, source: str) -> TeacherLogitsView:
    return TeacherLogitsView(source=source, extraction=cfg.teacher_logits,
                             data=data_view(cfg.data, "preferences") if source == "pairs" else None)


def sequences(view: TeacherLogitsView, inputs: dict, tok) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids) of every response this extraction covers."""
    from distill_pipeline.data import pair_examples, rollout_examples

    if view.source == "rollouts":
        return [(e["prompt_ids"], e["rollout_ids"]) for e in rollout_examples(inputs["rollouts"])]
    ex = pair_examples(view.data, tok)
    return [(e["prompt_ids"], e[f]) for e in ex for f in ("chosen_ids", "rejected_ids")]


def run(view: TeacherLogitsView, inputs: dict, out: Path) -> dict:
    from distill_pipeline.cache.extract import extract, gpus_per_worker, make_request
    from distill_pipeline.cache.node import write_node_file
    from distill_pipeline.cache.remote import is_remote, open_store
    from distill_pipeline.models import AdapterSide, adapter_over, load_ref_tokenizer, model_ref, ref_identity

    cfg, fmt = view.extraction, view.extraction.format
    roles = ["teacher", "reference"] if view.source == "rollouts" else ["teacher"]
    refs = {role: model_ref(inputs[role]) for role in roles}
    identities = {role: ref_identity(ref) for role, ref in refs.items()}
    tok = load_ref_tokenizer(refs["teacher"])
    seqs = sequences(view, inputs, tok)
    store = open_store(cfg.store, create=not is_remote(cfg.store))  # a remote one: see preflight
    requests = [make_request(identities[role], p, r, fmt) for role in roles for p, r in seqs]
    teachers: dict = {identities[r]: ref for r, ref in refs.items()}
    shared = "reference" in refs and adapter_over(refs["teacher"], refs["reference"])
    if shared:  # the DPO teacher is a LoRA adapter over the reference: load the base once
        side = lambda on: AdapterSide(refs["teacher"].path, on, refs["teacher"].dtype)  # noqa: E731
        teachers = {identities["teacher"]: side(True), identities["reference"]: side(False)}
    stats = extract(requests, store, teachers, fmt,
                    num_workers=cfg.num_workers, batch_tokens=cfg.batch_tokens,
                    unit_tokens=cfg.unit_tokens, threads_per_worker=cfg.threads_per_worker,
                    head_chunk_rows=cfg.head_chunk_rows,
                    gpus_per_worker=gpus_per_worker())
    write_node_file(out, store, fmt, view.source,
                    {role: {"identity": identities[role], "path": refs[role].path} for role in roles},
                    [r.key for r in requests])
    return {**stats, "store": store.url, **({"one_base": True} if shared else {})}


def check_output(folder: Path) -> str | None:
    """Up to date only while the segments holding its entries are still in its store (a stat per
    segment; `cache verify --run` checks entry by entry)."""
    from distill_pipeline.cache.node import node_segments_missing, node_store
    from distill_pipeline.cache.segment import CacheError

    try:
        gone, total = node_segments_missing(folder)
    except (CacheError, OSError) as exc:
        return f"its cache entries cannot be checked ({exc})"
    if gone:
        return (f"{gone} of the {total} cache segments holding its entries are gone from "
                f"{node_store(folder)} (deleted or removed as damaged); the missing entries will be "
                "extracted again")
    return None


def preflight(view: TeacherLogitsView) -> str:
    """The store the extraction writes into: a local one is created if need be; a remote URL
    must already hold a store (a mistyped URL would start an empty one and extract everything
    again): refused with the URL and how to create it (`cache init URL`)."""
    from distill_pipeline.cache.remote import is_remote, open_store

    url = view.extraction.store
    if not is_remote(url):
        return f"teacher_logits.store: {url or 'the default local store'}"
    open_store(url, create=False)  # NoStore: the URL and `cache init URL`
    return f"teacher_logits.store: {url} (reachable, a teacher-logit store)"


STAGE = Stage(version=1, kind="orchestrate", view=TeacherLogitsView,
              inputs={"teacher": "the DPO teacher", "reference": "the reference (SFT) teacher",
                      "rollouts": "the student's rollouts (source: rollouts)"},
              outputs=("teachers.json", "keys.parquet"), run=run, check_output=check_output,
              preflight=preflight)
