"""Each canonical op is defined once (``qcompile.ops``): the registry is complete, the
tables derived from it are the ones the stages had, and every stage dispatches through it.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import qcompile.ops as ops
from qcompile.frontend import onnx_import, prepare as prep
from qcompile.frontend.onnx_export import canonical_onnx
from qcompile.ir.graph import LAYER_OPS, PASSTHROUGH_OPS, Graph
from qcompile.ir.qgraph import QOPS
from qcompile.lower import emit
from qcompile.mixed import float_model
from qcompile.ops.activations import ACTIVATIONS, NO_GRADIENT_FUNCTIONS
from qcompile.quant.calibrate import MinMaxObserver
from qcompile.quant.quantize import calibration_tensors, quantize_graph
from qcompile.verify import oracle

pytestmark = pytest.mark.unit

# The sets as they stood before the registry (ir.graph.CANONICAL_OPS, onnx_ops.SUPPORTED_OPS,
# quantize.REQUANTIZING_OPS): the registry must reproduce them.  Adding an op adds it here.
CANONICAL = {"conv", "dense", "add", "mul", "affine", "lut", "clip", "maxpool", "avgpool", "gap",
             "lrn", "pad", "transpose", "slice", "gather", "flatten", "reshape", "concat",
             "softmax"}
REQUANTIZING = {"conv", "dense", "add", "mul", "affine", "lut", "lrn", "avgpool", "gap", "concat"}
TABLES = {"Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "LeakyRelu", "Elu", "Celu", "Selu",
          "ThresholdedRelu", "Gelu", "Softplus", "Softsign", "Mish", "Erf", "Exp", "Log", "Sqrt",
          "Reciprocal", "Abs", "Neg", "Sin", "Cos", "Sign", "Floor", "Ceil", "Round", "Shrink"}
SUPPORTED = TABLES | {
    "Conv", "MaxPool", "AveragePool", "BatchNormalization", "Clip", "Gemm", "MatMul", "Reshape",
    "Squeeze", "Unsqueeze", "Dropout", "Concat", "Relu", "GlobalAveragePool", "Flatten",
    "Softmax", "Identity", "Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "PRelu", "Pad",
    "Transpose", "Slice", "Split", "Resize", "Upsample", "ReduceMean", "ReduceSum", "ReduceMax",
    "GlobalMaxPool", "LRN", "Cast"}


# --------------------------------------------------------------------------- completeness

def test_every_op_has_every_part() -> None:
    assert ops.check() == []
    for name, d in ops.OPS.items():
        for part in ops.base.PARTS:  # given, or absent with its reason
            assert getattr(d, part) or d.absent[part].strip(), (name, part)
    # softmax is the one op that never enters the integer core, and it says why
    assert {k for k, d in ops.OPS.items() if d.absent} == {"softmax"}
    assert set(ops.OPS["softmax"].absent) == set(ops.base.PARTS) - {"onnx"}


def test_every_onnx_op_has_a_handler_and_a_doc_line() -> None:
    assert set(ops.ONNX_OPS) == ops.SUPPORTED_OPS == set(ops.LOWERED_AS)
    for t, o in ops.ONNX_OPS.items():
        assert callable(o.handler) and o.doc.strip(), t
    assert [t for t, o in ops.ONNX_OPS.items() if o.multi_output] == ["Split"]


def test_every_qop_has_an_oracle_and_a_generic_lowering() -> None:
    produced = {d.qop for d in ops.OPS.values() if d.quantize is not None}
    assert produced == ops.QOPS == set(ops.ORACLES) == set(ops.LOWERINGS)
    assert all(d.qop is not None for d in ops.OPS.values() if d.quantize is not None)


def test_the_check_can_fail() -> None:
    """A part removed, an explanation removed, a doc line emptied, an ONNX op claimed twice:
    each is reported by name."""
    def broken(name: str, **changes: object) -> dict[str, ops.OpDef]:
        return {**ops.OPS, name: replace(ops.OPS[name], **changes)}

    assert ops.check(broken("lrn", lower=None)) == [
        "lrn: no lower (give it, or say why in absent)"]
    assert ops.check(broken("conv", oracle=None, float_relax=None)) == [
        "conv: no oracle (give it, or say why in absent)",
        "conv: no float_relax (give it, or say why in absent)"]
    no_reasons = ops.check(broken("softmax", absent={}))
    assert len(no_reasons) == 6 and all(p.startswith("softmax: no ") for p in no_reasons)
    assert ops.check(broken("softmax", absent={**ops.OPS["softmax"].absent, "lower": " "})) == [
        "softmax: no lower (give it, or say why in absent)"]
    assert ops.check(broken("softmax", absent={**ops.OPS["softmax"].absent, "shape": "?"})) == [
        "softmax: absent names an unknown part 'shape'"]
    lrn_onnx = dict(ops.OPS["lrn"].onnx)
    lrn_onnx["LRN"] = replace(lrn_onnx["LRN"], doc="")
    assert ops.check(broken("lrn", onnx=lrn_onnx)) == ["ONNX op LRN: no doc line (docs/ops.md)"]
    twice = broken("gap", onnx={**ops.OPS["gap"].onnx, "MaxPool": ops.OPS["maxpool"].onnx["MaxPool"]})
    assert ops.check(twice) == ["gap: ONNX op MaxPool is already imported by maxpool"]
    assert ops.check(broken("flatten", qop="reshape")) == [
        "reshape: integer op reshape is already produced by flatten"]


# --------------------------------------------------------------------------- derived tables

def test_derived_tables_equal_the_old_ones() -> None:
    assert ops.CANONICAL_OPS == CANONICAL
    assert ops.QOPS == QOPS  # ir.qgraph's contract: what QNode accepts and the oracle reads
    assert ops.SUPPORTED_OPS == SUPPORTED
    assert ops.REQUANTIZING_OPS == REQUANTIZING
    assert ops.PASSTHROUGH == PASSTHROUGH_OPS  # ir.graph's, which Graph.source_of follows
    assert LAYER_OPS <= ops.CANONICAL_OPS
    assert set(ACTIVATIONS) == TABLES and set(ops.OPS["lut"].onnx) == TABLES | {"PRelu"}
    assert NO_GRADIENT_FUNCTIONS == {"Floor", "Ceil", "Round"}
    assert onnx_import.SUPPORTED_OPS is ops.SUPPORTED_OPS


def test_stage_tables_are_the_registrys() -> None:
    """The oracle keeps its own table (it may not import the registry): the same functions."""
    assert oracle.OPS == dict(ops.ORACLES)
    assert emit.GENERIC == dict(ops.LOWERINGS)
    assert float_model.EMITTERS == dict(ops.FLOAT_BUILDERS)
    assert set(ops.TO_ONNX) == ops.CANONICAL_OPS - {"softmax"}


def test_prepare_places_every_rewrite_once() -> None:
    names = [r.__name__ for r in prep.REWRITES]
    assert len(names) == len(set(names)) == len(prep.ORDER)
    assert set(ops.REWRITES) <= set(names)
    assert names[0] == "drop_identity" and names[-1] == "prune_shapes"
    # the node rules of the order-free pass: one owner per imported op type
    owners = [t for d in ops.OPS.values() for t in d.canonicalize]
    assert len(owners) == len(set(owners)) == len(ops.NODE_RULES)


# --------------------------------------------------------------------------- end to end

def _every_op_model() -> onnx.ModelProto:
    """One model whose canonical graph holds every canonical op."""
    r = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in {
        "w1": r.normal(0, .3, (4, 3, 3, 3)), "b1": r.normal(0, .1, 4),
        "w2": r.normal(0, .3, (4, 3, 3, 3)), "b2": r.normal(0, .1, 4),
        "c": r.normal(0, .5, (4, 1, 1)), "lo": 0.0, "hi": 6.0,
        "wf": r.normal(0, .3, (5, 8)), "bf": r.normal(0, .1, 5)}.items()]
    inits += [numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in {
        "pads": [0, 0, 1, 1, 0, 0, 1, 1], "rpads": [0, 0, 1, 0, 0, 0, 1, 0],
        "st": [1], "en": [9], "ax": [2], "shape": [1, 8]}.items()]
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),      # conv
        node("Relu", ["c1"], ["r1"]),                                     # its act
        node("Conv", ["x", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        node("Relu", ["c2"], ["r2"]),
        node("Sigmoid", ["r1"], ["s1"]),                                  # lut
        node("Mul", ["s1", "r2"], ["m"]),                                 # mul
        node("Add", ["m", "c"], ["a1"]),                                  # affine
        node("Add", ["a1", "r2"], ["a2"]),                                # add
        node("LRN", ["a2"], ["l"], size=3),                               # lrn
        node("Pad", ["l", "pads"], ["p"]),                                # pad
        node("Transpose", ["p"], ["t"], perm=[0, 1, 3, 2]),               # transpose
        node("Slice", ["t", "st", "en", "ax"], ["sl"]),                   # slice
        node("Pad", ["sl", "rpads"], ["g"], mode="reflect"),              # gather
        node("MaxPool", ["g"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),      # maxpool
        node("AveragePool", ["g"], ["ap"], kernel_shape=[2, 2], strides=[2, 2]),  # avgpool
        node("Concat", ["mp", "ap"], ["cat"], axis=1),                    # concat
        node("Clip", ["cat", "lo", "hi"], ["cl"]),                        # clip
        node("GlobalAveragePool", ["cl"], ["gp"]),                        # gap
        node("Flatten", ["gp"], ["f"]),                                   # flatten
        node("Reshape", ["f", "shape"], ["rs"]),                          # reshape
        node("Gemm", ["rs", "wf", "bf"], ["logits"], transB=1),           # dense
        node("Softmax", ["logits"], ["y"], axis=1),                       # softmax
    ]
    g = helper.make_graph(nodes, "every_op",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _canonical() -> Graph:
    return prep.prepare(onnx_import.import_onnx(_every_op_model()))


def test_every_stage_dispatches_every_op_through_the_registry() -> None:
    """Quantize, oracle, generic lowering, float module and ONNX export of a graph that
    holds every canonical op: each integer node is its canonical op's ``qop``."""
    g = _canonical()
    assert {n.op for n in g.nodes} == ops.CANONICAL_OPS
    stats = {}
    for k, t in enumerate(calibration_tensors(g)):
        stats[t] = MinMaxObserver()
        stats[t].update(np.linspace(-1 - k % 3, 2 + k % 3, 64))
    qg = quantize_graph(g, stats)
    canonical = {n.name: n.op for n in g.nodes}
    assert all(n.op == ops.OPS[canonical[n.name]].qop for n in qg.nodes)
    assert {n.op for n in qg.nodes} == ops.QOPS and qg.softmax_axis == 1
    y = oracle.run(qg, np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32))
    assert y.shape == (2, 5) and np.allclose(y.sum(axis=1), 1, atol=1e-5)
    lowered = emit.lower(qg, batch=2)  # Relax built, not compiled
    assert set(lowered.kernels.values()) == {"generic"} and len(lowered.kernels) == len(qg.nodes)
    fm = float_model.build_float_module(g, 2, grad=False)
    assert {"forward", "loss"} <= {gv.name_hint for gv in fm.mod.get_global_vars()}
    # the export: onnxruntime runs it to the original model's logits (softmax dropped)
    x = np.random.default_rng(2).normal(size=(1, 3, 8, 8)).astype(np.float32)
    want = _ort(_every_op_model(), {"x": x})
    feeds = {"x": x, **{f"{n.name}::w": n.params["w"] for n in g.nodes if n.op in LAYER_OPS}}
    logits = _ort(canonical_onnx(g), feeds)
    got = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(got / got.sum(axis=1, keepdims=True), want, rtol=1e-4, atol=1e-6)


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]
