"""Data-parallel training: one stage body, run by N workers under Ray Train.

A training node with `workers: 1` (the default) runs its stage in one plain Ray task, exactly as
before. With `workers: N > 1` the node's task starts a Ray Train `TorchTrainer` of N workers
(gloo on CPU, nccl on GPU); every worker runs the same stage function with the process group up,
and the pieces that care ask `group()` who they are:

- `training.train_loop` wraps the model (`prepare`: DDP, or FSDP2 `fully_shard` per decoder layer),
  gives rank r the micro-batches r·A … r·A+A−1 of every step of N·A (so N workers × accumulation A
  see exactly what one worker with accumulation N·A sees, normalised by the same step totals),
  all-reduces the step's metrics, and writes sharded checkpoints with torch.distributed.checkpoint;
- rank 0 alone logs, writes files and saves the model (`save_trained` gathers FSDP shards first);
- the DPO reference is placed like the policy and scores a 1/N slice of the pairs on each rank.

Ray Train starts its workers in their own working directory, without the driver's environment:
each worker applies the driver's context first (`raysetup.apply_driver_context`), like every other
stage task. The workers' results come back through a summary file that rank 0 writes into the
node's partial folder (the run dir is shared storage on a cluster anyway).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

SUMMARY = ".workers-summary.json"


@dataclass(frozen=True)
class Group:
    """This process's place among the data-parallel workers of one training node."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def group() -> Group:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def barrier() -> None:
    if group().world > 1:
        import torch.distributed as dist

        dist.barrier()


def workers_of(view: Any) -> int:
    """How many data-parallel workers a node's view asks for (1 for every non-training stage)."""
    hp = getattr(view, "hp", None)
    return int(getattr(hp, "workers", 1) or 1)


# ------------------------------------------------------------------ inside a worker

def _decoder_layers(model: Any) -> list[Any]:
    """The modules FSDP shards one by one: Hugging Face names them in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"strategy fsdp: cannot find the decoder layers of {type(model).__name__} "
                         "(no `_no_split_modules`); use strategy: ddp")
    return layers


def prepare(model: Any, hp: Any) -> Any:
    """Apply `precision`, `gradient_checkpointing` and, with several workers, the strategy.
    `fp32` and `bf16-mixed` train float32 weights (a model loaded in bfloat16 is upcast: AdamW on
    bfloat16 weights loses small updates), `bf16` trains bfloat16 ones. Returns what the loss
    calls (the DDP wrapper, or the model itself: FSDP2 and one worker change it in place); the
    optimizer takes `model.parameters()` afterwards."""
    import torch

    precision = getattr(hp, "precision", "fp32")
    # saved back in the dtype it was loaded in (`training.save_trained`): models.*.dtype
    model.distill_saved_dtype = next(model.parameters()).dtype
    model.to(torch.bfloat16 if precision == "bf16" else torch.float32)
    if getattr(hp, "gradient_checkpointing", False):
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not support it")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    if group().world == 1:
        return model
    return shard(model, hp.strategy, mixed=precision == "bf16-mixed")


def shard(model: Any, strategy: str, *, mixed: bool = False) -> Any:
    """The model placed for data parallelism: DDP-wrapped, or FSDP2-sharded in place (`mixed`:
    layers gathered and computed in bfloat16, gradients reduced in float32)."""
    if strategy == "fsdp":
        import torch
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if mixed else MixedPrecisionPolicy())
        for layer in _decoder_layers(model):
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)


def autocast(model: Any, hp: Any):
    """bfloat16 autocast around the forward for `precision: bf16-mixed`, else nothing."""
    import torch

    if getattr(hp, "precision", "fp32") != "bf16-mixed":
        return contextlib.nullcontext()
    dev = next(model.parameters()).device
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def accumulating(net: Any, sync: bool) -> Iterator[None]:
    """DDP: gradients of this backward are all-reduced only when `sync` (the step's last
    micro-batch of this rank); before that they accumulate locally. FSDP reduce-scatters after
    every micro-batch and accumulates its gradient shards: skipping that would keep a whole
    unsharded gradient between micro-batches, which is what sharding is for avoiding."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(net, DistributedDataParallel) and not sync:
        with net.no_sync():
            yield
        return
    yield


def all_reduce_sums(values: dict[str, Any]) -> dict[str, Any]:
    """Per-key sums over the workers (one collective for the whole dict)."""
    if group().world == 1 or not values:
        return values
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    first = next(v for v in values.values() if hasattr(v, "device"))
    flat = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=first.device).reshape(())
                        for k in keys])
    dist.all_reduce(flat)
    return dict(zip(keys, flat.unbind()))


def clip_grad_norm(model: Any, max_norm: float) -> Any:
    """Gradient clipping on the global gradient (FSDP's sharded gradients included); returns the
    norm before clipping as a plain tensor."""
    import torch

    params = [p for p in model.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(total, "full_tensor"):  # DTensor: the shards' partial norms reduced
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if group().world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    if group().world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * group().world
    dist.all_gather_object(out, obj)
    return out


def full_state_dict(model: Any) -> dict | None:
    """The whole model's state dict on rank 0 (None elsewhere); every rank must call it."""
    if group().world == 1:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if group().main else None


def rng_state() -> dict:
    """This process's CPU and (when used) CUDA RNG states: dropout resumes where it was."""
    import torch

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Any) -> None:
    import torch

    if not isinstance(state, dict):  # a checkpoint from before the CUDA state was kept
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt: Path, model: Any, opt: Any, loop: dict) -> None:
    """A sharded checkpoint (torch.distributed.checkpoint) of model + optimizer, the loop position
    and every rank's RNG state; swapped in atomically by rank 0 once every rank has written."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    g = group()
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if g.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "state"))
    torch.save(rng_state(), tmp / f"rng-{g.rank}.pt")
    barrier()
    if g.main:
        from distill_pipeline.training import swap_in

        (tmp / "loop.json").write_text(json.dumps({**loop, "workers": g.world}))
        swap_in(tmp, ckpt)
    barrier()


def load_checkpoint(ckpt: Path, model: Any, opt: Any) -> dict | None:
    """The loop position of a checkpoint written by `save_checkpoint` (None: there is none),
    with model, optimizer and this rank's RNG restored."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    loop = None
    if group().main:  # rank 0 decides for all (each rank's view of a shared disk may lag)
        from distill_pipeline.training import recover

        if recover(ckpt, "loop.json"):
            loop = json.loads((ckpt / "loop.json").read_text())
    loop = broadcast(loop)
    if loop is None:
        return None
    if loop.get("workers") != group().world:
        raise RuntimeError(f"{ckpt} was written by {loop.get('workers')} workers, not {group().world}")
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(ckpt / "state"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    set_rng_state(torch.load(ckpt / f"rng-{group().rank}.pt", weights_only=False))
    return loop


# ------------------------------------------------------------------ the launcher

def _worker(config: dict) -> None:
    from distill_pipeline.pipeline.raysetup import apply_driver_context
    from distill_pipeline.stages import get_stage

    apply_driver_context(config["context"])
    if config["threads"]:
        import torch

        torch.set_num_threads(config["threads"])
    out = Path(config["out"])
    summary = get_stage(config["stage"]).run(config["view"], {k: Path(v) for k, v in config["inputs"].items()},
                                             out)
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
