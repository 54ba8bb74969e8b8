"""The built-in numbers-ranked task (docs/TASKS.md): writers, partial credit, ranked pairs, wiring."""
from __future__ import annotations

import random
import statistics

import pytest

from distill_pipeline.config import ConfigError, ModelSpec, NumbersTask, RankedTask, config_from_dict
from distill_pipeline.data import DataView, pair_examples, sft_examples
from distill_pipeline.data.ranked import ErrorModel, confuse_teen, make_ranked_task, partial_credit
from distill_pipeline.data.toy import number_to_words
from distill_pipeline.models import load_tokenizer

DEMOS, SAMPLES = ErrorModel(0.03, 0.3, 0.3), ErrorModel(0.12, 0.6, 0.6)
SIZES = dict(n_sft=3000, n_pairs=1500, n_eval=200, n_validation=100, max_value=99_999)
WORDS = {number_to_words(n): n for n in range(100_000)}


def answer_of(prompt: str) -> str:
    return str(WORDS[prompt.removeprefix("digits: ")])


def test_partial_credit():
    assert partial_credit("4207", "4207") == 1.0
    assert partial_credit(" 4207 ", "4207") == 1.0
    assert partial_credit("427", "4207") == 0.75           # silent zero dropped: one deletion
    assert partial_credit("12346", "12345") == pytest.approx(0.8)  # one slip in five digits
    assert partial_credit("21345", "12345") == pytest.approx(0.6)  # a swap is two edits
    assert partial_credit("", "12345") == 0.0
    assert partial_credit("123456789", "1") == pytest.approx(1 - 8 / 9)


def test_teen_confusion_swaps_one_teen_or_ty_word():
    assert confuse_teen(14, random.Random(0)) == 40
    assert confuse_teen(40, random.Random(0)) == 14
    assert confuse_teen(4207, random.Random(0)) == 4207        # no teen or -ty word
    assert confuse_teen(20, random.Random(0)) == 20            # "twenty" has no teen partner
    assert {confuse_teen(14_215, random.Random(s)) for s in range(20)} == {40_215, 14_250}


def test_writers_make_their_error_rates():
    rng = random.Random(1)
    numbers = [rng.randrange(100_000) for _ in range(4000)]
    demo = statistics.fmean(DEMOS.answer(n, rng) == str(n) for n in numbers)
    sample = statistics.fmean(SAMPLES.answer(n, rng) == str(n) for n in numbers)
    assert 0.68 < demo < 0.76 and 0.33 < sample < 0.42  # docs/TASKS.md: 72.1% and 37.5%
    assert ErrorModel(0, 0, 0).answer(4207, rng) == "4207"
    assert ErrorModel(0, 1, 0).answer(4207, rng) == "427"


def test_pairs_are_ranked_imperfect_answers_and_held_out_prompts_stay_out():
    a = make_ranked_task(**SIZES, seed=0, demos=DEMOS, samples=SAMPLES)
    assert a == make_ranked_task(**SIZES, seed=0, demos=DEMOS, samples=SAMPLES)
    assert a != make_ranked_task(**SIZES, seed=1, demos=DEMOS, samples=SAMPLES)
    assert [len(a[k]) for k in ("sft", "preferences", "eval", "validation")] == [3000, 1500, 200, 100]
    held = {r["prompt"] for r in a["eval"] + a["validation"]}
    assert not held & {r["prompt"] for r in a["sft"] + a["preferences"]}
    for r in a["preferences"]:
        right = answer_of(r["prompt"])
        assert partial_credit(r["chosen"], right) > partial_credit(r["rejected"], right)
    chosen_right = statistics.fmean(r["chosen"] == answer_of(r["prompt"]) for r in a["preferences"])
    assert 0.5 < chosen_right < 0.7  # the chosen answer is wrong in roughly 40% of the pairs
    demos_right = statistics.fmean(r["completion"] == answer_of(r["prompt"]) for r in a["sft"])
    assert 0.68 < demos_right < 0.76
    assert all(r["answer"] == answer_of(r["prompt"]) for r in a["eval"])


def test_a_policy_that_always_ties_gives_no_pairs_but_held_out_rows_still_have_one():
    perfect = ErrorModel(0, 0, 0)
    t = make_ranked_task(**{**SIZES, "n_sft": 10, "n_pairs": 5, "max_value": 999}, seed=0,
                         demos=perfect, samples=perfect)
    assert t["preferences"] == []
    assert all(r["chosen"] == r["answer"] != r["rejected"] for r in t["eval"])


def test_config_wires_the_task_and_leaves_the_numbers_task_alone(tmp_path):
    tree = {"run_dir": str(tmp_path), "models": {"teacher": {"preset": "tiny-teacher"},
                                                  "student": {"preset": "tiny-student"}},
            "data": {k: {"source": "builtin:numbers-ranked"} for k in ("sft", "preferences", "eval")}}
    cfg = config_from_dict({**tree, "data": {**tree["data"], "ranked": {"samples": {"digit_error": 0.2}}}})
    assert cfg.data.ranked.samples.digit_error == 0.2 and cfg.data.ranked.samples.zero_drop == 0.6
    with pytest.raises(ConfigError, match="builtin:numbers-ranked"):
        config_from_dict({**tree, "data": {**tree["data"], "sft": {"source": "builtin:letters"}}})
    tok = load_tokenizer(ModelSpec(preset="tiny-student"))
    view = DataView(which="eval", source="builtin:numbers-ranked", max_length=48, max_bad_fraction=0.0,
                    numbers=NumbersTask(n_sft=30, n_pairs=10, n_eval=6, n_validation=4, max_value=999),
                    ranked=RankedTask())
    ev = pair_examples(view, tok)
    assert len(ev) == 6 and all(e["answer"] == answer_of(e["prompt"][0]["content"]) for e in ev)
    assert len(sft_examples(view.model_copy(update={"which": "sft"}), tok)) == 30
    numbers = view.model_copy(update={"source": "builtin:numbers", "ranked": None})
    assert "ranked" not in numbers.fingerprint_payload()  # numbers-task fingerprints unchanged
    assert view.fingerprint_payload()["ranked"]["samples"]["digit_error"] == 0.12
