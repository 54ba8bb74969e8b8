"""The `distill-pipeline` command line: thin — parse, load the config, call the pipeline.

    distill-pipeline run all -c configs/quickstart.yaml [--set a.b=c] [--force]
    distill-pipeline run teacher_dpo -c …      # builds missing upstream nodes first
    distill-pipeline status -c …               # every node: up to date, or will run and why
    distill-pipeline cache ls | info | verify | gc
"""
from __future__ import annotations

import os
import signal
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
    """Errors whose message is the whole story (what, where, what to do): printed, no traceback."""
    from distill_pipeline.cache.store import CacheError
    from distill_pipeline.data.readers import DataError
    from distill_pipeline.generation import BackendError
    from distill_pipeline.models import ModelError
    from distill_pipeline.pipeline.config import ConfigError
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
    from distill_pipeline.pipeline.runner import Interrupted, make_plan, run as run_plan

    from distill_pipeline.models import fetch_imports
    from distill_pipeline.pipeline.config import IMPORTS, unused_models

    cfg = _load(config, sets, ray_address)
    for line in unused_models(cfg):
        typer.echo(line)
    try:
        fetch_imports({**{f"models.{r}": getattr(cfg.models, r) for r in IMPORTS},
                       "evaluate.reward_model": cfg.evaluate.reward_model})
        plan = make_plan(cfg)
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
    from distill_pipeline.pipeline.config import unused_models
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


cache_app = typer.Typer(no_args_is_help=True, help="Inspect, check and clean the teacher-logit cache.")
app.add_typer(cache_app, name="cache")
StoreOpt = typer.Option(None, "--store", help="cache root (default: $DISTILL_CACHE_DIR or "
                        "~/.cache/distill-pipeline/teacher-logits)")


def _open(path: Optional[str], *, create: bool = False):
    from distill_pipeline.cache.remote import open_store
    from distill_pipeline.cache.store import CacheError

    try:
        return open_store(path, create=create)
    except CacheError as exc:
        fail(str(exc))


def _store(path: Optional[str]):
    """The store to inspect as local files: a local store, or a remote store's mirror brought in
    line with it first (every committed segment fetched and verified; failures are reported as
    damaged segments by the command)."""
    from distill_pipeline.cache.remote import MirroredStore

    s = _open(path)
    if not isinstance(s, MirroredStore):
        s.fetch_failures = {}
        return s
    failed = _cache_call(s.sync)
    typer.secho(f"note: {s.url}: {len(s.local.segment_names())} segment(s) fetched into its mirror "
                f"{s.local.root}", err=True)
    s.local.display = s.url
    s.local.fetch_failures = failed
    return s.local


def _fetch_failures(s) -> int:
    for name, why in s.fetch_failures.items():
        typer.secho(f"{name}: DAMAGED in the remote store: {why}", fg=typer.colors.RED)
    return len(s.fetch_failures)


def _cache_call(fn, *args, **kwargs):
    """An admin call whose failure (CacheError, an unreadable file) is one message, no traceback."""
    from distill_pipeline.cache.store import CacheError

    try:
        return fn(*args, **kwargs)
    except CacheError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot read the cache: {exc}; check the path and its permissions")


def _segments_note(store) -> None:
    seg = store.root / "segments"
    if not seg.is_dir():
        typer.secho(f"note: {seg} is missing: the store holds no entries (`distill-pipeline run "
                    "teacher_logits` extracts them again)", fg=typer.colors.YELLOW, err=True)


@cache_app.command("ls")
def cache_ls(store: Optional[str] = StoreOpt):
    """One line per segment: teacher, entries, tokens, size. Segments failing the cheap checks
    (manifest, index, shapes) are marked DAMAGED (exit 1); `cache verify` also decodes every chunk."""
    from distill_pipeline.cache.admin import damage_advice, human_bytes, ls

    s = _store(store)
    _segments_note(s)
    rows = _cache_call(ls, s)
    typer.echo(f"{'segment':34}{'teacher':14}{'K':>4}{'dtype':>10}{'entries':>9}{'tokens':>10}{'size':>11}")
    for r in rows:
        line = (f"{r['segment']:34}{r['teacher']:14}{r['top_k']:>4}{r['dtype']:>10}{r['entries']:>9}"
                f"{r['tokens']:>10}{human_bytes(r['bytes']):>11}")
        if r["damaged"]:
            typer.secho(f"{line}  DAMAGED: {r['damaged']}", fg=typer.colors.RED)
        else:
            typer.echo(line)
    bad = sum(1 for r in rows if r["damaged"]) + _fetch_failures(s)
    typer.echo(f"{len(rows)} segment(s)" + (f", {bad} damaged" if bad else ""))
    if bad:
        fail(f"{bad} damaged segment(s) in {s.display}; {damage_advice(s.display)}")


@cache_app.command("info")
def cache_info(store: Optional[str] = StoreOpt, as_json: bool = typer.Option(False, "--json")):
    """Entries, tokens, bytes on disk and per token, K, dtype, teachers, mean top-K mass.
    Damaged segments are listed and left out of the counts (exit 1)."""
    import json

    from distill_pipeline.cache.admin import damage_advice, human_bytes, info

    s = _store(store)
    _segments_note(s)
    r = _cache_call(info, s)
    if as_json:
        typer.echo(json.dumps(r, indent=2))
    else:
        typer.echo(f"store            {r['root']} (schema {r['schema_version']})")
        typer.echo(f"segments         {r['segments']}" + (f" healthy, {len(r['damaged'])} damaged"
                                                          if r["damaged"] else ""))
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
        if r["stale_segments"]:
            typer.secho(f"stale            {r['stale_segments']} segment(s), {r['stale_entries']} entries "
                        "keyed by an older teacher identity scheme (written before content identities): "
                        "no run looks them up again; `cache gc --stale` removes them",
                        fg=typer.colors.YELLOW)
        for problems in r["damaged"].values():
            for p in problems:
                typer.secho(f"damaged          {p}", fg=typer.colors.RED)
    if r["damaged"] or _fetch_failures(s):
        fail(f"{len(r['damaged']) + len(s.fetch_failures)} damaged segment(s) in {s.display} (not "
             f"counted above); {damage_advice(s.display)}")


@cache_app.command("verify", help=(
    "Decode every chunk and check checksums, keys, offsets and shapes; exit 1 on any problem.\n\n"
    "Without --run, verify can only check the segments that exist: a segment deleted whole leaves no "
    "trace. With --run RUN_DIR it also checks, for each published teacher_logits node of the run, that "
    "every entry the node stands for is in the store its teachers.json names (without --store, those "
    "stores are the ones verified)."))
def cache_verify(store: Optional[str] = StoreOpt,
                 run_dir: Optional[str] = typer.Option(
                     None, "--run", help="a run dir: also check that every entry its published "
                     "teacher_logits nodes stand for is still in their store (finds deleted segments)")):
    from pathlib import Path

    from distill_pipeline.cache.admin import (check_nodes, check_segments, damage_advice, damaged_keys,
                                              run_nodes, store_id)
    from distill_pipeline.cache.reader import node_store
    from distill_pipeline.cache.store import CacheError

    nodes = _cache_call(run_nodes, Path(run_dir)) if run_dir else []
    roots: list = [store]
    if run_dir and store is None:
        found = set()
        for folder in nodes:
            try:
                found.add(node_store(folder))
            except CacheError:
                pass  # reported with the node below
        roots = sorted(found) or [None]
    checked, problems, bad_keys, advice = 0, 0, {}, []
    for root in roots:
        if run_dir and store is None:  # a store a node names that is gone: reported, go on
            from distill_pipeline.cache.remote import open_store

            try:
                open_store(root, create=False)
            except CacheError as exc:
                typer.secho(str(exc), fg=typer.colors.RED)
                problems += 1
                continue
        s = _store(root)
        _segments_note(s)
        problems += _fetch_failures(s)
        checks = _cache_call(check_segments, s)
        for c in checks:
            checked += len(c.index or [])
            for p in c.problems:
                typer.secho(p, fg=typer.colors.RED)
            problems += len(c.problems)
        if any(c.damaged for c in checks) or s.fetch_failures:
            advice.append(damage_advice(s.display, listed=True))
        bad_keys[store_id(s.display)] = damaged_keys(checks)
        if run_dir:
            typer.echo(f"store {s.display}: {len(checks)} segment(s) checked")
    lacking = []
    if run_dir:
        if not nodes:
            typer.echo(f"{run_dir}: no published teacher_logits node (nothing of the run to check)")
        for nc in _cache_call(check_nodes, Path(run_dir), bad_keys):
            if nc.error:
                typer.secho(nc.error, fg=typer.colors.RED)
                lacking.append(nc)
            elif not nc.ok:
                more = f"; {nc.in_damaged} more in damaged segments" if nc.in_damaged else ""
                typer.secho(f"node {nc.folder}: {nc.missing} of {nc.expected} entries missing from "
                            f"{nc.store}{more}", fg=typer.colors.RED)
                lacking.append(nc)
            else:
                typer.echo(f"node {nc.folder}: all {nc.expected} entries present in {nc.store}")
        if lacking:
            names = sorted({nc.node for nc in lacking})
            advice.append(f"rerun `distill-pipeline run {' '.join(names)} -c <the run's config>` to "
                          "re-extract the missing entries (the node is out of date while any is missing)")
    if problems or lacking:
        parts = [f"{problems} problem(s) in {checked} entries"]
        if lacking:
            parts.append(f"{len(lacking)} teacher_logits node(s) of {run_dir} lack entries")
        fail("; ".join(parts) + (". To fix: " + "; then ".join(advice) if advice else ""))
    typer.echo(f"ok: {checked} entries verified" + (f", {len(nodes)} teacher_logits node(s) complete"
                                                   if run_dir else ""))


def _copy(src: str, dst: str, teacher: Optional[str], run_dir: Optional[str], dry_run: bool) -> None:
    from pathlib import Path

    from distill_pipeline.cache.admin import human_bytes, run_nodes
    from distill_pipeline.cache.reader import node_keys
    from distill_pipeline.cache.remote import copy_segments

    keys = None
    if run_dir:
        nodes = _cache_call(run_nodes, Path(run_dir))
        if not nodes:
            fail(f"{run_dir}: no published teacher_logits node: nothing of the run to copy")
        keys = [k for folder in nodes for k in _cache_call(node_keys, folder)]
    source, dest = _open(src), _open(dst, create=True)
    stats = _cache_call(copy_segments, source, dest, teacher=teacher, keys=keys, dry_run=dry_run)
    what = (f"{stats['segments']} segment(s), {stats['entries']} entries, {human_bytes(stats['bytes'])}")
    if dry_run:
        typer.echo(f"would copy {what} from {source.url} to {dest.url} "
                   f"({stats['already_there']} already there)")
        return
    rate = (f" in {stats['seconds']:.1f} s ({stats['bytes'] / 1e6 / max(stats['seconds'], 1e-9):.1f} MB/s)"
            if stats.get("seconds") else "")
    typer.echo(f"copied {what}{rate} from {source.url} to {dest.url} ({stats['already_there']} already "
               "there); every segment verified on arrival")


CopyTeacher = typer.Option(None, "--teacher", help="only this teacher's segments (identity prefix)")
CopyRun = typer.Option(None, "--run", help="only the segments a run dir's teacher_logits nodes read")
CopyDry = typer.Option(False, "--dry-run", help="say what would be copied")


@cache_app.command("push")
def cache_push(src: str = typer.Argument(..., help="store to copy from (path or URL)"),
               dst: str = typer.Argument(..., help="store to copy to: a path, s3://…, grpc://host:port"),
               teacher: Optional[str] = CopyTeacher, run_dir: Optional[str] = CopyRun,
               dry_run: bool = CopyDry):
    """Copy the segments DST lacks from SRC, each verified before it is published; a killed push
    leaves nothing half-published and resumes when run again. Writes to the service need
    DISTILL_CACHE_TOKEN."""
    _copy(src, dst, teacher, run_dir, dry_run)


@cache_app.command("pull")
def cache_pull(src: str = typer.Argument(..., help="store to copy from: s3://…, grpc://host:port, a path"),
               dst: Optional[str] = typer.Argument(None, help="store to copy to (default: the local "
                                                   "default store, $DISTILL_CACHE_DIR)"),
               teacher: Optional[str] = CopyTeacher, run_dir: Optional[str] = CopyRun,
               dry_run: bool = CopyDry):
    """Copy the segments DST lacks from SRC (the same as push, named from the receiving side)."""
    from distill_pipeline.cache.store import default_root

    _copy(src, dst or str(default_root()), teacher, run_dir, dry_run)


@cache_app.command("serve")
def cache_serve(store: Optional[str] = StoreOpt,
                host: str = typer.Option("127.0.0.1", "--host", help="interface to listen on"),
                port: int = typer.Option(0, "--port", help="port (0: a free one, printed)"),
                token_file: Optional[str] = typer.Option(None, "--token-file", help="write tokens, one "
                                                         "per line (without: the service is read-only)"),
                read_token_file: Optional[str] = typer.Option(None, "--read-token-file", help="read "
                                                              "tokens (without: reads are open)"),
                tls_cert: Optional[str] = typer.Option(None, "--tls-cert"),
                tls_key: Optional[str] = typer.Option(None, "--tls-key"),
                max_segment_mb: float = typer.Option(1024, "--max-segment-mb", help="largest upload "
                                                     "accepted (MB)")):
    """Serve a local store over Arrow Flight (grpc://HOST:PORT) to other machines and teams:
    listing, key lookups, entries and segments by stream, verified uploads. Stops on SIGTERM."""
    from distill_pipeline.cache.service import serve
    from distill_pipeline.cache.store import CacheError

    from distill_pipeline.cache.remote import is_remote

    if (tls_cert is None) != (tls_key is None):
        fail("give both --tls-cert and --tls-key, or neither", 2)
    if is_remote(store):
        fail(f"--store {store}: the service serves a local directory (its own disk); to share an "
             "object store, point teams at it directly (teacher_logits.store: s3://…)", 2)
    if (token_file or read_token_file) and not tls_cert and host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: serving on {host} without TLS: tokens cross the network in clear text; "
                    "give --tls-cert/--tls-key (clients: grpc+tls://)", fg=typer.colors.YELLOW, err=True)
    try:
        code = serve(store, host=host, port=port, token_file=token_file,
                     read_token_file=read_token_file, tls_cert=tls_cert, tls_key=tls_key,
                     max_segment_bytes=int(max_segment_mb * 1e6))
    except CacheError as exc:
        fail(str(exc))
    raise typer.Exit(code)


@cache_app.command("gc")
def cache_gc(store: Optional[str] = StoreOpt,
             older_than: float = typer.Option(60.0, help="minutes after which a tmp/ write whose process "
                                              "has exited counts as abandoned (a running writer's is "
                                              "never removed)"),
             drop_teacher: Optional[str] = typer.Option(None, help="remove every segment of this teacher (id prefix)"),
             damaged: bool = typer.Option(False, "--damaged", help="also remove every segment `cache verify` "
                                          "flags (decodes every chunk), so its entries can be extracted again"),
             stale: bool = typer.Option(False, "--stale", help="also remove segments keyed under an "
                                        "older teacher identity scheme (`cache info` counts them): "
                                        "no run looks their keys up again"),
             dry_run: bool = typer.Option(False, "--dry-run")):
    """Remove abandoned writes, incomplete segments, and optionally one teacher's, damaged or
    stale segments. On an object store: the files of uploads never committed (older than
    --older-than)."""
    from distill_pipeline.cache.admin import gc, gc_remote
    from distill_pipeline.cache.remote import MirroredStore

    s = _open(store)
    if isinstance(s, MirroredStore):
        report = _cache_call(gc_remote, s, older_than_s=older_than * 60, drop_teacher=drop_teacher,
                             damaged=damaged, stale=stale, dry_run=dry_run)
    else:
        _segments_note(s)
        report = _cache_call(gc, s, older_than_s=older_than * 60, drop_teacher=drop_teacher,
                             damaged=damaged, stale=stale, dry_run=dry_run)
    for name, problems in report.damaged.items():
        typer.secho(f"damaged segment {name}:", fg=typer.colors.RED)
        for p in problems:
            typer.secho(f"  {p.split(': ', 1)[1]}", fg=typer.colors.RED)
    for k in report.kept:
        typer.echo(f"kept {k}")
    for r in report.removed:
        typer.echo(("would remove " if dry_run else "removed ") + r)
    typer.echo(f"{len(report.removed)} item(s)" + (f", {len(report.kept)} in-flight write(s) kept"
                                                   if report.kept else ""))
    if report.damaged:
        if dry_run:
            typer.echo("rerun without --dry-run to remove them")
        else:
            typer.echo("rerun `distill-pipeline run teacher_logits -c <config>` to extract the removed "
                       "entries again")


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
