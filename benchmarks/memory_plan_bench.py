"""How good is `distill-pipeline plan`? Peak memory of one real training step (CPU RSS, fresh
process: AdamW step on a random-initialised Llama, float32, our SFT loss) against the plan's
estimate for the same model, batch and length, on models of a few sizes.

    python benchmarks/memory_plan_bench.py

Prints one row per size: estimate, measured peak above the process's RSS before the model was
built, and the error (estimate / measured - 1). The estimate goes through the product's own path:
each size's `config.json` is written to a folder and `pipeline.memory.model_shape` counts its
parameters on the meta device, as `distill-pipeline plan` does for a local model.
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
    from distill_pipeline.losses import sft_nll

    hidden, inter, layers, heads, vocab, batch, length = map(int, args)
    torch.set_num_threads(1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(hidden, inter, layers, heads, vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, length))
    loss = sft_nll(model(input_ids=ids).logits[:, :-1], ids[:, 1:])
    loss.backward()
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"measured": (peak - base) * 1024}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    sys.path.insert(0, str(ROOT))
    from distill_pipeline.config import ModelSpec
    from distill_pipeline.pipeline.memory import human, model_shape, training

    rows = []
    configs = Path(tempfile.mkdtemp(prefix="memory-plan-bench-"))
    for hidden, inter, layers, heads, vocab, batch, length in SIZES:
        folder = configs / f"h{hidden}-l{layers}-v{vocab}"
        llama_config(hidden, inter, layers, heads, vocab).save_pretrained(folder)  # config.json only
        shape = model_shape(ModelSpec(name_or_path=str(folder)))  # the plan's own parameter count
        params = shape.params
        est = sum(training(shape, batch, length).values())
        out = subprocess.run([sys.executable, __file__, "--child", *map(str, (hidden, inter, layers, heads, vocab,
                                                                              batch, length))],
                             capture_output=True, text=True, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])["measured"]
        rows.append({"params_M": round(params / 1e6, 1), "batch x length": f"{batch}x{length}",
                     "vocab": vocab, "estimate": human(est), "measured": human(measured),
                     "error": f"{est / measured - 1:+.0%}"})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
