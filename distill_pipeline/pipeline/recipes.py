"""Recipes: the stage graph a method expands into — nodes, their views and their edges.

Every method shares `sft.student`, `teacher_dpo` and `evaluate`, and `sft.teacher` where the
teacher DPO trains from it or the loss reads a reference teacher; each of those three is an
`import_model` node instead when the config imports it (`models.student_init`,
`models.teacher_dpo`, `models.reference`; config.IMPORTS). The method adds its own nodes (rollouts, teacher-logit extractions, student training), decided by what its loss
reads (`LossSpec.cache`, `.responses`, `.policy_ref`). A node is one stage instance: its name
(`<stage>` or `<stage>.<variant>`), the upstream nodes it reads by role, and its view, built by
the stage's own `view_for` — this module only wires views and edges.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distill_pipeline.losses import LOSSES, TWO_PHASE, method_loss
from distill_pipeline.stages import View


@dataclass(frozen=True)
class NodeSpec:
    name: str
    stage: str
    needs: dict[str, str]  # role → upstream node name
    view: View


def build_graph(cfg: Any) -> list[NodeSpec]:
    """The nodes of `cfg.method`, in a valid execution order."""
    from distill_pipeline.config import IMPORTS, trained_nodes
    from distill_pipeline.stages import (evaluate, import_model, rollouts, sft, teacher_dpo,
                                         teacher_logits, train)

    imported = {node: role for role, node in IMPORTS.items() if getattr(cfg.models, role) is not None}
    trained = trained_nodes(cfg)

    def model_node(name: str, stage: str, make_view, needs: dict | None = None) -> None:
        if name in imported:
            nodes.append(NodeSpec(name, "import_model", {}, import_model.view_for(cfg, imported[name])))
        elif name in trained or stage != "sft":
            nodes.append(NodeSpec(name, stage, needs or {}, make_view()))

    nodes: list[NodeSpec] = []
    model_node("sft.teacher", "sft", lambda: sft.view_for(cfg, "teacher"))
    model_node("sft.student", "sft", lambda: sft.view_for(cfg, "student"))
    model_node("teacher_dpo", "teacher_dpo", lambda: teacher_dpo.view_for(cfg), {"reference": "sft.teacher"})

    def extraction(source: str, **needs: str) -> str:
        name = "teacher_logits" if source == "pairs" else "teacher_logits.rollouts"
        nodes.append(NodeSpec(name, "teacher_logits", {"teacher": "teacher_dpo", **needs},
                              teacher_logits.view_for(cfg, source)))
        return name

    def student(name: str, loss: str, init: str, options_key: str = "loss") -> str:
        spec = LOSSES[loss]
        needs = {"init": init}
        if spec.cache == "pairs":  # one extraction on y_w/y_l, shared by every phase that reads it
            needs["cache"] = ("teacher_logits" if any(n.name == "teacher_logits" for n in nodes)
                              else extraction("pairs"))
        if spec.cache == "rollouts":
            policy_node = "rollouts" + (".dckd" if init == "train.dckd" else "")
            nodes.append(NodeSpec(policy_node, "rollouts", {"policy": init}, rollouts.view_for(cfg)))
            needs["rollouts"] = policy_node
            needs["cache"] = extraction("rollouts", reference="sft.teacher", rollouts=policy_node)
        if spec.policy_ref:
            needs["reference"] = "sft.student"
        nodes.append(NodeSpec(name, "train", needs, train.view_for(cfg, loss, options_key)))
        return name

    models = [m for m in ("sft.student", "sft.teacher", "teacher_dpo") if any(n.name == m for n in nodes)]
    init = "sft.student"
    if cfg.method in TWO_PHASE:
        init = student("train.dckd", TWO_PHASE[cfg.method][0], init, "dckd_loss")
        models.append(init)
    models.append(student("train", method_loss(cfg.method), init))
    nodes.append(NodeSpec("evaluate", "evaluate", {m: m for m in models}, evaluate.view_for(cfg)))
    return nodes
