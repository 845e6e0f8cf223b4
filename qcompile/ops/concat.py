"""concat: attrs axis.  Each input is requantized to the output's scale unless it
already has it (``identity``)."""
from __future__ import annotations

import math
from typing import Sequence

import onnx
from onnx import TensorProto, helper
from tvm import relax

from qcompile.ir.graph import Graph
from qcompile.ir.node import Node
from qcompile.ir.qgraph import QNode, QType
from qcompile.ops.base import OnnxOp, OpDef
from qcompile.ops.contexts import FloatContext, ImportContext, LowerContext, QuantContext
from qcompile.ops.lowering import R
from qcompile.ops.quantizing import dyadic
from qcompile.ops.rewriting import axis, keep_batch
from qcompile.verify import oracle


def _concat(ctx: ImportContext) -> Node:
    return ctx.node(tuple(ctx.act(i) for i in range(len(ctx.onode.input))), ctx.attrs)


def _canonical(g: Graph, n: Node) -> Node:
    keep_batch(n, n.attrs["axis"] in (0, -len(g.shapes[n.inputs[0]])))
    return n.with_(op="concat", attrs={"axis": axis(n, n.attrs["axis"], len(g.shapes[n.output]))})


def quantize_concat(q: QuantContext, n: Node) -> QNode:
    ins = [q.t[i] for i in n.inputs]
    qt = QType(q.out_bits(n.output), any(i.qtype.signed for i in ins))
    sy = q.calibrated(n.output, qt)
    params, identity = {}, []
    for k, x in enumerate(ins):
        same = x.qtype == qt and math.isclose(float(x.scale), sy, rel_tol=0, abs_tol=0)
        identity.append(same)
        if not same:
            m, r, s = dyadic(float(x.scale) / sy)
            params.update({f"m{k}": m, f"r{k}": r, f"s{k}": s})
    q.add_tensor(n.output, qt, sy)
    return QNode("concat", n.name, n.inputs, n.output,
                 {"axis": int(n.attrs["axis"]), "identity": tuple(identity),
                  "lo": qt.qmin, "hi": qt.qmax}, params)


def generic_concat(n: QNode, ctx: LowerContext, xs: Sequence[relax.Expr]) -> relax.Expr:
    parts = [x if n.attrs["identity"][k] else ctx.requant(x, n, str(k)) for k, x in enumerate(xs)]
    rank = len(ctx.qg.tensors[n.output].shape)
    ax = {1: 3, 2: 1, 3: 2}[n.attrs["axis"]] if rank == 4 and n.attrs["axis"] else n.attrs["axis"]
    return ctx.emit(R.concat(parts, axis=ax))


def _float_concat(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: FloatContext
                  ) -> relax.Expr:
    return bb.emit(relax.op.concat(xs, axis=int(n.attrs["axis"])))


def _to_onnx(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    return [helper.make_node("Concat", list(n.inputs), [n.output], axis=n.attrs["axis"])]


CONCAT = OpDef(
    name="concat",
    onnx={"Concat": OnnxOp(_concat, "dyadic requant per input, concat")},
    canonicalize={"Concat": _canonical}, quantize=quantize_concat, qop="concat",
    oracle=oracle.concat, lower=generic_concat, float_relax=_float_concat, to_onnx=_to_onnx,
    requantizes=True)
