"""The `distill-pipeline` command line: parse, load the config, call the pipeline, print.

    distill-pipeline run all -c configs/quickstart.yaml [--set a.b=c] [--force]
    distill-pipeline run teacher_dpo -c …      # builds missing upstream nodes first
    distill-pipeline status -c …               # every node: up to date, or will run and why
    distill-pipeline plan | methods | compare
    distill-pipeline report RUN_DIR [--out FILE.html]   # one self-contained HTML page of a run
    distill-pipeline cache …                   # cli/cache.py

`main()` is the entry point: known errors print one message, anything else is reported as a bug
with its traceback in a file.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

from distill_pipeline.cli.common import fail

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Distil a large model's preference alignment into a small one.")
DEFAULT_CONFIG = os.environ.get("DISTILL_CONFIG", "configs/quickstart.yaml")

ConfigOpt = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="run config (YAML)")
SetOpt = typer.Option(None, "--set", help="override a config key, e.g. --set teacher_dpo.beta=0.1")


def _load(config: str, sets: Optional[List[str]], ray_address: Optional[str] = None):
    """The validated config; settings that are valid but have no effect are warned about (stderr)."""
    from distill_pipeline.config import ConfigError, ignored_settings, load_config

    overrides = list(sets or [])
    if ray_address:
        overrides.append(f"ray.address={ray_address}")
    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        fail(str(exc), 2)
    for line in ignored_settings(cfg):
        typer.secho(line, fg=typer.colors.YELLOW, err=True)
    return cfg


def _errors() -> tuple:
    """Errors whose message is the whole story (what, where, what to do): printed, no traceback."""
    from distill_pipeline.cache.segment import CacheError
    from distill_pipeline.data.readers import DataError
    from distill_pipeline.generation import BackendError
    from distill_pipeline.models import ModelError
    from distill_pipeline.config import ConfigError
    from distill_pipeline.pipeline.lock import RunDirBusy
    from distill_pipeline.pipeline.raysetup import RayUnavailable
    from distill_pipeline.pipeline.runner import PipelineError

    return (ConfigError, DataError, ModelError, PipelineError, BackendError, CacheError, RunDirBusy,
            RayUnavailable)


@app.command()
def run(stages: List[str] = typer.Argument(None, help="'all' (default), stage names or node names"),
        config: str = ConfigOpt, sets: Optional[List[str]] = SetOpt,
        force: bool = typer.Option(False, "--force", help="rerun the named stages even if up to date"),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="attach to a Ray cluster"),
        no_ray: bool = typer.Option(False, "--no-ray", help="run stages in this process (debugging)"),
        wait: bool = typer.Option(False, "--wait", help="if another run holds the run dir, wait for it "
                                  "instead of exiting"),
        no_memory_check: bool = typer.Option(False, "--no-memory-check", help="run even when the "
                                             "memory plan says a node will not fit")):
    """Bring the named stages (and anything they need) up to date.

    One run per run dir at a time (a second one exits, or queues with --wait). Ctrl-C or SIGTERM
    stops the running stages and keeps their partial output: rerun the same command to resume."""
    from distill_pipeline.pipeline.cards import invocation
    from distill_pipeline.pipeline.runner import Interrupted, make_plan, run as run_plan

    from distill_pipeline.models import fetch_imports
    from distill_pipeline.config import IMPORTS, unused_models

    cfg = _load(config, sets, ray_address)
    for line in unused_models(cfg):
        typer.echo(line)
    try:
        fetch_imports({**{f"models.{r}": getattr(cfg.models, r) for r in IMPORTS},
                       "evaluate.reward_model": cfg.evaluate.reward_model})
        plan = make_plan(cfg, invocation=invocation(config, sets))  # for the model cards
        ran = run_plan(plan, list(stages or ["all"]), force=force, use_ray=not no_ray, wait=wait,
                       memory_check=not no_memory_check)
    except _errors() as exc:
        fail(str(exc))
    except OSError as exc:  # the run dir or a store: full disk, permissions, …
        fail(f"cannot write {exc.filename or 'an output'}: {exc.strerror or exc}")
    except (Interrupted, KeyboardInterrupt):
        typer.secho(f"interrupted; partial outputs are kept in {cfg.run_dir}/.partial — rerun the same "
                    "command to resume", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130)
    if not ran:
        typer.echo("nothing to do: every node is up to date")


@app.command()
def status(config: str = ConfigOpt, sets: Optional[List[str]] = SetOpt):
    """Every node of the run: up to date, or will run and why."""
    from distill_pipeline.config import unused_models
    from distill_pipeline.pipeline.runner import make_plan, status as plan_status

    cfg = _load(config, sets)
    for line in unused_models(cfg):
        typer.echo(line)
    try:
        rows = plan_status(make_plan(cfg))
    except _errors() as exc:
        fail(str(exc))
    width = max(len(n) for n, _, _ in rows)
    for name, ok, text in rows:
        typer.secho(f"{name.ljust(width)}  {text}", fg=typer.colors.GREEN if ok else typer.colors.YELLOW)


@app.command()
def plan(config: str = ConfigOpt, sets: Optional[List[str]] = SetOpt):
    """Estimated peak memory of every node on one device (from the models' configs alone: no
    weights read), against the device's memory; exit 1 when a node cannot fit, saying what would."""
    from distill_pipeline.pipeline.memory import check, report
    from distill_pipeline.pipeline.runner import make_plan

    cfg = _load(config, sets)
    try:
        p = make_plan(cfg)
        typer.echo(report(p))
        problems = check(p)
    except _errors() as exc:
        fail(str(exc))
    if problems:
        fail("\n".join(problems))


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
    except _errors() as exc:
        fail(str(exc), 2)
    except (OSError, KeyError, ValueError) as exc:  # unreadable or damaged evaluate outputs
        fail(f"cannot read the evaluate results under {', '.join(paths)}: {type(exc).__name__}: {exc}; "
             "rerun `distill-pipeline run evaluate -c <config> --force` for that run")
    typer.echo(cmp.table(rows))
    png = Path(out) if out else cmp._run_dir(paths[0]) / "compare.png"
    try:
        cmp.plot(rows, png)
        png.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    except OSError as exc:
        fail(f"cannot write {png}: {exc.strerror or exc}; pass --out with a writable path")
    typer.echo(f"wrote {png} and {png.with_suffix('.json')}")


@app.command()
def report(run_dir: str = typer.Argument(..., help="a run dir (the run_dir of a config)"),
           out: Optional[str] = typer.Option(None, "--out", help="HTML path (default: <run dir>/report.html)")):
    """One self-contained HTML page of a run dir: the node graph with fingerprints and timings,
    training curves, the evaluate tables and win rates, cache statistics."""
    from distill_pipeline.cache.segment import CacheError
    from distill_pipeline.pipeline.report import ReportError, write_report

    try:
        path = write_report(run_dir, out)
    except (ReportError, CacheError) as exc:
        fail(str(exc), 2)
    typer.echo(f"wrote {path}")


from distill_pipeline.cli.cache import cache_app  # noqa: E402 - the commands above first in --help

app.add_typer(cache_app, name="cache")


def _interrupted(signum, frame) -> None:
    """Ctrl-C outside a running stage (loading a config, reading a big store): say so, exit 130."""
    typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
    raise SystemExit(130)


def main() -> None:
    """Entry point: known errors print one message (in the commands) and usage errors click's;
    anything else is a bug — one line on stderr, the traceback in a file (DISTILL_DEBUG=1 prints it)."""
    signal.signal(signal.SIGINT, _interrupted)  # `run` installs its own while stages execute
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        if os.environ.get("DISTILL_DEBUG") == "1":
            raise
        import tempfile
        import traceback

        with tempfile.NamedTemporaryFile("w", prefix="distill-pipeline-crash-", suffix=".txt",
                                         delete=False) as fh:
            traceback.print_exc(file=fh)
        typer.secho(f"error: unexpected {type(exc).__name__}: {exc}\n(this is a bug in distill-pipeline: "
                    f"the traceback is in {fh.name}; DISTILL_DEBUG=1 prints it)", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
