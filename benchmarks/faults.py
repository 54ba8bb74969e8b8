"""Fault injection: `kill -9` at random points of every stage, then a rerun — are the outputs
bit-identical to a clean run?

    python benchmarks/faults.py                       # the quickstart, 20 trials
    python benchmarks/faults.py --trials 6 --config configs/quickstart.yaml --seed 1

A clean reference run comes first. Each trial copies the reference run dir and cache, deletes one
target node's published folder and everything downstream of it (and, for an extraction, the
cache entries), starts `distill-pipeline run all` in its own process group, waits until the
target node is working (its partial folder exists), sleeps a random fraction of that node's
reference duration and kills the whole group with SIGKILL (driver, Ray and its workers). Then it
runs `run all` again to completion and compares, byte for byte, every node's outputs (weights,
rollouts, metrics, results, cache keys) and every cache segment with the reference. It prints
`faults: k/N identical` and writes `benchmarks/out/faults.json`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill_pipeline.pipeline import runner  # noqa: E402
from distill_pipeline.config import load_config  # noqa: E402

COMPARED = ("model/model.safetensors", "rollouts.jsonl", "metrics.jsonl", "validation.jsonl",
            "results.json", "keys.parquet")


def cli(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distill_pipeline.cli.main", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(run_dir: Path, store: Path) -> dict[str, str]:
    """sha256 of every compared node output (by node name, not folder) and every cache segment file."""
    out = {}
    for manifest in run_dir.glob("*/manifest.json"):
        node = json.loads(manifest.read_text())["node"]
        for rel in COMPARED:
            f = manifest.parent / rel
            if f.exists():
                out[f"{node}/{rel}"] = digest(f)
    for f in sorted((store / "segments").rglob("*")) if (store / "segments").exists() else []:
        if f.is_file():
            out[f"store/{f.relative_to(store).as_posix()}"] = digest(f)
    return out


def stop_group(proc: subprocess.Popen, marker: str) -> None:
    """SIGKILL the run's process group, then anything else still naming its private temp dir."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().decode(errors="ignore"):
                    os.kill(int(p.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue


def env_for(tmp: Path, store: Path) -> dict:
    return {**os.environ, "DISTILL_PROGRESS": "0", "RAY_AUTH_MODE": "disabled",
            "RAY_TMPDIR": str(tmp), "DISTILL_CACHE_DIR": str(store.parent)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="work directory (default: a fresh temp dir, removed after)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "faults.json"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="faults-", dir="/tmp"))
    t_start = time.time()

    # the clean reference
    ref_run, ref_store = work / "ref" / "run", work / "ref" / "cache" / "teacher-logits"
    ref_tmp = Path(tempfile.mkdtemp(prefix="fr", dir="/tmp"))  # short: Ray's socket paths < 108 bytes
    sets = ["--set", f"run_dir={ref_run}"]
    proc = cli(["run", "all", "-c", args.config, *sets], env_for(ref_tmp, ref_store))
    log, _ = proc.communicate()
    shutil.rmtree(ref_tmp, ignore_errors=True)
    if proc.returncode != 0:
        sys.exit(f"reference run failed:\n{log[-3000:]}")
    plan = runner.make_plan(load_config(ROOT / args.config, [f"run_dir={ref_run}"]))
    reference = outputs(ref_run, ref_store)
    seconds = {n.name: json.loads((plan.folder(n.name) / "manifest.json").read_text())["timings"]["seconds"]
               for n in plan.nodes}
    print(f"reference: {len(reference)} files, {time.time() - t_start:.0f}s; node seconds {seconds}", flush=True)

    trials = []
    for i in range(args.trials):
        node = plan.nodes[i % len(plan.nodes)].name  # every node in turn, random kill points
        frac = rng.random()
        tdir = work / f"trial{i}"
        run_dir, store = tdir / "run", tdir / "cache" / "teacher-logits"
        shutil.copytree(ref_run, run_dir)
        shutil.copytree(ref_store.parent, store.parent)
        doomed = {node} | {n.name for n in plan.nodes if set(runner.select(plan, [n.name])) & {node}}
        for name in doomed:
            shutil.rmtree(run_dir / plan.folder(name).name)
            if plan.node(name).stage == "teacher_logits":
                shutil.rmtree(store)  # entries gone: the extraction really runs
        tmp = Path(tempfile.mkdtemp(prefix="ft", dir="/tmp"))
        env = env_for(tmp, store)
        sets = ["--set", f"run_dir={run_dir}"]
        t0 = time.time()
        proc = cli(["run", "all", "-c", args.config, *sets], env, start_new_session=True)
        partial = run_dir / ".partial" / plan.folder(node).name
        while not partial.exists() and proc.poll() is None:
            time.sleep(0.05)
        delay = frac * seconds[node]
        time.sleep(delay)
        killed = proc.poll() is None
        stop_group(proc, str(tmp))
        again = cli(["run", "all", "-c", args.config, *sets], env)
        log, _ = again.communicate()
        stop_group(again, str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)
        got = outputs(run_dir, store)
        differ = sorted(k for k in set(reference) | set(got) if reference.get(k) != got.get(k))
        ok = again.returncode == 0 and not differ
        trials.append({"trial": i, "node": node, "kill_after_s": round(delay, 2), "killed_mid_run": killed,
                       "rerun_rc": again.returncode, "identical": ok, "differ": differ[:10],
                       "seconds": round(time.time() - t0, 1)})
        print(f"trial {i:2d}: kill -9 in {node:24s} after {delay:5.1f}s ({'mid-run' if killed else 'after it'}) "
              f"→ rerun rc {again.returncode}, {'identical' if ok else 'DIFFERENT: ' + ', '.join(differ[:3])}",
              flush=True)
        if again.returncode != 0:
            print(log[-2000:])
        shutil.rmtree(tdir, ignore_errors=True)

    k = sum(t["identical"] for t in trials)
    report = {"config": args.config, "trials": trials, "identical": k, "total": len(trials),
              "killed_mid_run": sum(t["killed_mid_run"] for t in trials),
              "seconds": round(time.time() - t_start, 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"faults: {k}/{len(trials)} identical ({report['killed_mid_run']} killed mid-stage; "
          f"{report['seconds']:.0f}s) → {args.out}")
    sys.exit(0 if k == len(trials) else 1)


if __name__ == "__main__":
    main()
