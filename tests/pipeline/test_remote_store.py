"""The teacher-logit cache on an object store: S3 through moto's server (a real S3 HTTP endpoint
on loopback) and s3fs — the code path that serves AWS, MinIO or R2. Push, pull, the admin
commands, uncommitted uploads, a killed push, and two teams' pipelines sharing one bucket."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from distill_pipeline.cache.reader import CacheReader
from distill_pipeline.cache.remote import FsspecRemote, MirroredStore, open_store
from distill_pipeline.cache.store import Store
from tests.conftest import ROOT, tiny_tree, write_config
from tests.invariants.helpers import make_teacher, requests, run_extraction, sequences, tree_bytes
from tests.s3server import make_bucket, moto_server

N_SEQ, UNIT_TOKENS = 24, 60  # 4 segments


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_server() as env:
        make_bucket(env, "team-cache")
        yield env


@pytest.fixture(autouse=True)
def s3_env(s3, monkeypatch, tmp_path):
    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DISTILL_MIRROR_DIR", str(tmp_path / "mirror"))
    monkeypatch.setenv("DISTILL_PROGRESS", "0")


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    teacher = make_teacher(root / "teacher")
    run_extraction(teacher, root / "store", N_SEQ, unit_tokens=UNIT_TOKENS)
    reqs, _ = requests(teacher, sequences(N_SEQ))
    return {"store": root / "store", "keys": [r.key for r in reqs]}


def cache(*args, env_extra=None, timeout=120) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "distill_pipeline.cli.main", "cache", *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                       env={**os.environ, **(env_extra or {})})
    out = r.stdout + r.stderr
    assert "Traceback" not in out and "this is a bug" not in out, out
    return r.returncode, out


def sorted_rows(table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda r: (r["segment"], r["key"]))


def test_push_ls_verify_pull_round_trip(local, tmp_path):
    url = "s3://team-cache/round-trip"
    code, out = cache("push", local["store"], url)
    assert code == 0 and "copied 4 segment(s)" in out and "verified on arrival" in out, out
    code, out = cache("push", local["store"], url)
    assert code == 0 and "copied 0 segment(s)" in out and "4 already there" in out, out
    remote = FsspecRemote(url)
    src = Store(local["store"], create=False)
    assert remote.segment_names() == src.segment_names()
    assert sorted_rows(remote.index_table()) == sorted_rows(src.index_table())
    code, out = cache("ls", "--store", url)
    assert code == 0 and "4 segment(s)" in out, out
    code, out = cache("verify", "--store", url)
    assert code == 0 and f"ok: {N_SEQ} entries verified" in out, out
    code, out = cache("info", "--store", url)
    assert code == 0 and f"entries          {N_SEQ}" in out and f"store            {url}" in out, out
    code, out = cache("pull", url, tmp_path / "pulled")
    assert code == 0 and "copied 4 segment(s)" in out, out
    assert tree_bytes(tmp_path / "pulled") == tree_bytes(local["store"])


def test_ls_and_info_read_commit_records_and_fetch_nothing(local, tmp_path):
    url = "s3://team-cache/listed"
    cache("push", local["store"], url)
    fresh = {"DISTILL_MIRROR_DIR": str(tmp_path / "reader-mirror")}  # the push staged its copies in its own
    code, out = cache("ls", "--store", url, env_extra=fresh)
    assert code == 0 and "4 segment(s)" in out, out
    code, out = cache("info", "--store", url, "--json", env_extra=fresh)
    assert code == 0, out
    remote_info = json.loads(out)
    fetched = tmp_path / "reader-mirror" / "segments"
    assert not (fetched.exists() and list(fetched.iterdir())), "ls/info fetched segments"
    code, out = cache("info", "--store", local["store"], "--json")
    local_info = json.loads(out)
    same = ("segments", "entries", "tokens", "top_k", "mean_k", "dtype", "teachers", "reconstruction_kl",
            "mean_topk_mass")  # the mass: the manifests' record remotely, decoded from files locally
    assert {k: remote_info[k] for k in same} == {k: local_info[k] for k in same}
    assert remote_info["mass_not_recorded"] == 0 and 0 < remote_info["mean_topk_mass"] <= 1
    segment_bytes = sum(len(b) for b in tree_bytes(local["store"]).values())
    assert remote_info["bytes_on_disk"] == segment_bytes

    # a commit record that does not list what its manifest implies is damage, named
    remote = FsspecRemote(url)
    name = remote.segment_names()[1]
    record = remote.commit_record(name)
    del record["files"]["lse/zarr.json"]
    remote.fs.pipe(remote._p("commits", f"{name}.json"), json.dumps(record).encode())
    code, out = cache("ls", "--store", url)
    assert code == 1 and name in out and "DAMAGED" in out and "missing lse/zarr.json" in out, out
    code, out = cache("info", "--store", url)
    assert code == 1 and "3 healthy, 1 damaged" in out, out


def test_training_reads_through_the_mirror(local, tmp_path):
    url = "s3://team-cache/reads"
    cache("push", local["store"], url)
    store = open_store(url)
    assert isinstance(store, MirroredStore) and store.missing(local["keys"]) == set()
    remote_reader, local_reader = CacheReader(store), CacheReader(local["store"])
    for key in local["keys"][::5]:
        a, b = remote_reader.get(key), local_reader.get(key)
        assert all((a[f] == b[f]).all() for f in ("ids", "logp", "lse", "label_logp"))
    assert len(store.local.segment_names()) >= 1  # fetched on first use, verified, kept


def test_uncommitted_upload_is_invisible_then_collected(local):
    url = "s3://team-cache/uncommitted"
    remote = FsspecRemote(url)
    src = Store(local["store"], create=False)
    name = src.segment_names()[0]
    files = src.segment_files(name)
    remote.fs.pipe({f"{remote.path}/segments/{name}/{rel}": data for rel, data in files.items()})
    assert remote.segment_names() == [] and open_store(url).missing(local["keys"]) == set(local["keys"])
    code, out = cache("gc", "--store", url, "--older-than", "60")
    assert code == 0 and "uncommitted" in out and remote.fs.exists(f"{remote.path}/segments/{name}"), out
    time.sleep(1.1)
    code, out = cache("gc", "--store", url, "--older-than", "0.01")
    assert code == 0 and f"removed segments/{name} (never committed" in out, out
    assert not remote.fs.exists(f"{remote.path}/segments/{name}")


def test_killed_push_leaves_nothing_half_published_and_resumes(local, tmp_path):
    url = "s3://team-cache/killed"
    env = {**os.environ, "DISTILL_COPY_THROTTLE_S": "1.5"}
    proc = subprocess.Popen([sys.executable, "-m", "distill_pipeline.cli.main", "cache", "push",
                             str(local["store"]), url], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    remote = FsspecRemote(url)
    deadline = time.time() + 60
    while not remote.segment_names() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    published = remote.segment_names()
    assert 1 <= len(published) < 4
    for name in published:  # every published segment is whole
        remote.get_segment(name)
    code, out = cache("push", local["store"], url)
    assert code == 0 and f"copied {4 - len(published)} segment(s)" in out, out
    code, out = cache("pull", url, tmp_path / "pulled")
    assert code == 0 and tree_bytes(tmp_path / "pulled") == tree_bytes(local["store"])


@pytest.mark.slow
def test_two_teams_share_one_bucket(tmp_path, monkeypatch):
    """Team A runs the pipeline with its cache in the bucket; team B — another run dir, an empty
    local mirror — runs the same recipe and extracts nothing, trains and evaluates."""
    from distill_pipeline.pipeline import runner
    from distill_pipeline.config import load_config

    url = "s3://team-cache/pipeline"
    code, out = cache("init", url)  # a run refuses a URL with no store there (a typo would start one)
    assert code == 0 and "created an empty teacher-logit store" in out, out
    tree = tiny_tree(tmp_path / "run-a", method="adpa")
    tree["teacher_logits"]["store"] = url
    first = runner.make_plan(load_config(write_config(tmp_path / "a.yaml", tree)))
    runner.run(first, ["all"], use_ray=False, echo=lambda s: None)
    a = json.loads((first.folder("teacher_logits.rollouts") / "manifest.json").read_text())["summary"]
    assert a["extracted"] == a["entries"] > 0 and a["store"] == url
    monkeypatch.setenv("DISTILL_MIRROR_DIR", str(tmp_path / "team-b-mirror"))
    tree["run_dir"] = str(tmp_path / "run-b")
    second = runner.make_plan(load_config(write_config(tmp_path / "b.yaml", tree)))
    ran = runner.run(second, ["all"], use_ray=False, echo=lambda s: None)
    assert "train" in ran and "evaluate" in ran
    b = json.loads((second.folder("teacher_logits.rollouts") / "manifest.json").read_text())["summary"]
    assert b["extracted"] == 0 and b["cached"] == a["entries"]
    assert ((second.folder("evaluate") / "results.json").read_text()
            == (first.folder("evaluate") / "results.json").read_text())
    code, out = cache("verify", "--store", url, "--run", tmp_path / "run-b")
    assert code == 0 and "1 teacher_logits node(s) complete" in out, out
    shutil.rmtree(tmp_path / "team-b-mirror")
    assert all(ok for _, ok, _ in runner.status(runner.make_plan(second.cfg)))  # nothing local needed


def test_mirror_evicts_nothing_a_reader_holds(local, tmp_path):
    """Eviction (a mirror over DISTILL_MIRROR_GB) deletes only segments no process pins: a
    segment deleted under a reader would read as zeros."""
    url = "s3://team-cache/evict"
    cache("push", local["store"], url)
    names = FsspecRemote(url).segment_names()
    reader = MirroredStore(FsspecRemote(url), local=tmp_path / "mirror-of-evict")
    reader.fetch(names[0])  # pinned by this store (its shared flock) until released
    small = MirroredStore(FsspecRemote(url), local=reader.local.root, max_bytes=1)
    small.fetch(names[1])  # over budget, but the other reader pins names[0]: nothing deleted
    assert {names[0], names[1]} <= set(reader.local.segment_names())
    reader.release(names[0])  # the other reader is done with it
    small.fetch(names[2])
    left = set(reader.local.segment_names())
    assert names[0] not in left and {names[1], names[2]} <= left  # small's own are pinned


def test_a_run_keeps_the_mirror_within_its_bound(local, tmp_path):
    """A reader going through every segment of a remote store with room for about two: it keeps
    `max_open_segments` open, releases the rest, and the mirror evicts what is released — every
    value read equals the local store's, and segments read again are fetched again."""
    url = "s3://team-cache/bounded"
    cache("push", local["store"], url)
    sizes = [sum(len(b) for b in Store(local["store"]).segment_files(n).values())
             for n in Store(local["store"]).segment_names()]
    bound = 2.5 * max(sizes)
    store = MirroredStore(FsspecRemote(url), local=tmp_path / "bounded-mirror", max_bytes=bound)
    reader = CacheReader(store, max_cached_bytes=1, max_open_segments=1)  # no decoded chunk kept
    truth = CacheReader(local["store"])
    peak = 0
    for key in local["keys"] * 2:  # every segment, twice
        got, want = reader.get(key), truth.get(key)
        assert all(np.array_equal(got[f], want[f]) for f in ("ids", "logp", "lse", "label_logp"))
        peak = max(peak, store.disk_bytes())
        assert len(reader.open_segments()) == 1 and store.pinned() == set(reader.open_segments())
    assert peak <= bound, (peak, bound)
    assert len(store.local.segment_names()) < len(sizes)  # some were evicted