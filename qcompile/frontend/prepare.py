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

import sys
from collections import Counter
from dataclasses import replace
from typing import Callable

import numpy as np

from qcompile.ir.activations import UNARY_FUNCTIONS
from qcompile.errors import UnsupportedOpError
from qcompile.env import debug
from qcompile.ir.graph import CANONICAL_OPS, Graph, Node

Rewrite = Callable[[Graph], Graph]
# A fusion rule sees (graph, producer, consumer) and returns the fused node, or None.
FuseRule = Callable[[Graph, Node, Node], "Node | None"]

_PASSTHROUGH = ("Identity", "Dropout")
_ACTIVATIONS = ("Relu", "Clip")
# Ops whose output is requantized, so a following Relu/Clip becomes their output bounds.
_ACT_PRODUCERS = ("conv", "dense", "add", "mul", "affine", "lut")


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
    return _replace_ops(graph, standalone)


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


def constants_to_affine(graph: Graph) -> Graph:
    """Add/Sub/Mul/Div with one constant -> affine; Max/Min with a scalar -> Relu-like clip."""
    def rule(g: Graph, n: Node) -> Node | None:
        if n.op not in ("Add", "Sub", "Mul", "Div", "Max", "Min") or "c" not in n.params:
            return None
        rank = len(g.shapes[n.output])
        c = n.params["c"].astype(np.float64)
        if c.ndim > rank or len(g.shapes[n.inputs[0]]) != rank:
            raise _refuse(n, f"broadcasts a constant of shape {c.shape} to rank {rank}")
        c = c.reshape((1,) * (rank - c.ndim) + c.shape)
        if n.op in ("Max", "Min"):
            if c.size != 1:
                raise _refuse(n, "takes the max/min with a non-scalar constant")
            v = float(c.reshape(()))
            lohi = {"min": v} if n.op == "Max" else {"max": v}
            return n.with_(op="Clip", attrs=lohi, params={})
        one, zero = np.ones_like(c), np.zeros_like(c)
        const_first = n.attrs.get("const_at", 1) == 0
        if n.op == "Div" and const_first:
            raise _refuse(n, "divides a constant by an activation; only division by a "
                             "constant is supported")
        with np.errstate(divide="ignore"):
            scale, shift = {
                "Add": (one, c), "Mul": (c, zero), "Div": (1.0 / c, zero),
                "Sub": (-one, c) if const_first else (one, -c)}[n.op]
        if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
            raise _refuse(n, "has a constant that makes the result infinite (division by 0)")
        scale, shift = _minimal(scale), _minimal(shift)
        if scale.shape[0] != 1 or shift.shape[0] != 1:
            raise _refuse(n, "has a constant that varies along the batch axis (0)")
        return n.with_(op="affine", attrs={"act": None},
                       params={"scale": scale.astype(np.float32),
                               "shift": shift.astype(np.float32)})
    return _replace_ops(graph, rule)


def _minimal(a: np.ndarray) -> np.ndarray:
    """``a`` with every axis along which it is constant reduced to size 1."""
    for ax in range(a.ndim):
        if a.shape[ax] > 1 and np.all(a == a.take([0], axis=ax)):
            a = a.take([0], axis=ax)
    return a


def fold_affine(graph: Graph) -> Graph:
    """affine(affine(x)) -> one affine; a per-channel affine right after a conv/dense
    without activation -> folded into its weights and bias."""
    def rule(g: Graph, prod: Node, n: Node) -> Node | None:
        if n.op != "affine" or n.attrs["act"] is not None:
            return None
        a, b = (n.params[k].astype(np.float64) for k in ("scale", "shift"))
        if prod.op == "affine" and prod.attrs["act"] is None:
            a0, b0 = (prod.params[k].astype(np.float64) for k in ("scale", "shift"))
            return prod.with_(params={"scale": _minimal(a0 * a).astype(np.float32),
                                      "shift": _minimal(b0 * a + b).astype(np.float32)})
        if prod.op not in ("conv", "dense") or prod.attrs["act"] is not None:
            return None
        out_shape = g.shapes[prod.output]
        ca, cb = _channel_vector(a, out_shape), _channel_vector(b, out_shape)
        if ca is None or cb is None:
            return None
        w = prod.params["w"].astype(np.float64)
        w = w * ca.astype(np.float64).reshape((-1,) + (1,) * (w.ndim - 1))
        bias = prod.params["b"].astype(np.float64) * ca + cb
        return prod.with_(params={"w": w.astype(np.float32), "b": bias.astype(np.float32)})
    return _fuse(graph, rule)


def unary_to_lut(graph: Graph) -> Graph:
    """Sigmoid, HardSwish, Tanh, PRelu ... -> lut (a table built at quantization)."""
    def rule(g: Graph, n: Node) -> Node | None:
        if n.op not in UNARY_FUNCTIONS and n.op != "PRelu":
            return None
        params = {}
        if n.op == "PRelu":
            slope = n.params["slope"].astype(np.float32)
            c = _channel_vector(slope, g.shapes[n.output])
            if c is None:
                raise _refuse(n, f"has a slope of shape {slope.shape} that is not one value "
                                 "per channel")
            params = {"slope": c}
        return n.with_(op="lut", attrs={"fn": n.op, "fn_attrs": dict(n.attrs), "times_x": False,
                                        "act": None}, params=params)
    return _replace_ops(graph, rule)


def fuse_times_x(graph: Graph) -> Graph:
    """Mul(x, f(x)) with f a table -> one table of x * f(x): SiLU = x * Sigmoid(x) and
    HardSwish = x * HardSigmoid(x) cost one lookup instead of a lookup and a multiply."""
    uses = Counter(t for n in graph.nodes for t in n.inputs)
    by_out = {n.output: n for n in graph.nodes}
    drop: set[str] = set()
    nodes = []
    for n in graph.nodes:
        f = None
        if n.op == "Mul" and len(n.inputs) == 2 and "c" not in n.params:
            for i in (0, 1):
                cand = by_out.get(n.inputs[i])
                if (cand is not None and cand.op == "lut" and not cand.attrs["times_x"]
                        and cand.inputs[0] == n.inputs[1 - i] and uses[cand.output] == 1
                        and cand.output != graph.output and "slope" not in cand.params):
                    f = cand
                    break
        if f is None:
            nodes.append(n)
            continue
        drop.add(f.output)
        nodes.append(f.with_(name=n.name, output=n.output,
                             attrs={**f.attrs, "times_x": True}))
    return graph.with_nodes([n for n in nodes if n.output not in drop])


def elementwise_to_canonical(graph: Graph) -> Graph:
    """Add/Sub/Sum of activations -> add with signs; Mul of two activations -> mul."""
    def rule(g: Graph, n: Node) -> Node | None:
        if n.op not in ("Add", "Sub", "Sum", "Mul", "Div", "Max", "Min"):
            return None
        ranks = {len(g.shapes[t]) for t in n.inputs}
        if n.op in ("Div", "Max", "Min"):
            raise _refuse(n, f"of two activations is not supported ({n.op} needs a "
                             "constant operand)")
        if len(ranks) != 1:
            raise _refuse(n, f"broadcasts inputs of ranks {sorted(ranks)}; only equal ranks")
        if len(n.inputs) == 1:  # Sum of one tensor
            return n.with_(op="add", attrs={"signs": (1,), "act": None})
        if n.op == "Mul":
            return n.with_(op="mul", attrs={"act": None})
        signs = (1, -1) if n.op == "Sub" else (1,) * len(n.inputs)
        return n.with_(op="add", attrs={"signs": signs, "act": None})
    return _replace_ops(graph, rule)


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
    return _replace_ops(graph, standalone)


def pools_to_canonical(graph: Graph) -> Graph:
    """MaxPool -> maxpool, AveragePool -> avgpool, GlobalAveragePool -> gap."""
    def rule(g: Graph, n: Node) -> Node | None:
        if n.op == "GlobalAveragePool":
            return n.with_(op="gap", attrs={"mean": True, "keepdims": True})
        if n.op in ("ReduceMean", "ReduceSum"):
            return n.with_(op="gap", attrs={"mean": n.op == "ReduceMean",
                                            "keepdims": n.attrs["keepdims"]})
        if n.op == "ReduceMax":
            if not n.attrs["keepdims"]:
                raise _refuse(n, "with keepdims=0 is not supported")
            h, w = g.shapes[n.inputs[0]][2:]
            return n.with_(op="maxpool", attrs={"kernel": (h, w), "strides": (1, 1),
                                                "pads": (0, 0, 0, 0), "dilations": (1, 1)})
        if n.op not in ("MaxPool", "AveragePool"):
            return None
        attrs = {"kernel": n.attrs["kernel_shape"], "strides": n.attrs["strides"],
                 "pads": n.attrs["pads"]}
        if n.op == "MaxPool":
            return n.with_(op="maxpool", attrs=attrs | {"dilations": n.attrs["dilations"]})
        return n.with_(op="avgpool",
                       attrs=attrs | {"count_include_pad": bool(n.attrs["count_include_pad"])})
    return _replace_ops(graph, rule)


def _check_batch_axis(g: Graph, n: Node) -> None:
    """The batch axis is symbolic in the compiled module: data movement must keep it."""
    a = n.attrs
    rank = len(g.shapes[n.inputs[0]]) if n.inputs else 0
    moved = {
        "Transpose": lambda: tuple(a["perm"])[:1] != (0,),
        "Slice": lambda: (a["begin"][0], a["end"][0], a["step"][0]) != (0, g.shapes[n.inputs[0]][0], 1),
        "Gather": lambda: 0 in a["axes"],
        "Pad": lambda: bool(a["pads"][0] or a["pads"][rank]),
        "Concat": lambda: a["axis"] in (0, -rank),
        "Reshape": lambda: g.shapes[n.output][:1] != g.shapes[n.inputs[0]][:1],
        "Flatten": lambda: a.get("axis", 1) == 0 or g.shapes[n.output][:1] != g.shapes[n.inputs[0]][:1],
    }.get(n.op)
    if moved is not None and moved():
        raise _refuse(n, "moves data along the batch axis (0); only the other axes may be "
                         "reshaped, transposed, sliced, padded, gathered or concatenated")


def shape_ops_to_canonical(graph: Graph) -> Graph:
    """Flatten/Concat -> non-negative axis; Reshape -> its static output shape."""
    def rule(g: Graph, n: Node) -> Node | None:
        _check_batch_axis(g, n)
        if n.op == "Flatten":
            axis = _axis(n, n.attrs.get("axis", 1), len(g.shapes[n.inputs[0]]), allow_rank=True)
            return n.with_(op="flatten", attrs={"axis": axis})
        if n.op == "Reshape":
            return n.with_(op="reshape", attrs={"shape": tuple(g.shapes[n.output])})
        if n.op == "Concat":
            axis = _axis(n, n.attrs["axis"], len(g.shapes[n.output]))
            return n.with_(op="concat", attrs={"axis": axis})
        if n.op == "Transpose":
            return n.with_(op="transpose", attrs={"perm": tuple(n.attrs["perm"])})
        if n.op == "Slice":
            return n.with_(op="slice", attrs=dict(n.attrs))
        if n.op == "Gather":
            return n.with_(op="gather")
        if n.op == "LRN":
            return n.with_(op="lrn")
        if n.op == "Pad":
            return _pad_rule(g, n)
        return None
    return _replace_ops(graph, rule)


def _pad_rule(g: Graph, n: Node) -> Node:
    """Constant Pad -> pad; reflect/edge -> a gather of computed indices per padded axis."""
    pads, rank = n.attrs["pads"], len(g.shapes[n.inputs[0]])
    if n.attrs["mode"] == "constant":
        return n.with_(op="pad", attrs={"pads": tuple(pads), "value": n.attrs["value"]})
    shape = g.shapes[n.inputs[0]]
    idx = {}
    for ax in range(rank):
        before, after = pads[ax], pads[rank + ax]
        if not before and not after:
            continue
        size = shape[ax]
        i = np.arange(-before, size + after)
        if n.attrs["mode"] == "edge":
            i = np.clip(i, 0, size - 1)
        else:
            if before >= size or after >= size:
                raise _refuse(n, f"reflects {max(before, after)} values on an axis of {size}")
            i = np.abs(i)
            i = np.where(i >= size, 2 * (size - 1) - i, i)
        idx[f"idx{ax}"] = i.astype(np.int64)
    return n.with_(op="gather", attrs={"axes": tuple(int(k[3:]) for k in idx)}, params=idx)


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
    fold_pad,
    fold_batchnorm,
    dense_to_canonical,
    constants_to_affine,
    fold_affine,
    unary_to_lut,
    fuse_times_x,
    elementwise_to_canonical,
    fuse_activation,
    pools_to_canonical,
    channel_shuffle,
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
    dump = debug()
    for rewrite in REWRITES:
        graph = rewrite(graph)
        if dump:
            _debug_dump(graph, rewrite.__name__)
    for n in graph.nodes:
        if n.op not in CANONICAL_OPS:  # an imported op no rewrite claimed: a bug, say so
            raise _refuse(n, "has no canonical form (internal: no rewrite handled it)")
    graph.validate()
    return graph
