"""Real-data fidelity: a trained Fashion-MNIST ResNet keeps its accuracy in INT8.

The model (tests/data/fashion_resnet.onnx) is trained by
tools/train_fashion_mnist.py; the data is Debian's dataset-fashion-mnist.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qcompile import api
from qcompile.config import CalibSpec, QuantSpec
from qcompile.quant.datasets import fashion_mnist_dir, load_fashion_mnist

DATA = Path(__file__).parent / "data"
MODEL = DATA / "fashion_resnet.onnx"

pytestmark = [
    pytest.mark.tvm,
    pytest.mark.skipif(fashion_mnist_dir() is None,
                       reason="Debian package dataset-fashion-mnist is not installed"),
    pytest.mark.skipif(not MODEL.exists(), reason="run tools/train_fashion_mnist.py first"),
]


def test_int8_accuracy_within_half_a_point_of_float(tmp_path: Path) -> None:
    xtr, _ = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    calib = tmp_path / "calib"
    calib.mkdir()
    # 512 training images, spread over the set, for calibration; the test set is never seen
    np.save(calib / "train.npy", xtr[::117][:512])
    # kernels specialized to batch 500 evaluate the 10k images in 20 calls
    # minmax + nearest: this checks INT8 fidelity, not the slower auto defaults (mse, GPTQ)
    art = tmp_path / "art"
    res = api.compile_model(MODEL, art, quant=QuantSpec(rounding="nearest"),
                            calib=CalibSpec(source=str(calib), num_samples=512, method="minmax"),
                            progress=False, batch=500)
    # compile's own oracle check ran, and every integer-only stage found code to check
    assert res.verified.inputs == 2 and res.verified.bit_exact is True
    check = json.loads((art / "manifest.json").read_text())["intcheck"]
    assert check["stages"] == ["core", "codegen", "asm"] and check["asm"]["instructions"] > 0
    ev = api.evaluate(MODEL, art, inputs=xte, labels=yte, progress=False, batch_size=500)
    assert ev.num_samples == 10_000
    assert ev.bit_exact
    recorded = json.loads((DATA / "fashion_resnet.json").read_text())
    float_acc = ev.float_accuracy
    assert abs(float_acc - recorded["float_test_accuracy"]) < 1e-3  # the same float model
    assert float_acc > 0.88
    print(f"\nFashion-MNIST 10k test: float {float_acc:.4f}, INT8 {ev.accuracy:.4f}, "
          f"top-1 agreement {ev.top1_agreement:.4f}, SQNR {ev.sqnr_db:.1f} dB")
    assert abs(ev.accuracy - float_acc) <= 0.005, (ev.accuracy, float_acc)
