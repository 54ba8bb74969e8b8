"""Starting or attaching Ray for a run: a private embedded instance by default, or a cluster via
`ray.address` / RAY_ADDRESS. (What a task needs of the driver's environment: `env.py`.)

The embedded instance is started with `address="local"`: a plain `ray.init()` would join any
cluster someone else started on this host (and then refuse our resource settings). `local` given
as the address (`--ray-address local`, `RAY_ADDRESS=local`, as Ray itself accepts) asks for the
same embedded instance.

A cluster address is probed before `ray.init`, each step bounded, so a wrong one fails in
seconds with the address and what to check instead of Ray retrying for many minutes: a TCP
connect (is anything listening?), then the start of a gRPC (HTTP/2) conversation — a Ray head's
GCS port and a Ray Client port (`ray://`) both answer the HTTP/2 connection preface with a
SETTINGS frame at once; a port that stays silent, or answers in another protocol (an HTTP/1
dashboard, Redis, SSH), is not a Ray head. `auto` is resolved as Ray resolves it (RAY_ADDRESS,
then the cluster started on this host) and the address found is probed the same way.

What the driver prints of its workers' output: everything the stages print, but not Ray Train's
own machinery (`confine_ray_train_logs`): the stderr of the Train controller and its helper
actors, and of the training workers (logging and tracebacks; the stages print to stdout), and the
raylet's "a worker died" notices, go to `<Ray session>/logs/distill-pipeline-ray-train.log`. A
data-parallel node that fails says so in one message (`launch.WorkerFailed`).
"""
from __future__ import annotations

import os
import socket
import time
from typing import Any

from distill_pipeline.progress import decide_for_workers

CONNECT_TIMEOUT_S = 5.0   # the TCP connect
ANSWER_TIMEOUT_S = 5.0    # the HTTP/2 SETTINGS a gRPC server sends as soon as it is spoken to
# The client's HTTP/2 connection preface, then an empty SETTINGS frame (RFC 9113 §3.4).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 0x4


class RayUnavailable(RuntimeError):
    """Ray could not be started or reached."""


CHECK = ("that its head node is up (`ray status` there), the host and port (the head's GCS port, "
         "6379 by default; ray:// addresses use the client port, 10001), and firewalls — or drop "
         "--ray-address / RAY_ADDRESS (or set it to `local`) to run on an embedded local Ray")


def _probe(address: str) -> None:
    """Is a Ray head at `address` (`host:port` or `ray://host:port`)? A TCP connect, then an
    HTTP/2 preface that a gRPC server answers with SETTINGS; each bounded by a timeout."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not host or not port.isdigit():
        raise RayUnavailable(f"Ray address {address!r} is not host:port (or ray://host:port, auto "
                             "or local)")
    try:
        sock = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S)
    except OSError as exc:
        raise RayUnavailable(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); "
                             f"check {CHECK}") from None
    with sock:
        got, deadline = b"", time.monotonic() + ANSWER_TIMEOUT_S
        try:
            sock.sendall(_H2_PREFACE)
            while len(got) < 9 and time.monotonic() < deadline:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                chunk = sock.recv(9 - len(got))
                if not chunk:
                    break  # closed by the other side
                got += chunk
        except TimeoutError:
            pass
        except OSError as exc:
            got = got or f"<{exc.strerror or exc}>".encode()
    if len(got) == 9 and got[3] == _H2_SETTINGS:
        return
    if not got:
        heard = (f"accepts connections but does not answer as a Ray head (no gRPC reply in "
                 f"{ANSWER_TIMEOUT_S:g} s)")
    else:
        heard = (f"answers, but not as a Ray head (it does not speak gRPC; it said "
                 f"{got[:9]!r})")
    raise RayUnavailable(f"no Ray cluster at {address}: the port {heard}, so it is not a Ray head's "
                         "GCS port (nor a Ray Client port) — is it another service (the dashboard, "
                         f"8265; Redis; a proxy)? Check {CHECK}")


def _resolve_auto() -> str | None:
    """The address `auto` means to Ray (RAY_ADDRESS, else the cluster `ray start` recorded on
    this host), or None when Ray would find none (its own error then says so)."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address("auto")
    except Exception:  # a private helper: if it moves or fails, ray.init reports for itself
        return None


# Ray Train's actors (by class name, as Ray labels their output). The training workers' stdout
# is the stage's own (progress, "resuming at step …") and stays on the terminal.
RAY_TRAIN_ACTORS = {"TrainController", "PlacementGroupCleaner", "TrainStateActor",
                    "PreemptionWatcher", "SynchronizationActor"}
RAY_TRAIN_WORKER = "RayTrainWorker"
TRAIN_LOG = "distill-pipeline-ray-train.log"
_WORKER_DIED = "A worker died or was killed"


def confine_ray_train_logs() -> str | None:
    """In the driver, after `ray.init`: send what Ray Train's machinery prints (and the raylet's
    worker-death notices) to a log file instead of the terminal; returns its path. A killed
    training worker otherwise prints ~180 lines of controller, worker and Ray tracebacks before
    the one-line error. Uses the driver's log-stream hooks of the pinned Ray (private API): if they
    are missing, nothing changes and Ray prints as before."""
    try:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

        logs = ray_worker._global_node.get_logs_dir_path()
        show = ray_worker.print_to_stdstream
        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        names = [name for name, _ in dispatcher.handlers]
    except Exception:  # another Ray version: leave its printing alone
        return None
    path = os.path.join(logs, TRAIN_LOG)
    if getattr(show, "_distill_confined", False):  # installed by an earlier run in this process
        show = show._distill_shows

    def write(data: dict, lines: list) -> None:
        try:
            with open(path, "a", encoding="utf-8") as fh:
                who = data.get("actor_name") or data.get("task_name") or ""
                fh.writelines(f"({who} pid={data.get('pid')}) {line}\n" for line in lines)
        except OSError:
            pass

    def confined(data: dict, ignore_prefix: bool) -> None:
        actor = data.get("actor_name") or ""
        if data.get("pid") == "raylet" and any(_WORKER_DIED in line for line in data.get("lines", [])):
            return write(data, data["lines"])
        if actor in RAY_TRAIN_ACTORS or (actor == RAY_TRAIN_WORKER and data.get("is_err")):
            kept = [line for line in data.get("lines", []) if RAY_TQDM_MAGIC in line]
            write(data, [line for line in data.get("lines", []) if RAY_TQDM_MAGIC not in line])
            if not kept:
                return None
            data = {**data, "lines": kept}
        return show(data, ignore_prefix)

    confined._distill_confined = True  # type: ignore[attr-defined]
    confined._distill_shows = show  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = confined  # the raylet's notices (listen_error_messages)
    if "ray_print_logs" in names:  # the workers' output (ray.init's handler, same name)
        import functools

        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", functools.partial(confined, ignore_prefix=ignore_prefix))
    return path


def ensure_ray(cfg: Any) -> bool:
    """Start or attach Ray; True when this call started an embedded instance (its caller shuts
    it down), False when Ray was already up or a cluster was attached."""
    import ray

    if ray.is_initialized():
        return False
    decide_for_workers()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no ~/.ray/auth_token for a local run
    address = (cfg.address or os.environ.get("RAY_ADDRESS") or "").strip()
    embedded = address in ("", "local")
    found = None
    try:
        if embedded:
            ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False,
                     log_to_driver=True, configure_logging=False)
            confine_ray_train_logs()
            return True
        found = _resolve_auto() if address == "auto" else address
        if found:
            _probe(found)
        ray.init(address=address, log_to_driver=True)
        confine_ray_train_logs()
        return False
    except RayUnavailable as exc:
        if address == "auto" and found:
            raise RayUnavailable(f"{exc} (`auto` found {found})") from None
        raise
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError, …
        where = f"the Ray cluster at {address}" if not embedded else "an embedded local Ray"
        raise RayUnavailable(f"cannot start {where}: {type(exc).__name__}: {exc}") from None
