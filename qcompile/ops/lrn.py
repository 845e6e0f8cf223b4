"""lrn: ONNX LRN across channels (attrs size, alpha, beta, bias).

y = x * (bias + alpha/size * S)^-beta with S the sum of x^2 over the channel window
[c - (size-1)//2, c + size//2].  In integers S is an exact sum of q^2 and the power a
table of dyadic multipliers indexed by S >> k.
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
from qcompile.ir.qgraph import QNode, QType
from qcompile.ops import float_relax
from qcompile.ops.base import OnnxOp, OpDef
from qcompile.ops.contexts import FloatContext, ImportContext, LowerContext, QuantContext
from qcompile.ops.importing import four_d
from qcompile.ops.lowering import R
from qcompile.ops.quantizing import shared_shift
from qcompile.verify import oracle

LRN_TABLE = 4096       # entries of the LRN power table


def _lrn(ctx: ImportContext) -> Node:
    four_d(ctx)
    a = ctx.attrs
    return ctx.node((ctx.act(0),), {"size": int(a["size"]), "alpha": float(a.get("alpha", 1e-4)),
                                    "beta": float(a.get("beta", 0.75)),
                                    "bias": float(a.get("bias", 1.0))})


def _canonical(g: Graph, n: Node) -> Node:
    return n.with_(op="lrn")


def quantize_lrn(q: QuantContext, n: Node) -> QNode:
    """ONNX LRN: y = x * (bias + alpha/size * S)^-beta, S the windowed sum of squares.

    S is an exact integer sum of q^2; the power is a table indexed by S >> shift
    (at most LRN_TABLE entries) of dyadic multipliers with one shared shift."""
    x = q.t[n.inputs[0]]
    a = n.attrs
    qt = QType(q.out_bits(n.output), x.qtype.signed)
    sy = q.calibrated(n.output, qt)
    qmax = max(-x.qtype.qmin, x.qtype.qmax)
    s_max = a["size"] * qmax * qmax
    k = max(0, math.ceil(math.log2((s_max + 1) / LRN_TABLE)))
    sq = ((np.arange((s_max >> k) + 1, dtype=np.float64) * (1 << k)) + (1 << k) / 2
          if k else np.arange(s_max + 1, dtype=np.float64))
    f = (a["bias"] + a["alpha"] / a["size"] * sq * float(x.scale) ** 2) ** -a["beta"]
    (m,), r, s = shared_shift([f * float(x.scale) / sy])
    q.add_tensor(n.output, qt, sy)
    return QNode("lrn", n.name, n.inputs, n.output,
                 {"size": a["size"], "k": k, "lo": qt.qmin, "hi": qt.qmax},
                 {"table": m.astype(np.int64), "r": r, "s": s})


def generic_lrn(n: QNode, ctx: LowerContext, xs: Sequence[relax.Expr]) -> relax.Expr:
    size, c = n.attrs["size"], ctx.qg.tensors[n.output].shape[1]
    sq = ctx.emit(R.astype(xs[0], "int32"))
    sq = ctx.emit(R.multiply(sq, sq))
    sq = ctx.emit(R.nn.pad(sq, [0, 0, 0, 0, 0, 0, (size - 1) // 2, size // 2]))
    total = None
    for i in range(size):
        part = ctx.emit(R.strided_slice(sq, [3], [i], [i + c]))
        total = part if total is None else ctx.emit(R.add(total, part))
    idx = ctx.emit(R.right_shift(total, relax.const(np.int32(n.attrs["k"]))))
    mult = ctx.emit(R.take(ctx.qparam(n, "table", nhwc=False), idx, axis=0))
    v = ctx.emit(R.multiply(R.astype(xs[0], "int64"), mult))
    v = ctx.emit(R.add(v, ctx.qparam(n, "r")))
    return ctx.clip_cast(ctx.emit(R.right_shift(v, ctx.qparam(n, "s"))), n)


def _float_lrn(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: FloatContext
               ) -> relax.Expr:
    """x * (bias + alpha/size * S)^-beta, S the sum of x^2 over the channel window
    [ch - (size-1)//2, ch + size//2]: an average pool over channels times size."""
    a, x = n.attrs, xs[0]
    size = int(a["size"])
    nb, ch, h, w = float_relax.shape_at_batch(c, n.inputs[0])
    sq = bb.emit(relax.op.reshape(bb.emit(relax.op.multiply(x, x)), (nb, 1, ch, h * w)))
    win = bb.emit(relax.op.nn.avg_pool2d(sq, (size, 1), (1, 1),
                                         ((size - 1) // 2, 0, size // 2, 0),
                                         count_include_pad=True))
    s = bb.emit(relax.op.reshape(win, (nb, ch, h, w)))
    base = bb.emit(relax.op.add(
        bb.emit(relax.op.multiply(s, float_relax.const(float(a["alpha"]), c.dtype))),
        float_relax.const(float(a["bias"]), c.dtype)))
    den = bb.emit(relax.op.power(base, float_relax.const(-float(a["beta"]), c.dtype)))
    return bb.emit(relax.op.multiply(x, den))


def _to_onnx(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    a = n.attrs
    return [helper.make_node("LRN", list(n.inputs), [n.output], size=int(a["size"]),
                             alpha=float(a["alpha"]), beta=float(a["beta"]),
                             bias=float(a["bias"]))]


LRN = OpDef(
    name="lrn",
    onnx={"LRN": OnnxOp(_lrn, "integer sum of squares, dyadic table for the power")},
    canonicalize={"LRN": _canonical}, quantize=quantize_lrn, qop="lrn", oracle=oracle.lrn,
    lower=generic_lrn, float_relax=_float_lrn, to_onnx=_to_onnx, requantizes=True)
