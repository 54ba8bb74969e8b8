"""Bad input and faults around the pipeline itself, through the real CLI: configs and overrides,
targets, run dirs, Ray addresses, non-finite training, the run-dir lock, signals, lost cache
entries, a foreign Ray cluster. Each case checks the exit code, that no traceback reaches the
user, and the words the message must contain (what, where, what to do)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, tiny_tree, write_config


def cli(*args, cwd=None, env=None, timeout=300):
    env = {**os.environ, "DISTILL_PROGRESS": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "distill_pipeline.cli.main", *args], capture_output=True,
                          text=True, cwd=cwd or ROOT, env=env, timeout=timeout)


def clean(out: subprocess.CompletedProcess, code: int, *words: str) -> str:
    text = out.stdout + out.stderr
    assert out.returncode == code, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for w in words:
        assert w in text, f"{w!r} not in: {text[-3000:]}"
    return text


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path / "c.yaml", tiny_tree(tmp_path / "run"))


# ------------------------------------------------------------------ configs and overrides

def _write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("make, words", [
    (lambda d: _write(d / "dup.yaml", "run_dir: a\nmethod: dckd\nrun_dir: b\n"), ["run_dir", "given twice", "lines 1 and 3", "keep one"]),
    (lambda d: d, ["is a directory", "pass -c"]),
    (lambda d: d / "missing.yaml", ["config file not found", "missing.yaml"]),
    (lambda d: _write(d / "latin.yaml", "run_dir: caf\xe9\n".encode("latin-1")), ["not UTF-8", "save it as UTF-8"]),
    (lambda d: _write(d / "bad.yaml", "run_dir: [unclosed\n"), ["not valid YAML", "bad.yaml"]),
    (lambda d: _write(d / "list.yaml", "- a\n- b\n"), ["must be a mapping of sections"]),
])
def test_bad_config_files(tmp_path, make, words):
    clean(cli("status", "-c", str(make(tmp_path))), 2, *words)


@pytest.mark.parametrize("sets, words", [
    (["=3"], ["--set '=3'", "empty key", "key.path=value"]),
    (["train..lr=1"], ["empty part", "train..lr"]),
    (["train.lr"], ["expected key.path=value"]),
    (["train.lr=[1"], ["not valid YAML", "quote it"]),
    (["train.epochs=true"], ["train.epochs", "expected a number", "boolean"]),
    (["run_dir="], ["run_dir", "at least 1 character"]),
    (["train.loss.alpha=.nan"], ["train.loss.alpha", "nan"]),
    (["train.loss.alpha=-1"], ["train.loss.alpha", "greater than or equal to 0"]),
    (["method=dpo", "train.loss.beta=-1"], ["train.loss.beta", "greater than 0"]),
    (["method=tvkd", "train.loss.potential=vibes"], ["train.loss.potential", "teacher_value, student_entropy"]),
    (["train.loss.gamma=1"], ["train.loss.gamma", "unknown option for method dckd", "accepted: alpha"]),
    (["train.dckd_loss.alpha=0.2"], ["train.dckd_loss", "only used by method adpa+"]),
    (["teacher_logits.logp_keep_bits=12"], ["logp_keep_bits", "below the 10 mantissa bits"]),
    (["method=grpo"], ["method", "adpa+"]),
    (["teacher_dpo.betta=1"], ["teacher_dpo.betta", "unknown key", "beta"]),
])
def test_bad_overrides(config, sets, words):
    clean(cli("status", "-c", str(config), *[a for s in sets for a in ("--set", s)]), 2, *words)


def test_a_broken_chat_template_and_an_ignored_strategy_through_the_cli(tmp_path, config):
    template = _write(tmp_path / "chat.jinja", "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}\n")
    clean(cli("status", "-c", str(config), "--set", f"data.chat_template={template}"), 2,
          "data.chat_template", str(template), "Jinja syntax error on line 2", "fix the template")
    out = cli("status", "-c", str(config), "--set", "train.strategy=fsdp")
    clean(out, 0, "never run")
    assert "warning: train.strategy: fsdp has no effect with train.workers: 1" in out.stderr, out.stderr
    assert "warning" not in clean(cli("status", "-c", str(config)), 0).lower()


def test_loss_options_parse_like_typed_fields(config):
    """YAML reads 1e-3 as a string; loss options accept it as a number, like lr does."""
    clean(cli("status", "-c", str(config), "--set", "method=adpa", "--set", "train.loss.gamma=1e-3",
              "--set", "train.lr=1e-3"), 0, "never run")


def test_data_source_that_is_a_directory(tmp_path):
    d = tmp_path / "rows.jsonl"
    d.mkdir()
    tree = tiny_tree(tmp_path / "run")
    tree["data"]["sft"] = {"source": str(d)}
    clean(cli("status", "-c", str(write_config(tmp_path / "c.yaml", tree))), 2, "data.sft", "is a directory",
          ".jsonl / .json / .parquet file")


def test_a_bad_eval_file_fails_before_any_stage_runs(tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text("this is not json\nneither is this\n")
    tree = tiny_tree(tmp_path / "run")
    tree["data"]["eval"] = {"source": str(bad)}
    out = clean(cli("run", "all", "-c", str(write_config(tmp_path / "c.yaml", tree)), "--no-ray"), 1,
                str(bad), "invalid JSON on every line")
    assert "preflight: data.sft" in out and ": done" not in out
    assert not [p for p in (tmp_path / "run").glob("*-*") if (p / "manifest.json").exists()]


@pytest.mark.parametrize("breakage, words", [
    ("missing", ["no such local directory", "not a hub id", "Fix name_or_path"]),
    ("no-tokenizer", ["no tokenizer files in", "tokenizer.json"]),
    ("bad-config", ["config.json", "not valid JSON"]),
    ("negative-size", ["config.json: hidden_size is -48, not a positive integer"]),
])
def test_a_bad_model_is_refused_by_the_preflight_through_the_cli(tmp_path, breakage, words):
    """The model corpus (tests/faults/test_model_faults.py) runs in-process; this checks the same
    errors reach a CLI user as one message, before any stage runs."""
    from distill_pipeline.models import load_model, load_tokenizer, save_model
    from distill_pipeline.config import ModelSpec

    model_dir = tmp_path / "student"
    if breakage != "missing":
        spec = ModelSpec(preset="tiny-student")
        save_model(load_model(spec), load_tokenizer(spec), model_dir)
        if breakage == "no-tokenizer":
            (model_dir / "tokenizer.json").unlink()
        elif breakage == "negative-size":
            settings = json.loads((model_dir / "config.json").read_text())
            (model_dir / "config.json").write_text(json.dumps({**settings, "hidden_size": -48}))
        else:
            (model_dir / "config.json").write_text("{not json")
    tree = tiny_tree(tmp_path / "run")
    tree["models"]["student"] = {"name_or_path": str(model_dir)}
    out = clean(cli("run", "-c", str(write_config(tmp_path / "c.yaml", tree)), "--no-ray",
                    env={"HF_HUB_OFFLINE": "1"}), 1, *words)
    assert ": done" not in out


# ------------------------------------------------------------------ targets, run dirs, Ray addresses

@pytest.mark.parametrize("args, code, words", [
    (["run", "all", "teacher_dpo"], 1, ["'all' already means every node", "drop it"]),
    (["run", "bogus"], 1, ["no node or stage 'bogus'", "choose from", "teacher_dpo"]),
    (["run", "--ray-address", "not-an-address"], 1, ["not-an-address", "not host:port"]),
])
def test_bad_targets_and_addresses(config, args, code, words):
    clean(cli(*args, "-c", str(config)), code, *words)


def test_unreachable_ray_address_fails_fast(config):
    t0 = time.perf_counter()
    out = cli("run", "-c", str(config), "--ray-address", "127.0.0.1:9")
    clean(out, 1, "cannot reach the Ray cluster at 127.0.0.1:9", "ray status", "drop --ray-address")
    assert time.perf_counter() - t0 < 60


@pytest.fixture
def silent_port():
    """A TCP port on 127.0.0.1 that accepts connections and never says a word (not Ray)."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    held, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        server.close()


def test_a_port_that_answers_but_is_not_ray_fails_in_seconds(config, silent_port):
    """Before: ray.init retried against it without bound (the subprocess timeout fails the test)."""
    address = f"127.0.0.1:{silent_port}"
    t0 = time.perf_counter()
    out = cli("run", "sft.student", "-c", str(config), "--ray-address", address, timeout=120)
    clean(out, 1, f"no Ray cluster at {address}", "accepts connections but does not answer",
          "GCS port", "ray status", "drop --ray-address")
    assert time.perf_counter() - t0 < 90
    assert ": done" not in out.stdout


def test_ray_address_local_is_an_embedded_ray(monkeypatch):
    """RAY_ADDRESS=local (as Ray itself accepts) starts the private embedded instance; it was
    refused as 'not host:port'. (ray.init is replaced: no Ray starts here.)"""
    import ray

    from distill_pipeline.config import RayCfg
    from distill_pipeline.pipeline.raysetup import ensure_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    for env, address in (("local", None), ("127.0.0.1:9", "local")):
        monkeypatch.setenv("RAY_ADDRESS", env)
        calls.clear()
        assert ensure_ray(RayCfg(address=address, num_cpus=2)) is True  # the caller shuts it down
        assert calls and calls[0]["address"] == "local" and calls[0]["num_cpus"] == 2, calls


def test_run_dir_that_is_a_file(tmp_path):
    f = tmp_path / "run"
    f.write_text("not a directory")
    config = write_config(tmp_path / "c.yaml", tiny_tree(f))
    for cmd in ("status", "run"):
        clean(cli(cmd, "-c", str(config)), 1, f"run_dir {f} is a file", "set run_dir to a directory")


def test_usage_errors_are_clicks_not_tracebacks():
    clean(cli("bogus"), 2, "No such command")
    clean(cli("run", "--nope"), 2, "No such option")


def test_an_unexpected_error_is_one_line_and_a_saved_traceback(config):
    code = ("import sys; import distill_pipeline.pipeline.runner as r; import distill_pipeline.cli.main as m;"
            "r.make_plan = lambda cfg: 1 / 0; sys.argv = ['distill-pipeline', 'status', '-c', sys.argv[1]]; m.main()")
    out = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True, cwd=ROOT)
    text = clean(out, 1, "unexpected ZeroDivisionError", "this is a bug", "DISTILL_DEBUG=1")
    saved = Path(re.search(r"traceback is in (\S+);", text).group(1))
    assert "Traceback" in saved.read_text()
    saved.unlink()


# ------------------------------------------------------------------ training that goes non-finite

def test_non_finite_loss_stops_the_stage_and_publishes_nothing(tmp_path, monkeypatch):
    from distill_pipeline import batches
    from distill_pipeline.pipeline import runner
    from distill_pipeline.config import load_config

    real = batches.loss_fn_for

    def poisoned(spec, options):
        fn = real(spec, options)
        calls = []

        def loss_fn(model, batch, norm):
            loss, metrics = fn(model, batch, norm)
            calls.append(1)
            return (loss * float("nan") if len(calls) >= 3 else loss), metrics
        return loss_fn

    monkeypatch.setattr(batches, "loss_fn_for", poisoned)
    plan = runner.make_plan(load_config(write_config(tmp_path / "c.yaml", tiny_tree(tmp_path / "run", method="sft"))))
    with pytest.raises(runner.PipelineError) as err:
        runner.run(plan, ["sft.student"], use_ray=False, echo=lambda s: None)
    msg = str(err.value)
    for words in ("sft.student failed", "NonFiniteLoss", "step 3 is not finite", "loss nan", "gradient norm",
                  "nothing was published", "Lower the learning rate", "partial output kept"):
        assert words in msg, msg
    assert not plan.done("sft.student") and plan.partial("sft.student").exists()


# ------------------------------------------------------------------ the run-dir lock

HOLD = ("import sys, time; from pathlib import Path; from distill_pipeline.pipeline.lock import RunLock\n"
        "with RunLock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(float(sys.argv[2]))\n")


def _holder(run_dir: Path, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(seconds)], stdout=subprocess.PIPE,
                         text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_run_on_a_locked_run_dir_says_who_holds_it(tmp_path, config):
    holder = _holder(tmp_path / "run", 60)
    try:
        clean(cli("run", "-c", str(config)), 1, f"run dir {tmp_path / 'run'} is in use by pid {holder.pid}",
              "--wait")
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, config):
    holder = _holder(tmp_path / "run", 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == holder.pid  # stale record
    clean(cli("run", "sft.student", "-c", str(config), "--no-ray"), 0, "sft.student: done")


def test_wait_queues_behind_the_holder(tmp_path, config):
    holder = _holder(tmp_path / "run", 3)
    out = cli("run", "sft.student", "-c", str(config), "--no-ray", "--wait")
    holder.wait()
    clean(out, 0, f"waiting for pid {holder.pid}", "sft.student: done")


@pytest.mark.slow
def test_two_concurrent_runs_one_executes_the_other_refuses(tmp_path, config):
    env = {**os.environ, "DISTILL_PROGRESS": "0"}
    procs = [subprocess.Popen([sys.executable, "-m", "distill_pipeline.cli.main", "run", "sft", "-c", str(config),
                               "--no-ray"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    loser = next(o for p, o in zip(procs, outs) if p.returncode == 1)
    assert "is in use by pid" in loser[1] and "Traceback" not in loser[1] + loser[0]


# ------------------------------------------------------------------ signals

def _slow_tree(tmp_path):
    tree = tiny_tree(tmp_path / "run", method="sft")
    tree["sft"]["teacher"] = {**tree["sft"]["teacher"], "max_steps": 300, "checkpoint_every": 20}
    return write_config(tmp_path / "slow.yaml", tree)


@pytest.mark.slow
@pytest.mark.parametrize("sig, extra", [(signal.SIGINT, []), (signal.SIGTERM, ["--no-ray"])])
def test_signal_stops_the_run_keeps_partial_output_and_the_rerun_resumes(tmp_path, sig, extra):
    config = _slow_tree(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "distill_pipeline.cli.main", "run", "sft.teacher", "-c",
                             str(config), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "DISTILL_PROGRESS": "0"})
    partial = tmp_path / "run" / ".partial"
    deadline = time.time() + 120
    while not list(partial.glob("sft.teacher-*/checkpoint")) and time.time() < deadline:
        time.sleep(0.2)
    assert list(partial.glob("sft.teacher-*/checkpoint")), "the stage never checkpointed"
    t0 = time.time()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 30
    clean(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 130, "interrupted",
          "partial outputs are kept", "rerun the same command to resume")
    assert list(partial.glob("sft.teacher-*"))
    again = cli("run", "sft.teacher", "-c", str(config), *extra)
    clean(again, 0, "sft.teacher: done", "resuming at step")


# ------------------------------------------------------------------ lost cache entries

@pytest.mark.slow
def test_a_deleted_segment_makes_the_extraction_run_again_and_only_it(tmp_path):
    tree = tiny_tree(tmp_path / "run", method="dckd")
    tree["teacher_logits"]["unit_tokens"] = 64  # several segments
    config = write_config(tmp_path / "c.yaml", tree)
    clean(cli("run", "all", "-c", str(config), "--no-ray"), 0, "evaluate: done")
    segments = sorted((tmp_path / "store" / "segments").iterdir())
    shutil.rmtree(segments[0])
    status = clean(cli("status", "-c", str(config)), 0)
    assert re.search(r"teacher_logits\s+will run: 1 of the \d+ cache segments holding its entries are gone", status), status
    assert re.search(r"^train\s+up to date", status, flags=re.M), status
    again = clean(cli("run", "all", "-c", str(config), "--no-ray"), 0, "teacher_logits: done")
    assert re.findall(r"^(\S+): done", again, flags=re.M) == ["teacher_logits"]
    clean(cli("cache", "verify", "--store", str(tmp_path / "store")), 0, "ok")


# ------------------------------------------------------------------ someone else's Ray cluster

@pytest.mark.slow
def test_default_run_ignores_a_foreign_ray_cluster_on_this_host(tmp_path, config):
    """A `ray start` cluster of someone else on this host: the default (embedded) run must start
    its own instance, not join it (and then die on its resource settings)."""
    import tempfile

    # RAY_TMPDIR stands in for /tmp: the foreign cluster writes its "current cluster" file there,
    # where a plain ray.init() would find and join it — without touching the real /tmp/ray.
    temp = Path(tempfile.mkdtemp(prefix="rf", dir="/tmp"))  # Ray's socket paths must stay < 108 bytes
    port = 6300 + os.getpid() % 500
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(temp)}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    started = subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1",
                              "--include-dashboard=false"], capture_output=True, text=True, env=env, timeout=120)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        assert (temp / "ray" / "ray_current_cluster").exists()
        clean(cli("run", "sft.student", "-c", str(config), env={"RAY_TMPDIR": str(temp)}), 0, "sft.student: done")
    finally:
        _stop_processes_mentioning(str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def _stop_processes_mentioning(marker: str) -> None:
    """Stop our own cluster by the PIDs whose command line names its temp dir (never `ray stop`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------ a data-parallel worker that dies

def test_a_failed_data_parallel_node_is_one_message_and_a_saved_report(tmp_path):
    """Ray Train's error for a killed worker (a failed health check whose cause is the actor's
    death) and for workers that raised: one message naming the worker, what happened, the
    checkpoint to resume from; Ray's whole report in a file beside the partial folder."""
    from ray.exceptions import ActorDiedError
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from distill_pipeline.pipeline.launch import WorkerFailed, _failure

    out = tmp_path / ".partial" / "train-0123456789ab"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "loop.json").write_text(json.dumps({"step": 8, "epoch": 0}))
    log = tmp_path / ".partial" / "train-0123456789ab.workers-failure.log"
    killed = WorkerGroupError("rank 1 died …" + "\n   noise" * 50, {
        0: RuntimeError("[gloo/pair.cc:537] Read error: Connection reset by peer"),
        1: WorkerHealthCheckFailedError("A worker health check failed.", ActorDiedError())})
    err = _failure(killed, out, log, workers=2)
    assert isinstance(err, WorkerFailed) and "\n" not in str(err), str(err)
    for words in ("worker rank 1 of 2 died", "killed or crashed", "the other workers stopped with it",
                  f"last checkpoint (step 8) is in {out / 'checkpoint'}", "rerun the same command to resume",
                  f"Ray's full report: {log}"):
        assert words in str(err), str(err)
    assert "gloo" not in str(err) and "noise" not in str(err)
    assert "noise" in log.read_text() and "WorkerGroupError" in log.read_text()

    raised = WorkerGroupError("…", {0: ArithmeticError("step 3 is not finite: loss nan"),
                                    1: ArithmeticError("step 3 is not finite: loss nan")})
    err = str(_failure(raised, tmp_path / "fresh", tmp_path / "fresh.log", workers=2))
    assert "worker rank 0 of 2 raised ArithmeticError: step 3 is not finite: loss nan (and 1 more" in err, err
    assert "No checkpoint was written yet" in err, err


@pytest.mark.slow
def test_a_killed_data_parallel_worker_is_one_message_not_rays_tracebacks(tmp_path):
    """`kill -9` of a Ray Train worker after a checkpoint used to print ~180 lines of controller,
    worker and Ray tracebacks before the error. Now: the error (node, that a worker died, the
    checkpoint, rerun resumes) and nothing of Ray's; what Ray Train printed goes to a log file.
    The resume itself is tests/invariants/test_data_parallel.py's."""
    from tests.invariants.test_data_parallel import kill_a_worker_after_a_checkpoint

    tree = tiny_tree(tmp_path / "run", method="sft")  # train reads sft.student only: no teachers
    tree["train"] = {"lr": 1e-3, "max_steps": 400, "batch_size": 2, "checkpoint_every": 4, "workers": 2}
    config = write_config(tmp_path / "c.yaml", tree)
    clean(cli("run", "sft.student", "-c", str(config), "--no-ray"), 0, "sft.student: done")
    proc = subprocess.Popen([sys.executable, "-m", "distill_pipeline.cli.main", "run", "train", "-c", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "DISTILL_PROGRESS": "0"}, start_new_session=True)
    try:
        kill_a_worker_after_a_checkpoint(proc, tmp_path / "run" / ".partial", timeout=240)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    clean(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 1, "train failed: WorkerFailed",
          "of 2 died", "killed or crashed", "checkpoint (step", "rerun the same command to resume",
          "partial output kept in")
    assert len(err.splitlines()) <= 3 and "RayTrainWorker" not in err and "TrainController" not in err, err
    assert "(raylet)" not in out + err and "Traceback" not in out + err, out + err
    report = Path(re.search(r"Ray's full report: (\S+)", err).group(1))
    assert "Traceback" in report.read_text() and "RayTrainWorker" in report.read_text()
