"""Datasets as the stages use them: read, report bad rows, tokenise.

`sft_examples` and `pair_examples` take a node's data view (`{"spec", "numbers", "max_length",
"max_bad_fraction"}`) and a tokenizer and return tokenised rows; skipped rows are printed as one
line (count + first row numbers) and refused above `max_bad_fraction`.
"""
from __future__ import annotations

from typing import Any

from distill_pipeline.data.readers import BadRows, DataError, read_dataset
from distill_pipeline.data.tokenize import encode_rows

__all__ = ["BadRows", "DataError", "sft_examples", "pair_examples"]


def _finish(bad: BadRows, view: dict, examples: list[dict]) -> list[dict]:
    if bad.count:
        print(bad.summary())
    bad.check(view["max_bad_fraction"])
    if not examples:
        raise DataError(f"{bad.source}: no usable rows")
    return examples


def sft_examples(view: dict, tok: Any) -> list[dict]:
    rows, bad = read_dataset(view["spec"], "sft", view.get("numbers"))
    return _finish(bad, view, encode_rows(tok, rows, ["response"], view["max_length"], bad))


def pair_examples(view: dict, tok: Any, kind: str = "preferences") -> list[dict]:
    rows, bad = read_dataset(view["spec"], kind, view.get("numbers"))
    return _finish(bad, view, encode_rows(tok, rows, ["chosen", "rejected"], view["max_length"], bad))


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
