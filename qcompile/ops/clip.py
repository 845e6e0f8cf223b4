"""clip: a standalone Relu/Clip that could not be fused (attrs lo, hi).

A Relu or Clip right after a conv/dense/add/mul/affine/lut becomes that op's ``act``
(``frontend.prepare.fuse_activation``, a cross-op fusion); what is left becomes ``clip``
there too.  The integer clip keeps its input's type and scale.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto
from tvm import relax

from qcompile.ir.graph import Graph
from qcompile.ir.node import Node
from qcompile.ir.qgraph import QNode
from qcompile.ops import exporting, float_relax
from qcompile.ops.arith import elementwise
from qcompile.ops.base import OnnxOp, OpDef
from qcompile.ops.contexts import FloatContext, ImportContext, LowerContext, QuantContext
from qcompile.ops.importing import unary
from qcompile.ops.lowering import R
from qcompile.ops.quantizing import act_bounds
from qcompile.verify import oracle


def _clip(ctx: ImportContext) -> Node:
    # opset >= 11 passes bounds as optional inputs; older opsets as attributes.
    lo = float(ctx.attrs.get("min", -np.inf))
    hi = float(ctx.attrs.get("max", np.inf))
    if ctx.has(1):
        lo = float(ctx.const(1, "min").reshape(()))
    if ctx.has(2):
        hi = float(ctx.const(2, "max").reshape(()))
    return ctx.node((ctx.act(0),), {"min": lo, "max": hi})


def quantize_clip(q: QuantContext, n: Node) -> QNode:
    x = q.t[n.inputs[0]]
    lo, hi = act_bounds((n.attrs["lo"], n.attrs["hi"]), x.qtype, float(x.scale))
    q.add_tensor(n.output, x.qtype, x.scale)
    return QNode("clip", n.name, n.inputs, n.output, {"lo": lo, "hi": hi})


def generic_clip(n: QNode, ctx: LowerContext, xs: Sequence[relax.Expr]) -> relax.Expr:
    return ctx.emit(R.clip(xs[0], int(n.attrs["lo"]), int(n.attrs["hi"])))


def _float_clip(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: FloatContext
                ) -> relax.Expr:
    return float_relax.act(bb, xs[0], (n.attrs["lo"], n.attrs["hi"]), c.dtype)


def _to_onnx(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    return exporting.act_nodes(n, n.inputs[0], (n.attrs["lo"], n.attrs["hi"]), inits)


CLIP = OpDef(
    name="clip",
    onnx={"Relu": OnnxOp(unary, "fused as output bounds, else an integer clip"),
          "Clip": OnnxOp(_clip, "same as Relu"),
          "Max": OnnxOp(elementwise, "with a scalar constant: clip"),
          "Min": OnnxOp(elementwise, "with a scalar constant: clip")},
    quantize=quantize_clip, qop="clip", oracle=oracle.clip, lower=generic_clip,
    float_relax=_float_clip, to_onnx=_to_onnx, passthrough=True)
