"""Fidelity against the float model: the measure ``eval`` reports and ``compile``'s guard.

Bit-exactness proves that the compiled module agrees with the NumPy oracle; it says
nothing about the model. This module compares the quantized graph with onnxruntime FP32
on the same inputs: output SQNR, top-1 agreement, and per-layer SQNR, from which it finds
the layer where fidelity first falls most sharply (the one to blame, and to pin).

``compile`` runs :func:`measure` on inputs calibration never saw (:func:`hold_out`) and
refuses an artifact whose output SQNR is under ``FidelitySpec.min_sqnr_db``
(``FidelityError``, nothing written).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx

from qcompile.verify import oracle
from qcompile.quant.calibrate import FloatRunner
from qcompile.config import CalibSpec, FidelitySpec
from qcompile.errors import FidelityError
from qcompile.ir.qgraph import QGraph
from qcompile.quant.readers import SyntheticReader, open_source
from qcompile.report.results import Fidelity, LayerDrop

#: Per-layer SQNR is capped here: an exact tensor (a max-pool of exact values, a
#: reshape) has infinite SQNR, and a drop from infinity would always look sharpest.
SQNR_CAP_DB = 80.0


def sqnr_db(signal: float, noise: float) -> float:
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(max(signal, 1e-30) / noise))


@dataclass
class Tally:
    """Running sums over batches: signal and error energy per tensor, argmax agreement."""

    sig: dict[str, float] = field(default_factory=dict)
    err: dict[str, float] = field(default_factory=dict)
    agree: float = 0.0
    samples: int = 0

    def add(self, name: str, ref: np.ndarray, got: np.ndarray) -> None:
        f = ref.astype(np.float64)
        self.sig[name] = self.sig.get(name, 0.0) + float((f ** 2).sum())
        self.err[name] = self.err.get(name, 0.0) + float(((f - got) ** 2).sum())

    def add_layers(self, qg: QGraph, fl: dict[str, np.ndarray], ints: dict[str, np.ndarray],
                   names: Iterable[str]) -> None:
        """Each named tensor's float value against the oracle's integers, dequantized."""
        for name in names:
            if name in fl and name in ints:
                self.add(name, fl[name], qg.tensors[name].dequantize(ints[name]))

    def add_output(self, y_float: np.ndarray, y_q: np.ndarray, name: str) -> None:
        """The output tensor, and per sample the fraction of output positions (1 for
        logits) whose argmax over axis 1 agrees."""
        self.add(name, y_float, y_q)
        same = (y_float.argmax(1) == y_q.argmax(1)).reshape(len(y_float), -1)
        self.agree += float(same.mean(axis=1).sum())
        self.samples += len(y_float)

    def sqnr(self, name: str) -> float:
        return sqnr_db(self.sig[name], self.err[name])


def _cap(v: float) -> float:
    return min(v, SQNR_CAP_DB)


def sharpest_drop(qg: QGraph, tally: Tally, input_sqnr: float) -> LayerDrop | None:
    """The node whose SQNR falls furthest below the worst of its inputs' (graph order
    breaks ties, so the first collapse is named, not its echoes downstream)."""
    known = {qg.input.name: _cap(input_sqnr)}
    best: LayerDrop | None = None
    for n in qg.nodes:
        if n.output not in tally.sig:
            continue
        ins = [known[i] for i in n.inputs if i in known]
        own = _cap(tally.sqnr(n.output))
        known[n.output] = own
        if not ins:
            continue
        drop = min(ins) - own
        if best is None or drop > best.drop_db:
            best = LayerDrop(n.name, n.op, n.output, round(own, 2), round(min(ins), 2),
                             round(drop, 2))
    return best


def input_sqnr(qg: QGraph, x: np.ndarray) -> float:
    """SQNR of the float entry step alone (quantize, then dequantize the input)."""
    t = Tally()
    t.add(qg.input.name, x, qg.input.dequantize(oracle.quantize_input(qg, x)))
    return t.sqnr(qg.input.name)


def measure(proto: onnx.ModelProto, qg: QGraph, x: np.ndarray, source: str, *,
            min_sqnr_db: float, run_core: Callable[[np.ndarray], np.ndarray] | None = None,
            layer_samples: int = 2, layers: bool = True) -> Fidelity:
    """Output SQNR and top-1 agreement of ``qg`` on every sample of ``x``, and the layer
    of the sharpest drop from per-layer SQNR on the ``layer_samples`` of them whose output
    error is largest.

    ``run_core`` runs the compiled integer core on quantized inputs (bit-exact with the
    oracle once verified, and much faster); without it the oracle runs everything.
    ``layers=False`` skips the per-layer pass (its tensors are not comparable, e.g. after
    equalization rescaled them)."""
    q = oracle.quantize_input(qg, x)
    y_int = run_core(q) if run_core is not None else oracle.run_integer(qg, q)["output"]
    out = Tally()
    # the integer output is the tensor before any exit softmax: compare that tensor
    y_float = FloatRunner(proto, [qg.output.name]).run(x)[qg.output.name]
    out.add_output(y_float, qg.output.dequantize(y_int), qg.output.name)
    drop, k = None, min(layer_samples, len(x)) if layers else 0
    if k:  # every intermediate, so only the k samples with the worst output error: the
        # layer named is the one that explains the failure, not a sample that went well
        err = ((y_float - qg.output.dequantize(y_int)) ** 2).reshape(len(x), -1).sum(axis=1)
        pick = np.sort(np.argsort(-err, kind="stable")[:k])
        names = [n.output for n in qg.nodes]
        tally = Tally()
        tally.add_layers(qg, FloatRunner(proto, names).run(x[pick]),
                         oracle.run_integer(qg, q[pick], keep=True), names)
        drop = sharpest_drop(qg, tally, input_sqnr(qg, x[pick]))
    return Fidelity(len(x), source, round(out.sqnr(qg.output.name), 2),
                    round(out.agree / out.samples, 4), min_sqnr_db, drop, k)


def check(fid: Fidelity) -> None:
    """Raise ``FidelityError`` (one line naming the layer) when ``fid`` is under its floor."""
    if fid.ok:
        return
    d = fid.sharpest_drop
    where = (f"; it falls most sharply at layer {d.name!r} ({d.op}, {d.input_sqnr_db:.1f} -> "
             f"{d.sqnr_db:.1f} dB): try --pin '{d.name}=8' if it runs at 4 bits, another "
             "--calibrator, or --rounding nearest" if d is not None else "")
    raise FidelityError(
        f"the quantized model is unfaithful: output SQNR {fid.sqnr_db:.1f} dB < --min-sqnr "
        f"{fid.min_sqnr_db:g} dB against onnxruntime FP32 on {fid.samples} {fid.source}"
        f"{where}; nothing was written (--min-sqnr 0 keeps it anyway)")


# ----------------------------------------------------------------------------- held-out inputs
@dataclass(frozen=True)
class HeldOut:
    """Inputs for the guard and the calibration spec that leaves them out."""

    calib: CalibSpec
    inputs: Callable[[], np.ndarray]  # read on use: after the build, not before
    source: str


def hold_out(calib: CalibSpec, spec: FidelitySpec, input_name: str,
             input_shape: tuple[int, ...]) -> HeldOut | None:
    """Samples calibration never sees: fresh N(0,1) draws for synthetic calibration;
    ``--data`` samples beyond ``--calib-samples`` when the folder has more; otherwise the
    last quarter of the folder (at most ``spec.samples``) is held back from calibration.
    Under 4 samples in all, none can be spared: the check runs on the calibration samples
    and says so."""
    n = spec.samples
    if n <= 0:
        return None
    if calib.source == "synthetic":
        r = SyntheticReader(input_name, input_shape, n, seed=calib.seed + 1)
        return HeldOut(calib, lambda: _read_all(r), "synthetic N(0,1) inputs (unseen seed)")
    total = len(open_source(calib.source, calib.preprocess, input_name, input_shape, None))
    if total > calib.num_samples:
        start, k = calib.num_samples, min(n, total - calib.num_samples)
        return HeldOut(calib, _tail(calib, input_name, input_shape, start, k),
                       "--data samples not used for calibration")
    k = min(n, total // 4)
    if k == 0:
        return HeldOut(calib, _tail(calib, input_name, input_shape, 0, total),
                       "calibration samples (under 4 given: none held back)")
    kept = dataclasses.replace(calib, num_samples=total - k)
    return HeldOut(kept, _tail(calib, input_name, input_shape, total - k, k),
                   "--data samples held back from calibration")


def _read_all(reader: SyntheticReader) -> np.ndarray:
    parts = []
    while (b := reader.get_next()) is not None:
        parts.append(next(iter(b.values())))
    return np.concatenate(parts)


def _tail(calib: CalibSpec, name: str, shape: tuple[int, ...], start: int, k: int
          ) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        r = open_source(calib.source, calib.preprocess, name, shape, start + k)
        parts, seen = [], 0
        while (b := r.get_next()) is not None:
            a = next(iter(b.values()))
            lo = max(start - seen, 0)
            if lo < len(a):
                parts.append(a[lo:])
            seen += len(a)
        return np.concatenate(parts).astype(np.float32)
    return read
