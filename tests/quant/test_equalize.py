"""Cross-layer equalization, bias absorption and empirical bias correction."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tests.helpers.onnx_builders import bn_node, conv_node, init, make_model, rng, save
from qcompile import api
from qcompile.verify import oracle
from qcompile.quant.calibrate import collect_stats
from qcompile.config import CalibSpec, QuantSpec
from qcompile.quant.equalize import (
    bias_correction, canonical_model, equalization_pairs, equalize, interval_ranges,
    preactivation_ranges)
from qcompile.ir.graph import Graph
from qcompile.frontend.onnx_import import import_onnx
from qcompile.frontend.prepare import prepare
from qcompile.ir.qgraph import QGraph
from qcompile.quant.quantize import calibration_tensors, quantize_graph

SIZE = 12


def separable_model(seed: int = 0):
    """stem(ReLU6) -> dw(ReLU6) -> pw -> expand(ReLU) -> dw(ReLU6) -> project -> + pw
    -> GAP -> Gemm, with per-channel weight scales spread over three decades."""
    r = rng(seed)
    inits: list[TensorProto] = []
    nodes = []

    def conv(name, x, cin, cout, k, group=1, act=None, bn=True):
        w = r.normal(0, 1.0, (cout, cin // group, k, k)) / np.sqrt(cin // group * k * k)
        w *= 10 ** r.uniform(-1.5, 1.0, (cout, 1, 1, 1))  # unbalanced channels
        y = f"{name}_c"
        nodes.append(conv_node(name, x, y, w, r.normal(0, 0.2, cout), inits, group=group,
                               pads=[k // 2] * 4))
        if bn:
            nodes.append(bn_node(f"{name}_bn", y, f"{name}_n", cout, r, inits))
            y = f"{name}_n"
        if act == "relu":
            nodes.append(helper.make_node("Relu", [y], [f"{name}_r"]))
            y = f"{name}_r"
        elif act == "relu6":
            nodes.append(helper.make_node("Clip", [y, "zero", "six"], [f"{name}_r"]))
            y = f"{name}_r"
        return y

    inits += [init("zero", np.array(0.0)), init("six", np.array(6.0))]
    t = conv("stem", "x", 3, 8, 3, act="relu6")
    t = conv("dw1", t, 8, 8, 3, group=8, act="relu6")
    skip = conv("pw1", t, 8, 12, 1)
    t = conv("expand", skip, 12, 24, 1, act="relu")
    t = conv("dw2", t, 24, 24, 3, group=24, act="relu6")
    t = conv("project", t, 24, 12, 1, bn=False)
    nodes.append(helper.make_node("Add", [t, skip], ["sum"]))
    nodes.append(helper.make_node("GlobalAveragePool", ["sum"], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    inits += [init("fc_w", r.normal(0, 0.3, (5, 12))), init("fc_b", r.normal(0, 0.1, 5))]
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], transB=1))
    return make_model(nodes, inits, [1, 3, SIZE, SIZE])


def _data(n: int, seed: int = 1) -> np.ndarray:
    return rng(seed).normal(0, 1, (n, 3, SIZE, SIZE)).astype(np.float32)


def _run(graph: Graph, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(canonical_model(graph).SerializeToString(),
                             providers=["CPUExecutionProvider"])
    return s.run(None, {graph.input: x})[0]


@pytest.fixture(scope="module")
def graph() -> Graph:
    return prepare(import_onnx(separable_model(), batch=1))


@pytest.mark.unit
def test_pairs_cover_relu_relu6_and_depthwise(graph) -> None:
    names = {n.name: n for n in graph.nodes}
    pairs = equalization_pairs(graph)
    kinds = {(names[a].attrs["act"], names[b].attrs["group"] > 1) for a, b in pairs}
    assert len(pairs) == 4  # pw1 has two readers (the residual), the Gemm follows a GAP
    assert ((0.0, 6.0), True) in kinds and ((0.0, float("inf")), True) in kinds


@pytest.mark.unit
def test_float_output_unchanged_data_free(graph) -> None:
    eq = equalize(graph)
    assert eq is not graph and any(
        not np.array_equal(a.params["w"], b.params["w"]) for a, b in zip(graph.nodes, eq.nodes)
        if a.op == "conv")
    x = _data(16, seed=2) * 3  # any input: the data-free variant is exact everywhere
    y0, y1 = _run(graph, x), _run(eq, x)
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-4 * np.abs(y0).max())


@pytest.mark.unit
def test_interval_bounds_contain_the_data(graph) -> None:
    x = np.clip(_data(32, seed=3) * 2, -2, 2)
    bounds, seen = interval_ranges(graph, (-2.0, 2.0)), preactivation_ranges(graph, x)
    assert set(seen) <= set(bounds)
    for k, (lo, hi) in seen.items():
        assert np.all(bounds[k][0] <= lo + 1e-4) and np.all(hi <= bounds[k][1] + 1e-4), k
    assert "stem" not in interval_ranges(graph)  # unknown input: the stem is unbounded


@pytest.mark.unit
def test_float_output_unchanged_data_free_with_input_range(graph) -> None:
    eq = equalize(graph, input_range=(-2.0, 2.0))
    x = np.clip(_data(16, seed=4) * 2, -2, 2)
    y0, y1 = _run(graph, x), _run(eq, x)
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-4 * np.abs(y0).max())


@pytest.mark.unit
def test_float_output_unchanged_on_calibrated_ranges(graph) -> None:
    x = _data(16)
    eq = equalize(graph, ranges=preactivation_ranges(graph, x))
    y0, y1 = _run(graph, x), _run(eq, x)
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-4 * np.abs(y0).max())


def _spread(v: np.ndarray) -> float:
    v = v[v > 0]
    return float(v.max() / v.min())


@pytest.mark.unit
def test_weight_ranges_balanced(graph) -> None:
    x = _data(16)
    eq = equalize(graph, absorb=False, iterations=100, tol=1e-6,
                  ranges=preactivation_ranges(graph, x))
    by = {n.name: n for n in eq.nodes}
    before = {n.name: n for n in graph.nodes}
    # expand -(ReLU)-> dw2: no constraint, so both ranges meet at sqrt(r1 * r2)
    r1 = np.abs(by["expand"].params["w"]).reshape(24, -1).max(1)
    r2 = np.abs(by["dw2"].params["w"]).reshape(24, -1).max(1)
    np.testing.assert_allclose(r1, r2, rtol=1e-3)
    old = np.abs(before["expand"].params["w"]).reshape(24, -1).max(1)
    assert _spread(r1) < _spread(old) / 3
    # dw2 -(ReLU6)-> project: balanced too, except channels the clip pins (s = 1 where
    # the pre-activation reaches 6, s = hi / 6 where scaling would push it past 6)
    hi = preactivation_ranges(eq, x)["dw2"][1]
    free = (hi < 6.0 * (1 - 1e-3)) & (ranges_before_dw2(graph, x) <= 6.0)
    assert free.sum() >= 4
    d = np.abs(by["dw2"].params["w"]).reshape(24, -1).max(1)
    p = np.abs(by["project"].params["w"]).max(axis=(0, 2, 3))
    np.testing.assert_allclose(d[free], p[free], rtol=1e-3)


def ranges_before_dw2(graph: Graph, x: np.ndarray) -> np.ndarray:
    return preactivation_ranges(graph, x)["dw2"][1]


@pytest.mark.unit
def test_relu6_channels_that_saturate_are_left_alone(graph) -> None:
    x = _data(16)
    ranges = preactivation_ranges(graph, x)
    eq = equalize(graph, ranges=ranges, absorb=False)
    by, before = {n.name: n for n in eq.nodes}, {n.name: n for n in graph.nodes}
    sat = ranges["dw2"][1] > 6.0
    assert sat.any() and not sat.all()
    # s = 1 on those channels: project's input columns stay as they were
    np.testing.assert_array_equal(by["project"].params["w"][:, sat],
                                  before["project"].params["w"][:, sat])
    # the others never reach the clip after scaling
    after = preactivation_ranges(eq, x)
    assert np.all(after["dw2"][1][~sat] <= 6.0 * (1 + 1e-5))


@pytest.mark.unit
def test_bias_absorption_moves_bias_through_unpadded_conv(graph) -> None:
    x = _data(16)
    ranges = preactivation_ranges(graph, x)
    plain = equalize(graph, ranges=ranges, absorb=False)
    absorbed = equalize(graph, ranges=ranges)
    by_p, by_a = {n.name: n for n in plain.nodes}, {n.name: n for n in absorbed.nodes}
    # dw2 -> project (1x1, no padding) absorbs; expand -> dw2 (padded) does not
    assert not np.allclose(by_p["dw2"].params["b"], by_a["dw2"].params["b"])
    np.testing.assert_array_equal(by_p["expand"].params["b"], by_a["expand"].params["b"])
    y0, y1 = _run(graph, x), _run(absorbed, x)
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-4 * np.abs(y0).max())


def _quantize(graph: Graph, x: np.ndarray, bits: int):
    calib = CalibSpec(num_samples=len(x))
    stats = collect_stats(canonical_model(graph), calibration_tensors(graph),
                          _ArrayReader(graph.input, x), "minmax", calib)
    return quantize_graph(graph, stats, QuantSpec(bits=bits))


class _ArrayReader:
    def __init__(self, name: str, x: np.ndarray) -> None:
        self.name, self.x, self.i = name, x, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        self.i += 8
        return {self.name: self.x[self.i - 8:self.i]}

    def rewind(self) -> None:
        self.i = 0

    def __len__(self) -> int:
        return len(self.x)


@pytest.mark.unit
@pytest.mark.parametrize("bits", [8, 4])
def test_bias_correction_reduces_mean_error_and_changes_only_biases(graph, bits) -> None:
    x = _data(64)
    qg = _quantize(graph, x, bits)
    qc = bias_correction(graph, qg, x)
    for a, b in zip(qg.nodes, qc.nodes):
        assert a.op == b.op and a.attrs.keys() == b.attrs.keys()
        for k in a.params:
            if k != "bias":
                np.testing.assert_array_equal(a.params[k], b.params[k])
        assert all(a.attrs[k] == b.attrs[k] for k in a.attrs if k != "acc_bound")
        if a.op in ("qconv", "qdense"):
            assert b.params["bias"].dtype == np.int32
    assert any(not np.array_equal(a.params["bias"], b.params["bias"])
               for a, b in zip(qg.nodes, qc.nodes) if "bias" in a.params)
    y = _run(graph, x)
    def err(q: QGraph) -> float:
        return float(np.abs((y - oracle.run(q, x)).mean(axis=0)).mean())
    assert err(qc) < err(qg)


@pytest.mark.tvm
def test_compile_with_equalize_and_bias_correction_is_bit_exact(tmp_path: Path) -> None:
    model = save(separable_model(), tmp_path)
    (tmp_path / "calib").mkdir()
    x = _data(32)
    np.save(tmp_path / "calib" / "x.npy", x)
    calib = CalibSpec(source=str(tmp_path / "calib"), num_samples=32)
    art = tmp_path / "art"
    res = api.compile_model(model, art, progress=False, calib=calib,
                            quant=QuantSpec(bits=4, equalize=True, bias_correction=True))
    # compile's own oracle check ran, and every integer-only stage found code to check
    assert res.verified.inputs == 2 and res.verified.bit_exact is True
    check = json.loads((art / "manifest.json").read_text())["intcheck"]
    assert check["stages"] == ["core", "codegen", "asm"] and check["asm"]["instructions"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = api.evaluate(model, art, inputs=_data(16, seed=5), progress=False)
    assert ev.bit_exact and ev.num_samples == 16


@pytest.mark.unit
def test_accumulator_unit_is_read_off_the_qgraph(graph) -> None:
    from qcompile.quant.equalize import _unit
    from qcompile.quant.quantize import quantize_weights

    x = _data(16)
    qg = _quantize(graph, x, 8)
    fl = {n.name: n for n in graph.nodes}
    for n in qg.nodes:
        if n.op in ("qconv", "qdense"):
            _, sw = quantize_weights(fl[n.name].params["w"], int(n.attrs["bits"]))
            want = sw * float(qg.tensors[n.inputs[0]].scale)
            np.testing.assert_allclose(_unit(n, qg), want, rtol=2e-9)
