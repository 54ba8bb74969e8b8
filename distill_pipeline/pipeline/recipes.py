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


def build_graph(cfg: Any) -> list[NodeSpec]:
    """The nodes of `cfg.method`, in a valid execution order."""
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
        NodeSpec("rollouts", "rollouts", {"policy": "sft.student"},
                 {"rollouts": cfg.rollouts, "data": data_view(cfg, "preferences")},
                 {"rollouts": "rollouts", **_data_origin("preferences")}),
    ]
    models = {"sft.student": "sft.student", "sft.teacher": "sft.teacher", "teacher_dpo": "teacher_dpo"}
    nodes.append(NodeSpec("evaluate", "evaluate", models,
                          {"evaluate": cfg.evaluate, "data": data_view(cfg, "eval")},
                          {"evaluate": "evaluate", **_data_origin("eval")}))
    return nodes


def validate_method_options(cfg: Any, source: str) -> None:
    """Loss options of the chosen method are checked against LOSSES before anything runs."""
    from distill_pipeline.losses import LOSSES
    from distill_pipeline.pipeline.config import ConfigError

    loss = "adpa" if cfg.method == "adpa+" else cfg.method
    accepted = LOSSES[loss].options
    unknown = sorted(set(cfg.train.loss) - set(accepted))
    if unknown:
        raise ConfigError(f"invalid config {source}:\n  train.loss.{unknown[0]}: unknown option for "
                          f"method {cfg.method}; accepted: {', '.join(accepted) or '(none)'}")
    for key, value in cfg.train.loss.items():
        default = accepted[key]
        ok = (isinstance(value, bool) if isinstance(default, bool) else
              isinstance(value, (int, float)) and not isinstance(value, bool)
              if isinstance(default, (int, float)) else isinstance(value, type(default)))
        if not ok:
            raise ConfigError(f"invalid config {source}:\n  train.loss.{key}: expected "
                              f"{type(default).__name__} like {default!r} (got {value!r})")


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
