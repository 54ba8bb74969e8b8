"""Stages: one module each, exposing NAME, VERSION, KIND ('train' | 'generate' | 'orchestrate':
a stage that only dispatches Ray workers and holds no resources itself) and
`run(view, inputs, out) -> summary`. `view` is the node's own config subtree (what its fingerprint
hashes), `inputs` maps a role to an upstream node's published folder, `out` is the folder to fill.
"""
from __future__ import annotations

import importlib
from typing import Any, Protocol

STAGE_NAMES = ("sft", "teacher_dpo", "rollouts", "teacher_logits", "train", "evaluate")


class Stage(Protocol):
    NAME: str
    VERSION: int
    KIND: str

    def run(self, view: dict, inputs: dict, out: Any) -> dict: ...


def get_stage(name: str) -> Stage:
    if name not in STAGE_NAMES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    return importlib.import_module(f"distill_pipeline.stages.{name}")  # type: ignore[return-value]
