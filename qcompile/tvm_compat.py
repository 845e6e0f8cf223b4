"""TVM's moving names, imported in one place (apache-tvm 0.27 is pinned in setup.cfg).

0.27 moved TIR to ``tvm.tirx`` and schedules, dlight, meta-schedule and the tensor
intrinsics to ``tvm.s_tir``, and keeps the per-backend Relax pipelines in modules its
``relax.pipeline`` does not re-export. Every module of ``qcompile/``, the kernels
included, takes those names from here, so a TVM upgrade edits this file alone. There
are no version branches: the pin rules every other version out.

Stable names (``tvm.IRModule``, ``tvm.target``, ``tvm.relax``, ``tvm.runtime``,
``tvm_ffi``) are imported directly where they are used.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import tvm
from tvm import s_tir, te, tirx
from tvm.ir.expr import ExprWithOp as PrimExpr  # 0.27 has no tirx.PrimExpr class
from tvm.ir.utils import derived_object
from tvm.s_tir import SBlockRealize, Schedule, TensorIntrin, dlight
from tvm.s_tir import meta_schedule
from tvm.s_tir.dlight.analysis import SBlockInfo, normalize_prim_func
from tvm.s_tir.dlight.analysis.common_analysis import get_sblockrealize
from tvm.s_tir.dlight.base import try_inline_contiguous_spatial
from tvm.s_tir.schedule import LoopRV, SBlockRV
from tvm.script import tirx as T
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as IB  # imperative TIR building (the AMX kernels)
from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
from tvm.tirx.build import split_host_device_mods

PrimFunc = tirx.PrimFunc
SCHEDULED = "tirx.is_scheduled"  # PrimFunc attribute: dlight and meta-schedule skip it


def relax_pipeline(pipeline: str, stage: str) -> Callable[[tvm.target.Target],
                                                          list[tvm.transform.Pass]]:
    """``stage``'s pass factory in TVM's per-backend default Relax pipeline
    (``relax.backend.<pipeline>.pipeline.<stage>_passes``), taken from the backend's own
    module: 0.27's ``relax.pipeline.dataflow_lower_passes`` looks it up on a package that
    does not re-export it."""
    module = importlib.import_module(f"tvm.relax.backend.{pipeline}.pipeline")
    return getattr(module, f"{stage}_passes")


def tir_pipeline(target: tvm.target.Target) -> tuple[tvm.transform.Pass, Callable, Callable]:
    """The default TIR pipeline ``tvm.tirx.build`` runs for ``target``, and its host and
    device finalization pass factories."""
    return tirx.get_default_tir_pipeline(target)


def bind_target(target: tvm.target.Target) -> tvm.transform.Pass:
    return tirx.transform.BindTarget(target)


@contextmanager
def light_tensor_intrin() -> Iterator[None]:
    """Make ``import tvm.s_tir.tensor_intrin`` cheap while tuning contexts are created.

    Why the ``sys.modules`` entry (no public API does this): ``TuneContext()`` imports
    that package unconditionally, and its CUDA part parses ~30 s of TVMScript here. The
    llvm rules we tune with use no tensor intrinsics, so the package's module object
    stands in without running its ``__init__`` (its submodules still import), and only
    for as long as the block runs.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    spec = importlib.util.find_spec(name)
    assert spec is not None
    stub = importlib.util.module_from_spec(spec)
    sys.modules[name] = stub
    try:
        yield
    finally:
        if sys.modules.get(name) is stub:
            del sys.modules[name]


__all__ = ["IB", "IRBuilder", "LoopRV", "PrimExpr", "PrimFunc", "RemoveWeightLayoutRewriteBlock",
           "SBlockInfo",
           "SBlockRV", "SBlockRealize", "T", "TensorIntrin", "get_sblockrealize", "te",
           "try_inline_contiguous_spatial",
           "SCHEDULED", "Schedule", "bind_target", "derived_object", "dlight",
           "light_tensor_intrin", "meta_schedule", "normalize_prim_func", "relax_pipeline",
           "s_tir", "split_host_device_mods", "tir_pipeline", "tirx"]
