"""Each target's code, by TVM target kind: ``TARGETS[kind]`` (``hw.backends`` holds the facts).

A target package (``x86/``, ``cuda/``) holds its kernels, the lowering rules that call
them, its code generation and the machine-code check of what it compiled; its
``backend.py`` gathers those as the hooks below, which the stages call by kind:

    api.compile_model   rules, manifest
    build               schedule_rules, codegen, check_code (and check_shipped, on the
                        exported library)
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence

from qcompile.errors import UsageError
from qcompile.targets.cuda import backend as cuda
from qcompile.targets.x86 import backend as x86

if TYPE_CHECKING:
    from tvm.target import Target

    from qcompile.lower.emit import FuseRule, Lowered, Rule
    from qcompile.targets.cuda.lowering import DeviceCode
    from qcompile.verify.asmcheck import AsmReport
    from qcompile.verify.intcheck import IntCheckReport


@dataclass(frozen=True)
class TargetCode:
    """What one target kind compiles with, and how its compiled code is checked."""

    # batch, target -> lowering rules tried before the generic ones (lower/emit.py).
    rules: Callable[[int, "Target"], "Sequence[tuple[str, Rule | FuseRule]]"]
    # dlight rules after legalization (GPU: every PrimFunc must be bound to threads).
    schedule_rules: Callable[[], list[Any]]
    # The context code generation runs in, given the arch (CUDA: nvcc embeds that arch's
    # binaries), yielding what it embedded.
    codegen: Callable[["Target", "str | None"], "ContextManager[DeviceCode | None]"]
    # The machine-code check of the compiled executable (x86 asm, or SASS).
    check_code: Callable[["IntCheckReport", Any, "DeviceCode | None", "Target"], None]
    # The same proof on the exported library that ships (build/ship.py): its path and
    # the core's PrimFuncs -> one scan report per kind of code it holds.
    check_shipped: Callable[[Path, list[str]], "list[AsmReport]"]
    # Manifest fields of the lowered module ("tensor_cores" on CUDA, "cpu_features").
    manifest: Callable[["Lowered", "Target"], dict[str, Any]]

    @classmethod
    def from_module(cls, module: ModuleType) -> "TargetCode":
        """The entry whose hooks are ``module``'s functions of the same names (a missing
        one fails at import)."""
        return cls(**{f.name: getattr(module, f.name) for f in fields(cls)})


TARGETS: dict[str, TargetCode] = {"llvm": TargetCode.from_module(x86),
                                  "cuda": TargetCode.from_module(cuda)}


def code_of(target: "Target") -> TargetCode:
    """The code of a TVM target's kind."""
    kind = target.kind.name
    if kind not in TARGETS:
        raise UsageError(f"no kernels for TVM target kind {kind!r}; use one of {', '.join(TARGETS)}")
    return TARGETS[kind]
