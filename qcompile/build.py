"""Relax module -> legalized IR (checked integer-only) -> compiled executable."""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Any

import tvm
import tvm_ffi
from tvm import relax

from .errors import BuildError
from .flags import debug, env_flag, error_line
from .intcheck import IntCheckReport, full_check, record_asm
from .schedule_generic import ScheduleReport, apply_default_schedules, strip_schedules

# Set to 1 to compile the generic PrimFuncs as TVM legalizes them (no default schedule).
NO_DEFAULT_SCHEDULE_ENV = "QCOMPILE_NO_DEFAULT_SCHEDULE"


@dataclass(frozen=True)
class Built:
    executable: relax.VMExecutable
    lowered: tvm.IRModule       # after legalization, fusion and scheduling: what the checker saw
    intcheck: IntCheckReport
    target: tvm.target.Target
    tune: Any = None            # tune.TuneReport when --tune ran
    schedules: ScheduleReport | None = None  # default CPU schedules of the generic PrimFuncs


def _debug_dump(stage: str, mod: tvm.IRModule) -> None:
    if debug():
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


def _untuned_back(tuned: tvm.IRModule, legalized: tvm.IRModule) -> tvm.IRModule:
    """Unmark the functions whose best tuning record is the untuned function itself
    (tune.py records it so tuning never slows a function down): the default schedule,
    applied next, beats the generic loop."""
    out = tuned
    for gv, func in tuned.functions_items():
        orig = legalized[gv.name_hint] if gv.name_hint in legalized else None
        if (isinstance(func, tvm.tirx.PrimFunc) and orig is not None and func is not orig
                and bool((func.attrs or {}).get("tirx.is_scheduled", False))
                and not bool((orig.attrs or {}).get("tirx.is_scheduled", False))
                and tvm_ffi.structural_equal(func.body, orig.body)):
            out = out if out is not tuned else tuned.clone()
            out.update_func(out.get_global_var(gv.name_hint), orig)
    return out


def build(mod: tvm.IRModule, target: tvm.target.Target, *, tune: int = 0,
          progress: bool = False, default_schedules: bool | None = None) -> Built:
    """Legalize, optionally tune the generic PrimFuncs (``tune`` meta-schedule trials per
    unique shape, database persisted), give every PrimFunc still unscheduled a default
    CPU schedule (``schedule_generic``; llvm only, off with ``default_schedules=False`` or
    ``QCOMPILE_NO_DEFAULT_SCHEDULE=1``), prove the core integer-only, and compile.

    Order with ``--tune``: tuned records win; the defaults cover what tuning did not
    (functions below its size threshold, shapes without records, failed tasks, and tasks
    whose best record is the untuned loop nest). If a default schedule ever makes TVM's
    compilation fail, the build warns and compiles the functions unscheduled instead.
    """
    _debug_dump("relax", mod)
    try:
        lowered = legalize(mod, target)
    except Exception as e:  # TVM raises its own error types; keep the first line
        raise BuildError(f"legalization failed: {error_line(e)}") from e
    report = None
    if tune:
        from .tune import tune_and_apply  # meta-schedule: imported only when asked for
        legalized = lowered
        lowered, report = tune_and_apply(lowered, target, tune, progress=progress)
        lowered = _untuned_back(lowered, legalized)
    if default_schedules is None:
        default_schedules = not env_flag(NO_DEFAULT_SCHEDULE_ENV)
    unscheduled, sched = lowered, None
    if default_schedules:
        lowered, sched = apply_default_schedules(lowered, target)
    _debug_dump("legalized", lowered)
    # On the scheduled functions: inlining moves every operation into the surviving
    # blocks, so the checker still sees all of the arithmetic that is compiled.
    rep = full_check(lowered, target, "core")
    rest = tvm.transform.Sequential(_stage(target, "dataflow_lower") + _stage(target, "finalize"))
    try:
        ex = tvm.compile(lowered, target, relax_pipeline=rest)
    except Exception as e:
        if not (sched and sched.scheduled):
            raise BuildError(f"TVM compilation failed: {error_line(e)}") from e
        warnings.warn(f"compiling with default schedules failed ({error_line(e)}); "
                      "compiling the generic functions unscheduled", stacklevel=2)
        lowered = strip_schedules(lowered, unscheduled, sched)
        sched = ScheduleReport(skipped={**sched.skipped, **dict.fromkeys(sched.scheduled,
                                                                         "compile failed")})
        rep = full_check(lowered, target, "core")
        try:
            ex = tvm.compile(lowered, target, relax_pipeline=rest)
        except Exception as e2:
            raise BuildError(f"TVM compilation failed: {error_line(e2)}") from e2
    record_asm(rep, ex, target)
    return Built(ex, lowered, rep, target, report, sched)
