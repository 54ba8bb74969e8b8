"""torch.distributed for the training loop: who this process is among a node's data-parallel
workers, and the collectives and model placement the loop needs.

A training node with `workers: N > 1` runs its stage on N Ray Train workers (`pipeline/launch.py`)
with the process group up; `training.train_loop` asks `group()` for its rank, places the model
(`prepare`: precision, gradient checkpointing, DDP or FSDP2 `fully_shard` per decoder layer),
accumulates (`accumulating`), all-reduces the step's metrics (`all_reduce_sums`) and clips the
global gradient norm (`clip_grad_norm`). With one process every helper is a no-op.
Ground floor: imports nothing from the package.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator


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

    precision = hp.precision
    # saved back in the dtype it was loaded in (`training.save_trained`): models.*.dtype
    model.distill_saved_dtype = next(model.parameters()).dtype
    model.to(torch.bfloat16 if precision == "bf16" else torch.float32)
    if precision == "bf16" and any(not p.requires_grad for p in model.parameters()):
        for p in model.parameters():  # LoRA: a bfloat16 base, float32 adapters (and AdamW state)
            if p.requires_grad:
                p.data = p.data.float()
    if hp.gradient_checkpointing:
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

    if hp.precision != "bf16-mixed":
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


def full_state_dict(model: Any, *, trainable_only: bool = False) -> dict | None:
    """The whole model's state dict on rank 0 (None elsewhere); every rank must call it.
    `trainable_only`: without frozen parameters (LoRA: the adapters, not the base)."""
    if group().world == 1:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                              ignore_frozen_params=trainable_only))
    return sd if group().main else None
