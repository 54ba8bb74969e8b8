"""On a real Ray cluster: two `ray start` nodes on loopback whose workers have another working
directory and another DISTILL_CACHE_DIR than the driver. The run must mean what the driver
means: the run dir and data file relative to the driver's cwd, the store in the driver's
DISTILL_CACHE_DIR (stage tasks and extraction actors alike)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import tiny_tree, write_config
from tests.faults.test_pipeline_faults import _stop_processes_mentioning

pytestmark = pytest.mark.slow


def test_two_node_cluster_runs_with_the_drivers_paths_and_environment(tmp_path):
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # Ray's socket paths must stay < 108 bytes
    elsewhere = tmp_path / "node-cwd"
    decoy = tmp_path / "decoy-cache"
    elsewhere.mkdir()
    port = 6800 + os.getpid() % 500
    node_env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(temp),
                "DISTILL_CACHE_DIR": str(decoy)}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    try:
        head = subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2",
                               "--include-dashboard=false", f"--temp-dir={temp}"], cwd=elsewhere,
                              capture_output=True, text=True, env=node_env, timeout=180)
        assert head.returncode == 0, head.stderr[-2000:]
        worker = subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1"],
                                cwd=elsewhere, capture_output=True, text=True, env=node_env, timeout=180)
        assert worker.returncode == 0, worker.stderr[-2000:]

        driver = tmp_path / "driver"
        driver.mkdir()
        rows = [{"prompt": f"digits: {w}", "chosen": d, "rejected": d + "0"}
                for w, d in (("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"),
                             ("five", "5"), ("six", "6"), ("seven", "7"), ("eight", "8"))]
        (driver / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        tree = tiny_tree(Path("run"), method="dckd")  # relative run dir
        tree["data"]["preferences"] = {"source": "prefs.jsonl"}  # relative data file
        tree["teacher_logits"].pop("store")  # the default store: DISTILL_CACHE_DIR
        tree["teacher_logits"]["num_workers"] = 2
        tree["train"]["workers"] = 2  # Ray Train workers, placed anywhere on the cluster
        tree["ray"] = {}
        write_config(driver / "c.yaml", tree)
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(temp), "DISTILL_PROGRESS": "0",
               "DISTILL_CACHE_DIR": str(driver / "cache")}
        out = subprocess.run([sys.executable, "-m", "distill_pipeline.cli.main", "run", "all", "-c", "c.yaml",
                              "--ray-address", f"127.0.0.1:{port}"], cwd=driver, capture_output=True,
                             text=True, env=env, timeout=600)
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
        assert (driver / "run").is_dir() and not (elsewhere / "run").exists()
        segments = list((driver / "cache" / "teacher-logits" / "segments").iterdir())
        assert segments and not decoy.exists()
        summary = json.loads(next((driver / "run").glob("teacher_logits-*/manifest.json")).read_text())["summary"]
        assert summary["store"] == str(driver / "cache" / "teacher-logits") and summary["extracted"] > 0
        trained = json.loads(next((driver / "run").glob("train-*/manifest.json")).read_text())["summary"]
        assert trained["workers"] == 2

        # the same config run locally (embedded Ray, its own store) evaluates to the same table
        local = tmp_path / "local"
        shutil.copytree(driver, local, ignore=shutil.ignore_patterns("run", "cache"))
        out = subprocess.run([sys.executable, "-m", "distill_pipeline.cli.main", "run", "all", "-c", "c.yaml"],
                             cwd=local, capture_output=True, text=True, timeout=600,
                             env={**env, "DISTILL_CACHE_DIR": str(local / "cache")})
        assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]

        def table(root: Path) -> dict:
            return json.loads(next(root.glob("run/evaluate-*/results.json")).read_text())
        assert table(local) == table(driver)
    finally:
        _stop_processes_mentioning(str(temp))
        shutil.rmtree(temp, ignore_errors=True)
