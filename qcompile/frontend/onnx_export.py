"""The canonical graph as ONNX (``Graph`` -> ``onnx.ModelProto``): what onnxruntime runs
when a stage needs the float model with its weights as inputs (GPTQ's layer inputs,
sensitivity's KL measure, equalization's statistics).  Each op's export lives with the
op (``qcompile.ops``, ``OpDef.to_onnx``).
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from qcompile.errors import UsageError
from qcompile.ir.graph import Graph, Node, layer_nodes
from qcompile.ops import OPS


def onnx_node(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    """One canonical node as ONNX nodes, through its op's export (``OpDef.to_onnx``);
    initializers it needs go to ``inits``."""
    op = OPS.get(n.op)
    if op is None or op.to_onnx is None:
        raise UsageError(f"node {n.name!r}: op {n.op!r} is not a canonical op")
    return op.to_onnx(g, n, inits)


# Opset of the export: 20 has every table function as an ONNX op (Gelu: 20, Mish: 18).
CANONICAL_OPSET = 20


def canonical_onnx(graph: Graph) -> onnx.ModelProto:
    """The canonical graph as ONNX: input, then every layer weight as a graph input.

    Outputs logits (a trailing softmax is dropped); the batch dimension is free.
    """
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    for n in graph.nodes:
        if n.op == "softmax":
            continue
        nodes += onnx_node(graph, n, inits)
    logits = graph.nodes[-1].inputs[0] if graph.nodes[-1].op == "softmax" else graph.output
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(graph.input, f32, ["N", *graph.input_shape[1:]])]
    inputs += [helper.make_tensor_value_info(f"{n.name}::w", f32, list(n.params["w"].shape))
               for n in layer_nodes(graph)]
    out = helper.make_tensor_value_info(logits, f32, None)
    g = helper.make_graph(nodes, "canonical", inputs, [out], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", CANONICAL_OPSET)],
                             ir_version=10)
