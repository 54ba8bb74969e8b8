"""Dataset readers: local JSONL / JSON / Parquet, the `datasets` hub, and the built-in numbers task.

Every reader returns normalised rows plus a `BadRows` report:
- SFT rows:        {"prompt": [messages], "response": str}
- preference rows: {"prompt": [messages], "chosen": str, "rejected": str} (+ "answer" for eval)

Layouts (auto-detected from the first row, or forced with `layout:`): `messages`,
`prompt_completion`, `pairs` (TRL plain), `conversational` (DPO-MIX-7K: chosen/rejected message
lists sharing every turn but the last), `scored` (HelpSteer2: one row per response, pairs formed
per prompt by helpfulness, ties dropped).

Files are UTF-8 (a leading byte-order mark is accepted, CRLF line endings too). Anything that makes
a whole file unusable — a directory or unreadable path, bytes that are not UTF-8, a `.json` file
that is not an array of rows, a `.parquet` file that is not Parquet, an empty file, invalid JSON on
every line, a layout that cannot be told or does not fit the dataset — raises `DataError` naming
the file (and the `data.<which>` entry), the line or row, and what to do. Single bad rows are
skipped and counted in `BadRows` (reason → row numbers; for JSONL the row number is the line
number); `BadRows.check` refuses more than `data.max_bad_fraction` of them, and
`BadRows.no_rows_message` says why nothing usable is left.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

Messages = list[dict[str, str]]

BOM = b"\xef\xbb\xbf"
# magic numbers of files that are sometimes given a data file's name by mistake
_MAGIC = {b"\x1f\x8b": "a gzip-compressed file: decompress it first (gunzip)",
          b"PK\x03\x04": "a zip archive: extract the data file from it first",
          b"PAR1": "a Parquet file: give it the .parquet suffix",
          b"\xff\xfe": "UTF-16 encoded text (little-endian byte-order mark): re-encode it as UTF-8, "
                       "e.g. `iconv -f utf-16 -t utf-8 IN > OUT`",
          b"\xfe\xff": "UTF-16 encoded text (big-endian byte-order mark): re-encode it as UTF-8, "
                       "e.g. `iconv -f utf-16 -t utf-8 IN > OUT`"}
_EXAMPLE = {"sft": '{"prompt": "…", "completion": "…"}',
            "preferences": '{"prompt": "…", "chosen": "…", "rejected": "…"}'}
_REQUIRED = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"),
             "pairs": ("prompt", "chosen", "rejected"), "conversational": ("chosen", "rejected"),
             "scored": ("prompt", "response", "helpfulness")}
_SFT_LAYOUTS = ("messages", "prompt_completion", "pairs", "conversational")
_PAIR_LAYOUTS = ("pairs", "conversational", "scored")


class DataError(ValueError):
    """A dataset cannot be used; the message names the file, the rows and the fix."""


def _entry(kind: str) -> str:
    """The config entry of a dataset read as `kind` (the kinds are the `data.*` section names)."""
    return f"data.{kind}" if kind else "the dataset"


def _rows_text(rows: list[int], n: int = 5) -> str:
    return ", ".join(map(str, rows[:n])) + (", …" if len(rows) > n else "")


@dataclass
class BadRows:
    """Rows skipped while reading one dataset: count, total and the first row numbers.

    `kind` is the `data.*` entry the dataset was read for, `layout` the layout it was read with,
    and `notes` explain losses that are not single rows (the scored layout's dropped ties)."""
    source: str
    total: int = 0
    reasons: dict[str, list[int]] = field(default_factory=dict)
    kind: str = ""
    layout: str = ""
    notes: list[str] = field(default_factory=list)

    def add(self, row: int, reason: str) -> None:
        self.reasons.setdefault(reason, []).append(row)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.reasons.values())

    def ranked(self) -> list[tuple[str, list[int]]]:
        """(reason, rows), the most frequent reason first."""
        return sorted(self.reasons.items(), key=lambda kv: -len(kv[1]))

    def reasons_text(self, top: int | None = None) -> str:
        ranked = self.ranked()
        parts = [f"{len(rows)} {reason} (rows {_rows_text(rows)})" for reason, rows in ranked[:top]]
        if top is not None and len(ranked) > top:
            parts.append(f"{sum(len(r) for _, r in ranked[top:])} more for other reasons")
        return "; ".join(parts)

    def summary(self) -> str:
        return f"{self.source}: skipped {self.count} of {self.total} rows: " + self.reasons_text()

    def _todo(self) -> str:
        reasons = " ".join(self.reasons)
        todo = []
        if "data.max_length" in reasons:
            todo.append("raise data.max_length or shorten the long rows")
        if "JSON" in reasons:
            todo.append("fix the lines that are not JSON objects")
        if self.layout:
            todo.append(f"check that the rows are in the {self.layout} layout (or set "
                        f"`{_entry(self.kind)}.layout`) and fix the rows named")
        else:
            todo.append("fix the rows named")
        return "; ".join(todo)

    def check(self, max_fraction: float) -> None:
        if self.total and self.count / self.total > max_fraction:
            raise DataError(f"{self.summary()} — more than data.max_bad_fraction = {max_fraction}"
                            f"{' for ' + _entry(self.kind) if self.kind else ''}: {self._todo()}, "
                            "or raise the threshold (data.max_bad_fraction)")

    def no_rows_message(self) -> str:
        """Why reading left no usable row, and what to do."""
        where = f"{self.source} ({_entry(self.kind)})" if self.kind else self.source
        why = list(self.notes)
        if self.count:
            lead = "every row was rejected" if self.count >= self.total else "the other rows were rejected"
            why.append(f"{lead}, most often because: {self.reasons_text(top=3)} — {self._todo()}")
        if not why:
            why.append("the dataset holds no rows — check the path, or regenerate the file")
        return f"{where}: no usable rows: " + "; ".join(why)


# ------------------------------------------------------------------ row checks

def _json_type(x: Any) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "a boolean"
    if isinstance(x, (int, float)):
        return "a number"
    if isinstance(x, str):
        return "a string"
    if isinstance(x, (list, tuple)):
        return "an array"
    if isinstance(x, dict):
        return "an object"
    return f"a {type(x).__name__}"


def _text_problem(raw: dict, key: str) -> str | None:
    """Why raw[key] is not a non-empty string, or None."""
    if key not in raw:
        return f"missing `{key}`"
    v = raw[key]
    if not isinstance(v, str):
        return f"`{key}` is {_json_type(v)}, not a string"
    if not v.strip():
        return f"`{key}` is empty"
    return None


def _messages_problem(x: Any, name: str) -> str | None:
    """Why x is not a non-empty list of {role, content} messages, or None."""
    if not isinstance(x, list):
        return f"`{name}` is {_json_type(x)}, not a list of {{role, content}} messages"
    if not x:
        return f"`{name}` is an empty list"
    for m in x:
        if not isinstance(m, dict):
            return f"a `{name}` message is {_json_type(m)}, not a {{role, content}} object"
        for part in ("role", "content"):
            if part not in m:
                return f"a `{name}` message has no `{part}`"
            if not isinstance(m[part], str):
                return f"a `{name}` message's `{part}` is {_json_type(m[part])}, not a string"
    return None


def _nonempty(x: Any) -> bool:
    return isinstance(x, str) and x.strip() != ""


def _prompt_problem(raw: dict) -> str | None:
    p = raw.get("prompt")
    if isinstance(p, list):
        return _messages_problem(p, "prompt")
    return _text_problem(raw, "prompt")


def _user(prompt: Any) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def detect_layout(row: dict, kind: str, source: str = "", row_number: int | None = None) -> str:
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if {"chosen", "rejected"} <= keys:
        return "conversational" if isinstance(row["chosen"], list) else "pairs"
    if {"prompt", "response", "helpfulness"} <= keys:
        return "scored"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    where = f"{source}: " if source else ""
    if row_number is not None:
        where += f"row {row_number}: "
    fits = _SFT_LAYOUTS if kind == "sft" else _PAIR_LAYOUTS
    near = max(fits, key=lambda lay: len(keys & set(_REQUIRED[lay])))
    hint = ""
    if keys & set(_REQUIRED[near]):
        missing = ", ".join(f"`{k}`" for k in _REQUIRED[near] if k not in keys)
        hint = f" (closest: {near}, which also needs {missing})"
    if "conversations" in keys:
        hint += ("; ShareGPT-style `conversations` (from/value) are not read: convert them to "
                 "`messages` with role/content")
    raise DataError(f"{where}cannot tell the layout of a {kind} row with keys {sorted(keys)}{hint}; "
                    "expected messages | prompt+completion | prompt+chosen+rejected | chosen/rejected "
                    "message lists | prompt+response+helpfulness — rename the fields, or set "
                    f"`{_entry(kind)}.layout`")


def _sft_row(raw: dict, layout: str) -> dict | str:
    if layout == "messages":
        if "messages" not in raw:
            return "missing `messages`"
        msgs = raw["messages"]
        problem = _messages_problem(msgs, "messages")
        if problem:
            return problem
        if msgs[-1]["role"] != "assistant" or not _nonempty(msgs[-1]["content"]):
            return "last message is not a non-empty assistant turn"
        if len(msgs) < 2:
            return "no prompt turn before the assistant turn"
        return {"prompt": msgs[:-1], "response": msgs[-1]["content"]}
    if layout == "prompt_completion":
        problem = _prompt_problem(raw) or _text_problem(raw, "completion")
        if problem:
            return problem
        return {"prompt": _user(raw["prompt"]), "response": raw["completion"]}
    if layout in ("pairs", "conversational"):  # SFT on the chosen response
        pair = _pair_row(raw, layout)
        return pair if isinstance(pair, str) else {"prompt": pair["prompt"], "response": pair["chosen"]}
    raise DataError(f"layout {layout!r} cannot be used as SFT data; use messages or prompt_completion")


def _pair_row(raw: dict, layout: str) -> dict | str:
    if layout == "pairs":
        problem = _prompt_problem(raw) or _text_problem(raw, "chosen") or _text_problem(raw, "rejected")
        if problem:
            return problem
        prompt, c, r = _user(raw["prompt"]), raw["chosen"], raw["rejected"]
    elif layout == "conversational":
        for key in ("chosen", "rejected"):
            if key not in raw:
                return f"missing `{key}`"
            problem = _messages_problem(raw[key], key)
            if problem:
                return problem
        c, r = raw["chosen"], raw["rejected"]
        if raw.get("prompt") is not None:  # TRL conversational: prompt separate
            problem = _prompt_problem(raw)
            if problem:
                return problem
            prompt = _user(raw["prompt"])
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
        problem = _text_problem(raw, "prompt") or _text_problem(raw, "response")
        h = raw.get("helpfulness")
        if problem is None:
            if "helpfulness" not in raw:
                problem = "missing `helpfulness`"
            elif isinstance(h, bool) or not isinstance(h, (int, float)):
                problem = f"`helpfulness` is {_json_type(h)}, not a number"
            elif not math.isfinite(h):
                problem = "`helpfulness` is not a finite number"
        if problem:
            bad.add(i, problem)
            continue
        groups.setdefault(raw["prompt"], []).append((i, raw["response"], float(h)))
    pairs, ties, same = [], 0, 0
    for prompt, items in groups.items():
        for (_, ra, ha), (_, rb, hb) in itertools.combinations(items, 2):
            if ha == hb or ra == rb:  # ties dropped (ADPA's HelpSteer2 recipe)
                ties += ha == hb
                same += ha != hb
                continue
            chosen, rejected = (ra, rb) if ha > hb else (rb, ra)
            pairs.append({"prompt": _user(prompt), "chosen": chosen, "rejected": rejected})
    if groups and not pairs:
        n_rows = sum(len(v) for v in groups.values())
        if ties + same == 0:
            bad.notes.append(f"every prompt has a single response ({len(groups)} prompts, {n_rows} "
                             "rows), so no pair can be formed — the scored layout pairs the "
                             "responses to the same prompt; give several rated responses per prompt, "
                             "or explicit prompt+chosen+rejected rows")
        else:
            bad.notes.append(f"all {ties + same} candidate pairs are ties: every response pair for "
                             f"each prompt ({len(groups)} prompts, {n_rows} rows) has equal "
                             "helpfulness" + (" or identical text" if same else "") + ", and ties "
                             "are dropped — give responses with different helpfulness scores, or "
                             "explicit prompt+chosen+rejected rows")
    return pairs


# ------------------------------------------------------------------ files

@dataclass
class _Invalid:
    """A line that is not valid JSON (kept as a row so it is counted and numbered)."""
    error: str
    head: str
    cut_short: bool = False


def _open(path: Path, kind: str):
    """Open a local data file for binary reading, or a DataError saying what is wrong with it."""
    entry = _entry(kind)
    try:
        if path.is_dir():
            raise IsADirectoryError(path)
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path} ({entry}.source): file not found — check the path (relative paths "
                        f"are read from {os.getcwd()})") from None
    except IsADirectoryError:
        inside = []
        if os.access(path, os.R_OK | os.X_OK):
            inside = sorted(p.name for p in path.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))[:5]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise DataError(f"{path} ({entry}.source) is a directory, not a data file{hint} — set "
                        f"{entry}.source to one .jsonl / .json / .parquet file, or hf://{path} to "
                        "read the folder as a `datasets` dataset") from None
    except PermissionError:
        raise DataError(f"{path} ({entry}.source): permission denied — make the file readable by "
                        "the user running the pipeline (e.g. chmod a+r)") from None
    except OSError as exc:
        raise DataError(f"{path} ({entry}.source): cannot read it: {exc.strerror or exc} — check the "
                        "path and the file system") from None


def check_readable(path: str | Path, kind: str = "") -> None:
    """Raise a DataError naming `path` when it is missing, a directory or unreadable."""
    _open(Path(path).expanduser(), kind).close()


def _sniff(path: Path, head: bytes, kind: str) -> None:
    """Refuse a .jsonl / .json file whose first bytes say it is something else."""
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            raise DataError(f"{path} ({_entry(kind)}.source): this is {what}; the JSON readers need "
                            "UTF-8 text")


def _encoding_error(path: Path, kind: str, line: int, offset: int, raw_line: bytes, at: int) -> DataError:
    """The DataError for the first byte that is not UTF-8: file, line, byte offset, context, fix."""
    bad = raw_line[at:at + 1]
    before = raw_line[max(0, at - 30):at].decode("utf-8", errors="replace").lstrip("\ufeff")
    try:
        raw_line.decode("cp1252")
        todo = (f"it reads as Latin-1 / Windows-1252: re-encode it as UTF-8, e.g. `iconv -f cp1252 "
                f"-t utf-8 {path.name} > fixed{path.suffix}`")
    except UnicodeDecodeError:
        todo = ("find its encoding (`file -i`) and re-encode it as UTF-8 with iconv, or fix the "
                "damaged bytes")
    return DataError(f"{path} ({_entry(kind)}.source): line {line}: byte 0x{bad.hex()} at byte offset "
                     f"{offset} of the file is not valid UTF-8 (after {before!r}); data files must "
                     f"be UTF-8 — {todo}")


def _jsonl_rows(path: Path, kind: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value or _Invalid) for every non-blank line of a JSON-lines file."""
    with _open(path, kind) as fh:
        offset = 0
        for i, line in enumerate(fh, start=1):
            start = len(BOM) if i == 1 and line.startswith(BOM) else 0
            if i == 1:
                _sniff(path, line[:4], kind)
            try:
                text = line[start:].decode("utf-8")
            except UnicodeDecodeError as exc:
                at = start + exc.start  # within the line
                raise _encoding_error(path, kind, i, offset + at, line, at) from None
            offset += len(line)
            text = text.lstrip("\ufeff")  # a BOM at the start of concatenated files
            if not text.strip():
                continue
            if "\x00" in text:
                yield i, _Invalid("NUL bytes in the line (binary data, or UTF-16 text?)", text[:40])
                continue
            try:
                yield i, json.loads(text)
            except json.JSONDecodeError as exc:
                yield i, _Invalid(f"{exc.msg} at column {exc.colno}", text[:40].rstrip(),
                                  cut_short=not line.endswith(b"\n"))


def _json_rows(path: Path, kind: str) -> Iterator[tuple[int, Any]]:
    """Rows of a .json file holding one JSON array (a .json file of JSON lines is read as JSONL)."""
    with _open(path, kind) as fh:
        data = fh.read()
    _sniff(path, data[:4], kind)
    start = len(BOM) if data.startswith(BOM) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        pos = start + exc.start
        line_start = data.rfind(b"\n", 0, pos) + 1
        line_end = data.find(b"\n", pos)
        raise _encoding_error(path, kind, data.count(b"\n", 0, pos) + 1, pos,
                              data[line_start:line_end if line_end >= 0 else len(data)],
                              pos - line_start) from None
    if not text.strip():
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("["):
            raise DataError(f"{path} ({_entry(kind)}.source): invalid JSON at line {exc.lineno}, "
                            f"column {exc.colno}: {exc.msg} — the file starts a JSON array that does "
                            "not parse (cut short, or hand-edited?); fix or regenerate it") from None
        yield from _jsonl_rows(path, kind)  # JSON lines in a .json file
        return
    if isinstance(value, list):
        yield from enumerate(value, start=1)
        return
    hint = ""
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if lists:
            hint = f"; the rows seem to be under the key {lists[0]!r}: save that array as the file"
        elif value and all(isinstance(v, list) for v in value.values()):
            hint = "; it looks like columns (key → list of values): write one object per row"
        else:
            hint = f" with keys {sorted(value)[:8]}"
    raise DataError(f"{path} ({_entry(kind)}.source): expected a JSON array of rows, found "
                    f"{_json_type(value)}{hint} — a .json data file must hold `[{{…}}, {{…}}]`; "
                    "or write one JSON object per line in a .jsonl file")


def _parquet_rows(path: Path, kind: str) -> Iterator[tuple[int, Any]]:
    entry = _entry(kind)
    with _open(path, kind) as fh:
        head = fh.read(4)
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 4))
        tail = fh.read(4)
    if head != b"PAR1":
        looks = ""
        if head[:1] in (b"{", b"["):
            looks = "; it looks like JSON: give it the .jsonl (one object per line) or .json suffix"
        elif size == 0:
            looks = "; the file is empty (0 bytes)"
        raise DataError(f"{path} ({entry}.source): not a Parquet file (it starts with {head!r}, not "
                        f"the Parquet magic b'PAR1'){looks} — re-export it as Parquet, e.g. "
                        "`pandas.DataFrame.to_parquet`, or point the source at the right file")
    if tail != b"PAR1" or size < 12:
        raise DataError(f"{path} ({entry}.source): the Parquet file is cut short (no footer at its "
                        f"end, {size} bytes) — copy or export it again")
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(f"{path} ({entry}.source): not a readable Parquet file: {exc} — re-export "
                        "it, or check that it is complete") from exc
    yield from enumerate(table.to_pylist(), start=1)


def _iter_raw(source: str, split: str, kind: str = "") -> Iterator[tuple[int, Any]]:
    """(row number, raw row) from a local file or the hub; row numbers are 1-based (JSON lines:
    the line number). Lines that are not JSON come as `_Invalid`."""
    if source.startswith("hf://"):
        try:
            import datasets
        except ImportError as exc:  # pragma: no cover - datasets is a core dependency
            raise DataError("hf:// datasets need the `datasets` package") from exc
        try:
            ds = datasets.load_dataset(source.removeprefix("hf://"), split=split)
        except Exception as exc:
            raise DataError(f"cannot load {source} split {split!r} from the hub ({_entry(kind)}): "
                            f"{exc} — check the dataset id and `{_entry(kind)}.split`") from exc
        yield from enumerate(ds, start=1)
        return
    path = Path(source).expanduser()
    if path.suffix == ".parquet":
        yield from _parquet_rows(path, kind)
    elif path.suffix == ".json":
        yield from _json_rows(path, kind)
    else:
        yield from _jsonl_rows(path, kind)


def _no_rows(source: str, spec: Any, kind: str) -> DataError:
    """Why a source gave no rows at all."""
    where = f"{source} ({_entry(kind)}.source)"
    if source.startswith("hf://"):
        return DataError(f"{source} ({_entry(kind)}): split {spec.split!r} has no rows — check "
                         f"`{_entry(kind)}.split`")
    path = Path(source).expanduser()
    size = path.stat().st_size
    if size == 0:
        what = "the file is empty (0 bytes)"
    elif path.suffix == ".parquet":
        what = "the Parquet file has no rows"
    elif path.suffix == ".json" and path.read_bytes().removeprefix(BOM).strip() == b"[]":
        what = "the file holds an empty JSON array"
    else:
        what = f"the file holds only blank lines ({size} bytes)"
    return DataError(f"{where}: {what} — no rows to read; point the source at the right file, or "
                     "regenerate it")


def _no_objects(source: str, raws: list[tuple[int, Any]], kind: str) -> DataError:
    """Why no row of a source is a JSON object."""
    where = f"{source} ({_entry(kind)}.source)"
    example = _EXAMPLE["sft" if kind == "sft" else "preferences"]
    invalid = [(i, r) for i, r in raws if isinstance(r, _Invalid)]
    if len(invalid) == len(raws):
        i, first = invalid[0]
        lines = [i for i, _ in invalid]
        hint = ""
        if first.head.startswith("["):
            hint = " The file looks like one JSON array: give it the .json suffix."
        elif first.head.strip() == "{":
            hint = " The objects seem to span several lines: JSONL needs each object on one line."
        return DataError(f"{where}: invalid JSON on every line (lines {_rows_text(lines)}; line {i}: "
                         f"{first.error}, starts with {first.head!r}) — each line must be one JSON "
                         f"object, e.g. {example}.{hint}")
    others = [(i, r) for i, r in raws if not isinstance(r, _Invalid)]
    types = sorted({_json_type(r) for _, r in others})
    hint = ""
    if Path(source).suffix != ".json" and any(isinstance(r, list) and r and isinstance(r[0], dict)
                                              for _, r in others):
        hint = "; a line holding a JSON array of rows belongs in a .json file — give it that suffix"
    return DataError(f"{where}: no row is a JSON object: {_rows_are(others)} {' / '.join(types)}"
                     + (f", {_rows_are(invalid)} invalid JSON" if invalid else "")
                     + f" — each row must be an object with named fields, e.g. {example}{hint}")


def _rows_are(rows: list[tuple[int, Any]]) -> str:
    return f"row {rows[0][0]} is" if len(rows) == 1 else f"rows {_rows_text([i for i, _ in rows])} are"


def _not_object_reason(raw: Any) -> str:
    if isinstance(raw, _Invalid):
        if raw.cut_short:
            return "invalid JSON in the last line, which has no line end (file cut short?), not a JSON object"
        return "invalid JSON, not a JSON object"
    return f"{_json_type(raw)}, not a JSON object"


def _builtin_task(source: str, numbers: Any, ranked: Any) -> dict[str, list[dict]]:
    if source == "builtin:numbers":
        from distill_pipeline.data.toy import make_task

        return make_task(**numbers.model_dump())
    from distill_pipeline.data.ranked import ErrorModel, make_ranked_task

    sizes = numbers.model_dump(exclude={"noise"})
    return make_ranked_task(**sizes, demos=ErrorModel(**ranked.demos.model_dump()),
                            samples=ErrorModel(**ranked.samples.model_dump()))


def read_dataset(spec: Any, kind: str, numbers: Any = None, ranked: Any = None) -> tuple[list[dict], BadRows]:
    """Read the dataset of a `DataSpec` as `kind` ('sft', 'preferences', 'validation' or 'eval').
    `numbers` (config.NumbersTask) sizes a built-in task; `ranked` (config.RankedTask) sets the
    writers of `builtin:numbers-ranked`.

    Returns the usable rows (each with its 1-based `row` number) and the `BadRows` report; raises
    `DataError` when the source as a whole cannot be read (see the module docstring)."""
    if spec.source.startswith("builtin:"):
        task = _builtin_task(spec.source, numbers, ranked)
        raws = list(enumerate(task[kind], start=1))
        layout = "prompt_completion" if kind == "sft" else "pairs"
    else:
        source = spec.source
        raws = list(itertools.islice(_iter_raw(source, spec.split, kind), spec.limit or None))
        if not raws:
            raise _no_rows(source, spec, kind)
        first = next(((i, r) for i, r in raws if isinstance(r, dict)), None)
        if first is None:
            raise _no_objects(source, raws, kind)
        i, row = first
        if spec.layout != "auto":
            layout, how = spec.layout, f"set by `{_entry(kind)}.layout`"
        else:
            layout = detect_layout(row, kind, source, i)
            how = f"detected from the keys of row {i}: {sorted(row)}"
        if kind == "sft" and layout == "scored":
            raise DataError(f"{source}: scored layout cannot be used as SFT data ({_entry(kind)}; "
                            f"layout {how}): it rates responses rather than giving one target per "
                            "prompt — use a messages, prompt+completion or pairs file for data.sft")
        if kind != "sft" and layout not in _PAIR_LAYOUTS:
            raise DataError(f"{source}: {layout} layout cannot be used as preference data "
                            f"({_entry(kind)}; layout {how}): preference rows need a chosen and a "
                            "rejected response — give prompt+chosen+rejected, chosen/rejected "
                            "message lists, or prompt+response+helpfulness rows")
    bad = BadRows(source=spec.source, total=len(raws), kind=kind, layout=layout)
    good = [(i, r) for i, r in raws if isinstance(r, dict) or bad.add(i, _not_object_reason(r))]
    if layout == "scored":
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
