"""Memory plan: the peak memory each node of a run needs on one device, estimated before any
compute from each model's `config.json` alone (parameters counted on the meta device, no
weights read), against the device's memory. `distill-pipeline plan -c CONFIG` prints it;
`run` checks it in its preflight and refuses a node that cannot fit, saying what would help.

The estimates are deliberately simple sums (bytes):

- training nodes: weights + gradients + AdamW's two moments (float32, bfloat16 with
  `precision: bf16`; `parallel.prepare` casts the loaded model) + activations kept for backward (`ACT_PER_TOKEN`
  × hidden-size units per token per layer, plus the MLP's intermediate units; with
  `gradient_checkpointing` one hidden-size unit per layer plus one layer's full set, recomputed)
  + the logits over the vocabulary (logits, their gradient and the causal shift's gradient:
  3 copies of B × T × V in the forward's dtype, plus the losses' float32 chunks — about three of
  `losses.CHUNK_ROWS` × V, measured — when that dtype is narrower). With
  `workers` > 1 the batch is per worker; `strategy: fsdp` divides weights, gradients and
  optimizer state by the workers and adds the gathered root (embeddings, LM head) and two
  gathered layers; `ddp` adds its gradient buckets (one more copy of the gradients);
  `bf16-mixed` without FSDP or checkpointing keeps autocast's bfloat16 copy of every weight;
- LoRA (`lora` on a training node): the frozen base's weights + the adapters' weights,
  gradients and AdamW moments (`lora_params`: r × (in + out) per adapted layer); activations as
  without it; no reference copy (DPO scores its reference before training, with the policy);
- extraction: every teacher it holds + one forward's activations (no gradients) + the LM head's
  chunk (`head_chunk_rows` × V float32, twice) — a DPO teacher that is a LoRA adapter over its
  reference shares one base (`models.load_adapter_pair`);
- rollouts: the policy + its KV cache (2 × layers × batch × length × hidden);
- evaluate: the largest model + its logits over a batch.

`benchmarks/memory_plan_bench.py` measures peaks (CPU RSS) of real training steps on models of
a few sizes and prints the estimate's error; the README states it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from distill_pipeline.config import TrainHP

ACT_PER_TOKEN = 10   # hidden-size-wide tensors a decoder layer keeps per token for backward
MLP_PER_TOKEN = 4    # intermediate-size-wide ones (gate, up, their product, the down input)
LOGIT_COPIES = 3     # logits, their gradient, the causal shift's gradient (forward dtype)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model: counted from its config on the meta device."""
    params: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_hidden: int
    bytes_per_param: int


@dataclass
class NodeEstimate:
    node: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def _dtype_bytes(spec: Any, config: Any) -> int:
    dtype = getattr(spec, "dtype", "float32")
    if dtype == "auto":
        saved = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        dtype = saved.replace("torch.", "")
    return DTYPE_BYTES.get(dtype, 4)


def model_shape(spec: Any) -> Shape:
    """The shape of a ModelSpec's model (preset, local directory, cached hub snapshot), from its
    config alone: the model is built on the meta device to count parameters, nothing is read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from distill_pipeline import models as m

    if spec.preset:
        tok = m._tiny_tokenizer()
        config = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, **m.PRESETS[spec.preset])
    else:
        name = spec.name_or_path
        src = m._resolve(name, f"model {name!r}")  # offline and not cached: a clear ModelError
        local = src.local if src.local is not None else m._cached_snapshot(name)
        if local is not None and m.is_adapter(local):  # a LoRA adapter: its base's shape
            local = m.config_dir(local)
        if local is not None and (local / "config.json").is_file():
            source = str(local)
        elif local is None:
            source = name  # online and not downloaded yet: its config.json alone is fetched
        else:
            raise m.ModelError(f"model {name!r}: no config.json in {local}; the memory plan reads the "
                               "model's shape from it")
        try:
            config = AutoConfig.from_pretrained(source)
        except Exception as exc:  # network, gated repo, malformed config: one message
            raise m.ModelError(f"model {name!r}: cannot read its config.json for the memory plan "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
        where = str(local / "config.json") if local is not None else "its config.json"
        problems = m.config_problems(config.to_dict(), where)
        if problems:  # zero layers would plan an empty model, a negative size crash in torch
            raise m.ModelError(f"model {name!r}: {'; '.join(problems)}. The memory plan (and "
                               "loading) needs the model's real sizes: fix or re-download that "
                               "config.json, or point name_or_path at another model.")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # the config describes no model transformers can build
        label = spec.preset or spec.name_or_path
        raise m.ModelError(f"model {label!r}: its config.json describes no model transformers can "
                           f"build ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                           "fix or re-download the config.json, or point name_or_path at another "
                           "model") from None
    params = sum(p.numel() for p in model.parameters())
    text = getattr(config, "text_config", config)
    heads = getattr(text, "num_attention_heads", 1)
    kv_heads = getattr(text, "num_key_value_heads", heads) or heads
    hidden = text.hidden_size
    return Shape(params=params, layers=text.num_hidden_layers, hidden=hidden,
                 intermediate=getattr(text, "intermediate_size", 4 * hidden), vocab=text.vocab_size,
                 kv_hidden=hidden * kv_heads // heads, bytes_per_param=_dtype_bytes(spec, config))


LORA_MODULES = {"q_proj": ("hidden", "hidden"), "k_proj": ("hidden", "kv"), "v_proj": ("hidden", "kv"),
                "o_proj": ("hidden", "hidden"), "gate_proj": ("hidden", "inter"),
                "up_proj": ("hidden", "inter"), "down_proj": ("inter", "hidden")}


def lora_params(shape: Shape, spec: Any) -> int:
    """Parameters of LoRA adapters (r × (in + out) per adapted linear layer, every layer) on the
    Llama-style module names of `LORA_MODULES`; `all-linear` adapts all of them. Names this
    table does not know count as a hidden × hidden layer each (an estimate)."""
    width = {"hidden": shape.hidden, "kv": shape.kv_hidden, "inter": shape.intermediate}
    names = list(LORA_MODULES) if spec.target_modules == "all-linear" else spec.target_modules
    per_layer = sum(width[LORA_MODULES[m][0]] + width[LORA_MODULES[m][1]] if m in LORA_MODULES
                    else 2 * shape.hidden for m in names)
    return spec.r * per_layer * shape.layers


def training(shape: Shape, sequences: int, length: int, hp: TrainHP = TrainHP()) -> dict[str, int]:
    """One training step of `sequences` × `length` tokens per worker with AdamW, under `hp`'s
    precision, gradient checkpointing, workers and strategy (defaults: fp32, none, 1). With
    `lora`, gradients and AdamW's moments are the adapters' alone (the frozen base keeps its
    weights only; activations stay: the gradient still flows through every layer)."""
    from distill_pipeline.losses import CHUNK_ROWS

    precision = hp.precision
    checkpointing = hp.gradient_checkpointing
    workers = hp.workers
    fsdp = workers > 1 and hp.strategy == "fsdp"
    b = 2 if precision == "bf16" else 4  # weights, gradients, AdamW moments (parallel.prepare)
    act = 2 if precision in ("bf16", "bf16-mixed") else 4  # the forward's dtype
    tokens = sequences * length
    layer = ACT_PER_TOKEN * shape.hidden + MLP_PER_TOKEN * shape.intermediate
    if checkpointing:  # each layer's input kept, one layer's activations live while it recomputes
        acts = tokens * (shape.layers * shape.hidden + layer) * act
    else:
        acts = tokens * shape.layers * layer * act
    shard = workers if fsdp else 1
    if hp.lora is None:
        weights, trained, tb = shape.params * b, shape.params, b
    else:  # adapters, their gradients and AdamW state in float32 whatever the base's precision
        trained, tb = lora_params(shape, hp.lora), 4
        weights = shape.params * b + trained * tb
    parts = {"weights": weights // shard, "gradients": trained * tb // shard,
             "optimizer (AdamW)": 2 * trained * tb // shard, "activations": acts,
             "logits (B x T x V)": LOGIT_COPIES * tokens * shape.vocab * act
             + (3 * min(CHUNK_ROWS, tokens) * shape.vocab * 4 if act < 4 else 0)}
    if fsdp:
        per_layer = shape.params // max(1, shape.layers)  # an upper bound: embeddings counted in
        root = min(shape.params, 2 * shape.vocab * shape.hidden)
        gathered = 2 if precision == "bf16-mixed" else b  # FSDP gathers bfloat16 copies then
        parts["FSDP gathered (root + 2 layers)"] = (root + 2 * per_layer) * gathered
    elif workers > 1:
        parts["DDP gradient buckets"] = trained * tb
    if precision == "bf16-mixed" and not fsdp and not checkpointing:
        parts["bf16 weight copies (autocast)"] = shape.params * 2  # each layer's, kept for backward
    return parts


def inference(shape: Shape, tokens: int) -> dict[str, int]:
    b = shape.bytes_per_param
    return {"weights": shape.params * b,
            "activations (no grad)": tokens * (ACT_PER_TOKEN * shape.hidden + MLP_PER_TOKEN * shape.intermediate) * b}


def device_memory(cfg: Any) -> tuple[int, str]:
    """(bytes, what) of one device: `resources.gpu_memory_gb` or the visible GPU when the run
    uses GPUs, else this machine's RAM."""
    res = cfg.resources
    if res.gpus > 0:
        if res.gpu_memory_gb:
            return int(res.gpu_memory_gb * 1e9), f"GPU ({res.gpu_memory_gb} GB, resources.gpu_memory_gb)"
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
            return total, f"GPU {torch.cuda.get_device_name(0)} ({total / 1e9:.1f} GB)"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram, f"RAM of this machine ({ram / 1e9:.1f} GB)"


def plan_memory(plan: Any) -> list[NodeEstimate]:
    """One estimate per node of `plan` (a runner.Plan), in execution order."""
    cfg = plan.cfg
    shapes: dict[str, Shape] = {}

    def shape_of(node: str) -> Shape:
        """The model a node holds: the spec it trains from or imports, followed upstream."""
        if node not in shapes:
            n = plan.node(node)
            if n.stage in ("sft", "import_model"):
                shapes[node] = model_shape(n.view.model)
            else:
                up = n.needs.get("init") or n.needs.get("reference") or n.needs.get("policy")
                shapes[node] = shape_of(up)
        return shapes[node]

    out = []
    length = cfg.data.max_length
    for n in plan.nodes:
        est = NodeEstimate(n.name)
        view = n.view
        if n.stage == "import_model":
            pass  # imports nothing into memory
        elif n.stage in ("sft", "teacher_dpo", "train"):
            from distill_pipeline.losses import LOSSES

            responses = {"sft": 1, "teacher_dpo": 2}.get(n.stage) or len(LOSSES[view.loss].responses)
            est.parts = training(shape_of(n.name), view.hp.batch_size * responses, length, view.hp)
        elif n.stage == "teacher_logits":
            ext = view.extraction
            teachers = [shape_of(n.needs["teacher"])] + ([shape_of(n.needs["reference"])]
                                                         if "reference" in n.needs else [])
            t = teachers[0]
            dpo = plan.node(n.needs["teacher"])
            lora = dpo.view.hp.lora if dpo.stage == "teacher_dpo" else None
            if lora is not None and not lora.merge and len(teachers) == 2:  # an adapter over the reference
                est.parts = {"teachers' shared base weights": t.params * t.bytes_per_param,
                             "DPO teacher's LoRA adapter": lora_params(t, lora) * 4}
            else:
                est.parts = {f"teacher {i + 1} weights": s.params * s.bytes_per_param
                             for i, s in enumerate(teachers)}
            est.parts["activations (no grad)"] = inference(t, ext.batch_tokens)["activations (no grad)"]
            est.parts["LM-head chunk"] = 2 * min(ext.head_chunk_rows, ext.batch_tokens) * t.vocab * 4
        elif n.stage == "rollouts":
            t = shape_of(n.needs["policy"])
            seq = length + view.max_new_tokens
            est.parts = {"weights": t.params * t.bytes_per_param,
                         "KV cache": 2 * t.layers * view.batch_size * seq * t.kv_hidden * t.bytes_per_param,
                         "logits (float32)": view.batch_size * t.vocab * 4}
        elif n.stage == "evaluate":
            biggest = max((shape_of(up) for up in n.needs.values()), key=lambda s: s.params)
            batch = view.evaluate.batch_size
            est.parts = {"weights (largest model)": biggest.params * biggest.bytes_per_param,
                         "logits (float32)": 2 * batch * length * biggest.vocab * 4}
        out.append(est)
    return out


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def advice(est: NodeEstimate, cfg: Any) -> str:
    """What would make a node fit."""
    tips = []
    parts = est.parts
    if "optimizer (AdamW)" in parts:  # a training node: the node's own options
        more = "more `workers`" if any(k.startswith("FSDP") for k in parts) else "`workers: N` with `strategy: fsdp`"
        tips.append(f"{more} on {est.node} (weights, gradients and optimizer state divided by the workers)")
        tips.append(f"`gradient_checkpointing: true` and `precision: bf16-mixed` on {est.node}")
    if "activations" in parts or any(k.startswith("logits") for k in parts):
        tips.append("a smaller batch_size with a larger grad_accum (same effective batch) or a smaller "
                    "data.max_length")
    if any(k.startswith(("teacher", "weights")) for k in parts):
        tips.append("dtype: bfloat16 for the models")
    if "LM-head chunk" in parts:
        tips.append("a smaller teacher_logits.batch_tokens / head_chunk_rows")
    tips.append("a device with more memory (resources.gpu_memory_gb says how much there is)")
    return "; ".join(tips)


def check(plan: Any, names: list[str] | None = None) -> list[str]:
    """Problems (one line each) of the nodes that cannot fit; empty when all fit."""
    total, what = device_memory(plan.cfg)
    problems = []
    for est in plan_memory(plan):
        if names is not None and est.node not in names:
            continue
        if est.total > total:
            problems.append(f"{est.node}: needs about {human(est.total)} "
                            f"({', '.join(f'{k} {human(v)}' for k, v in est.parts.items())}), more than the "
                            f"{what}; to fit: {advice(est, plan.cfg)}")
    return problems


def report(plan: Any) -> str:
    total, what = device_memory(plan.cfg)
    lines = [f"device: {what}"]
    width = max(len(n.name) for n in plan.nodes)
    for est in plan_memory(plan):
        mark = "  DOES NOT FIT" if est.total > total else ""
        parts = ", ".join(f"{k} {human(v)}" for k, v in est.parts.items()) or "nothing held"
        lines.append(f"{est.node.ljust(width)}  {human(est.total):>10}  ({parts}){mark}")
    return "\n".join(lines)

