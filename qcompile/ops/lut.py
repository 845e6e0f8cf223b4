"""lut: any unary function of one tensor, as a table over its 2^bits values.

=========  ==================================================================
lut        attrs fn (an ONNX op in activations.ACTIVATIONS, or PRelu), fn_attrs,
           times_x (y = x * f(x): SiLU, HardSwish patterns), act; params slope (PRelu)
=========  ==================================================================

The functions themselves are ``qcompile.ops.activations``; PRelu (one slope per
channel, so one table row per channel) is the one handled here.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper
from tvm import relax

from qcompile.ir.graph import Graph
from qcompile.ir.node import Node
from qcompile.ir.qgraph import QNode, QType
from qcompile.ops import exporting, float_relax
from qcompile.ops.activations import ACTIVATIONS, TIMES_X, ClosedForm, evaluate
from qcompile.ops.base import OnnxOp, OpDef
from qcompile.ops.contexts import FloatContext, ImportContext, LowerContext, QuantContext
from qcompile.ops.importing import unary
from qcompile.ops.lowering import R, channel_offsets
from qcompile.ops.quantizing import act_bounds
from qcompile.ops.rewriting import channel_vector, refuse, replace_ops
from qcompile.verify import oracle


def _prelu(ctx: ImportContext) -> Node:
    return ctx.node((ctx.act(0),), {}, {"slope": ctx.const(1, "slope")})


# --- prepare --------------------------------------------------------------------------
def unary_to_lut(graph: Graph) -> Graph:
    """Sigmoid, HardSwish, Tanh, PRelu ... -> lut (a table built at quantization)."""
    def rule(g: Graph, n: Node) -> Node | None:
        if n.op not in ACTIVATIONS and n.op != "PRelu":
            return None
        params = {}
        if n.op == "PRelu":
            slope = n.params["slope"].astype(np.float32)
            c = channel_vector(slope, g.shapes[n.output])
            if c is None:
                raise refuse(n, f"has a slope of shape {slope.shape} that is not one value "
                                "per channel")
            params = {"slope": c}
        return n.with_(op="lut", attrs={"fn": n.op, "fn_attrs": dict(n.attrs), "times_x": False,
                                        "act": None}, params=params)
    return replace_ops(graph, rule)


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


# --- quantize -------------------------------------------------------------------------
def quantize_lut(q: QuantContext, n: Node) -> QNode:
    """Any unary function of a quantized tensor: a table over its 2^bits values."""
    x = q.t[n.inputs[0]]
    act = n.attrs.get("act")
    grid = np.arange(x.qtype.qmin, x.qtype.qmax + 1, dtype=np.float64) * float(x.scale)
    slope = n.params.get("slope")
    xs = grid[None, :] if slope is None else np.broadcast_to(grid, (len(slope), len(grid)))
    f = evaluate(n.attrs["fn"], xs, {**n.attrs["fn_attrs"], TIMES_X: n.attrs["times_x"]},
                 None if slope is None else slope.astype(np.float64)[:, None])
    if act is not None:
        f = np.clip(f, act[0], act[1])
    f = np.where(np.isnan(f), 0.0, f)
    signed = bool(np.min(f) < 0)
    qt = QType(q.out_bits(n.output), signed)
    sy = q.calibrated(n.output, qt, act[1] if act else math.inf)
    lo, hi = act_bounds(act, qt, sy)
    with np.errstate(over="ignore", invalid="ignore"):
        table = np.clip(np.floor(f / sy + 0.5), lo, hi).astype(qt.dtype)
    q.add_tensor(n.output, qt, sy)
    return QNode("lut", n.name, n.inputs, n.output,
                 {"offset": -x.qtype.qmin, "fn": n.attrs["fn"]}, {"table": table})


# --- lower (generic) ------------------------------------------------------------------
def generic_lut(n: QNode, ctx: LowerContext, xs: Sequence[relax.Expr]) -> relax.Expr:
    table = n.params["table"]
    rows, width = table.shape
    idx = ctx.emit(R.add(R.astype(xs[0], "int32"), relax.const(np.int32(n.attrs["offset"]))))
    if rows > 1:  # one table per channel (PRelu)
        rank = len(ctx.qg.tensors[n.output].shape)
        idx = ctx.emit(R.add(idx, channel_offsets(rank, rows, width)))
    flat = ctx.param(f"{n.name}.table", table.reshape(-1))
    return ctx.emit(R.take(flat, idx, axis=0))


# --- float ----------------------------------------------------------------------------
def _float_lut(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: FloatContext
               ) -> relax.Expr:
    fn, x = n.attrs["fn"], xs[0]
    form = ClosedForm(bb, c.dtype)
    if fn == "PRelu":
        rank = len(c.graph.shapes[n.inputs[0]])
        s = np.asarray(n.params["slope"]).reshape((1, -1) + (1,) * (rank - 2))
        slope = float_relax.const(s, c.dtype)
        y = form.where(form.cmp(R.greater_equal, x, 0.0), x, form.mul(x, slope))
    elif fn not in ACTIVATIONS:
        raise float_relax.unsupported(n, f"is the table function {fn}, which has no Relax "
                                         "expression in qcompile's float builder")
    else:
        relax_form = ACTIVATIONS[fn].relax
        if relax_form is None:
            raise float_relax.unsupported(n, f"is the table function {fn}, which has no "
                                             "Relax gradient")
        y = relax_form(form, x, n.attrs.get("fn_attrs", {}))
    if n.attrs.get("times_x", False):
        y = bb.emit(relax.op.multiply(x, y))
    return float_relax.act(bb, y, n.attrs["act"], c.dtype)


# --- ONNX export ----------------------------------------------------------------------
def _to_onnx(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    """The table function as the ONNX op itself (``Mul(x, f(x))`` when ``times_x``)."""
    a, x, pre = n.attrs, n.inputs[0], f"{n.name}::pre"
    times_x = bool(a.get("times_x", False))
    f_out = f"{n.name}::f" if times_x else pre
    if a["fn"] == "PRelu":  # one slope per channel: (C, 1, ...) against (N, C, ...)
        rank = len(g.shapes[x])
        slope = np.asarray(n.params["slope"], np.float32).reshape((-1,) + (1,) * (rank - 2))
        nodes = [helper.make_node("PRelu", [x, exporting.init(inits, f"{n.name}::slope", slope)],
                                  [f_out])]
    else:
        attrs: dict[str, Any] = {k: float(v) if isinstance(v, (float, np.floating)) else v
                                 for k, v in dict(a.get("fn_attrs", {})).items()}
        nodes = [helper.make_node(a["fn"], [x], [f_out], **attrs)]
    if times_x:
        nodes.append(helper.make_node("Mul", [x, f_out], [pre]))
    return [*nodes, *exporting.act_nodes(n, pre, a.get("act"), inits)]


LUT = OpDef(
    name="lut",
    onnx={"PRelu": OnnxOp(_prelu, "per-channel table lookup"),
          **{op: OnnxOp(unary, fn.doc) for op, fn in ACTIVATIONS.items()}},
    rewrites=(unary_to_lut, fuse_times_x), quantize=quantize_lut, qop="lut",
    oracle=oracle.lut, lower=generic_lut, float_relax=_float_lut, to_onnx=_to_onnx,
    requantizes=True)
