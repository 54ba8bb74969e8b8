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

from distill_pipeline import trackers
from distill_pipeline.config import TrainHP
from distill_pipeline.env import apply_driver_context
from distill_pipeline.parallel import group
from distill_pipeline.stages import get_stage

SUMMARY = ".workers-summary.json"
FAILURE_LOG = "workers-failure.log"  # beside the partial folder: Ray's whole report of a failure


class WorkerFailed(RuntimeError):
    """A data-parallel worker died or raised: one message (which worker, what happened, where the
    partial output and its checkpoint are, that a rerun resumes); Ray's report is in a file."""


def workers_of(view: Any) -> int:
    """How many data-parallel workers a node's view asks for: a training view's `hp.workers`,
    1 for every other stage."""
    hp = getattr(view, "hp", None)
    return hp.workers if isinstance(hp, TrainHP) else 1


def execute_node(stage_name: str, view: Any, inputs: dict[str, str], partial: str,
                 num_threads: int | None = None, context: dict | None = None,
                 worker_resources: tuple[float, float] = (1, 0),
                 tracking: trackers.NodeRun | None = None) -> dict:
    """Run one stage into its partial folder; returns the stage summary. Runs in a Ray task,
    with the driver's environment and working directory. A training node with `workers > 1`
    runs on that many Ray Train workers, each holding `worker_resources` (CPUs, GPUs); this task
    only waits for them. `tracking`: the node's `report_to` trackers and what they are told."""
    apply_driver_context(context)
    out = Path(partial)
    out.mkdir(parents=True, exist_ok=True)
    if workers_of(view) > 1:
        cpus, gpus = worker_resources
        return launch(stage_name, view, inputs, out, cpus=cpus, gpus=gpus, context=context,
                      tracking=tracking)
    with trackers.bound(tracking):
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
    with trackers.bound(config["tracking"]):  # opened by rank 0 only (training.train_loop)
        summary = _run_stage(config["stage"], config["view"], config["inputs"], out, config["threads"])
    if group().main:
        tmp = out / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary))
        os.replace(tmp, out / SUMMARY)


def launch(stage: str, view: Any, inputs: dict[str, str], out: Path, *, cpus: float, gpus: float,
           context: dict | None, tracking: trackers.NodeRun | None = None) -> dict:
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
                           "context": context, "threads": max(1, int(cpus)), "tracking": tracking},
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(gpus),
                                     resources_per_worker=per_worker),
        run_config=RunConfig(storage_path=str(storage), name="workers",
                             failure_config=FailureConfig(max_failures=0)))
    log = out.with_name(out.name + "." + FAILURE_LOG)
    log.unlink(missing_ok=True)
    try:
        result = trainer.fit()
        error = getattr(result, "error", None)
    except Exception as exc:  # Ray Train raises TrainingFailedError (WorkerGroupError, …)
        error = exc
    if error is not None:
        raise _failure(error, out, log, workers) from None
    summary = json.loads((out / SUMMARY).read_text())
    (out / SUMMARY).unlink()
    shutil.rmtree(storage, ignore_errors=True)
    return summary


def _failure(error: BaseException, out: Path, log: Path, workers: int) -> WorkerFailed:
    """`WorkerFailed` for Ray Train's `error`, whose whole text (every worker's traceback, Ray's
    chained errors) goes to `log` instead of the terminal."""
    import traceback

    try:
        log.write_text("".join(traceback.format_exception(error)) + "\n" + _where_ray_logs())
        saved = f"Ray's full report: {log}"
    except OSError as exc:
        saved = f"Ray's full report could not be saved ({exc.strerror or exc})"
    failures = sorted((getattr(error, "worker_failures", None) or {}).items())
    died = [rank for rank, exc in failures if _died(exc)]
    if died:
        ranks, one = ", ".join(map(str, died)), len(died) == 1
        what = (f"worker rank{'' if one else 's'} {ranks} of {workers} died: "
                f"{'its process was' if one else 'their processes were'} killed or crashed (kill -9, "
                "the out-of-memory killer, a lost node)"
                + ("; the other workers stopped with it" if len(died) < workers else ""))
    elif failures:
        rank, exc = failures[0]
        others = f" (and {len(failures) - 1} more worker(s))" if len(failures) > 1 else ""
        what = f"worker rank {rank} of {workers} raised {_one_line(exc)}{others}"
    else:
        what = f"Ray Train failed: {_one_line(error)}"
    step = _checkpoint_step(out / "checkpoint")
    resume = (f"The node's last checkpoint (step {step}) is in {out / 'checkpoint'}: rerun the same "
              "command to resume from it" if step is not None else
              "No checkpoint was written yet: rerunning the same command starts the node over")
    return WorkerFailed(f"data-parallel training stopped: {what}. {resume}. {saved}")


def _died(exc: BaseException) -> bool:
    """Did this worker's process die (rather than raise)? Ray Train reports a failed health
    check whose cause is the actor's death."""
    for cause in (exc, getattr(exc, "health_check_failure", None), exc.__cause__):
        if cause is not None and type(cause).__name__ in (
                "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "RayActorError",
                "WorkerHealthCheckFailedError"):
            return True
    return False


def _one_line(exc: BaseException) -> str:
    """`Type: message` of the exception a worker raised (unwrapped from Ray Train's wrapper),
    on one line."""
    exc = getattr(exc, "_base_exc", None) or exc
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = " ".join(lines[:3]) or "(no message)"
    return f"{type(exc).__name__}: {text if len(text) <= 500 else text[:500] + '…'}"


def _where_ray_logs() -> str:
    try:
        import ray

        logs = ray._private.worker._global_node.get_logs_dir_path()
    except Exception:
        return ""
    return (f"Every Ray process's own log is in {logs} (on each host of the cluster); what Ray "
            "Train printed while the driver ran is in distill-pipeline-ray-train.log there, on "
            "the driver's host.\n")


def _checkpoint_step(ckpt: Path) -> int | None:
    """The step of the node's last complete checkpoint (several workers: `loop.json`; `.old`
    when a kill fell inside the swap, which `checkpoint.recover` resolves on resume)."""
    for marker in (ckpt / "loop.json", ckpt.with_name(ckpt.name + ".old") / "loop.json"):
        try:
            return int(json.loads(marker.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None
