"""Ray: an embedded local instance by default, or a cluster via `ray.address` / RAY_ADDRESS."""
from __future__ import annotations

import os
from typing import Any


def ensure_ray(cfg: Any) -> None:
    import ray

    from distill_pipeline.progress import decide_for_workers

    if ray.is_initialized():
        return
    decide_for_workers()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no ~/.ray/auth_token for a local run
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True,
                 configure_logging=False)
