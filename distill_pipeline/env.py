"""The process environment a stage runs in: where the default cache lives, whether this process
is a Ray driver or worker, and what a task on another node needs of the driver.

Ground floor: imports nothing from the package (Ray only inside the functions that ask it).

On a cluster, tasks run in workers started by `ray start`: they have their node's environment and
working directory, not the driver's. The driver resolves what a worker needs (`driver_context`:
the forwarded environment with an absolute `DISTILL_CACHE_DIR`, and its cwd) and every task or
actor applies it first (`apply_driver_context`, or `worker_options` for a Ray actor/task).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

# Environment a stage reads, by prefix: the pipeline's own settings (cache dir, mirror, service
# token, progress), the Hugging Face hub and cache, object-store credentials/endpoints, and the
# experiment trackers' settings (report_to: WANDB_MODE, WANDB_API_KEY, MLFLOW_TRACKING_URI, …).
FORWARDED_PREFIXES = ("DISTILL_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "AWS_", "GOOGLE_",
                      "AZURE_", "S3_", "WANDB_", "MLFLOW_")


def default_root() -> Path:
    """The default teacher-logit store: `$DISTILL_CACHE_DIR/teacher-logits`, else under
    `$XDG_CACHE_HOME` (or ~/.cache)/distill-pipeline."""
    base = os.environ.get("DISTILL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "distill-pipeline")
    return Path(base) / "teacher-logits"


def ray_running() -> bool:
    """Is this process a Ray driver or worker (so work can be handed to more Ray workers)?
    Never imports Ray when nothing has."""
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized()


def forwarded_env() -> dict[str, str]:
    """What a stage running on another node needs of the driver's environment (workers started
    by `ray start` have that node's environment, not the driver's). `DISTILL_CACHE_DIR` is
    always set, to the driver's absolute default when unset, so the default store is the
    driver's — which must then be on storage every node shares."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}
    env["DISTILL_CACHE_DIR"] = str(default_root().parent.resolve())
    return env


def driver_context() -> dict[str, Any]:
    """Passed with every stage task: the driver's forwarded environment and working directory
    (relative paths in a config — data files, a store, a model directory — then mean on a
    worker what they mean on the driver)."""
    return {"env": forwarded_env(), "cwd": os.getcwd()}


def apply_driver_context(context: dict[str, Any] | None) -> None:
    """In a stage task or a training worker: take the driver's environment and, when the
    directory exists here (shared storage), its working directory."""
    if not context:
        return
    os.environ.update(context.get("env") or {})
    cwd = context.get("cwd")
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)


def worker_options(n: int, gpus: float) -> dict[str, Any]:
    """Ray `.options()` for `n` helper workers (extraction actors, rollout tasks) started from a
    stage task: a GPU worker's real resource is its GPU (one CPU beside it); CPU workers take
    fractional CPUs, so `n` of them fit beside the stage task on a small machine. Each is a new
    process with its node's environment, so it gets the driver's (`forwarded_env`)."""
    import ray

    if gpus:
        cpus = 1.0
    else:
        free = ray.available_resources().get("CPU", 1.0)
        cpus = max(0.01, min(1.0, free / max(1, n)))
    return {"num_cpus": cpus, "num_gpus": gpus, "runtime_env": {"env_vars": forwarded_env()}}
