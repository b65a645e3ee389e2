"""The package has no import circle, counting imports inside functions (they hide one), and the
old import paths of moved names still work, with a DeprecationWarning."""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for f in (SRC / "optbrain").rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (relative and absolute, at any depth of the file;
    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module)."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg[: len(pkg) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in mods and t != m and not m.startswith(t + "."):
                    edges[m].add(t)
    return edges


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == 1:
                found.append(stack[stack.index(v) :] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def test_no_import_circles():
    circles = _circles(_edges(_modules()))
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_circle_finder_finds_a_planted_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _circles(edges) == [["a", "b", "c", "a"]]


MOVED = {
    "optbrain.pruner": ("optbrain.pruners", ["obd", "Pruner", "PruneInfo", "PRESETS"]),
    "optbrain.surgeon": ("optbrain.pruners.surgeon", ["OBSPruner"]),
    "optbrain.layerwise": ("optbrain.pruners.layerwise", ["LayerwiseOBS", "exact_obs"]),
    "optbrain.cell_pruner": ("optbrain.pruners.cell_pruner", ["CellPruner"]),
    "optbrain.pruning_demo": ("optbrain.demo", ["run", "DEFAULT_OUT"]),
    "optbrain.curvature.outer_product": ("optbrain.curvature.inverse", ["AutoInverse"]),
    "optbrain.curvature.layerwise": ("optbrain.curvature.calibration", ["calibration_hessians"]),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_import_paths_warn_and_work(old):
    new, names = MOVED[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    target = importlib.import_module(new)
    for name in names:
        assert getattr(module, name) is getattr(target, name)


def test_curvature_demo_names_forward_from_old_module():
    import optbrain.curvature_report as report
    import optbrain.demo as demo

    with pytest.warns(DeprecationWarning, match="curvature_report"):
        assert demo.DemoEstimator is report.ReportEstimator
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert demo.DemoResult.__name__ == "DemoResult"  # the pruning demo's own result


def test_package_imports_without_deprecation_warnings():
    code = (
        "import warnings; warnings.simplefilter('error', DeprecationWarning);"
        "import optbrain, optbrain.cli, optbrain.sklearn, optbrain.experiments as e;"
        "[e.get(n) for n in e.names()]"
    )
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_api_is_complete():
    import optbrain as ob

    for name in ob.__all__:
        assert hasattr(ob, name), name
    missing = [name for name in ob.METHODS if name not in ob.__all__ or not hasattr(ob, name)]
    assert not missing, f"named methods without a top-level preset: {missing}"
    for name in ob.METHODS:
        assert getattr(ob, name) is ob.METHODS[name].factory, name
    for name in ("fpe", "effective_parameters", "FPEEstimate", "FPEUndefinedError"):
        assert name in ob.__all__ and hasattr(ob, name), name
    assert ob.prune.__name__ == "prune_model"
