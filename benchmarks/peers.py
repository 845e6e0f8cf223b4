"""The peers users would pick instead of qcompile: onnxruntime FP32 and static INT8.

Benchmark-only code (never imported by the compiler).
"""
from __future__ import annotations

import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)


class _ArrayReader(CalibrationDataReader):
    def __init__(self, name: str, xs: np.ndarray) -> None:
        self.name, self.xs, self.i = name, xs, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.xs):
            return None
        self.i += 1
        return {self.name: self.xs[self.i - 1:self.i].astype(np.float32)}


def ort_int8(model: Path, out: Path, calib: np.ndarray) -> Path:
    """Static QDQ INT8, per-channel weights, MinMax activations: ORT's standard recipe."""
    name = onnx.load(str(model), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as d:
        pre = Path(d) / "pre.onnx"
        from onnxruntime.quantization.shape_inference import quant_pre_process
        quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), _ArrayReader(name, calib), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return out


SPIN_KEY = "session.intra_op.allow_spinning"


def ort_options(threads: int | None = None, *, spinning: bool = True) -> ort.SessionOptions:
    """SessionOptions for the CPU peer.  ``spinning=True`` and no ``threads`` is exactly
    onnxruntime's default (``ort.SessionOptions()``: spin-waiting on, intra_op_num_threads
    0 = onnxruntime's own choice), i.e. how it runs for its users: the headline timing.

    ``spinning=False`` (with ``threads`` = all cores unless given) is for interleaved
    timing only: idle ORT workers spin by default and would steal the cores from
    whatever runs next.  It is not onnxruntime's default, and tables must say so."""
    so = ort.SessionOptions()
    if threads or not spinning:
        so.intra_op_num_threads = threads or os.cpu_count() or 1
    if not spinning:
        so.add_session_config_entry(SPIN_KEY, "0")
    return so


def ort_session(model: Path, threads: int | None = None, *,
                spinning: bool = False) -> ort.InferenceSession:
    """A CPU session; by default spinning off (the interleaved runs and fidelity checks,
    where sessions live side by side).  ``spinning=True``: onnxruntime's defaults."""
    return ort.InferenceSession(str(model), ort_options(threads, spinning=spinning),
                                providers=["CPUExecutionProvider"])


def ort_runner(model: Path, threads: int | None = None, *,
               spinning: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    sess = ort_session(model, threads, spinning=spinning)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x.astype(np.float32)})[0]


def time_ort_alone(model: Path, x: np.ndarray, runs: int, warmup: int) -> list[float]:
    """onnxruntime as its users run it: default SessionOptions (spin-waiting on), the
    session created here and released before returning (its spinning thread pool joined),
    so it is the only session alive while it is timed.  ``warmup`` runs, then ``runs``
    timed runs; seconds."""
    def timed() -> list[float]:  # the session lives in this frame only
        sess = ort_session(model, spinning=True)
        feed = {sess.get_inputs()[0].name: x.astype(np.float32)}
        return block_times(lambda: sess.run(None, feed), runs, warmup)
    out = timed()
    gc.collect()
    return out


def block_times(fn: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """``warmup`` untimed calls, then ``runs`` timed back-to-back calls; seconds."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def interleaved_times(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 3,
                      progress: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Time several configurations round-robin so machine noise hits all alike."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeat):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
        if progress:
            progress(i)
    return times
