"""The shipped recipes validate offline: `status` reads no network. A training recipe plans from
its config alone; an import recipe needs its imports in the local Hugging Face cache (their
identity is computed from their files) and says how to get them when they are not there."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def status(config: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "DISTILL_PROGRESS": "0"}
    return subprocess.run([sys.executable, "-m", "distill_pipeline.cli.main", "status", "-c", str(config)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def cache_as(cache: Path, saved: Path, hub_id: str) -> Path:
    """`saved` laid out as huggingface_hub caches `hub_id` (refs/main → snapshots/<commit>)."""
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    commit = hashlib.sha1(hub_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return Path(shutil.copytree(saved, repo / "snapshots" / commit))


@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.name.startswith("import-")],
                         ids=lambda c: c.name)
def test_training_recipes_plan_offline_with_an_empty_hub_cache(config, tmp_path):
    out = status(config, tmp_path / "empty-cache")
    assert out.returncode == 0, out.stderr
    assert "sft.student" in out.stdout and "evaluate" in out.stdout


def test_import_recipe_offline_without_the_models_says_how_to_get_them(tmp_path):
    out = status(ROOT / "configs" / "import-zephyr.yaml", tmp_path / "empty-cache")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "is not downloaded" in out.stderr and "hf download HuggingFaceH4/" in out.stderr


def test_import_recipe_offline_with_the_models_cached(tmp_path):
    """Tiny stand-ins cached under the recipe's hub ids: the imports plan offline, each node
    shows the identity it imports (the same files under two ids: one identity)."""
    from distill_pipeline.identity import content_identity
    from distill_pipeline.models import load_model, load_tokenizer, save_model
    from distill_pipeline.config import ModelSpec, load_config

    saved = tmp_path / "saved"
    spec = ModelSpec(preset="tiny-teacher")
    save_model(load_model(spec), load_tokenizer(spec), saved)
    cache = tmp_path / "hub"
    for hub_id in ("HuggingFaceH4/zephyr-7b-beta", "HuggingFaceH4/mistral-7b-sft-beta"):
        cache_as(cache, saved, hub_id)
    out = status(ROOT / "configs" / "import-zephyr.yaml", cache)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.strip()}
    old = os.getcwd()
    os.chdir(ROOT)  # the recipe names its chat template relative to the repository root
    try:
        cfg = load_config(ROOT / "configs" / "import-zephyr.yaml")
    finally:
        os.chdir(old)
    from distill_pipeline.models import import_identity

    identity = import_identity(saved, "bfloat16", cfg.data.template())
    assert identity != content_identity(saved)  # loaded as bfloat16, with the recipe's template
    for node, hub_id in (("teacher_dpo", "zephyr-7b-beta"), ("sft.teacher", "mistral-7b-sft-beta")):
        assert f"imported {identity[:12]} from HuggingFaceH4/{hub_id}" in rows[node]
    assert "sft.student" in rows and "never run" in rows["sft.student"]
