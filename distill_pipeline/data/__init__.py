"""Datasets as the stages use them: read, report bad rows, tokenise.

A stage that reads a dataset holds a `DataView` (built by `data_view(cfg, which)`): the dataset's
spec, the shared reading limits, the built-in task's settings when the source is built in, and
the file's sha256 when it is a local file (so a changed file reruns what reads it).
`sft_examples` and `pair_examples` take that view and a tokenizer and return tokenised rows;
skipped rows are printed as one line (count + first row numbers) and refused above
`max_bad_fraction`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from distill_pipeline.data.readers import BadRows, DataError, read_dataset
from distill_pipeline.data.tokenize import encode_rows
from distill_pipeline.pipeline.config import DataSpec, NumbersTask
from distill_pipeline.stages import View

__all__ = ["BadRows", "DataError", "DataView", "data_view", "sft_examples", "pair_examples"]


class DataView(View):
    which: str                          # sft | preferences | eval | validation
    spec: DataSpec
    max_length: int
    max_bad_fraction: float
    numbers: NumbersTask | None = None  # the built-in task only
    sha256: str | None = None           # local files only

    def origins(self) -> dict[str, str | None]:
        return {"which": None, "spec": f"data.{self.which}", "max_length": "data.max_length",
                "max_bad_fraction": "data.max_bad_fraction", "numbers": "data.numbers",
                "sha256": f"data.{self.which}.source"}


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str) -> str:
    """sha256 of a dataset file, memoised per (path, size, mtime) for this process."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def data_view(cfg: Any, which: str) -> DataView:
    spec = getattr(cfg.data, which)
    builtin = spec.source.startswith("builtin:")
    local = not builtin and not spec.source.startswith("hf://")
    return DataView(which=which, spec=spec, max_length=cfg.data.max_length,
                    max_bad_fraction=cfg.data.max_bad_fraction,
                    numbers=cfg.data.numbers if builtin else None,
                    sha256=file_digest(spec.source) if local else None)


def _finish(bad: BadRows, view: DataView, examples: list[dict]) -> list[dict]:
    if bad.count:
        print(bad.summary())
    bad.check(view.max_bad_fraction)
    if not examples:
        raise DataError(f"{bad.source}: no usable rows")
    return examples


def sft_examples(view: DataView, tok: Any) -> list[dict]:
    rows, bad = read_dataset(view.spec, "sft", view.numbers)
    return _finish(bad, view, encode_rows(tok, rows, ["response"], view.max_length, bad))


def pair_examples(view: DataView, tok: Any) -> list[dict]:
    rows, bad = read_dataset(view.spec, view.which, view.numbers)
    return _finish(bad, view, encode_rows(tok, rows, ["chosen", "rejected"], view.max_length, bad))


def rollout_examples(folder: Any) -> list[dict]:
    """Rows of a rollouts stage's `rollouts.jsonl`: prompt_ids, rollout_ids (the student's exact
    generated ids) and chosen_ids (the dataset's y_w, for ADPA's SFT term)."""
    import json
    from pathlib import Path

    rows = []
    with open(Path(folder) / "rollouts.jsonl") as fh:
        for line in fh:
            r = json.loads(line)
            rows.append({"prompt_ids": r["prompt_ids"], "rollout_ids": r["response_ids"],
                         "chosen_ids": r["chosen_ids"], "prompt": r["prompt"]})
    return rows
