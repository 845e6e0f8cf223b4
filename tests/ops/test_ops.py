"""The ops of today's CNN families, each on a tiny generated model: compiled on the kernel
path, bit-exact against the NumPy oracle, integer-only, and close to onnxruntime FP32."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.helpers.onnx_builders import conv_node, init, make_model, rng, save
from qcompile import api
from qcompile.ops.activations import UNARY_FUNCTIONS, evaluate
from qcompile.config import QuantSpec
from qcompile.ir.graph import Graph, Node
from qcompile.ir.qgraph import QType
from qcompile.quant.quantize import quantize_graph


class _Stats:
    def __init__(self, t: float) -> None:
        self.t, self.min = t, -t

    def threshold(self, signed: bool, bits: int) -> float:
        return self.t


def _conv(name: str, x: str, y: str, cin: int, cout: int, inits: list, seed: int = 0,
          k: int = 3) -> onnx.NodeProto:
    r = rng(seed)
    return conv_node(name, x, y, r.normal(0, 0.4, (cout, cin, k, k)), r.normal(0, 0.1, cout),
                     inits, pads=[k // 2] * 4)


def _luts() -> tuple[list, list, list, int]:
    ins: list = []
    fns = ["Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu", "Softplus",
           "Mish", "Gelu", "Erf", "Softsign", "Selu"]
    nodes = [_conv("c", "x", "c", 3, 4, ins)]
    nodes += [helper.make_node(f, ["c"], [f"o{i}"], name=f) for i, f in enumerate(fns)]
    nodes.append(helper.make_node("Concat", [f"o{i}" for i in range(len(fns))], ["y"], axis=1))
    return nodes, ins, [1, 3, 6, 6], 20  # Gelu is opset 20, Mish 18


def _silu_prelu() -> tuple[list, list, list, int]:
    ins: list = [init("slope", rng(1).uniform(0.05, 0.5, (4, 1, 1)))]
    nodes = [_conv("c", "x", "c", 3, 4, ins),
             helper.make_node("Sigmoid", ["c"], ["s"]),
             helper.make_node("Mul", ["c", "s"], ["silu"], name="silu"),
             _conv("d", "silu", "d", 4, 4, ins, seed=1),
             helper.make_node("PRelu", ["d", "slope"], ["y"], name="prelu")]
    return nodes, ins, [1, 3, 6, 6], 17


def _squeeze_excite() -> tuple[list, list, list, int]:
    ins: list = []
    nodes = [_conv("c", "x", "c", 3, 8, ins), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             _conv("fc1", "g", "f1", 8, 4, ins, seed=2, k=1),
             _conv("fc2", "f1", "f2", 4, 8, ins, seed=3, k=1),
             helper.make_node("HardSigmoid", ["f2"], ["hs"], alpha=1 / 6),
             helper.make_node("Mul", ["r", "hs"], ["y"], name="excite")]
    return nodes, ins, [1, 3, 7, 7], 17


def _add_sub_sum() -> tuple[list, list, list, int]:
    ins: list = []
    nodes = [_conv("a", "x", "a", 3, 4, ins), _conv("b", "x", "b", 3, 4, ins, seed=1),
             helper.make_node("GlobalAveragePool", ["b"], ["gb"]),
             helper.make_node("Sub", ["a", "gb"], ["d"], name="sub"),
             helper.make_node("Sum", ["a", "b", "d"], ["y"], name="sum3")]
    return nodes, ins, [1, 3, 6, 6], 17


def _affine() -> tuple[list, list, list, int]:
    r = rng(3)
    ins: list = [init("k", r.uniform(-2, 2, (1, 4, 1, 1))), init("two", np.array(2.0)),
                 init("off", r.normal(0, 1, (4, 1, 1)))]
    bn = {"scale": r.uniform(0.5, 1.5, 4), "bias": r.normal(0, .5, 4),
          "mean": r.normal(0, .5, 4), "var": r.uniform(.5, 2, 4)}
    ins += [init(f"bn_{k}", v) for k, v in bn.items()]
    nodes = [_conv("c", "x", "c", 3, 4, ins), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Mul", ["r", "k"], ["m"], name="scale"),
             helper.make_node("Div", ["m", "two"], ["dv"], name="half"),
             helper.make_node("Sub", ["off", "dv"], ["s"], name="flip"),
             helper.make_node("MaxPool", ["s"], ["p"], kernel_shape=[2, 2]),
             helper.make_node("BatchNormalization", ["p"] + [f"bn_{k}" for k in bn], ["y"],
                              name="lonely_bn")]
    return nodes, ins, [1, 3, 6, 6], 17


def _reductions() -> tuple[list, list, list, int]:
    r = rng(4)
    ins: list = [init("w", r.normal(0, .3, (5, 8))), init("b", r.normal(0, .1, 5))]
    nodes = [_conv("c", "x", "c", 3, 4, ins),
             helper.make_node("GlobalMaxPool", ["c"], ["gm"]),
             helper.make_node("ReduceSum", ["c", "axes"], ["rs"], keepdims=1),
             helper.make_node("Concat", ["gm", "rs"], ["cat"], axis=1),
             helper.make_node("ReduceMean", ["cat"], ["rm"], axes=[2, 3], keepdims=0),
             helper.make_node("Gemm", ["rm", "w", "b"], ["y"], transB=1)]
    ins.append(init("axes", np.array([2, 3])))
    return nodes, ins, [1, 3, 6, 6], 17


def _pads() -> tuple[list, list, list, int]:
    ins: list = [init("p_zero", np.array([0, 0, 1, 2, 0, 0, 1, 0])),
                 init("p_hw", np.array([0, 0, 1, 1, 0, 0, 2, 1])), init("v", np.array(0.5))]
    nodes = [helper.make_node("Pad", ["x", "p_zero"], ["z"], name="zero_pad"),
             _conv("c", "z", "c", 3, 4, ins),
             helper.make_node("Pad", ["c", "p_hw"], ["refl"], mode="reflect"),
             helper.make_node("Pad", ["refl", "p_hw"], ["edge"], mode="edge"),
             helper.make_node("Pad", ["edge", "p_hw", "v"], ["y"], mode="constant")]
    return nodes, ins, [1, 3, 6, 6], 17


def _nhwc_transpose() -> tuple[list, list, list, int]:
    ins: list = []
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             _conv("c", "t", "c", 3, 4, ins),
             helper.make_node("Transpose", ["c"], ["h"], perm=[0, 1, 3, 2]),
             helper.make_node("Transpose", ["h"], ["y"], perm=[0, 2, 3, 1])]
    return nodes, ins, [1, 6, 5, 3], 17


def _slices_and_shapes() -> tuple[list, list, list, int]:
    ins: list = [init("sp", np.array([1, 3])), init("st", np.array([1])),
                 init("en", np.array([5])), init("ax", np.array([2])),
                 init("shape", np.array([1, 2, 2, 4, 6])), init("ax2", np.array([2]))]
    nodes = [_conv("c", "x", "c", 3, 4, ins),
             helper.make_node("Split", ["c", "sp"], ["s1", "s2"], axis=1),
             helper.make_node("Concat", ["s2", "s1"], ["cat"], axis=1),
             helper.make_node("Slice", ["cat", "st", "en", "ax"], ["sl"]),
             helper.make_node("Reshape", ["sl", "shape"], ["r5"]),
             helper.make_node("Unsqueeze", ["r5", "ax2"], ["un"]),
             helper.make_node("Squeeze", ["un", "ax2"], ["sq"]),
             helper.make_node("Flatten", ["sq"], ["y"], axis=1)]
    return nodes, ins, [1, 3, 6, 6], 17


def _shuffle_resize() -> tuple[list, list, list, int]:
    ins: list = [init("s5", np.array([1, 2, 3, 6, 6])), init("s4", np.array([1, 6, 6, 6])),
                 init("scales", np.array([1.0, 1.0, 2.0, 2.0]), ),
                 init("sizes", np.array([1, 6, 9, 5]))]
    nodes = [_conv("c", "x", "c", 3, 6, ins),
             helper.make_node("Reshape", ["c", "s5"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t", "s4"], ["shuf"], name="shuffle"),
             helper.make_node("Resize", ["shuf", "", "scales"], ["up"], mode="nearest"),
             helper.make_node("Resize", ["up", "", "", "sizes"], ["y"], mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor")]
    return nodes, ins, [1, 3, 6, 6], 17


def _lrn() -> tuple[list, list, list, int]:
    ins: list = []
    nodes = [_conv("c", "x", "c", 3, 8, ins), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("LRN", ["r"], ["y"], size=5, alpha=0.5, beta=0.75, bias=1.0)]
    return nodes, ins, [1, 3, 6, 6], 17


# case -> (builder, the quantized ops the artifact must contain)
CASES: dict[str, tuple[Callable, set[str]]] = {
    "luts": (_luts, {"lut"}),
    "silu_prelu": (_silu_prelu, {"lut"}),
    "squeeze_excite": (_squeeze_excite, {"qmul", "lut"}),
    "add_sub_sum": (_add_sub_sum, {"qadd"}),
    "affine": (_affine, {"qaffine"}),
    "reductions": (_reductions, {"gap", "maxpool"}),
    "pads": (_pads, {"gather", "pad"}),
    "nhwc_transpose": (_nhwc_transpose, {"transpose"}),
    "slices_and_shapes": (_slices_and_shapes, {"slice", "reshape"}),
    "shuffle_resize": (_shuffle_resize, {"gather"}),
    "lrn": (_lrn, {"lrn"}),
}


@pytest.mark.tvm
@pytest.mark.parametrize("case", sorted(CASES))
def test_op_bit_exact_integer_only_and_faithful(case: str, tmp_path: Path) -> None:
    build, want_ops = CASES[case]
    nodes, inits, in_shape, opset = build()
    path = save(make_model(nodes, inits, in_shape, opset=opset), tmp_path)
    art = tmp_path / "art"
    res = api.compile_model(path, art, progress=False)
    # compile's own oracle check ran, and every integer-only stage found code to check
    assert res.verified.inputs == 2 and res.verified.bit_exact is True
    check = json.loads((art / "manifest.json").read_text())["intcheck"]
    assert check["stages"] == ["core", "codegen", "asm"] and check["asm"]["instructions"] > 0
    graph = json.loads((art / "qconfig.json").read_text())["graph"]
    ops = {n["op"] for n in graph["nodes"]}
    assert want_ops <= ops, f"expected {want_ops} among the quantized ops {ops}"
    with pytest.warns(UserWarning, match="synthetic"):
        ev = api.evaluate(path, art, num_samples=8, progress=False)
    assert ev.bit_exact and ev.num_samples == 8
    # Synthetic calibration on the same distribution: 8-bit stays well above 20 dB.
    assert ev.sqnr_db > 20, ev.layers


@pytest.mark.unit
def test_fusions(tmp_path: Path) -> None:
    """SiLU is one table, a zero Pad folds into the conv, the channel shuffle is one gather."""
    for build, check in [
        (_silu_prelu, lambda ops: ops.count("lut") == 2 and "qmul" not in ops),
        (_pads, lambda ops: ops.count("qconv") == 1 and ops[0] == "qconv"),
        (_shuffle_resize, lambda ops: "transpose" not in ops and "reshape" not in ops),
    ]:
        nodes, inits, in_shape, opset = build()
        m = make_model(nodes, inits, in_shape, opset=opset)
        from qcompile.frontend.onnx_import import import_onnx, load_model
        from qcompile.frontend.prepare import prepare
        g = prepare(import_onnx(load_model(save(m, tmp_path))))
        canon = {"lut": "lut", "conv": "qconv", "mul": "qmul", "transpose": "transpose",
                 "reshape": "reshape"}
        ops = [canon.get(n.op, n.op) for n in g.nodes]
        assert check(ops), (build.__name__, ops)


@pytest.mark.unit
def test_batch_axis_reshape_refused(tmp_path: Path) -> None:
    ins: list = [init("ax0", np.array([0]))]
    nodes = [_conv("c", "x", "c", 3, 4, ins),
             helper.make_node("Squeeze", ["c", "ax0"], ["s"], name="drop_batch"),
             helper.make_node("Relu", ["s"], ["y"])]
    path = save(make_model(nodes, ins, [1, 3, 6, 6]), tmp_path)
    from qcompile.errors import UnsupportedOpError
    with pytest.raises(UnsupportedOpError, match="drop_batch.*batch"):
        api.compile_model(path, tmp_path / "art", progress=False)


@pytest.mark.tvm
def test_dynamic_hw_with_input_shape(tmp_path: Path) -> None:
    ins: list = []
    nodes = [_conv("c", "x", "c", 3, 4, ins), helper.make_node("Relu", ["c"], ["y"])]
    path = save(make_model(nodes, ins, ["N", 3, "H", "W"]), tmp_path)
    art = tmp_path / "art"
    api.compile_model(path, art, progress=False, input_shape=(1, 3, 10, 7))
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["input"]["shape"] == ["N", 3, 10, 7]
    with pytest.warns(UserWarning, match="synthetic"):
        assert api.evaluate(path, art, num_samples=8, progress=False).bit_exact


@pytest.mark.unit
@pytest.mark.parametrize("fn", sorted(UNARY_FUNCTIONS) + ["PRelu"])
@pytest.mark.parametrize("bits", [8, 4])
def test_lut_within_half_a_step(fn: str, bits: int) -> None:
    """Every table entry is the float function of its input, requantized: within half an
    output step wherever the function stays inside the output range."""
    shape = (1, 3, 2, 2)
    params = {"slope": np.array([0.1, 0.25, -0.5], np.float32)} if fn == "PRelu" else {}
    g = Graph("x", shape, "y", (Node("lut", fn, ("x",), "y", {
        "fn": fn, "fn_attrs": {}, "times_x": False, "act": None}, params),),
        {"x": shape, "y": shape})
    spec = QuantSpec(bits=bits, first_last_bits=bits)
    in_scale = 3.0
    from qcompile.quant import quantize as qz
    orig = qz.activation_bits
    qz.activation_bits = lambda graph, lbits: {"x": bits}  # a 4-bit input without a layer
    try:
        qg = quantize_graph(g, {"x": _Stats(in_scale), "y": _Stats(2.0)}, spec)
    finally:
        qz.activation_bits = orig
    x, y = qg.input, qg.output
    assert x.qtype == QType(bits, True)
    table = qg.nodes[0].params["table"].astype(np.float64)
    assert table.shape == (3 if fn == "PRelu" else 1, 1 << bits)
    q = np.arange(x.qtype.qmin, x.qtype.qmax + 1)
    slope = params.get("slope")
    f = evaluate(fn, q * float(x.scale) * np.ones((len(table), 1)), {},
                 None if slope is None else slope[:, None].astype(np.float64))
    sy = float(y.scale)
    inside = np.isfinite(f) & (f >= y.qtype.qmin * sy) & (f <= y.qtype.qmax * sy)
    assert inside.any()
    err = np.abs(table * sy - f)[inside]
    assert err.max() <= sy / 2 + 1e-9, f"{fn}: max error {err.max()} > half step {sy / 2}"


@pytest.mark.unit
def test_readme_ops_table_in_sync() -> None:
    """README's table is generated from the registry: `python tools/readme_ops.py`."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, str(root / "tools" / "readme_ops.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.tvm
@pytest.mark.parametrize("opset", [7, 9])
def test_old_opsets(opset: int, tmp_path: Path) -> None:
    """Opset 7/9 spellings (Clip/Pad/Slice attributes, Upsample) compile bit-exact."""
    r = rng(0)
    ins: list = []
    up = (helper.make_node("Upsample", ["s"], ["u"], scales=[1.0, 1.0, 2.0, 2.0], mode="nearest")
          if opset == 7 else helper.make_node("Upsample", ["s", "sc"], ["u"], mode="nearest"))
    nodes = [conv_node("c", "x", "c", r.normal(0, .4, (4, 3, 3, 3)), r.normal(0, .1, 4), ins,
                       pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c"], ["cl"], min=0.0, max=6.0),
             helper.make_node("Pad", ["cl"], ["p"], pads=[0, 0, 1, 1, 0, 0, 1, 1], mode="reflect"),
             helper.make_node("Slice", ["p"], ["s"], starts=[1], ends=[7], axes=[2]), up,
             helper.make_node("MaxPool", ["u"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    if opset == 9:
        ins.append(init("sc", np.array([1.0, 1.0, 2.0, 2.0])))
    path = save(make_model(nodes, ins, [1, 3, 6, 6], opset=opset), tmp_path)
    api.compile_model(path, tmp_path / "art", progress=False)
    with pytest.warns(UserWarning, match="synthetic"):
        ev = api.evaluate(path, tmp_path / "art", num_samples=8, progress=False)
    assert ev.bit_exact and ev.sqnr_db > 20
