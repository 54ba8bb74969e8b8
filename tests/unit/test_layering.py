"""The package's layering, checked as code: the import-linter contracts in pyproject.toml hold,
no module-level import cycle exists, every module imports on its own, every module sits on a
floor of the contract, and the CLI answers `--help` without loading torch or Ray."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = "distill_pipeline"


def _modules() -> list[str]:
    out = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append(".".join(parts))
    return out


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_import_contracts_hold():
    """`lint-imports` (import-linter, reading pyproject.toml) keeps every contract; imports made
    inside functions count as much as the ones at the top of a file."""
    r = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                        "sys.exit(lint_imports())"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert f"Contracts: {len(_contracts())} kept, 0 broken" in r.stdout


def test_no_module_level_import_cycle():
    """Module by module (the contracts' no-cycles check sees packages; see its ignore_imports)."""
    import grimp

    graph = grimp.build_graph(PACKAGE, cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(m: str) -> None:  # Tarjan's strongly connected components
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in edges.get(m, ()):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            scc = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                scc.append(n)
                if n == m:
                    break
            if len(scc) > 1:
                cycles.append(sorted(scc))

    for m in sorted(edges):
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_every_module_imports_on_its_own():
    """Each module imported first, into an interpreter holding no other module of the package (an
    import cycle between two modules' top-level imports fails for one of the two orders)."""
    code = (
        "import importlib, sys, traceback\n"
        f"failed = []\nfor name in {_modules()!r}:\n"
        f"    for m in [k for k in sys.modules if k == {PACKAGE!r} or k.startswith({PACKAGE + '.'!r})]:\n"
        "        del sys.modules[m]\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except Exception:\n        failed.append(name + ': ' + traceback.format_exc(limit=3))\n"
        "print('\\n'.join(failed)); sys.exit(1 if failed else 0)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_every_module_is_on_a_floor():
    """A module the floors contract does not name would be bound by no layer: name it there."""
    floors = next(c for c in _contracts() if c["id"] == "floors")
    named = [f"{PACKAGE}.{m.strip()}" for layer in floors["layers"] for m in layer.split(":")]
    loose = [m for m in _modules() if m != PACKAGE
             and not any(m == n or m.startswith(n + ".") for n in named)
             and not any(n.startswith(m + ".") for n in named)]  # a package whose modules are named
    assert not loose, f"modules on no floor of the 'floors' contract in pyproject.toml: {loose}"


def test_help_is_instant_and_loads_no_heavy_library():
    """`distill-pipeline --help` must answer at once: no torch, ray, transformers or pyarrow at
    import time (they load inside the commands that need them)."""
    code = ("import sys\nsys.argv = ['distill-pipeline', '--help']\n"
            "from distill_pipeline.cli.main import app\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'ray', 'transformers', 'pyarrow', 'zarr', 'vllm') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    env = {**os.environ, "COLUMNS": "100"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert "HEAVY []" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    exe = Path(sys.executable).with_name("distill-pipeline")
    cmd = [str(exe), "--help"] if exe.exists() else [sys.executable, "-m", "distill_pipeline.cli.main", "--help"]
    best = float("inf")
    for _ in range(3):  # the best of three: a loaded machine adds noise, never speed
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
        best = min(best, time.perf_counter() - t0)
        assert r.returncode == 0 and "Usage" in r.stdout, r.stdout + r.stderr
    assert best < 0.5, f"distill-pipeline --help took {best:.2f} s (limit 0.5 s)"
