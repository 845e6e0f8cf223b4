"""Relax module -> legalized IR (checked integer-only) -> compiled executable.

The one place qcompile compiles: every ``tvm.compile`` and every stage of TVM's Relax
pipeline is named here, and the target-specific parts come from the target's entry in
``backends.BACKENDS`` (its pipeline, GPU schedule rules, code generation context and
machine-code check)::

    build(mod, target)          legalize -> [--tune] -> default schedules -> integer-only
                                check -> compile -> scan the machine code (the artifact)
    compile_float(mod, target)  legalize -> extra schedule rules -> compile (sensitivity)
    compile_tir(mod, target)    PrimFuncs alone (latency kernels, tuning candidates)
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import tvm
import tvm_ffi
from tvm import relax

from qcompile.hw.backends import backend_of
from qcompile.errors import BuildError
from qcompile.env import debug, env_flag
from qcompile.errors import error_line
from qcompile.verify.intcheck import IntCheckReport, full_check
from qcompile.build.default_schedules import (
    ScheduleReport, apply_default_schedules, strip_schedules)
from qcompile.build.tune import tune_and_apply
from qcompile.targets import code_of
from qcompile.targets.cuda.lowering import DeviceCode
from qcompile.tvm_compat import SCHEDULED, PrimFunc, dlight, relax_pipeline


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
    device: DeviceCode | None = None  # CUDA: the binaries nvcc embedded
    seconds: float = 0.0        # the whole build


def _debug_dump(stage: str, mod: tvm.IRModule) -> None:
    if debug():
        print(f"=== {stage} ===\n{mod.script()}")


def _stage(target: tvm.target.Target, stage: str) -> list[tvm.transform.Pass]:
    """One stage of TVM's default Relax pipeline for the target's backend."""
    return list(relax_pipeline(backend_of(target).pipeline, stage)(target))


# TVM 0.27's legalize stage before its GPU schedules, the same for every backend.
def _fusion() -> list[tvm.transform.Pass]:
    return [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]


def legalize(mod: tvm.IRModule, target: tvm.target.Target,
             schedule_rules: Sequence[Any] = ()) -> tvm.IRModule:
    """Relax ops -> TIR PrimFuncs, with elementwise epilogues fused; then dlight applies the
    backend's schedule rules (GPU: every generic PrimFunc bound to threads) and
    ``schedule_rules`` to the PrimFuncs not yet scheduled."""
    rules = [*code_of(target).schedule_rules(), *schedule_rules]
    passes = _stage(target, "library_dispatch") + _fusion()
    if rules:
        passes.append(dlight.ApplyDefaultSchedule(*rules))
    with target:
        return tvm.transform.Sequential(passes)(mod)


def _compile(lowered: tvm.IRModule, target: tvm.target.Target) -> relax.VMExecutable:
    """The rest of TVM's pipeline (dataflow lowering, memory planning, VM lowering) and
    code generation, on a legalized module."""
    rest = tvm.transform.Sequential(_stage(target, "dataflow_lower") + _stage(target, "finalize"))
    return tvm.compile(lowered, target, relax_pipeline=rest)


def compile_float(mod: tvm.IRModule, target: tvm.target.Target,
                  schedule_rules: Sequence[Any] = ()) -> relax.VMExecutable:
    """A float module (sensitivity's forward and gradient functions): legalized with
    ``schedule_rules``, compiled, no integer-only checks."""
    return _compile(legalize(mod, target, schedule_rules), target)


def _untuned_back(tuned: tvm.IRModule, legalized: tvm.IRModule) -> tvm.IRModule:
    """Unmark the functions whose best tuning record is the untuned function itself
    (tune.py records it so tuning never slows a function down): the default schedule,
    applied next, beats the generic loop."""
    out = tuned
    for gv, func in tuned.functions_items():
        orig = legalized[gv.name_hint] if gv.name_hint in legalized else None
        if (isinstance(func, PrimFunc) and orig is not None and func is not orig
                and bool((func.attrs or {}).get(SCHEDULED, False))
                and not bool((orig.attrs or {}).get(SCHEDULED, False))
                and tvm_ffi.structural_equal(func.body, orig.body)):
            out = out if out is not tuned else tuned.clone()
            out.update_func(out.get_global_var(gv.name_hint), orig)
    return out


def _codegen(lowered: tvm.IRModule, target: tvm.target.Target, arch: str | None
             ) -> tuple[relax.VMExecutable, DeviceCode | None]:
    """Compile inside the backend's code-generation context (CUDA: nvcc embeds the arch's
    binaries); TVM's own errors become one-line BuildErrors."""
    with code_of(target).codegen(target, arch) as device:
        try:
            return _compile(lowered, target), device
        except Exception as e:  # TVM raises its own error types; keep the first line
            raise BuildError(f"TVM compilation failed: {error_line(e)}") from e


def build(mod: tvm.IRModule, target: tvm.target.Target, *, tune: int = 0,
          progress: bool = False, default_schedules: bool | None = None,
          arch: str | None = None, checked: bool = True) -> Built:
    """Legalize, optionally tune the generic PrimFuncs (``tune`` meta-schedule trials per
    unique shape, database persisted), give every PrimFunc still unscheduled a default
    CPU schedule (``schedule_generic``; llvm only, off with ``default_schedules=False`` or
    ``QCOMPILE_NO_DEFAULT_SCHEDULE=1``), prove the core integer-only, compile, and scan
    the machine code (x86 assembly, or the SASS of the fatbin CUDA embeds for ``arch``,
    default the target's own).

    Order with ``--tune``: tuned records win; the defaults cover what tuning did not
    (functions below its size threshold, shapes without records, failed tasks, and tasks
    whose best record is the untuned loop nest). If a default schedule ever makes TVM's
    compilation fail, the build warns and compiles the functions unscheduled instead.

    ``checked=False`` skips both integer-only proofs, for modules that are timed, never
    shipped (a latency table's generic layers, which have no ``core``).
    """
    t0 = time.perf_counter()
    # Step 1. Legalize: Relax ops -> fused TIR (on GPUs dlight schedules the generic ones).
    _debug_dump("relax", mod)
    try:
        lowered = legalize(mod, target)
    except Exception as e:  # TVM raises its own error types; keep the first line
        raise BuildError(f"legalization failed: {error_line(e)}") from e
    # Step 2. --tune: meta-schedule records, where they beat the generic loop.
    report = None
    if tune:
        legalized = lowered
        lowered, report = tune_and_apply(lowered, target, tune, progress=progress)
        lowered = _untuned_back(lowered, legalized)
    # Step 3. Default schedules for the generic PrimFuncs still unscheduled.
    if default_schedules is None:
        default_schedules = not env_flag(NO_DEFAULT_SCHEDULE_ENV)
    unscheduled, sched = lowered, None
    if default_schedules:
        lowered, sched = apply_default_schedules(lowered, target)
    _debug_dump("legalized", lowered)
    # Step 4. Prove the core integer-only, on the scheduled functions: inlining moves every
    # operation into the surviving blocks, so the checker sees all that is compiled.
    check = full_check if checked else (lambda *_: IntCheckReport())
    rep = check(lowered, target, "core")
    # Step 5. Compile; a default schedule TVM cannot compile falls back to the generic loop.
    try:
        ex, device = _codegen(lowered, target, arch)
    except BuildError as e:
        if not (sched and sched.scheduled):
            raise
        why = error_line(e.__cause__ or e)
        warnings.warn(f"compiling with default schedules failed ({why}); "
                      "compiling the generic functions unscheduled", stacklevel=2)
        lowered = strip_schedules(lowered, unscheduled, sched)
        sched = ScheduleReport(skipped={**sched.skipped, **dict.fromkeys(sched.scheduled,
                                                                         "compile failed")})
        rep = check(lowered, target, "core")
        ex, device = _codegen(lowered, target, arch)
    # Step 6. The second line of evidence: the machine code itself.
    if checked:
        code_of(target).check_code(rep, ex, device, target)
    return Built(ex, lowered, rep, target, report, sched, device, time.perf_counter() - t0)


# ======== CUDA: the build with nvcc's device code kept beside it (tests, benchmarks).
@dataclass(frozen=True)
class CudaBuilt:
    built: Built
    device: DeviceCode  # the embedded fatbin(s)
    seconds: float  # whole build


def build_cuda(mod: tvm.IRModule, target: tvm.target.Target, arch: str | None = None
               ) -> CudaBuilt:
    """Legalize for CUDA, prove the core integer-only, compile with ``arch`` code embedded.

    ``arch`` defaults to the target's own (``make_target("cuda", arch=...)``); GPU tests pass
    the device's (an sm_75 binary does not load on sm_90)."""
    built = build(mod, target, arch=arch)
    assert built.device is not None  # the cuda backend's check_code requires binaries
    return CudaBuilt(built, built.device, built.seconds)
