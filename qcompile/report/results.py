"""The records the API returns: frozen, typed, each with ``to_json()`` for ``--json`` and
the manifest. The CLI reads their fields; nothing indexes a result by string."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

if TYPE_CHECKING:
    from qcompile.mixed.plan import Allocation


class _Record:
    """``to_json()``: the fields, less the ``OPTIONAL`` ones that are None (absent from the
    JSON, as they were when results were dicts)."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()  # type: ignore[call-overload]
                if not (k in self.OPTIONAL and v is None)}


@dataclass(frozen=True)
class Verified(_Record):
    """``compile``'s check of the written artifact against the NumPy oracle (the
    manifest's ``verified``): ``bit_exact`` None with ``skipped`` where it cannot run here."""

    inputs: int
    bit_exact: bool | None
    source: str                 # "calibration", "uniform" or "arrays"
    seconds: float | None = None
    skipped: str | None = None
    OPTIONAL = ("seconds", "skipped")


@dataclass(frozen=True)
class LayerDrop(_Record):
    """The layer whose SQNR falls most below its inputs' (the first such, in graph order)."""

    name: str
    op: str
    tensor: str
    sqnr_db: float
    input_sqnr_db: float
    drop_db: float


@dataclass(frozen=True)
class Fidelity(_Record):
    """The manifest's ``fidelity``: the quantized graph against onnxruntime FP32."""

    samples: int
    source: str
    sqnr_db: float
    top1_agreement: float
    min_sqnr_db: float
    sharpest_drop: LayerDrop | None = None
    layer_samples: int = 0
    OPTIONAL = ("sharpest_drop",)

    @property
    def ok(self) -> bool:
        return self.min_sqnr_db <= 0 or self.sqnr_db >= self.min_sqnr_db

    def line(self) -> str:
        """One line for the CLI, the card and the error."""
        s = (f"output SQNR {self.sqnr_db:.1f} dB, top-1 agreement {self.top1_agreement:.0%} "
             f"vs onnxruntime FP32 on {self.samples} {self.source}")
        d = self.sharpest_drop
        if d is not None:
            s += (f"; sharpest drop at {d.name!r} ({d.op}): {d.input_sqnr_db:.1f} -> "
                  f"{d.sqnr_db:.1f} dB")
        return s


@dataclass(frozen=True)
class CompileResult:
    out_dir: Path
    compile_seconds: float
    integer_only: bool
    num_layers: int
    verified: Verified | None = None  # None: --no-verify
    fidelity: Fidelity | None = None  # None: no guard (--fidelity-samples 0)


@dataclass(frozen=True)
class LayerFidelity:
    name: str
    tensor: str
    op: str
    sqnr_db: float


@dataclass(frozen=True)
class EvalResult(_Record):
    """An artifact against onnxruntime FP32 and the NumPy oracle (``qcompile eval``)."""

    bit_exact: bool
    integer_only: bool
    top1_agreement: float       # per sample: share of output positions whose argmax agrees
    sqnr_db: float
    num_samples: int
    data: str
    layers: tuple[LayerFidelity, ...]
    accuracy: float | None = None        # with labels
    float_accuracy: float | None = None  # the FP32 model's, with labels
    OPTIONAL = ("accuracy", "float_accuracy")


@dataclass(frozen=True)
class BenchResult(_Record):
    """trtexec-style latency of ``batch`` inputs over ``repeat`` timed runs, in ms."""

    median_ms: float
    min_ms: float
    max_ms: float
    mean_ms: float
    p90_ms: float
    p99_ms: float
    batch: int
    repeat: int
    throughput_ips: float
    threads: int | None = None  # TVM_NUM_THREADS in effect (None: not a TVM run)
    OPTIONAL = ("threads",)

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any], threads: int | None = None
                     ) -> "BenchResult":
        """From ``loader.summarize_ms`` (which the runtime-only bundles share)."""
        return cls(**summary, threads=threads)


@dataclass(frozen=True)
class ParetoResult:
    """The budget sweep ``allocate --pareto`` wrote."""

    kind: str
    points: int
    json: Path
    markdown: Path
    plots: tuple[Path, ...]
    plots_skipped: str | None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "points": self.points, "json": str(self.json),
                "markdown": str(self.markdown), "plots": [str(p) for p in self.plots],
                "plots_skipped": self.plots_skipped}


@dataclass(frozen=True)
class AllocateResult:
    """The plan ``compile`` would use (``qcompile allocate``)."""

    model: str
    target: str
    batch: int
    allocation: "Allocation"
    pareto: ParetoResult | None = None

    def to_json(self) -> dict[str, Any]:
        out = self.allocation.to_json()
        out.update(model=self.model, target=self.target, batch=self.batch)
        if self.pareto is not None:
            out["pareto"] = self.pareto.to_json()
        return out
