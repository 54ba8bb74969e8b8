"""Import configs: which nodes an import replaces, the config errors and notes, chat templates,
and preflight's tokenizer check across every model of the run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from distill_pipeline.models import ModelError, load_model, load_tokenizer, save_model
from distill_pipeline.pipeline import runner
from distill_pipeline.config import ConfigError, ModelSpec, config_from_dict, unused_models
from tests.conftest import tiny_tree

TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|end|>{% endfor %}" \
           "{% if add_generation_prompt %}[assistant] {% endif %}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for preset in ("tiny-teacher", "tiny-student"):
        spec = ModelSpec(preset=preset)
        save_model(load_model(spec), load_tokenizer(spec), root / preset)
        out[preset] = root / preset
    no_template = root / "no-template"
    shutil.copytree(out["tiny-student"], no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(cfg))
    out["no-template"] = no_template
    other_vocab = root / "other-vocab"
    tok = load_tokenizer(ModelSpec(preset="tiny-student"))
    tok.add_tokens(["<|extra|>"])
    save_model(load_model(ModelSpec(preset="tiny-student")), tok, other_vocab)
    out["other-vocab"] = other_vocab
    return out


def cfg_for(tmp_path, method="dckd", data=None, **models):
    tree = tiny_tree(tmp_path / "run", method=method)
    for role, value in models.items():
        if value is None:
            tree["models"].pop(role, None)
        else:
            tree["models"][role] = {"name_or_path": str(value)} if isinstance(value, Path) else value
    tree["data"].update(data or {})
    return config_from_dict(tree)


def stages(cfg) -> dict[str, str]:
    return {n.name: n.stage for n in runner.make_plan(cfg).nodes}


def test_imported_teacher_replaces_sft_teacher_and_dpo_for_a_pairs_method(tmp_path, saved):
    cfg = cfg_for(tmp_path, teacher_dpo=saved["tiny-teacher"])
    got = stages(cfg)
    assert got["teacher_dpo"] == "import_model" and "sft.teacher" not in got
    assert got["sft.student"] == "sft"
    assert runner.make_plan(cfg).node("evaluate").needs == {m: m for m in ("sft.student", "teacher_dpo", "train")}
    assert unused_models(cfg) == ["note: models.teacher is not used: method dckd with an imported "
                                  "teacher_dpo reads no reference teacher"]


def test_imported_reference_trains_the_teacher_dpo_from_it(tmp_path, saved):
    cfg = cfg_for(tmp_path, method="adpa", reference=saved["tiny-teacher"], teacher=None)
    got = stages(cfg)
    assert got["sft.teacher"] == "import_model" and got["teacher_dpo"] == "teacher_dpo"
    assert unused_models(cfg) == []


def test_adpa_with_an_imported_teacher_needs_its_reference(tmp_path, saved):
    with pytest.raises(ConfigError, match="models.reference: method adpa needs the imported "
                                          "teacher's reference model.*advantage"):
        cfg_for(tmp_path, method="adpa", teacher_dpo=saved["tiny-teacher"])
    with pytest.raises(ConfigError, match="models.reference: method adpa\\+ needs"):
        cfg_for(tmp_path, method="adpa+", teacher_dpo=saved["tiny-teacher"])


def test_a_model_that_a_node_trains_from_is_required(tmp_path, saved):
    with pytest.raises(ConfigError, match="models.student is required: node sft.student trains "
                                          "from it.*models.student_init"):
        cfg_for(tmp_path, student=None)
    with pytest.raises(ConfigError, match="models.teacher is required: the teacher DPO trains from it"):
        cfg_for(tmp_path, teacher=None)
    cfg = cfg_for(tmp_path, student=None, teacher=None, student_init=saved["tiny-student"],
                  teacher_dpo=saved["tiny-teacher"])
    assert set(stages(cfg).values()) == {"import_model", "teacher_logits", "train", "evaluate"}
    assert unused_models(cfg) == []


def test_an_import_is_a_checkpoint_not_a_preset(tmp_path):
    with pytest.raises(ConfigError, match="models.teacher_dpo: an import is a checkpoint"):
        cfg_for(tmp_path, teacher_dpo={"preset": "tiny-teacher"})


def test_missing_import_is_named_at_plan_time(tmp_path):
    cfg = cfg_for(tmp_path, teacher_dpo=tmp_path / "nowhere")
    with pytest.raises(ModelError, match="models.teacher_dpo: .*no such local directory"):
        runner.make_plan(cfg)


def test_status_names_the_imported_identity(tmp_path, saved):
    from distill_pipeline.identity import content_identity

    cfg = cfg_for(tmp_path, student_init=saved["tiny-student"])
    rows = {n: text for n, _, text in runner.status(runner.make_plan(cfg))}
    ident = content_identity(saved["tiny-student"])
    assert rows["sft.student"] == f"will run: never run (imported {ident[:12]} from {saved['tiny-student']})"


def test_dtype_and_template_of_an_import_are_content(tmp_path, saved):
    base = runner.make_plan(cfg_for(tmp_path, student_init=saved["tiny-student"]))
    for change in ({"student_init": {"name_or_path": str(saved["tiny-student"]), "dtype": "bfloat16"}},
                   {"student_init": saved["tiny-student"], "data": {"chat_template": TEMPLATE}}):
        data = change.pop("data", None)
        plan = runner.make_plan(cfg_for(tmp_path, data=data, **change))
        assert plan.node("sft.student").view.identity != base.node("sft.student").view.identity
        assert plan.contents["sft.student"] != base.contents["sft.student"]
        assert plan.fingerprints["train"] != base.fingerprints["train"]


# ---------------------------------------------------------------- chat templates

def test_chat_template_inline_or_from_a_file(tmp_path):
    assert cfg_for(tmp_path, data={"chat_template": TEMPLATE}).data.template() == TEMPLATE
    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATE)
    assert cfg_for(tmp_path, data={"chat_template": str(f)}).data.template() == TEMPLATE
    with pytest.raises(ConfigError, match="data.chat_template: .*neither a Jinja template"):
        cfg_for(tmp_path, data={"chat_template": str(tmp_path / "missing.jinja")})
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(ConfigError, match="holds no Jinja expression"):
        cfg_for(tmp_path, data={"chat_template": str(tmp_path / "plain.txt")})


def test_model_without_template_is_refused_unless_one_is_given(tmp_path, saved):
    plan = runner.make_plan(cfg_for(tmp_path, student={"name_or_path": str(saved["no-template"])}))
    with pytest.raises(ModelError, match="no chat template.*data.chat_template"):
        runner.preflight(plan, ["sft.student"], echo=lambda s: None)
    plan = runner.make_plan(cfg_for(tmp_path, data={"chat_template": TEMPLATE},
                                    student={"name_or_path": str(saved["no-template"])}))
    runner.preflight(plan, ["sft.student"], echo=lambda s: None)
    assert plan.node("sft.student").view.chat_template == TEMPLATE
    tok = load_tokenizer(plan.node("sft.student").view.model, TEMPLATE)
    from distill_pipeline.data.tokenize import encode_prompt

    assert tok.decode(encode_prompt(tok, [{"role": "user", "content": "hi"}])) == "[user] hi<|end|>[assistant] "


def test_tokenizers_are_compared_across_every_model_of_the_run(tmp_path, saved):
    plan = runner.make_plan(cfg_for(tmp_path, student_init=saved["other-vocab"]))
    with pytest.raises(ModelError, match="models.teacher \\(tiny-teacher\\) and models.student_init "
                                         ".* use different tokenizers: vocabularies differ"):
        runner.preflight(plan, [n.name for n in plan.nodes], echo=lambda s: None)
