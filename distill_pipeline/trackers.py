"""Experiment trackers (`report_to: [tensorboard, wandb, mlflow]`): one tracker run per node.

Every training node reports what its `metrics.jsonl` holds (loss components, learning rate,
gradient norm, epoch) at the same steps, plus `tokens_per_s` and its validation rows; `evaluate`
reports its table (`<model>/<metric>`). Stages call one interface — `start(work_dir)` returns a
`Tracker` with `log(step, values)` and `close()` (also a context manager) — and know nothing of
the libraries. Which trackers, and what a run is told about its node (run dir, node name, lineage,
fingerprint, config), is bound around the stage by the pipeline (`bound(NodeRun)`, like
`parallel.group()` for ranks); with nothing bound, `start` returns a tracker that does nothing.
Data-parallel training opens trackers on rank 0 only (training.py decides that).

Where each writes, and how runs are grouped:
- tensorboard: `<node folder>/tensorboard` (published with the node);
- wandb: project `$WANDB_PROJECT` (default distill-pipeline), group = the run dir's name,
  job_type = the stage, name = the node and its lineage; the node's view and fingerprint are the
  run's config. Local files in `$WANDB_DIR` (default: the run dir); `WANDB_MODE=offline` works;
- mlflow: `$MLFLOW_TRACKING_URI` (default: `<run dir>/mlruns`, MLflow's file store), experiment =
  the run dir's name, run name as above, the view as params, node and fingerprint as tags.

A resumed node (restarted from its checkpoint at step T) continues its tracker runs — their ids
are kept in `<node folder>/trackers.json` — without duplicating the steps after T that the
interrupted attempt had already sent: TensorBoard purges them (`purge_step`), MLflow skips the
steps each metric already has, wandb drops steps below the resumed run's step (online; offline,
wandb cannot resume a run, so the resumed attempt is a second offline run with the same id).

Ground floor: imports nothing from the package; each library only inside the code that uses it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

# tracker → the module it needs (mlflow: the `mlflow-skinny` distribution provides it)
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
EXTRA = "pip install 'distill-pipeline[trackers]'"
STATE = "trackers.json"          # a node's tracker run ids, for a resume
TENSORBOARD_DIR = "tensorboard"  # in the node's folder
MLFLOW_PARAM_CHARS = 6000        # MLflow's limit on a param value


class TrackerError(RuntimeError):
    """A tracker cannot be used as configured (not installed, not logged in, no store)."""


def missing(names: Any) -> list[str]:
    """The trackers among `names` whose package is not importable (nothing is imported)."""
    return [n for n in names if importlib.util.find_spec(TRACKERS[n]) is None]


@dataclass(frozen=True)
class NodeRun:
    """What a node's tracker runs are told about it; bound by the pipeline around the stage."""
    report_to: tuple[str, ...]
    run_dir: str
    node: str
    stage: str
    fingerprint: str
    method: str
    lineage: tuple[str, ...] = ()  # e.g. ('loss adpa',): tells apart same-named nodes of methods
    config: dict[str, Any] = field(default_factory=dict)  # the node's view, flattened (dotted keys)

    @property
    def name(self) -> str:
        return self.node + (f" [{', '.join(self.lineage)}]" if self.lineage else "")

    @property
    def group(self) -> str:
        return Path(self.run_dir).name

    def tags(self) -> dict[str, str]:
        return {"run_dir": self.run_dir, "node": self.node, "stage": self.stage,
                "method": self.method, "fingerprint": self.fingerprint,
                "lineage": ", ".join(self.lineage)}


_bound: NodeRun | None = None


@contextmanager
def bound(node: NodeRun | None) -> Iterator[None]:
    """While the block runs (a stage), `start` opens the trackers `node.report_to` names."""
    global _bound
    previous, _bound = _bound, node
    try:
        yield
    finally:
        _bound = previous


class Tracker:
    """A node's tracker runs. This base does nothing: no `report_to`, or not rank 0."""
    active = False            # does anything listen? (skip work that only feeds trackers)
    id: str | None = None     # a tracker's run id, kept in trackers.json for a resume

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Send the numbers in `values` (others are skipped) as of training step `step`."""

    def close(self, failed: bool = False) -> None:
        """End the runs (`failed`: the stage raised)."""

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.close(failed=exc is not None)


def start(work_dir: Path, *, resume_step: int = 0) -> Tracker:
    """The bound node's tracker runs, writing under `work_dir` (the node's folder). With
    `resume_step` T > 0 the node resumed at step T: its earlier runs continue."""
    node = _bound
    if node is None or not node.report_to:
        return Tracker()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    state = work_dir / STATE
    previous = json.loads(state.read_text()) if resume_step and state.exists() else {}
    opened: list[Tracker] = []
    try:
        for name in node.report_to:
            opened.append(_OPEN[name](node, work_dir, resume_step, previous.get(name)))
    except BaseException:
        for run in opened:
            run.close(failed=True)
        raise
    ids = {name: run.id for name, run in zip(node.report_to, opened) if run.id}
    if ids:
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps(ids, indent=2))
        os.replace(tmp, state)
    return _All(opened)


def preflight(report_to: Any, run_dir: Path) -> list[str]:
    """Before any compute: what each tracker will do, or a `TrackerError` with the fix."""
    lines = []
    absent = missing(report_to)
    if absent:
        raise TrackerError(f"report_to: {', '.join(absent)} not installed; {EXTRA}")
    for name in report_to:
        if name == "tensorboard":
            lines.append(f"tensorboard: events in each node's folder ({TENSORBOARD_DIR}/)")
        elif name == "wandb":
            mode = os.environ.get("WANDB_MODE", "online")
            if mode not in ("offline", "dryrun", "disabled"):
                import wandb

                try:  # no network with verify=False: is a key configured (env, netrc, settings)?
                    wandb.login(verify=False)
                except Exception as exc:  # noqa: BLE001 - wandb's UsageError and friends
                    raise TrackerError(f"report_to: wandb: {exc} Log in with `wandb login`, set "
                                       "WANDB_API_KEY, or set WANDB_MODE=offline (sync later with "
                                       "`wandb sync`)") from None
            lines.append(f"wandb: {mode}, project {_wandb_project()}, group {Path(run_dir).name}, "
                         f"files in {os.environ.get('WANDB_DIR') or run_dir}")
        elif name == "mlflow":
            uri = _mlflow_client(str(run_dir))[1]
            lines.append(f"mlflow: {uri}, experiment {Path(run_dir).name}")
    return lines


class _All(Tracker):
    active = True

    def __init__(self, runs: list[Tracker]):
        self.runs = runs

    def log(self, step: int, values: dict[str, Any]) -> None:
        numbers = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            for run in self.runs:
                run.log(step, numbers)

    def close(self, failed: bool = False) -> None:
        for run in self.runs:
            run.close(failed)


class _TensorBoard(Tracker):
    def __init__(self, node: NodeRun, work_dir: Path, resume_step: int, previous: Any):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = work_dir / TENSORBOARD_DIR
        if not resume_step:  # a fresh start: an interrupted attempt's events go
            shutil.rmtree(log_dir, ignore_errors=True)
        # resumed at T: events of steps > T from the interrupted attempt are purged
        self.writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1 if resume_step else None)
        if not resume_step:
            about = json.dumps({**node.tags(), "config": node.config}, indent=2)
            self.writer.add_text("node", f"```\n{about}\n```", 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def _wandb_project() -> str:
    return os.environ.get("WANDB_PROJECT") or "distill-pipeline"


class _Wandb(Tracker):
    def __init__(self, node: NodeRun, work_dir: Path, resume_step: int, previous: str | None):
        import wandb

        # mode, dir and project from this process's environment, explicitly: wandb's own settings
        # are read once per process (a Ray worker or a test process runs many nodes)
        mode = {"mode": os.environ["WANDB_MODE"]} if os.environ.get("WANDB_MODE") else {}
        self.run = wandb.init(
            project=_wandb_project(), dir=os.environ.get("WANDB_DIR") or node.run_dir,
            group=node.group, job_type=node.stage, name=node.name, tags=[node.method, node.stage],
            config={**node.config, **{f"distill.{k}": v for k, v in node.tags().items()}},
            id=previous, resume="allow" if previous else None, reinit="create_new",
            # stdout stays the pipeline's (and Ray's): no capture, no run summary per node
            settings=wandb.Settings(console="off", quiet=True, **mode))
        self.id = self.run.id
        # a resumed online run holds the interrupted attempt's steps: wandb refuses lower ones
        self.first = self.run.step if previous and self.run.resumed else 0

    def log(self, step: int, values: dict[str, float]) -> None:
        if step >= self.first:
            self.run.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _mlflow_client(run_dir: str) -> tuple[Any, str]:
    """MLflow's client for `$MLFLOW_TRACKING_URI`, else a file store in `<run dir>/mlruns`
    (MLflow keeps its file store behind MLFLOW_ALLOW_FILE_STORE: allowed for that default)."""
    from mlflow.tracking import MlflowClient

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        uri = (Path(run_dir) / "mlruns").as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        return MlflowClient(tracking_uri=uri), uri
    except ImportError as exc:  # sqlite:// and other database stores need the full mlflow
        raise TrackerError(f"report_to: mlflow: tracking URI {uri} needs {exc.name or exc}, which "
                           "the trackers extra (mlflow-skinny) does not install: point "
                           "MLFLOW_TRACKING_URI at an MLflow server (http://…) or unset it (a "
                           "file store in the run dir)") from None
    except Exception as exc:  # noqa: BLE001 - MlflowException: e.g. file store not allowed
        raise TrackerError(f"report_to: mlflow: tracking URI {uri}: {exc}") from None


class _Mlflow(Tracker):
    def __init__(self, node: NodeRun, work_dir: Path, resume_step: int, previous: str | None):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        self.client = _mlflow_client(node.run_dir)[0]
        self.done: dict[str, int] = {}  # metric → the last step the run already holds
        if previous:
            try:
                run = self.client.get_run(previous)
            except MlflowException:
                run = None
            if run is not None:
                self.id = run.info.run_id
                self.client.update_run(self.id, status="RUNNING")
                self.done = {k: max((m.step for m in self.client.get_metric_history(self.id, k)), default=-1)
                             for k in run.data.metrics}
                return
        experiment = self._experiment(node)
        self.id = self.client.create_run(experiment, run_name=node.name, tags=node.tags()).info.run_id
        params = [Param(k, str(v)[:MLFLOW_PARAM_CHARS]) for k, v in node.config.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.id, params=params[i:i + 100])

    def _experiment(self, node: NodeRun) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(node.group)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(node.group, tags={"run_dir": node.run_dir})
        except MlflowException:  # another node of the run created it meanwhile
            return self.client.get_experiment_by_name(node.group).experiment_id

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items() if step > self.done.get(k, -1)]
        if metrics:
            self.client.log_batch(self.id, metrics=metrics)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.id, status="FAILED" if failed else "FINISHED")


_OPEN = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}
