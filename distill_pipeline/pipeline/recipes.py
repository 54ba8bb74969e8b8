"""Recipes: the stage graph a method expands into.

Every method shares `sft.teacher`, `sft.student`, `teacher_dpo` and `evaluate`; the method adds
its own nodes (rollouts, teacher-logit extractions, student training). A node is one stage
instance: its name (`<stage>` or `<stage>.<variant>`), the upstream nodes it reads by role, and
its *view* — the config subtree it depends on, which its fingerprint hashes. `origin` maps each
view key to its config path, so `status` can say `teacher_dpo: will run: teacher_dpo.beta 0.05 → 0.1`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class NodeSpec:
    name: str
    stage: str
    needs: dict[str, str]
    view: dict[str, Any]
    origin: dict[str, str] = field(default_factory=dict)


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str) -> str:
    """sha256 of a dataset file, memoised per (path, size, mtime) for this process."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def data_view(cfg: Any, which: str) -> dict:
    spec = getattr(cfg.data, which)
    view = {"spec": spec, "max_length": cfg.data.max_length,
            "max_bad_fraction": cfg.data.max_bad_fraction}
    if spec.source == "builtin:numbers":
        view["numbers"] = cfg.data.numbers
    elif not spec.source.startswith("hf://"):
        view["sha256"] = file_digest(spec.source)
    return view


def _data_origin(which: str) -> dict:
    return {"data": f"data.{which}"}


def _train_view(cfg: Any, loss: str, options: dict) -> dict:
    from distill_pipeline.losses import LOSSES

    hp = cfg.train.model_dump(exclude={"loss", "dckd_loss"})
    view = {"hp": hp, "loss": loss, "options": {**LOSSES[loss].options, **options},
            "data": data_view(cfg, "preferences"), "top_k": cfg.teacher_logits.top_k,
            "cache_dtype": cfg.teacher_logits.dtype}
    if cfg.data.validation is not None:
        view["validation"] = data_view(cfg, "validation")
        view["max_new_tokens"] = cfg.evaluate.max_new_tokens
    return view


_TRAIN_ORIGIN = {"hp": "train", "options": "train.loss", **_data_origin("preferences"),
                 "validation": "data.validation", "max_new_tokens": "evaluate.max_new_tokens",
                 "top_k": "teacher_logits.top_k", "cache_dtype": "teacher_logits.dtype"}


def _extraction(cfg: Any, name: str, needs: dict, source: str) -> NodeSpec:
    return NodeSpec(name, "teacher_logits", needs,
                    {"teacher_logits": cfg.teacher_logits, "source": source,
                     "data": data_view(cfg, "preferences")},
                    {"teacher_logits": "teacher_logits", **_data_origin("preferences")})


def build_graph(cfg: Any) -> list[NodeSpec]:
    """The nodes of `cfg.method`, in a valid execution order."""
    from distill_pipeline.losses import LOSSES

    method = cfg.method
    loss = "adpa" if method == "adpa+" else method
    spec = LOSSES[loss]
    nodes = [
        NodeSpec("sft.teacher", "sft", {},
                 {"role": "teacher", "model": cfg.models.teacher, "hp": cfg.sft.teacher,
                  "data": data_view(cfg, "sft")},
                 {"model": "models.teacher", "hp": "sft.teacher", **_data_origin("sft")}),
        NodeSpec("sft.student", "sft", {},
                 {"role": "student", "model": cfg.models.student, "hp": cfg.sft.student,
                  "data": data_view(cfg, "sft")},
                 {"model": "models.student", "hp": "sft.student", **_data_origin("sft")}),
        NodeSpec("teacher_dpo", "teacher_dpo", {"reference": "sft.teacher"},
                 {"hp": cfg.teacher_dpo, "data": data_view(cfg, "preferences")},
                 {"hp": "teacher_dpo", **_data_origin("preferences")}),
    ]

    def rollouts(name: str, policy: str) -> NodeSpec:
        return NodeSpec(name, "rollouts", {"policy": policy},
                        {"rollouts": cfg.rollouts, "data": data_view(cfg, "preferences")},
                        {"rollouts": "rollouts", **_data_origin("preferences")})

    students = {}
    if spec.teacher == "pairs" or method == "adpa+":
        nodes.append(_extraction(cfg, "teacher_logits", {"teacher": "teacher_dpo"}, "pairs"))
    init = "sft.student"
    if method == "adpa+":
        nodes.append(NodeSpec("train.dckd", "train", {"init": "sft.student", "cache": "teacher_logits"},
                              _train_view(cfg, "dckd", cfg.train.dckd_loss),
                              {**_TRAIN_ORIGIN, "options": "train.dckd_loss"}))
        students["train.dckd"] = "train.dckd"
        init = "train.dckd"
    if spec.teacher == "rollouts":
        suffix = ".dckd" if method == "adpa+" else ""
        nodes.append(rollouts("rollouts" + suffix, init))
        nodes.append(_extraction(cfg, "teacher_logits.rollouts",
                                 {"teacher": "teacher_dpo", "reference": "sft.teacher",
                                  "rollouts": "rollouts" + suffix}, "rollouts"))
    needs = {"init": init}
    if spec.teacher:
        needs["cache"] = "teacher_logits.rollouts" if spec.teacher == "rollouts" else "teacher_logits"
    if spec.teacher == "rollouts":
        needs["rollouts"] = "rollouts.dckd" if method == "adpa+" else "rollouts"
    if spec.reference:
        needs["reference"] = "sft.student"
    nodes.append(NodeSpec("train", "train", needs, _train_view(cfg, loss, cfg.train.loss), _TRAIN_ORIGIN))
    students["train"] = "train"
    models = {"sft.student": "sft.student", "sft.teacher": "sft.teacher", "teacher_dpo": "teacher_dpo",
              **students}
    nodes.append(NodeSpec("evaluate", "evaluate", models,
                          {"evaluate": cfg.evaluate, "data": data_view(cfg, "eval")},
                          {"evaluate": "evaluate", **_data_origin("eval")}))
    return nodes


def validate_method_options(cfg: Any, source: str) -> None:
    """Loss options of the chosen method are checked against LOSSES before anything runs."""
    from distill_pipeline.losses import LOSSES
    from distill_pipeline.pipeline.config import ConfigError

    loss = "adpa" if cfg.method == "adpa+" else cfg.method
    _check_options(cfg.train.loss, LOSSES[loss].options, "train.loss", cfg.method, source)
    if cfg.train.dckd_loss and cfg.method != "adpa+":
        raise ConfigError(f"invalid config {source}:\n  train.dckd_loss: only used by method adpa+ "
                          f"(method is {cfg.method}); remove it or use train.loss")
    _check_options(cfg.train.dckd_loss, LOSSES["dckd"].options, "train.dckd_loss", "adpa+ (DCKD phase)", source)


def _check_options(given: dict, accepted: dict, path: str, method: str, source: str) -> None:
    from distill_pipeline.losses import OPTION_CHOICES
    from distill_pipeline.pipeline.config import ConfigError

    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ConfigError(f"invalid config {source}:\n  {path}.{unknown[0]}: unknown option for "
                          f"method {method}; accepted: {', '.join(accepted) or '(none)'}")
    for key, value in given.items():
        default = accepted[key]
        ok = (isinstance(value, bool) if isinstance(default, bool) else
              isinstance(value, (int, float)) and not isinstance(value, bool)
              if isinstance(default, (int, float)) else isinstance(value, type(default)))
        if not ok:
            raise ConfigError(f"invalid config {source}:\n  {path}.{key}: expected "
                              f"{type(default).__name__} like {default!r} (got {value!r})")
        choices = OPTION_CHOICES.get(key)
        if choices and value not in choices:
            raise ConfigError(f"invalid config {source}:\n  {path}.{key}: {value!r} is not one of "
                              f"{', '.join(choices)}")


def jsonable(value: Any) -> Any:
    """Views hold pydantic models; fingerprints and manifests need plain JSON."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def canonical(value: Any) -> str:
    return json.dumps(jsonable(value), sort_keys=True, separators=(",", ":"))
