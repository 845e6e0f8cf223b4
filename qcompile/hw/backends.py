"""The targets qcompile compiles for, as one table of facts: ``BACKENDS[kind]``.

This is the ground floor every target-dependent stage reads instead of branching on the
target's kind. It holds facts only (names, TVM pipeline, where latencies come from, the
precisions the hardware runs, the GPU a cost summary quotes, how the manifest describes
the target and whether this machine can run it); each target's code (lowering rules,
codegen, machine-code checks) lives with its kernels in ``qcompile/targets/<kind>/`` and
is found by kind through ``targets.TARGETS``. Stages above choose by these facts:

    mixed/plan.py     latency_source -> the cost model ("measured" here, or "predicted")
    build/tune.py     no_tune
    cli/inspect_artifact.py  name -> the inspector

A new target is one entry here plus a package under ``qcompile/targets``. Importing this
module imports no TVM (the CLI validates options with it before any work).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from qcompile.errors import UsageError
from qcompile.hw.facts import (
    CUDA_TARGETS, PRECISIONS, Precisions, check_arch, cuda_arch, host_mcpu, target_arch)
from qcompile.hw.gpus import T4, GpuSpec, gpu_spec

if TYPE_CHECKING:  # the table is read before TVM is imported (CLI validation)
    import tvm
    from tvm.target import Target


@dataclass(frozen=True)
class Backend:
    """One target kind: its facts, and the functions that derive facts from a TVM target."""

    name: str                   # TVM's target kind, the manifest's target.kind
    names: tuple[str, ...]      # --target values that select it
    pipeline: str               # TVM's relax.backend.<pipeline> default passes
    latency_source: str         # "measured" (on this machine) or "predicted" (a model)
    # --target NAME, --arch, threads -> the TVM target (UsageError for a bad combination).
    target: Callable[[str, "str | None", "int | None"], "Target"]
    # arch -> the (weight, activation) bit pairs it runs and the allocator offers.
    precisions: Callable[["str | None"], Precisions]
    # The GPU whose roofline the artifact's cost summary quotes (the T4 for a CPU).
    reference_gpu: Callable[["Target"], GpuSpec]
    # target -> the manifest's target.str, and the other target.* fields.
    describe: Callable[["Target"], str]
    describe_json: Callable[["Target"], dict[str, Any]]
    # Why an artifact for this target cannot run on this machine (None: it can).
    cannot_run_here: Callable[["Target"], "str | None"]
    # None: --tune works; else why it is refused (checked before any work).
    no_tune: str | None = None

    def arch_of(self, target: "Target") -> str | None:
        """The target's ``arch`` attribute (CUDA), None where it has none."""
        arch = target.attrs.get("arch", None)
        return None if arch is None else str(arch)


# ======== llvm: this machine's CPU, latencies measured here.
def _cpu_target(name: str = "llvm", arch: str | None = None,
                num_threads: int | None = None) -> "tvm.target.Target":
    """This CPU, with the best ``-mcpu`` we detect (LLVM 22 rejects ``native``)."""
    import tvm  # heavy (seconds): the table is read without it

    check_arch(name, arch)
    spec: dict[str, Any] = {"kind": "llvm", "num-cores": num_threads or os.cpu_count() or 1}
    mcpu = host_mcpu()
    if mcpu:
        spec["mcpu"] = mcpu
    return tvm.target.Target(spec)


def _cpu_precisions(arch: str | None = None) -> Precisions:
    return PRECISIONS["llvm"]


def _cpu_describe(target: "Target") -> str:
    return "llvm" + (f" -mcpu={target.attrs['mcpu']}" if "mcpu" in target.attrs else "")


# ======== cuda: NVIDIA GPUs per --arch, built without a GPU, the arch's roofline model.
def _cuda_target(name: str = "cuda", arch: str | None = None,
                 num_threads: int | None = None) -> "tvm.target.Target":
    """The arch's TVM tag (or launch limits), with this CPU as the host."""
    import tvm  # heavy (seconds): the table is read without it

    row = cuda_arch(check_arch(name, arch))
    return tvm.target.Target(row.target_spec(), host=_cpu_target("llvm", None, num_threads))


def _cuda_precisions(arch: str | None = None) -> Precisions:
    """On an arch without int4 tensor cores (sm_90) the 4-bit choice buys size only."""
    return PRECISIONS["cuda" if cuda_arch(arch).int4_native else "cuda_int4_emulated"]


def _cuda_describe(target: "Target") -> str:
    row = target_arch(target)
    return f"cuda -arch={row.arch} ({row.gpu}; {row.arch} fatbin embedded)"


def _cuda_describe_json(target: "Target") -> dict[str, Any]:
    row = target_arch(target)
    return {"arch": row.arch, "gpu": row.gpu, "int4_tensor_cores": row.int4_native}


def _cuda_cannot_run_here(target: "Target") -> str | None:
    """The artifact holds one arch's SASS (no PTX): it runs on a GPU of that arch only."""
    import tvm  # heavy (seconds): the table is read without it

    arch = target_arch(target).arch
    dev = tvm.cuda()
    here = f"sm_{dev.compute_version.replace('.', '')}" if dev.exist else None
    if here == arch:
        return None
    return (f"no CUDA GPU on this machine to run the {arch} code" if here is None else
            f"this GPU is {here}, the artifact holds {arch} code only")


BACKENDS: dict[str, Backend] = {
    "llvm": Backend(
        name="llvm", names=("llvm",), pipeline="cpu_generic", latency_source="measured",
        target=_cpu_target, precisions=_cpu_precisions,
        reference_gpu=lambda target: T4, describe=_cpu_describe,
        describe_json=lambda target: {}, cannot_run_here=lambda target: None),
    "cuda": Backend(
        name="cuda", names=tuple(CUDA_TARGETS), pipeline="cuda", latency_source="predicted",
        target=_cuda_target, precisions=_cuda_precisions,
        reference_gpu=lambda target: gpu_spec(target_arch(target)), describe=_cuda_describe,
        describe_json=_cuda_describe_json, cannot_run_here=_cuda_cannot_run_here,
        # meta-schedule measures every candidate on the device
        no_tune="--tune supports --target llvm only: meta-schedule measures every candidate "
                "on the device, and CUDA artifacts are built without a GPU"),
}
TARGET_NAMES: tuple[str, ...] = tuple(n for b in BACKENDS.values() for n in b.names)


def backend(name: str) -> Backend:
    """The entry a ``--target`` value selects (``t4`` is ``cuda``); UsageError otherwise."""
    for b in BACKENDS.values():
        if name in b.names:
            return b
    raise UsageError(f"--target must be one of {', '.join(TARGET_NAMES)}; got {name!r}")


def backend_of(target: "Target") -> Backend:
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
    """``llvm`` (this CPU) or ``cuda`` (``arch`` from CUDA_ARCHS, default the T4's sm_75)
    as a TVM target."""
    return backend(name).target(name, arch, num_threads)


def precisions(target: "Target | str", arch: str | None = None) -> Precisions:
    """The precision table of a target (or target name, with ``arch`` for CUDA): on CUDA
    it depends on whether the arch has int4 tensor cores."""
    if isinstance(target, str):
        return backend(target).precisions(check_arch(target, arch))
    b = backend_of(target)
    return b.precisions(b.arch_of(target))
