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
- `run(view, inputs, out) -> summary`, and optionally `report(folder) -> str` (printed after it).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict

STAGE_NAMES = ("sft", "teacher_dpo", "rollouts", "teacher_logits", "train", "evaluate")
ANY_ROLE = "*"  # a stage that reads any number of upstream nodes (evaluate: every model)


class View(BaseModel):
    """The config a node reads. Subclasses declare fields and `origins`."""
    model_config = ConfigDict(frozen=True, extra="forbid")
    NEUTRAL: ClassVar[frozenset[str]] = frozenset()  # dotted field paths left out of the fingerprint
    LINEAGE: ClassVar[tuple[str, ...]] = ()

    def origins(self) -> dict[str, str | None]:
        """Field → the config path it was read from (None: fixed by the recipe, not the config)."""
        raise NotImplementedError(f"{type(self).__name__} must say where each field comes from")

    def fingerprint_payload(self) -> dict:
        """What the node's fingerprint hashes: the view as JSON, minus NEUTRAL fields."""
        exclude: dict[str, Any] = {}
        for dotted in self.NEUTRAL:
            *parents, leaf = dotted.split(".")
            node = exclude
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = True
        return self.model_dump(mode="json", exclude=exclude or None)

    def config_paths(self) -> dict[str, str | None]:
        """Every leaf of the view (dotted) → the config path it holds (None: recipe constant)."""
        out: dict[str, str | None] = {}
        dump = self.model_dump(mode="json")
        origins = self.origins()
        for name in type(self).model_fields:
            value, origin = getattr(self, name), origins[name]
            if isinstance(value, View):
                out.update({f"{name}.{k}": v for k, v in value.config_paths().items()})
                continue
            for leaf in flatten(dump[name]):
                out[f"{name}.{leaf}" if leaf else name] = (
                    None if origin is None else f"{origin}.{leaf}" if leaf else origin)
        return out

    def lineage(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.LINEAGE}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts → {dotted path: leaf}; a non-dict is one leaf with path ''."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


@dataclass(frozen=True)
class Stage:
    version: int
    kind: str                          # 'train' | 'generate' | 'orchestrate' (dispatches Ray workers)
    view: type[View]
    inputs: dict[str, str]             # role → what that upstream folder provides
    outputs: tuple[str, ...]           # paths published in the node's folder
    run: Callable[[Any, dict[str, Path], Path], dict]
    report: Callable[[Path], str] | None = None


def get_stage(name: str) -> Stage:
    if name not in STAGE_NAMES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    return importlib.import_module(f"distill_pipeline.stages.{name}").STAGE
