"""Rewrite an imported graph of ONNX ops into the canonical op set (``qcompile.ops.OPS``).

``prepare`` runs the small named rewrites in ``REWRITES`` top to bottom; each takes
a ``Graph`` and returns a new one (nothing is mutated).  The rewrites that produce one op
live with it (``OpDef.rewrites`` and ``OpDef.canonicalize``); those that fuse several
ops live here, and ``ORDER`` interleaves the two.  A rewrite that finds an
ONNX op it cannot express raises ``UnsupportedOpError`` naming the node.  Set
``QCOMPILE_DEBUG=1`` to print the node list after every rewrite.

Canonical attribute conventions (each op's module in ``qcompile.ops`` has its own):
  * ``pads`` are (top, left, bottom, right); ``strides``/``dilations``/``kernel`` (h, w).
  * ``act`` is None or a (lo, hi) float pair; Relu is (0.0, inf), a missing Clip
    bound is -inf / inf.
  * ``flatten``/``concat``/``softmax`` carry a non-negative ``axis``; ``reshape``
    carries the fully static output ``shape``.
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import replace
from typing import Callable

import numpy as np

from qcompile.env import debug
from qcompile.ir.graph import Graph, Node
from qcompile.ops import CANONICAL_OPS, NODE_RULES, REWRITES as OP_REWRITES
from qcompile.ops.rewriting import channel_vector, minimal, refuse, replace_ops

Rewrite = Callable[[Graph], Graph]
# A fusion rule sees (graph, producer, consumer) and returns the fused node, or None.
FuseRule = Callable[[Graph, Node, Node], "Node | None"]

_ACTIVATIONS = ("Relu", "Clip")
# Ops whose output is requantized, so a following Relu/Clip becomes their output bounds.
_ACT_PRODUCERS = ("conv", "dense", "add", "mul", "affine", "lut")


# --------------------------------------------------------------------------- helpers

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


def _bounds(node: Node) -> tuple[float, float]:
    if node.op == "Relu":
        return 0.0, float("inf")
    return float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))


# --------------------------------------------------------------------------- rewrites

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

    def standalone(g: Graph, n: Node) -> Node | None:
        # A BN after a concat or an add (DenseNet, pre-activation nets) is a per-channel
        # affine of its own.
        if n.op != "BatchNormalization":
            return None
        p = {k: v.astype(np.float64) for k, v in n.params.items()}
        scale = p["scale"] / np.sqrt(p["var"] + n.attrs["epsilon"])
        shift = p["bias"] - p["mean"] * scale
        rank = len(g.shapes[n.output])
        shape = (1, -1) + (1,) * (rank - 2)
        return n.with_(op="affine", attrs={"act": None},
                       params={"scale": scale.reshape(shape).astype(np.float32),
                               "shift": shift.reshape(shape).astype(np.float32)})
    return replace_ops(graph, standalone)


def fold_affine(graph: Graph) -> Graph:
    """affine(affine(x)) -> one affine; a per-channel affine right after a conv/dense
    without activation -> folded into its weights and bias."""
    def rule(g: Graph, prod: Node, n: Node) -> Node | None:
        if n.op != "affine" or n.attrs["act"] is not None:
            return None
        a, b = (n.params[k].astype(np.float64) for k in ("scale", "shift"))
        if prod.op == "affine" and prod.attrs["act"] is None:
            a0, b0 = (prod.params[k].astype(np.float64) for k in ("scale", "shift"))
            return prod.with_(params={"scale": minimal(a0 * a).astype(np.float32),
                                      "shift": minimal(b0 * a + b).astype(np.float32)})
        if prod.op not in ("conv", "dense") or prod.attrs["act"] is not None:
            return None
        out_shape = g.shapes[prod.output]
        ca, cb = channel_vector(a, out_shape), channel_vector(b, out_shape)
        if ca is None or cb is None:
            return None
        w = prod.params["w"].astype(np.float64)
        w = w * ca.astype(np.float64).reshape((-1,) + (1,) * (w.ndim - 1))
        bias = prod.params["b"].astype(np.float64) * ca + cb
        return prod.with_(params={"w": w.astype(np.float32), "b": bias.astype(np.float32)})
    return _fuse(graph, rule)


def fuse_activation(graph: Graph) -> Graph:
    """Relu/Clip right after conv/dense/add -> its ``act``; others -> standalone clip."""
    def rule(g: Graph, prod: Node, n: Node) -> Node | None:
        if n.op not in _ACTIVATIONS or prod.op not in _ACT_PRODUCERS:
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
    return replace_ops(graph, standalone)


def fold_pad(graph: Graph) -> Graph:
    """A zero constant Pad of H and W right before a conv (or a count_include_pad average
    pool) -> the window's own padding: zero is the quantized zero, so nothing changes."""
    def rule(g: Graph, pad: Node, n: Node) -> Node | None:
        if pad.op != "Pad" or pad.attrs["mode"] != "constant" or pad.attrs["value"] != 0.0:
            return None
        p = pad.attrs["pads"]
        if len(p) != 8 or any(p[i] for i in (0, 1, 4, 5)):
            return None
        extra = (p[2], p[3], p[6], p[7])
        if n.op == "conv" or (n.op == "AveragePool" and n.attrs["count_include_pad"]):
            pads = tuple(a + b for a, b in zip(n.attrs["pads"], extra))
            return n.with_(inputs=pad.inputs, attrs={**n.attrs, "pads": pads})
        return None
    return _fuse(graph, rule)


def channel_shuffle(graph: Graph) -> Graph:
    """Reshape -> Transpose -> Reshape that only permutes channels (ShuffleNet) -> one
    gather along axis 1, found by running the three ops on an index array."""
    uses = Counter(t for n in graph.nodes for t in n.inputs)
    by_out = {n.output: n for n in graph.nodes}
    drop: set[str] = set()
    out = []
    for n in graph.nodes:
        t = by_out.get(n.inputs[0]) if n.op == "Reshape" and n.inputs else None
        r = by_out.get(t.inputs[0]) if t is not None and t.op == "Transpose" else None
        shape_in = graph.shapes[r.inputs[0]] if r is not None and r.op == "Reshape" else None
        if shape_in is None or len(shape_in) != 4 or graph.shapes[n.output] != shape_in \
                or uses[r.output] != 1 or uses[t.output] != 1 or graph.output in (r.output, t.output):
            out.append(n)
            continue
        one = (1,) + tuple(shape_in[1:])
        ix = np.arange(int(np.prod(one))).reshape(one)
        mid = ix.reshape((1,) + tuple(graph.shapes[r.output][1:]))
        res = mid.transpose(t.attrs["perm"]).reshape(one)
        perm = res[0, :, 0, 0] // (one[2] * one[3])
        if t.attrs["perm"][0] != 0 or not np.array_equal(res, ix[:, perm]):
            out.append(n)
            continue
        drop |= {r.output, t.output}
        out.append(n.with_(op="Gather", inputs=r.inputs, attrs={"axes": (1,)},
                           params={"idx1": perm.astype(np.int64)}))
    return graph.with_nodes([n for n in out if n.output not in drop])


def prune_shapes(graph: Graph) -> Graph:
    """Keep shapes only for tensors that still exist (fusions removed some)."""
    live = {graph.input, *(n.output for n in graph.nodes)}
    return replace(graph, shapes={t: s for t, s in graph.shapes.items() if t in live})


def shape_ops_to_canonical(graph: Graph) -> Graph:
    """The order-free pass: every node whose imported op has a node rule in the registry
    (``OpDef.canonicalize``: Flatten, Reshape, Concat, Transpose, Slice, Gather, LRN,
    Pad ...) becomes canonical; each data-movement rule first checks that the batch axis
    stays where it is."""
    def rule(g: Graph, n: Node) -> Node | None:
        to_canonical = NODE_RULES.get(n.op)
        return to_canonical(g, n) if to_canonical is not None else None
    return replace_ops(graph, rule)


_OWN: tuple[Rewrite, ...] = (fold_pad, fold_batchnorm, fold_affine, fuse_activation,
                             channel_shuffle, shape_ops_to_canonical, prune_shapes)
# The rewrites in the order they run: the cross-op fusions above and each op's own
# rewrites from the registry (``OpDef.rewrites``), by name.  The order matters: fold_pad
# needs conv canonical but AveragePool not yet, fuse_activation needs every producer of
# an ``act`` canonical, channel_shuffle must see the Reshape/Transpose it folds ...
ORDER: tuple[str, ...] = (
    "drop_identity",             # Identity, Dropout, Cast (qcompile.ops.elided)
    "conv_to_canonical",         # conv
    "fold_pad",
    "fold_batchnorm",
    "dense_to_canonical",        # dense
    "constants_to_affine",       # affine (Max/Min with a scalar -> Clip)
    "fold_affine",
    "unary_to_lut",              # lut
    "fuse_times_x",              # lut: Mul(x, f(x)) -> one table
    "elementwise_to_canonical",  # add, mul
    "fuse_activation",
    "pools_to_canonical",        # maxpool, avgpool, gap
    "channel_shuffle",
    "shape_ops_to_canonical",    # every op's node rules (NODE_RULES)
    "softmax_to_canonical",      # softmax
    "prune_shapes",
)
_BY_NAME: dict[str, Rewrite] = {**{f.__name__: f for f in _OWN}, **OP_REWRITES}
assert sorted(ORDER) == sorted(_BY_NAME), "place every rewrite in ORDER exactly once"
REWRITES: tuple[Rewrite, ...] = tuple(_BY_NAME[name] for name in ORDER)


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
    dump = debug()
    for rewrite in REWRITES:
        graph = rewrite(graph)
        if dump:
            _debug_dump(graph, rewrite.__name__)
    for n in graph.nodes:
        if n.op not in CANONICAL_OPS:  # an imported op no rewrite claimed: a bug, say so
            raise refuse(n, "has no canonical form (internal: no rewrite handled it)")
    graph.validate()
    return graph
