"""Resume checkpoints of the training loop: one write, read and recovery path, for one process
and for the ranks of a data-parallel node.

    <work_dir>/checkpoint/        the newest complete checkpoint
        state.pt                  one process: model + optimizer state, loop position, RNG
        state/, rng-<rank>.pt,    several workers: torch.distributed.checkpoint shards of model +
        loop.json                 optimizer, every rank's RNG, the loop position and world size

`save` writes into `checkpoint.tmp` and swaps it in (`swap_in`: the one atomic step, rank 0 only,
after every rank has written); `load` first resolves what a crash mid-swap left (`recover`), then
restores model, optimizer and RNG and returns the loop position (`{"step", "epoch", "consumed"}`).
Ground floor: imports only `parallel` (which rank this is).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from distill_pipeline import parallel

SINGLE, SHARDED = "state.pt", "loop.json"  # the file that marks each kind complete


def swap_in(tmp: Path, ckpt: Path) -> None:
    """Make the complete checkpoint `tmp` the checkpoint: `ckpt` → `.old`, `tmp` → `ckpt`, drop
    `.old`. A crash anywhere leaves a state `recover` resolves to the newest complete one."""
    old = ckpt.with_name(ckpt.name + ".old")
    if ckpt.exists():
        shutil.rmtree(old, ignore_errors=True)  # a crash while it was being deleted last time
        ckpt.rename(old)
    tmp.rename(ckpt)
    shutil.rmtree(old, ignore_errors=True)


def recover(ckpt: Path, marker: str) -> bool:
    """Resolve what an interrupted `swap_in` left, keeping the newest complete checkpoint; True
    when there is one. `tmp` is complete exactly when `.old` exists beside it without `ckpt`
    (`ckpt` is renamed away only once `tmp` was fully written)."""
    tmp, old = ckpt.with_name(ckpt.name + ".tmp"), ckpt.with_name(ckpt.name + ".old")
    if not ckpt.exists() and old.exists():
        (tmp if (tmp / marker).exists() else old).rename(ckpt)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return (ckpt / marker).exists()


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


def _frozen(model: Any) -> set[str]:
    """Names of the parameters that do not train (LoRA: the base's; otherwise none), every name of
    a tied weight included (the state dict holds each of them)."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def _state_options(model: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen = bool(_frozen(model))  # saved without them, so loaded without them too: every
    # trainable key must be in the checkpoint (dcp.load raises otherwise), frozen ones are absent
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen)


def save(ckpt: Path, model: Any, opt: Any, position: dict) -> None:
    """Checkpoint `model` (what the loss calls: the DDP wrapper or the model), `opt` and the loop
    `position`. With several workers every rank must call it (each writes its shards)."""
    import torch

    g = parallel.group()
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if g.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if g.world == 1:
        frozen = _frozen(model)  # not saved: they never change (LoRA: the checkpoint is the adapters)
        state = {k: v for k, v in model.state_dict().items() if k not in frozen}
        torch.save({"model": state, "opt": opt.state_dict(), **position,
                    "rng": rng_state()}, tmp / SINGLE)
        swap_in(tmp, ckpt)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    parallel.barrier()
    msd, osd = get_state_dict(model, opt, options=_state_options(model))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "state"))
    torch.save(rng_state(), tmp / f"rng-{g.rank}.pt")
    parallel.barrier()
    if g.main:
        (tmp / SHARDED).write_text(json.dumps({**position, "workers": g.world}))
        swap_in(tmp, ckpt)
    parallel.barrier()


def load(ckpt: Path, model: Any, opt: Any) -> dict | None:
    """The loop position of the checkpoint `save` wrote (None: there is none), with model,
    optimizer and this rank's RNG restored. With several workers every rank must call it; rank 0
    decides for all (each rank's view of a shared disk may lag)."""
    import torch

    g = parallel.group()
    if g.world == 1:
        if not recover(ckpt, SINGLE):
            return None
        state = torch.load(ckpt / SINGLE, weights_only=False)
        frozen = _frozen(model)
        missing, unexpected = model.load_state_dict(state["model"], strict=not frozen)
        if unexpected or set(missing) - frozen:
            raise RuntimeError(f"{ckpt} does not hold this model's trainable parameters (missing "
                               f"{sorted(set(missing) - frozen)[:3]}, unexpected {sorted(unexpected)[:3]}): "
                               "it was written by another configuration; delete it to start over")
        opt.load_state_dict(state["opt"])
        set_rng_state(state["rng"])
        return {k: state[k] for k in ("step", "epoch", "consumed")}
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    position = None
    if g.main and recover(ckpt, SHARDED):
        position = json.loads((ckpt / SHARDED).read_text())
    position = parallel.broadcast(position)
    if position is None:
        return None
    if position.get("workers") != g.world:
        raise RuntimeError(f"{ckpt} was written by {position.get('workers')} workers, not {g.world}")
    options = _state_options(model)
    msd, osd = get_state_dict(model, opt, options=options)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(ckpt / "state"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=options)
    set_rng_state(torch.load(ckpt / f"rng-{g.rank}.pt", weights_only=False))
    return position
