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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.secho("interrupted; partial outputs are kept and resume on the next run", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
