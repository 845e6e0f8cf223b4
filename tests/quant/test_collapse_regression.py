"""Issue 19 item 2b: a network whose activations are tiny must not quantize to all zeros.

torchvision's efficientnet_b0 exported with seeded weights and default BN statistics
runs at ~1e-9 by features.5 and ~1e-10 after its 5x5 depthwise convs.  The quantizer
floored every clipping threshold at an absolute 1e-8 (and calibration replaced any
threshold under 1e-12 by 1.0), so such a tensor got a scale of 1e-8/127 = 7.9e-11 for
values of std 5.5e-11: 56% of the depthwise output rounded to 0, 76% of the SiLU after
it, and every later tensor was 0.  The compiled model output zeros for every input
(SQNR 0 dB) while staying bit-exact against the oracle.

The model here has the same shape of problem at toy size: a conv + SiLU at ordinary
magnitude, then a depthwise 5x5 whose output sits near 1e-11, SiLU, a Sigmoid SE,
a pointwise conv and a dense head.  The full calibration path (.npy folder, mse
observer, GPTQ rounding: compile's defaults with --data) must keep its output's SQNR
against onnxruntime FP32 healthy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.helpers.onnx_builders import conv_node, init, make_model, rng, run_ort
from qcompile.quant import gptq
from qcompile.verify import oracle as reference
from qcompile.quant.readers import gather_inputs
from qcompile.quant.calibrate import (
    MinMaxObserver, MSEObserver, Observer, PercentileObserver, collect_stats)
from qcompile.config import CalibSpec, QuantSpec
from qcompile.quant.gptq import gptq_graph
from qcompile.ir.graph import Node
from qcompile.frontend.onnx_import import import_onnx
from qcompile.frontend.prepare import prepare
from qcompile.quant.quantize import calibration_tensors, layer_bits, quantize_graph
from qcompile.quant.readers import make_reader

pytestmark = pytest.mark.unit

C, HW = 8, 12


def _silu(x: str, y: str) -> list[onnx.NodeProto]:
    return [helper.make_node("Sigmoid", [x], [f"{y}_sig"]),
            helper.make_node("Mul", [x, f"{y}_sig"], [y])]


def tiny_activation_model(dw_gain: float, seed: int = 0) -> onnx.ModelProto:
    """conv+SiLU -> depthwise 5x5 (weights times ``dw_gain``) + SiLU -> Sigmoid SE ->
    1x1 conv + SiLU -> GAP -> dense.  With a tiny ``dw_gain`` every tensor after the
    depthwise conv but the SE gate (then ~sigmoid of its bias) sits at that magnitude."""
    r = rng(seed)
    inits: list = []
    nodes = [conv_node("stem", "x", "a0", r.normal(0, 0.4, (C, 3, 3, 3)), r.normal(0, 0.1, C),
                       inits, pads=[1, 1, 1, 1]), *_silu("a0", "a1")]
    nodes += [conv_node("dw", "a1", "d0", r.normal(0, 0.3, (C, 1, 5, 5)) * dw_gain,
                        r.normal(0, 0.05, C) * dw_gain, inits, pads=[2, 2, 2, 2], group=C),
              *_silu("d0", "d1")]
    nodes += [helper.make_node("GlobalAveragePool", ["d1"], ["se0"]),
              conv_node("se_fc1", "se0", "se1", r.normal(0, 0.5, (4, C, 1, 1)), None, inits),
              *_silu("se1", "se2"),
              conv_node("se_fc2", "se2", "se3", r.normal(0, 0.5, (C, 4, 1, 1)),
                        r.normal(0, 0.1, C), inits),
              helper.make_node("Sigmoid", ["se3"], ["se4"]),
              helper.make_node("Mul", ["d1", "se4"], ["e0"])]
    nodes += [conv_node("pw", "e0", "p0", r.normal(0, 0.4, (2 * C, C, 1, 1)), None, inits),
              *_silu("p0", "p1"),
              helper.make_node("GlobalAveragePool", ["p1"], ["g"]),
              helper.make_node("Flatten", ["g"], ["f"])]
    inits += [init("fc_w", r.normal(0, 0.4, (10, 2 * C))), init("fc_b", np.zeros(10))]
    nodes.append(helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1))
    return make_model(nodes, inits, [1, 3, HW, HW], [1, 10])


def quantized_sqnr(model: onnx.ModelProto, tmp_path: Path, rounding: str = "gptq",
                   method: str = "mse") -> tuple[float, float]:
    """(SQNR dB, fraction of zero outputs) of the integer oracle against onnxruntime FP32,
    calibrated on 16 N(0,1) .npy files, evaluated on 32 other N(0,1) inputs."""
    data = tmp_path / "calib"
    data.mkdir(parents=True)
    g = np.random.default_rng(100)
    for i in range(16):
        np.save(data / f"{i:03d}.npy", g.standard_normal((1, 3, HW, HW)).astype(np.float32))
    calib = CalibSpec(source=str(data), method=method, num_samples=16)
    quant = QuantSpec(rounding=rounding)
    graph = prepare(import_onnx(model, batch=1, source="tiny"))
    reader = make_reader(calib, graph.input, graph.input_shape)
    stats = collect_stats(model, calibration_tensors(graph), reader, calib.method, calib)
    src, rounded = graph, None
    if rounding == "gptq":
        src, rounded = gptq_graph(graph, gather_inputs(reader, 16), layer_bits(graph, quant))
    qg = quantize_graph(src, stats, quant, rounded=rounded)
    x = np.random.default_rng(200).standard_normal((32, 3, HW, HW)).astype(np.float32)
    yf = np.concatenate([run_ort(model, x[i:i + 1]) for i in range(len(x))]).astype(np.float64)
    yq = reference.run(qg, x).astype(np.float64)
    sqnr = 10 * np.log10((yf ** 2).sum() / max(((yf - yq) ** 2).sum(), 1e-300))
    return float(sqnr), float((yq == 0).mean())


@pytest.mark.parametrize("rounding", ["gptq", "nearest"])
def test_tiny_activations_do_not_collapse(tmp_path: Path, rounding: str) -> None:
    reference_db, _ = quantized_sqnr(tiny_activation_model(1.0), tmp_path / "unit", rounding)
    sqnr, zeros = quantized_sqnr(tiny_activation_model(1e-11), tmp_path / "tiny", rounding)
    assert zeros < 0.5, f"{zeros:.0%} of the outputs are exactly 0"
    # Scaling one layer's weights by 1e-11 scales every later activation and changes
    # nothing else that matters: the fidelity must be that of the ordinary model.
    assert sqnr > 20.0 and sqnr > reference_db - 3.0, (sqnr, reference_db)


@pytest.mark.parametrize("make", [MinMaxObserver, lambda: PercentileObserver(99.9), MSEObserver],
                         ids=["minmax", "percentile", "mse"])
def test_thresholds_scale_with_the_tensor(make: Callable[[], Observer]) -> None:
    """A threshold is a property of the values' shape, not of their magnitude: scaling a
    tensor by 1e-30 scales every observer's threshold by 1e-30 (no absolute floor; the
    MSE search must not underflow either)."""
    x = np.random.default_rng(0).standard_normal(50_000).astype(np.float32)
    ordinary, tiny = make(), make()
    ordinary.update(x)
    tiny.update(x * np.float32(1e-30))
    for signed, bits in ((True, 8), (False, 8), (True, 4)):
        t = tiny.threshold(signed, bits)
        assert t == pytest.approx(ordinary.threshold(signed, bits) * 1e-30, rel=1e-5), (signed, bits)


def test_sparse_tensor_keeps_its_range() -> None:
    """A percentile that lands on 0 (a tensor that is 0 almost everywhere) falls back to
    the exact max, not to an arbitrary 1.0 that would round its few values away."""
    x = np.zeros(100_000, np.float32)
    x[:5] = [1e-3, 2e-3, -3e-3, 4e-3, 5e-3]
    p = PercentileObserver(99.99)
    p.update(x)
    assert p.threshold(True, 8) == pytest.approx(5e-3)
    z = PercentileObserver(99.99)
    z.update(np.zeros(10, np.float32))  # identically 0: any range is exact
    assert z.threshold(True, 8) == 1.0


@pytest.mark.parametrize("group", [1, 6])
def test_gptq_does_not_depend_on_the_input_magnitude(group: int) -> None:
    """GPTQ's damping and the compensation's ridge are relative to the layer's own H:
    inputs 2^-40 (~1e-12) times smaller give the same integers and scales, and a bias
    2^-40 times smaller (the output scales with the input).  An absolute floor of 1e-12
    on the damping swamped H ~ 1e-24 there: GPTQ became round-to-nearest and the
    compensation vanished."""
    r = rng(3)
    w = r.normal(0, 1, (12, 6 // group, 3, 3)).astype(np.float32)
    b = r.normal(0, 1, 12).astype(np.float32)
    node = Node("conv", "c", ("x",), "y", {"strides": (1, 1), "pads": (1, 1, 1, 1),
                                           "dilations": (1, 1), "group": group, "act": None},
                {"w": w, "b": b})
    z = r.normal(0, 1, (16, 6, 10, 10))
    xf = (z + np.roll(z, 1, axis=2) + 0.5).astype(np.float32)  # correlated, mean > 0
    x = (xf + 0.1 * r.normal(0, 1, xf.shape)).astype(np.float32)  # upstream error
    m = gptq.layer_moments(node, x, xf)
    c = 2.0 ** -40  # exact in float64: the scaled moments are the same numbers
    assert m.fx is not None
    small = gptq.Moments(m.xx * c * c, m.mean * c, m.fx * c * c, m.mean_f * c)
    q, s, bias = gptq.round_corrected(w, b, m, 4)
    q2, s2, bias2 = gptq.round_corrected(w, b * c, small, 4)
    assert np.array_equal(q, q2) and np.allclose(s, s2, rtol=1e-12, atol=0)
    np.testing.assert_allclose(bias2, bias * c, rtol=1e-9)


def test_unsigned_mse_threshold_is_the_float64_optimum() -> None:
    """Unsigned, the negatives' error is the same under every candidate; searched without
    it, the float32 search lands on the float64 optimum of the full MSE."""
    x = np.random.default_rng(1).standard_normal(200_000).astype(np.float32) * 3
    obs = MSEObserver()
    obs.update(x)
    a = x.astype(np.float64)
    top = float(a.max())
    cands = top * np.arange(1, 101) / 100
    errs = [((np.clip(np.rint(a / (t / 255)), 0, 255) * (t / 255) - a) ** 2).sum() for t in cands]
    assert obs.threshold(False, 8) == pytest.approx(cands[int(np.argmin(errs))], rel=1e-12)
