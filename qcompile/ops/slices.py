"""slice: attrs begin, end, step (one entry per axis, non-negative, clamped).

ONNX Split becomes one slice per output, so the graph stays single-output per node.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper
from tvm import relax

from qcompile.ir.graph import Graph
from qcompile.ir.node import Node
from qcompile.ir.qgraph import QNode
from qcompile.ops import exporting, float_relax
from qcompile.ops.base import OnnxOp, OpDef
from qcompile.ops.contexts import FloatContext, ImportContext, LowerContext
from qcompile.ops.importing import ints, shape_of
from qcompile.ops.lowering import R, stored_order
from qcompile.ops.quantizing import quantize_passthrough
from qcompile.ops.rewriting import keep_batch
from qcompile.verify import oracle


def _slice(ctx: ImportContext) -> Node:
    shape = shape_of(ctx, 0)
    rank = len(shape)
    if "starts" in ctx.attrs:  # opset < 10
        starts, ends = tuple(ctx.attrs["starts"]), tuple(ctx.attrs["ends"])
        axes = tuple(ctx.attrs.get("axes", range(len(starts))))
        steps = (1,) * len(starts)
    else:
        starts, ends = ints(ctx, 1, "starts"), ints(ctx, 2, "ends")
        axes = ints(ctx, 3, "axes") if ctx.has(3) else tuple(range(len(starts)))
        steps = ints(ctx, 4, "steps") if ctx.has(4) else (1,) * len(starts)
    begin, end, step = [0] * rank, list(shape), [1] * rank
    for a, b, e, st in zip(axes, starts, ends, steps):
        a = a + rank if a < 0 else a
        if st <= 0:
            ctx.unsupported(f"step {st}", "only positive Slice steps are supported")
        size = shape[a]
        b = min(max(b + size if b < 0 else b, 0), size)
        e = min(max(e + size if e < 0 else e, 0), size)
        begin[a], end[a], step[a] = b, e, st
    return ctx.node((ctx.act(0),), {"begin": tuple(begin), "end": tuple(end),
                                    "step": tuple(step)}).with_(op="Slice")


def _split(ctx: ImportContext) -> list[Node]:
    """One Slice node per output: the graph stays single-output per node."""
    shape = shape_of(ctx, 0)
    rank = len(shape)
    axis = int(ctx.attrs.get("axis", 0))
    axis = axis + rank if axis < 0 else axis
    outs = list(ctx.onode.output)
    if "split" in ctx.attrs:
        sizes = tuple(ctx.attrs["split"])
    elif ctx.has(1):
        sizes = ints(ctx, 1, "split")
    else:  # equal parts; opset 18's num_outputs gives the last one the remainder
        k = len(outs)
        part = -(-shape[axis] // k)
        sizes = tuple(min(part, shape[axis] - i * part) for i in range(k))
    if len(sizes) != len(outs) or sum(sizes) != shape[axis]:
        ctx.unsupported(f"split sizes {sizes}", f"they must cover axis {axis} of {shape}")
    nodes, start = [], 0
    for i, (out, size) in enumerate(zip(outs, sizes)):
        begin, end = [0] * rank, list(shape)
        begin[axis], end[axis] = start, start + size
        start += size
        if not out:
            continue
        nodes.append(Node(op="Slice", name=f"{ctx.name}:{i}" if len(outs) > 1 else ctx.name,
                          inputs=(ctx.act(0),), output=out,
                          attrs={"begin": tuple(begin), "end": tuple(end),
                                 "step": (1,) * rank}))
    return nodes


def _canonical(g: Graph, n: Node) -> Node:
    a = n.attrs
    keep_batch(n, (a["begin"][0], a["end"][0], a["step"][0]) != (0, g.shapes[n.inputs[0]][0], 1))
    return n.with_(op="slice", attrs=dict(n.attrs))


def generic_slice(n: QNode, ctx: LowerContext, xs: Sequence[relax.Expr]) -> relax.Expr:
    a = n.attrs
    order = stored_order(len(a["begin"]))
    axes = [j for j, ax in enumerate(order) if (a["begin"][ax], a["step"][ax]) != (0, 1)
            or a["end"][ax] != ctx.qg.tensors[n.inputs[0]].shape[ax]]
    if not axes:
        return xs[0]
    return ctx.emit(R.strided_slice(xs[0], axes, [a["begin"][order[j]] for j in axes],
                                    [a["end"][order[j]] for j in axes],
                                    [a["step"][order[j]] for j in axes], assume_inbound=True))


def _float_slice(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: FloatContext
                 ) -> relax.Expr:
    """x[begin:end:step] per axis as a take of the kept indices (no strided_slice gradient)."""
    a, y = n.attrs, xs[0]
    shape = c.graph.shapes[n.inputs[0]]
    for ax in range(1, len(shape)):  # axis 0 is the batch, never sliced
        idx = np.arange(shape[ax])[int(a["begin"][ax]):int(a["end"][ax]):int(a["step"][ax])]
        if len(idx) != shape[ax]:
            y = float_relax.take(bb, y, idx, ax)
    return y


def _to_onnx(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    """Every axis but the batch (never sliced)."""
    a = n.attrs
    r = len(a["begin"])
    names = [exporting.init(inits, f"{n.name}::{k}", np.asarray(a[k][1:], np.int64), np.int64)
             for k in ("begin", "end")]
    axes = exporting.init(inits, f"{n.name}::axes", np.arange(1, r), np.int64)
    steps = exporting.init(inits, f"{n.name}::steps", np.asarray(a["step"][1:]), np.int64)
    return [helper.make_node("Slice", [n.inputs[0], *names, axes, steps], [n.output])]


SLICE = OpDef(
    name="slice",
    onnx={"Slice": OnnxOp(_slice, "strided slice (positive steps)"),
          "Split": OnnxOp(_split, "one strided slice per output", multi_output=True)},
    canonicalize={"Slice": _canonical}, quantize=quantize_passthrough, qop="slice",
    oracle=oracle.slice_, lower=generic_slice, float_relax=_float_slice, to_onnx=_to_onnx,
    passthrough=True)
