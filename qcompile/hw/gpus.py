"""GPU rooflines: one ``GpuSpec`` per CUDA arch (``facts.CUDA_ARCHS``), the T4 by default.

Hardware facts, with the assumptions that turn peaks into a time; the cost model
(``mixed/costs.py``) reads them, and the target table quotes one per target.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from qcompile.hw.facts import CudaArch, cuda_arch


@dataclass(frozen=True)
class GpuSpec:
    """Peak rates of one GPU, plus the assumptions that turn peaks into a time.

    ``peak_ops`` maps bits to dense tensor-core ops/s (2 ops per MAC); 16 and 32 mean
    FP16 and FP32 (float formats: there is no INT16 row).  ``emulated`` maps a width the
    GPU has no tensor cores for to the width it runs on (sm_90: 4 -> 8).  The assumptions
    are ours,
    not NVIDIA's: a kernel reaches ``compute_eff`` of peak and ``memory_eff`` of DRAM
    bandwidth, output tiles of ``tile`` are spread over ``sms`` SMs in waves (so a
    small GEMM leaves SMs idle), and every kernel pays ``launch_s``.
    """

    name: str
    peak_ops: Mapping[int, float]
    dram_bytes_s: float
    sms: int
    compute_eff: float
    memory_eff: float
    launch_s: float
    tile: tuple[int, int] = (64, 64)
    emulated: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak_ops", MappingProxyType(dict(self.peak_ops)))
        object.__setattr__(self, "emulated", MappingProxyType(dict(self.emulated)))
        if any(to not in self.peak_ops for to in self.emulated.values()):
            raise ValueError(f"{self.name}: an emulated width must run on a width with a rate")
        if not (0 < self.compute_eff <= 1 and 0 < self.memory_eff <= 1):
            raise ValueError("efficiencies must lie in (0, 1]")
        if self.sms <= 0 or self.dram_bytes_s <= 0 or min(self.peak_ops.values()) <= 0:
            raise ValueError("peak rates and SM count must be positive")


def gpu_spec(arch: str | CudaArch | None = None) -> GpuSpec:
    """The roofline of a CUDA arch (default the T4's sm_75): its datasheet peaks from
    ``targets.CUDA_ARCHS``. Efficiencies and the 5 us launch cost are assumptions (typical
    of tuned TVM/cuDNN kernels), the same for every arch, not measured here."""
    row = arch if isinstance(arch, CudaArch) else cuda_arch(arch)
    return GpuSpec(name=row.gpu, peak_ops=row.peak_ops, dram_bytes_s=row.dram_gb_s * 1e9,
                   sms=row.sms, compute_eff=0.6, memory_eff=0.8, launch_s=5e-6,
                   emulated={} if row.int4_native else {4: 8})


def predicted_label(gpu: GpuSpec) -> str:
    """How a latency from ``gpu``'s model is labelled wherever it is shown."""
    return f"predicted ({gpu.name.removeprefix('NVIDIA ')} roofline model)"


T4 = gpu_spec("sm_75")
PREDICTED = predicted_label(T4)  # "predicted (T4 roofline model)"
