"""``Backend``: what qcompile needs to know about one TVM target kind, as one record."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Mapping, Sequence

if TYPE_CHECKING:  # the table is read before TVM is imported (CLI validation)
    from tvm.target import Target

    from ..asmcheck import AsmReport
    from ..bitplan import CostModel
    from ..config import QuantSpec
    from ..costs import GpuSpec
    from ..graph import Graph
    from ..intcheck import IntCheckReport
    from ..lower import FuseRule, Lowered, Rule
    from ..quantize import Observer
    from ..schedule_cuda import DeviceCode
    from ..targets import Precisions


@dataclass(frozen=True)
class Backend:
    """One target kind: its facts, and the functions every target-dependent stage calls.

    The functions (``HOOKS``) are those of the backend's own module (``backends/llvm.py``,
    ``backends/cuda.py``), gathered by ``from_module``; each imports what it needs when
    called, so reading the table (and validating options with it) costs no TVM import.
    """

    name: str                   # TVM's target kind, the manifest's target.kind
    names: tuple[str, ...]      # --target values that select it
    pipeline: str               # TVM's relax.backend.<pipeline> default passes
    latency_source: str         # "measured" (on this machine) or "predicted" (a model)
    # --target NAME, --arch, threads -> the TVM target (UsageError for a bad combination).
    target: Callable[[str, "str | None", "int | None"], "Target"]
    # batch, target -> lowering rules tried before the generic ones (lower.py).
    rules: Callable[[int, "Target"], "Sequence[tuple[str, Rule | FuseRule]]"]
    # build.py's target-specific parts: dlight rules after legalization (GPU: every
    # PrimFunc must be bound to threads); the context code generation runs in, given the
    # arch (CUDA: nvcc embeds that arch's binaries), yielding what it embedded; and the
    # machine-code check of the compiled executable (x86 asm, or SASS).
    schedule_rules: Callable[[], list[Any]]
    codegen: Callable[["Target", "str | None"], "ContextManager[DeviceCode | None]"]
    check_code: Callable[["IntCheckReport", Any, "DeviceCode | None", "Target"], None]
    # The same proof on the exported library that ships (shipcheck.prove_shipped): its
    # path and the core's PrimFuncs -> one scan report per kind of code it holds.
    check_shipped: Callable[[Path, list[str]], "list[AsmReport]"]
    # What the allocator budgets against: per-layer latency per width (latency_source).
    cost_model: Callable[["CostInputs"], "CostModel"]
    # arch -> the (weight, activation) bit pairs it runs and the allocator offers.
    precisions: Callable[["str | None"], "Precisions"]
    # The GPU whose roofline the artifact's cost summary quotes (the T4 for a CPU).
    reference_gpu: Callable[["Target"], "GpuSpec"]
    # target -> the manifest's target.str, and the other target.* fields.
    describe: Callable[["Target"], str]
    describe_json: Callable[["Target"], dict[str, Any]]
    # Manifest fields of the lowered module ("tensor_cores" on CUDA).
    manifest: Callable[["Lowered", "Target"], dict[str, Any]]
    # Why an artifact for this target cannot run on this machine (None: it can).
    cannot_run_here: Callable[["Target"], "str | None"]
    # An artifact folder and its manifest -> the ``inspect`` report.
    inspect: Callable[[Path, Mapping[str, Any]], dict[str, Any]]
    # None: --tune works; else why it is refused (checked before any work).
    no_tune: str | None = None

    @classmethod
    def from_module(cls, module: ModuleType, **facts: Any) -> "Backend":
        """The entry whose hooks are ``module``'s functions of the same names (a missing
        one fails at import) and whose name is the module's."""
        hooks = {h: getattr(module, h) for h in HOOKS}
        return cls(name=module.__name__.rsplit(".", 1)[-1], **hooks, **facts)

    def arch_of(self, target: "Target") -> str | None:
        """The target's ``arch`` attribute (CUDA), None where it has none."""
        arch = target.attrs.get("arch", None)
        return None if arch is None else str(arch)


HOOKS: tuple[str, ...] = tuple(
    f.name for f in fields(Backend)
    if f.name not in ("name", "names", "pipeline", "latency_source", "no_tune"))


@dataclass(frozen=True)
class CostInputs:
    """What a latency source may use: the prepared graph, its model bytes (cache keys),
    the calibration statistics and quantization (to build the real kernels), the target,
    the batch and whether to show progress."""

    graph: "Graph"
    model_bytes: bytes
    stats: "Mapping[str, Observer]"
    quant: "QuantSpec"
    target: "Target"
    batch: int = 1
    progress: bool = False

