"""Stages: one module each (its name is the stage's name), exposing `STAGE`, a `Stage` record.

A stage owns
- its **view** (a frozen pydantic `View`): exactly the config it reads. `recipes.py` builds one
  per node with the stage's `view_for(cfg, …)`; the runner hashes `fingerprint_payload()` into the
  node's fingerprint and hands the view to `run`. `origins()` says which config path each field
  was read from (for `status` and the test that every config field changes exactly the nodes that
  read it); `NEUTRAL` lists fields that change neither values nor layout (not fingerprinted);
  `LINEAGE` lists fields that tell two nodes of the same name apart across methods (`status`
  explains a pending node against the last state of its own lineage);
- its **inputs**: the roles it may read (upstream node folders), and its **outputs**: the paths it
  publishes in its folder (the runner refuses to publish a folder that lacks one);
- `run(view, inputs, out) -> summary`, and optionally `report(folder) -> str` (printed after it)
  and `check_output(folder) -> reason | None` (a published output that is no longer usable — an
  extraction whose entries left the store — makes the node run again), `describe(view)`
  (what `status` says of a published node, e.g. an import's identity and path), and
  `preflight(view) -> str` (checks of a node about to run that must pass before any compute —
  e.g. that the store an extraction writes into exists — raising with the fix, else one line).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from distill_pipeline.view import View, flatten  # noqa: F401 (re-exported for stages)

STAGE_NAMES = ("import_model", "sft", "teacher_dpo", "rollouts", "teacher_logits", "train", "evaluate")
ANY_ROLE = "*"  # a stage that reads any number of upstream nodes (evaluate: every model)


@dataclass(frozen=True)
class Stage:
    version: int
    kind: str                          # 'train' | 'generate' | 'orchestrate' (dispatches Ray workers)
    view: type[View]
    inputs: dict[str, str]             # role → what that upstream folder provides
    outputs: tuple[str, ...]           # paths published in the node's folder
    run: Callable[[Any, dict[str, Path], Path], dict]
    report: Callable[[Path], str] | None = None
    # Is a published folder still usable? None if so, else why not (then the node reruns).
    check_output: Callable[[Path], str | None] | None = None
    # What `status` says of a published node instead of "up to date (<folder>)".
    describe: Callable[[Any], str] | None = None
    # Checks before any compute for a node about to run: raises with the fix, else a line to print.
    preflight: Callable[[Any], str] | None = None


def get_stage(name: str) -> Stage:
    if name not in STAGE_NAMES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    return importlib.import_module(f"distill_pipeline.stages.{name}").STAGE
