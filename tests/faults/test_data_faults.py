"""Data-file faults a user hits: every one is a `DataError` saying what is wrong, where (file,
`data.*` entry, line/row/byte) and what to do — never a bare UnicodeDecodeError, JSONDecodeError,
IsADirectoryError, PermissionError, ArrowInvalid or pydantic ValidationError. The accepted cases
(BOM, CRLF, a huge line, …) load normally. Everything goes through `read_dataset` /
`validate_dataset` (the preflight's entry point), so no tokenizer is needed except in one test.
"""
from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_pipeline.data import DataView, file_digest, validate_dataset
from distill_pipeline.data import readers
from distill_pipeline.data.readers import DataError, read_dataset
from distill_pipeline.config import DataSpec, NumbersTask


def J(**row) -> str:
    return json.dumps(row, ensure_ascii=False)


def pair(prompt="p", chosen="good", rejected="bad", **more) -> str:
    return J(prompt=prompt, chosen=chosen, rejected=rejected, **more)


def msgs(*turns) -> list[dict]:
    return [{"role": r, "content": c} for r, c in turns]


PAIRS = "".join(pair(prompt=f"p{i}") + "\n" for i in range(20))
SFT = "".join(J(prompt=f"p{i}", completion="c") + "\n" for i in range(20))


def parquet_bytes(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def view(path: Path | str, which: str = "preferences", layout: str | None = None,
         max_bad_fraction: float = 0.05, limit: int | None = None) -> DataView:
    return DataView(which=which, source=str(path), layout=layout, limit=limit, max_length=64,
                    max_bad_fraction=max_bad_fraction)


def put(tmp_path: Path, name: str, content: bytes | str | None) -> Path:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def first_bad_byte(data: bytes) -> int:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start
    raise AssertionError("the case has no invalid UTF-8")


# ----------------------------------------------------------------------------- faults
# (id, file name, content, which, extra view options, words the message must contain)
# "{off}" in a word is replaced by the byte offset of the first byte that is not UTF-8.

LATIN1 = (pair() + "\n" + pair(prompt="café au lait") + "\n").encode("latin-1")
LATE_BAD = (PAIRS * 30).encode() + b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}\n'

FAULTS = [
    # encodings
    ("latin1-jsonl", "d.jsonl", LATIN1, "preferences", {},
     ["not valid UTF-8", "line 2", "byte offset {off}", "0xe9", "caf", "re-encode it as UTF-8", "iconv"]),
    ("latin1-json-array", "d.json", b"[\n" + LATIN1.replace(b"}\n{", b"},\n{") + b"]",
     "preferences", {}, ["not valid UTF-8", "line 3", "byte offset {off}", "re-encode it as UTF-8"]),
    ("bad-byte-on-line-601", "d.jsonl", LATE_BAD, "preferences", {},
     ["not valid UTF-8", "line 601", "byte offset {off}", "0xff"]),
    ("bom-then-latin1", "d.jsonl", b"\xef\xbb\xbf" + pair(prompt="é").encode("latin-1"), "sft", {},
     ["not valid UTF-8", "line 1", "byte offset {off}", "re-encode"]),
    ("latin1-sft-messages", "d.jsonl", J(messages=msgs(("user", "Grüße"), ("assistant", "x"))).encode("cp1252"),
     "sft", {}, ["not valid UTF-8", "line 1", "byte offset {off}", "Windows-1252"]),
    ("utf16", "d.jsonl", (PAIRS[:200]).encode("utf-16"), "preferences", {},
     ["UTF-16", "re-encode it as UTF-8", "iconv"]),
    ("gzip-named-jsonl", "d.jsonl", gzip.compress(PAIRS.encode()), "preferences", {},
     ["gzip-compressed", "decompress it"]),
    # paths
    ("directory", "d.jsonl/", None, "eval", {},
     ["is a directory, not a data file", "data.eval.source", "one .jsonl / .json / .parquet file"]),
    ("vanished-file", "gone.jsonl", None, "sft", {}, ["file not found", "check the path"]),
    # whole files that hold no rows
    ("empty-jsonl", "d.jsonl", b"", "preferences", {},
     ["the file is empty (0 bytes)", "no rows to read", "point the source at the right file"]),
    ("blank-lines-only", "d.jsonl", "\n  \n\r\n", "sft", {}, ["only blank lines", "no rows to read"]),
    ("empty-json-array", "d.json", "[]\n", "preferences", {}, ["empty JSON array", "no rows to read"]),
    ("json-object-not-array", "d.json", json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}, indent=2),
     "preferences", {}, ["expected a JSON array of rows, found an object", "must hold `[{…}, {…}]`"]),
    ("json-object-wrapping-rows", "d.json", json.dumps({"version": 1, "data": [{"prompt": "p"}]}),
     "preferences", {}, ["expected a JSON array of rows, found an object", "under the key 'data'"]),
    ("json-columns", "d.json", json.dumps({"prompt": ["a", "b"], "chosen": ["x", "y"]}),
     "preferences", {}, ["found an object", "looks like columns", "one object per row"]),
    ("json-scalar", "d.json", '"hello"', "sft", {}, ["expected a JSON array of rows, found a string"]),
    ("json-array-cut-short", "d.json", "[" + pair() + ",\n" + pair()[:25], "preferences", {},
     ["invalid JSON at line 2", "cut short", "fix or regenerate it"]),
    ("invalid-json-every-line", "d.jsonl", "{not json\n{'prompt': 'p'}\nprompt: p\n", "preferences", {},
     ["invalid JSON on every line", "lines 1, 2, 3", "each line must be one JSON object"]),
    ("csv-named-jsonl", "d.jsonl", "prompt,completion\nhi,hello\n", "sft", {},
     ["invalid JSON on every line", "starts with 'prompt,completion'", '"completion"']),
    ("pretty-printed-jsonl", "d.jsonl", json.dumps({"prompt": "p", "completion": "c"}, indent=2), "sft", {},
     ["invalid JSON on every line", "span several lines", "each object on one line"]),
    ("pretty-json-array-named-jsonl", "d.jsonl", json.dumps([{"prompt": "p", "completion": "c"}], indent=1),
     "sft", {}, ["invalid JSON on every line", "give it the .json suffix"]),
    ("one-line-json-array-named-jsonl", "d.jsonl", json.dumps([{"prompt": "p", "completion": "c"}]),
     "sft", {}, ["no row is a JSON object", "an array", "give it that suffix"]),
    ("rows-are-arrays", "d.jsonl", '["p", "good", "bad"]\n["q", "good", "bad"]\n', "preferences", {},
     ["no row is a JSON object", "rows 1, 2", "object with named fields"]),
    # Parquet
    ("parquet-that-is-json", "d.parquet", PAIRS, "preferences", {},
     ["not a Parquet file", "looks like JSON", ".jsonl"]),
    ("parquet-that-is-text", "d.parquet", "hello world, not parquet", "preferences", {},
     ["not a Parquet file", "re-export it as Parquet"]),
    ("parquet-empty-file", "d.parquet", b"", "preferences", {}, ["not a Parquet file", "empty (0 bytes)"]),
    ("parquet-cut-short", "d.parquet", parquet_bytes([json.loads(pair())] * 50)[:-30], "preferences", {},
     ["cut short", "export it again"]),
    ("parquet-zero-rows", "d.parquet", parquet_bytes([]), "preferences", {},
     ["has no rows", "point the source at the right file"]),
    # layouts
    ("unknown-keys", "d.jsonl", J(text="hello") + "\n", "sft", {},
     ["cannot tell the layout", "row 1", "['text']", "rename the fields, or set `data.sft.layout`"]),
    ("unknown-keys-after-a-bad-line", "d.jsonl", "{oops\n" + J(question="q", answer="a") + "\n", "sft", {},
     ["cannot tell the layout", "row 2", "set `data.sft.layout`"]),
    ("prompt-response-without-helpfulness", "d.jsonl", J(prompt="p", response="r") + "\n", "sft", {},
     ["cannot tell the layout", "closest: prompt_completion", "`completion`"]),
    ("sharegpt", "d.jsonl", J(conversations=[{"from": "human", "value": "hi"}]) + "\n", "sft", {},
     ["cannot tell the layout", "ShareGPT", "convert them to `messages`"]),
    ("sft-file-as-preferences", "d.jsonl", J(messages=msgs(("user", "a"), ("assistant", "b"))) + "\n",
     "preferences", {}, ["messages layout cannot be used as preference data", "data.preferences",
                         "row 1", "give prompt+chosen+rejected"]),
    ("completion-file-as-eval", "d.jsonl", SFT, "eval", {},
     ["prompt_completion layout cannot be used as preference data", "data.eval"]),
    ("scored-as-sft", "d.jsonl", J(prompt="p", response="r", helpfulness=3) + "\n", "sft", {},
     ["scored layout cannot be used as SFT data", "data.sft", "use a messages, prompt+completion or pairs file"]),
    ("forced-wrong-layout", "d.jsonl", J(messages=msgs(("user", "a"), ("assistant", "b"))) + "\n", "sft",
     {"layout": "prompt_completion"}, ["no usable rows", "missing `prompt`", "prompt_completion layout",
                                       "`data.sft.layout`"]),
    # scored layout
    ("scored-all-ties", "d.jsonl", "".join(J(prompt=f"p{i // 3}", response=f"r{i}", helpfulness=2) + "\n"
                                           for i in range(9)), "preferences", {},
     ["no usable rows", "ties", "equal helpfulness", "3 prompts", "different helpfulness scores"]),
    ("scored-one-response-per-prompt", "d.jsonl", "".join(J(prompt=f"p{i}", response="r", helpfulness=i) + "\n"
                                                          for i in range(4)), "preferences", {},
     ["no usable rows", "single response", "several rated responses per prompt"]),
    ("scored-nan-helpfulness", "d.parquet", parquet_bytes([{"prompt": "p", "response": r, "helpfulness": float("nan")}
                                                           for r in "abc"]), "preferences", {},
     ["every row was rejected", "not a finite number", "rows 1, 2, 3"]),
    ("scored-string-helpfulness", "d.jsonl", "".join(J(prompt="p", response=r, helpfulness="4") + "\n"
                                                     for r in "ab"), "preferences", {},
     ["`helpfulness` is a string, not a number", "rows 1, 2"]),
    # rows
    ("null-fields", "d.jsonl", pair(chosen=None) + "\n" + J(prompt=None, chosen="a", rejected="b") + "\n",
     "preferences", {}, ["no usable rows", "every row was rejected", "`chosen` is null, not a string (rows 1)",
                         "`prompt` is null", "fix the rows named"]),
    ("numbers-for-strings", "d.jsonl", "".join(J(prompt="p", completion=i) + "\n" for i in range(3)), "sft", {},
     ["`completion` is a number, not a string", "rows 1, 2, 3"]),
    ("messages-missing-roles", "d.jsonl", J(messages=[{"content": "hi"}, {"content": "yo"}]) + "\n", "sft", {},
     ["no usable rows", "has no `role`", "rows 1", "messages layout"]),
    ("messages-end-on-user", "d.jsonl", J(messages=msgs(("user", "a"), ("assistant", "b"), ("user", "c"))) + "\n",
     "sft", {}, ["last message is not a non-empty assistant turn"]),
    ("conversational-different-histories", "d.jsonl",
     J(chosen=msgs(("user", "a"), ("assistant", "x")), rejected=msgs(("user", "b"), ("assistant", "y"))) + "\n",
     "preferences", {}, ["do not share the conversation before the last turn", "conversational layout"]),
    ("chosen-equals-rejected", "d.jsonl", "".join(pair(prompt=f"p{i}", chosen="same", rejected="same") + "\n"
                                                  for i in range(3)), "validation", {},
     ["no usable rows", "chosen == rejected", "data.validation"]),
    ("too-many-bad-rows", "d.jsonl", PAIRS + "".join(pair(chosen="") + "\n" for _ in range(3)), "preferences", {},
     ["skipped 3 of 23 rows", "`chosen` is empty (rows 21, 22, 23)", "more than data.max_bad_fraction = 0.05",
      "raise the threshold"]),
    ("truncated-last-line-over-threshold", "d.jsonl", SFT[:-20], "sft", {"max_bad_fraction": 0.0},
     ["rows 20", "no line end (file cut short?)", "more than data.max_bad_fraction = 0.0"]),
]


@pytest.mark.parametrize("name, content, which, opts, words",
                         [pytest.param(*case[1:], id=case[0]) for case in FAULTS])
def test_fault_is_a_clear_data_error(tmp_path, name, content, which, opts, words):
    if name.endswith("/"):
        path = tmp_path / name.rstrip("/")
        path.mkdir()
        (path / "train.jsonl").write_text(PAIRS)
    else:
        path = put(tmp_path, name, content)
    with pytest.raises(DataError) as info:
        validate_dataset(view(path, which, **opts))
    assert type(info.value) is DataError
    msg = str(info.value)
    assert str(path) in msg, msg                 # where: the file
    assert f"data.{which}" in msg, msg            # … and the config entry
    off = first_bad_byte(content) if isinstance(content, bytes) and "byte offset {off}" in words else None
    for word in words:
        assert word.replace("{off}", str(off)) in msg, f"{word!r} not in: {msg}"
    assert "Traceback" not in msg


def test_directory_lists_the_data_files_inside(tmp_path):
    (tmp_path / "prefs").mkdir()
    (tmp_path / "prefs" / "train.jsonl").write_text(PAIRS)
    with pytest.raises(DataError, match=r"is a directory.*\(it holds train.jsonl\)"):
        read_dataset(DataSpec.model_construct(source=str(tmp_path / "prefs"), layout="auto",
                                              split="train", limit=None), "preferences")


def test_unreadable_file(tmp_path, monkeypatch):
    path = put(tmp_path, "d.jsonl", PAIRS)
    if os.geteuid() == 0:  # root reads anything: make the reader's open() fail as it would
        def denied(*a, **k):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(readers, "open", denied, raising=False)
    else:
        path.chmod(0)
    try:
        for run in (lambda: validate_dataset(view(path)), lambda: file_digest(str(path), "preferences")):
            with pytest.raises(DataError) as info:
                run()
            msg = str(info.value)
            assert str(path) in msg and "permission denied" in msg and "chmod a+r" in msg, msg
    finally:
        path.chmod(0o644)


def test_file_digest_of_a_directory_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="is a directory, not a data file"):
        file_digest(str(tmp_path), "sft")


def test_encoding_error_is_not_a_unicode_error(tmp_path):
    with pytest.raises(DataError) as info:
        read_dataset(DataSpec(source=str(put(tmp_path, "d.jsonl", LATIN1))), "preferences")
    assert not isinstance(info.value, UnicodeError)
    assert info.value.__cause__ is None and info.value.__suppress_context__


# ----------------------------------------------------------------------------- accepted

BOM = b"\xef\xbb\xbf"
BIG = "x" * 3_000_000

ACCEPTED = [
    # (id, file name, content, which, rows, bad rows, {row index: {field: value}, "limit": n})
    ("bom-jsonl", "d.jsonl", BOM + PAIRS.encode(), "preferences", 20, 0, {0: {"chosen": "good", "row": 1}}),
    ("bom-crlf-jsonl", "d.jsonl", BOM + PAIRS.replace("\n", "\r\n").encode(), "preferences", 20, 0,
     {0: {"prompt": [{"role": "user", "content": "p0"}]}, 19: {"rejected": "bad"}}),
    ("crlf-sft", "d.jsonl", SFT.replace("\n", "\r\n"), "sft", 20, 0, {0: {"response": "c"}}),
    ("bom-json-array", "d.json", BOM + json.dumps([json.loads(pair())] * 3).encode(), "preferences", 3, 0, {}),
    ("bom-inside-a-string-is-kept", "d.jsonl", BOM + J(prompt="\ufeffp", completion="c").encode(), "sft",
     1, 0, {0: {"prompt": [{"role": "user", "content": "\ufeffp"}], "response": "c"}}),
    ("bom-at-each-concatenated-part", "d.jsonl", BOM + PAIRS.encode() + BOM + PAIRS.encode(), "preferences",
     40, 0, {}),
    ("huge-single-line", "d.jsonl", pair(prompt=BIG) + "\n", "preferences", 1, 0,
     {0: {"prompt": [{"role": "user", "content": BIG}]}}),
    ("last-line-without-newline", "d.jsonl", PAIRS.rstrip("\n"), "preferences", 20, 0, {}),
    ("blank-lines-keep-line-numbers", "d.jsonl", "\n" + pair() + "\n\n\n" + pair(prompt="q") + "\n",
     "preferences", 2, 0, {0: {"row": 2}, 1: {"row": 5}}),
    ("non-ascii-utf8", "d.jsonl", pair(prompt="日本語 🙂", chosen="café", rejected="naïve") + "\n",
     "preferences", 1, 0, {0: {"chosen": "café"}}),
    ("json-lines-in-a-json-file", "d.json", PAIRS, "preferences", 20, 0, {}),
    ("truncated-last-line-under-threshold", "d.jsonl", PAIRS * 2 + pair()[:30], "preferences", 40, 1, {}),
    ("prompt-as-messages", "d.jsonl", J(prompt=msgs(("system", "s"), ("user", "u")), chosen="a", rejected="b"),
     "preferences", 1, 0, {0: {"prompt": msgs(("system", "s"), ("user", "u"))}}),
    ("eval-answer-kept", "d.jsonl", pair(answer=42) + "\n", "eval", 1, 0, {0: {"answer": "42"}}),
    ("limit-stops-before-a-bad-byte", "d.jsonl", LATE_BAD, "preferences", 20, 0, {"limit": 20}),
]


@pytest.mark.parametrize("name, content, which, n, n_bad, expect",
                         [pytest.param(*case[1:], id=case[0]) for case in ACCEPTED])
def test_accepted_files_load(tmp_path, name, content, which, n, n_bad, expect):
    path = put(tmp_path, name, content)
    expect = dict(expect)
    limit = expect.pop("limit", None)
    kind = "sft" if which == "sft" else which
    rows, bad = read_dataset(DataSpec(source=str(path), limit=limit), kind)
    assert len(rows) == n and bad.count == n_bad, bad.summary()
    for i, fields in expect.items():
        assert {k: rows[i][k] for k in fields} == fields
    summary = validate_dataset(view(path, which, limit=limit, max_bad_fraction=0.5))
    assert summary.startswith(f"data.{which}: {n} row")


def test_truncated_last_line_is_named(tmp_path):
    _, bad = read_dataset(DataSpec(source=str(put(tmp_path, "d.jsonl", PAIRS + pair()[:30]))), "preferences")
    assert "no line end (file cut short?)" in bad.summary() and "(rows 21)" in bad.summary()


# ----------------------------------------------------------------------------- validate_dataset

def test_validate_dataset_good_files(tmp_path):
    assert validate_dataset(view(put(tmp_path, "p.jsonl", PAIRS))) == "data.preferences: 20 rows, pairs layout"
    rows = [{"prompt": "p", "response": r, "helpfulness": h} for r, h in (("a", 4), ("b", 2), ("c", 2))]
    assert validate_dataset(view(put(tmp_path, "s.parquet", parquet_bytes(rows)), "validation")) == \
        "data.validation: 2 rows, scored layout"
    assert validate_dataset(view(put(tmp_path, "m.jsonl", J(messages=msgs(("user", "a"), ("assistant", "b")))),
                                 "sft")) == "data.sft: 1 row, messages layout"
    numbers = NumbersTask(n_sft=20, n_pairs=10, n_eval=5)
    built_in = DataView(which="eval", source="builtin:numbers", numbers=numbers, max_length=16, max_bad_fraction=0)
    assert validate_dataset(built_in) == "data.eval: 5 rows, pairs layout"


def test_validate_dataset_reports_skips_and_does_not_tokenise(tmp_path):
    text = PAIRS * 5 + pair(chosen="same", rejected="same") + "\n" + pair(prompt="long " * 500) + "\n"
    summary = validate_dataset(view(put(tmp_path, "p.jsonl", text)))
    # the 500-word prompt is far over max_length=64 tokens, but length is the stage's check
    assert summary == "data.preferences: 101 rows, pairs layout (1 skipped: 1 chosen == rejected (rows 101))"


def test_validate_dataset_bad_files(tmp_path):
    with pytest.raises(DataError, match=r"expected a JSON array of rows, found an object"):
        validate_dataset(view(put(tmp_path, "o.json", pair()), "eval"))
    with pytest.raises(DataError, match=r"data.preferences\): no usable rows: all 1 candidate pairs are ties"):
        validate_dataset(view(put(tmp_path, "t.jsonl", J(prompt="p", response="a", helpfulness=1) + "\n"
                                  + J(prompt="p", response="b", helpfulness=1)), max_bad_fraction=1.0))
    with pytest.raises(DataError, match=r"more than data.max_bad_fraction = 0.0 for data.sft"):
        validate_dataset(view(put(tmp_path, "s.jsonl", SFT + "[1]\n"), "sft", max_bad_fraction=0.0))


def test_summary_ranks_reasons_by_frequency(tmp_path):
    text = pair(chosen="") + "\n" + "".join(pair(chosen="s", rejected="s") + "\n" for _ in range(3)) + PAIRS
    _, bad = read_dataset(DataSpec(source=str(put(tmp_path, "d.jsonl", text))), "preferences")
    assert bad.summary().index("3 chosen == rejected") < bad.summary().index("1 `chosen` is empty")


def test_stage_path_explains_empty_result(tmp_path):
    """sft_examples (the stage's path, with tokenisation) says why nothing is usable too."""
    from distill_pipeline.data import sft_examples
    from distill_pipeline.models import load_tokenizer
    from distill_pipeline.config import ModelSpec

    tok = load_tokenizer(ModelSpec(preset="tiny-student"))
    path = put(tmp_path, "d.jsonl", "".join(J(prompt="digits: " + "one " * 80, completion="1") + "\n" for _ in range(3)))
    with pytest.raises(DataError) as info:
        sft_examples(view(path, "sft", max_bad_fraction=1.0), tok)
    msg = str(info.value)
    assert "no usable rows" in msg and "longer than data.max_length=64 tokens (rows 1, 2, 3)" in msg
    assert "raise data.max_length" in msg and str(path) in msg
