"""Dataset readers: local JSONL / Parquet, the `datasets` hub, and the built-in numbers task.

Every reader returns normalised rows plus a `BadRows` report:
- SFT rows:        {"prompt": [messages], "response": str}
- preference rows: {"prompt": [messages], "chosen": str, "rejected": str} (+ "answer" for eval)

Layouts (auto-detected from the first row, or forced with `layout:`): `messages`,
`prompt_completion`, `pairs` (TRL plain), `conversational` (DPO-MIX-7K: chosen/rejected message
lists sharing every turn but the last), `scored` (HelpSteer2: one row per response, pairs formed
per prompt by helpfulness, ties dropped).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

Messages = list[dict[str, str]]


class DataError(ValueError):
    """A dataset cannot be used; the message names the file, the rows and the fix."""


@dataclass
class BadRows:
    """Rows skipped while reading one dataset: count, total and the first row numbers."""
    source: str
    total: int = 0
    reasons: dict[str, list[int]] = field(default_factory=dict)

    def add(self, row: int, reason: str) -> None:
        self.reasons.setdefault(reason, []).append(row)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.reasons.values())

    def summary(self) -> str:
        parts = [f"{len(rows)} {reason} (rows {', '.join(map(str, rows[:5]))}"
                 f"{', …' if len(rows) > 5 else ''})" for reason, rows in self.reasons.items()]
        return f"{self.source}: skipped {self.count} of {self.total} rows: " + "; ".join(parts)

    def check(self, max_fraction: float) -> None:
        if self.total and self.count / self.total > max_fraction:
            raise DataError(f"{self.summary()} — more than data.max_bad_fraction = {max_fraction}; "
                            "fix the file, pick the right `layout:`, or raise the threshold")


def _user(prompt: Any) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _is_messages(x: Any) -> bool:
    return (isinstance(x, list) and len(x) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in x))


def _nonempty(x: Any) -> bool:
    return isinstance(x, str) and x.strip() != ""


def detect_layout(row: dict, kind: str) -> str:
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if {"chosen", "rejected"} <= keys:
        return "conversational" if isinstance(row["chosen"], list) else "pairs"
    if {"prompt", "response", "helpfulness"} <= keys:
        return "scored"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    raise DataError(f"cannot tell the layout of a {kind} row with keys {sorted(keys)}; expected "
                    "messages | prompt+completion | prompt+chosen+rejected | chosen/rejected "
                    "message lists | prompt+response+helpfulness — or set `layout:`")


def _sft_row(raw: dict, layout: str) -> dict | str:
    if layout == "messages":
        msgs = raw.get("messages")
        if not _is_messages(msgs):
            return "messages is not a list of {role, content}"
        if msgs[-1]["role"] != "assistant" or not _nonempty(msgs[-1]["content"]):
            return "last message is not a non-empty assistant turn"
        if len(msgs) < 2:
            return "no prompt turn before the assistant turn"
        return {"prompt": msgs[:-1], "response": msgs[-1]["content"]}
    if layout == "prompt_completion":
        p, c = raw.get("prompt"), raw.get("completion")
        if not (_nonempty(p) or _is_messages(p)):
            return "missing or empty prompt"
        if not _nonempty(c):
            return "missing or empty completion"
        return {"prompt": _user(p), "response": c}
    if layout in ("pairs", "conversational"):  # SFT on the chosen response
        pair = _pair_row(raw, layout)
        return pair if isinstance(pair, str) else {"prompt": pair["prompt"], "response": pair["chosen"]}
    raise DataError(f"layout {layout!r} cannot be used as SFT data; use messages or prompt_completion")


def _pair_row(raw: dict, layout: str) -> dict | str:
    if layout == "pairs":
        p, c, r = raw.get("prompt"), raw.get("chosen"), raw.get("rejected")
        if not (_nonempty(p) or _is_messages(p)):
            return "missing or empty prompt"
        if not (_nonempty(c) and _nonempty(r)):
            return "missing, empty or non-string chosen/rejected"
        prompt = _user(p)
    elif layout == "conversational":
        c, r = raw.get("chosen"), raw.get("rejected")
        if not (_is_messages(c) and _is_messages(r)):
            return "chosen/rejected are not message lists"
        if "prompt" in raw and raw["prompt"] is not None:  # TRL conversational: prompt separate
            prompt = _user(raw["prompt"])
            if not (_is_messages(prompt) or _nonempty(raw["prompt"])):
                return "missing or empty prompt"
        else:
            if c[:-1] != r[:-1]:
                return "chosen and rejected do not share the conversation before the last turn"
            prompt = c[:-1]
            if not prompt:
                return "no prompt turn before the assistant turn"
        if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            return "last turn is not an assistant turn"
        c, r = c[-1]["content"], r[-1]["content"]
        if not (_nonempty(c) and _nonempty(r)):
            return "empty chosen/rejected response"
    else:
        raise DataError(f"layout {layout!r} cannot be used as preference data")
    if c == r:
        return "chosen == rejected"
    row = {"prompt": prompt, "chosen": c, "rejected": r}
    if "answer" in raw:
        row["answer"] = str(raw["answer"])
    return row


def _scored_pairs(raws: list[tuple[int, dict]], bad: BadRows) -> list[dict]:
    """HelpSteer2: group responses by prompt, pair every two with different helpfulness."""
    groups: dict[str, list[tuple[int, str, float]]] = {}
    for i, raw in raws:
        p, resp, h = raw.get("prompt"), raw.get("response"), raw.get("helpfulness")
        if not (_nonempty(p) and _nonempty(resp)) or isinstance(h, bool) or not isinstance(h, (int, float)):
            bad.add(i, "missing prompt/response or non-numeric helpfulness")
            continue
        groups.setdefault(p, []).append((i, resp, float(h)))
    pairs = []
    for prompt, items in groups.items():
        for (_, ra, ha), (_, rb, hb) in itertools.combinations(items, 2):
            if ha == hb or ra == rb:
                continue  # ties dropped (ADPA's HelpSteer2 recipe)
            chosen, rejected = (ra, rb) if ha > hb else (rb, ra)
            pairs.append({"prompt": _user(prompt), "chosen": chosen, "rejected": rejected})
    return pairs


def _iter_raw(source: str, split: str) -> Iterator[tuple[int, Any]]:
    """(row number, raw row) from a local file or the hub; row numbers are 1-based."""
    if source.startswith("hf://"):
        try:
            import datasets
        except ImportError as exc:  # pragma: no cover - datasets is a core dependency
            raise DataError("hf:// datasets need the `datasets` package") from exc
        try:
            ds = datasets.load_dataset(source.removeprefix("hf://"), split=split)
        except Exception as exc:
            raise DataError(f"cannot load {source} split {split!r} from the hub: {exc}") from exc
        yield from enumerate(ds, start=1)
        return
    path = Path(source).expanduser()
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:
            raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
        yield from enumerate(table.to_pylist(), start=1)
        return
    if path.suffix == ".json":  # one JSON array of rows (a .json file of JSON lines falls through)
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            rows = None
        if isinstance(rows, list):
            yield from enumerate(rows, start=1)
            return
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError:
                yield i, None


def read_dataset(spec: Any, kind: str, numbers: Any = None) -> tuple[list[dict], BadRows]:
    """Read the dataset of a `DataSpec` as `kind` ('sft', 'preferences', 'validation' or 'eval')."""
    if spec.source == "builtin:numbers":
        from distill_pipeline.data.toy import make_task

        task = make_task(**numbers.model_dump())
        raws = list(enumerate(task[kind], start=1))
        layout = "prompt_completion" if kind == "sft" else "pairs"
    else:
        raws = list(_iter_raw(spec.source, spec.split))
        if spec.limit:
            raws = raws[:spec.limit]
        first = next((r for _, r in raws if isinstance(r, dict)), None)
        if first is None:
            raise DataError(f"{spec.source}: no readable rows")
        layout = spec.layout if spec.layout != "auto" else detect_layout(first, kind)
    bad = BadRows(source=spec.source, total=len(raws))
    good = [(i, r) for i, r in raws if isinstance(r, dict) or bad.add(i, "not a JSON object")]
    if layout == "scored":
        if kind == "sft":
            raise DataError(f"{spec.source}: scored layout cannot be used as SFT data")
        rows = _scored_pairs(good, bad)
    else:
        rows = []
        parse = _sft_row if kind == "sft" else _pair_row
        for i, raw in good:
            out = parse(raw, layout)
            if isinstance(out, str):
                bad.add(i, out)
            else:
                out["row"] = i
                rows.append(out)
    return rows, bad
