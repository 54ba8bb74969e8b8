"""Plan, status and execution of a run.

Each node's output folder is `<run_dir>/<node>-<fingerprint[:12]>`, the fingerprint hashing
(stage, stage version, the node's view, upstream content hashes). A node is up to date when its
folder holds a `manifest.json` and the stage's `check_output` (if any) still accepts it. Work
happens in `<run_dir>/.partial/<folder>` (a crashed stage resumes there) and is published by one
atomic rename. `<run_dir>/.state/` remembers the last published view of each node lineage so
`status` can say why a node will run. Stages that train or generate run as Ray tasks with
resource requests; `status` and a no-op `run` never start Ray.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from distill_pipeline import trackers
from distill_pipeline.env import driver_context
from distill_pipeline.pipeline import cards
from distill_pipeline.pipeline.launch import execute_node, workers_of
from distill_pipeline.pipeline.recipes import NodeSpec, build_graph
from distill_pipeline.provenance import package_versions
from distill_pipeline.stages import ANY_ROLE, STAGE_NAMES, flatten, get_stage

MANIFEST = "manifest.json"


class PipelineError(RuntimeError):
    """A stage failed or a run request is invalid."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived while stages were running (partial outputs are kept)."""


@dataclass
class Plan:
    cfg: Any
    nodes: list[NodeSpec]
    fingerprints: dict[str, str]   # the node's folder: its view, version and inputs' contents
    contents: dict[str, str]       # what dependents hash: the same minus the view's LAYOUT fields
    run_dir: Path
    broken: dict[str, str | None] = field(default_factory=dict)  # published but no longer usable
    invocation: dict | None = None  # the command line it came from (cards.invocation), if any

    def node(self, name: str) -> NodeSpec:
        return next(n for n in self.nodes if n.name == name)

    def folder(self, name: str) -> Path:
        return self.run_dir / f"{name}-{self.fingerprints[name][:12]}"

    def partial(self, name: str) -> Path:
        return self.run_dir / ".partial" / self.folder(name).name

    def done(self, name: str) -> bool:
        """Published, and its output still usable (the stage's `check_output`, e.g. an
        extraction's entries still in their store; checked once per plan)."""
        if not (self.folder(name) / MANIFEST).exists():
            return False
        if name not in self.broken:
            check = get_stage(self.node(name).stage).check_output
            self.broken[name] = check(self.folder(name)) if check else None
        return self.broken[name] is None


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _digest(value: Any) -> str:
    return hashlib.sha256(canonical(value).encode()).hexdigest()


def make_plan(cfg: Any, invocation: dict | None = None) -> Plan:
    """The run graph of `cfg` with every node's fingerprint; `invocation` (the command line, see
    `cards.invocation`) goes into the model cards of the nodes this plan publishes."""
    nodes = build_graph(cfg)
    fps: dict[str, str] = {}
    contents: dict[str, str] = {}
    for n in nodes:
        stage = get_stage(n.stage)
        unknown = set(n.needs) - set(stage.inputs) if ANY_ROLE not in stage.inputs else set()
        if unknown or not isinstance(n.view, stage.view):  # wiring bugs in recipes.py, not user errors
            raise PipelineError(f"node {n.name}: stage {n.stage} reads roles {', '.join(stage.inputs)} "
                                f"and a {stage.view.__name__}; got roles {sorted(n.needs)} and a "
                                f"{type(n.view).__name__}")
        common = {"stage": n.stage, "version": stage.version,
                  "inputs": {role: contents[up] for role, up in sorted(n.needs.items())}}
        fps[n.name] = _digest({**common, "view": n.view.fingerprint_payload()})
        contents[n.name] = _digest({**common, "view": n.view.content_payload()})
    run_dir = Path(cfg.run_dir).expanduser().resolve()  # absolute: workers may run elsewhere
    if run_dir.exists() and not run_dir.is_dir():
        raise PipelineError(f"run_dir {run_dir} is a file, not a directory; set run_dir to a directory")
    return Plan(cfg, nodes, fps, contents, run_dir, invocation=invocation)


def select(plan: Plan, targets: list[str]) -> list[str]:
    """Node names for targets (stage names, node names or 'all') plus their upstream closure."""
    if not targets or targets == ["all"]:
        return [n.name for n in plan.nodes]
    if "all" in targets:
        raise PipelineError(f"'all' already means every node; drop it or drop {', '.join(t for t in targets if t != 'all')}")
    wanted: set[str] = set()
    names = [n.name for n in plan.nodes]
    for t in targets:
        hit = [n.name for n in plan.nodes if n.name == t or n.stage == t]
        if not hit:
            known = ", ".join(dict.fromkeys(names + [s for s in STAGE_NAMES]))
            raise PipelineError(f"no node or stage {t!r} in method {plan.cfg.method}; "
                                f"choose from: all, {known}")
        wanted.update(hit)
    closure = set(wanted)
    for n in reversed(plan.nodes):
        if n.name in closure:
            closure.update(n.needs.values())
    return [n for n in names if n in closure]


# ---------------------------------------------------------------------------- status
#
# `.state/<node>/<lineage>.json` is the last published state of each *lineage* of a node: the node
# name and its view's LINEAGE fields (train's loss), and recursively the lineages of its inputs.
# Methods run into one run dir each keep their own lineages (an sft and a dpo `evaluate` differ
# through their `train`), so `status` explains a pending node against its own previous run.

def _lineage(plan: Plan, name: str) -> dict:
    node = plan.node(name)
    return {"node": name, "fields": jsonable(node.view.lineage()),
            "inputs": {role: _lineage(plan, up) for role, up in sorted(node.needs.items())}}


def _lineage_words(lineage: dict, own: bool = True) -> list[str]:
    """The LINEAGE fields of a node and its ancestors, e.g. ['loss adpa', 'train.dckd loss dckd']."""
    words = [(f"{k} {v}" if own else f"{lineage['node']} {k} {v}") for k, v in lineage["fields"].items()]
    for sub in lineage["inputs"].values():
        words += [w for w in _lineage_words(sub, own=False) if w not in words]
    return words


def _state_path(plan: Plan, name: str) -> Path:
    return plan.run_dir / ".state" / name / f"{_digest(_lineage(plan, name))[:16]}.json"


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def why(plan: Plan, name: str) -> str:
    """Why a node that is not up to date will run, against the last state of its lineage."""
    node = plan.node(name)
    state_file = _state_path(plan, name)
    partial = " (resumes from its partial output)" if plan.partial(name).exists() else ""
    if plan.broken.get(name):
        return plan.broken[name] + partial
    if not state_file.exists():
        if not (plan.run_dir / ".state" / name).exists():
            return "never run" + partial
        words = _lineage_words(_lineage(plan, name))
        what = f" with {', '.join(words)}" if words else ""
        return f"never run{what} (other {name} outputs here are other methods')" + partial
    prev = json.loads(state_file.read_text())
    reasons = []
    version = get_stage(node.stage).version
    if prev.get("version") != version:
        reasons.append(f"stage version {prev.get('version')} → {version}")
    old, new = flatten(prev["view"]), flatten(node.view.fingerprint_payload())
    paths = node.view.config_paths()
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            where = paths.get(key) or key
            if key.endswith("sha256"):
                reasons.append(f"{where.removesuffix('.source')} file content changed")
            else:
                reasons.append(f"{where} {old.get(key, '(unset)')} → {new.get(key, '(unset)')}")
    for role, up in sorted(node.needs.items()):
        if prev.get("inputs", {}).get(role) != plan.contents[up]:
            reasons.append(f"upstream {up} changed")
    return ("; ".join(reasons) or "output folder missing") + partial


def status(plan: Plan) -> list[tuple[str, bool, str]]:
    """(node, up to date, explanation) for every node, in execution order."""
    rows = []
    for n in plan.nodes:
        describe = get_stage(n.stage).describe
        if plan.done(n.name):
            what = describe(n.view) if describe else "up to date"
            rows.append((n.name, True, f"{what} ({plan.folder(n.name)})"))
        else:
            what = f" ({describe(n.view)})" if describe else ""
            rows.append((n.name, False, f"will run: {why(plan, n.name)}{what}"))
    return rows


# ---------------------------------------------------------------------------- execution

def _publish(plan: Plan, name: str, summary: dict, started: float,
             echo: Callable[[str], None] = print) -> None:
    node, stage = plan.node(name), get_stage(plan.node(name).stage)
    partial, final = plan.partial(name), plan.folder(name)
    missing = [o for o in stage.outputs if not (partial / o).exists()]
    if missing:
        raise PipelineError(f"{name} finished without writing {', '.join(missing)} (a bug in stage "
                            f"{node.stage}); partial output kept in {partial}")
    manifest = {
        "node": name, "stage": node.stage, "version": stage.version,
        "fingerprint": plan.fingerprints[name], "config": node.view.model_dump(mode="json"),
        "inputs": {role: {"node": up, "fingerprint": plan.fingerprints[up],
                          "path": str(plan.folder(up))} for role, up in node.needs.items()},
        "summary": summary,
        "timings": {"started": started, "finished": time.time(),
                    "seconds": round(time.time() - started, 3)},
        "versions": package_versions(), "host": platform.node(),
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if cards.publishes_model(node.stage):  # in the partial folder: published with the model
        _card(name, echo, cards.write_card, plan, name, partial, manifest)
    if final.exists():  # a stale folder without manifest (crash after rename is impossible)
        shutil.rmtree(final)
    os.replace(partial, final)
    plan.broken[name] = None
    record_state(plan, name)
    _card(name, echo, cards.refresh_evaluated, plan, name)  # evaluate: the scored models' cards


def _card(name: str, echo: Callable[[str], None], write: Callable, *args: Any) -> None:
    """A model card is documentation: failing to write one must not lose a trained node (its
    checkpoint is gone once it finished), so it is reported and the node published without it."""
    try:
        write(*args)
    except Exception as exc:  # noqa: BLE001 - any failure: say so, publish anyway
        echo(f"{name}: model card not written ({type(exc).__name__}: {exc}); the node is published "
             "without it")


def record_state(plan: Plan, name: str) -> None:
    """Remember what `name` was published from, for `status` (one file per lineage)."""
    node = plan.node(name)
    state = {"fingerprint": plan.fingerprints[name], "version": get_stage(node.stage).version,
             "view": node.view.fingerprint_payload(), "lineage": _lineage(plan, name),
             "inputs": {role: plan.contents[up] for role, up in node.needs.items()}}
    path = _state_path(plan, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def _summary_line(plan: Plan, name: str, summary: dict, seconds: float) -> str:
    folder = plan.folder(name)
    parts = ", ".join(f"{k} {v}" for k, v in summary.items())
    line = f"{name}: done in {seconds:.1f}s — {parts} → {folder}"
    report = get_stage(plan.node(name).stage).report
    return f"{line}\n{report(folder)}" if report else line


def preflight(plan: Plan, todo: list[str], echo: Callable[[str], None] = print, *,
              memory_check: bool = True) -> None:
    """Checks that must pass before compute is spent: every model the run trains from or imports
    (files, tokenizer, chat template; no weights read), every dataset a node about to run reads
    (read and validated, not tokenised), and tokenizer equality across all those models."""
    from distill_pipeline.data import DataView, validate_dataset
    from distill_pipeline.models import check_model_spec, check_same_tokenizer, load_tokenizer

    try:  # report_to: installed, logged in, a store MLflow can open (trackers.preflight)
        for line in trackers.preflight(plan.cfg.report_to, plan.run_dir):
            echo(f"preflight: {line}")
    except trackers.TrackerError as exc:
        raise PipelineError(str(exc)) from None
    template = plan.cfg.data.template()
    models = {f"models.{n.view.role}": n.view.model for n in plan.nodes  # sft and import nodes
              if n.stage in ("sft", "import_model")}
    for name, spec in models.items():  # cheap file checks first: no weights, no hub retries
        echo(f"preflight: {name}: {check_model_spec(spec, template_given=template is not None)}")
    for name in todo:  # what a stage checks of its own node (e.g. the store an extraction writes into)
        check = get_stage(plan.node(name).stage).preflight
        if check:
            echo(f"preflight: {name}: {check(plan.node(name).view)}")
    seen: set[str] = set()
    for name in todo:
        node_view = plan.node(name).view
        for view in (getattr(node_view, f) for f in type(node_view).model_fields):
            if isinstance(view, DataView) and view.which not in seen:
                seen.add(view.which)
                echo(f"preflight: {validate_dataset(view)}")
    from distill_pipeline.pipeline.memory import check

    problems = check(plan, todo) if memory_check else []  # from the models' configs: no weights read
    if problems:
        raise PipelineError("not enough memory (estimated; `distill-pipeline plan -c …` shows every "
                            "node; `run --no-memory-check` runs anyway):\n" + "\n".join(problems))
    toks = {name: load_tokenizer(spec, template) for name, spec in models.items()}
    (first, first_tok), *others = toks.items()
    for name, tok in others:
        check_same_tokenizer(first_tok, tok, first=f"{first} ({_label(models[first])})",
                             second=f"{name} ({_label(models[name])})")


def _label(spec: Any) -> str:
    return spec.preset or spec.name_or_path


@contextmanager
def interruptible(raise_now: bool = True):
    """While the block runs, SIGINT / SIGTERM set the yielded event and, with `raise_now`, raise
    `Interrupted` in the main thread. The Ray scheduler polls the event instead: an exception
    raised inside Ray's blocking C calls surfaces as a SystemError."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        stop.set()
        if raise_now:
            raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(plan: Plan, targets: list[str], *, force: bool = False, use_ray: bool = True, wait: bool = False,
        echo: Callable[[str], None] = print, memory_check: bool = True) -> list[str]:
    """Bring the selected nodes up to date; returns the names of the nodes that executed.
    Holds the run dir's lock while anything executes; `Interrupted` on SIGINT / SIGTERM."""
    from distill_pipeline.pipeline.lock import RunLock

    selected = select(plan, targets)
    everything = targets in ([], ["all"])
    forced = {n.name for n in plan.nodes if force and (everything or n.name in targets or n.stage in targets)}

    def pending() -> list[str]:
        return [n for n in selected if n in forced or not plan.done(n)]

    if not pending():  # nothing to do: no lock needed (a read-only run dir is fine)
        for n in selected:
            echo(f"{n}: up to date")
        return []
    with interruptible(), RunLock(plan.run_dir, wait=wait, echo=echo):
        plan.broken.clear()  # another run may have changed things while we waited
        todo = pending()
        for n in selected:
            if n not in todo:
                echo(f"{n}: up to date")
        if not todo:
            return []
        multi = [n for n in todo if workers_of(plan.node(n).view) > 1]
        if multi and not use_ray:
            raise PipelineError(f"{', '.join(multi)}: workers > 1 runs on Ray Train; run without "
                                "--no-ray (or set the node's workers to 1)")
        preflight(plan, todo, echo, memory_check=memory_check)
        for n in todo:
            echo(f"{n}: will run: {'forced' if n in forced and plan.done(n) else why(plan, n)}")
        if use_ray:
            _run_ray(plan, todo, echo)
        else:
            for n in todo:
                _run_one_inline(plan, n, echo)
    return todo


def _tracking(plan: Plan, name: str) -> trackers.NodeRun | None:
    """What the node's `report_to` tracker runs are told: grouping (run dir, lineage), the
    fingerprint and the node's view (not fingerprinted: report_to reruns nothing)."""
    if not plan.cfg.report_to:
        return None
    node = plan.node(name)
    return trackers.NodeRun(
        report_to=tuple(plan.cfg.report_to), run_dir=str(plan.run_dir), node=name, stage=node.stage,
        fingerprint=plan.fingerprints[name], method=plan.cfg.method,
        lineage=tuple(_lineage_words(_lineage(plan, name))),
        config=flatten(node.view.model_dump(mode="json")))


def _inputs(plan: Plan, name: str) -> dict[str, str]:
    return {role: str(plan.folder(up)) for role, up in plan.node(name).needs.items()}


def _run_one_inline(plan: Plan, name: str, echo: Callable[[str], None]) -> None:
    node, started = plan.node(name), time.time()
    try:
        summary = execute_node(node.stage, node.view, _inputs(plan, name), str(plan.partial(name)),
                               tracking=_tracking(plan, name))
    except Exception as exc:
        raise PipelineError(f"{name} failed: {type(exc).__name__}: {exc}\n"
                            f"partial output kept in {plan.partial(name)}") from exc
    _publish(plan, name, summary, started, echo)
    echo(_summary_line(plan, name, summary, time.time() - started))


def check_worker_resources(plan: Plan, todo: list[str], cluster: dict) -> None:
    """Refuse, before any stage runs, a data-parallel node the cluster cannot place (Ray Train
    would otherwise wait for the resources forever)."""
    res = plan.cfg.resources
    for name in todo:
        workers = workers_of(plan.node(name).view)
        if workers == 1:
            continue
        if res.gpus and res.gpus != int(res.gpus):
            raise PipelineError(f"{name}: {workers} workers with resources.gpus={res.gpus:g} would share "
                                "GPUs, which NCCL does not allow; give each worker whole GPUs")
        for what, each, unit in (("CPU", res.train_cpus, "resources.train_cpus"),
                                 ("GPU", res.gpus, "resources.gpus")):
            have = cluster.get(what, 0)
            if each and workers * each > have:
                raise PipelineError(
                    f"{name}: {workers} workers × {unit}={each:g} need {workers * each:g} {what}s; "
                    f"the Ray cluster has {have:g}. Lower the node's workers or {unit}, or add nodes")


def _run_ray(plan: Plan, todo: list[str], echo: Callable[[str], None]) -> None:
    import ray

    from distill_pipeline.pipeline.raysetup import ensure_ray

    embedded = ensure_ray(plan.cfg.ray)
    try:
        check_worker_resources(plan, todo, ray.cluster_resources())
        # installed after ray.init, which replaces the SIGTERM handler; polled, not raised inside Ray
        with interruptible(raise_now=False) as stop:
            _schedule(plan, todo, echo, stop)
    finally:
        if embedded:  # while the run dir's lock is still held: no task outlives the run
            ray.shutdown()


def _schedule(plan: Plan, todo: list[str], echo: Callable[[str], None], stop: threading.Event) -> None:
    import ray

    res = plan.cfg.resources
    remote = ray.remote(execute_node)
    context = driver_context()
    pending, running, started = list(todo), {}, {}
    failures: list[str] = []
    try:
        while pending or running:
            for name in list(pending):
                node = plan.node(name)
                if any(up in pending or up in running.values() for up in node.needs.values()):
                    continue
                if failures:
                    break
                kind = get_stage(node.stage).kind
                cpus = {"train": res.train_cpus, "generate": res.generate_cpus}.get(kind, 0)
                gpus = res.gpus if kind in ("train", "generate") else 0
                held = (0, 0) if workers_of(node.view) > 1 else (cpus, gpus)  # its workers hold them
                ref = remote.options(num_cpus=held[0], num_gpus=held[1], name=name).remote(
                    node.stage, node.view, _inputs(plan, name), str(plan.partial(name)),
                    max(1, int(cpus)), context, (cpus, gpus), _tracking(plan, name))
                running[ref] = name
                started[name] = time.time()
                pending.remove(name)
            if not running:
                break
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            if done:  # a finished node is published even when a signal arrived meanwhile
                name = running.pop(done[0])
                try:
                    summary = ray.get(done[0])
                except Exception as exc:
                    cause = getattr(exc, "cause", None) or exc
                    failures.append(f"{name} failed: {type(cause).__name__}: {cause}\n"
                                    f"partial output kept in {plan.partial(name)}")
                else:
                    _publish(plan, name, summary, started[name], echo)
                    echo(_summary_line(plan, name, summary, time.time() - started[name]))
            if stop.is_set():
                raise Interrupted("signal")
    except BaseException:
        for ref in running:  # force: the task's worker and the actors it owns go with it
            ray.cancel(ref, force=True)
        if running:  # bounded: let the cancellations land before the caller releases the lock
            ray.wait(list(running), num_returns=len(running), timeout=10)
        raise
    if failures:
        raise PipelineError("\n".join(failures))
