"""The targets qcompile compiles for, as one table: ``BACKENDS[kind]``.

Every stage that depends on the target reads its entry instead of branching on the
target's kind (see ``base.Backend`` for the fields):

    api.compile_model   target, rules, manifest, describe, cannot_run_here
    build               pipeline (TVM's per-backend default passes), schedule_rules,
                        codegen, check_code (and check_shipped, on the exported library)
    bitplan             cost_model (measured on this CPU, or the arch's roofline model)
                        and precisions (the (weight, activation) pairs the ILP offers)
    tune                no_tune
    inspect             inspect

Options are validated here, before any work (``check_options``). A new target is one
entry in ``BACKENDS``: its facts, and a module beside ``llvm.py`` and ``cuda.py`` with the
hooks (``base.HOOKS``: its target, lowering rules, code generation ...). Importing this
package imports no TVM.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UsageError
from ..targets import CUDA_TARGETS, check_arch
from . import cuda, llvm
from .base import Backend, CostInputs

if TYPE_CHECKING:
    import tvm

BACKENDS: dict[str, Backend] = {
    "llvm": Backend.from_module(llvm, names=("llvm",), pipeline="cpu_generic",
                                latency_source="measured"),
    "cuda": Backend.from_module(cuda, names=tuple(CUDA_TARGETS), pipeline="cuda",
                                latency_source="predicted", no_tune=cuda.NO_TUNE),
}
TARGET_NAMES: tuple[str, ...] = tuple(n for b in BACKENDS.values() for n in b.names)


def backend(name: str) -> Backend:
    """The entry a ``--target`` value selects (``t4`` is ``cuda``); UsageError otherwise."""
    for b in BACKENDS.values():
        if name in b.names:
            return b
    raise UsageError(f"--target must be one of {', '.join(TARGET_NAMES)}; got {name!r}")


def backend_of(target: "tvm.target.Target") -> Backend:
    """The entry of a TVM target (by its kind)."""
    return backend(target.kind.name)


def check_options(target: str, arch: str | None = None, *, tune: int = 0) -> Backend:
    """Every target-dependent option checked together, before any work: ``--target``,
    ``--arch`` (CUDA only, a known one) and ``--tune`` (where the target can measure)."""
    b = backend(target)
    check_arch(target, arch)
    if tune and b.no_tune:
        raise UsageError(b.no_tune)
    if tune < 0:
        raise UsageError(f"--tune needs a non-negative number of trials, got {tune}")
    return b


def make_target(name: str = "llvm", num_threads: int | None = None,
                arch: str | None = None) -> "tvm.target.Target":
    """``--target NAME --arch ARCH`` as a TVM target (``targets.make_target``)."""
    return backend(name).target(name, arch, num_threads)


__all__ = ["BACKENDS", "TARGET_NAMES", "Backend", "CostInputs", "backend", "backend_of",
           "check_options", "make_target"]
