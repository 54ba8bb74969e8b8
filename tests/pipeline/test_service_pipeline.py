"""Sharing a cache through the service, as two teams would: team A runs the pipeline and pushes
its store to a `distill-pipeline cache serve` started through the real CLI on loopback (refused
without the token, accepted with it); team B — another run dir, an empty local mirror — runs the
same recipe against grpc://… and extracts nothing, trains and evaluates."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from distill_pipeline.pipeline import runner
from distill_pipeline.config import load_config
from tests.conftest import ROOT, tiny_tree, write_config

pytestmark = pytest.mark.slow


def cli(*args, env_extra=None, timeout=300):
    r = subprocess.run([sys.executable, "-m", "distill_pipeline.cli.main", *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                       env={**os.environ, "DISTILL_PROGRESS": "0", **(env_extra or {})})
    out = r.stdout + r.stderr
    assert "Traceback" not in out and "this is a bug" not in out, out
    return r.returncode, out


def test_second_team_extracts_nothing_through_the_service(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_PROGRESS", "0")
    monkeypatch.delenv("DISTILL_CACHE_TOKEN", raising=False)
    tree = tiny_tree(tmp_path / "run-a", method="adpa")
    first = runner.make_plan(load_config(write_config(tmp_path / "a.yaml", tree)))
    runner.run(first, ["all"], use_ray=False, echo=lambda s: None)
    team_a_store = tree["teacher_logits"]["store"]

    (tmp_path / "tokens").write_text("s3cret-write-token\n")
    server = subprocess.Popen([sys.executable, "-m", "distill_pipeline.cli.main", "cache", "serve",
                               "--store", str(tmp_path / "served"), "--create", "--port", "0",
                               "--token-file", str(tmp_path / "tokens")],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        m = re.search(r"at (grpc://127\.0\.0\.1:\d+)", line)
        assert m, line + server.stderr.read() if server.poll() is not None else line
        url = m.group(1)

        code, out = cli("cache", "push", team_a_store, url)
        assert code == 1 and "DISTILL_CACHE_TOKEN" in out, out
        code, out = cli("cache", "push", team_a_store, url, env_extra={"DISTILL_CACHE_TOKEN": "wrong"})
        assert code == 1 and "DISTILL_CACHE_TOKEN" in out, out
        code, out = cli("cache", "push", team_a_store, url,
                        env_extra={"DISTILL_CACHE_TOKEN": "s3cret-write-token"})
        assert code == 0 and "copied" in out and "verified on arrival" in out, out

        monkeypatch.setenv("DISTILL_MIRROR_DIR", str(tmp_path / "team-b-mirror"))
        tree_b = json.loads(json.dumps(tree))
        tree_b["run_dir"] = str(tmp_path / "run-b")
        tree_b["teacher_logits"]["store"] = url
        second = runner.make_plan(load_config(write_config(tmp_path / "b.yaml", tree_b)))
        ran = runner.run(second, ["all"], use_ray=False, echo=lambda s: None)
        assert {"train", "evaluate"} <= set(ran)
        summary = json.loads((second.folder("teacher_logits.rollouts") / "manifest.json").read_text())["summary"]
        assert summary["extracted"] == 0 and summary["cached"] == summary["entries"] > 0
        assert ((second.folder("evaluate") / "results.json").read_text()
                == (first.folder("evaluate") / "results.json").read_text())
        code, out = cli("cache", "verify", "--store", url)
        assert code == 0 and "ok:" in out, out
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            rc = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert rc == 0
    log = server.stderr.read()
    assert "s3cret-write-token" not in log and "action=put" in log
