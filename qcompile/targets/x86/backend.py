"""The x86 target's code: the VNNI/AMX kernels' lowering rules, in-process LLVM code
generation, and the float-instruction scans of what it compiled (``targets.TARGETS``)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Sequence

from qcompile.lower.emit import FuseRule, Lowered, Rule
from qcompile.targets.x86.amx import KERNEL_PREFIXES
from qcompile.targets.x86.lowering import x86_rules
from qcompile.verify.asmcheck import AsmReport
from qcompile.verify.intcheck import IntCheckReport, record_asm
from qcompile.verify.shipcheck import scan_x86_so

if TYPE_CHECKING:
    import tvm


def rules(batch: int, target: "tvm.target.Target") -> Sequence[tuple[str, Rule | FuseRule]]:
    return x86_rules(batch)


def schedule_rules() -> list[Any]:
    return []  # the generic PrimFuncs get build/default_schedules' after --tune


def codegen(target: "tvm.target.Target", arch: str | None) -> ContextManager[None]:
    return contextlib.nullcontext()  # LLVM code is generated in-process by tvm.compile


def check_code(rep: IntCheckReport, ex: Any, device: None, target: "tvm.target.Target") -> None:
    """The compiled core's x86 assembly, scanned for float instructions."""
    record_asm(rep, ex)


def check_shipped(so: Path, prim_funcs: list[str]) -> list[AsmReport]:
    """The core's x86 code in the exported library, disassembled (objdump)."""
    return [scan_x86_so(so, prim_funcs)]


def manifest(lowered: Lowered, target: "tvm.target.Target") -> dict[str, Any]:
    """CPU features beyond the -mcpu that the artifact needs granted at run time: AMX
    tiles (the loader asks the OS for them, and says so in one line where it cannot)."""
    amx = any(f.startswith(KERNEL_PREFIXES) for f in lowered.funcs)
    return {"cpu_features": ["amx"]} if amx else {}
