"""The ONNX ops that import but become no canonical op: they are removed.

Identity, inference-mode Dropout and a Cast to float32 (and a Reduce* with
noop_with_empty_axes and no axes) import as ``Identity``; ``drop_identity``, the first
rewrite of ``prepare``, rewires their readers.
"""
from __future__ import annotations

from dataclasses import replace

import onnx

from qcompile.ir.graph import Graph
from qcompile.ir.node import Node
from qcompile.ops.base import OnnxOp
from qcompile.ops.contexts import ImportContext
from qcompile.ops.importing import unary

_PASSTHROUGH = ("Identity", "Dropout")


def _dropout(ctx: ImportContext) -> Node:
    if ctx.has(2) and (not ctx.is_const(2) or bool(ctx.consts[ctx.onode.input[2]])):
        ctx.unsupported("training_mode", "export the model in inference mode")
    return ctx.node((ctx.act(0),), {})


def _cast(ctx: ImportContext) -> Node:
    if int(ctx.attrs.get("to", 0)) != onnx.TensorProto.FLOAT:
        ctx.unsupported(f"a cast to {onnx.TensorProto.DataType.Name(ctx.attrs.get('to', 0))}",
                        "only casts to float32 inside the network are supported")
    return ctx.node((ctx.act(0),), {}).with_(op="Identity")


def _rename(node: Node, old: str, new: str) -> Node:
    if old not in node.inputs and node.output != old:
        return node
    return node.with_(inputs=tuple(new if t == old else t for t in node.inputs),
                      output=new if node.output == old else node.output)


def drop_identity(graph: Graph) -> Graph:
    """Remove Identity and (inference-mode) Dropout, rewiring their readers."""
    while (node := next((n for n in graph.nodes if n.op in _PASSTHROUGH), None)) is not None:
        rest = [n for n in graph.nodes if n is not node]
        src, dst = node.inputs[0], node.output
        if dst != graph.output:
            graph = graph.with_nodes([_rename(n, dst, src) for n in rest])
        elif src == graph.input:
            graph = replace(graph, nodes=tuple(rest), output=src)  # the model is x -> x
        else:
            # Keep the graph output's name: src's producer now writes it, src's readers follow.
            graph = graph.with_nodes([_rename(n, src, dst) for n in rest])
    return graph


ONNX: dict[str, OnnxOp] = {
    "Identity": OnnxOp(unary, "removed"),
    "Dropout": OnnxOp(_dropout, "removed (inference mode)"),
    "Cast": OnnxOp(_cast, "to float32 only: removed"),
}
REWRITES = (drop_identity,)
