"""``Backend``: what qcompile needs to know about one TVM target kind, as one record."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

if TYPE_CHECKING:  # the table is read before TVM is imported (CLI validation)
    import tvm

    from ..bitplan import CostModel
    from ..build import Built
    from ..config import QuantSpec
    from ..costs import GpuSpec
    from ..graph import Graph
    from ..lower import Lowered, Rule
    from ..quantize import Observer
    from ..targets import Precisions

    Target = tvm.target.Target


@dataclass(frozen=True)
class Backend:
    """One target kind: the functions every target-dependent stage calls.

    Each callable imports what it needs when called, so reading the table (and
    validating options with it) costs no TVM import.
    """

    name: str                   # TVM's target kind, the manifest's target.kind
    names: tuple[str, ...]      # --target values that select it
    pipeline: str               # TVM's relax.backend.<pipeline> default passes
    # --target NAME, --arch, threads -> the TVM target (UsageError for a bad combination).
    target: Callable[[str, "str | None", "int | None"], "Target"]
    # batch, target -> lowering rules tried before the generic ones (lower.py).
    rules: Callable[[int, "Target"], "list[tuple[str, Rule]]"]
    # A lowered Relax module -> legalized, integer-only-checked, compiled (build.py).
    build: Callable[..., "Built"]
    # What the allocator budgets against: per-layer latency per width, and its source.
    cost_model: Callable[["CostInputs"], "CostModel"]
    latency_source: str         # "measured" (on this machine) or "predicted" (a model)
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

    def arch_of(self, target: "Target") -> str | None:
        """The target's ``arch`` attribute (CUDA), None where it has none."""
        arch = target.attrs.get("arch", None)
        return None if arch is None else str(arch)


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

