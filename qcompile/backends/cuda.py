"""The ``cuda`` backend: NVIDIA GPUs per ``--arch`` (``targets.CUDA_ARCHS``), with the
tensor-core kernels of ``schedule_cuda.py``, device code compiled by nvcc at build time,
and the arch's roofline model as its latency source (no GPU is needed to build)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Mapping, Sequence

from ..targets import DEFAULT_ARCH, PRECISIONS, Precisions, check_arch, cuda_arch

if TYPE_CHECKING:
    import tvm

    from ..asmcheck import AsmReport
    from ..bitplan import CostModel
    from ..costs import GpuSpec
    from ..intcheck import IntCheckReport
    from ..lower import FuseRule, Lowered, Rule
    from ..schedule_cuda import DeviceCode
    from ..targets import CudaArch
    from .base import CostInputs

# --tune is refused before any work: meta-schedule measures every candidate on the device.
NO_TUNE = ("--tune supports --target llvm only: meta-schedule measures every candidate on "
           "the device, and CUDA artifacts are built without a GPU")


def _row(target: "tvm.target.Target") -> "CudaArch":
    return cuda_arch(str(target.attrs.get("arch", DEFAULT_ARCH)))


def target(name: str = "cuda", arch: str | None = None,
           num_threads: int | None = None) -> "tvm.target.Target":
    """The arch's TVM tag (or launch limits), with this CPU as the host."""
    import tvm

    from .llvm import target as host

    row = cuda_arch(check_arch(name, arch))
    return tvm.target.Target(row.target_spec(), host=host("llvm", None, num_threads))


def rules(batch: int, target: "tvm.target.Target") -> "Sequence[tuple[str, Rule | FuseRule]]":
    from ..schedule_cuda import cuda_rules

    return cuda_rules(batch, arch=_row(target).arch)


def schedule_rules() -> list[Any]:
    """dlight's GPU rules for the generic PrimFuncs (our kernels carry tirx.is_scheduled);
    its ``gpu.Matmul`` is left out: on int8 it picks WMMA and dies in
    InjectSoftwarePipeline (TVM_NOTES), and no GEMM reaches it here anyway."""
    from ..tvm_compat import dlight

    return [dlight.gpu.Reduction(), dlight.gpu.GeneralReduction(), dlight.gpu.Fallback()]


def codegen(target: "tvm.target.Target", arch: str | None) -> "ContextManager[DeviceCode]":
    """nvcc compiles the device code at build time, for ``arch`` (default the target's)."""
    from ..schedule_cuda import nvcc_at_build_time

    return nvcc_at_build_time(arch or _row(target).arch)


def check_code(rep: "IntCheckReport", ex: Any, device: "DeviceCode | None",
               target: "tvm.target.Target") -> None:
    """The SASS of the embedded binaries, scanned for float opcodes."""
    from ..errors import BuildError
    from ..schedule_cuda import record_sass

    if device is None or not device.binaries:
        raise BuildError("the CUDA build compiled no device code (was the source embedded?)")
    record_sass(rep, device.binaries)


def check_shipped(so: Path, prim_funcs: list[str]) -> "list[AsmReport]":
    """The exported library's host code for the core (x86, objdump) and the SASS of its
    embedded fatbins (cuobjdump)."""
    from ..shipcheck import scan_cuda_so, scan_x86_so

    return [scan_x86_so(so, prim_funcs), scan_cuda_so(so, prim_funcs)]


def cost_model(inputs: "CostInputs") -> "CostModel":
    from ..bitplan import predicted_cost_model
    from ..costs import gpu_spec

    return predicted_cost_model(inputs.graph, gpu_spec(_row(inputs.target)), inputs.batch)


def precisions(arch: str | None = None) -> Precisions:
    """On an arch without int4 tensor cores (sm_90) the 4-bit choice buys size only."""
    return PRECISIONS["cuda" if cuda_arch(arch).int4_native else "cuda_int4_emulated"]


def reference_gpu(target: "tvm.target.Target") -> "GpuSpec":
    from ..costs import gpu_spec

    return gpu_spec(_row(target))


def describe(target: "tvm.target.Target") -> str:
    row = _row(target)
    return f"cuda -arch={row.arch} ({row.gpu}; {row.arch} fatbin embedded)"


def describe_json(target: "tvm.target.Target") -> dict[str, Any]:
    row = _row(target)
    return {"arch": row.arch, "gpu": row.gpu, "int4_tensor_cores": row.int4_native}


def manifest(lowered: "Lowered", target: "tvm.target.Target") -> dict[str, Any]:
    from ..schedule_cuda import tensor_core_kernels

    return {"tensor_cores": tensor_core_kernels(lowered.mod, lowered.funcs, _row(target).arch)}


def cannot_run_here(target: "tvm.target.Target") -> str | None:
    """The artifact holds one arch's SASS (no PTX): it runs on a GPU of that arch only."""
    import tvm

    arch = _row(target).arch
    dev = tvm.cuda()
    here = f"sm_{dev.compute_version.replace('.', '')}" if dev.exist else None
    if here == arch:
        return None
    return (f"no CUDA GPU on this machine to run the {arch} code" if here is None else
            f"this GPU is {here}, the artifact holds {arch} code only")


def inspect(art: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    from ..inspect import inspect_cuda

    return inspect_cuda(art, manifest)
