"""The ``llvm`` backend: this machine's CPU, with the x86 VNNI kernels of ``schedule.py``
and per-layer latencies measured here (``latency.py``)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Mapping, Sequence

from ..targets import PRECISIONS, Precisions, check_arch, host_mcpu

if TYPE_CHECKING:
    import tvm

    from ..asmcheck import AsmReport
    from ..bitplan import CostModel
    from ..costs import GpuSpec
    from ..intcheck import IntCheckReport
    from ..lower import FuseRule, Lowered, Rule
    from .base import CostInputs


def target(name: str = "llvm", arch: str | None = None,
           num_threads: int | None = None) -> "tvm.target.Target":
    """This CPU, with the best ``-mcpu`` we detect (LLVM 22 rejects ``native``)."""
    import tvm

    check_arch(name, arch)
    spec: dict[str, Any] = {"kind": "llvm", "num-cores": num_threads or os.cpu_count() or 1}
    mcpu = host_mcpu()
    if mcpu:
        spec["mcpu"] = mcpu
    return tvm.target.Target(spec)


def rules(batch: int, target: "tvm.target.Target") -> "Sequence[tuple[str, Rule | FuseRule]]":
    from ..schedule import x86_rules

    return x86_rules(batch)


def schedule_rules() -> list[Any]:
    return []  # the generic PrimFuncs get schedule_generic's defaults after --tune


def codegen(target: "tvm.target.Target", arch: str | None) -> "ContextManager[None]":
    return contextlib.nullcontext()  # LLVM code is generated in-process by tvm.compile


def check_code(rep: "IntCheckReport", ex: Any, device: None, target: "tvm.target.Target") -> None:
    """The compiled core's x86 assembly, scanned for float instructions."""
    from ..intcheck import record_asm

    record_asm(rep, ex)


def check_shipped(so: Path, prim_funcs: list[str]) -> "list[AsmReport]":
    """The core's x86 code in the exported library, disassembled (objdump)."""
    from ..shipcheck import scan_x86_so

    return [scan_x86_so(so, prim_funcs)]


def cost_model(inputs: "CostInputs") -> "CostModel":
    from ..bitplan import measured_cost_model

    return measured_cost_model(inputs)


def precisions(arch: str | None = None) -> Precisions:
    return PRECISIONS["llvm"]


def reference_gpu(target: "tvm.target.Target") -> "GpuSpec":
    from ..costs import T4

    return T4


def describe(target: "tvm.target.Target") -> str:
    return "llvm" + (f" -mcpu={target.attrs['mcpu']}" if "mcpu" in target.attrs else "")


def describe_json(target: "tvm.target.Target") -> dict[str, Any]:
    return {}


def manifest(lowered: "Lowered", target: "tvm.target.Target") -> dict[str, Any]:
    """CPU features beyond the -mcpu that the artifact needs granted at run time: AMX
    tiles (the loader asks the OS for them, and says so in one line where it cannot)."""
    from ..kernels.x86_amx import KERNEL_PREFIXES

    amx = any(f.startswith(KERNEL_PREFIXES) for f in lowered.funcs)
    return {"cpu_features": ["amx"]} if amx else {}


def cannot_run_here(target: "tvm.target.Target") -> str | None:
    return None  # compiled for this machine's CPU


def inspect(art: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    from ..inspect import inspect_cpu

    return inspect_cpu(art, manifest)
