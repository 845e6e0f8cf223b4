"""The one in-memory graph every stage passes along.

A ``Graph`` is a single-input, single-output DAG of ``Node``s (``node.py``: the record
the quantized graph's ``QNode`` shares) in topological order.  The importer produces it
with ONNX-like ops; ``prepare`` rewrites it into the canonical op set, whose float
semantics are what calibration measures and what quantization approximates.

The canonical op set is the op registry, ``qcompile.ops.OPS`` (a stage above this one):
one module per op there documents the op's ``attrs`` and ``params`` and holds every
stage's code for it.  The conventions they share: ``pads`` are (top, left, bottom,
right), ``act`` is None or a (lo, hi) float pair fused into the op's output, and axis 0
is the batch, which no op moves.

Tensor names are the ONNX tensor names.  When a rewrite fuses nodes, the fused
node keeps the name of the *last* fused tensor (e.g. Conv+BN+Relu writes the Relu
output), so calibration can read every tensor straight from onnxruntime.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from qcompile.ir.node import Node, frozen_mapping

# The layers: what carries weights, gets a bit width, and costs MACs.
LAYER_OPS: frozenset[str] = frozenset({"conv", "dense"})
# Ops whose output keeps the input's integer type and scale: a tensor's precision is
# decided where it is requantized and flows through these unchanged (``OpDef.passthrough``
# says the same per op; tests/ops/test_opdefs.py keeps the two equal).
PASSTHROUGH_OPS: frozenset[str] = frozenset(
    {"maxpool", "clip", "flatten", "reshape", "pad", "transpose", "slice", "gather"})


@dataclass(frozen=True)
class Graph:
    """A single-input, single-output DAG in topological order."""

    input: str
    input_shape: tuple[int, ...]
    output: str
    nodes: tuple[Node, ...]
    shapes: Mapping[str, tuple[int, ...]]
    source: str = ""  # file name or model name, for messages and reports

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "shapes", frozen_mapping(self.shapes))

    def producer(self, tensor: str) -> Node | None:
        """The node that writes ``tensor`` (None for the graph input)."""
        for n in self.nodes:
            if n.output == tensor:
                return n
        return None

    def source_of(self, tensor: str) -> str:
        """The requantized tensor behind ``tensor``, traced back through PASSTHROUGH_OPS:
        the one quantized tensor (one width, one scale) a layer reading it really reads."""
        node = self.producer(tensor)
        while node is not None and node.op in PASSTHROUGH_OPS:
            tensor = node.inputs[0]
            node = self.producer(tensor)
        return tensor

    def consumers(self, tensor: str) -> list[Node]:
        """Nodes that read ``tensor``, in graph order."""
        return [n for n in self.nodes if tensor in n.inputs]

    def with_nodes(self, nodes: list[Node] | tuple[Node, ...]) -> "Graph":
        """A copy with a new node list (shapes are kept)."""
        return replace(self, nodes=tuple(nodes))

    def validate(self) -> None:
        """Check topological order and that every input is defined."""
        defined = {self.input}
        for n in self.nodes:
            missing = [t for t in n.inputs if t not in defined]
            if missing:
                raise ValueError(f"node {n.name!r} reads undefined tensor(s) {missing}")
            defined.add(n.output)
        if self.output not in defined:
            raise ValueError(f"graph output {self.output!r} is never produced")


def layer_nodes(graph: Graph) -> list[Node]:
    """The quantizable layers: conv and dense nodes, in graph order."""
    return [n for n in graph.nodes if n.op in LAYER_OPS]
