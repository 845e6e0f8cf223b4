"""The CUDA target's code: the tensor-core kernels' lowering rules, device code compiled by
nvcc at build time (no GPU needed), and the SASS scans of what it compiled
(``targets.TARGETS``)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Sequence

from qcompile.errors import BuildError
from qcompile.hw.facts import target_arch
from qcompile.lower.emit import FuseRule, Lowered, Rule
from qcompile.targets.cuda.lowering import (
    DeviceCode, cuda_rules, nvcc_at_build_time, record_sass, tensor_core_kernels)
from qcompile.tvm_compat import dlight
from qcompile.verify.asmcheck import AsmReport
from qcompile.verify.intcheck import IntCheckReport
from qcompile.verify.shipcheck import scan_cuda_so, scan_x86_so

if TYPE_CHECKING:
    import tvm


def rules(batch: int, target: "tvm.target.Target") -> Sequence[tuple[str, Rule | FuseRule]]:
    return cuda_rules(batch, arch=target_arch(target).arch)


def schedule_rules() -> list[Any]:
    """dlight's GPU rules for the generic PrimFuncs (our kernels carry tirx.is_scheduled);
    its ``gpu.Matmul`` is left out: on int8 it picks WMMA and dies in
    InjectSoftwarePipeline (TVM_NOTES), and no GEMM reaches it here anyway."""
    return [dlight.gpu.Reduction(), dlight.gpu.GeneralReduction(), dlight.gpu.Fallback()]


def codegen(target: "tvm.target.Target", arch: str | None) -> ContextManager[DeviceCode]:
    """nvcc compiles the device code at build time, for ``arch`` (default the target's)."""
    return nvcc_at_build_time(arch or target_arch(target).arch)


def check_code(rep: IntCheckReport, ex: Any, device: DeviceCode | None,
               target: "tvm.target.Target") -> None:
    """The SASS of the embedded binaries, scanned for float opcodes."""
    if device is None or not device.binaries:
        raise BuildError("the CUDA build compiled no device code (was the source embedded?)")
    record_sass(rep, device.binaries)


def check_shipped(so: Path, prim_funcs: list[str]) -> list[AsmReport]:
    """The exported library's host code for the core (x86, objdump) and the SASS of its
    embedded fatbins (cuobjdump)."""
    return [scan_x86_so(so, prim_funcs), scan_cuda_so(so, prim_funcs)]


def manifest(lowered: Lowered, target: "tvm.target.Target") -> dict[str, Any]:
    return {"tensor_cores": tensor_core_kernels(lowered.mod, lowered.funcs, target_arch(target).arch)}
