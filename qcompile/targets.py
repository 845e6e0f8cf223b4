"""Hardware facts as tables, and the TVM targets built from them."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import tvm

from .errors import UsageError


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
        "sm_75 IMMA 8832 runs W4A4 at twice the INT8 rate; W4A8 runs as IMMA 8816 with "
        "4-bit weights, no faster than W8A8, so W4A4 dominates it at equal Omega"),
}


def precisions(target: tvm.target.Target | str) -> Precisions:
    """The precision table of a target (or target kind name)."""
    kind = target if isinstance(target, str) else target.kind.name
    return PRECISIONS["cuda" if kind in CUDA_TAGS or kind == "cuda" else "llvm"]


# `--target NAME` aliases -> TVM target dicts / tags.
CUDA_TAGS: dict[str, str] = {"cuda": "nvidia/nvidia-t4", "t4": "nvidia/nvidia-t4"}


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    vendor, flags = "", set()
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


def make_target(name: str = "llvm", num_threads: int | None = None) -> tvm.target.Target:
    """``llvm`` (this CPU) or ``cuda`` (the T4, sm_75) as a TVM target."""
    if name == "llvm":
        spec = {"kind": "llvm", "num-cores": num_threads or os.cpu_count() or 1}
        mcpu = host_mcpu()
        if mcpu:
            spec["mcpu"] = mcpu
        return tvm.target.Target(spec)
    if name in CUDA_TAGS:
        return tvm.target.Target(CUDA_TAGS[name], host=make_target("llvm"))
    raise UsageError(f"--target must be one of llvm, {', '.join(CUDA_TAGS)}; got {name!r}")
