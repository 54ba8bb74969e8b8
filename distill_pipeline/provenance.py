"""Provenance recorded in stage manifests and cache segments."""
from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = ("distill-pipeline", "torch", "transformers", "ray", "zarr", "pyarrow", "vllm")


def package_versions() -> dict[str, str]:
    """Python and the installed versions of the packages that shape results."""
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out
