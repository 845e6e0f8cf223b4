"""add, mul and affine: sums, products and constants, each requantized to a new scale.

=========  ==================================================================
add        n activation inputs (numpy broadcasting, equal ranks); attrs signs (+-1 each,
           Sub is (1, -1)), act
mul        two activation inputs (broadcasting, equal ranks); attrs act.  y = a * b
affine     one activation input; params scale, shift (float32, broadcastable to the
           output, same rank); attrs act.  y = x * scale + shift  (Mul/Add/Sub/Div by
           a constant, a BatchNormalization that follows no conv)
=========  ==================================================================

The ONNX Add/Sub/Mul/Div/Sum/Max/Min share one handler (``elementwise``): Max and Min
with a scalar become ``clip`` (``qcompile.ops.clip``) through ``constants_to_affine``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper
from tvm import relax

from qcompile.ir.graph import Graph
from qcompile.ir.node import Node
from qcompile.ir.qgraph import QNode, QType
from qcompile.ops import exporting, float_relax
from qcompile.ops.base import OnnxOp, OpDef
from qcompile.ops.contexts import FloatContext, ImportContext, LowerContext, QuantContext
from qcompile.ops.lowering import R
from qcompile.ops.quantizing import act_bounds, dyadic, rounding_term, shared_shift, signed_dyadic
from qcompile.ops.rewriting import minimal, refuse, replace_ops
from qcompile.verify import oracle

AFFINE_MAX_SHIFT = 40  # x*m + c stays far inside int64 (see quantize_affine)


# --- import ---------------------------------------------------------------------------
def elementwise(ctx: ImportContext) -> Node:
    """Add/Sub/Mul/Div/Sum/Max/Min: activations in ``inputs``, at most one constant ``c``.

    ``const_at`` says where the constant stood, since Sub and Div are not symmetric."""
    n = len(ctx.onode.input)
    const_at = [i for i in range(n) if ctx.is_const(i)]
    if len(const_at) == n:
        ctx.unsupported("all-constant inputs", "nothing depends on the model input")
    if len(const_at) > 1:
        ctx.unsupported("more than one constant input", "fold the constants into one")
    params = {"c": ctx.const(const_at[0], "constant")} if const_at else {}
    acts = tuple(ctx.act(i) for i in range(n) if i not in const_at)
    return ctx.node(acts, {"const_at": const_at[0] if const_at else -1}, params)


def _batchnorm(ctx: ImportContext) -> Node:
    if ctx.attrs.get("training_mode", 0):
        ctx.unsupported("training_mode=1", "export the model in inference mode")
    params = {role: ctx.const(i, role)
              for i, role in enumerate(("scale", "bias", "mean", "var"), start=1)}
    return ctx.node((ctx.act(0),), {"epsilon": float(ctx.attrs.get("epsilon", 1e-5))}, params)


# --- prepare --------------------------------------------------------------------------
def constants_to_affine(graph: Graph) -> Graph:
    """Add/Sub/Mul/Div with one constant -> affine; Max/Min with a scalar -> Relu-like clip."""
    def rule(g: Graph, n: Node) -> Node | None:
        if n.op not in ("Add", "Sub", "Mul", "Div", "Max", "Min") or "c" not in n.params:
            return None
        rank = len(g.shapes[n.output])
        c = n.params["c"].astype(np.float64)
        if c.ndim > rank or len(g.shapes[n.inputs[0]]) != rank:
            raise refuse(n, f"broadcasts a constant of shape {c.shape} to rank {rank}")
        c = c.reshape((1,) * (rank - c.ndim) + c.shape)
        if n.op in ("Max", "Min"):
            if c.size != 1:
                raise refuse(n, "takes the max/min with a non-scalar constant")
            v = float(c.reshape(()))
            lohi = {"min": v} if n.op == "Max" else {"max": v}
            return n.with_(op="Clip", attrs=lohi, params={})
        one, zero = np.ones_like(c), np.zeros_like(c)
        const_first = n.attrs.get("const_at", 1) == 0
        if n.op == "Div" and const_first:
            raise refuse(n, "divides a constant by an activation; only division by a "
                            "constant is supported")
        scale: np.ndarray
        shift: np.ndarray
        with np.errstate(divide="ignore"):
            scale, shift = {
                "Add": (one, c), "Mul": (c, zero), "Div": (1.0 / c, zero),
                "Sub": (-one, c) if const_first else (one, -c)}[n.op]
        if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
            raise refuse(n, "has a constant that makes the result infinite (division by 0)")
        scale, shift = minimal(scale), minimal(shift)
        if scale.shape[0] != 1 or shift.shape[0] != 1:
            raise refuse(n, "has a constant that varies along the batch axis (0)")
        return n.with_(op="affine", attrs={"act": None},
                       params={"scale": scale.astype(np.float32),
                               "shift": shift.astype(np.float32)})
    return replace_ops(graph, rule)


def elementwise_to_canonical(graph: Graph) -> Graph:
    """Add/Sub/Sum of activations -> add with signs; Mul of two activations -> mul."""
    def rule(g: Graph, n: Node) -> Node | None:
        if n.op not in ("Add", "Sub", "Sum", "Mul", "Div", "Max", "Min"):
            return None
        ranks = {len(g.shapes[t]) for t in n.inputs}
        if n.op in ("Div", "Max", "Min"):
            raise refuse(n, f"of two activations is not supported ({n.op} needs a "
                            "constant operand)")
        if len(ranks) != 1:
            raise refuse(n, f"broadcasts inputs of ranks {sorted(ranks)}; only equal ranks")
        if len(n.inputs) == 1:  # Sum of one tensor
            return n.with_(op="add", attrs={"signs": (1,), "act": None})
        if n.op == "Mul":
            return n.with_(op="mul", attrs={"act": None})
        signs = (1, -1) if n.op == "Sub" else (1,) * len(n.inputs)
        return n.with_(op="add", attrs={"signs": signs, "act": None})
    return replace_ops(graph, rule)


# --- quantize -------------------------------------------------------------------------
def requantized_output(q: QuantContext, n: Node, signed: bool = True) -> tuple[float, int, int]:
    """Type, scale and clip bounds of a requantizing op's output (registered): signed
    unless ``signed`` is False or a fused ReLU-like act keeps it >= 0."""
    act = n.attrs.get("act")
    qt = QType(q.out_bits(n.output), signed and (act is None or act[0] < 0))
    sy = q.calibrated(n.output, qt, act[1] if act else math.inf)
    q.add_tensor(n.output, qt, sy)
    return (sy, *act_bounds(act, qt, sy))


def quantize_add(q: QuantContext, n: Node) -> QNode:
    """y = sum_i sign_i * x_i (broadcasting): one shared-shift dyadic sum."""
    xs = [q.t[i] for i in n.inputs]
    sy, lo, hi = requantized_output(q, n)
    signs = tuple(n.attrs.get("signs", (1,) * len(xs)))
    # 22-bit multipliers keep sum(x_i*m_i) + r inside int32 for 8-bit inputs, so the
    # add can run in 32-bit lanes (2x the width of int64, and no vpmullq); the
    # relative error 2^-22 is far below the 8-bit output's resolution.
    ms, r, s = shared_shift([float(x.scale) / sy for x in xs], m_bits=22)
    ms = [np.int64(sg) * np.int64(m) for sg, m in zip(signs, ms)]
    bound = sum(max(-x.qtype.qmin, x.qtype.qmax) * abs(int(m)) for x, m in zip(xs, ms)) + int(r)
    return QNode("qadd", n.name, n.inputs, n.output,
                 {"lo": lo, "hi": hi, "acc_dtype": "int32" if bound < (1 << 31) else "int64"},
                 {**{f"m{i}": m for i, m in enumerate(ms)}, "r": r, "s": s})


def quantize_mul(q: QuantContext, n: Node) -> QNode:
    """y = a * b (broadcasting): the int16 product times one dyadic factor."""
    a, b = (q.t[i] for i in n.inputs)
    sy, lo, hi = requantized_output(q, n, a.qtype.signed or b.qtype.signed)
    m, r, s = dyadic(float(a.scale) * float(b.scale) / sy)
    return QNode("qmul", n.name, n.inputs, n.output, {"lo": lo, "hi": hi},
                 {"m": m, "r": r, "s": s})


def quantize_affine(q: QuantContext, n: Node) -> QNode:
    """y = x * scale + shift with array constants: (x*m + c) >> s, m signed."""
    x = q.t[n.inputs[0]]
    sy, lo, hi = requantized_output(q, n)
    M = float(x.scale) * n.params["scale"].astype(np.float64) / sy
    m, s = signed_dyadic(M, max_shift=AFFINE_MAX_SHIFT)
    # c carries the shift and the rounding term; past +-2^47 the result saturates
    # either way (|x*m| < 2^39), so clamping keeps int64 safe and changes nothing.
    c = np.round(np.ldexp(n.params["shift"].astype(np.float64) / sy, int(s)))
    params: dict[str, Any] = {  # s stays a NumPy scalar, as the artifact has always had it
        "m": m, "c": np.clip(c, -(1 << 47), 1 << 47).astype(np.int64) + rounding_term(s),
        "s": s}
    return QNode("qaffine", n.name, n.inputs, n.output, {"lo": lo, "hi": hi}, params)


# --- lower (generic) ------------------------------------------------------------------
def generic_qadd(n: QNode, ctx: LowerContext, xs: Sequence[relax.Expr]) -> relax.Expr:
    # quantize proved |sum x_i*m_i + r| < 2^31 when it chose int32 lanes
    acc = n.attrs.get("acc_dtype", "int64")
    v = None
    for i, x in enumerate(xs):
        term = ctx.emit(R.multiply(R.astype(x, acc), ctx.param(f"{n.name}.m{i}",
                                                              n.params[f"m{i}"].astype(acc))))
        v = term if v is None else ctx.emit(R.add(v, term))
    v = ctx.emit(R.add(v, ctx.param(f"{n.name}.r", n.params["r"].astype(acc))))
    return ctx.clip_cast(ctx.emit(R.right_shift(v, ctx.param(f"{n.name}.s",
                                                               n.params["s"].astype(acc)))), n)


def generic_qmul(n: QNode, ctx: LowerContext, xs: Sequence[relax.Expr]) -> relax.Expr:
    prod = ctx.emit(R.multiply(R.astype(xs[0], "int32"), R.astype(xs[1], "int32")))  # < 2^16
    return ctx.requant(prod, n)


def generic_qaffine(n: QNode, ctx: LowerContext, xs: Sequence[relax.Expr]) -> relax.Expr:
    v = ctx.emit(R.multiply(R.astype(xs[0], "int64"), ctx.qparam(n, "m")))
    v = ctx.emit(R.add(v, ctx.qparam(n, "c")))
    return ctx.clip_cast(ctx.emit(R.right_shift(v, ctx.qparam(n, "s"))), n)


# --- float ----------------------------------------------------------------------------
def _float_add(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: FloatContext
               ) -> relax.Expr:
    """sum_i sign_i * x_i with NumPy broadcasting (Sub is signs (1, -1))."""
    signs = tuple(n.attrs.get("signs", (1,) * len(xs)))
    y = xs[0] if signs[0] > 0 else bb.emit(relax.op.negative(xs[0]))
    for sg, x in zip(signs[1:], xs[1:]):
        y = bb.emit(relax.op.add(y, x) if sg > 0 else relax.op.subtract(y, x))
    return float_relax.act(bb, y, n.attrs["act"], c.dtype)


def _float_mul(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: FloatContext
               ) -> relax.Expr:
    return float_relax.act(bb, bb.emit(relax.op.multiply(xs[0], xs[1])), n.attrs["act"],
                           c.dtype)


def _float_affine(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: FloatContext
                  ) -> relax.Expr:
    # Both always: a constant may broadcast the output beyond x's shape.
    y = bb.emit(relax.op.multiply(xs[0], float_relax.const(n.params["scale"], c.dtype)))
    y = bb.emit(relax.op.add(y, float_relax.const(n.params["shift"], c.dtype)))
    return float_relax.act(bb, y, n.attrs["act"], c.dtype)


# --- ONNX export ----------------------------------------------------------------------
def _onnx_add(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    """sum_i sign_i * x_i as a chain of Add/Sub (a leading minus is a Neg)."""
    pre = f"{n.name}::pre"
    signs = tuple(n.attrs.get("signs", (1,) * len(n.inputs)))
    nodes, acc = [], n.inputs[0]
    if signs[0] < 0:
        nodes.append(helper.make_node("Neg", [acc], [f"{n.name}::neg"]))
        acc = f"{n.name}::neg"
    if len(n.inputs) == 1:
        nodes.append(helper.make_node("Identity", [acc], [pre]))
    for i, (sg, x) in enumerate(zip(signs[1:], n.inputs[1:]), 1):
        out = pre if i == len(n.inputs) - 1 else f"{n.name}::sum{i}"
        nodes.append(helper.make_node("Add" if sg > 0 else "Sub", [acc, x], [out]))
        acc = out
    return [*nodes, *exporting.act_nodes(n, pre, n.attrs["act"], inits)]


def _onnx_mul(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    pre = f"{n.name}::pre"
    return [helper.make_node("Mul", list(n.inputs), [pre]),
            *exporting.act_nodes(n, pre, n.attrs["act"], inits)]


def _onnx_affine(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    pre = f"{n.name}::pre"
    scale = exporting.init(inits, f"{n.name}::scale", n.params["scale"])
    shift = exporting.init(inits, f"{n.name}::shift", n.params["shift"])
    return [helper.make_node("Mul", [n.inputs[0], scale], [f"{n.name}::scaled"]),
            helper.make_node("Add", [f"{n.name}::scaled", shift], [pre]),
            *exporting.act_nodes(n, pre, n.attrs["act"], inits)]


ADD = OpDef(
    name="add",
    onnx={"Add": OnnxOp(elementwise, "dyadic sum with broadcasting; with a constant: folded "
                                     "into the bias or a dyadic affine"),
          "Sub": OnnxOp(elementwise, "same as Add, negative multiplier"),
          "Sum": OnnxOp(elementwise, "n-ary dyadic sum")},
    rewrites=(elementwise_to_canonical,), quantize=quantize_add, qop="qadd",
    oracle=oracle.qadd, lower=generic_qadd, float_relax=_float_add, to_onnx=_onnx_add,
    requantizes=True)

MUL = OpDef(
    name="mul",
    onnx={"Mul": OnnxOp(elementwise, "int16 product x dyadic multiplier (squeeze-excitation); "
                                     "x * f(x) fuses into one table; with a constant: dyadic "
                                     "affine")},
    rewrites=(elementwise_to_canonical,), quantize=quantize_mul, qop="qmul",
    oracle=oracle.qmul, lower=generic_qmul, float_relax=_float_mul, to_onnx=_onnx_mul,
    requantizes=True)

AFFINE = OpDef(
    name="affine",
    onnx={"Div": OnnxOp(elementwise, "by a constant only: dyadic affine"),
          "BatchNormalization": OnnxOp(_batchnorm, "folded into the conv before it, else a "
                                                   "per-channel dyadic affine")},
    rewrites=(constants_to_affine,), quantize=quantize_affine, qop="qaffine",
    oracle=oracle.qaffine, lower=generic_qaffine, float_relax=_float_affine,
    to_onnx=_onnx_affine, requantizes=True)
