"""`distill-pipeline cache …`: the cache commands. Each parses its options, calls one function of
`distill_pipeline/cache/` (admin, transfer, service) and prints what it returns; the work is there.

    distill-pipeline cache ls | info | verify [--run RUN_DIR] | gc [--damaged] [--stale]
    distill-pipeline cache push SRC DST | pull SRC [DST] | serve --store PATH
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from distill_pipeline.cli.common import fail

cache_app = typer.Typer(no_args_is_help=True, help="Inspect, check and clean the teacher-logit cache.")
StoreOpt = typer.Option(None, "--store", help="cache root (default: $DISTILL_CACHE_DIR or "
                        "~/.cache/distill-pipeline/teacher-logits)")


def _cache_call(fn, *args, **kwargs):
    """A cache call whose failure (CacheError, an unreadable file) is one message, no traceback."""
    from distill_pipeline.cache.segment import CacheError

    try:
        return fn(*args, **kwargs)
    except CacheError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot read the cache: {exc}; check the path and its permissions")


def _open(path: Optional[str], *, create: bool = False):
    from distill_pipeline.cache.remote import open_store

    return _cache_call(open_store, path, create=create)


def _listing(path: Optional[str]):
    """The store for `ls`/`info` (a remote one is listed from its commit records, nothing fetched),
    its notes on stderr."""
    from distill_pipeline.cache.admin import listing_notes

    store = _open(path)
    for note in listing_notes(store):
        typer.secho(note, fg=typer.colors.YELLOW, err=True)
    return store


@cache_app.command("ls")
def cache_ls(store: Optional[str] = StoreOpt):
    """One line per segment: teacher, entries, tokens, size. Segments failing the cheap checks
    (manifest, index, shapes) are marked DAMAGED (exit 1); `cache verify` also decodes every chunk."""
    from distill_pipeline.cache.admin import human_bytes, ls
    from distill_pipeline.cache.segment import damage_advice

    st = _listing(store)
    rows = _cache_call(ls, st)
    typer.echo(f"{'segment':34}{'teacher':14}{'K':>4}{'dtype':>10}{'entries':>9}{'tokens':>10}{'size':>11}")
    for r in rows:
        line = (f"{r['segment']:34}{r['teacher']:14}{r['top_k']:>4}{r['dtype']:>10}{r['entries']:>9}"
                f"{r['tokens']:>10}{human_bytes(r['bytes']):>11}")
        if r["damaged"]:
            typer.secho(f"{line}  DAMAGED: {r['damaged']}", fg=typer.colors.RED)
        else:
            typer.echo(line)
    bad = sum(1 for r in rows if r["damaged"])
    typer.echo(f"{len(rows)} segment(s)" + (f", {bad} damaged" if bad else ""))
    if bad:
        fail(f"{bad} damaged segment(s) in {st.url}; {damage_advice(st.url)}")


@cache_app.command("info")
def cache_info(store: Optional[str] = StoreOpt, as_json: bool = typer.Option(False, "--json")):
    """Entries, tokens, bytes on disk and per token, K, dtype, teachers, mean top-K mass.
    Damaged segments are listed and left out of the counts (exit 1)."""
    import json

    from distill_pipeline.cache.admin import human_bytes, info
    from distill_pipeline.cache.segment import damage_advice

    st = _listing(store)
    r = _cache_call(info, st)
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
        typer.echo(f"top-K mass       {r['mean_topk_mass']} (mean probability the stored top-K keeps"
                   + (f"; not recorded in the manifests of {r['mass_not_recorded']} segment(s), written "
                      "before it was, which it leaves out)" if r["mass_not_recorded"] else ")"))
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
    if r["damaged"]:
        fail(f"{len(r['damaged'])} damaged segment(s) in {st.url} (not counted above); "
             f"{damage_advice(st.url)}")


@cache_app.command("verify", help=(
    "Decode every chunk and check checksums, keys, offsets and shapes; exit 1 on any problem.\n\n"
    "Without --run, verify checks the segments the store holds or records: a segment whose folder is "
    "gone while its commit record or index rows remain is reported; one deleted whole, record and "
    "all, leaves no trace. With --run RUN_DIR it also checks, for each published teacher_logits node of the run, that "
    "every entry the node stands for is in the store its teachers.json names (without --store, those "
    "stores are the ones verified)."))
def cache_verify(store: Optional[str] = StoreOpt,
                 run_dir: Optional[str] = typer.Option(
                     None, "--run", help="a run dir: also check that every entry its published "
                     "teacher_logits nodes stand for is still in their store (finds deleted segments)")):
    from distill_pipeline.cache.admin import verify_all

    report = _cache_call(verify_all, store, Path(run_dir) if run_dir else None)
    for kind, text in report.lines:
        if kind == "note":
            typer.secho(text, fg=typer.colors.YELLOW, err=True)
        else:
            typer.secho(text, fg=typer.colors.RED if kind == "problem" else None)
    failure = report.failure()
    if failure:
        fail(failure)
    typer.echo(report.summary())


def _copy(src: str, dst: str, teacher: Optional[str], run_dir: Optional[str], dry_run: bool) -> None:
    from distill_pipeline.cache.admin import human_bytes
    from distill_pipeline.cache.node import node_keys, run_nodes
    from distill_pipeline.cache.transfer import copy_segments

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
    from distill_pipeline.env import default_root

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
                                                     "accepted (MB)"),
                max_concurrent_uploads: int = typer.Option(4, "--max-concurrent-uploads", min=1,
                                                           help="uploads received at once; each is held in "
                                                           "memory until verified (up to --max-segment-mb "
                                                           "plus its decoded arrays)"),
                upload_wait_s: float = typer.Option(10.0, "--upload-wait-s", min=0.0,
                                                    help="how long an upload beyond that limit waits for a "
                                                    "slot before it is refused as busy (clients retry)"),
                create: bool = typer.Option(False, "--create", help="create the store if it does not "
                                            "exist (without it, a missing path is refused: a mistyped "
                                            "one would serve an empty store)")):
    """Serve a local store over Arrow Flight (grpc://HOST:PORT) to other machines and teams:
    listing, key lookups, entries and segments by stream, verified uploads. Stops on SIGTERM."""
    from distill_pipeline.cache.remote import is_remote
    from distill_pipeline.cache.service import serve

    if (tls_cert is None) != (tls_key is None):
        fail("give both --tls-cert and --tls-key, or neither", 2)
    if is_remote(store):
        fail(f"--store {store}: the service serves a local directory (its own disk); to share an "
             "object store, point teams at it directly (teacher_logits.store: s3://…)", 2)
    if (token_file or read_token_file) and not tls_cert and host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: serving on {host} without TLS: tokens cross the network in clear text; "
                    "give --tls-cert/--tls-key (clients: grpc+tls://)", fg=typer.colors.YELLOW, err=True)
    code = _cache_call(serve, store, host=host, port=port, token_file=token_file,
                       read_token_file=read_token_file, tls_cert=tls_cert, tls_key=tls_key,
                       max_segment_bytes=int(max_segment_mb * 1e6),
                       max_concurrent_uploads=max_concurrent_uploads, upload_wait_s=upload_wait_s,
                       create=create)
    raise typer.Exit(code)


@cache_app.command("init")
def cache_init(store: str = typer.Argument(..., help="where the new store goes: a path, s3://…")):
    """Create an empty store. A run refuses a remote URL with no store there, and `cache serve` a
    missing path (a mistyped one would silently start an empty store): create it here first."""
    from distill_pipeline.cache.remote import REMOTE_SCHEMES, open_store
    from distill_pipeline.cache.segment import CacheError
    from distill_pipeline.cache.store import NoStore

    if store.startswith(REMOTE_SCHEMES):
        fail(f"{store} is a cache service: create its store on the server, with "
             "`distill-pipeline cache serve --store PATH --create`", 2)
    try:
        open_store(store, create=False)
    except NoStore:
        created = _cache_call(open_store, store, create=True)
        typer.echo(f"created an empty teacher-logit store at {created.url}")
        return
    except CacheError as exc:
        fail(str(exc))
    typer.echo(f"{store} is already a teacher-logit store: nothing changed")


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
    from distill_pipeline.cache.admin import gc

    report = _cache_call(gc, _open(store), older_than_s=older_than * 60, drop_teacher=drop_teacher,
                         damaged=damaged, stale=stale, dry_run=dry_run)
    for note in report.notes:
        typer.secho(note, fg=typer.colors.YELLOW, err=True)
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


