"""The `distill-pipeline` command line: thin — parse, load the config, call the pipeline.

    distill-pipeline run all -c configs/quickstart.yaml [--set a.b=c] [--force]
    distill-pipeline run teacher_dpo -c …      # builds missing upstream nodes first
    distill-pipeline status -c …               # every node: up to date, or will run and why
    distill-pipeline cache ls | info | verify | gc
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Distil a large model's preference alignment into a small one.")
DEFAULT_CONFIG = os.environ.get("DISTILL_CONFIG", "configs/quickstart.yaml")

ConfigOpt = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="run config (YAML)")
SetOpt = typer.Option(None, "--set", help="override a config key, e.g. --set teacher_dpo.beta=0.1")


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _load(config: str, sets: Optional[List[str]], ray_address: Optional[str] = None):
    from distill_pipeline.pipeline.config import ConfigError, load_config

    overrides = list(sets or [])
    if ray_address:
        overrides.append(f"ray.address={ray_address}")
    try:
        return load_config(config, overrides)
    except ConfigError as exc:
        fail(str(exc), 2)


def _errors() -> tuple:
    from distill_pipeline.data.readers import DataError
    from distill_pipeline.generation import BackendError
    from distill_pipeline.models import ModelError
    from distill_pipeline.pipeline.config import ConfigError
    from distill_pipeline.pipeline.runner import PipelineError

    return ConfigError, DataError, ModelError, PipelineError, BackendError


@app.command()
def run(stages: List[str] = typer.Argument(None, help="'all' (default), stage names or node names"),
        config: str = ConfigOpt, sets: Optional[List[str]] = SetOpt,
        force: bool = typer.Option(False, "--force", help="rerun the named stages even if up to date"),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="attach to a Ray cluster"),
        no_ray: bool = typer.Option(False, "--no-ray", help="run stages in this process (debugging)")):
    """Bring the named stages (and anything they need) up to date."""
    from distill_pipeline.pipeline.runner import make_plan, run as run_plan

    cfg = _load(config, sets, ray_address)
    try:
        plan = make_plan(cfg)
        ran = run_plan(plan, list(stages or ["all"]), force=force, use_ray=not no_ray)
    except _errors() as exc:
        fail(str(exc))
    if not ran:
        typer.echo("nothing to do: every node is up to date")


@app.command()
def status(config: str = ConfigOpt, sets: Optional[List[str]] = SetOpt):
    """Every node of the run: up to date, or will run and why."""
    from distill_pipeline.pipeline.runner import make_plan, status as plan_status

    cfg = _load(config, sets)
    rows = plan_status(make_plan(cfg))
    width = max(len(n) for n, _, _ in rows)
    for name, ok, text in rows:
        typer.secho(f"{name.ljust(width)}  {text}", fg=typer.colors.GREEN if ok else typer.colors.YELLOW)


@app.command()
def methods():
    """The training methods, their inputs and loss options (from the LOSSES registry)."""
    from distill_pipeline.losses import methods_table

    typer.echo(methods_table())


@app.command()
def compare(paths: List[str] = typer.Argument(..., help="run directories or config files"),
            out: Optional[str] = typer.Option(None, "--out", help="PNG path (default: <first run>/compare.png)")):
    """One table (and a PNG: metric bars, training curves) of the evaluate results of several methods."""
    import json

    from distill_pipeline.pipeline import compare as cmp

    try:
        rows = cmp.collect(paths)
    except (FileNotFoundError, KeyError) as exc:
        fail(str(exc))
    typer.echo(cmp.table(rows))
    png = Path(out) if out else cmp._run_dir(paths[0]) / "compare.png"
    cmp.plot(rows, png)
    png.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    typer.echo(f"wrote {png} and {png.with_suffix('.json')}")


cache_app = typer.Typer(no_args_is_help=True, help="Inspect, check and clean the teacher-logit cache.")
app.add_typer(cache_app, name="cache")
StoreOpt = typer.Option(None, "--store", help="cache root (default: $DISTILL_CACHE_DIR or "
                        "~/.cache/distill-pipeline/teacher-logits)")


def _store(path: Optional[str]):
    from distill_pipeline.cache.store import CacheError, Store

    try:
        return Store(path, create=False)
    except CacheError as exc:
        fail(str(exc))


@cache_app.command("ls")
def cache_ls(store: Optional[str] = StoreOpt):
    """One line per segment: teacher, entries, tokens, size."""
    from distill_pipeline.cache.admin import human_bytes, ls

    rows = ls(_store(store))
    typer.echo(f"{'segment':34}{'teacher':14}{'K':>4}{'dtype':>10}{'entries':>9}{'tokens':>10}{'size':>11}")
    for r in rows:
        typer.echo(f"{r['segment']:34}{r['teacher']:14}{r['top_k']:>4}{r['dtype']:>10}{r['entries']:>9}"
                   f"{r['tokens']:>10}{human_bytes(r['bytes']):>11}")
    typer.echo(f"{len(rows)} segment(s)")


@cache_app.command("info")
def cache_info(store: Optional[str] = StoreOpt, as_json: bool = typer.Option(False, "--json")):
    """Entries, tokens, bytes on disk and per token, K, dtype, teachers, mean top-K mass."""
    import json

    from distill_pipeline.cache.admin import human_bytes, info

    r = info(_store(store))
    if as_json:
        typer.echo(json.dumps(r, indent=2))
        return
    typer.echo(f"store            {r['root']} (schema {r['schema_version']})")
    typer.echo(f"segments         {r['segments']}")
    typer.echo(f"entries          {r['entries']}")
    typer.echo(f"tokens           {r['tokens']}")
    typer.echo(f"bytes on disk    {human_bytes(r['bytes_on_disk'])} ({r['bytes_on_disk']} B)")
    typer.echo(f"bytes per token  {r['bytes_per_token']}")
    typer.echo(f"top-K            {', '.join(map(str, r['top_k']))}")
    typer.echo(f"dtype            {', '.join(r['dtype'])}")
    typer.echo(f"top-K mass       {r['mean_topk_mass']} (mean probability the stored top-K keeps)")
    typer.echo(f"storage KL       {r['reconstruction_kl']} (mean K+1-bin KL, float32 logits → stored values)")
    for t, v in r["teachers"].items():
        typer.echo(f"teacher          {t}…  {v['entries']} entries, {v['tokens']} tokens")


@cache_app.command("verify")
def cache_verify(store: Optional[str] = StoreOpt):
    """Decode every chunk and check checksums, keys, offsets and shapes; exit 1 on any problem."""
    from distill_pipeline.cache.admin import verify

    checked, problems = verify(_store(store))
    for p in problems:
        typer.secho(p, fg=typer.colors.RED)
    if problems:
        fail(f"{len(problems)} problem(s) in {checked} entries")
    typer.echo(f"ok: {checked} entries verified")


@cache_app.command("gc")
def cache_gc(store: Optional[str] = StoreOpt,
             older_than: float = typer.Option(60.0, help="minutes after which a tmp/ write counts as abandoned"),
             drop_teacher: Optional[str] = typer.Option(None, help="remove every segment of this teacher (id prefix)"),
             dry_run: bool = typer.Option(False, "--dry-run")):
    """Remove abandoned writes, incomplete segments, and optionally one teacher's segments."""
    from distill_pipeline.cache.admin import gc

    removed = gc(_store(store), older_than_s=older_than * 60, drop_teacher=drop_teacher, dry_run=dry_run)
    for r in removed:
        typer.echo(("would remove " if dry_run else "removed ") + r)
    typer.echo(f"{len(removed)} item(s)")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted; partial outputs are kept and resume on the next run", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
