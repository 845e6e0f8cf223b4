"""Shared fixtures: tiny models compiled once per session where tests can share them."""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))  # tests/onnx_builders.py, tests/float_eval.py


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
