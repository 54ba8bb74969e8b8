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
from typing import Any, Literal

from distill_pipeline.data.readers import BadRows, DataError, read_dataset
from distill_pipeline.data.tokenize import encode_rows
from distill_pipeline.pipeline.config import DataSpec, Layout, NumbersTask
from distill_pipeline.view import View

__all__ = ["BadRows", "DataError", "DataView", "data_view", "sft_examples", "pair_examples"]


class DataView(View):
    """What reading one dataset depends on. Fields a source ignores stay None and read from no
    config path: the built-in task reads no layout/split/limit, a local file no split."""
    which: Literal["sft", "preferences", "eval", "validation"]
    source: str
    layout: Layout | None = None
    split: str | None = None
    limit: int | None = None
    max_length: int
    max_bad_fraction: float
    numbers: NumbersTask | None = None  # the built-in task only
    sha256: str | None = None           # local files only

    def origins(self) -> dict[str, str | None]:
        spec = f"data.{self.which}"
        builtin, hub = self.source.startswith("builtin:"), self.source.startswith("hf://")
        return {"which": None, "source": f"{spec}.source",
                "layout": None if builtin else f"{spec}.layout",
                "split": f"{spec}.split" if hub else None,
                "limit": None if builtin else f"{spec}.limit",
                "max_length": "data.max_length", "max_bad_fraction": "data.max_bad_fraction",
                "numbers": "data.numbers" if builtin else None,
                "sha256": None if builtin or hub else f"{spec}.source"}

    def spec(self) -> DataSpec:
        return DataSpec(source=self.source, layout=self.layout or "auto", split=self.split or "train",
                        limit=self.limit)


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
    builtin, hub = spec.source.startswith("builtin:"), spec.source.startswith("hf://")
    return DataView(which=which, source=spec.source,
                    layout=None if builtin else spec.layout, split=spec.split if hub else None,
                    limit=None if builtin else spec.limit,
                    max_length=cfg.data.max_length, max_bad_fraction=cfg.data.max_bad_fraction,
                    numbers=cfg.data.numbers if builtin else None,
                    sha256=None if builtin or hub else file_digest(spec.source))


def _finish(bad: BadRows, view: DataView, examples: list[dict]) -> list[dict]:
    if bad.count:
        print(bad.summary())
    bad.check(view.max_bad_fraction)
    if not examples:
        raise DataError(f"{bad.source}: no usable rows")
    return examples


def sft_examples(view: DataView, tok: Any) -> list[dict]:
    rows, bad = read_dataset(view.spec(), "sft", view.numbers)
    return _finish(bad, view, encode_rows(tok, rows, ["response"], view.max_length, bad))


def pair_examples(view: DataView, tok: Any) -> list[dict]:
    rows, bad = read_dataset(view.spec(), view.which, view.numbers)
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
