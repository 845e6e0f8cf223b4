"""Rewrite an imported graph of ONNX ops into the canonical op set of ``graph.py``.

``prepare`` runs the small named rewrites in ``REWRITES`` top to bottom; each takes
a ``Graph`` and returns a new one (nothing is mutated).  A rewrite that finds an
ONNX op it cannot express raises ``UnsupportedOpError`` naming the node.  Set
``QCOMPILE_DEBUG=1`` to print the node list after every rewrite.

Canonical attribute conventions (see ``graph.py``):
  * ``pads`` are (top, left, bottom, right); ``strides``/``dilations``/``kernel`` (h, w).
  * ``act`` is None or a (lo, hi) float pair; Relu is (0.0, inf), a missing Clip
    bound is -inf / inf.
  * ``flatten``/``concat``/``softmax`` carry a non-negative ``axis``; ``reshape``
    carries the fully static output ``shape``.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from dataclasses import replace
from typing import Callable

import numpy as np

from .errors import UnsupportedOpError
from .graph import CANONICAL_OPS, Graph, Node

Rewrite = Callable[[Graph], Graph]
# A fusion rule sees (graph, producer, consumer) and returns the fused node, or None.
FuseRule = Callable[[Graph, Node, Node], "Node | None"]

_PASSTHROUGH = ("Identity", "Dropout")
_ACTIVATIONS = ("Relu", "Clip")


# --------------------------------------------------------------------------- helpers

def _refuse(node: Node, why: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"node {node.name!r} (op {node.op}) {why}; "
                              "change the model or file an issue")


def _replace_ops(graph: Graph, rule: Callable[[Graph, Node], Node | None]) -> Graph:
    """Replace every node for which ``rule`` returns a node; keep the others."""
    return graph.with_nodes([rule(graph, n) or n for n in graph.nodes])


def _fuse(graph: Graph, rule: FuseRule) -> Graph:
    """Fuse (producer, consumer) pairs where the producer's output has no other reader.

    The consumer reads the producer through ``inputs[0]``.  The fused node takes the
    consumer's slot (its inputs are all defined earlier) and keeps the consumer's
    output tensor name, so downstream readers need no rewiring.
    """
    uses = Counter(t for n in graph.nodes for t in n.inputs)
    uses[graph.output] += 1  # the graph output is a reader too
    nodes: list[Node | None] = list(graph.nodes)
    where = {n.output: i for i, n in enumerate(graph.nodes)}
    for i, node in enumerate(graph.nodes):
        j = where.get(node.inputs[0]) if node.inputs else None
        if j is None or nodes[j] is None or uses[node.inputs[0]] != 1:
            continue
        fused = rule(graph, nodes[j], node)
        if fused is not None:
            nodes[j], nodes[i] = None, fused.with_(output=node.output)
    return graph.with_nodes([n for n in nodes if n is not None])


def _rename(node: Node, old: str, new: str) -> Node:
    if old not in node.inputs and node.output != old:
        return node
    return node.with_(inputs=tuple(new if t == old else t for t in node.inputs),
                      output=new if node.output == old else node.output)


def _axis(node: Node, axis: int, rank: int, *, allow_rank: bool = False) -> int:
    """``axis`` made non-negative; Flatten also accepts ``axis == rank``."""
    if not -rank <= axis < rank + int(allow_rank):
        raise _refuse(node, f"has axis {axis} out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _channel_vector(c: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray | None:
    """``c`` as one value per channel (axis 1) of ``out_shape``, or None if it is not."""
    try:
        if np.broadcast_shapes(c.shape, out_shape) != tuple(out_shape):
            return None
    except ValueError:
        return None
    per_channel = np.moveaxis(np.broadcast_to(c, out_shape), 1, 0).reshape(out_shape[1], -1)
    if not np.all(per_channel == per_channel[:, :1]):
        return None
    return per_channel[:, 0].astype(np.float32)


def _bounds(node: Node) -> tuple[float, float]:
    if node.op == "Relu":
        return 0.0, float("inf")
    return float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))


# --------------------------------------------------------------------------- rewrites

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


def conv_to_canonical(graph: Graph) -> Graph:
    """Conv -> conv with explicit geometry, a zero bias when absent and no activation."""
    def rule(g: Graph, n: Node) -> Node | None:
        if n.op != "Conv":
            return None
        w = n.params["w"]
        b = n.params.get("b", np.zeros(w.shape[0], np.float32))
        attrs = {"strides": n.attrs["strides"], "pads": n.attrs["pads"],
                 "dilations": n.attrs["dilations"], "group": n.attrs["group"], "act": None}
        return n.with_(op="conv", attrs=attrs, params={"w": w, "b": b})
    return _replace_ops(graph, rule)


def fold_batchnorm(graph: Graph) -> Graph:
    """Fold BatchNormalization into the conv before it: w*s, (b - mean)*s + beta."""
    def rule(g: Graph, conv: Node, bn: Node) -> Node | None:
        if bn.op != "BatchNormalization" or conv.op != "conv":
            return None
        # float64 keeps the fold from adding error beyond the final float32 rounding.
        p = {k: v.astype(np.float64) for k, v in bn.params.items()}
        s = p["scale"] / np.sqrt(p["var"] + bn.attrs["epsilon"])
        w = conv.params["w"].astype(np.float64) * s[:, None, None, None]
        b = (conv.params["b"].astype(np.float64) - p["mean"]) * s + p["bias"]
        return conv.with_(params={"w": w.astype(np.float32), "b": b.astype(np.float32)})
    graph = _fuse(graph, rule)
    for n in graph.nodes:
        if n.op == "BatchNormalization":
            raise _refuse(n, "cannot be folded: it must directly follow a Conv whose output "
                             "has no other reader")
    return graph


def dense_to_canonical(graph: Graph) -> Graph:
    """Gemm (alpha/beta folded, transB either way) and MatMul -> dense with w (N, K)."""
    def rule(g: Graph, n: Node) -> Node | None:
        if n.op not in ("Gemm", "MatMul"):
            return None
        if len(g.shapes[n.inputs[0]]) != 2:
            raise _refuse(n, f"needs a 2-D input, got shape {g.shapes[n.inputs[0]]}")
        w = n.params["w"]
        if n.op == "MatMul" or not n.attrs["transB"]:
            w = np.ascontiguousarray(w.T)  # ONNX stores (K, N); dense wants (N, K)
        if n.attrs.get("alpha", 1.0) != 1.0:  # one correctly rounded float32 product
            w = w * np.float32(n.attrs["alpha"])
        b = np.zeros(w.shape[0], np.float32)
        if "b" in n.params:
            c = _channel_vector(n.params["b"] * np.float32(n.attrs["beta"]), g.shapes[n.output])
            if c is None:
                raise _refuse(n, "has a bias C that is not one value per output column")
            b = c
        return n.with_(op="dense", attrs={"act": None}, params={"w": w, "b": b})
    return _replace_ops(graph, rule)


def fold_bias_add(graph: Graph) -> Graph:
    """Add of a per-channel constant right after conv/dense -> added to its bias."""
    def rule(g: Graph, prod: Node, add: Node) -> Node | None:
        if add.op != "Add" or "c" not in add.params or prod.op not in ("conv", "dense"):
            return None
        if prod.attrs["act"] is not None:  # the bias sits before the activation
            return None
        c = _channel_vector(add.params["c"], g.shapes[prod.output])
        if c is None:
            return None
        return prod.with_(params={**prod.params, "b": (prod.params["b"] + c).astype(np.float32)})
    graph = _fuse(graph, rule)
    for n in graph.nodes:
        if n.op == "Add" and "c" in n.params:
            raise _refuse(n, "adds a constant that cannot be folded: only a per-channel "
                             "constant directly after Conv/Gemm/MatMul is supported")
    return graph


def add_to_canonical(graph: Graph) -> Graph:
    """Add of two same-shape activations -> add (broadcasting is not supported)."""
    def rule(g: Graph, n: Node) -> Node | None:
        if n.op != "Add":
            return None
        a, b = (g.shapes[t] for t in n.inputs)
        if a != b:
            raise _refuse(n, f"broadcasts shapes {a} and {b}; only same-shape Add is supported")
        return n.with_(op="add", attrs={"act": None})
    return _replace_ops(graph, rule)


def fuse_activation(graph: Graph) -> Graph:
    """Relu/Clip right after conv/dense/add -> its ``act``; others -> standalone clip."""
    def rule(g: Graph, prod: Node, n: Node) -> Node | None:
        if n.op not in _ACTIVATIONS or prod.op not in ("conv", "dense", "add"):
            return None
        lo, hi = _bounds(n)
        if prod.attrs["act"] is not None:  # clip(clip(x)) is one clip on the intersection
            lo, hi = max(lo, prod.attrs["act"][0]), min(hi, prod.attrs["act"][1])
            if lo > hi:
                return None
        return prod.with_(attrs={**prod.attrs, "act": (lo, hi)})
    graph = _fuse(graph, rule)

    def standalone(g: Graph, n: Node) -> Node | None:
        if n.op not in _ACTIVATIONS:
            return None
        lo, hi = _bounds(n)
        return n.with_(op="clip", attrs={"lo": lo, "hi": hi}, params={})
    return _replace_ops(graph, standalone)


def pools_to_canonical(graph: Graph) -> Graph:
    """MaxPool -> maxpool, AveragePool -> avgpool, GlobalAveragePool -> gap."""
    def rule(g: Graph, n: Node) -> Node | None:
        if n.op == "GlobalAveragePool":
            return n.with_(op="gap", attrs={})
        if n.op not in ("MaxPool", "AveragePool"):
            return None
        attrs = {"kernel": n.attrs["kernel_shape"], "strides": n.attrs["strides"],
                 "pads": n.attrs["pads"]}
        if n.op == "MaxPool":
            return n.with_(op="maxpool", attrs=attrs | {"dilations": n.attrs["dilations"]})
        return n.with_(op="avgpool",
                       attrs=attrs | {"count_include_pad": bool(n.attrs["count_include_pad"])})
    return _replace_ops(graph, rule)


def shape_ops_to_canonical(graph: Graph) -> Graph:
    """Flatten/Concat -> non-negative axis; Reshape -> its static output shape."""
    def rule(g: Graph, n: Node) -> Node | None:
        if n.op == "Flatten":
            axis = _axis(n, n.attrs.get("axis", 1), len(g.shapes[n.inputs[0]]), allow_rank=True)
            return n.with_(op="flatten", attrs={"axis": axis})
        if n.op == "Reshape":
            return n.with_(op="reshape", attrs={"shape": tuple(g.shapes[n.output])})
        if n.op == "Concat":
            axis = _axis(n, n.attrs["axis"], len(g.shapes[n.output]))
            return n.with_(op="concat", attrs={"axis": axis})
        return None
    return _replace_ops(graph, rule)


def softmax_to_canonical(graph: Graph) -> Graph:
    """Softmax -> softmax(axis), allowed only as the node that writes the graph output."""
    def rule(g: Graph, n: Node) -> Node | None:
        if n.op != "Softmax":
            return None
        if n is not g.nodes[-1] or n.output != g.output:
            raise _refuse(n, "is only supported as the last node of the graph")
        axis = _axis(n, n.attrs.get("axis", -1), len(g.shapes[n.output]))
        return n.with_(op="softmax", attrs={"axis": axis})
    return _replace_ops(graph, rule)


def prune_shapes(graph: Graph) -> Graph:
    """Keep shapes only for tensors that still exist (fusions removed some)."""
    live = {graph.input, *(n.output for n in graph.nodes)}
    return replace(graph, shapes={t: s for t, s in graph.shapes.items() if t in live})


REWRITES: tuple[Rewrite, ...] = (
    drop_identity,
    conv_to_canonical,
    fold_batchnorm,
    dense_to_canonical,
    fold_bias_add,
    add_to_canonical,
    fuse_activation,
    pools_to_canonical,
    shape_ops_to_canonical,
    softmax_to_canonical,
    prune_shapes,
)


# --------------------------------------------------------------------------- pipeline

def _debug_dump(graph: Graph, after: str) -> None:
    print(f"# qcompile prepare: after {after} ({len(graph.nodes)} nodes)", file=sys.stderr)
    for n in graph.nodes:
        attrs = ", ".join(f"{k}={v}" for k, v in n.attrs.items())
        params = ", ".join(f"{k}{tuple(v.shape)}" for k, v in n.params.items())
        print(f"  {n.output} = {n.op}({', '.join(n.inputs)}) [{attrs}] {{{params}}}  # {n.name}",
              file=sys.stderr)


def prepare(graph: Graph) -> Graph:
    """Rewrite an imported graph into canonical ops (see ``graph.py``); pure.

    Raises ``UnsupportedOpError`` naming the node when something cannot be expressed.
    """
    debug = os.environ.get("QCOMPILE_DEBUG", "") not in ("", "0")
    for rewrite in REWRITES:
        graph = rewrite(graph)
        if debug:
            _debug_dump(graph, rewrite.__name__)
    for n in graph.nodes:
        if n.op not in CANONICAL_OPS:  # an imported op no rewrite claimed: a bug, say so
            raise _refuse(n, "has no canonical form (internal: no rewrite handled it)")
    graph.validate()
    return graph
