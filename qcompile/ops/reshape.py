"""flatten and reshape: a new shape over the same values (the batch axis stays).

=========  ==================================================================
flatten    attrs axis
reshape    attrs shape (fully resolved, no -1 / 0)
=========  ==================================================================

ONNX Squeeze and Unsqueeze import as a Reshape to their inferred output shape.
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
from qcompile.ops.importing import unary
from qcompile.ops.lowering import NCHW_TO_NHWC, NHWC_TO_NCHW, R
from qcompile.ops.quantizing import quantize_passthrough
from qcompile.ops.rewriting import axis, keep_batch
from qcompile.verify import oracle


def _to_shape(ctx: ImportContext) -> Node:
    """Squeeze/Unsqueeze/Reshape: a reshape to the statically inferred output shape."""
    if ctx.op == "Reshape" and not ctx.is_const(1):
        ctx.unsupported(f"non-constant shape input {ctx.onode.input[1]!r}",
                        "the target shape must be an initializer or foldable to one")
    node = ctx.node((ctx.act(0),), {"shape": tuple(ctx.shapes[ctx.onode.output[0]])})
    return node.with_(op="Reshape")


def _flatten_canonical(g: Graph, n: Node) -> Node:
    keep_batch(n, n.attrs.get("axis", 1) == 0
               or g.shapes[n.output][:1] != g.shapes[n.inputs[0]][:1])
    ax = axis(n, n.attrs.get("axis", 1), len(g.shapes[n.inputs[0]]), allow_rank=True)
    return n.with_(op="flatten", attrs={"axis": ax})


def _reshape_canonical(g: Graph, n: Node) -> Node:
    keep_batch(n, g.shapes[n.output][:1] != g.shapes[n.inputs[0]][:1])
    return n.with_(op="reshape", attrs={"shape": tuple(g.shapes[n.output])})


def generic_reshape(n: QNode, ctx: LowerContext, xs: Sequence[relax.Expr]) -> relax.Expr:
    x = xs[0]
    batch = x.ty.shape[0]
    if len(x.ty.shape) == 4:  # back to NCHW so the element order is ONNX's
        x = ctx.permute(x, NHWC_TO_NCHW)
    out = list(n.attrs["shape"][1:])
    y = ctx.emit(R.reshape(x, [batch] + out))
    return ctx.permute(y, NCHW_TO_NHWC) if len(out) == 3 else y


def _float_reshape(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: FloatContext
                   ) -> relax.Expr:
    # Shapes were inferred at batch 1; dim 0 is the batch (as in the integer lowering).
    return bb.emit(relax.op.reshape(xs[0], float_relax.shape_at_batch(c, n.output)))


def _onnx_flatten(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    return [helper.make_node("Flatten", list(n.inputs), [n.output], axis=n.attrs["axis"])]


def _onnx_reshape(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    shape = exporting.init(inits, f"{n.name}::shape", [-1, *n.attrs["shape"][1:]],
                           np.int64)  # the batch stays free
    return [helper.make_node("Reshape", [n.inputs[0], shape], [n.output])]


FLATTEN = OpDef(
    name="flatten",
    onnx={"Flatten": OnnxOp(unary, "reshape")},
    canonicalize={"Flatten": _flatten_canonical}, quantize=quantize_passthrough, qop="flatten",
    oracle=oracle.reshape, lower=generic_reshape, float_relax=_float_reshape,
    to_onnx=_onnx_flatten, passthrough=True)

RESHAPE = OpDef(
    name="reshape",
    onnx={"Reshape": OnnxOp(_to_shape, "reshape (the batch axis must stay)"),
          "Squeeze": OnnxOp(_to_shape, "reshape"), "Unsqueeze": OnnxOp(_to_shape, "reshape")},
    canonicalize={"Reshape": _reshape_canonical}, quantize=quantize_passthrough,
    qop="reshape", oracle=oracle.reshape, lower=generic_reshape, float_relax=_float_reshape,
    to_onnx=_onnx_reshape, passthrough=True)
