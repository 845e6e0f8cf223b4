"""PrimFuncs compiled alone: a latency kernel, a tuning candidate."""
from __future__ import annotations

import tvm

from qcompile.tvm_compat import PrimFunc


def compile_tir(mod: tvm.IRModule | PrimFunc, target: tvm.target.Target) -> tvm.runtime.Executable:
    """PrimFuncs alone (a latency kernel, a tuning candidate): TVM's TIR pipeline and
    code generation. A lone PrimFunc is compiled as ``main``."""
    if isinstance(mod, PrimFunc):
        mod = tvm.IRModule({"main": mod})
    return tvm.compile(mod, target)
