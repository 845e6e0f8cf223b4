"""Hardware facts as tables, and the TVM targets built from them."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from qcompile.errors import UsageError

if TYPE_CHECKING:  # TVM is imported on use: the CLI validates --target/--arch without it
    import tvm


@dataclass(frozen=True)
class CpuModel:
    """An LLVM -mcpu value and the /proc/cpuinfo flags and vendor that select it."""

    mcpu: str
    vendor: str  # "" matches any vendor
    flags: frozenset[str]


# First match wins; bundled LLVM 22 rejects mcpu=native, so we detect ourselves.
CPU_MODELS: tuple[CpuModel, ...] = (
    CpuModel("znver4", "AuthenticAMD", frozenset({"avx512f", "avx512_vnni", "avx512_bf16"})),
    CpuModel("sapphirerapids", "GenuineIntel", frozenset({"avx512_vnni", "amx_int8"})),
    CpuModel("cascadelake", "", frozenset({"avx512f", "avx512_vnni"})),
    CpuModel("skylake-avx512", "", frozenset({"avx512f", "avx512bw"})),
    CpuModel("znver2", "AuthenticAMD", frozenset({"avx2"})),
    CpuModel("haswell", "", frozenset({"avx2", "fma"})),
)

@dataclass(frozen=True)
class Precisions:
    """Which (weight, activation) bit pairs a target runs, and which the allocator offers.

    ``allocator`` maps each weight width the ILP chooses between to the pair it runs as.
    HAWQ-V3's Omega measures the weight perturbation only, so of two pairs with the same
    weight width the allocator offers the one the hardware makes at least as fast with the
    wider activation: the other is dominated (same Omega, no better latency or size)."""

    supported: tuple[str, ...]
    allocator: dict[int, str]
    why: str


PRECISIONS: dict[str, Precisions] = {
    "llvm": Precisions(
        ("w8a8", "w4a8", "w4a4"), {8: "w8a8", 4: "w4a8"},
        "VNNI vpdpbusd multiplies bytes: 4-bit weights halve the weight bytes (unpacked "
        "in-kernel), 4-bit activations buy no speed, so W4A4 is dominated by W4A8"),
    "cuda": Precisions(
        ("w8a8", "w4a8", "w4a4"), {8: "w8a8", 4: "w4a4"},
        "IMMA 8832 runs W4A4 at twice the INT8 rate; W4A8 runs as IMMA 8816 with "
        "4-bit weights, no faster than W8A8, so W4A4 dominates it at equal Omega"),
    # sm_90: the same pairs, but the 4-bit choice buys size only (the cost model gives it
    # the W8A8 time). W4A4 stays the 4-bit pair: its weights are stored packed, while a
    # W4A8 layer runs the int8 kernel with int8-stored weights and would buy nothing.
    "cuda_int4_emulated": Precisions(
        ("w8a8", "w4a8", "w4a4"), {8: "w8a8", 4: "w4a4"},
        "no int4 tensor cores: ptxas emulates int4 mma on int8 IMMA (a CALL to "
        "__cuda_sm_9x_mma_sub_byte_internal_*), so W4A4 is modelled no faster than W8A8 "
        "and buys size only (packed 4-bit weights)"),
}


# ======== CUDA architectures: one row per --arch, the facts every CUDA stage reads.

_SHAPE = re.compile(r"m\d+n\d+k\d+")
# Launch limits for an arch TVM has no tag for: those of TVM's own sm_86/sm_89 tags
# (nvidia/nvidia-a10, nvidia/geforce-rtx-4090), which every arch here shares.
CUDA_LIMITS: Mapping[str, int] = {"max_threads_per_block": 1024, "max_num_threads": 1024,
                                  "max_shared_memory_per_block": 49152,
                                  "thread_warp_size": 32, "registers_per_block": 65536}


@dataclass(frozen=True)
class CudaArch:
    """One ``--arch``: the GPU the cost model stands it for, its TVM target, its tensor-core
    shapes and the datasheet rates of the roofline (``gpus.gpu_spec``).

    Rates are *dense* tensor-core peaks in T(FL)OPS: NVIDIA's datasheets for A100, A10, L4
    and H100 headline 2:4-sparse figures (marked *), twice the dense ones used here.
    ``int4_tops`` is None where the arch has no int4 tensor cores: int4 ``mma`` still
    compiles there, but ptxas emulates it on the int8 units (``int4_native`` False).
    Shapes are PTX ``mma.sync`` shapes (PTX ISA, "Matrix shape" table) per operand type.
    """

    arch: str
    gpu: str
    tag: str | None  # TVM target tag; None: built from CUDA_LIMITS
    sms: int
    int8_tops: float
    int4_tops: float | None
    fp16_tflops: float
    fp32_tflops: float  # CUDA cores (no tensor-core FP32): the FP32 baseline
    dram_gb_s: float
    mma_int8: tuple[str, ...]
    mma_int4: tuple[str, ...]
    mma_fp16: tuple[str, ...]

    def __post_init__(self) -> None:
        if not re.fullmatch(r"sm_\d+", self.arch):
            raise ValueError(f"{self.gpu}: arch must look like sm_75, got {self.arch!r}")
        rates = (self.int8_tops, self.fp16_tflops, self.fp32_tflops, self.dram_gb_s, self.sms)
        if min(rates) <= 0 or (self.int4_tops is not None and self.int4_tops <= 0):
            raise ValueError(f"{self.arch}: rates, bandwidth and SM count must be positive")
        for shapes in (self.mma_int8, self.mma_int4, self.mma_fp16):
            if not shapes or not all(_SHAPE.fullmatch(x) for x in shapes):
                raise ValueError(f"{self.arch}: mma shapes look like m8n8k16, got {shapes}")

    @property
    def sm(self) -> int:
        return int(self.arch[3:])

    @property
    def int4_native(self) -> bool:
        return self.int4_tops is not None

    @property
    def peak_ops(self) -> dict[int, float]:
        """Operand bits -> dense ops/s (16, 32: FP16 tensor cores, FP32 CUDA cores); no
        4-bit row where int4 is emulated."""
        out = {8: self.int8_tops * 1e12, 16: self.fp16_tflops * 1e12, 32: self.fp32_tflops * 1e12}
        if self.int4_tops is not None:
            out[4] = self.int4_tops * 1e12
        return out

    def target_spec(self) -> dict:
        """The TVM target dict: the tag with our arch (H100's tag says sm_90a, whose code runs
        on H100/H200 only; plain sm_90 is what we build), or the limits where no tag exists."""
        if self.tag:
            return {"tag": self.tag, "arch": self.arch}
        return {"kind": "cuda", "arch": self.arch, **CUDA_LIMITS}


_I8_75, _I4_75, _F16_75 = ("m8n8k16",), ("m8n8k32",), ("m16n8k8",)
_I8_80 = ("m8n8k16", "m16n8k16", "m16n8k32")  # sm_80+ (PTX ISA 7.0)
_I4_80 = ("m8n8k32", "m16n8k32", "m16n8k64")
_F16_80 = ("m16n8k8", "m16n8k16")
# Sources (dense figures; where a datasheet gives only sparse ones, halved):
#   T4: NVIDIA T4 datasheet: 130 INT8 / 260 INT4 TOPS, 65 FP16 TFLOPS, 8.1 FP32, 320 GB/s;
#       40 SMs (TU104 as shipped, e.g. sysrqmts.com/en/gpus/nvidia/tesla/t4).
#   A100: A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4): 624 / 1248 / 312 dense
#       (1248 / 2496 / 624 sparse*), 19.5 FP32; 40GB SXM4: 1555 GB/s (80GB: 2039), 108 SMs
#       (glennklockwood.com/garden/processors/A100).
#   A10: A10 datasheet: 250 INT8 / 500 INT4 TOPS, 125 FP16 TFLOPS dense (x2 sparse*),
#       600 GB/s (baseten.co A10 vs A10G); 72 SMs, 31.2 FP32 (GA102 as shipped, sysrqmts.com).
#   L4: L4 datasheet: 485 INT8 TOPS* and 242 FP16 TFLOPS*, sparse -> 242.5 / 121 dense;
#       300 GB/s; 30.3 FP32, 58 SMs (7424 CUDA cores). The datasheet gives no INT4 figure;
#       Ada keeps int4 tensor cores at 2x INT8 (Ada whitepaper, RTX 4090: 660.6 INT8 /
#       1321.2 INT4 TOPS), and sm_89 SASS shows native IMMA.8832, so 485 dense.
#   H100 SXM: H100 datasheet: 3958 INT8 TOPS* and 1979 FP16 TFLOPS* ("specifications 1/2
#       lower without sparsity") -> 1979 / 989.5 dense; no INT4 row (no int4 tensor cores);
#       67 FP32, 3350 GB/s HBM3, 132 SMs (glennklockwood.com/garden/processors/h100).
CUDA_ARCHS: dict[str, CudaArch] = {a.arch: a for a in (
    CudaArch("sm_75", "NVIDIA T4", "nvidia/nvidia-t4", 40, 130, 260, 65, 8.1, 320,
             _I8_75, _I4_75, _F16_75),
    CudaArch("sm_80", "NVIDIA A100", "nvidia/nvidia-a100", 108, 624, 1248, 312, 19.5, 1555,
             _I8_80, _I4_80, _F16_80),
    CudaArch("sm_86", "NVIDIA A10", "nvidia/nvidia-a10", 72, 250, 500, 125, 31.2, 600,
             _I8_80, _I4_80, _F16_80),
    CudaArch("sm_89", "NVIDIA L4", None, 58, 242.5, 485, 121, 30.3, 300,
             _I8_80, _I4_80, _F16_80),
    CudaArch("sm_90", "NVIDIA H100 SXM", "nvidia/nvidia-h100", 132, 1979, None, 989.5, 67,
             3350, _I8_80, _I4_80, _F16_80),
)}
DEFAULT_ARCH = "sm_75"
# `--target NAME` -> the arch it implies when --arch is not given ("t4": the T4, as before).
CUDA_TARGETS: dict[str, str] = {"cuda": DEFAULT_ARCH, "t4": "sm_75"}


def cuda_arch(arch: str | None = None) -> CudaArch:
    """The table row of ``arch`` (default sm_75); UsageError naming the valid ones."""
    key = arch or DEFAULT_ARCH
    if key not in CUDA_ARCHS:
        raise UsageError(f"--arch must be one of {', '.join(CUDA_ARCHS)}; got {key!r}")
    return CUDA_ARCHS[key]


def check_arch(target: str, arch: str | None) -> str | None:
    """Validate ``--target``/``--arch`` together, before any work: the arch a CUDA target
    builds for, None for llvm. UsageError for --arch without CUDA or an unknown arch."""
    if target not in CUDA_TARGETS:
        if arch is not None:
            raise UsageError(f"--arch {arch} needs --target cuda; --target {target} builds for "
                             "this CPU")
        return None
    implied = CUDA_TARGETS[target]
    if target != "cuda" and arch is not None and arch != implied:
        raise UsageError(f"--target {target} means {implied}; use --target cuda --arch {arch}")
    return cuda_arch(arch or implied).arch


def target_arch(target: "tvm.target.Target") -> CudaArch:
    """The table row of a CUDA TVM target (its ``arch`` attribute)."""
    return cuda_arch(str(target.attrs.get("arch", DEFAULT_ARCH)))


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    vendor, flags = "", set[str]()
    for line in text.splitlines():
        if line.startswith("vendor_id") and not vendor:
            vendor = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    return vendor, flags


def host_mcpu() -> str:
    """The best -mcpu for this machine from CPU_MODELS ('' for LLVM's generic)."""
    vendor, flags = _cpuinfo()
    for m in CPU_MODELS:
        if m.flags <= flags and (not m.vendor or m.vendor == vendor):
            return m.mcpu
    return ""


def cpu_flags() -> frozenset[str]:
    """This CPU's /proc/cpuinfo flags (empty where there is none)."""
    return frozenset(_cpuinfo()[1])


def has_vnni() -> bool:
    return "avx512_vnni" in cpu_flags()
