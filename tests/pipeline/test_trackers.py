"""`report_to: [tensorboard, wandb, mlflow]` (trackers.py), offline for real: a tiny DPO run writes
all three, and each is read back with its own library — TensorBoard's `EventAccumulator`,
MLflow's `MlflowClient` on the run dir's file store, and wandb's offline run file decoded with
wandb's own `Record` protobuf — holding exactly what `metrics.jsonl`, `validation.jsonl` and
`results.json` hold, at the same steps. Also: a resumed node continues its tracker runs without
duplicated steps; unknown or uninstalled trackers are config errors; `report_to` reruns nothing.
No network: WANDB_MODE=offline, every file under the test's tmp dir.
"""
from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from distill_pipeline import trackers
from distill_pipeline.config import ConfigError, TrainHP, config_from_dict
from distill_pipeline.pipeline import runner
from distill_pipeline.stages import flatten
from distill_pipeline.training import train_loop
from tests.conftest import tiny_tree, write_config

ALL = ["tensorboard", "wandb", "mlflow"]
TRAINING = ("sft.teacher", "sft.student", "teacher_dpo", "train")


def offline(mp: pytest.MonkeyPatch, tmp: Path) -> None:
    """wandb offline with its files in `tmp`; MLflow at its default (a file store in the run dir)."""
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(tmp / "wandb-dir"))
    for name in ("WANDB_PROJECT", "WANDB_API_KEY", "MLFLOW_TRACKING_URI"):
        mp.delenv(name, raising=False)
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # remembered as unset: restored after the test,
    mp.delenv("MLFLOW_ALLOW_FILE_STORE")      # whatever trackers.py sets for its default store


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        offline(mp, tmp)
        plan = runner.make_plan(config_from_dict(tiny_tree(tmp / "run", method="dpo", report_to=ALL)))
        runner.run(plan, ["all"], use_ray=False, echo=lambda s: None)
    return plan, tmp


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def expected(plan, node: str) -> dict[str, dict[int, float]]:
    """metric → {step: value}: what the node's own files hold (evaluate: its table, at step 0)."""
    folder = plan.folder(node)
    if node == "evaluate":
        results = json.loads((folder / "results.json").read_text())
        return {f"{role}/{k}": {0: v} for role, r in results.items() for k, v in r.items()}
    out: dict[str, dict[int, float]] = {}
    logs = [folder / "metrics.jsonl"] + ([folder / "validation.jsonl"] if node == "train" else [])
    for log in logs:
        for row in rows(log):
            for k, v in row.items():
                if k != "step":
                    out.setdefault(k, {})[row["step"]] = v
    return out


def check(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]], rel: float) -> None:
    """Every value the node's files hold, at the same step, once; plus tokens/s at every step."""
    assert want and set(want) <= set(got), set(want) - set(got)
    for k, by_step in want.items():
        assert got[k] == pytest.approx(by_step, rel=rel), k
    if "loss" in want:
        assert set(got["tokens_per_s"]) == set(want["loss"]) and min(got["tokens_per_s"].values()) > 0


def ids(plan, node: str) -> dict:
    return json.loads((plan.folder(node) / trackers.STATE).read_text())


# ------------------------------------------------------------------ the three readers

def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / trackers.TENSORBOARD_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        assert len({e.step for e in events}) == len(events), f"{tag}: a step twice"
        out[tag] = {e.step: e.value for e in events}
    return out


def mlflow_client(plan):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(plan.run_dir / "mlruns").as_uri())


def mlflow_history(client, run_id: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for key in client.get_run(run_id).data.metrics:
        history = client.get_metric_history(run_id, key)
        assert len({m.step for m in history}) == len(history), f"{key}: a step twice"
        out[key] = {m.step: m.value for m in history}
    return out


def wandb_records(path: Path):
    """The records of a wandb run file, decoded by wandb's own protobuf (`Record`). The pinned
    wandb has no Python reader (its Go core writes and reads these files; `datastore.py` is
    gone), so the framing — LevelDB's log format, 32 KiB blocks of CRC-checked chunks after a
    7-byte `:W&B` header — is walked here."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"{path}: bad checksum at {pos}"
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(tmp: Path, run_id: str) -> tuple[dict, dict[str, dict[int, float]]]:
    """(the run record's fields, metric → {step: value}) of the offline run `run_id`."""
    files = glob.glob(str(tmp / "wandb-dir" / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    assert len(files) == 1, files
    meta: dict = {}
    history: dict[str, dict[int, float]] = {}
    for record in wandb_records(Path(files[0])):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            meta = {"group": record.run.run_group, "job_type": record.run.job_type,
                    "name": record.run.display_name, "project": record.run.project,
                    "config": {u.key: json.loads(u.value_json) for u in record.run.config.update}}
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            for k, v in items.items():
                if not k.startswith("_"):
                    assert items["_step"] not in history.get(k, {}), f"{k}: a step twice"
                    history.setdefault(k, {})[items["_step"]] = v
    return meta, history


# ------------------------------------------------------------------ a run, read back

@pytest.mark.slow
@pytest.mark.parametrize("node", [*TRAINING, "evaluate"])
def test_tensorboard_holds_every_logged_value(run, node):
    plan, _ = run
    check(tensorboard_scalars(plan.folder(node)), expected(plan, node), rel=1e-6)  # float32 events


@pytest.mark.slow
@pytest.mark.parametrize("node", [*TRAINING, "evaluate"])
def test_mlflow_holds_every_logged_value_grouped_by_run_dir(run, node):
    plan, _ = run
    client = mlflow_client(plan)
    run_id = ids(plan, node)["mlflow"]
    check(mlflow_history(client, run_id), expected(plan, node), rel=1e-12)
    info = client.get_run(run_id)
    assert client.get_experiment(info.info.experiment_id).name == plan.run_dir.name
    assert info.info.status == "FINISHED"
    manifest = json.loads((plan.folder(node) / "manifest.json").read_text())
    tags = info.data.tags
    assert (tags["fingerprint"], tags["node"], tags["method"]) == (manifest["fingerprint"], node, "dpo")
    assert tags["mlflow.runName"] == ("train [loss dpo]" if node == "train" else
                                      "evaluate [train loss dpo]" if node == "evaluate" else node)
    view = flatten(manifest["config"])
    assert info.data.params == {k: str(v) for k, v in view.items()}  # the node's config


@pytest.mark.slow
@pytest.mark.parametrize("node", [*TRAINING, "evaluate"])
def test_wandb_offline_run_holds_every_logged_value(run, node):
    plan, tmp = run
    meta, history = wandb_run(tmp, ids(plan, node)["wandb"])
    check(history, expected(plan, node), rel=1e-12)
    manifest = json.loads((plan.folder(node) / "manifest.json").read_text())
    assert (meta["group"], meta["job_type"], meta["project"]) == ("run", manifest["stage"], "distill-pipeline")
    assert meta["config"]["distill.fingerprint"] == manifest["fingerprint"]
    assert meta["config"]["distill.node"] == node and meta["name"].startswith(node)
    assert {k: v for k, v in meta["config"].items() if not k.startswith(("distill.", "_"))} == \
        flatten(manifest["config"])


# ------------------------------------------------------------------ resume

class Crash(Exception):
    pass


def toy(seed: int = 0):
    """A two-layer regression trained by `train_loop` (as tests/stages/test_training_resume.py)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(3, 4, generator=g), torch.randn(3, 1, generator=g)) for _ in range(5)]

    def batches(epoch):
        return (data[i] for i in torch.randperm(5, generator=torch.Generator().manual_seed(epoch)).tolist())

    def counts(epoch):
        return [{"tokens_w": 3}] * 5
    return model, batches, counts


def test_a_resumed_node_continues_its_tracker_runs_without_duplicated_steps(tmp_path, monkeypatch):
    """Killed at step 8 (checkpoint at 6, steps 7-8 already reported), then resumed: TensorBoard
    and MLflow hold steps 1-9 once each, with the values of an uninterrupted run; the MLflow and
    wandb runs are the interrupted attempt's (same ids)."""
    offline(monkeypatch, tmp_path)
    hp = TrainHP(lr=0.05, max_steps=9, batch_size=3, checkpoint_every=3)
    node = trackers.NodeRun(report_to=tuple(ALL), run_dir=str(tmp_path / "run"), node="sft.student",
                            stage="sft", fingerprint="f" * 64, method="sft", config={"hp.lr": 0.05})
    calls = {"n": 0}

    def loss_fn(m, batch, norm, crash_at=None):
        calls["n"] += 1
        if crash_at and calls["n"] == crash_at:
            raise Crash()
        x, y = batch
        return ((m(x) - y) ** 2).sum() / norm["tokens_w"], {}

    def train(folder, crash_at=None, seed=0):
        model, batches, counts = toy(seed)
        calls["n"] = 0
        with trackers.bound(node):
            train_loop(model, hp=hp, examples=15, batches=batches, counts=counts, work_dir=folder,
                       loss_fn=lambda m, b, n: loss_fn(m, b, n, crash_at), desc="toy")

    train(tmp_path / "clean")
    clean = {k: {r["step"]: r[k] for r in rows(tmp_path / "clean/metrics.jsonl")} for k in ("loss", "lr")}
    with pytest.raises(Crash):
        train(tmp_path / "node", crash_at=8)  # the 8th step's forward: steps 1-7 reported
    first = ids_of(tmp_path / "node")
    client = mlflow_client_at(tmp_path / "run")
    assert sorted(m.step for m in client.get_metric_history(first["mlflow"], "loss")) == list(range(1, 8))
    assert client.get_run(first["mlflow"]).info.status == "FAILED"
    train(tmp_path / "node", seed=123)  # resumes at step 6: the weights come from the checkpoint
    assert ids_of(tmp_path / "node") == first
    for got in (tensorboard_scalars(tmp_path / "node"), mlflow_history(client, first["mlflow"])):
        for k, by_step in clean.items():
            assert got[k] == pytest.approx(by_step, rel=1e-6), k
        assert sorted(got["tokens_per_s"]) == list(range(1, 10))
    assert client.get_run(first["mlflow"]).info.status == "FINISHED"
    # wandb offline cannot resume a run: the resumed attempt is a second offline run, same id
    assert len(glob.glob(str(tmp_path / "wandb-dir" / "wandb" / f"offline-run-*-{first['wandb']}*"))) == 2


def ids_of(folder: Path) -> dict:
    return json.loads((folder / trackers.STATE).read_text())


def mlflow_client_at(run_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())


# ------------------------------------------------------------------ config

def test_an_unknown_tracker_is_a_config_error_naming_it(tmp_path):
    with pytest.raises(ConfigError) as err:
        config_from_dict(tiny_tree(tmp_path / "run", report_to=["tensorboard", "neptune"]))
    assert "report_to: unknown tracker 'neptune'; accepted: tensorboard, wandb, mlflow" in str(err.value)


def test_a_tracker_that_is_not_installed_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        config_from_dict(tiny_tree(tmp_path / "run", report_to=["tensorboard", "wandb"]))
    assert "report_to: wandb is not installed: pip install 'distill-pipeline[trackers]'" in str(err.value)
    assert config_from_dict(tiny_tree(tmp_path / "run", report_to="tensorboard")).report_to == ["tensorboard"]


def test_report_to_reruns_nothing(tmp_path):
    """Neutral for fingerprints (also in tests/unit/test_fingerprints.py, leaf by leaf)."""
    for method in ("dpo", "adpa"):
        plain = runner.make_plan(config_from_dict(tiny_tree(tmp_path / "run", method=method)))
        tracked = runner.make_plan(config_from_dict(tiny_tree(tmp_path / "run", method=method, report_to=ALL)))
        assert tracked.fingerprints == plain.fingerprints


def test_wandb_online_without_a_key_is_refused_before_any_compute(tmp_path):
    """Through the CLI, in its own process (wandb reads its settings once per process)."""
    config = write_config(tmp_path / "c.yaml", tiny_tree(tmp_path / "run", method="dpo", report_to=["wandb"]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env.update(DISTILL_PROGRESS="0", WANDB_MODE="online", HOME=str(tmp_path), NETRC=str(tmp_path / "none"),
               WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "distill_pipeline.cli.main", "run", "all", "-c", str(config)],
                          capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "error: report_to: wandb: No API key configured" in done.stderr
    assert "wandb login" in done.stderr and "WANDB_MODE=offline" in done.stderr
    assert "will run" not in done.stdout and not (tmp_path / "run" / ".partial").exists()
