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


# ------------------------------------------------------------------ issue 18: refused or warned at load

@pytest.mark.parametrize("where, text, needles", [
    ("file", '{% for m in messages %}\n<|{{ m["role"] }|>{{ m["content"] }}<|end|>\n{% endfor %}\n',
     ["data.chat_template", "broken.jinja", "line 2", "unexpected '}'", "fix the template"]),
    ("inline", "{% for m in messages %}{{ m['content'] }}{% endfor",
     ["data.chat_template", "the inline template", "line 1", "fix the template"]),
    ("inline", "{{ messages | no_such_filter }}",
     ["data.chat_template", "line 1", "No filter named 'no_such_filter'"]),
])
def test_a_chat_template_with_a_jinja_error_is_refused_at_load(tmp_path, where, text, needles):
    """A broken template used to pass the preflight and fail inside the stage with a bare
    TemplateSyntaxError naming neither the option nor the file."""
    value = text
    if where == "file":
        value = str(tmp_path / "broken.jinja")
        Path(value).write_text(text)
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, lambda t: t["data"].update(chat_template=value))
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_chat_templates_that_transformers_compiles_are_accepted(tmp_path):
    """The check compiles like transformers: its `{% generation %}` tag, loop controls, tojson."""
    text = ("{% for m in messages %}{% if loop.index > 8 %}{% break %}{% endif %}"
            "{% generation %}{{ m['content'] | tojson }}{% endgeneration %}<|end|>{% endfor %}")
    (tmp_path / "ok.jinja").write_text(text)
    for value in (text, str(tmp_path / "ok.jinja")):
        cfg = _cfg(tmp_path, lambda t, v=value: t["data"].update(chat_template=v))
        assert cfg.data.template() == text


def test_gpu_memory_without_gpus_is_refused(tmp_path):
    """`resources.gpu_memory_gb` is read only by the memory plan of a run that uses GPUs; with
    `gpus: 0` it used to be ignored silently (the plan checked against RAM)."""
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, lambda t: t.update(resources={"gpu_memory_gb": 80}))
    for needle in ("resources.gpu_memory_gb", "resources.gpus is 0", "RAM", "Set resources.gpus"):
        assert needle in str(err.value), str(err.value)
    assert _cfg(tmp_path, lambda t: t.update(resources={"gpus": 1, "gpu_memory_gb": 80})).resources.gpu_memory_gb == 80


@pytest.mark.parametrize("section", ["sft.teacher", "sft.student", "teacher_dpo", "train"])
def test_fsdp_with_one_worker_is_warned_about_in_every_training_section(tiny_config, section):
    """One worker has nothing to shard over: the node trains unwrapped, as with ddp. A warning
    naming the section (not an error: `--set <section>.workers=1` on a sharded config is fair)."""
    from distill_pipeline.config import ignored_settings

    warned = ignored_settings(load_config(tiny_config, [f"{section}.strategy=fsdp"]))
    assert len(warned) == 1, warned
    for needle in (f"{section}.strategy: fsdp has no effect", f"{section}.workers: 1", "2 or more"):
        assert needle in warned[0], warned
    assert ignored_settings(load_config(tiny_config, [f"{section}.strategy=fsdp", f"{section}.workers=2"])) == []
    assert ignored_settings(load_config(tiny_config)) == []
