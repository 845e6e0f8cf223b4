"""The oracle on hand-computed cases, and its independence from what it checks."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import qcompile.ir.node
import qcompile.ir.qgraph
import qcompile.verify.oracle as ref
from qcompile.ir.qgraph import INT32, QGraph, QNode, QTensor, QType

pytestmark = pytest.mark.unit


def _imports(module) -> set[str]:
    tree = ast.parse(Path(module.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
    return names


def test_oracle_imports_numpy_only() -> None:
    """The oracle, and all it reads (qgraph and the Node record it shares with graph.py)."""
    allowed = {"__future__", "typing", "numpy", "numpy.lib.stride_tricks",
               "dataclasses", "types", "qcompile.ir.qgraph"}
    assert _imports(ref) <= allowed, _imports(ref) - allowed
    assert _imports(qcompile.ir.qgraph) <= allowed | {"qcompile.ir.node"}
    assert _imports(qcompile.ir.node) <= allowed


def _tiny_graph(m: int, s: int) -> QGraph:
    u8 = QType(8, False)
    x = QTensor("x", QType(8, True), (1, 2, 1, 1), np.float64(0.1))
    y = QTensor("y", u8, (1, 3, 1, 1), np.float64(0.2))
    w = np.array([[1, 2], [-3, 4], [127, 127]], np.int8).reshape(3, 2, 1, 1)
    node = QNode("qconv", "c", ("x",), "y",
                 {"strides": (1, 1), "pads": (0, 0, 0, 0), "dilations": (1, 1), "group": 1,
                  "raw": False, "lo": 0, "hi": 255, "acc_bound": 1000, "bits": 8},
                 {"w": w, "bias": np.array([0, 1, -5], np.int32).reshape(1, 3, 1, 1),
                  "m": np.full((1, 3, 1, 1), m, np.int64), "r": np.full((1, 3, 1, 1), 1 << (s - 1), np.int64),
                  "s": np.full((1, 3, 1, 1), s, np.int64)})
    return QGraph(x, (node,), y, {"x": x, "y": y})


def test_qconv_requant_by_hand() -> None:
    qg = _tiny_graph(m=3, s=2)  # multiply by 3/4, round half up, relu-clip to [0, 255]
    q = np.array([5, -2], np.int8).reshape(1, 2, 1, 1)
    # acc: 1*5+2*-2+0 = 1 -> 0.75 -> 1 ; -15-8+1 = -22 -> -16.5 -> -16 -> 0 ; 635-254-5=376 -> 282 -> 255
    out = ref.run_integer(qg, q)["output"].reshape(-1)
    np.testing.assert_array_equal(out, [1, 0, 255])
    assert out.dtype == np.uint8


def test_round_half_up_for_negatives() -> None:
    x = QTensor("x", QType(8, True), (1, 1, 1, 1), np.float64(1))
    y = QTensor("y", QType(8, True), (1, 1, 1, 1), np.float64(2))
    node = QNode("qadd", "a", ("x", "x"), "y", {"lo": -128, "hi": 127},
                 {"m0": np.int64(1), "m1": np.int64(0), "r": np.int64(1), "s": np.int64(1)})
    qg = QGraph(x, (node,), y, {"x": x, "y": y})
    q = np.array([-3, -2, -1, 1, 3], np.int8).reshape(5, 1, 1, 1)
    # v/2 rounded half up: -1.5 -> -1, -1 -> -1, -0.5 -> 0, 0.5 -> 1, 1.5 -> 2
    np.testing.assert_array_equal(ref.run_integer(qg, q)["output"].reshape(-1), [-1, -1, 0, 1, 2])


def _dense_graph(k: int, bias: int) -> QGraph:
    """x (1, k) int8 -> qdense with all weights 127 and one bias -> raw int32 output."""
    x = QTensor("x", QType(8, True), (1, k), np.float64(0.1))
    y = QTensor("y", INT32, (1, 1), np.float64(0.01))
    node = QNode("qdense", "fc", ("x",), "y",
                 {"raw": True, "lo": -(2**31), "hi": 2**31 - 1, "acc_bound": 1000, "bits": 8},
                 {"w": np.full((k, 1), 127, np.int8), "bias": np.array([[bias]], np.int32)})
    return QGraph(x, (node,), y, {"x": x, "y": y})


def test_int32_accumulator_overflow_raises_instead_of_wrapping() -> None:
    # (The acc_bound attribute lies on purpose: the oracle checks the values it computes.)
    k = 133_200  # 127 * 127 * k = 2.148e9 > 2^31 - 1
    with pytest.raises(ref.Int32OverflowError, match=r"qdense 'fc': int32 accumulator overflows"):
        ref.run_integer(_dense_graph(k, 0), np.full((1, k), 127, np.int8))
    # acc + bias back in range does not excuse the accumulator itself overflowing
    with pytest.raises(ref.Int32OverflowError, match="accumulator overflows"):
        ref.run_integer(_dense_graph(k, -(2**30)), np.full((1, k), 127, np.int8))
    # the accumulator fits, acc + bias does not
    with pytest.raises(ref.Int32OverflowError, match=r"accumulator \+ bias overflows"):
        ref.run_integer(_dense_graph(2, 2**31 - 1), np.full((1, 2), 1, np.int8))
    with pytest.raises(ref.Int32OverflowError):
        ref.run_integer(_dense_graph(2, -(2**31)), np.full((1, 2), -1, np.int8))
    # right at the limits it is exact
    out = ref.run_integer(_dense_graph(2, 2**31 - 1 - 2 * 127), np.full((1, 2), 1, np.int8))
    assert out["output"].item() == 2**31 - 1
    out = ref.run_integer(_dense_graph(2, -(2**31) + 2 * 127), np.full((1, 2), -1, np.int8))
    assert out["output"].item() == -(2**31)


def test_int32_conv_accumulator_overflow_raises() -> None:
    qg = _tiny_graph(m=3, s=2)
    node = qg.nodes[0]
    bias = np.array([0, 1, 2**31 - 1], np.int32).reshape(1, 3, 1, 1)
    qg = QGraph(qg.input, (QNode(node.op, node.name, node.inputs, node.output, node.attrs,
                                 {**node.params, "bias": bias}),), qg.output, qg.tensors)
    q = np.array([5, -2], np.int8).reshape(1, 2, 1, 1)  # channel 2: acc 381 + bias
    with pytest.raises(ref.Int32OverflowError, match=r"qconv 'c'.*\+ bias"):
        ref.run_integer(qg, q)
    ref.run_integer(qg, np.array([-5, 2], np.int8).reshape(1, 2, 1, 1))  # 2^31-1 - 381 fits


def test_int32_residual_add_overflow_raises_only_in_int32_lanes() -> None:
    x = QTensor("x", QType(8, True), (1, 1, 1, 1), np.float64(1))
    y = QTensor("y", QType(8, True), (1, 1, 1, 1), np.float64(1))
    params = {"m0": np.int64(1 << 24), "m1": np.int64(1 << 24), "r": np.int64(0),
              "s": np.int64(24)}
    q = np.array([127], np.int8).reshape(1, 1, 1, 1)  # 2 * 127 * 2^24 = 4.26e9
    for dtype in ("int32", "int64"):
        node = QNode("qadd", "a", ("x", "x"), "y", {"lo": -128, "hi": 127, "acc_dtype": dtype},
                     params)
        qg = QGraph(x, (node,), y, {"x": x, "y": y})
        if dtype == "int32":
            with pytest.raises(ref.Int32OverflowError, match="qadd 'a': int32 sum"):
                ref.run_integer(qg, q)
        else:
            assert ref.run_integer(qg, q)["output"].item() == 127


def test_quantize_input_is_floor_half_up_and_saturates() -> None:
    x = QTensor("x", QType(8, True), (1, 4), np.float64(0.5))
    qg = QGraph(x, (), x, {"x": x})
    v = np.array([[0.25, -0.25, 1000.0, -1000.0]], np.float32)
    np.testing.assert_array_equal(ref.quantize_input(qg, v), [[1, 0, 127, -128]])


def test_raw_int32_output_dequantizes_per_channel() -> None:
    y = QTensor("y", INT32, (1, 2), np.array([0.5, 2.0]))
    qg = QGraph(y, (), y, {"y": y})
    np.testing.assert_allclose(ref.dequantize_output(qg, np.array([[4, 4]], np.int32)), [[2.0, 8.0]])
