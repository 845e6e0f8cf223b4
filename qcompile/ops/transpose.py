"""transpose: attrs perm.  Data movement: the integer type and scale pass through."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper
from tvm import relax

from qcompile.ir.graph import Graph
from qcompile.ir.node import Node
from qcompile.ir.qgraph import QNode
from qcompile.ops.base import OnnxOp, OpDef
from qcompile.ops.contexts import FloatContext, ImportContext, LowerContext
from qcompile.ops.importing import shape_of
from qcompile.ops.lowering import compose, stored_order
from qcompile.ops.quantizing import quantize_passthrough
from qcompile.ops.rewriting import keep_batch
from qcompile.verify import oracle


def _transpose(ctx: ImportContext) -> Node:
    rank = len(shape_of(ctx, 0))
    perm = tuple(int(p) for p in ctx.attrs.get("perm", tuple(range(rank))[::-1]))
    return ctx.node((ctx.act(0),), {"perm": perm})


def _canonical(g: Graph, n: Node) -> Node:
    keep_batch(n, tuple(n.attrs["perm"])[:1] != (0,))
    return n.with_(op="transpose", attrs={"perm": tuple(n.attrs["perm"])})


def generic_transpose(n: QNode, ctx: LowerContext, xs: Sequence[relax.Expr]) -> relax.Expr:
    perm = tuple(n.attrs["perm"])
    order = stored_order(len(perm))
    inverse = tuple(int(i) for i in np.argsort(order))
    return ctx.permute(xs[0], compose(compose(inverse, perm), order))


def _float_transpose(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: FloatContext
                     ) -> relax.Expr:
    return bb.emit(relax.op.permute_dims(xs[0], [int(p) for p in n.attrs["perm"]]))


def _to_onnx(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    return [helper.make_node("Transpose", list(n.inputs), [n.output],
                             perm=[int(p) for p in n.attrs["perm"]])]


TRANSPOSE = OpDef(
    name="transpose",
    onnx={"Transpose": OnnxOp(_transpose, "integer permute (folds into neighbouring layout "
                                          "changes)")},
    canonicalize={"Transpose": _canonical}, quantize=quantize_passthrough, qop="transpose",
    oracle=oracle.transpose, lower=generic_transpose, float_relax=_float_transpose,
    to_onnx=_to_onnx, passthrough=True)
