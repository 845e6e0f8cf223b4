"""softmax: attrs axis; only allowed as the graph's last node.

It never enters the integer core: ``quantize_graph`` records its axis on the QGraph and
the exit step applies it in float after dequantize; the float module and the ONNX export
output logits, which is what their consumers (the loss, onnxruntime statistics) want.
"""
from __future__ import annotations

from qcompile.ir.graph import Graph
from qcompile.ir.node import Node
from qcompile.ops.base import OnnxOp, OpDef
from qcompile.ops.importing import unary
from qcompile.ops.rewriting import axis, refuse, replace_ops


def softmax_to_canonical(graph: Graph) -> Graph:
    """Softmax -> softmax(axis), allowed only as the node that writes the graph output."""
    def rule(g: Graph, n: Node) -> Node | None:
        if n.op != "Softmax":
            return None
        if n is not g.nodes[-1] or n.output != g.output:
            raise refuse(n, "is only supported as the last node of the graph")
        return n.with_(op="softmax", attrs={"axis": axis(n, n.attrs.get("axis", -1),
                                                         len(g.shapes[n.output]))})
    return replace_ops(graph, rule)


_FLOAT_EXIT = "runs in float after dequantize (QGraph.softmax_axis), outside the integer core"

SOFTMAX = OpDef(
    name="softmax",
    onnx={"Softmax": OnnxOp(unary, "last node only, in float after dequantize")},
    rewrites=(softmax_to_canonical,),
    absent={"quantize": "quantize_graph records its axis on the QGraph instead: it "
                        + _FLOAT_EXIT,
            "qop": _FLOAT_EXIT, "oracle": "oracle.dequantize_output applies it: " + _FLOAT_EXIT,
            "lower": "lower.emit's dequantize function applies it: " + _FLOAT_EXIT,
            "float_relax": "dropped: the loss takes logits (log_softmax inside the loss)",
            "to_onnx": "dropped: canonical_onnx outputs logits"})
