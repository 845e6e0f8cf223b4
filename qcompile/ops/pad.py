"""pad: constant padding; attrs pads (begin..., end...) per axis, value (float).

Reflect and edge padding become a ``gather`` of computed indices instead; a zero pad of
H and W right before a conv folds into the conv's own pads (``prepare.fold_pad``).
"""
from __future__ import annotations

import math
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
from qcompile.ops.contexts import FloatContext, ImportContext, LowerContext, QuantContext
from qcompile.ops.importing import axes, ints, shape_of
from qcompile.ops.lowering import R, stored_order
from qcompile.ops.rewriting import keep_batch, refuse
from qcompile.verify import oracle


def _pad(ctx: ImportContext) -> Node:
    rank = len(shape_of(ctx, 0))
    if "pads" in ctx.attrs:  # opset < 11
        pads, value = tuple(ctx.attrs["pads"]), float(ctx.attrs.get("value", 0.0))
    else:
        pads = ints(ctx, 1, "pads")
        value = float(ctx.const(2, "constant_value").reshape(-1)[0]) if ctx.has(2) else 0.0
    only = axes(ctx, rank, input_index=3) if "pads" not in ctx.attrs else None
    if only is not None:  # opset 18: pads only for ``axes``
        full = [0] * (2 * rank)
        k = len(only)
        for j, a in enumerate(only):
            full[a], full[rank + a] = pads[j], pads[k + j]
        pads = tuple(full)
    if len(pads) != 2 * rank:
        ctx.unsupported(f"pads of length {len(pads)}", f"need {2 * rank} for rank {rank}")
    mode = ctx.attrs.get("mode", "constant")
    if mode not in ("constant", "reflect", "edge"):
        ctx.unsupported(f"mode={mode}", "only constant, reflect and edge are supported")
    if any(p < 0 for p in pads):
        ctx.unsupported("negative pads (cropping)", "use Slice to crop")
    return ctx.node((ctx.act(0),), {"pads": pads, "mode": mode, "value": value})


def _canonical(g: Graph, n: Node) -> Node:
    """Constant Pad -> pad; reflect/edge -> a gather of computed indices per padded axis."""
    pads, rank = n.attrs["pads"], len(g.shapes[n.inputs[0]])
    keep_batch(n, bool(pads[0] or pads[rank]))
    if n.attrs["mode"] == "constant":
        return n.with_(op="pad", attrs={"pads": tuple(pads), "value": n.attrs["value"]})
    shape = g.shapes[n.inputs[0]]
    idx = {}
    for ax in range(rank):
        before, after = pads[ax], pads[rank + ax]
        if not before and not after:
            continue
        size = shape[ax]
        i = np.arange(-before, size + after)
        if n.attrs["mode"] == "edge":
            i = np.clip(i, 0, size - 1)
        else:
            if before >= size or after >= size:
                raise refuse(n, f"reflects {max(before, after)} values on an axis of {size}")
            i = np.abs(i)
            i = np.where(i >= size, 2 * (size - 1) - i, i)
        idx[f"idx{ax}"] = i.astype(np.int64)
    return n.with_(op="gather", attrs={"axes": tuple(int(k[3:]) for k in idx)}, params=idx)


def quantize_pad(q: QuantContext, n: Node) -> QNode:
    """The pad value rounded at the input's scale (saturated when infinite)."""
    x = q.t[n.inputs[0]]
    value = float(n.attrs["value"])
    v = np.clip(np.floor(value / float(x.scale) + 0.5) if math.isfinite(value)
                else (x.qtype.qmin if value < 0 else x.qtype.qmax),
                x.qtype.qmin, x.qtype.qmax)
    q.add_tensor(n.output, x.qtype, x.scale)
    return QNode("pad", n.name, n.inputs, n.output,
                 {"pads": tuple(n.attrs["pads"]), "value": int(v)})


def generic_pad(n: QNode, ctx: LowerContext, xs: Sequence[relax.Expr]) -> relax.Expr:
    p = n.attrs["pads"]
    rank = len(p) // 2
    width = [w for a in stored_order(rank) for w in (p[a], p[rank + a])]
    return ctx.emit(R.nn.pad(xs[0], width, "constant", int(n.attrs["value"])))


def _float_pad(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: FloatContext
               ) -> relax.Expr:
    """Constant pad as a concat with constant blocks (nn.pad has no Relax gradient)."""
    pads, value = tuple(n.attrs["pads"]), float(n.attrs["value"])
    shape = list(float_relax.shape_at_batch(c, n.inputs[0]))
    rank = len(shape)
    y = xs[0]
    for ax in range(rank):
        before, after = int(pads[ax]), int(pads[rank + ax])
        if not before and not after:
            continue
        parts = []
        for k in (before, after):
            blk = shape.copy()
            blk[ax] = k
            parts.append(float_relax.const(np.full(blk, value), c.dtype) if k else None)
        y = bb.emit(relax.op.concat([p for p in (parts[0], y, parts[1]) if p is not None],
                                    axis=ax))
        shape[ax] += before + after
    return y


def _to_onnx(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    a = n.attrs
    pads = exporting.init(inits, f"{n.name}::pads", a["pads"], np.int64)
    value = exporting.init(inits, f"{n.name}::value", float(a["value"]))
    return [helper.make_node("Pad", [n.inputs[0], pads, value], [n.output], mode="constant")]


PAD = OpDef(
    name="pad",
    onnx={"Pad": OnnxOp(_pad, "constant: integer pad (zero pads fold into the next conv); "
                              "reflect/edge: gather")},
    canonicalize={"Pad": _canonical}, quantize=quantize_pad, qop="pad", oracle=oracle.pad,
    lower=generic_pad, float_relax=_float_pad, to_onnx=_to_onnx, passthrough=True)
