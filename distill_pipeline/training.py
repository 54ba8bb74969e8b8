"""One optimisation loop for every training stage (SFT, teacher DPO, student distillation).

AdamW, linear warm-up then cosine decay, gradient clipping and accumulation, JSONL metrics, and
checkpoints that resume mid-training with the same data order. Written here rather than taken
from TRL because the distillation losses stream their batches from the teacher-logit cache,
and one small loop serves all three stages with identical resume semantics.

A stage supplies `batches(epoch) -> iterator of micro-batches` (deterministic per epoch),
`counts(epoch) -> [{name: int}, …]` (what each of those micro-batches holds, known without building
them) and `loss_fn(model, micro_batch, norm) -> (loss, metrics)`.

Loss normalisation (one rule, docs/METHODS.md "Normalisation"): an optimizer step takes
`grad_accum` micro-batches; `norm` is the sum of their counts (valid tokens of each response,
pairs), and each micro-batch's loss is its *sum* of per-token / per-pair terms divided by those
step totals. Micro-batches are still built and consumed one at a time. The step's loss and gradient are therefore the same whether its examples come in one
micro-batch or several — and with N data-parallel workers, summing `counts` over ranks and
multiplying each rank's loss by N (DDP averages gradients) gives the same step again. Metrics are
the same kind of contributions: kept as tensors, summed, and turned into floats once per step
when they are logged.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from distill_pipeline import checkpoint, parallel, trackers
from distill_pipeline.progress import progress


class NonFiniteLoss(ArithmeticError):
    """A training step produced a NaN/inf loss or gradient: the stage stops before the optimizer
    applies it, and nothing is published (the last checkpoint stays for a resume)."""

    def __init__(self, desc: str, step: int, values: dict, grad_norm: float):
        parts = ", ".join(f"{k} {v:.6g}" for k, v in values.items())
        super().__init__(
            f"{desc}: step {step} is not finite ({parts}, gradient norm {grad_norm:.6g}); the step "
            "was not applied and nothing was published. Lower the learning rate, check the loss "
            "options and the data (empty responses, extreme teacher log-probs), then rerun")


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of each micro-batch of one epoch: a seeded shuffle, independent of the
    batch size (so 1×4 and 4×1 accumulation see the same examples in the same order)."""
    order = list(range(n))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [order[s:s + batch_size] for s in range(0, n, batch_size)]


def total_steps(hp: Any, examples: int) -> int:
    per_step = hp.batch_size * hp.grad_accum * hp.workers
    return hp.max_steps or max(1, math.ceil(hp.epochs * examples / per_step))


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress_ = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))


def step_norm(window: Iterable[dict[str, int]]) -> dict[str, int]:
    """Σ counts over the micro-batches of one optimizer step (each at least 1)."""
    total: dict[str, int] = {}
    for counts in window:
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
    return {k: max(1, v) for k, v in total.items()}


def _from(source: Callable[..., Iterable[Any]], epoch: int, skip: int,
          select: Callable[[int], bool] | None = None) -> Iterator[tuple[int, int, Any]]:
    """(epoch, position within it, item) from `source(epoch)` onwards, skipping the first `skip`
    of the first epoch (resume: same data order, skip what was consumed). With `select`, the
    source is called as `source(epoch, keep)` and builds only the items whose number n (counted
    from the first one yielded here) has `select(n)`: the others come as None (data parallelism:
    each worker builds its own micro-batches of every step)."""
    n = 0
    while True:
        if select is None:
            items = source(epoch)
        else:
            def keep(i: int, base: int = n - skip, first: int = skip) -> bool:
                return i >= first and select(base + i)
            items = source(epoch, keep)
        for i, item in enumerate(items):
            if i >= skip:
                yield epoch, i + 1, item
                n += 1
        epoch, skip = epoch + 1, 0


def train_loop(model: Any, *, hp: Any, examples: int,
               batches: Callable[..., Iterable[Any]],
               counts: Callable[[int], list[dict[str, int]]],
               loss_fn: Callable[[Any, Any, dict], tuple[Any, dict]],
               work_dir: Path, desc: str,
               on_checkpoint: Callable[[int], dict | None] | None = None) -> dict:
    """Train `model` in place; returns summary metrics. Resumes from `work_dir/checkpoint`.

    Under data parallelism (`parallel.group().world` = `hp.workers` > 1) every worker calls this
    with the same arguments: `batches` must accept `(epoch, keep)` (it builds only the kept
    micro-batches), rank r takes micro-batches r·A … r·A+A−1 of each step's N·A, and only rank 0
    logs and writes; `on_checkpoint` runs on every rank (FSDP's forward is collective), and the
    numbers it returns (the train stage's validation row) go to the trackers (`report_to`)."""
    import torch

    group = parallel.group()
    workers, accum = hp.workers, hp.grad_accum
    if group.world != workers:
        raise RuntimeError(f"{desc}: workers={workers} but {group.world} process(es) train; a node with "
                           "several workers runs through the pipeline, on Ray Train")
    per_step = accum * group.world  # micro-batches per optimizer step, over all workers
    torch.manual_seed(hp.seed)
    net = parallel.prepare(model, hp)
    dev = next(model.parameters()).device
    steps = total_steps(hp, examples)
    warmup = int(hp.warmup_ratio * steps)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],  # LoRA: the adapters
                            lr=hp.lr, weight_decay=hp.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, steps, warmup))
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt = work_dir / "checkpoint"
    log_path = work_dir / "metrics.jsonl"
    step, epoch, consumed = 0, 0, 0
    resumed = checkpoint.load(ckpt, net, opt)
    if resumed is not None:
        step, epoch, consumed = resumed["step"], resumed["epoch"], resumed["consumed"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, steps, warmup),
                                                  last_epoch=step - 1)
        if group.main:
            print(f"{desc}: resuming at step {step}/{steps}")
            _truncate_log(log_path, step)  # a crash after logging a step but before its checkpoint
        parallel.barrier()
    elif log_path.exists() and group.main:
        log_path.unlink()
    model.train()
    t0 = time.perf_counter()
    # resumed at the final step (killed after its checkpoint): nothing trains, the log says the rest
    last: dict = _last_logged(log_path) if resumed is not None and group.main else {}

    def mine(n: int) -> bool:  # micro-batch n (counted from a step boundary) is this rank's
        return (n % per_step) // accum == group.rank

    stream = _from(batches, epoch, consumed, mine if group.world > 1 else None)
    count_stream = _from(counts, epoch, consumed)
    with contextlib.ExitStack() as files:
        # report_to (trackers.py), rank 0 only: a resumed node continues its tracker runs
        tracker = files.enter_context(trackers.start(work_dir, resume_step=step) if group.main
                                      else trackers.Tracker())
        if resumed is not None and on_checkpoint:  # killed after the checkpoint, before what is written at it
            tracker.log(step, on_checkpoint(step) or {})
        log = files.enter_context(open(log_path, "a")) if group.main else None
        bar = files.enter_context(progress(total=steps, initial=step, desc=desc, disable=not group.main))
        while step < steps:
            began = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            norm = step_norm(next(count_stream)[2] for _ in range(per_step))
            sums: dict[str, Any] = {}
            taken = 0
            for j in range(per_step):
                epoch, consumed, mb = next(stream)
                if j // accum != group.rank:
                    continue
                taken += 1
                with parallel.accumulating(net, sync=taken == accum):
                    with parallel.autocast(model, hp):
                        loss, metrics = loss_fn(net, to_device(mb, dev), norm)
                    # workers average gradients: × N makes the sum over ranks / the step's counts
                    (loss * group.world if group.world > 1 else loss).backward()
                for k, v in {"loss": loss, **metrics}.items():
                    v = v.detach() if hasattr(v, "detach") else v
                    sums[k] = sums[k] + v if k in sums else v
            sums = parallel.all_reduce_sums(sums)
            if group.world > 1:  # the global norm (FSDP: over every rank's shards)
                grad_norm = parallel.clip_grad_norm(model, hp.max_grad_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), hp.max_grad_norm)
            values = {k: float(v) for k, v in sums.items()}  # the step's one host sync
            if not all(math.isfinite(v) for v in (*values.values(), float(grad_norm))):
                raise NonFiniteLoss(desc, step + 1, values, float(grad_norm))
            opt.step()
            sched.step()
            step += 1
            last = {"step": step, "epoch": epoch, "lr": sched.get_last_lr()[0],
                    "grad_norm": float(grad_norm), **values}
            if log:
                log.write(json.dumps(last) + "\n")
            # tokens/s (the step's loss tokens, all workers, over its wall time) goes to the trackers
            # only: metrics.jsonl stays identical across a crash and resume
            tokens = sum(v for k, v in norm.items() if k.startswith("tokens_"))
            tracker.log(step, {**{k: v for k, v in last.items() if k != "step"},
                               **({"tokens_per_s": tokens / (time.perf_counter() - began)} if tokens else {})})
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}")
            if step % hp.checkpoint_every == 0 or step == steps:
                if log:
                    log.flush()
                checkpoint.save(ckpt, net, opt, {"step": step, "epoch": epoch, "consumed": consumed})
                if on_checkpoint:  # what it returns (the train stage's validation row) is reported
                    tracker.log(step, on_checkpoint(step) or {})
    model.eval()
    return {"steps": steps, "final_loss": round(last.get("loss", float("nan")), 6),
            "train_seconds": round(time.perf_counter() - t0, 2),
            **({"workers": group.world} if group.world > 1 else {})}


def _last_logged(path: Path) -> dict:
    """The last step's row of a metrics log ({} when there is none)."""
    if not path.exists():
        return {}
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(rows[-1]) if rows else {}


def _truncate_log(path: Path, step: int) -> None:
    """Keep the JSONL rows of steps ≤ `step` (the checkpoint being resumed): steps after it run
    again and are logged again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def to_device(batch: Any, dev: Any) -> Any:
    """Tensors anywhere in nested dicts/lists/tuples moved to `dev` (no-op on the CPU)."""
    if hasattr(batch, "to") and hasattr(batch, "device"):
        return batch.to(dev) if batch.device != dev else batch
    if isinstance(batch, dict):
        return {k: to_device(v, dev) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, dev) for v in batch)
    return batch


def save_trained(model: Any, tok: Any, folder: Path) -> None:
    """Save the trained model in the dtype it was loaded in (models.*.dtype; training may have
    kept float32 master weights) — rank 0; with several workers every rank must call this:
    FSDP's shards are gathered into one state dict first."""
    from distill_pipeline.models import save_model

    state = parallel.full_state_dict(model)
    if parallel.group().main:
        dtype = getattr(model, "distill_saved_dtype", None)  # what `parallel.prepare` found
        if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
            state = {k: v.to(dtype) if v.is_floating_point() else v
                     for k, v in (state if state is not None else model.state_dict()).items()}
        else:
            dtype = None
        save_model(model, tok, folder, state_dict=state, dtype=dtype)
    parallel.barrier()


def finish(work_dir: Path) -> None:
    """Drop the resume checkpoint once the final model is saved."""
    if parallel.group().main:
        shutil.rmtree(work_dir / "checkpoint", ignore_errors=True)
