"""Adaptive K end to end through the CLI: `teacher_logits.top_mass` stores per-token k ≤ top_k,
`cache info` reports the mean k, and every cache method trains from the padded batches with
finite losses (ADPA reads two adaptive extractions, the DPO teacher's and the reference's)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny_tree, write_config

pytestmark = pytest.mark.slow


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill_pipeline.cli.main", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, env={**os.environ, "DISTILL_PROGRESS": "0"})


@pytest.mark.parametrize("method", ["adpa", "tvkd"])
def test_methods_train_from_an_adaptive_k_cache(tmp_path, method):
    tree = tiny_tree(tmp_path / "run", method=method)
    tree["teacher_logits"].update(top_mass=0.1, min_k=2)  # the tiny teachers keep ~25% in their top 8
    config = write_config(tmp_path / "c.yaml", tree)
    ran = _cli("run", "all", "-c", str(config), "--no-ray")
    assert ran.returncode == 0, ran.stderr[-3000:]
    info = _cli("cache", "info", "--store", str(tmp_path / "store"), "--json")
    assert info.returncode == 0, info.stderr
    stats = json.loads(info.stdout)
    assert 2 <= stats["mean_k"] < 8  # per-token k, at least min_k, below top_k on average
    rows = [json.loads(line) for line in next((tmp_path / "run").glob("train-*/metrics.jsonl")).open()]
    assert rows and all(abs(r["loss"]) < 1e6 for r in rows)  # finite (NaN fails the comparison)
    assert "mass 0.1" in _cli("cache", "info", "--store", str(tmp_path / "store")).stdout
