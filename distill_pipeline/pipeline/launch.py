"""Running one node's stage where the scheduler put it: in a plain Ray task, or — for a training
node with `workers: N > 1` — on N Ray Train workers.

`execute_node` is the body of every stage task (`runner._schedule` submits it; `--no-ray` calls it
inline): it applies the driver's context (cwd, forwarded environment: `env.driver_context`), then
runs the stage into the node's partial folder, or hands a data-parallel node to `launch`. `launch`
starts a Ray Train `TorchTrainer` (gloo on CPU, nccl on GPU) whose every worker applies the driver's
context and runs the same stage function with the process group up (`parallel.group()` tells each
piece of the stage who it is). Rank 0's summary comes back through a file it writes into the
node's partial folder (the run dir is shared storage on a cluster anyway).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from distill_pipeline.config import TrainHP
from distill_pipeline.env import apply_driver_context
from distill_pipeline.parallel import group
from distill_pipeline.stages import get_stage

SUMMARY = ".workers-summary.json"


def workers_of(view: Any) -> int:
    """How many data-parallel workers a node's view asks for: a training view's `hp.workers`,
    1 for every other stage."""
    hp = getattr(view, "hp", None)
    return hp.workers if isinstance(hp, TrainHP) else 1


def execute_node(stage_name: str, view: Any, inputs: dict[str, str], partial: str,
                 num_threads: int | None = None, context: dict | None = None,
                 worker_resources: tuple[float, float] = (1, 0)) -> dict:
    """Run one stage into its partial folder; returns the stage summary. Runs in a Ray task,
    with the driver's environment and working directory. A training node with `workers > 1`
    runs on that many Ray Train workers, each holding `worker_resources` (CPUs, GPUs); this task
    only waits for them."""
    apply_driver_context(context)
    out = Path(partial)
    out.mkdir(parents=True, exist_ok=True)
    if workers_of(view) > 1:
        cpus, gpus = worker_resources
        return launch(stage_name, view, inputs, out, cpus=cpus, gpus=gpus, context=context)
    return _run_stage(stage_name, view, inputs, out, num_threads)


def _run_stage(stage_name: str, view: Any, inputs: dict[str, str], out: Path, threads: int | None) -> dict:
    if threads:
        import torch

        torch.set_num_threads(threads)
    return get_stage(stage_name).run(view, {k: Path(v) for k, v in inputs.items()}, out)


def _worker(config: dict) -> None:
    """The body of every Ray Train worker of a data-parallel node."""
    apply_driver_context(config["context"])
    out = Path(config["out"])
    summary = _run_stage(config["stage"], config["view"], config["inputs"], out, config["threads"])
    if group().main:
        tmp = out / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary))
        os.replace(tmp, out / SUMMARY)


def launch(stage: str, view: Any, inputs: dict[str, str], out: Path, *, cpus: float, gpus: float,
           context: dict | None) -> dict:
    """Run `stage` on `workers_of(view)` Ray Train workers; returns rank 0's summary. A worker
    that dies fails the node (its checkpoint stays: rerunning resumes from it)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    workers = workers_of(view)
    (out / SUMMARY).unlink(missing_ok=True)
    storage = out.with_name(out.name + ".ray-train")
    shutil.rmtree(storage, ignore_errors=True)  # a failed attempt's run state: resuming is ours
    per_worker = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"stage": stage, "view": view, "inputs": inputs, "out": str(out),
                           "context": context, "threads": max(1, int(cpus))},
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(gpus),
                                     resources_per_worker=per_worker),
        run_config=RunConfig(storage_path=str(storage), name="workers",
                             failure_config=FailureConfig(max_failures=0)))
    result = trainer.fit()
    if getattr(result, "error", None):
        raise RuntimeError(f"a training worker failed: {result.error}")
    summary = json.loads((out / SUMMARY).read_text())
    (out / SUMMARY).unlink()
    shutil.rmtree(storage, ignore_errors=True)
    return summary
