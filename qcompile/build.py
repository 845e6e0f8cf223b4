"""Relax module -> legalized IR (checked integer-only) -> compiled executable."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import tvm
from tvm import relax

from .errors import BuildError
from .intcheck import IntCheckReport, check_integer_only


@dataclass(frozen=True)
class Built:
    executable: relax.VMExecutable
    lowered: tvm.IRModule       # after legalization and fusion: what the checker saw
    intcheck: IntCheckReport
    target: tvm.target.Target
    tune: Any = None            # tune.TuneReport when --tune ran


def _debug_dump(stage: str, mod: tvm.IRModule) -> None:
    if os.environ.get("QCOMPILE_DEBUG"):
        print(f"=== {stage} ===\n{mod.script()}")


def _stage(target: tvm.target.Target, stage: str) -> list[tvm.transform.Pass]:
    """One stage of TVM's per-backend default pipeline.

    Taken from ``relax.backend.<kind>.pipeline`` directly: TVM 0.27's
    ``relax.pipeline.dataflow_lower_passes`` looks the function up on a package
    that does not re-export it.
    """
    kind = {"llvm": "cpu_generic"}.get(target.kind.name, target.kind.name)
    module = importlib.import_module(f"tvm.relax.backend.{kind}.pipeline")
    return list(getattr(module, f"{stage}_passes")(target))


def legalize(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Relax ops -> TIR PrimFuncs, with elementwise epilogues fused into producers."""
    passes = _stage(target, "library_dispatch") + _stage(target, "legalize")
    with target:
        return tvm.transform.Sequential(passes)(mod)


def build(mod: tvm.IRModule, target: tvm.target.Target, *, tune: int = 0,
          progress: bool = False) -> Built:
    """Legalize, optionally tune the generic PrimFuncs (``tune`` meta-schedule trials per
    unique shape, database persisted), prove the core integer-only, and compile."""
    _debug_dump("relax", mod)
    try:
        lowered = legalize(mod, target)
    except Exception as e:  # TVM raises its own error types; keep the first line
        raise BuildError(f"legalization failed: {str(e).splitlines()[0]}") from e
    report = None
    if tune:
        from .tune import tune_and_apply  # meta-schedule: imported only when asked for
        lowered, report = tune_and_apply(lowered, target, tune, progress=progress)
    _debug_dump("legalized", lowered)
    rep = check_integer_only(lowered, "core")
    rest = tvm.transform.Sequential(_stage(target, "dataflow_lower") + _stage(target, "finalize"))
    try:
        ex = tvm.compile(lowered, target, relax_pipeline=rest)
    except Exception as e:
        raise BuildError(f"TVM compilation failed: {str(e).splitlines()[0]}") from e
    return Built(ex, lowered, rep, target, report)
