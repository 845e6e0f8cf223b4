"""The house rules: imports only point down the stages, and nothing imports in a circle.

``make lint`` runs import-linter with pyproject.toml's contracts; these tests show the
contract holds today and fails on a planted upward import or a planted cycle, and that
the benchmark scripts (not a package, so outside import-linter) import no circle either.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not LINT.exists(), reason="import-linter not installed "
                                 "(pip install -e '.[test]')")]


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache", "--config", str(root / "pyproject.toml")],
                          cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the package and its contracts, to plant imports in."""
    shutil.copytree(ROOT / "qcompile", tmp_path / "qcompile",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def _plant(tree: Path, module: str, line: str) -> None:
    path = tree / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n{line}\n")


def test_contracts_hold(tree: Path) -> None:
    res = _lint(tree)
    assert res.returncode == 0, res.stdout[-2000:]
    assert "2 kept, 0 broken" in res.stdout


def test_an_upward_import_breaks_the_layers(tree: Path) -> None:
    """The graph contract may not reach up into the compiler's API."""
    _plant(tree, "qcompile.ir.graph", "import qcompile.api  # noqa")
    res = _lint(tree)
    assert res.returncode != 0
    assert "stages import only the stages below them BROKEN" in res.stdout
    assert "qcompile.ir.graph -> qcompile.api" in res.stdout


def test_an_import_inside_a_function_counts(tree: Path) -> None:
    """Hiding the upward import in a function does not hide it from the contract."""
    _plant(tree, "qcompile.verify.oracle",
           "def _sneak() -> None:\n    from qcompile.quant import quantize  # noqa")
    res = _lint(tree)
    assert res.returncode != 0 and "qcompile.verify.oracle -> qcompile.quant" in res.stdout


def test_a_cycle_inside_a_stage_breaks_the_siblings_contract(tree: Path) -> None:
    _plant(tree, "qcompile.quant.readers", "import qcompile.quant.calibrate  # noqa")
    res = _lint(tree)
    assert res.returncode != 0 and "no import cycles inside a stage BROKEN" in res.stdout


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                out.append(sorted([v, *comp]))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_benchmark_scripts_import_no_circle() -> None:
    """benchmarks/ holds scripts that import each other by bare name."""
    names = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    graph: dict[str, set[str]] = {n: set() for n in names}
    for n in names:
        for node in ast.walk(ast.parse((ROOT / "benchmarks" / f"{n}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in names:
                graph[n].add(node.module)
            elif isinstance(node, ast.Import):
                graph[n] |= {a.name for a in node.names if a.name in names}
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]  # the check can fail
