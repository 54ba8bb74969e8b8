"""CI's short versions of the benchmark scripts, and the README kept true to the code."""
from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys

from distill_pipeline.losses import methods_table
from tests.conftest import ROOT


@pytest.mark.slow
def test_replication_smoke(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/replicate.py", "--task", "numbers-ranked", "--smoke",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "DISTILL_PROGRESS": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    folder = tmp_path / "numbers-ranked"
    report = json.loads((folder / "replication.json").read_text())
    assert list(report["methods"]) == ["sft", "sft-yw", "dpo", "dckd", "adpa", "adpa+",
                                       "adpa-no-sft", "dckd-no-yl", "dckd-sft-teacher"]
    teacher = report["teacher_dpo"]  # picked on validation (smoke: the first candidate only)
    assert teacher["lr"] == 1e-4 and list(teacher["validation"]) == ["0.0001"]
    assert 0 <= teacher["validation"]["0.0001"]["task_reward"] <= 1
    assert 0 <= teacher["reference_validation"]["task_reward"] <= 1  # the SFT teacher, beside it
    ms = report["methods"]
    assert {k: v for k, v in ms["adpa+"]["setting"].items() if k != "lr"} == {
        "alpha": ms["dckd"]["setting"]["alpha"], "gamma": ms["adpa"]["setting"]["gamma"]}  # its own lr
    assert ms["dckd-no-yl"]["setting"] == ms["dckd"]["setting"]
    for r in ms.values():
        assert 0 <= r["task_accuracy"][0] <= r["task_reward"][0] <= 1 and r["task_reward"][1] == 0.0  # one seed
    assert [r["relation"] for r in report["relations"]][:4] == ["adpa+ >= adpa", "adpa > dckd", "dckd >= dpo",
                                                                 "dpo >= sft"]
    lines = [l for l in out.stdout.splitlines() if l.startswith("relation ")]
    assert len(lines) == len(report["relations"]) == 9
    for line, rel in zip(lines, report["relations"]):
        lo, hi = rel["ci"]
        assert line == (f"relation {rel['relation']}: {rel['verdict']} (diff {rel['diff']:+.4f}, "
                        f"95% CI [{lo:+.4f}, {hi:+.4f}])") and lo <= rel["diff"] <= hi
    assert (folder / "replication.png").read_bytes()[:4] == b"\x89PNG"
    assert "| adpa+ |" in (folder / "replication.md").read_text()
    tasks = subprocess.run([sys.executable, "benchmarks/replicate.py", "--list-tasks"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert tasks.stdout.split() == ["numbers", "numbers-ranked"]


@pytest.mark.slow
def test_adaptive_k_bench_smoke(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/adaptive_k_bench.py", "--smoke", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "DISTILL_PROGRESS": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "adaptive_k.json").read_text())
    assert list(report["formats"]) == ["fixed K=50", "top_mass 0.999", "top_mass 0.99"]
    for row in report["formats"].values():
        assert row["bytes_per_token"] > 0 and 1 <= row["mean_k"] <= 50
        assert set(row["methods"]) == {"adpa", "dckd"}


def test_id_coding_bench_smoke(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/id_coding_bench.py", "--tokens", "8192",
                          "--out", str(tmp_path / "ids.json")], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["option"]: r for r in json.loads((tmp_path / "ids.json").read_text())["rows"]}
    today = rows["same, blosc blocksize = the whole chunk (store.py since issue 12)"]
    assert today["lossless"] and today["B_per_token"] < rows["zarr today: int32, blosc zstd-5 byte shuffle"]["B_per_token"]


def test_identity_bench_smoke():
    out = subprocess.run([sys.executable, "benchmarks/identity_bench.py", "--shards", "2", "--shard-mb", "8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("0.02 GB in 2 shard(s): first hash") and "new process (memo file)" in out.stdout


def test_readme_methods_table_is_generated_from_losses():
    assert methods_table() in (ROOT / "README.md").read_text()


def test_readme_first_lines_are_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1:lines.index("```bash") + 3]
    assert "pip install -e '.[dev]'" in block[0] and "distill-pipeline run all -c configs/quickstart.yaml" in block[0]
    assert block[1].endswith("python -m pytest -q")
    assert (ROOT / ".ci/run").read_text().strip().endswith("python -m pytest -q")
