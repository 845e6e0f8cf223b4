"""Calibration: data readers -> float model in onnxruntime -> observers -> ranges.

Three parts, kept apart as in torch.ao: readers say *what data* flows in
(onnxruntime's ``get_next() -> dict | None`` protocol, so they also plug into
``onnxruntime.quantization``), observers say *how to measure* a tensor, and
``collect_stats`` runs the float model and feeds one observer per tensor.  What to
quantize, and at which bit-width, is decided by later stages calling
``Observer.threshold(signed, bits)``.
"""
from __future__ import annotations

import abc

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from qcompile.config import CalibSpec
from qcompile.errors import BadModelError, DataError, UsageError

from qcompile.quant.readers import Reader

# Degenerate tensors (all zero, or all negative when unsigned) get T = 1.0, not a tiny
# floor: their values quantize exactly at any scale, and 1.0 keeps the requant
# multipliers of the layers that write them in a representable range.
_DEGENERATE_T = 1.0
# The smallest clipping threshold: its scale T / qmax (qmax < 2^8) stays a normal float32,
# as the float entry and exit steps need.  No floor above that: a network's activations
# may sit at any magnitude (efficientnet_b0 with default BN statistics runs at 1e-10 by
# its middle stages), and an absolute floor above them rounds the whole tensor to 0.
MIN_THRESHOLD = float(np.finfo(np.float32).tiny) * 2.0 ** 8


def _finish(t: float, top: float) -> float:
    """The rule's threshold ``t``; where it is not positive (a percentile of a tensor that
    is 0 almost everywhere) the exact bound ``top``; the neutral 1.0 only for a tensor
    that is 0 everywhere (its range does not matter then: every value is the code 0)."""
    for v in (t, top):
        if np.isfinite(v) and v > 0:
            return max(float(v), MIN_THRESHOLD)
    return _DEGENERATE_T


class Observer(abc.ABC):
    """Measures one tensor, batch by batch. Every observer keeps the exact min and max."""

    def __init__(self) -> None:
        self.min = np.inf
        self.max = -np.inf
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        """Fold one batch of values in."""
        if x.size:  # np.minimum, unlike min(), lets a NaN through for collect_stats to see
            self.min = float(np.minimum(self.min, np.min(x)))
            self.max = float(np.maximum(self.max, np.max(x)))
            self.count += x.size

    def top(self, signed: bool) -> float:
        """The exact bound: max|x| (signed) or max(x) (unsigned)."""
        return max(-self.min, self.max) if signed else self.max

    @abc.abstractmethod
    def threshold(self, signed: bool, bits: int) -> float:
        """Clipping threshold T > 0 (finite); the quantizer uses scale = T / qmax with
        qmax = 2^(bits-1)-1 signed or 2^bits-1 unsigned."""


class MinMaxObserver(Observer):
    """Threshold = max|x| (signed) or max(x) (unsigned)."""

    @classmethod
    def from_spec(cls, spec: CalibSpec) -> "MinMaxObserver":
        return cls()

    def threshold(self, signed: bool, bits: int) -> float:
        if not self.count:
            return _DEGENERATE_T
        return _finish(self.top(signed), 0.0)


class _SampledObserver(Observer):
    """Exact min/max plus a uniform random subsample of at most ``max_samples`` values.

    Why a reservoir and not a histogram: percentile and MSE then work on real values
    (exact whenever a tensor has fewer than ``max_samples`` values, which is what the
    tests check), there is no bin range to re-grow as the max moves, and memory is
    bounded at 4 bytes x ``max_samples`` per tensor (4 MiB at the 2^20 default).
    It is Vitter's algorithm R, vectorised per batch, seeded for reproducibility.
    """

    def __init__(self, max_samples: int = 1 << 20, seed: int = 0) -> None:
        super().__init__()
        self.max_samples = max_samples
        self._rng = np.random.default_rng(seed)
        self._buf = np.empty(0, np.float32)
        self._cache: dict[tuple[bool, int], float] = {}

    def update(self, x: np.ndarray) -> None:
        seen = self.count
        super().update(x)
        self._cache.clear()
        flat = np.asarray(x, np.float32).reshape(-1)
        room = self.max_samples - len(self._buf)
        if room > 0:  # fill phase: keep everything
            self._buf = np.concatenate([self._buf, flat[:room]])
            seen, flat = seen + min(room, len(flat)), flat[room:]
        if len(flat):
            # item i (1-based stream index) replaces a random slot with prob cap / i;
            # float32 is ~6x faster than float64 here and its rounding of i is harmless
            u = self._rng.random(len(flat), dtype=np.float32)
            u *= np.arange(seen + 1, seen + 1 + len(flat), dtype=np.float32)
            take = np.flatnonzero(u < self.max_samples)
            self._buf[self._rng.integers(0, self.max_samples, len(take))] = flat[take]

    def threshold(self, signed: bool, bits: int) -> float:
        if not self.count:
            return _DEGENERATE_T
        key = (signed, bits)
        if key not in self._cache:
            self._cache[key] = _finish(self._threshold(signed, bits), self.top(signed))
        return self._cache[key]

    @abc.abstractmethod
    def _threshold(self, signed: bool, bits: int) -> float:
        """The observer's own rule, on the sampled values (cached by ``threshold``)."""


class PercentileObserver(_SampledObserver):
    """Threshold = the ``percentile`` of |x| (signed) or of x (unsigned)."""

    def __init__(self, percentile: float = 99.99, max_samples: int = 1 << 20,
                 seed: int = 0) -> None:
        super().__init__(max_samples, seed)
        self.percentile = percentile

    @classmethod
    def from_spec(cls, spec: CalibSpec) -> "PercentileObserver":
        return cls(spec.percentile, seed=spec.seed)

    def _threshold(self, signed: bool, bits: int) -> float:
        v = np.abs(self._buf) if signed else self._buf
        return float(np.percentile(v, self.percentile))


class MSEObserver(_SampledObserver):
    """Threshold minimising the MSE of round-to-nearest, clip-to-range quantization.

    Searches T = max * k / ``grid`` for k = 1..grid, so T never exceeds the minmax
    threshold. The integer range is the one ``quantize.py``'s QType uses: [-qmax-1, qmax]
    signed (so 4-bit codes reach -8), [0, qmax] unsigned (negatives simply clip to 0).
    """

    def __init__(self, grid: int = 100, max_samples: int = 1 << 20, seed: int = 0) -> None:
        super().__init__(max_samples, seed)
        self.grid = grid

    @classmethod
    def from_spec(cls, spec: CalibSpec) -> "MSEObserver":
        return cls(seed=spec.seed)

    def _threshold(self, signed: bool, bits: int) -> float:
        top = self.top(signed)
        if not np.isfinite(top) or top <= 0:
            return top
        # Searched on x / top, so the choice does not depend on the tensor's magnitude
        # (float32 squares of values near 1e-20 would underflow to 0 for every candidate).
        # Unsigned, values <= 0 quantize to 0 under every candidate: their error is a
        # constant that only drowns the differences in float32 rounding, so it is left out.
        a = (self._buf if signed else self._buf[self._buf > 0]) / np.float32(top)
        a = a.astype(np.float32)
        qmax = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
        qmin = np.float32(-qmax - 1 if signed else 0)
        cands = np.arange(1, self.grid + 1, dtype=np.float64) / self.grid
        buf = np.empty_like(a)
        errs = np.empty(len(cands))
        for i, t in enumerate(cands):
            s = np.float32(t / qmax)
            # in-place ops: no temporaries per candidate over a 2^20-value sample
            np.multiply(a, np.float32(1.0) / s, out=buf)
            np.rint(buf, out=buf)
            np.clip(buf, qmin, np.float32(qmax), out=buf)
            buf *= s
            buf -= a
            errs[i] = float(np.dot(buf, buf))
        k = int(np.argmin(errs)) + 1
        return float(top * k / self.grid)  # T = max * k / grid, rounded as documented


OBSERVERS: dict[str, Callable[[CalibSpec], Observer]] = {
    "minmax": MinMaxObserver.from_spec,
    "percentile": PercentileObserver.from_spec,
    "mse": MSEObserver.from_spec,
}


@dataclass(frozen=True)
class TensorStats:
    """What calibration measured for one tensor; ``observer`` answers threshold queries."""

    name: str
    min: float
    max: float
    observer: Observer

    def threshold(self, signed: bool, bits: int) -> float:
        return self.observer.threshold(signed, bits)


def to_stats(observers: dict[str, Observer]) -> dict[str, TensorStats]:
    """Freeze ``collect_stats`` output into typed records."""
    return {k: TensorStats(k, o.min, o.max, o) for k, o in observers.items()}


# ----------------------------------------------------------------------------- float runs


def _line(e: Exception) -> str:
    """First line of an error message: our errors promise a single line."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


class FloatRunner:
    """One onnxruntime session over a copy of ``model`` that also outputs ``tensors``.

    Graph optimizations are off so every named intermediate exists unchanged (fusion would
    rename or drop them). The caller's model is never touched.
    """

    def __init__(self, model: onnx.ModelProto, tensors: Sequence[str] = ()) -> None:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        g = m.graph
        inits = {i.name for i in g.initializer}
        inputs = [i for i in g.input if i.name not in inits]
        if len(inputs) != 1:
            raise BadModelError(f"expected one graph input, got {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        # a batch dim fixed to 1 forces sample-by-sample runs
        self.fixed_batch = dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") else 0
        self.graph_outputs = tuple(o.name for o in g.output)
        produced = {o for n in g.node for o in n.output}
        missing = [t for t in tensors if t not in produced and t != self.input_name]
        if missing:
            raise BadModelError(f"tensor(s) {missing} are not produced by any node of the model")
        self.tensors = tuple(dict.fromkeys(tensors))
        # extra outputs carry only the element type: a stale declared shape could clash
        elem = {v.name: v.type.tensor_type.elem_type for v in g.value_info}
        try:
            inferred = onnx.shape_inference.infer_shapes(m).graph.value_info
            elem.update({v.name: v.type.tensor_type.elem_type for v in inferred})
        except Exception:  # inference is a nicety here; FLOAT is the fallback
            pass
        for t in self.tensors:
            if t not in self.graph_outputs and t != self.input_name:
                g.output.append(onnx.helper.make_tensor_value_info(
                    t, elem.get(t) or onnx.TensorProto.FLOAT, None))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 4  # fatal only: failures are raised as one line
        try:
            self._sess = ort.InferenceSession(m.SerializeToString(), opts,
                                              providers=["CPUExecutionProvider"])
        except Exception as e:
            raise BadModelError(f"onnxruntime cannot load the model: {_line(e)}") from None
        self._fetch = [o.name for o in self._sess.get_outputs()]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Float values of the requested tensors and the graph outputs for batch ``x``."""
        x = np.ascontiguousarray(x, np.float32)
        b = self.fixed_batch
        if b and len(x) != b:
            # A model with a static batch B runs in chunks of B; the last chunk is padded
            # with copies of its last sample and the padding dropped again.
            parts = []
            for i in range(0, len(x), b):
                chunk = x[i:i + b]
                pad = b - len(chunk)
                if pad:
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
                parts.append({k: v[:b - pad] for k, v in self.run(chunk).items()})
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        try:
            vals = self._sess.run(self._fetch, {self.input_name: x})
        except Exception as e:
            raise DataError(f"onnxruntime failed on input of shape {x.shape}: "
                            f"{_line(e)}") from None
        out = dict(zip(self._fetch, vals))
        if self.input_name in self.tensors:
            out[self.input_name] = x
        return out


_LAST_RUNNER: list[tuple[tuple[int, int, tuple[str, ...]], onnx.ModelProto, FloatRunner]] = []


def run_float(model: onnx.ModelProto, x: np.ndarray, tensors: list[str]) -> dict[str, np.ndarray]:
    """Float values of ``tensors`` (plus the graph outputs) for input ``x``.

    Caches the last session, keyed by the model object, its size and the tensor list;
    for many calls on one model a ``FloatRunner`` held by the caller is the cheaper path.
    """
    key = (id(model), model.ByteSize(), tuple(tensors))
    if not _LAST_RUNNER or _LAST_RUNNER[0][0] != key:
        # the strong reference to ``model`` keeps its id from being reused while cached
        _LAST_RUNNER[:] = [(key, model, FloatRunner(model, tensors))]
    return _LAST_RUNNER[0][2].run(x)


def collect_stats(model: onnx.ModelProto, tensors: list[str], reader: Reader, method: str,
                  spec: CalibSpec, progress: bool = False) -> dict[str, Observer]:
    """Run every reader batch through the float model and return one ``method`` observer
    (see ``OBSERVERS``) per name in ``tensors``; the caller's model is not modified."""
    make = OBSERVERS.get(method)
    if make is None:
        raise UsageError(f"--calibrator must be one of {tuple(OBSERVERS)}, got {method!r}")
    runner = FloatRunner(model, tensors)
    observers = {t: make(spec) for t in runner.tensors}
    if hasattr(reader, "rewind"):  # ORT's own readers may lack it
        reader.rewind()
    total = len(reader) if hasattr(reader, "__len__") else None
    with tqdm(total=total, desc="calibrate", unit="sample", disable=not progress) as bar:
        while (batch := reader.get_next()) is not None:
            if runner.input_name not in batch:
                raise DataError(f"reader yields {sorted(batch)}, the model input is "
                                f"{runner.input_name!r}")
            vals = runner.run(batch[runner.input_name])
            for t, obs in observers.items():
                obs.update(vals[t])
                if obs.count and not (np.isfinite(obs.min) and np.isfinite(obs.max)):
                    raise DataError(f"tensor {t!r} has NaN/inf values on calibration data")
            bar.update(len(batch[runner.input_name]))
    return observers
