"""Dataset layouts (JSONL and Parquet), bad-row handling, and the built-in numbers task."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_pipeline.data import DataView, pair_examples, sft_examples
from distill_pipeline.data.readers import DataError, detect_layout, read_dataset
from distill_pipeline.data.toy import drop_zeros, has_silent_zero, make_task, number_to_words
from distill_pipeline.models import load_tokenizer
from distill_pipeline.config import DataSpec, ModelSpec, NumbersTask


def write(tmp_path: Path, rows: list, fmt: str) -> str:
    if fmt == "jsonl":
        p = tmp_path / "d.jsonl"
        p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    else:
        p = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), p)
    return str(p)


CONV = [{"role": "user", "content": "hi"}]
LAYOUTS = {
    "messages": ("sft", [{"messages": CONV + [{"role": "assistant", "content": "hello"}]}],
                 {"prompt": CONV, "response": "hello"}),
    "prompt_completion": ("sft", [{"prompt": "hi", "completion": "hello"}],
                          {"prompt": CONV, "response": "hello"}),
    "pairs": ("preferences", [{"prompt": "hi", "chosen": "good", "rejected": "bad"}],
              {"prompt": CONV, "chosen": "good", "rejected": "bad"}),
    "conversational": ("preferences", [{
        "chosen": CONV + [{"role": "assistant", "content": "good"}],
        "rejected": CONV + [{"role": "assistant", "content": "bad"}],
        "dataset": "x", "chosen_rating": 5.0, "rejected_rating": 2.0,
        "chosen_model": "a", "rejected_model": "b"}],
        {"prompt": CONV, "chosen": "good", "rejected": "bad"}),
}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts(tmp_path, layout, fmt):
    kind, rows, expected = LAYOUTS[layout]
    src = write(tmp_path, rows, fmt)
    assert detect_layout(rows[0], kind) == layout
    out, bad = read_dataset(DataSpec(source=src), kind)
    assert bad.count == 0
    assert {k: out[0][k] for k in expected} == expected


def test_scored_layout_pairs_by_helpfulness_and_drops_ties(tmp_path):
    rows = [
        {"prompt": "p1", "response": "a", "helpfulness": 4, "correctness": 3, "coherence": 4, "complexity": 1, "verbosity": 1},
        {"prompt": "p1", "response": "b", "helpfulness": 2, "correctness": 3, "coherence": 4, "complexity": 1, "verbosity": 1},
        {"prompt": "p1", "response": "c", "helpfulness": 2, "correctness": 1, "coherence": 4, "complexity": 1, "verbosity": 1},
        {"prompt": "p2", "response": "d", "helpfulness": 3, "correctness": 3, "coherence": 4, "complexity": 1, "verbosity": 1},
        {"prompt": "p2", "response": "e", "helpfulness": 3, "correctness": 3, "coherence": 4, "complexity": 1, "verbosity": 1},
    ]
    out, bad = read_dataset(DataSpec(source=write(tmp_path, rows, "parquet")), "preferences")
    pairs = sorted((r["chosen"], r["rejected"]) for r in out)
    assert pairs == [("a", "b"), ("a", "c")]  # b/c tie and d/e tie dropped
    assert bad.count == 0


def test_bad_rows_are_skipped_and_reported(tmp_path):
    good = [{"prompt": f"p{i}", "chosen": "x", "rejected": "y"} for i in range(40)]
    rows = good + ["{not json", {"prompt": "p", "chosen": "same", "rejected": "same"},
                   {"prompt": "p", "chosen": "", "rejected": "y"}, {"prompt": "p", "chosen": 3, "rejected": "y"}]
    out, bad = read_dataset(DataSpec(source=write(tmp_path, rows, "jsonl")), "preferences")
    assert len(out) == 40 and bad.count == 4 and bad.total == 44
    text = bad.summary()
    assert "skipped 4 of 44 rows" in text and "chosen == rejected (rows 42)" in text
    assert "not a JSON object (rows 41)" in text
    bad.check(0.1)  # 9% ≤ 10%: accepted
    with pytest.raises(DataError, match="more than data.max_bad_fraction = 0.05"):
        bad.check(0.05)


def test_over_length_rows_are_reported_and_threshold_refuses(tmp_path, capsys):
    tok = load_tokenizer(ModelSpec(preset="tiny-student"))
    rows = [{"prompt": "digits: one", "completion": "1"}] * 9 + [{"prompt": "digits: " + "one " * 80, "completion": "1"}]
    view = DataView(which="sft", source=write(tmp_path, rows, "jsonl"), max_length=32, max_bad_fraction=0.2)
    out = sft_examples(view, tok)
    assert len(out) == 9
    assert "longer than data.max_length=32 tokens (rows 10)" in capsys.readouterr().out
    with pytest.raises(DataError, match="max_bad_fraction"):
        sft_examples(view.model_copy(update={"max_bad_fraction": 0.05}), tok)


def test_unknown_layout_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="cannot tell the layout"):
        read_dataset(DataSpec(source=write(tmp_path, [{"text": "x"}], "jsonl")), "sft")
    with pytest.raises(DataError, match="scored layout cannot be used as SFT"):
        read_dataset(DataSpec(source=write(tmp_path, [{"prompt": "p", "response": "r", "helpfulness": 1}], "jsonl")), "sft")


def test_conversational_must_share_prefix(tmp_path):
    row = {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
           "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}
    out, bad = read_dataset(DataSpec(source=write(tmp_path, [row], "jsonl")), "preferences")
    assert not out and "do not share the conversation" in bad.summary()


def test_number_words():
    assert number_to_words(0) == "zero"
    assert number_to_words(4207) == "four thousand two hundred seven"
    assert number_to_words(90_019) == "ninety thousand nineteen"
    with pytest.raises(ValueError):
        number_to_words(-1)


def test_numbers_task_is_deterministic_disjoint_and_biased():
    kw = dict(n_sft=2000, n_pairs=500, n_eval=200, max_value=9999, noise=0.6, seed=3)
    a, b = make_task(**kw), make_task(**kw)
    assert a == b
    eval_prompts = {r["prompt"] for r in a["eval"]}
    assert not eval_prompts & {r["prompt"] for r in a["sft"]}
    assert not eval_prompts & {r["prompt"] for r in a["preferences"]}
    assert all(r["chosen"] != r["rejected"] and r["chosen"] == r["answer"] for r in a["eval"])
    zero_rows = [r for r in a["preferences"] if "0" in r["chosen"] and len(r["chosen"]) >= 3]
    assert zero_rows and all(r["rejected"] == drop_zeros(r["chosen"]) for r in zero_rows)
    clean = [r for r in a["sft"] if not has_silent_zero(_answer(r["prompt"]))]
    assert all(r["completion"] == str(_answer(r["prompt"])) for r in clean)
    wrong = sum(1 for r in a["sft"] if r["completion"] != str(_answer(r["prompt"])))
    zeros = sum(1 for r in a["sft"] if has_silent_zero(_answer(r["prompt"])))
    assert 0.45 * zeros < wrong < 0.75 * zeros  # noise=0.6 of the zero-containing answers


WORDS = {number_to_words(n): n for n in range(10000)}


def _answer(prompt: str) -> int:
    return WORDS[prompt.removeprefix("digits: ")]


def test_pair_examples_tokenise_builtin(tmp_path):
    tok = load_tokenizer(ModelSpec(preset="tiny-teacher"))
    view = DataView(which="preferences", source="builtin:numbers",
                    numbers=NumbersTask(n_sft=20, n_pairs=10, n_eval=5), max_length=48, max_bad_fraction=0.0)
    ex = pair_examples(view, tok)
    assert len(ex) == 10
    assert all(e["chosen_ids"][-1] == tok.eos_token_id for e in ex)
    assert tok.decode(ex[0]["chosen_ids"][:-1]) == ex[0]["chosen"]
    ev = pair_examples(view.model_copy(update={"which": "eval"}), tok)
    assert len(ev) == 5 and all("answer" in e for e in ev)


def test_json_array_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "c", "rejected": "d"}]))
    out, bad = read_dataset(DataSpec(source=str(p)), "preferences")
    assert [r["chosen"] for r in out] == ["a", "c"] and bad.count == 0
