"""Progress bars: tqdm in a terminal; Ray's tqdm inside a Ray task (rendered once by the
driver instead of one forwarded log line per refresh); off when DISTILL_PROGRESS=0."""
from __future__ import annotations

import os
import sys


def _in_ray_worker() -> bool:
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


class _RayBar:
    """The subset of tqdm's API the stages use, over ray.experimental.tqdm_ray."""

    def __init__(self, total, desc, initial, unit):
        from ray.experimental.tqdm_ray import tqdm

        self._desc = desc
        self._bar = tqdm(total=total, desc=desc, unit=unit)
        if initial:
            self._bar.update(initial)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_postfix(self, **kw) -> None:
        self._bar.set_description(self._desc + " " + " ".join(f"{k}={v}" for k, v in kw.items()))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()


def decide_for_workers() -> None:
    """Called by the driver before Ray starts: workers inherit the driver's choice (bars only
    when the driver's stderr is a terminal, unless DISTILL_PROGRESS is set)."""
    os.environ.setdefault("DISTILL_PROGRESS", "1" if sys.stderr.isatty() else "0")


def progress(total: int | None = None, desc: str = "", initial: int = 0, unit: str = "it",
             disable: bool = False):
    setting = os.environ.get("DISTILL_PROGRESS")
    disable = disable or setting == "0" or (setting is None and not sys.stderr.isatty())
    if not disable and _in_ray_worker():
        return _RayBar(total, desc, initial, unit)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, initial=initial, unit=unit, disable=disable,
                mininterval=0.2, dynamic_ncols=True, leave=False, file=sys.stderr)
