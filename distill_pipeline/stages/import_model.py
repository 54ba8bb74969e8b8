"""Stage `import_model`: a checkpoint the team already has, used in place of a trained node.

`models.teacher_dpo` (an aligned teacher), `models.reference` (the model it was DPO-trained from)
and `models.student_init` (an SFT'd student) each replace the node that would train it —
`teacher_dpo`, `sft.teacher`, `sft.student` — with an import node of the same name: nothing is
trained, and the node's fingerprint is the checkpoint's identity (`models.import_identity`: its
content identity — weights, forward-relevant config, tokenizer, chat template — folded with the
dtype it is loaded in and `data.chat_template` when those differ from the checkpoint's own). A
copy of the same files elsewhere is the same import: its path is a LAYOUT field, so moving it
re-imports and reruns nothing downstream. Produces `imported.json` (where the model is, the dtype,
template and identity); downstream stages read it through `models.model_ref` and check the
identity again on every load, so files changed after planning are refused, never used.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from distill_pipeline.config import IMPORTS, ModelSpec
from distill_pipeline.stages import Stage, View

Role = Literal[tuple(IMPORTS)]  # type: ignore[valid-type]


class ImportView(View):
    role: Role
    model: ModelSpec
    chat_template: str | None = None
    identity: str

    # Where the files are is not what they are: a copy elsewhere is the same import.
    LAYOUT = frozenset({"model.name_or_path"})

    def origins(self) -> dict[str, str | None]:
        return {"role": None, "model": f"models.{self.role}", "chat_template": "data.chat_template",
                "identity": None}


def view_for(cfg, role: str) -> ImportView:
    """Resolves the checkpoint (local directory or cached hub snapshot) and computes its identity:
    hashing the weights the first time, a stat per file afterwards (memoised)."""
    from distill_pipeline.models import import_identity, import_path

    spec, template = getattr(cfg.models, role), cfg.data.template()
    path = import_path(spec.name_or_path, f"models.{role}: {spec.name_or_path!r}")
    return ImportView(role=role, model=spec, chat_template=template,
                      identity=import_identity(path, spec.dtype, template))


def run(view: ImportView, inputs: dict, out: Path) -> dict:
    from distill_pipeline.models import ModelError, import_identity, import_path

    spec = view.model
    path = import_path(spec.name_or_path, f"models.{view.role}: {spec.name_or_path!r}")
    identity = import_identity(path, spec.dtype, view.chat_template)
    if identity != view.identity:
        raise ModelError(f"models.{view.role}: {spec.name_or_path} changed while the run was planned "
                         f"(identity {view.identity[:12]} → {identity[:12]}); run again")
    (out / "imported.json").write_text(json.dumps(
        {"role": view.role, "name_or_path": spec.name_or_path, "path": str(Path(path).resolve()),
         "dtype": spec.dtype, "chat_template": view.chat_template, "identity": identity}, indent=2))
    return {"identity": identity[:12], "path": str(path)}


def describe(view: ImportView) -> str:
    return f"imported {view.identity[:12]} from {view.model.name_or_path}"


STAGE = Stage(version=1, kind="orchestrate", view=ImportView, inputs={},
              outputs=("imported.json",), run=run, describe=describe)
