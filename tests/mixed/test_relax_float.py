"""relax_float: the float Relax model (weights as parameters) and its gradient.

Forward is checked against onnxruntime on the original ONNX file, gradients
against central finite differences of the module's own loss in float64.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.helpers.onnx_builders import bn_node, conv_node, init, make_model, rng, run_ort
from qcompile.errors import UnsupportedOpError
from qcompile.ir.graph import Graph, Node
from qcompile.frontend.onnx_import import import_onnx
from qcompile.frontend.prepare import prepare
from qcompile.ir.graph import layer_nodes
from qcompile.mixed.float_model import FloatVM, build_float_module

BATCH = 4
Case = tuple[onnx.ModelProto, Graph, np.ndarray]  # model, canonical graph, inputs


def tiny_cnn(seed: int = 0) -> onnx.ModelProto:
    """x (N,3,8,8) -> conv+BN+relu -> maxpool -> conv + residual add + relu6 -> gap -> fc(5)."""
    r = rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes = [
        conv_node("c1", "x", "c1o", r.normal(0, .3, (4, 3, 3, 3)), r.normal(0, .1, 4), inits,
                  pads=[1, 1, 1, 1]),
        bn_node("bn1", "c1o", "b1", 4, r, inits),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        conv_node("c2", "p1", "c2o", r.normal(0, .3, (4, 4, 3, 3)), r.normal(0, .1, 4), inits,
                  pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2o", "p1"], ["a"]),
        helper.make_node("Clip", ["a", "lo", "hi"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1),
    ]
    inits += [init("lo", np.array(0.0)), init("hi", np.array(6.0)),
              init("fc_w", r.normal(0, .5, (5, 4))), init("fc_b", r.normal(0, .1, 5))]
    return make_model(nodes, inits, ["N", 3, 8, 8])


def branchy_cnn(seed: int = 1) -> onnx.ModelProto:
    """Grouped conv, avgpool, a standalone clip, concat, asymmetric pads, reshape, softmax."""
    r = rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes = [
        conv_node("g1", "x", "g1o", r.normal(0, .3, (4, 2, 3, 3)), r.normal(0, .1, 4), inits,
                  pads=[1, 1, 1, 1], group=2),
        helper.make_node("Clip", ["g1o", "lo", "hi"], ["g1r"]),
        helper.make_node("AveragePool", ["g1r"], ["ap"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1], count_include_pad=0),
        helper.make_node("MaxPool", ["x"], ["mp"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["mp", "m1", "p1"], ["mpc"]),
        helper.make_node("Concat", ["ap", "mpc"], ["cat"], axis=1),
        conv_node("dw", "cat", "dwo", r.normal(0, .3, (8, 1, 3, 3)), None, inits,
                  pads=[0, 0, 1, 1], strides=[2, 2], group=8),
        helper.make_node("Relu", ["dwo"], ["dwr"]),
        helper.make_node("Reshape", ["dwr", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["y"], axis=1),
    ]
    inits += [init("lo", np.array(0.0)), init("hi", np.array(6.0)), init("m1", np.array(-1.0)),
              init("p1", np.array(1.0)), init("shape", np.array([-1, 32])),
              init("fc_w", r.normal(0, .3, (5, 32))), init("fc_b", r.normal(0, .1, 5))]
    return make_model(nodes, inits, ["N", 4, 8, 8])


def canonical(model: onnx.ModelProto) -> Graph:
    return prepare(import_onnx(model, batch=1, source="tiny"))


@pytest.fixture(scope="module", params=["tiny", "branchy"])
def case(request: pytest.FixtureRequest) -> Case:
    model = tiny_cnn() if request.param == "tiny" else branchy_cnn()
    g = canonical(model)
    x = np.random.default_rng(7).normal(size=(BATCH, *g.input_shape[1:])).astype(np.float32)
    return model, g, x


@pytest.fixture(scope="module")
def vm32(case: Case) -> FloatVM:
    return FloatVM(build_float_module(case[1], BATCH, grad=False))


@pytest.fixture(scope="module")
def vm64(case: Case) -> FloatVM:
    return FloatVM(build_float_module(case[1], BATCH, dtype="float64"))


@pytest.mark.unit
def test_layers_are_conv_and_dense_in_order(case: Case) -> None:
    g = case[1]
    fm = build_float_module(g, BATCH, grad=False)
    assert fm.layers == tuple(n.name for n in layer_nodes(g))
    assert all(n.op in ("conv", "dense") for n in layer_nodes(g)) and len(fm.layers) == 3
    assert fm.num_classes == 5


@pytest.mark.tvm
def test_forward_matches_onnxruntime(case: Case,
                                     vm32: FloatVM) -> None:
    model, g, x = case
    ref = run_ort(model, x)
    logits = vm32.forward(x)
    if g.nodes[-1].op == "softmax":  # the module stops at the logits
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        logits = e / e.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.tvm
def test_float64_forward_matches_float32(case: Case,
                                         vm32: FloatVM, vm64: FloatVM) -> None:
    x = case[2]
    np.testing.assert_allclose(vm64.forward(x), vm32.forward(x), rtol=1e-5, atol=1e-5)


@pytest.mark.tvm
def test_gradient_matches_finite_differences(case: Case,
                                             vm64: FloatVM) -> None:
    """Central differences, h = 1e-6, on 5 random weights of every layer (float64)."""
    _, _, x = case
    labels = np.array([0, 1, 2, 4])
    sw = np.full(BATCH, 1.0 / BATCH)
    ws = [w.astype(np.float64) for w in vm64.fm.weights]
    loss, grads = vm64.loss_and_grad(x, labels, sw, ws)
    ref = -np.log(_softmax(vm64.forward(x, ws)))[np.arange(BATCH), labels].mean()
    assert loss == pytest.approx(ref, rel=1e-10)
    r = np.random.default_rng(3)
    h = 1e-6
    for li, w in enumerate(ws):
        for i in r.choice(w.size, size=5, replace=False):
            plus, minus = [a.copy() for a in ws], [a.copy() for a in ws]
            plus[li].flat[i] += h
            minus[li].flat[i] -= h
            fd = (vm64.loss_and_grad(x, labels, sw, plus)[0]
                  - vm64.loss_and_grad(x, labels, sw, minus)[0]) / (2 * h)
            assert grads[li].flat[i] == pytest.approx(fd, rel=1e-4, abs=1e-8), (li, i)


@pytest.mark.tvm
def test_sample_weight_masks_padding(vm64: FloatVM,
                                     case: Case) -> None:
    """Zero-weight rows (padding to the static batch) change neither loss nor gradient."""
    _, _, x = case
    labels = np.array([0, 1, 2, 3])
    sw = np.array([0.5, 0.5, 0.0, 0.0])
    l1, g1 = vm64.loss_and_grad(x, labels, sw)
    x2 = x.copy()
    x2[2:] = 0
    l2, g2 = vm64.loss_and_grad(x2, labels, sw)
    assert l1 == pytest.approx(l2, rel=1e-12)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.unit
def test_unsupported_op_is_a_clear_error() -> None:
    """Round has no Relax gradient (nor an expression through ops that have one)."""
    g = canonical(tiny_cnn())
    rnd = Node("lut", "my_round", (g.nodes[0].output,), "round_out",
               {"fn": "Round", "fn_attrs": {}, "times_x": False, "act": None})
    nodes = list(g.nodes)
    nodes.insert(1, rnd)
    nodes[2] = nodes[2].with_(inputs=("round_out",))
    bad = g.with_nodes(nodes)
    with pytest.raises(UnsupportedOpError, match=r"'my_round' \(op lut\).*--sensitivity kl"):
        build_float_module(bad, BATCH)
    unknown = g.with_nodes([g.nodes[0].with_(op="mystery")] + list(g.nodes[1:]))
    with pytest.raises(UnsupportedOpError, match=r"\(op mystery\).*--sensitivity kl"):
        build_float_module(unknown, BATCH)
