"""Recipes: the stage graph a method expands into — nodes, their views and their edges.

Every method shares `sft.teacher`, `sft.student`, `teacher_dpo` and `evaluate`; the method adds
its own nodes (rollouts, teacher-logit extractions, student training), decided by what its loss
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
    from distill_pipeline.stages import evaluate, rollouts, sft, teacher_dpo, teacher_logits, train

    nodes = [
        NodeSpec("sft.teacher", "sft", {}, sft.view_for(cfg, "teacher")),
        NodeSpec("sft.student", "sft", {}, sft.view_for(cfg, "student")),
        NodeSpec("teacher_dpo", "teacher_dpo", {"reference": "sft.teacher"}, teacher_dpo.view_for(cfg)),
    ]

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

    models = ["sft.student", "sft.teacher", "teacher_dpo"]
    init = "sft.student"
    if cfg.method in TWO_PHASE:
        init = student("train.dckd", TWO_PHASE[cfg.method][0], init, "dckd_loss")
        models.append(init)
    models.append(student("train", method_loss(cfg.method), init))
    nodes.append(NodeSpec("evaluate", "evaluate", {m: m for m in models}, evaluate.view_for(cfg)))
    return nodes
