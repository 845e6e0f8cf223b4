"""The integer-only proof, run again on the library that ships (``module.so``).

The target's ``check_shipped`` (``targets.TARGETS``) disassembles what was exported:
x86 objdump, and on CUDA the SASS of the embedded fatbins (``verify/shipcheck.py``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from qcompile.build.compile import Built
from qcompile.errors import BuildError
from qcompile.targets import code_of


def prove_shipped(so: Path, built: Built) -> dict[str, Any]:
    """Scan the exported library ``so`` with the backend's ``check_shipped``; record the
    result as ``built.intcheck.shipped`` (the manifest's ``intcheck.shipped``). A float
    instruction, an unclassified line or a scan that could not run raises BuildError."""
    t0 = time.perf_counter()
    reports = code_of(built.target).check_shipped(so, list(built.intcheck.prim_funcs))
    bad = [f"[shipped {r.kind}] {v}" for r in reports
           for v in (r.violations or ([] if r.ok else [f"not scanned: {r.note or 'empty'}"]))]
    shipped = {"file": so.name, "ok": not bad, "seconds": round(time.perf_counter() - t0, 3),
               "scans": [r.as_dict() for r in reports]}
    built.intcheck.shipped = shipped
    if bad:
        built.intcheck.violations += bad
        raise BuildError(f"integer-only check failed on the exported {so.name}: {bad[:3]}")
    return shipped
