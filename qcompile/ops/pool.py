"""maxpool, avgpool and gap: the window and global pools.

=========  ==================================================================
maxpool    attrs kernel (2), strides (2), pads (4), dilations (2)
avgpool    attrs kernel, strides, pads, count_include_pad (bool)
gap        global average (mean=True) or sum pool over H, W; attrs mean, keepdims
=========  ==================================================================
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper
from tvm import relax

from qcompile.errors import AccumulatorOverflowError
from qcompile.ir.graph import Graph
from qcompile.ir.node import Node
from qcompile.ir.qgraph import QNode, QType
from qcompile.ops import exporting
from qcompile.ops.base import OnnxOp, OpDef
from qcompile.ops.contexts import FloatContext, ImportContext, LowerContext, QuantContext
from qcompile.ops.importing import axes, four_d, shape_of, window_pads
from qcompile.ops.lowering import R
from qcompile.ops.quantizing import INT32_MAX, dyadic, quantize_passthrough, shared_shift
from qcompile.ops.rewriting import refuse, replace_ops
from qcompile.verify import oracle


# --- import ---------------------------------------------------------------------------
def _pool(ctx: ImportContext) -> Node:
    if ctx.attrs.get("storage_order", 0) != 0:
        ctx.unsupported("storage_order=1", "only row-major (0) pooling indices are supported")
    ceil = bool(ctx.attrs.get("ceil_mode", 0))
    attrs, ceil_extra = window_pads(ctx, tuple(ctx.attrs["kernel_shape"]), ceil)
    if ctx.op == "AveragePool":
        include = bool(ctx.attrs.get("count_include_pad", 0))
        # onnxruntime divides by the window clipped to the explicit pads, so a ceil-mode
        # extra would be counted wrongly once merged into the pads.
        if include and ceil_extra:
            ctx.unsupported("ceil_mode=1 with count_include_pad=1",
                            "the partial last window cannot be expressed with plain pads")
        if attrs["dilations"] != (1, 1):
            ctx.unsupported("dilations", "AveragePool dilation is not supported")
        attrs["count_include_pad"] = include
    return ctx.node((ctx.act(0),), attrs)


def _gap(ctx: ImportContext) -> Node:
    if len(ctx.shapes[ctx.onode.output[0]]) != 4:
        ctx.unsupported("a non-4-D input", "only (N, C, H, W) is supported")
    return ctx.node((ctx.act(0),), {})


def _reduce(ctx: ImportContext) -> Node:
    rank = len(shape_of(ctx, 0))
    over = axes(ctx, rank) or tuple(range(rank))
    if ctx.attrs.get("noop_with_empty_axes", 0) and not axes(ctx, rank):
        return ctx.node((ctx.act(0),), {}).with_(op="Identity")
    if rank != 4 or over != (2, 3):
        ctx.unsupported(f"axes {over}", "only reductions over H and W of (N, C, H, W) "
                                        "are supported")
    return ctx.node((ctx.act(0),), {"keepdims": bool(ctx.attrs.get("keepdims", 1))})


def _global_max(ctx: ImportContext) -> Node:
    four_d(ctx)
    return ctx.node((ctx.act(0),), {"keepdims": True}).with_(op="ReduceMax")


# --- prepare --------------------------------------------------------------------------
def pools_to_canonical(graph: Graph) -> Graph:
    """MaxPool -> maxpool, AveragePool -> avgpool, GlobalAveragePool -> gap."""
    def rule(g: Graph, n: Node) -> Node | None:
        if n.op == "GlobalAveragePool":
            return n.with_(op="gap", attrs={"mean": True, "keepdims": True})
        if n.op in ("ReduceMean", "ReduceSum"):
            return n.with_(op="gap", attrs={"mean": n.op == "ReduceMean",
                                            "keepdims": n.attrs["keepdims"]})
        if n.op == "ReduceMax":
            if not n.attrs["keepdims"]:
                raise refuse(n, "with keepdims=0 is not supported")
            h, w = g.shapes[n.inputs[0]][2:]
            return n.with_(op="maxpool", attrs={"kernel": (h, w), "strides": (1, 1),
                                                "pads": (0, 0, 0, 0), "dilations": (1, 1)})
        if n.op not in ("MaxPool", "AveragePool"):
            return None
        attrs = {"kernel": n.attrs["kernel_shape"], "strides": n.attrs["strides"],
                 "pads": n.attrs["pads"]}
        if n.op == "MaxPool":
            return n.with_(op="maxpool", attrs=attrs | {"dilations": n.attrs["dilations"]})
        return n.with_(op="avgpool",
                       attrs=attrs | {"count_include_pad": bool(n.attrs["count_include_pad"])})
    return replace_ops(graph, rule)


# --- quantize -------------------------------------------------------------------------
def _window_sum_check(n: Node, count: int, qt: QType, what: str) -> None:
    """Pool window sums run in int32: refuse a window whose worst case does not fit."""
    xmax = max(-qt.qmin, qt.qmax)
    if count * xmax > INT32_MAX:
        raise AccumulatorOverflowError(
            f"node {n.name!r} ({n.op}): its int32 {what} can overflow ({count} values * "
            f"max|x_q| {xmax} = {count * xmax:.3g} > 2^31-1); use a smaller input "
            "(--input-shape, --size)")


def _window_counts(in_hw: Sequence[int], out_hw: Sequence[int], attrs: Mapping[str, Any]
                  ) -> np.ndarray:
    """Divisor of each avg-pool output position (ONNX count_include_pad semantics)."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr) = attrs["kernel"], attrs["strides"], attrs["pads"]
    cnt = np.zeros(tuple(out_hw), np.float64)
    for i in range(out_hw[0]):
        h0 = i * sh - pt
        for j in range(out_hw[1]):
            w0 = j * sw - pl
            if attrs.get("count_include_pad", False):
                # padded positions count, positions past the explicit pad (ceil_mode) do not
                hh = min(h0 + kh, in_hw[0] + pb) - max(h0, -pt)
                ww = min(w0 + kw, in_hw[1] + pr) - max(w0, -pl)
            else:
                hh = min(h0 + kh, in_hw[0]) - max(h0, 0)
                ww = min(w0 + kw, in_hw[1]) - max(w0, 0)
            cnt[i, j] = hh * ww
    return cnt


def quantize_avgpool(q: QuantContext, n: Node) -> QNode:
    """Window sum times a dyadic factor per output position (its divisor varies at the
    borders); the factors share one shift."""
    x = q.t[n.inputs[0]]
    qt = QType(q.out_bits(n.output), x.qtype.signed)
    sy = q.calibrated(n.output, qt)
    oh, ow = q.g.shapes[n.output][2:]
    kh, kw = n.attrs["kernel"]
    if q.refuse_overflow:
        _window_sum_check(n, int(kh) * int(kw), x.qtype, "window sum")
    cnt = _window_counts(q.g.shapes[n.inputs[0]][2:], (oh, ow), n.attrs)
    (m,), r, s = shared_shift([float(x.scale) / (sy * cnt)])
    m = m.reshape(1, 1, oh, ow)
    attrs: dict[str, Any] = {k: tuple(n.attrs[k]) for k in ("kernel", "strides", "pads")}
    q.add_tensor(n.output, qt, sy)
    attrs.update(lo=qt.qmin, hi=qt.qmax)
    return QNode(n.op, n.name, n.inputs, n.output, attrs, {"m": m, "r": r, "s": s})


def quantize_gap(q: QuantContext, n: Node) -> QNode:
    """Sum over H, W times one dyadic factor (1 / (H*W) for a mean)."""
    x = q.t[n.inputs[0]]
    qt = QType(q.out_bits(n.output), x.qtype.signed)
    sy = q.calibrated(n.output, qt)
    h, w = q.g.shapes[n.inputs[0]][2:]
    if q.refuse_overflow:
        _window_sum_check(n, int(h) * int(w), x.qtype, "global sum")
    count = h * w if n.attrs.get("mean", True) else 1
    m, r, s = dyadic(float(x.scale) / (sy * count))
    attrs: dict[str, Any] = {"keepdims": bool(n.attrs.get("keepdims", True))}
    q.add_tensor(n.output, qt, sy)
    attrs.update(lo=qt.qmin, hi=qt.qmax)
    return QNode(n.op, n.name, n.inputs, n.output, attrs, {"m": m, "r": r, "s": s})


# --- lower (generic) ------------------------------------------------------------------
def generic_maxpool(n: QNode, ctx: LowerContext, xs: Sequence[relax.Expr]) -> relax.Expr:
    a = n.attrs
    return ctx.emit(R.nn.max_pool2d(xs[0], a["kernel"], a["strides"], a["pads"],
                                    a.get("dilations", (1, 1)), layout="NHWC"))


def generic_avgpool(n: QNode, ctx: LowerContext, xs: Sequence[relax.Expr]) -> relax.Expr:
    # Window sum as a depthwise conv with a ones kernel: integer-only, and the
    # per-position divisor becomes the dyadic multiplier m[oh, ow].
    a = n.attrs
    c = ctx.qg.tensors[n.inputs[0]].shape[1]
    ones = relax.const(np.ones((c,) + tuple(a["kernel"]) + (1,), np.int8))
    acc = ctx.emit(R.nn.conv2d(xs[0], ones, strides=a["strides"], padding=a["pads"], groups=c,
                               data_layout="NHWC", kernel_layout="OHWI", out_dtype="int32"))
    return ctx.requant(acc, n)


def generic_gap(n: QNode, ctx: LowerContext, xs: Sequence[relax.Expr]) -> relax.Expr:
    keep = n.attrs.get("keepdims", True)
    acc = ctx.emit(R.sum(R.astype(xs[0], "int32"), axis=[1, 2], keepdims=keep))
    return ctx.requant(acc, n)


# --- float ----------------------------------------------------------------------------
def _float_maxpool(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: FloatContext
                   ) -> relax.Expr:
    a = n.attrs
    return bb.emit(relax.op.nn.max_pool2d(xs[0], tuple(a["kernel"]), tuple(a["strides"]),
                                          tuple(a["pads"]), tuple(a["dilations"])))


def _float_avgpool(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: FloatContext
                   ) -> relax.Expr:
    a = n.attrs
    return bb.emit(relax.op.nn.avg_pool2d(xs[0], tuple(a["kernel"]), tuple(a["strides"]),
                                          tuple(a["pads"]),
                                          count_include_pad=bool(a["count_include_pad"])))


def _float_gap(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: FloatContext
               ) -> relax.Expr:
    keep = bool(n.attrs.get("keepdims", True))
    reduce = relax.op.mean if n.attrs.get("mean", True) else relax.op.sum
    return bb.emit(reduce(xs[0], axis=[2, 3], keepdims=keep))


# --- ONNX export ----------------------------------------------------------------------
def _onnx_maxpool(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    a = n.attrs
    return [helper.make_node("MaxPool", list(n.inputs), [n.output], kernel_shape=a["kernel"],
                             strides=a["strides"], pads=a["pads"], dilations=a["dilations"])]


def _onnx_avgpool(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    a = n.attrs
    return [helper.make_node("AveragePool", list(n.inputs), [n.output],
                             kernel_shape=a["kernel"], strides=a["strides"], pads=a["pads"],
                             count_include_pad=int(a["count_include_pad"]))]


def _onnx_gap(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    a = n.attrs
    over = exporting.init(inits, f"{n.name}::axes", [2, 3], np.int64)
    return [helper.make_node("ReduceMean" if a.get("mean", True) else "ReduceSum",
                             [n.inputs[0], over], [n.output], keepdims=int(a.get("keepdims", True)))]


MAXPOOL = OpDef(
    name="maxpool",
    onnx={"MaxPool": OnnxOp(_pool, "vectorized window max"),
          "GlobalMaxPool": OnnxOp(_global_max, "window max"),
          "ReduceMax": OnnxOp(_reduce, "over H, W: window max")},
    rewrites=(pools_to_canonical,), quantize=quantize_passthrough, qop="maxpool",
    oracle=oracle.maxpool, lower=generic_maxpool, float_relax=_float_maxpool,
    to_onnx=_onnx_maxpool, passthrough=True)

AVGPOOL = OpDef(
    name="avgpool",
    onnx={"AveragePool": OnnxOp(_pool, "window sum x dyadic factor")},
    rewrites=(pools_to_canonical,), quantize=quantize_avgpool, qop="avgpool",
    oracle=oracle.avgpool, lower=generic_avgpool, float_relax=_float_avgpool,
    to_onnx=_onnx_avgpool, requantizes=True)

GAP = OpDef(
    name="gap",
    onnx={"GlobalAveragePool": OnnxOp(_gap, "global sum x dyadic factor"),
          "ReduceMean": OnnxOp(_reduce, "over H, W: global sum x dyadic factor"),
          "ReduceSum": OnnxOp(_reduce, "over H, W: global sum x dyadic factor")},
    rewrites=(pools_to_canonical,), quantize=quantize_gap, qop="gap", oracle=oracle.gap,
    lower=generic_gap, float_relax=_float_gap, to_onnx=_onnx_gap, requantizes=True)
