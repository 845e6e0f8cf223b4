"""prepare: canonical graphs that match onnxruntime, and clear refusals.

Numerics: ``float_eval.run(prepare(import_onnx(m)))`` against onnxruntime on the same
float32 input, within 1e-4 relative to the output's largest magnitude.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.helpers import float_eval
from tests.helpers.onnx_builders import (bn_node, conv_bn_relu_model, conv_node, dense_model, init,
                                         make_model, rng, run_ort, save)
from qcompile.errors import UnsupportedOpError
from qcompile.ir.graph import Graph
from qcompile.ops import CANONICAL_OPS
from qcompile.frontend.onnx_import import import_onnx, load_model
from qcompile.frontend.prepare import REWRITES, prepare

pytestmark = pytest.mark.unit

RTOL = 1e-4


def _canonical(model: onnx.ModelProto, tmp_path: Path, batch: int = 1) -> Graph:
    return prepare(import_onnx(load_model(save(model, tmp_path)), batch=batch))


def _input_shape(model: onnx.ModelProto) -> tuple[int, ...]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else 2 for d in dims)


# --------------------------------------------------------------------------- model cases

def _pool_model(op: str, size: int = 7, **attrs: object) -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["p"], name="pool", **attrs)
    relu = helper.make_node("Relu", ["p"], ["y"], name="relu")  # a standalone clip
    return make_model([node, relu], [], [1, 3, size, size])


def _matmul_add() -> onnx.ModelProto:
    r = rng(5)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "c"], ["a"], name="bias"),
             helper.make_node("Relu", ["a"], ["y"], name="relu")]
    return make_model(nodes, [init("w", r.normal(size=(10, 6))), init("c", r.normal(size=6))],
                      [3, 10])


def _residual() -> onnx.ModelProto:
    r = rng(6)
    inits: list[TensorProto] = []
    nodes = [conv_node("c1", "x", "a", r.normal(0, .3, (4, 4, 3, 3)), None, inits, pads=[1] * 4),
             bn_node("bn1", "a", "an", 4, r, inits),
             helper.make_node("Relu", ["an"], ["ar"], name="relu1"),
             conv_node("c2", "ar", "b", r.normal(0, .3, (4, 4, 3, 3)), r.normal(size=4), inits,
                       pads=[1] * 4),
             helper.make_node("Add", ["b", "x"], ["s"], name="res"),
             helper.make_node("Relu", ["s"], ["y"], name="relu2")]
    return make_model(nodes, inits, [1, 4, 6, 6])


def _concat(axis: int) -> onnx.ModelProto:
    r = rng(7)
    inits: list[TensorProto] = []
    nodes = [conv_node("c1", "x", "a", r.normal(size=(3, 2, 1, 1)), None, inits),
             conv_node("c2", "x", "b", r.normal(size=(5, 2, 3, 3)), None, inits, pads=[1] * 4),
             helper.make_node("Relu", ["b"], ["br"], name="relu"),
             helper.make_node("Concat", ["a", "br", "x"], ["y"], name="cat", axis=axis)]
    return make_model(nodes, inits, [1, 2, 5, 5])


def _head(shape_op: str, softmax: bool) -> onnx.ModelProto:
    """conv -> gap|maxpool -> Flatten|Reshape -> Gemm [-> Softmax]."""
    r = rng(8)
    inits = [init("fw", r.normal(size=(4, 8 * 2 * 2))), init("fb", r.normal(size=4)),
             init("shape", np.array([0, -1]))]
    nodes = [conv_node("c", "x", "a", r.normal(size=(8, 3, 3, 3)), None, inits),
             helper.make_node("MaxPool", ["a"], ["p"], name="pool", kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], name="flat", axis=-3)
             if shape_op == "flatten" else helper.make_node("Reshape", ["p", "shape"], ["f"]),
             helper.make_node("Dropout", ["f"], ["d"], name="drop"),
             helper.make_node("Gemm", ["d", "fw", "fb"], ["g"], name="fc", transB=1)]
    nodes.append(helper.make_node("Softmax", ["g"], ["y"], name="sm") if softmax
                 else helper.make_node("Identity", ["g"], ["y"], name="id"))
    return make_model(nodes, inits, [1, 3, 6, 6])


def _gap_model() -> onnx.ModelProto:
    r = rng(9)
    inits: list[TensorProto] = []
    nodes = [conv_node("c", "x", "a", r.normal(size=(4, 3, 3, 3)), None, inits, strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["a"], ["y"], name="gap")]
    return make_model(nodes, inits, [2, 3, 7, 7])


CASES: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv_bn_relu_stride2_asym_pads": lambda: conv_bn_relu_model(strides=[2, 2], pads=[1, 0, 2, 1]),
    "depthwise": lambda: conv_bn_relu_model(cin=4, cout=4, group=4, pads=[1] * 4),
    "depthwise_multiplier2": lambda: conv_bn_relu_model(cin=3, cout=6, group=3, bias=False),
    "grouped": lambda: conv_bn_relu_model(cin=4, cout=6, group=2, act=None),
    "same_upper_odd": lambda: conv_bn_relu_model(size=7, auto_pad="SAME_UPPER", strides=[2, 2]),
    "same_lower_even": lambda: conv_bn_relu_model(size=8, kernel=4, auto_pad="SAME_LOWER"),
    "dilation": lambda: conv_bn_relu_model(size=11, dilations=[2, 3], pads=[2, 1, 0, 3]),
    "relu6_fusion": lambda: conv_bn_relu_model(act="relu6", bn=False),
    "maxpool_ceil": lambda: _pool_model("MaxPool", 6, kernel_shape=[3, 3], strides=[2, 2],
                                        ceil_mode=1),
    "maxpool_pads_dilation": lambda: _pool_model("MaxPool", 8, kernel_shape=[3, 2],
                                                 pads=[1, 0, 1, 1], dilations=[2, 1]),
    "avgpool_exclude_pad": lambda: _pool_model("AveragePool", kernel_shape=[3, 3], strides=[2, 2],
                                               pads=[1, 1, 1, 1], count_include_pad=0),
    "avgpool_include_pad": lambda: _pool_model("AveragePool", kernel_shape=[3, 3], strides=[2, 2],
                                               pads=[1, 2, 1, 0], count_include_pad=1),
    "avgpool_same_include_pad": lambda: _pool_model("AveragePool", 6, kernel_shape=[3, 3],
                                                    strides=[2, 2], auto_pad="SAME_UPPER",
                                                    count_include_pad=1),
    "avgpool_ceil_exclude_pad": lambda: _pool_model("AveragePool", 6, kernel_shape=[3, 3],
                                                    strides=[2, 2], ceil_mode=1),
    "gemm_transB1": lambda: dense_model(trans_b=1, alpha=0.5, beta=2.0, bias_shape=[5]),
    "gemm_transB0": lambda: dense_model(trans_b=0, alpha=1.5, beta=0.25, bias_shape=[1, 5]),
    "gemm_no_bias": lambda: dense_model(trans_b=0),
    "matmul_add": _matmul_add,
    "residual_add_relu": _residual,
    "concat_channels": lambda: _concat(1),
    "concat_negative_axis": lambda: _concat(-3),
    "flatten_gemm": lambda: _head("flatten", softmax=False),
    "reshape_gemm_softmax": lambda: _head("reshape", softmax=True),
    "gap": _gap_model,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_onnxruntime(tmp_path: Path, case: str) -> None:
    model = CASES[case]()
    x = rng(42).normal(size=_input_shape(model)).astype(np.float32)
    graph = _canonical(model, tmp_path, batch=x.shape[0])
    assert all(n.op in CANONICAL_OPS for n in graph.nodes)
    graph.validate()
    ref = run_ort(model, x)
    got = float_eval.run(graph, x)
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=RTOL * float(np.abs(ref).max()))


# --------------------------------------------------------------------------- structure

def test_conv_bn_relu_becomes_one_conv(tmp_path: Path) -> None:
    graph = _canonical(conv_bn_relu_model(bias=False), tmp_path)
    (conv,) = graph.nodes
    assert conv.op == "conv" and conv.output == graph.output == "y"
    assert conv.attrs["act"] == (0.0, float("inf"))
    assert conv.params["b"].shape == (8,) and conv.params["w"].dtype == np.float32
    assert set(graph.shapes) == {"x", "y"}


def test_relu6_and_dense_act(tmp_path: Path) -> None:
    graph = _canonical(conv_bn_relu_model(act="relu6"), tmp_path)
    assert graph.nodes[0].attrs["act"] == (0.0, 6.0)
    graph = _canonical(_matmul_add(), tmp_path)
    (dense,) = graph.nodes
    assert dense.op == "dense" and dense.params["w"].shape == (6, 10)
    assert dense.attrs["act"] == (0.0, float("inf")) and dense.output == "y"


def test_residual_structure(tmp_path: Path) -> None:
    graph = _canonical(_residual(), tmp_path)
    assert [n.op for n in graph.nodes] == ["conv", "conv", "add"]
    assert graph.nodes[0].output == "ar"  # Conv+BN+Relu keeps the Relu's tensor name
    assert graph.nodes[2].attrs["act"] == (0.0, float("inf"))


def test_shape_op_attrs(tmp_path: Path) -> None:
    flat = _canonical(_head("flatten", softmax=False), tmp_path)
    assert [n.op for n in flat.nodes] == ["conv", "maxpool", "flatten", "dense"]
    assert flat.nodes[2].attrs["axis"] == 1
    resh = _canonical(_head("reshape", softmax=True), tmp_path)
    assert resh.nodes[2].op == "reshape" and resh.nodes[2].attrs["shape"] == (1, 32)
    assert resh.nodes[-1].op == "softmax" and resh.nodes[-1].attrs["axis"] == 1
    assert _canonical(_concat(-3), tmp_path).nodes[-1].attrs["axis"] == 1


def test_clip_missing_bound_is_infinite(tmp_path: Path) -> None:
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2]),
             helper.make_node("Clip", ["p", "", "hi"], ["y"], name="clip")]
    graph = _canonical(make_model(nodes, [init("hi", np.array(1.5))], [1, 1, 4, 4]), tmp_path)
    assert graph.nodes[-1].op == "clip"
    assert (graph.nodes[-1].attrs["lo"], graph.nodes[-1].attrs["hi"]) == (-np.inf, 1.5)


def test_identity_only_model(tmp_path: Path) -> None:
    graph = _canonical(make_model([helper.make_node("Identity", ["x"], ["y"])], [], [1, 4]),
                       tmp_path)
    assert graph.nodes == () and graph.output == graph.input == "x"


def test_prepare_is_idempotent(tmp_path: Path) -> None:
    once = _canonical(_residual(), tmp_path)
    twice = prepare(once)
    assert [(n.op, n.output, dict(n.attrs)) for n in twice.nodes] == \
        [(n.op, n.output, dict(n.attrs)) for n in once.nodes]


def test_prepare_is_pure(tmp_path: Path) -> None:
    imported = import_onnx(conv_bn_relu_model())  # unfolded: prepare has work to do
    w_before = imported.nodes[0].params["w"].copy()
    prepare(imported)
    assert [n.op for n in imported.nodes] == ["Conv", "BatchNormalization", "Relu", "Identity"]
    assert np.array_equal(imported.nodes[0].params["w"], w_before)


def test_debug_dump_after_each_rewrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("QCOMPILE_DEBUG", "1")
    _canonical(conv_bn_relu_model(), tmp_path)
    err = capsys.readouterr().err
    for rewrite in REWRITES:
        assert f"after {rewrite.__name__}" in err


# --------------------------------------------------------------------------- refusals

def _refused(model: onnx.ModelProto, tmp_path: Path) -> str:
    with pytest.raises(UnsupportedOpError) as err:
        _canonical(model, tmp_path)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_unfoldable_batchnorm_is_affine(tmp_path: Path) -> None:
    inits: list[TensorProto] = []
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2]),
             bn_node("lonely_bn", "p", "y", 3, rng(0), inits)]
    g = _canonical(make_model(nodes, inits, [1, 3, 4, 4]), tmp_path)
    assert [n.op for n in g.nodes] == ["maxpool", "affine"]
    assert g.nodes[1].params["scale"].shape == (1, 3, 1, 1)


def test_batchnorm_after_shared_conv_is_affine(tmp_path: Path) -> None:
    r = rng(1)
    inits: list[TensorProto] = []
    nodes = [conv_node("c", "x", "a", r.normal(size=(2, 2, 1, 1)), None, inits),
             bn_node("bn", "a", "b", 2, r, inits),
             helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    g = _canonical(make_model(nodes, inits, [1, 2, 3, 3]), tmp_path)
    assert [n.op for n in g.nodes] == ["conv", "affine", "add"]


def test_softmax_not_last(tmp_path: Path) -> None:
    nodes = [helper.make_node("Softmax", ["x"], ["s"], name="sm", axis=1),
             helper.make_node("Relu", ["s"], ["y"])]
    assert "'sm' (op Softmax)" in _refused(make_model(nodes, [], [2, 5]), tmp_path)


def test_constant_add_without_conv_is_affine(tmp_path: Path) -> None:
    nodes = [helper.make_node("Add", ["x", "c"], ["y"], name="shift")]
    g = _canonical(make_model(nodes, [init("c", np.arange(4.0))], [1, 4]), tmp_path)
    (n,) = g.nodes
    assert n.op == "affine" and np.array_equal(n.params["shift"], np.arange(4.0)[None])


def test_broadcasting_add(tmp_path: Path) -> None:
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["g"]),
             helper.make_node("Add", ["x", "g"], ["y"], name="bcast")]
    g = _canonical(make_model(nodes, [], [1, 2, 3, 3]), tmp_path)
    assert g.nodes[-1].op == "add" and g.nodes[-1].attrs["signs"] == (1, 1)


def test_division_by_activation_refused(tmp_path: Path) -> None:
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Div", ["x", "r"], ["y"], name="ratio")]
    assert "'ratio' (op Div)" in _refused(make_model(nodes, [], [1, 4]), tmp_path)
