"""Shared hooks (and the place for shared fixtures) of the test suite.

Every test says what it needs with one marker (setup.cfg lists them):

* ``unit``: no TVM build; pure Python, NumPy, onnx, onnxruntime (TVM IR may be constructed,
  never compiled); fast. ``make test-unit`` runs these.
* ``tvm``: compiles with TVM on this CPU (compile_model, build, tvm.compile, a Relax VM, a
  latency measurement), or is otherwise heavy on TVM.
* ``hardware``: needs a CPU feature (VNNI, AMX, GFNI), a tool (nvcc, cuobjdump) or a device;
  skipped elsewhere with the reason. ``gpu`` tests are hardware tests too.

A test with none of them is refused at collection, so a new test must be classified.
``QCOMPILE_CHECK_MARKERS=1`` also fails a ``unit`` test that reaches TVM code generation.

Builders the tests share live in ``tests/helpers`` (``from tests.helpers.onnx_builders
import ...``); ``tests/__init__.py`` makes pytest put the checkout on ``sys.path``.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Any, Callable

import pytest

KINDS = ("unit", "tvm", "hardware")  # exactly one of these per test; gpu alone also counts


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse the run when a test is unclassified or classified twice."""
    bad = []
    for item in items:
        kinds = sorted({m.name for m in item.iter_markers() if m.name in KINDS})
        if len(kinds) > 1:
            bad.append(f"{item.nodeid}: {' and '.join(kinds)} (pick one)")
        elif not kinds and item.get_closest_marker("gpu") is None:
            bad.append(f"{item.nodeid}: no marker")
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise pytest.UsageError(
            f"{len(bad)} test(s) need exactly one of the markers {', '.join(KINDS)} "
            f"(tests/conftest.py says which is which; pytestmark = ... for a whole file):\n  {shown}")


_unit_running: list[str] = []  # the nodeid of the unit test running now, if any


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("QCOMPILE_CHECK_MARKERS") != "1":
        return
    import tvm  # noqa: F401  (loads tvm.tirx.build, where every TIR module meets codegen)

    build = sys.modules["tvm.tirx.build"]
    real: Callable[..., Any] = build.codegen_build

    def guarded(mod: Any, target: Any) -> Any:
        if _unit_running:  # pytest.fail is a BaseException: no `except Exception` hides it
            pytest.fail(f"{_unit_running[0]} is marked unit but builds with TVM "
                        f"(target {target.kind.name}): mark it tvm or hardware", pytrace=False)
        return real(mod, target)

    build.codegen_build = guarded


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    if item.get_closest_marker("unit") is not None:
        _unit_running.append(item.nodeid)
    try:
        return (yield)
    finally:
        _unit_running.clear()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line at the end: what this machine could not check, and why (the skip
    reasons name the missing feature: GPU, AMX, VNNI, GFNI, a tool or a data set)."""
    reasons: Counter[str] = Counter()
    for rep in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(rep, "longrepr", None)
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        parts = "; ".join(f"{n} x {why}" for why, n in reasons.most_common())
        terminalreporter.write_line(f"not checked here ({sum(reasons.values())} skipped): {parts}")
