"""Frozen, validated configuration records shared by the pipeline stages."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import numpy as np

from qcompile.errors import UsageError

def parse_shape(text: str) -> tuple[int, ...]:
    """``1x3x224x224`` (or with commas) -> (1, 3, 224, 224); UsageError otherwise."""
    parts = [p for p in text.replace(",", "x").lower().split("x")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"--input-shape takes dimensions like 1x3x224x224, got {text!r}") from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape dimensions must be positive, got {text!r}")
    return dims


CALIBRATORS: tuple[str, ...] = ("minmax", "percentile", "mse")
# The names of quant.rounding.ROUNDINGS (the methods themselves), for the layers that
# cannot import quant: this ground floor and the CLI's choices, which would load GPTQ's
# onnx/onnxruntime at startup. tests/quant/test_rounding.py keeps the two equal.
ROUNDINGS: tuple[str, ...] = ("nearest", "gptq")
# "auto" picks what measured best (benchmarks/results/quality-*.md) for the data at hand:
# with real calibration data mse ranges and GPTQ rounding, with synthetic data (a smoke
# test: its ranges say nothing about real inputs) minmax and round-to-nearest.
AUTO = "auto"
LAYOUTS: tuple[str, ...] = ("NCHW", "NHWC")
#: Inputs ``compile`` runs through the written artifact and the NumPy oracle (--no-verify: 0).
VERIFY_INPUTS = 2


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes the model's float input.

    Images are decoded as RGB, resized so the short side is ``resize``
    (``size`` when 0), centre-cropped to ``size``, scaled to [0, 1] when
    ``scale01`` and then normalised ``(x - mean) / std`` per channel.
    """

    size: int = 224
    resize: int = 0
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    layout: str = "NCHW"
    scale01: bool = True
    grayscale: bool = False
    # The model input's full static shape when the model leaves some of it symbolic
    # (``--input-shape 1x3x224x224``); its batch entry is ignored, ``--batch`` rules.
    input_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.input_shape is not None:
            if not self.input_shape or any(int(d) <= 0 for d in self.input_shape):
                raise UsageError(f"--input-shape needs positive dimensions, got {self.input_shape}")
            object.__setattr__(self, "input_shape", (1,) + tuple(int(d) for d in self.input_shape[1:]))
        if self.size <= 0:
            raise UsageError(f"--size must be positive, got {self.size}")
        if self.layout not in LAYOUTS:
            raise UsageError(f"--layout must be one of {LAYOUTS}, got {self.layout!r}")
        if len(self.mean) != len(self.std) or any(s == 0 for s in self.std):
            raise UsageError("--mean and --std need the same length and a non-zero std")


@dataclass(frozen=True)
class CalibSpec:
    """Where calibration data comes from and how ranges are measured."""

    source: str = "synthetic"  # a directory, or "synthetic"
    method: str = AUTO
    num_samples: int = 32
    batch_size: int = 8
    percentile: float = 99.99
    seed: int = 0
    preprocess: Preprocess = field(default_factory=Preprocess)

    def __post_init__(self) -> None:
        if self.method not in CALIBRATORS + (AUTO,):
            raise UsageError(f"--calibrator must be one of {CALIBRATORS}, got {self.method!r}")
        if self.num_samples <= 0 or self.batch_size <= 0:
            raise UsageError("--calib-samples and batch size must be positive")
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"--percentile must be in (50, 100], got {self.percentile}")


#: compile's fidelity floor (output SQNR against onnxruntime FP32, dB). An output that is
#: all zeros, or constant, scores 0 dB; noise as strong as the signal scores 0 dB too.
#: The lowest held-out SQNR over the 56 corpus models that compile (INT8, synthetic
#: calibration, 8 held-out samples; benchmarks/results/corpus-2026-12-08) is 4.2 dB
#: (efficientnet_b0 with seeded BN statistics); on another 8 samples the same model
#: scored 5.2 dB. 2 dB refuses a dead network and leaves that model twice the spread.
MIN_SQNR_DB = 2.0
#: Held-out samples the guard runs by default (output metrics on all, layers on 2).
FIDELITY_SAMPLES = 8


@dataclass(frozen=True)
class FidelitySpec:
    """compile's fidelity guard: ``samples`` held-out inputs (0: not measured) and the
    output SQNR floor in dB (0: measured and recorded, never refused)."""

    min_sqnr_db: float = MIN_SQNR_DB
    samples: int = FIDELITY_SAMPLES

    def __post_init__(self) -> None:
        if not np.isfinite(self.min_sqnr_db) or self.min_sqnr_db < 0:
            raise UsageError(f"--min-sqnr must be a finite number >= 0 (dB), got "
                             f"{self.min_sqnr_db}")
        if self.samples < 0:
            raise UsageError(f"--fidelity-samples must be >= 0, got {self.samples}")


WIDTHS: tuple[int, ...] = (4, 8)


def precision(value: int | str | tuple[int, int], option: str = "bits"
              ) -> tuple[int, int]:
    """(weight bits, activation bits) of a layer precision: 8 or "8" (W8A8), 4 (W4A4, as
    HAWQ-V3: a width applies to weights and input activation), "w4a8", or a pair."""
    if isinstance(value, tuple):
        w, a = value
    elif isinstance(value, (int, np.integer)) or str(value).isdigit():
        w = a = int(value)
    else:
        m = re.fullmatch(r"w(\d+)a(\d+)", str(value).strip().lower())
        if m is None:
            raise UsageError(f"{option} takes 8, 4, w8a8, w4a8 or w4a4; got {value!r}")
        w, a = int(m.group(1)), int(m.group(2))
    if w not in WIDTHS or a not in WIDTHS or a < w:
        raise UsageError(f"{option}: {value!r} is not a supported precision; use 8, 4, "
                         "w8a8, w4a8 or w4a4")
    return int(w), int(a)


def precision_name(value: int | str | tuple[int, int]) -> str:
    """The canonical spelling "w<W>a<A>"."""
    w, a = precision(value)
    return f"w{w}a{a}"


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how: uniform bit-width today, per-layer plans later."""

    bits: int | str = 8  # 8, 4 (= W4A4), or a pair "w8a8" / "w4a8" / "w4a4"
    first_last_bits: int | str = 8  # precision of the first conv and the last dense
    equalize: bool = False  # cross-layer equalization + bias absorption (equalize.py)
    bias_correction: bool = False  # empirical bias correction of the int32 biases
    # How weights become integers: "nearest" rounds each weight on its own; "gptq" is
    # Hessian-aware (GPTQ/OBQ on the calibration inputs, see gptq.py).
    rounding: str = AUTO

    def __post_init__(self) -> None:
        for b in (self.bits, self.first_last_bits):
            precision(b, "--bits")  # validates
        if self.rounding not in ROUNDINGS + (AUTO,):
            raise UsageError(f"--rounding must be one of {ROUNDINGS}, got {self.rounding!r}")

    @property
    def pair(self) -> tuple[int, int]:
        """(weight bits, activation bits) of the layers between the first and the last."""
        return precision(self.bits)


SENSITIVITY_METHODS: tuple[str, ...] = ("hessian", "kl")


@dataclass(frozen=True)
class AllocSpec:
    """Mixed precision: budgets (absolute like ``6ms``/``15MB``/``100G``, or a relative
    alpha in [0, 1] between all-INT4 and all-INT8), pins and the sensitivity measure.
    No budget means no allocation: the uniform ``QuantSpec`` bits apply."""

    latency: str | None = None
    size: str | None = None
    bops: str | None = None
    pins: tuple[str, ...] = ()
    sensitivity: str = "hessian"
    sensitivity_samples: int = 8
    pin_first: int | None = 8
    pin_last: int | None = 8

    def __post_init__(self) -> None:
        if self.sensitivity not in SENSITIVITY_METHODS:
            raise UsageError(f"--sensitivity must be one of {SENSITIVITY_METHODS}, "
                             f"got {self.sensitivity!r}")
        if self.sensitivity_samples <= 0:
            raise UsageError("--sensitivity-samples must be positive")

    @property
    def active(self) -> bool:
        return any(b is not None for b in (self.latency, self.size, self.bops))


def resolve_auto(calib: CalibSpec, quant: QuantSpec | None = None
                 ) -> tuple[CalibSpec, QuantSpec | None]:
    """``auto`` calibrator and rounding made concrete (see ``AUTO``)."""
    real = calib.source != "synthetic"
    if calib.method == AUTO:
        calib = replace(calib, method="mse" if real else "minmax")
    if quant is not None and quant.rounding == AUTO:
        quant = replace(quant, rounding="gptq" if real else "nearest")
    return calib, quant
