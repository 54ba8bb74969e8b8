"""Config loading, overrides and every error path (tests/conftest.py builds the tiny config)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distill_pipeline.config import ConfigError, load_config
from tests.conftest import ROOT, tiny_tree, write_config


def _cfg(tmp_path, mutate, sets=()):
    tree = tiny_tree(tmp_path / "run")
    mutate(tree)
    return load_config(write_config(tmp_path / "c.yaml", tree), sets)


def test_shipped_configs_load():
    quick = load_config(ROOT / "configs/quickstart.yaml")
    assert quick.models.teacher.preset == "tiny-teacher"
    paper = load_config(ROOT / "configs/paper-llama3-dpomix.yaml")
    assert paper.models.teacher.name_or_path == "meta-llama/Llama-3.1-8B"
    assert paper.teacher_dpo.beta == 0.05 and paper.teacher_dpo.lr == 5e-7


def test_set_overrides_parse_yaml_scalars_and_keep_siblings(tiny_config):
    cfg = load_config(tiny_config, ["teacher_dpo.beta=0.2", "rollouts.backend=hf",
                                    "data.numbers.noise=0", "train.loss.alpha=0.5"])
    assert cfg.teacher_dpo.beta == 0.2 and isinstance(cfg.teacher_dpo.beta, float)
    assert cfg.teacher_dpo.batch_size == 8  # sibling untouched
    assert cfg.rollouts.backend == "hf" and cfg.rollouts.max_new_tokens == 6
    assert cfg.data.numbers.noise == 0 and cfg.data.numbers.n_sft == 48
    assert cfg.train.loss == {"alpha": 0.5}


def test_config_is_frozen(tiny_config):
    cfg = load_config(tiny_config)
    with pytest.raises(Exception):
        cfg.teacher_dpo.beta = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("sets, needles", [
    (["teacher_dpo.betta=0.1"], ["teacher_dpo.betta", "unknown key", "beta"]),
    (["teacher_dpo.beta=high"], ["teacher_dpo.beta", "valid number", "'high'"]),
    (["teacher_dpo.beta=-1"], ["teacher_dpo.beta", "greater than 0"]),
    (["rollouts.backend=tpu"], ["rollouts.backend", "'auto', 'hf' or 'vllm'"]),
    (["method=grpo"], ["method", "'adpa+'"]),
    (["data.sft.source=missing.jsonl"], ["data.sft", "file not found: missing.jsonl"]),
    (["data.sft.source=data.csv"], ["data.sft", ".jsonl / .json / .parquet"]),
    (["train.loss.gamma=2"], ["train.loss.gamma", "method dckd", "accepted: alpha"]),
    (["train.loss.alpha=yes"], ["train.loss.alpha", "expected a number"]),
        (["train.loss.alpha=-1"], ["train.loss.alpha", "greater than or equal to 0"]),
        (["train.loss.alpha=.nan"], ["train.loss.alpha", "(got nan)"]),
    (["nosuchsection.x=1"], ["nosuchsection", "accepted here: run_dir, method"]),
    (["teacher_dpo.beta"], ["expected key.path=value"]),
])
def test_errors_name_path_and_accepted_values(tiny_config, sets, needles):
    with pytest.raises(ConfigError) as err:
        load_config(tiny_config, sets)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert str(tiny_config) in str(err.value) or "expected key.path" in str(err.value)


def test_model_needs_exactly_one_source(tmp_path):
    def both(tree):
        tree["models"]["student"] = {"preset": "tiny-student", "name_or_path": "x"}
    with pytest.raises(ConfigError, match="models.student: give exactly one"):
        _cfg(tmp_path, both)


def test_missing_required_section(tmp_path):
    with pytest.raises(ConfigError, match="models: required key is missing"):
        _cfg(tmp_path, lambda t: t.pop("models"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_existing_local_dataset_file_accepted(tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "p", "completion": "c"}\n')
    cfg = _cfg(tmp_path, lambda t: t["data"].update(sft={"source": str(data)}))
    assert Path(cfg.data.sft.source) == data


def test_yaml_roundtrip_of_defaults(tiny_config):
    cfg = load_config(tiny_config)
    dumped = yaml.safe_dump(cfg.model_dump(mode="json"))
    again = load_config(write_config(tiny_config.parent / "again.yaml", yaml.safe_load(dumped)))
    assert again == cfg
