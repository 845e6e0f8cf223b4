"""The peers users would pick instead of qcompile: onnxruntime FP32 and static INT8.

Benchmark-only code (never imported by the compiler).
"""
from __future__ import annotations

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


def ort_session(model: Path, threads: int | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    # Idle ORT workers spin by default and steal the cores from whatever runs next;
    # interleaved timing needs them to sleep between calls.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def ort_runner(model: Path, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    sess = ort_session(model, threads)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x.astype(np.float32)})[0]


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
