"""LoRA for the training stages (`<section>.lora` in the config), with the `peft` library.

`wrap(model, spec)` freezes the model and adds adapters: only they get gradients and optimizer
state, and checkpoints hold only them (`checkpoint.py` leaves frozen parameters out). A trained
node publishes its adapter (`publish`): `model/` is a PEFT adapter directory whose
`base_model_name_or_path` names the base it was trained over — a hub id, an absolute path (an
upstream node's model, a local checkpoint), or `../base` for a tiny preset, whose random weights
are saved beside it — and downstream nodes load base + adapter through `models` (merged, or
unmerged for the reference/DPO teacher pair: `models.load_adapter_pair`). With `merge: true`,
`model/` holds the merged weights and `adapter/` the adapter.

A DPO-style node needs no second copy for its reference: the reference log-probs are computed
with the policy before it trains (`metrics.attach_policy_ref`), when the adapters are still zero —
the base with the adapter disabled *is* the reference.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill_pipeline import parallel
from distill_pipeline.config import LoraSpec
from distill_pipeline.models import (ADAPTER_CONFIG, ModelRef, load_checkpoint, save_model,
                                     teacher_identity)
from distill_pipeline.training import save_trained

PRESET_BASE = "base"  # a preset's random base weights, saved in the node folder beside model/


def prepare(model: Any, tok: Any, spec: LoraSpec | None, base: str | None, out: Path) -> tuple[Any, str | None]:
    """A training stage's model before it trains: as loaded without LoRA; with it, wrapped
    (`wrap`), and the base its adapter will name (`base`; None: a preset, saved in the node)."""
    if spec is None:
        return model, None
    if base is None:
        base = save_preset_base(model, tok, out)
    model = wrap(model, spec)
    if parallel.group().main:
        n, total = trainable(model)
        print(f"lora: {n:,} of {total:,} parameters train ({100 * n / total:.2f}%), r={spec.r}, "
              f"modules {spec.target_modules}")
    return model, base


def save(model: Any, tok: Any, out: Path, spec: LoraSpec | None, base: str | None) -> None:
    """Publish a trained model: `model/` as saved weights, or (LoRA) as `publish` lays it out."""
    if spec is None:
        save_trained(model, tok, Path(out) / "model")
    else:
        publish(model, tok, out, spec, base)


def wrap(model: Any, spec: LoraSpec) -> Any:
    """The model with LoRA adapters on `spec.target_modules`; every other weight frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # no module matched target_modules
        raise ValueError(f"lora.target_modules {spec.target_modules!r}: {exc}") from None


def trainable(model: Any) -> tuple[int, int]:
    """(trainable parameters, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def base_of_spec(spec: Any) -> str | None:
    """What an adapter trained over a `ModelSpec` names as its base: an absolute path for a local
    directory, the hub id as given, or None for a preset (`save_preset_base` saves one)."""
    if spec.preset:
        return None
    path = Path(spec.name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else spec.name_or_path


def base_of_ref(ref: ModelRef) -> str:
    """What an adapter trained over an upstream node's model (or an import) names as its base."""
    return str(Path(ref.path).resolve())


def save_preset_base(model: Any, tok: Any, out: Path) -> str:
    """Save a preset's random base weights beside the node's model (rank 0): the adapter's base."""
    if parallel.group().main:
        save_model(model, tok, Path(out) / PRESET_BASE)
    parallel.barrier()
    return f"../{PRESET_BASE}"


def publish(model: Any, tok: Any, out: Path, spec: LoraSpec, base: str) -> None:
    """Publish a LoRA-trained model (every rank calls it; rank 0 writes): the adapter, naming
    `base`, in `model/` — or, with `spec.merge`, in `adapter/`, and the merged weights in `model/`
    (loaded back from the adapter: what downstream nodes would compute from it)."""
    out = Path(out)
    state = parallel.full_state_dict(model, trainable_only=True)  # several workers: the adapters' shards
    if parallel.group().main:
        folder = out / ("adapter" if spec.merge else "model")
        peft_model = getattr(model, "module", model)  # DDP wraps it
        peft_model.save_pretrained(str(folder), **({"state_dict": state} if state is not None else {}))
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        config["base_model_name_or_path"] = base
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (folder / "README.md").unlink(missing_ok=True)  # peft's template; the runner writes the card
        tok.save_pretrained(str(folder))
        teacher_identity(folder)  # the identity memo
        if spec.merge:
            merged, _ = load_checkpoint(folder)
            save_model(merged, tok, out / "model")
    parallel.barrier()
