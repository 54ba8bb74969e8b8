"""Fingerprints change exactly when what a node reads changes: its own view (every config field,
for every method), its stage version, or an upstream node; `status` explains against the node's
own lineage."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic import BaseModel

from distill_pipeline.losses import LOSSES, METHODS, method_loss
from distill_pipeline.pipeline import runner
from distill_pipeline.config import Config, config_from_dict, load_config
from distill_pipeline.stages import flatten, get_stage
from tests.conftest import tiny_tree, write_config


def fps(config, *sets):
    return runner.make_plan(load_config(config, list(sets))).fingerprints


def changed(a, b):
    return {k for k in a if a[k] != b.get(k)}


def test_stable_across_loads(tiny_config):
    assert fps(tiny_config) == fps(tiny_config)


# ------------------------------------------------------------------ ownership, exhaustively

def _annotation(path: str) -> Any:
    """The type annotation of a config leaf (through nested models and Optionals)."""
    model: Any = Config
    ann: Any = None
    for part in path.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        inner = [a for a in (get_args(ann) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = inner[0] if inner else None
    return ann


# Leaves that cannot be changed on their own, and why.
NOT_PERTURBED = {
    "method": "changes the graph itself (tests/pipeline/test_methods.py)",
    "models.teacher.name_or_path": "exclusive with preset, which is perturbed",
    "models.student.name_or_path": "exclusive with preset, which is perturbed",
    "models.teacher_dpo": "an import changes the graph itself (tests/unit/test_import_config.py)",
    "models.reference": "an import changes the graph itself (tests/unit/test_import_config.py)",
    "models.student_init": "an import changes the graph itself (tests/unit/test_import_config.py)",
}


def perturb(path: str, value: Any, method: str, tmp) -> Any:
    """A different, valid value for one config leaf (None: no meaningful change exists)."""
    special = {
        "models.teacher.preset": "tiny-student", "models.student.preset": "tiny-teacher",
        "teacher_logits.logp_keep_bits": 4, "ray.address": "127.0.0.1:1",
        "run_dir": str(tmp / "other-run"), "teacher_logits.store": str(tmp / "other-store"),
        "data.chat_template": "{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}",
        "rollouts.max_model_len": 4096,
        "resources.gpu_memory_gb": None,  # only valid beside resources.gpus > 0 (a config error alone)
        "teacher_logits.top_mass": 0.999,
        "teacher_logits.min_k": None,  # only valid beside top_mass (a config error alone)
        "report_to": ["tensorboard", "wandb", "mlflow"],  # read by no view: reruns nothing
    }
    if path in special:
        return special[path]
    if path.endswith(".lora"):  # off by default; on, with its defaults, trains adapters
        return {}
    if path == "evaluate.reward_model":
        from tests.unit.test_reward import _save_reward_dir

        rm = tmp / "reward-model"
        if not rm.exists():
            _save_reward_dir(rm)
        return {"name_or_path": str(rm)}
    leaf = path.rsplit(".", 1)[-1]
    if leaf == "source":
        data = tmp / "rows.jsonl"
        data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "completion": "c"}\n')
        return str(data)
    if leaf == "limit":
        return 5
    if path == "train.loss":
        options = LOSSES[method_loss(method)].options
        key = next((k for k, v in options.items() if isinstance(v, float)), None)
        return {key: options[key] + 0.25} if key else None
    if path == "train.dckd_loss":
        return {"alpha": 0.35} if method == "adpa+" else None
    ann = _annotation(path)
    choices = [a for a in get_args(ann) if get_origin(ann) is Literal] if ann is not None else []
    if choices:
        return next(c for c in choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value >= 0.5 else value + 0.05
    if path.endswith("split"):
        return "test"
    raise AssertionError(f"no perturbation for config leaf {path} = {value!r}: add one to this test")


def reads(node) -> set[str]:
    """Config paths a node's fingerprint covers: its view's leaves, minus NEUTRAL fields."""
    neutral = node.view.NEUTRAL
    return {cp for vp, cp in node.view.config_paths().items()
            if cp and not any(vp == n or vp.startswith(n + ".") for n in neutral)}


def covers(paths: set[str], leaf: str) -> bool:
    return any(p == leaf or p.startswith(leaf + ".") or leaf.startswith(p + ".") for p in paths)


def _set(tree: dict, path: str, value: Any) -> dict:
    tree = json.loads(json.dumps(tree))
    node = tree
    *parents, last = path.split(".")
    for p in parents:
        if node.get(p) is None:
            node[p] = {}
        node = node[p]
    node[last] = value
    return tree


@pytest.mark.parametrize("method", METHODS)
def test_each_config_field_changes_exactly_the_nodes_that_read_it(tmp_path, method):
    """Every leaf of the config tree, perturbed alone: the nodes whose own fingerprint payload
    changes are exactly the nodes that read it (their view holds it and it is not NEUTRAL), and
    the fingerprints that change are those nodes and everything downstream of a node whose
    content (payload minus LAYOUT fields) changed. The hand-written tables below check the same
    from outside the views."""
    tree = tiny_tree(tmp_path / "run", method=method)
    base_cfg = config_from_dict(tree)
    base = runner.make_plan(base_cfg)
    leaves = flatten(base_cfg.model_dump(mode="json"))
    tested = 0
    for path, value in leaves.items():
        if path in NOT_PERTURBED:
            continue
        new_value = perturb(path, value, method, tmp_path)
        if new_value is None:
            continue
        plan = runner.make_plan(config_from_dict(_set(tree, path, new_value)))
        assert [n.name for n in plan.nodes] == [n.name for n in base.nodes], path
        payload_changed = {n.name for n in plan.nodes
                           if n.view.fingerprint_payload() != base.node(n.name).view.fingerprint_payload()}
        expected = {n.name for n in plan.nodes if covers(reads(n) | reads(base.node(n.name)), path)}
        assert payload_changed == expected, f"{method}: {path} {value!r} → {new_value!r}"
        spread = {n.name for n in plan.nodes
                  if n.view.content_payload() != base.node(n.name).view.content_payload()}
        for n in plan.nodes:
            if set(n.needs.values()) & spread:
                spread.add(n.name)
        assert changed(base.fingerprints, plan.fingerprints) == payload_changed | spread, f"{method}: {path}"
        tested += 1
    assert tested > 60


@pytest.mark.parametrize("method", [m for m in METHODS if LOSSES[method_loss(m)].cache is None])
def test_teacher_logits_fields_rerun_nothing_for_methods_without_a_cache(tiny_config, method):
    base = fps(tiny_config, f"method={method}")
    for override in ("teacher_logits.top_k=20", "teacher_logits.dtype=float32",
                     "teacher_logits.logp_keep_bits=4", "teacher_logits.unit_tokens=99"):
        assert changed(base, fps(tiny_config, f"method={method}", override)) == set(), override


ALL_ADPA = {"sft.teacher", "sft.student", "teacher_dpo", "rollouts", "teacher_logits.rollouts", "train", "evaluate"}


@pytest.mark.parametrize("override, expected", [
    # read by nobody, or not read in this configuration (built-in data, greedy rollouts)
    ("data.preferences.split=test", set()), ("data.sft.limit=5", set()), ("data.eval.layout=pairs", set()),
    ("rollouts.seed=3", set()), ("rollouts.top_p=0.5", set()),
    ("sft.teacher.checkpoint_every=3", set()), ("teacher_dpo.checkpoint_every=3", set()),
    ("teacher_logits.num_workers=3", set()), ("teacher_logits.batch_tokens=512", set()),
    ("report_to=[tensorboard, wandb, mlflow]", set()),  # trackers: where metrics also go
    # where the cache lives: the extraction node only
    ("teacher_logits.unit_tokens=99", {"teacher_logits.rollouts"}),
    ("teacher_logits.store=/tmp/elsewhere", {"teacher_logits.rollouts"}),
    # what the cache holds: the extraction and everything that reads it
    ("teacher_logits.top_k=4", {"teacher_logits.rollouts", "train", "evaluate"}),
    ("rollouts.temperature=0.7", {"rollouts", "teacher_logits.rollouts", "train", "evaluate"}),
    ("train.checkpoint_every=3", {"train", "evaluate"}),  # train validates at every checkpoint
    ("train.loss.gamma=0.5", {"train", "evaluate"}),
    ("sft.student.lr=0.01", {"sft.student", "rollouts", "teacher_logits.rollouts", "train", "evaluate"}),
    ("data.numbers.seed=3", ALL_ADPA),
])
def test_exactly_the_right_nodes_change_for_adpa(tmp_path, override, expected):
    config = write_config(tmp_path / "adpa.yaml", tiny_tree(tmp_path / "run", method="adpa"))
    assert changed(fps(config), fps(config, override)) == expected


@pytest.mark.parametrize("override, expected", [
    ("teacher_dpo.beta=0.3", {"teacher_dpo", "evaluate", "teacher_logits", "train"}),
    ("sft.student.lr=0.01", {"sft.student", "evaluate", "train"}),
    ("teacher_logits.top_k=20", {"teacher_logits", "train", "evaluate"}),
    ("teacher_logits.num_workers=3", set()),
    ("train.loss.alpha=0.3", {"train", "evaluate"}),
    ("evaluate.max_new_tokens=9", {"evaluate", "train"}),  # train validates with it
    ("models.teacher.dtype=bfloat16", {"sft.teacher", "teacher_dpo", "evaluate", "teacher_logits", "train"}),
    ("ray.num_cpus=1", set()),
    ("resources.train_cpus=2", set()),
])
def test_exactly_the_right_nodes_change_for_dckd(tiny_config, override, expected):
    assert changed(fps(tiny_config), fps(tiny_config, override)) == expected


def test_stage_version_bump_changes_node_and_dependents(tiny_config, monkeypatch):
    import distill_pipeline.stages.teacher_dpo as module
    base = fps(tiny_config)
    monkeypatch.setattr(module, "STAGE", dataclasses.replace(get_stage("teacher_dpo"), version=99))
    assert changed(base, fps(tiny_config)) == {"teacher_dpo", "evaluate", "teacher_logits", "train"}


def test_dataset_file_content_is_fingerprinted(tmp_path, tiny_config):
    import yaml
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "digits: one", "completion": "1"}\n')
    tree = yaml.safe_load(tiny_config.read_text())
    tree["data"]["sft"] = {"source": str(data)}
    tiny_config.write_text(yaml.safe_dump(tree))
    base = fps(tiny_config)
    data.write_text('{"prompt": "digits: two", "completion": "2"}\n')
    assert changed(base, fps(tiny_config)) == {"sft.teacher", "sft.student", "teacher_dpo", "teacher_logits",
                                               "train", "evaluate"}


# ------------------------------------------------------------------ status

def _publish_state(plan, name):
    """Record `name` as published with its current view (what publishing a node does)."""
    runner.record_state(plan, name)


def test_status_explains_why(tiny_config):
    plan = runner.make_plan(load_config(tiny_config))
    assert runner.why(plan, "teacher_dpo") == "never run"
    _publish_state(plan, "teacher_dpo")
    plan2 = runner.make_plan(load_config(tiny_config, ["teacher_dpo.beta=0.3"]))
    assert runner.why(plan2, "teacher_dpo") == "teacher_dpo.beta 0.1 → 0.3"
    plan3 = runner.make_plan(load_config(tiny_config, ["sft.teacher.lr=0.5"]))
    assert runner.why(plan3, "teacher_dpo") == "upstream sft.teacher changed"
    plan4 = runner.make_plan(load_config(tiny_config, ["data.numbers.seed=4"]))
    assert runner.why(plan4, "teacher_dpo") == "data.numbers.seed 0 → 4; upstream sft.teacher changed"


def test_status_explains_against_the_same_methods_last_run(tmp_path):
    """Methods sharing a run dir: each train node is compared with its own previous run."""
    def plan_for(method, *sets):
        tree = tiny_tree(tmp_path / "run", method=method)
        return runner.make_plan(load_config(write_config(tmp_path / f"{method}.yaml", tree), list(sets)))
    _publish_state(plan_for("dpkd"), "train")
    _publish_state(plan_for("sft"), "train")  # published last: the old status diffed against it
    assert runner.why(plan_for("dpkd", "train.loss.beta=0.2"), "train") == "train.loss.beta 0.1 → 0.2"
    assert runner.why(plan_for("sft", "train.lr=0.5"), "train") == "train.lr 0.003 → 0.5"
    assert runner.why(plan_for("dckd"), "train") == "never run with loss dckd (other train outputs here are other methods')"
    # adpa and adpa+ both train with the adpa loss, from different inits: separate lineages
    _publish_state(plan_for("adpa+"), "train")
    assert runner.why(plan_for("adpa"), "train").startswith("never run with loss adpa (")
    _publish_state(plan_for("adpa"), "train")
    assert runner.why(plan_for("adpa+", "train.loss.gamma=0.5"), "train") == "train.loss.gamma 1.6 → 0.5"
    # evaluate has no lineage field of its own: it is told apart by the train node it reads
    _publish_state(plan_for("dpo"), "evaluate")
    _publish_state(plan_for("sft"), "evaluate")
    assert runner.why(plan_for("dpo", "evaluate.batch_size=32"), "evaluate") == "evaluate.batch_size 16 → 32"
    assert runner.why(plan_for("simpo"), "evaluate") == ("never run with train loss simpo "
                                                          "(other evaluate outputs here are other methods')")


def test_select_closure_and_unknown_target(tiny_config):
    plan = runner.make_plan(load_config(tiny_config))
    assert runner.select(plan, ["teacher_dpo"]) == ["sft.teacher", "teacher_dpo"]
    assert set(runner.select(plan, ["sft"])) == {"sft.teacher", "sft.student"}
    with pytest.raises(runner.PipelineError, match="no node or stage 'bogus'"):
        runner.select(plan, ["bogus"])


def test_views_declare_where_every_field_comes_from(tiny_config):
    for method in METHODS:
        for node in runner.make_plan(load_config(tiny_config, [f"method={method}"])).nodes:
            assert set(node.view.origins()) == set(type(node.view).model_fields), node.name
            assert set(node.needs) <= set(get_stage(node.stage).inputs) or "*" in get_stage(node.stage).inputs


def test_options_added_later_leave_existing_fingerprints_alone(tiny_config):
    """Training options added after runs existed (workers, strategy, precision, gradient
    checkpointing) are out of the payloads at their defaults — the fingerprints of existing runs do
    not move — and in them as soon as they are set."""
    from distill_pipeline.config import TRAIN_OPTIONS_ADDED

    cfg = load_config(tiny_config)
    plan = runner.make_plan(cfg)
    trained = [n for n in plan.nodes if n.stage in ("sft", "teacher_dpo", "train")]
    assert trained
    for n in trained:
        assert not set(TRAIN_OPTIONS_ADDED) & set(n.view.fingerprint_payload()["hp"]), n.name
        assert set(TRAIN_OPTIONS_ADDED) <= set(n.view.model_dump()["hp"])  # still in the manifest
    other = runner.make_plan(cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": "bf16"})}))
    assert other.node("train").view.fingerprint_payload()["hp"]["precision"] == "bf16"
    assert other.fingerprints["train"] != plan.fingerprints["train"]
    assert other.fingerprints["sft.student"] == plan.fingerprints["sft.student"]


# The quickstart's fingerprints as computed before the training options and adaptive K existed
# (commit b36442a), on any machine. Options added at their defaults must leave them alone (View.ADDED); a change
# here reruns every existing quickstart run: update the table only for a deliberate change (a
# stage version bump), and say so in the change.
QUICKSTART_FINGERPRINTS = {
    "sft.teacher": "259677bf924a4071", "sft.student": "42d3832e7c6e25ff", "teacher_dpo": "4ea61d4cd6230411",
    "rollouts": "1f094452c777b289", "train": "3db421491858554a", "evaluate": "8581885c44cd8bd9"}  # evaluate v3: task_reward


def test_quickstart_fingerprints_are_pinned():
    from tests.conftest import ROOT

    plan = runner.make_plan(load_config(ROOT / "configs/quickstart.yaml"))
    pinned = {k: v[:16] for k, v in plan.fingerprints.items()
              if k != "teacher_logits.rollouts"}  # its own folder names the default store's path
    assert pinned == QUICKSTART_FINGERPRINTS
