"""conv and dense: the layers, which carry weights, get a bit width and cost MACs.

=========  ==================================================================
conv       params w (O, I/group, kh, kw) f32, b (O,) f32;
           attrs strides (2), pads (top, left, bottom, right), dilations (2),
           group, act (lo, hi) floats or None (relu = (0, inf), relu6 = (0, 6))
dense      params w (N, K) f32, b (N,) f32; attrs act.  y = x @ w.T + b
=========  ==================================================================

Their fast kernels live with the targets (``qcompile.targets``); the generic lowering
here is TVM's legalization, the fallback every target has.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from qcompile.errors import BadModelError
from qcompile.ir.graph import Graph
from qcompile.ir.node import Node
from qcompile.ir.qgraph import INT32, QNode, QType
from qcompile.ops import exporting, float_relax
from qcompile.ops.base import OnnxOp, OpDef
from qcompile.ops.contexts import FloatContext, ImportContext, LowerContext, QuantContext
from qcompile.ops.importing import window_pads
from qcompile.ops.lowering import R
from qcompile.ops.quantizing import INT32_MAX, INT32_MIN, act_bounds, dyadic
from qcompile.ops.rewriting import channel_vector, refuse, replace_ops
from qcompile.verify import oracle


# --- import ---------------------------------------------------------------------------
def _conv(ctx: ImportContext) -> Node:
    w = ctx.const(1, "weight")
    params = {"w": w} | ({"b": ctx.const(2, "bias")} if ctx.has(2) else {})
    if "b" in params and params["b"].shape != w.shape[:1]:  # onnxruntime does not check it
        raise BadModelError(f"node {ctx.name!r} (op Conv): bias has shape {params['b'].shape}, "
                            f"the weight has {w.shape[0]} output channels; the model is invalid")
    x_shape, group = ctx.shapes.get(ctx.onode.input[0], ()), int(ctx.attrs.get("group", 1))
    if (group < 1 or w.ndim < 3 or w.shape[0] % group
            or (len(x_shape) > 1 and w.shape[1] * group != x_shape[1])
            or tuple(ctx.attrs.get("kernel_shape", w.shape[2:])) != w.shape[2:]):
        raise BadModelError(f"node {ctx.name!r} (op Conv): weight {w.shape} with group={group}"
                            f" and kernel_shape={tuple(ctx.attrs.get('kernel_shape', ()))} does "
                            f"not fit input {x_shape}; the model is invalid")
    attrs, _ = window_pads(ctx, tuple(ctx.attrs.get("kernel_shape", w.shape[2:])), ceil=False)
    return ctx.node((ctx.act(0),), attrs | {"group": int(ctx.attrs.get("group", 1))}, params)


def _gemm(ctx: ImportContext) -> Node:
    if ctx.attrs.get("transA", 0):
        ctx.unsupported("attribute transA=1", "transpose the input before Gemm")
    attrs = {"transA": 0, "transB": int(ctx.attrs.get("transB", 0)),
             "alpha": float(ctx.attrs.get("alpha", 1.0)), "beta": float(ctx.attrs.get("beta", 1.0))}
    if not (np.isfinite(attrs["alpha"]) and np.isfinite(attrs["beta"])):
        raise BadModelError(f"node {ctx.name!r} (op Gemm): alpha={attrs['alpha']} "
                            f"beta={attrs['beta']} must be finite; the model is invalid")
    params = {"w": ctx.const(1, "weight")} | ({"b": ctx.const(2, "bias")} if ctx.has(2) else {})
    return ctx.node((ctx.act(0),), attrs, params)


def _matmul(ctx: ImportContext) -> Node:
    w = ctx.const(1, "weight")
    if w.ndim != 2:
        ctx.unsupported(f"a {w.ndim}-D weight", "only a constant 2-D right operand is supported")
    return ctx.node((ctx.act(0),), {}, {"w": w})


# --- prepare --------------------------------------------------------------------------
def conv_to_canonical(graph: Graph) -> Graph:
    """Conv -> conv with explicit geometry, a zero bias when absent and no activation."""
    def rule(g: Graph, n: Node) -> Node | None:
        if n.op != "Conv":
            return None
        w = n.params["w"]
        b = n.params.get("b", np.zeros(w.shape[0], np.float32))
        attrs = {"strides": n.attrs["strides"], "pads": n.attrs["pads"],
                 "dilations": n.attrs["dilations"], "group": n.attrs["group"], "act": None}
        return n.with_(op="conv", attrs=attrs, params={"w": w, "b": b})
    return replace_ops(graph, rule)


def dense_to_canonical(graph: Graph) -> Graph:
    """Gemm (alpha/beta folded, transB either way) and MatMul -> dense with w (N, K)."""
    def rule(g: Graph, n: Node) -> Node | None:
        if n.op not in ("Gemm", "MatMul"):
            return None
        if len(g.shapes[n.inputs[0]]) != 2:
            raise refuse(n, f"needs a 2-D input, got shape {g.shapes[n.inputs[0]]}")
        w = n.params["w"]
        if n.op == "MatMul" or not n.attrs["transB"]:
            w = np.ascontiguousarray(w.T)  # ONNX stores (K, N); dense wants (N, K)
        if n.attrs.get("alpha", 1.0) != 1.0:  # one correctly rounded float32 product
            w = w * np.float32(n.attrs["alpha"])
        b = np.zeros(w.shape[0], np.float32)
        if "b" in n.params:
            c = channel_vector(n.params["b"] * np.float32(n.attrs["beta"]), g.shapes[n.output])
            if c is None:
                raise refuse(n, "has a bias C that is not one value per output column")
            b = c
        return n.with_(op="dense", attrs={"act": None}, params={"w": w, "b": b})
    return replace_ops(graph, rule)


# --- quantize -------------------------------------------------------------------------
def _bcast(v: np.ndarray, ndim: int) -> np.ndarray:
    """(C,) -> (1, C, 1, ...) so it broadcasts along axis 1 of an ndim tensor."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def quantize_layer(q: QuantContext, n: Node) -> QNode:
    """Integer weights and bias from the quantizer's weight policy, then either the raw
    int32 accumulator (the logits) or a per-output-channel dyadic requant."""
    x = q.t[n.inputs[0]]
    wq, sw, bq, acc_bound, bits = q.layer_weights(n)
    sx = float(x.scale)
    ndim = 4 if n.op == "conv" else 2
    attrs: dict[str, Any] = {"acc_bound": acc_bound, "bits": bits, "a_bits": x.qtype.bits}
    if n.op == "conv":
        attrs.update(strides=tuple(n.attrs["strides"]), pads=tuple(n.attrs["pads"]),
                     dilations=tuple(n.attrs["dilations"]), group=int(n.attrs["group"]))
        params = {"w": wq, "bias": _bcast(bq, 4)}
    else:
        params = {"w": np.ascontiguousarray(wq.T), "bias": _bcast(bq, 2)}
    act = n.attrs.get("act")
    if n.name == q.raw:
        q.add_tensor(n.output, INT32, sw * sx)
        attrs.update(raw=True, lo=INT32_MIN, hi=INT32_MAX)
    else:
        signed = act is None or act[0] < 0
        qt = QType(q.out_bits(n.output), signed)
        sy = q.calibrated(n.output, qt, act[1] if act else math.inf)
        m, r, s = dyadic(sw * sx / sy)
        lo, hi = act_bounds(act, qt, sy)
        params.update(m=_bcast(m, ndim), r=_bcast(r, ndim), s=_bcast(s, ndim))
        attrs.update(raw=False, lo=lo, hi=hi)
        q.add_tensor(n.output, qt, sy)
    op = "qconv" if n.op == "conv" else "qdense"
    return QNode(op, n.name, n.inputs, n.output, attrs, params)


# --- lower (generic) ------------------------------------------------------------------
def generic_conv(n: QNode, ctx: LowerContext, xs: Sequence[relax.Expr]) -> relax.Expr:
    a = n.attrs
    w = ctx.param(f"{n.name}.w", np.ascontiguousarray(n.params["w"].transpose(0, 2, 3, 1)))
    acc = ctx.emit(R.nn.conv2d(xs[0], w, strides=a["strides"], padding=a["pads"],
                               dilation=a["dilations"], groups=a["group"], data_layout="NHWC",
                               kernel_layout="OHWI", out_dtype="int32"))
    acc = ctx.emit(R.add(acc, ctx.qparam(n, "bias")))
    return acc if a["raw"] else ctx.requant(acc, n)


def generic_dense(n: QNode, ctx: LowerContext, xs: Sequence[relax.Expr]) -> relax.Expr:
    acc = ctx.emit(R.matmul(xs[0], ctx.qparam(n, "w"), out_dtype="int32"))
    acc = ctx.emit(R.add(acc, ctx.qparam(n, "bias")))
    return acc if n.attrs["raw"] else ctx.requant(acc, n)


# --- float ----------------------------------------------------------------------------
def _float_conv(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: FloatContext
                ) -> relax.Expr:
    a = n.attrs
    y = bb.emit(relax.op.nn.conv2d(xs[0], c.weight[n.name], strides=tuple(a["strides"]),
                                   padding=tuple(a["pads"]), dilation=tuple(a["dilations"]),
                                   groups=int(a["group"])))
    b = n.params["b"].reshape(1, -1, 1, 1)
    return float_relax.act(bb, bb.emit(relax.op.add(y, float_relax.const(b, c.dtype))),
                           a["act"], c.dtype)


def _float_dense(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: FloatContext
                 ) -> relax.Expr:
    wt = bb.emit(relax.op.permute_dims(c.weight[n.name], [1, 0]))
    y = bb.emit(relax.op.add(bb.emit(relax.op.matmul(xs[0], wt)),
                             float_relax.const(n.params["b"], c.dtype)))
    return float_relax.act(bb, y, n.attrs["act"], c.dtype)


# --- ONNX export ----------------------------------------------------------------------
def _to_onnx(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    """The layer with its weight as the graph input ``<name>::w`` and the bias as an
    initializer ``<name>::b`` (GPTQ feeds both)."""
    a, pre = n.attrs, f"{n.name}::pre"
    inits.append(numpy_helper.from_array(np.asarray(n.params["b"], np.float32), f"{n.name}::b"))
    ins = [n.inputs[0], f"{n.name}::w", f"{n.name}::b"]
    core = (helper.make_node("Conv", ins, [pre], strides=a["strides"], pads=a["pads"],
                             dilations=a["dilations"], group=a["group"])
            if n.op == "conv" else helper.make_node("Gemm", ins, [pre], transB=1))
    return [core, *exporting.act_nodes(n, pre, a["act"], inits)]


CONV = OpDef(
    name="conv",
    onnx={"Conv": OnnxOp(_conv, "VNNI implicit GEMM / depthwise kernel, dyadic requant "
                                "epilogue")},
    rewrites=(conv_to_canonical,), quantize=quantize_layer, qop="qconv", oracle=oracle.qconv,
    lower=generic_conv, float_relax=_float_conv, to_onnx=_to_onnx, requantizes=True)

DENSE = OpDef(
    name="dense",
    onnx={"Gemm": OnnxOp(_gemm, "VNNI dense kernel"),
          "MatMul": OnnxOp(_matmul, "VNNI dense kernel (constant 2-D right operand)")},
    rewrites=(dense_to_canonical,), quantize=quantize_layer, qop="qdense",
    oracle=oracle.qdense, lower=generic_dense, float_relax=_float_dense, to_onnx=_to_onnx,
    requantizes=True)
