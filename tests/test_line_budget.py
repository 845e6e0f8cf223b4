"""tools/line_budget.py: files over the budget fail, the allow list only shrinks."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SPEC = importlib.util.spec_from_file_location(
    "line_budget", Path(__file__).resolve().parent.parent / "tools" / "line_budget.py")
assert SPEC is not None and SPEC.loader is not None
budget = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(budget)


def _tree(tmp_path: Path, files: dict[str, int], allow: dict[str, int]) -> Path:
    table = "".join(f'"{k}" = {v}\n' for k, v in allow.items())
    (tmp_path / "pyproject.toml").write_text(
        f'[tool.qcompile.line-budget]\nmax = 5\npaths = ["pkg"]\n'
        f"[tool.qcompile.line-budget.allow]\n{table}")
    for name, n in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n" * n)
    return tmp_path


def test_over_the_budget_fails(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"pkg/a.py": 5, "pkg/sub/b.py": 6}, {})
    assert budget.check(root) == ["pkg/sub/b.py: 6 lines, over its budget of 5"]


def test_allow_list_may_shrink_not_grow(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"pkg/a.py": 8, "pkg/b.py": 9}, {"pkg/a.py": 8, "pkg/b.py": 7})
    assert budget.check(root) == ["pkg/b.py: 9 lines, over its budget of 7"]
    root = _tree(tmp_path, {"pkg/a.py": 4, "pkg/b.py": 7}, {"pkg/a.py": 8, "pkg/b.py": 7})
    assert budget.check(root) == ["pkg/a.py: 4 lines, under 5: drop it from the allow list"]


def test_this_repository_is_within_budget() -> None:
    assert budget.check() == []
