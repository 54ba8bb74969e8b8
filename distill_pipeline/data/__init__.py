"""Datasets as the stages use them: read, report bad rows, tokenise.

A stage that reads a dataset holds a `DataView` (built by `data_view(cfg.data, which)`): the dataset's
spec, the shared reading limits, the built-in task's settings when the source is built in, and
the file's sha256 when it is a local file (so a changed file reruns what reads it).
`sft_examples` and `pair_examples` take that view and a tokenizer and return tokenised rows;
skipped rows are printed as one line (count + first row numbers) and refused above
`max_bad_fraction`; a dataset left with no usable row is refused with the reason (every row
rejected and why, all scored pairs tied, …).

`validate_dataset(view)` runs the same reading and row checks without tokenising — the pipeline's
preflight calls it for every dataset before the first stage, so a bad `data.eval` fails at once
rather than after training. Every failure is a `DataError` naming the file, the line/row and the fix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from distill_pipeline.config import Data, DataSpec, Layout, NumbersTask, RankedTask
from distill_pipeline.data.readers import BadRows, DataError, check_readable, read_dataset
from distill_pipeline.data.tokenize import encode_rows
from distill_pipeline.identity import sha256_file
from distill_pipeline.view import View

__all__ = ["BadRows", "DataError", "DataView", "data_view", "sft_examples", "pair_examples",
           "validate_dataset"]


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
    numbers: NumbersTask | None = None  # the built-in tasks only
    ranked: RankedTask | None = None    # builtin:numbers-ranked only
    sha256: str | None = None           # local files only
    ADDED = {"ranked": None}

    def origins(self) -> dict[str, str | None]:
        spec = f"data.{self.which}"
        builtin, hub = self.source.startswith("builtin:"), self.source.startswith("hf://")
        return {"which": None, "source": f"{spec}.source",
                "layout": None if builtin else f"{spec}.layout",
                "split": f"{spec}.split" if hub else None,
                "limit": None if builtin else f"{spec}.limit",
                "max_length": "data.max_length", "max_bad_fraction": "data.max_bad_fraction",
                "numbers": "data.numbers" if builtin else None,
                "ranked": "data.ranked" if self.ranked is not None else None,
                "sha256": None if builtin or hub else f"{spec}.source"}

    def spec(self) -> DataSpec:
        # not re-validated: the config checked the source when it was loaded, and a file that has
        # gone or changed since is reported by the reader as a DataError (not a ValidationError)
        return DataSpec.model_construct(source=self.source, layout=self.layout or "auto",
                                        split=self.split or "train", limit=self.limit)


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str, which: str = "") -> str:
    """sha256 of a dataset file, memoised per (path, size, mtime) for this process; a DataError
    naming the file when it is missing, a directory or unreadable."""
    p = Path(path).expanduser().resolve()
    check_readable(p, which)
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(p)
    return _DIGESTS[key]


def data_view(data: Data, which: str) -> DataView:
    """The view of one dataset (`data.<which>`) of the config's `data` section."""
    spec = getattr(data, which)
    builtin, hub = spec.source.startswith("builtin:"), spec.source.startswith("hf://")
    return DataView(which=which, source=spec.source,
                    layout=None if builtin else spec.layout, split=spec.split if hub else None,
                    limit=None if builtin else spec.limit,
                    max_length=data.max_length, max_bad_fraction=data.max_bad_fraction,
                    numbers=data.numbers if builtin else None,
                    ranked=data.ranked if spec.source == "builtin:numbers-ranked" else None,
                    sha256=None if builtin or hub else file_digest(spec.source, which))


def _refuse(bad: BadRows, view: DataView, n_usable: int) -> None:
    """The stages' verdict on a read: no usable row, or too many bad rows → DataError."""
    if not n_usable:
        raise DataError(bad.no_rows_message())
    bad.check(view.max_bad_fraction)


def _finish(bad: BadRows, view: DataView, examples: list[dict]) -> list[dict]:
    if bad.count:
        print(bad.summary())
    _refuse(bad, view, len(examples))
    return examples


def validate_dataset(view: DataView) -> str:
    """Read and check one dataset without tokenising; return a one-line summary.

    Applies what `sft_examples` / `pair_examples` apply — whole-file checks (readable, UTF-8, JSON,
    layout fits `view.which`), the row checks, "no usable rows" and `max_bad_fraction` — except the
    token-length check (that needs the tokenizer, and runs when the stage reads the data). Raises
    `DataError` on anything the stage would refuse; returns e.g.
    `data.preferences: 1500 rows, pairs layout (3 skipped: 3 chosen == rejected (rows 4, 9, 12))`.
    Meant for the pipeline's preflight, which calls it for every dataset before the first stage.
    """
    rows, bad = read_dataset(view.spec(), view.which, view.numbers, view.ranked)  # as the stages read it
    _refuse(bad, view, len(rows))
    text = f"data.{view.which}: {len(rows)} row{'' if len(rows) == 1 else 's'}, {bad.layout} layout"
    if bad.count:
        text += f" ({bad.count} skipped: {bad.reasons_text(top=3)})"
    return text


def sft_examples(view: DataView, tok: Any) -> list[dict]:
    rows, bad = read_dataset(view.spec(), "sft", view.numbers, view.ranked)
    return _finish(bad, view, encode_rows(tok, rows, ["response"], view.max_length, bad))


def pair_examples(view: DataView, tok: Any) -> list[dict]:
    rows, bad = read_dataset(view.spec(), view.which, view.numbers, view.ranked)
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
