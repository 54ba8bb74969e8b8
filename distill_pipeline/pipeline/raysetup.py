"""Starting or attaching Ray for a run: a private embedded instance by default, or a cluster via
`ray.address` / RAY_ADDRESS. (What a task needs of the driver's environment: `env.py`.)

The embedded instance is started with `address="local"`: a plain `ray.init()` would join any
cluster someone else started on this host (and then refuse our resource settings). A cluster
address is probed with a plain TCP connect first, so an unreachable one fails in seconds with the
address and what to check, instead of Ray retrying for minutes.
"""
from __future__ import annotations

import os
import socket
from typing import Any

from distill_pipeline.progress import decide_for_workers

CONNECT_TIMEOUT_S = 5.0


class RayUnavailable(RuntimeError):
    """Ray could not be started or reached."""


def _probe(address: str) -> None:
    """TCP-connect to host:port of a cluster address (`host:port` or `ray://host:port`)."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"Ray address {address!r} is not host:port (or ray://host:port, or auto)")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise RayUnavailable(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); check that its head "
            "node is up (`ray status` there), the host and port (the head's GCS port, 6379 by "
            "default; ray:// addresses use the client port, 10001), and firewalls — or drop "
            "--ray-address / RAY_ADDRESS to run on an embedded local Ray") from None


def ensure_ray(cfg: Any) -> bool:
    """Start or attach Ray; True when this call started an embedded instance (its caller shuts
    it down), False when Ray was already up or a cluster was attached."""
    import ray

    if ray.is_initialized():
        return False
    decide_for_workers()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no ~/.ray/auth_token for a local run
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            if address != "auto":
                _probe(address)
            ray.init(address=address, log_to_driver=True)
            return False
        else:
            ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False,
                     log_to_driver=True, configure_logging=False)
            return True
    except RayUnavailable:
        raise
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError, …
        where = f"the Ray cluster at {address}" if address else "an embedded local Ray"
        raise RayUnavailable(f"cannot start {where}: {type(exc).__name__}: {exc}") from None
