"""Compiled integer graphs are bit-exact against the NumPy oracle, op by op.

Each case compiles a tiny ONNX model through the whole pipeline and runs
``api.evaluate``, which rebuilds the oracle from the artifact's own
qconfig.json + weights.npz and compares the compiled ``quantize`` and ``core``
outputs for equality (not closeness) on 32 random inputs.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.kitchen_sink import kitchen_sink_model
from tests.helpers.onnx_builders import conv_bn_relu_model, save
from qcompile import api
from qcompile.verify import oracle
from qcompile.runtime.run import Artifact

pytestmark = pytest.mark.tvm

CASES = {
    "stride2_asym_pad": dict(cin=3, cout=8, size=9, strides=[2, 2], pads=[0, 1, 1, 0]),
    "depthwise": dict(cin=6, cout=6, group=6, size=8, pads=[1, 1, 1, 1]),
    "pointwise_odd_channels": dict(cin=5, cout=7, kernel=1, size=7),
    "odd_spatial_dilated": dict(cin=3, cout=4, size=11, dilations=[2, 2], pads=[2, 2, 2, 2]),
    "relu6_no_bias": dict(cin=4, cout=5, size=6, act="relu6", bias=False, pads=[1, 0, 1, 0]),
    "signed_no_act": dict(cin=3, cout=3, size=5, act=None),
    "grouped": dict(cin=6, cout=9, group=3, size=7, strides=[2, 1]),
    "grouped_vnni": dict(cin=16, cout=24, group=4, size=7, pads=[1, 1, 1, 1]),
}


def _compile_and_check(model, tmp_path: Path, n: int = 32, kernels: bool = True) -> dict:
    path = save(model, tmp_path)
    art = tmp_path / "art"
    res = api.compile_model(path, art, progress=False, kernels=kernels)
    # compile's own oracle check ran, and every integer-only stage found code to check
    assert res.verified.inputs == 2 and res.verified.bit_exact is True
    check = json.loads((art / "manifest.json").read_text())["intcheck"]
    assert check["stages"] == ["core", "codegen", "asm"] and check["asm"]["instructions"] > 0
    with pytest.warns(UserWarning, match="synthetic"):
        ev = api.evaluate(path, art, num_samples=n, progress=False)
    assert ev.num_samples == n
    assert ev.bit_exact, "compiled integer output differs from the NumPy oracle"
    return ev


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_conv_bit_exact(case: str, tmp_path: Path) -> None:
    ev = _compile_and_check(conv_bn_relu_model(seed=zlib.crc32(case.encode()) % 100, **CASES[case]), tmp_path)
    assert ev.sqnr_db > 25  # 8-bit quantization of one layer is accurate


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "generic"])
def test_every_op_bit_exact_and_faithful(tmp_path: Path, kernels: bool) -> None:
    ev = _compile_and_check(kitchen_sink_model(), tmp_path, kernels=kernels)
    assert ev.top1_agreement >= 0.8
    names = {layer.tensor for layer in ev.layers}
    assert {"sr", "mp", "ap", "cat", "cl", "g", "logits"} <= names


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "generic"])
def test_any_batch_size_and_output_matches_oracle(tmp_path: Path, kernels: bool) -> None:
    """Generic modules take any batch; kernel modules run it in chunks of their batch."""
    path = save(kitchen_sink_model(softmax=False), tmp_path)
    api.compile_model(path, tmp_path / "art", progress=False, kernels=kernels, batch=2)
    art = Artifact.load(tmp_path / "art")
    qg = art.qgraph()
    x = np.random.default_rng(3).normal(size=(3, 3, 11, 11)).astype(np.float32) * 2
    y = art.run(x)
    assert y.shape == (3, 5)
    np.testing.assert_array_equal(y, oracle.run(qg, x))  # same float exit step, same ints
    assert art.run_core(oracle.quantize_input(qg, x)).dtype == np.int32  # raw logits


def test_saturating_inputs_stay_exact(tmp_path: Path) -> None:
    """Inputs far outside the calibrated range clip at the entry and everywhere after."""
    path = save(conv_bn_relu_model(seed=5, cin=3, cout=8, size=7), tmp_path)
    api.compile_model(path, tmp_path / "art", progress=False)
    art = Artifact.load(tmp_path / "art")
    qg = art.qgraph()
    x = np.random.default_rng(0).normal(size=(8, 3, 7, 7)).astype(np.float32) * 100
    q = oracle.quantize_input(qg, x)
    assert (q == 127).any() and (q == -128).any()
    np.testing.assert_array_equal(art.quantize(x), q)
    np.testing.assert_array_equal(art.run_core(q), oracle.run_integer(qg, q)["output"])
