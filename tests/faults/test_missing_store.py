"""A store named where none exists is refused, not silently started empty (issue 18, item 5): a run
whose `teacher_logits.store` is a remote URL without a store stops in the preflight, before any
compute; `cache serve --store` on a missing path stops at once; both say how to create one
(`cache init`, `cache serve --create`), and `cache init` does."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from distill_pipeline.cache.store import NoStore
from tests.conftest import ROOT, tiny_tree, write_config
from tests.s3server import make_bucket, moto_server


def cli(*args, env=None, timeout=120) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "distill_pipeline.cli.main", *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})
    out = r.stdout + r.stderr
    assert "Traceback" not in out and "this is a bug" not in out, out
    return r.returncode, out


def test_serve_refuses_a_missing_store_and_creates_one_when_asked(tmp_path):
    missing = tmp_path / "typo" / "teacher-logits"
    code, out = cli("cache", "serve", "--store", missing, timeout=60)
    assert code == 1
    assert str(missing) in out and "cache init" in out and "--create" in out
    assert not missing.exists()  # nothing was created
    proc = subprocess.Popen([sys.executable, "-m", "distill_pipeline.cli.main", "cache", "serve", "--store",
                             str(missing), "--create", "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        deadline = time.time() + 60
        while "serving" not in line and time.time() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert "serving" in line and "grpc://127.0.0.1:" in line, line
        assert (missing / "store.json").is_file()
    finally:
        proc.kill()  # by its own PID
        proc.wait(timeout=30)


def test_cache_init_creates_a_store_once(tmp_path):
    where = tmp_path / "new-store"
    code, out = cli("cache", "init", where)
    assert code == 0 and "created an empty teacher-logit store" in out and (where / "store.json").is_file()
    code, out = cli("cache", "init", where)
    assert code == 0 and "already a teacher-logit store" in out
    code, out = cli("cache", "verify", "--store", where)
    assert code == 0 and "ok: 0 entries verified" in out
    code, out = cli("cache", "init", "grpc://127.0.0.1:1")
    assert code == 2 and "cache serve --store PATH --create" in out


def test_a_run_against_a_remote_url_without_a_store_stops_before_compute(tmp_path, monkeypatch):
    from distill_pipeline.config import load_config
    from distill_pipeline.pipeline import runner

    with moto_server() as env:
        make_bucket(env, "team-cache")
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("DISTILL_MIRROR_DIR", str(tmp_path / "mirror"))
        url = "s3://team-cache/teacher-logitz"  # a typo of the team's store
        tree = tiny_tree(tmp_path / "run")
        tree["teacher_logits"]["store"] = url
        plan = runner.make_plan(load_config(write_config(tmp_path / "c.yaml", tree)))
        with pytest.raises(NoStore) as err:
            runner.run(plan, ["all"], use_ray=False, echo=lambda s: None)
        assert url in str(err.value) and f"cache init {url}" in str(err.value)
        assert not list((tmp_path / "run").glob("sft.*"))  # nothing ran
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                               secret=env["AWS_SECRET_ACCESS_KEY"])
        assert not fs.exists("team-cache/teacher-logitz/store.json")  # no empty store was started
        code, out = cli("cache", "init", url, env=env)
        assert code == 0 and "created an empty teacher-logit store" in out
        assert fs.exists("team-cache/teacher-logitz/store.json")
        from distill_pipeline.stages import get_stage

        node = next(n for n in plan.nodes if n.stage == "teacher_logits")
        assert url in get_stage("teacher_logits").preflight(node.view)  # now it passes
