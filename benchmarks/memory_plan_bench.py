"""How good is `distill-pipeline plan`? Peak memory of one real training step (CPU RSS, fresh
process: AdamW step on a random-initialised Llama, float32, our SFT loss) against the plan's
estimate for the same model, batch and length, on models of a few sizes — full fine-tuning, and
LoRA (r 16 on every linear layer).

    python benchmarks/memory_plan_bench.py            # full and LoRA rows
    python benchmarks/memory_plan_bench.py --lora     # LoRA rows only

Prints one row per size and training: estimate, measured peak above the process's RSS before the
model was built, and the error (estimate / measured - 1). The estimate goes through the product's
own path: each size's `config.json` is written to a folder and `pipeline.memory.model_shape`
counts its parameters on the meta device, as `distill-pipeline plan` does for a local model;
`pipeline.memory.training` gets the `TrainHP` (with its `lora`). A LoRA row's step is the
product's too: `lora.prepare` wraps the model (peft), and `training.train_loop` takes one step
(max_steps 1) with its AdamW over the trainable parameters — the adapters — its gradient
clipping and its end-of-training checkpoint (the adapters and their optimizer state).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = [  # hidden, intermediate, layers, heads, vocab, batch, length
    (64, 192, 2, 4, 32_000, 8, 128),
    (256, 768, 4, 4, 32_000, 8, 256),
    (512, 1536, 6, 8, 32_000, 4, 512),
    (1024, 2816, 4, 8, 128_256, 2, 256),
]
LORA = {"r": 16, "target_modules": "all-linear"}  # the LoRA rows' `lora:` setting


def llama_config(hidden: int, inter: int, layers: int, heads: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       tie_word_embeddings=False)


def child(args: list[str]) -> None:
    import resource

    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    from distill_pipeline.config import LoraSpec, TrainHP
    from distill_pipeline.losses import sft_nll

    hidden, inter, layers, heads, vocab, batch, length = map(int, args[:7])
    lora = args[7:] == ["lora"]
    if lora:  # the product's modules, imported before the baseline is taken
        import peft  # noqa: F401

        from distill_pipeline import lora as lora_mod
        from distill_pipeline.training import train_loop
    torch.set_num_threads(1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(hidden, inter, layers, heads, vocab))
    ids = torch.randint(0, vocab, (batch, length))
    if not lora:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss = sft_nll(model(input_ids=ids).logits[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
    else:
        spec = LoraSpec(**LORA)
        hp = TrainHP(max_steps=1, batch_size=batch, lora=spec)
        with tempfile.TemporaryDirectory(prefix="memory-plan-bench-lora-") as work:
            model, _ = lora_mod.prepare(model, None, spec, "bench-base", Path(work))  # base given: nothing saved

            def loss_fn(net, mb, norm):
                loss = sft_nll(net(input_ids=mb).logits[:, :-1], mb[:, 1:])
                return loss, {}
            train_loop(model, hp=hp, examples=batch, batches=lambda epoch: iter([ids]),
                       counts=lambda epoch: [{"sequences": batch}], loss_fn=loss_fn,
                       work_dir=Path(work), desc="bench")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)  # what AdamW steps
    print(json.dumps({"measured": (peak - base) * 1024, "trained": trained}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    sys.path.insert(0, str(ROOT))
    from distill_pipeline.config import LoraSpec, ModelSpec, TrainHP
    from distill_pipeline.pipeline.memory import (
        human,
        lora_params,
        model_shape,
        training,
    )

    modes = ["lora"] if "--lora" in sys.argv[1:] else ["full", "lora"]
    rows = []
    configs = Path(tempfile.mkdtemp(prefix="memory-plan-bench-"))
    for hidden, inter, layers, heads, vocab, batch, length in SIZES:
        folder = configs / f"h{hidden}-l{layers}-v{vocab}"
        llama_config(hidden, inter, layers, heads, vocab).save_pretrained(folder)  # config.json only
        shape = model_shape(ModelSpec(name_or_path=str(folder)))  # the plan's own parameter count
        params = shape.params
        for mode in modes:
            hp = TrainHP(lora=LoraSpec(**LORA)) if mode == "lora" else TrainHP()
            est = sum(training(shape, batch, length, hp).values())
            out = subprocess.run([sys.executable, __file__, "--child",
                                  *map(str, (hidden, inter, layers, heads, vocab, batch, length)),
                                  *(["lora"] if mode == "lora" else [])],
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            measured = result["measured"]
            planned = lora_params(shape, hp.lora) if hp.lora is not None else params
            rows.append({"params_M": round(params / 1e6, 1),
                         "training": "LoRA r16 all-linear" if mode == "lora" else "full",
                         "trained (plan)": f"{result['trained']:,} ({planned:,})",
                         "batch x length": f"{batch}x{length}",
                         "vocab": vocab, "estimate": human(est), "measured": human(measured),
                         "error": f"{est / measured - 1:+.0%}"})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
