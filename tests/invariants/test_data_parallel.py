"""Data-parallel training on Ray Train (parallel.py): N workers × accumulation A ≡ one worker ×
accumulation N·A, for DDP and FSDP; precision and gradient checkpointing; a worker killed with
SIGKILL after a checkpoint → the rerun resumes to the weights of an uninterrupted run.

Every Ray Train run costs ~20 s of fixed start-up on this machine, so the runs are shared through
module fixtures and the upstream nodes are built once, inline.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill_pipeline.models import load_checkpoint
from distill_pipeline.pipeline import runner
from distill_pipeline.config import load_config
from tests.conftest import tiny_tree, write_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _tree(run_dir: Path, method: str, report_to: tuple = (), **train) -> dict:
    tree = tiny_tree(run_dir, method=method, report_to=list(report_to))
    tree["train"] = {"lr": 1e-3, "max_steps": 3, "batch_size": 4, "checkpoint_every": 3, **train}
    return tree


def trajectory(root: Path, method: str, name: str, report_to: tuple = (), **train):
    """(per-step losses, per-step grad norms, final weights) of the train node."""
    cfg = load_config(write_config(root / f"{method}-{name}.yaml", _tree(root / "run", method, report_to, **train)))
    plan = runner.make_plan(cfg)
    upstream = [n.name for n in plan.nodes if n.name not in ("train", "evaluate")]
    runner.run(plan, upstream, use_ray=False, echo=lambda s: None)  # built once, shared by every run
    runner.run(plan, ["train"], use_ray=train.get("workers", 1) > 1, echo=lambda s: None)
    lines = [json.loads(line) for line in (plan.folder("train") / "metrics.jsonl").read_text().splitlines()]
    weights = load_checkpoint(plan.folder("train") / "model")[0].state_dict()
    return [r["loss"] for r in lines], [r["grad_norm"] for r in lines], weights


def assert_same(a, b, *, rel: float, atol: float) -> None:
    assert a[0] == pytest.approx(b[0], rel=rel)  # every step's loss
    assert a[1] == pytest.approx(b[1], rel=rel)  # every step's gradient norm
    for k in a[2]:
        assert torch.allclose(a[2][k].float(), b[2][k].float(), rtol=0, atol=atol), k


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("dp")


@pytest.fixture(scope="module")
def dpo_runs(root):
    """DPO: the policy's reference log-probs are scored on 1/N of the pairs by each worker."""
    return {"1x2": trajectory(root, "dpo", "1x2", grad_accum=2),
            "ddp2x1": trajectory(root, "dpo", "ddp2x1", ("tensorboard", "mlflow"), workers=2, grad_accum=1),
            "fsdp2x1": trajectory(root, "dpo", "fsdp2x1", workers=2, grad_accum=1, strategy="fsdp")}


def test_two_ddp_workers_equal_one_worker_with_twice_the_accumulation(dpo_runs):
    assert_same(dpo_runs["ddp2x1"], dpo_runs["1x2"], rel=1e-5, atol=1e-5)


def test_fsdp_matches_ddp(dpo_runs):
    assert_same(dpo_runs["fsdp2x1"], dpo_runs["ddp2x1"], rel=1e-4, atol=1e-4)


def test_only_rank_0_reports_to_the_trackers(dpo_runs, root):
    """report_to with two DDP workers: one TensorBoard event file and one MLflow run for the
    node, each holding every step once (rank 1 opens no tracker)."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plan = runner.make_plan(load_config(root / "dpo-ddp2x1.yaml"))
    folder = plan.folder("train")
    assert len(list((folder / "tensorboard").glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    client = MlflowClient(tracking_uri=(plan.run_dir / "mlruns").as_uri())
    experiment = client.get_experiment_by_name(plan.run_dir.name).experiment_id
    runs = client.search_runs([experiment], filter_string="tags.node = 'train'")
    assert len(runs) == 1
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")) == [1, 2, 3]


def test_the_check_can_fail_a_different_step_is_told_apart(dpo_runs, root):
    """A two-worker run that sees only half of each step (accumulation 1 ≢ 2 on one worker) is not
    'the same': the tolerance above separates real differences."""
    half = trajectory(root, "dpo", "1x1", grad_accum=1)
    with pytest.raises(AssertionError):
        assert_same(half, dpo_runs["1x2"], rel=1e-5, atol=1e-5)


def test_adpa_ddp_with_accumulation(root):
    """Rollout-based loss, cache tensors, 2 workers × accumulation 2 ≡ 1 worker × 4."""
    assert_same(trajectory(root, "adpa", "ddp2x2", workers=2, grad_accum=2),
                trajectory(root, "adpa", "1x4", grad_accum=4), rel=1e-5, atol=1e-5)


def test_precision_and_gradient_checkpointing(root):
    base = trajectory(root, "dckd", "fp32", grad_accum=2)
    # recomputing activations in backward changes nothing in float32
    assert_same(trajectory(root, "dckd", "ckpt", grad_accum=2, gradient_checkpointing=True), base,
                rel=1e-6, atol=1e-7)
    mixed = trajectory(root, "dckd", "mixed", grad_accum=2, precision="bf16-mixed")
    assert {v.dtype for v in mixed[2].values()} == {torch.float32}  # float32 master weights
    assert mixed[0] != base[0]  # the forward ran in bfloat16 …
    assert_same(mixed, base, rel=1e-2, atol=1e-2)  # … close to float32
    bf16 = trajectory(root, "dckd", "bf16", grad_accum=2, precision="bf16")
    assert {v.dtype for v in bf16[2].values()} == {torch.float32}  # saved in the dtype it was loaded in
    assert all(torch.equal(v, v.bfloat16().float()) for v in bf16[2].values())  # trained in bfloat16
    assert bf16[0] == pytest.approx(base[0], rel=1e-2)


# ------------------------------------------------------------------ a worker killed

def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _checkpointed(partial: Path) -> int:
    for path in partial.glob("train-*/checkpoint/loop.json"):
        try:
            return json.loads(path.read_text())["step"]
        except (OSError, ValueError):  # being swapped for the next one
            pass
    return 0


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill_pipeline.cli.main", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env={**os.environ, "DISTILL_PROGRESS": "0"})


def kill_a_worker_after_a_checkpoint(proc: subprocess.Popen, partial: Path, timeout: float) -> int:
    """`kill -9` one Ray Train worker of the `run` in `proc` once a checkpoint of step ≥ 4 is in
    `partial`; returns its pid (the workers are found before training starts, so the kill follows
    the checkpoint at once)."""
    deadline, workers = time.time() + timeout, []
    while time.time() < deadline and proc.poll() is None:
        if len(workers) < 2:
            workers = [p for p in _descendants(proc.pid) if "RayTrainWorker" in _cmdline(p)]
        elif _checkpointed(partial) >= 4:
            os.kill(workers[-1], signal.SIGKILL)
            return workers[-1]
        time.sleep(0.02)
    raise AssertionError("never saw a checkpoint and a training worker to kill")


def test_a_killed_worker_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    config = write_config(tmp_path / "c.yaml", _tree(tmp_path / "run", "dckd", workers=2, max_steps=120,
                                                       checkpoint_every=4, batch_size=2))
    upstream = _cli("run", "teacher_logits", "-c", str(config), "--no-ray")
    assert upstream.returncode == 0, upstream.stderr[-3000:]
    whole = _cli("run", "train", "-c", str(config))  # uninterrupted, then removed and run again
    assert whole.returncode == 0, whole.stderr[-3000:]
    published = next((tmp_path / "run").glob("train-*"))
    straight = load_checkpoint(published / "model")[0].state_dict()
    shutil.rmtree(published)

    proc = subprocess.Popen([sys.executable, "-m", "distill_pipeline.cli.main", "run", "train", "-c",
                             str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "DISTILL_PROGRESS": "0"})
    try:
        kill_a_worker_after_a_checkpoint(proc, tmp_path / "run" / ".partial", timeout=180)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0, out + err
    assert "train failed" in err and "partial output kept" in err, err[-3000:]
    assert not list((tmp_path / "run").glob("train-*"))

    again = _cli("run", "train", "-c", str(config))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step" in again.stdout + again.stderr
    resumed_dir = next((tmp_path / "run").glob("train-*"))
    resumed = load_checkpoint(resumed_dir / "model")[0].state_dict()
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k
    steps = [json.loads(line)["step"] for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 121))  # each step logged once, across the crash


# ------------------------------------------------------------------ refused before compute

def test_workers_without_ray_and_beyond_the_cluster_are_refused(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", _tree(tmp_path / "run", "sft", workers=3)))
    plan = runner.make_plan(cfg)
    with pytest.raises(runner.PipelineError, match="workers > 1 runs on Ray Train; run without --no-ray"):
        runner.run(plan, ["train"], use_ray=False, echo=lambda s: None)
    with pytest.raises(runner.PipelineError,
                       match=r"train: 3 workers × resources.train_cpus=1 need 3 CPUs; the Ray cluster has 2"):
        runner.check_worker_resources(plan, ["train"], {"CPU": 2.0})
    runner.check_worker_resources(plan, ["train"], {"CPU": 3.0})  # enough: no error
    shared = runner.make_plan(load_config(write_config(tmp_path / "g.yaml", {
        **_tree(tmp_path / "run", "sft", workers=2), "resources": {"gpus": 0.5}})))
    with pytest.raises(runner.PipelineError, match="would share GPUs"):
        runner.check_worker_resources(shared, ["train"], {"CPU": 4.0, "GPU": 4.0})
