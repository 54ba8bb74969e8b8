"""Model cards (pipeline/cards.py): every trained `model/` folder of a real run has a README.md that
huggingface_hub's ModelCard parses, whose facts are the run's own (fingerprint, identities, cache
format, evaluate row), whose resolved config rebuilds the same node, and which changes no identity."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from distill_pipeline.config import load_config
from distill_pipeline.identity import compute_identity
from distill_pipeline.pipeline import cards, runner
from tests.conftest import tiny_tree, write_config

TRAINED = ["sft.teacher", "sft.student", "teacher_dpo", "train"]


def card(plan, node):
    return (plan.folder(node) / "model" / "README.md").read_text(encoding="utf-8")


def cell(text: str, key: str) -> str:
    """The value of a two-column Markdown row `| key | value |`."""
    m = re.search(rf"^\| `?{re.escape(key)}`? \| `?([^|`]*)`? \|$", text, flags=re.M)
    assert m, f"no row {key!r}"
    return m.group(1)


@pytest.mark.parametrize("node", TRAINED)
def test_every_trained_model_has_a_card_modelcard_parses(adpa_run, node):
    from huggingface_hub import ModelCard

    path = adpa_run.folder(node) / "model" / "README.md"
    parsed = ModelCard.load(path)
    assert parsed.data.license == "other" and parsed.data.library_name == "transformers"
    assert "distill-pipeline" in parsed.data.tags
    assert parsed.data.base_model is None  # presets are not hub models
    text = card(adpa_run, node)
    assert f"fingerprint `{adpa_run.fingerprints[node]}`" in text
    # the identity it states is the model's, recomputed from its files (no memo), README included
    identity = re.search(r"\*\*content identity\*\* `([0-9a-f]{64})`", text).group(1)
    assert identity == compute_identity(adpa_run.folder(node) / "model")


def test_train_card_names_its_teachers_loss_cache_and_evaluation(adpa_run):
    text = card(adpa_run, "train")
    view = adpa_run.node("train").view
    assert f"`{view.loss}` — " in text
    for option, value in view.options.items():
        assert cell(text, option) == json.dumps(value)
    assert cell(text, "lr") == str(view.hp.lr)
    # teachers by the identities the extraction keyed its entries with
    meta = json.loads((adpa_run.folder("teacher_logits.rollouts") / "teachers.json").read_text())
    for role, t in meta["teachers"].items():
        assert re.search(rf"^\| {role} \(cache\) \| `[^`]+` \| `{t['identity']}` \|$", text, flags=re.M)
    assert cell(text, "top_k") == str(meta["format"]["top_k"])
    assert cell(text, "dtype") == meta["format"]["dtype"]
    # the teachers' own cards state the same identities
    assert meta["teachers"]["teacher"]["identity"] in card(adpa_run, "teacher_dpo")
    assert meta["teachers"]["reference"]["identity"] in card(adpa_run, "sft.teacher")
    # the evaluation section was rewritten by the evaluate node: this model's row, to 4 decimals
    results = json.loads((adpa_run.folder("evaluate") / "results.json").read_text())["train"]
    assert "Not evaluated yet" not in text
    for metric in ("task_accuracy", "reward_accuracy", "mean_length", "judge_win_rate"):
        assert cell(text, metric) == f"{results[metric]:.4f}"


@pytest.mark.parametrize("node", TRAINED)
def test_card_evaluation_is_the_models_own_row(adpa_run, node):
    results = json.loads((adpa_run.folder("evaluate") / "results.json").read_text())[node]
    assert cell(card(adpa_run, node), "reward_accuracy") == f"{results['reward_accuracy']:.4f}"


def test_resolved_config_in_the_card_rebuilds_the_same_node(adpa_run, tmp_path):
    text = card(adpa_run, "train")
    assert "Run through the Python API" in text  # no command line recorded in process
    resolved = re.search(r"```yaml\n(.*?)```", text, flags=re.S).group(1)
    assert "distill-pipeline run train -c config.yaml" in text
    cfg = load_config(write_config(tmp_path / "config.yaml", yaml.safe_load(resolved)))
    again = runner.make_plan(cfg)
    assert again.fingerprints == adpa_run.fingerprints
    assert again.folder("train") == adpa_run.folder("train")


def test_refresh_leaves_a_hand_edited_card_alone(adpa_run):
    path = adpa_run.folder("sft.student") / "model" / "README.md"
    before = path.read_text()
    try:
        path.write_text("# edited by hand\n")
        done = cards.refresh_evaluated(adpa_run, "evaluate")
        assert path not in done and path.read_text() == "# edited by hand\n"
        assert adpa_run.folder("train") / "model" / "README.md" in done
    finally:
        path.write_text(before)


def test_front_matter_names_hub_base_model_and_datasets(tmp_path):
    """No run: a hub student and a hub dataset go into the front matter as hub ids."""
    from huggingface_hub import ModelCard

    tree = tiny_tree(tmp_path / "run", method="dpo")
    tree["models"]["student"] = {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    tree["data"]["preferences"] = {"source": "hf://argilla/dpo-mix-7k", "split": "train"}
    plan = runner.make_plan(load_config(write_config(tmp_path / "c.yaml", tree)))
    data = ModelCard(f"---\n{cards._front_matter(plan, 'train', 'dpo', False)}\n---\n").data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data.base_model_relation == "finetune"
    assert data.datasets == ["argilla/dpo-mix-7k"]
    assert data.tags == ["distill-pipeline", "dpo"]


def test_a_card_that_cannot_be_written_does_not_lose_the_node(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("no card today")

    monkeypatch.setattr(cards, "write_card", broken)
    plan = runner.make_plan(load_config(write_config(tmp_path / "c.yaml", tiny_tree(tmp_path / "run"))))
    said = []
    assert runner.run(plan, ["sft.student"], use_ray=False, echo=said.append) == ["sft.student"]
    assert plan.done("sft.student") and not (plan.folder("sft.student") / "model" / "README.md").exists()
    assert any("sft.student: model card not written (RuntimeError: no card today)" in s for s in said)
