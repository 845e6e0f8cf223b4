"""speedup.py's configuration: what is compared (the peers' labels, qcompile's configurations)
and how long each is timed. Read by the measurement (speedup.py) and its report
(speedup_report.py), which import this module and never each other's."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ORT_FP32, ORT_INT8, TVM_FP32 = "ORT FP32", "ORT INT8", "TVM FP32"
Q_INT8, Q_INT4 = "qcompile INT8", "qcompile INT4"


@dataclass(frozen=True)
class QConfig:
    """One qcompile configuration: uniform bits, or a relative latency budget ``alpha``."""

    key: str
    bits: int = 8
    alpha: float | None = None

    def specs(self, sensitivity: str, samples: int) -> dict[str, Any]:
        from qcompile.config import AllocSpec, QuantSpec
        alloc = (AllocSpec(latency=f"{self.alpha:g}", sensitivity=sensitivity,
                           sensitivity_samples=samples) if self.alpha is not None else AllocSpec())
        return {"quant": QuantSpec(bits=self.bits), "alloc": alloc}


def qconfigs(alphas: list[float]) -> list[QConfig]:
    mixed = [QConfig(f"qcompile mixed α={a:g}", alpha=a) for a in sorted(alphas, reverse=True)]
    return [QConfig(Q_INT8, 8), *mixed, QConfig(Q_INT4, 4)]


def alone_runs(batch: int, quick: bool = False) -> int:
    """Default timed runs per block at ``batch``: 30 at batch 1, 10 above (quick: 5/3)."""
    return (5 if batch == 1 else 3) if quick else (30 if batch == 1 else 10)



@dataclass
class Settings:
    batches: list[int]
    fp32_batches: list[int]
    repeat: int
    fp32_every: int
    calib_n: int
    eval_n: int
    alphas: list[float]
    target: str
    sensitivity: str
    sens_samples: int
    input_size: int | None
    cfgs: list[QConfig] = field(default_factory=list)
    alone_runs: dict[int, int] = field(default_factory=dict)  # batch -> timed runs per block
    alone_warmup: int = 5
    alone_passes: int = 1
    interleaved: bool = True
    quick: bool = False

    def runs_alone(self, batch: int) -> int:
        return self.alone_runs.get(batch) or alone_runs(batch, self.quick)

    def steps(self) -> int:
        n = 2 + len(self.fp32_batches)
        for b in self.batches:  # compile + evaluate, blocks (ORT FP32/INT8, TVM FP32, ours), rounds
            blocks = (2 + (b in self.fp32_batches) + len(self.cfgs)) * self.alone_passes
            n += 2 * len(self.cfgs) + blocks + (self.repeat if self.interleaved else 0)
        return n
