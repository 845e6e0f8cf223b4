"""gather: attrs axes; params idx<axis> (int64): y = x.take(idx, axis) per axis in turn.

What it serves: nearest Resize/Upsample (indices computed at import), reflect/edge Pad
(``qcompile.ops.pad``) and channel shuffles (``prepare.channel_shuffle``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper
from tvm import relax

from qcompile.ir.graph import Graph
from qcompile.ir.node import Node
from qcompile.ir.qgraph import QNode
from qcompile.ops import exporting, float_relax
from qcompile.ops.base import OnnxOp, OpDef
from qcompile.ops.contexts import FloatContext, ImportContext, LowerContext
from qcompile.ops.importing import shape_of
from qcompile.ops.lowering import R, stored_axis
from qcompile.ops.quantizing import quantize_passthrough
from qcompile.ops.rewriting import keep_batch
from qcompile.verify import oracle


def _nearest_index(out_size: int, in_size: int, scale: float, ctm: str, mode: str) -> np.ndarray:
    """ONNX Resize's input index for every output index of one axis, nearest mode."""
    o = np.arange(out_size, dtype=np.float64)
    if ctm == "half_pixel":
        x = (o + 0.5) / scale - 0.5
    elif ctm == "pytorch_half_pixel":
        x = (o + 0.5) / scale - 0.5 if out_size > 1 else np.zeros_like(o)
    elif ctm == "align_corners":
        x = o * (in_size - 1) / (out_size - 1) if out_size > 1 else np.zeros_like(o)
    elif ctm == "asymmetric":
        x = o / scale
    elif ctm == "tf_half_pixel_for_nn":
        x = (o + 0.5) / scale
    else:
        raise ValueError(ctm)
    if mode == "round_prefer_floor":
        i = np.where(x - np.floor(x) == 0.5, np.floor(x), np.round(x))
    elif mode == "round_prefer_ceil":
        i = np.where(x - np.floor(x) == 0.5, np.ceil(x), np.round(x))
    elif mode == "floor":
        i = np.floor(x)
    elif mode == "ceil":
        i = np.ceil(x)
    else:
        raise ValueError(mode)
    return np.clip(i, 0, in_size - 1).astype(np.int64)


def _resize(ctx: ImportContext) -> Node:
    """Nearest Resize/Upsample -> a gather per resized axis, indices computed here."""
    mode = ctx.attrs.get("mode", "nearest")
    if mode != "nearest":
        ctx.unsupported(f"mode={mode}", "only nearest Resize is integer-only here; "
                        "re-export with mode='nearest'")
    in_shape, out_shape = shape_of(ctx, 0), ctx.shapes[ctx.onode.output[0]]
    ctm = ctx.attrs.get("coordinate_transformation_mode", "half_pixel")
    nmode = ctx.attrs.get("nearest_mode", "round_prefer_floor")
    if ctx.op == "Upsample":
        ctm, nmode = "asymmetric", "floor"
    if ctm == "tf_crop_and_resize":
        ctx.unsupported("coordinate_transformation_mode=tf_crop_and_resize", "not supported")
    scales: tuple[float, ...] = ()
    scale_input = 2 if ctx.op == "Resize" else 1
    if ctx.has(scale_input) and ctx.is_const(scale_input):
        scales = tuple(float(v) for v in ctx.const(scale_input, "scales").reshape(-1))
    if len(scales) != len(in_shape):
        scales = tuple(o / i for o, i in zip(out_shape, in_shape))
    idx = {}
    for a, (i_size, o_size) in enumerate(zip(in_shape, out_shape)):
        if i_size == o_size and scales[a] == 1.0:
            continue
        if a < 2 and len(in_shape) == 4:
            ctx.unsupported(f"resizing axis {a}", "only H and W may be resized")
        try:
            idx[a] = _nearest_index(o_size, i_size, scales[a], ctm, nmode)
        except ValueError as err:
            ctx.unsupported(f"mode {err}", "unknown Resize mode")
    return Node(op="Gather", name=ctx.name, inputs=(ctx.act(0),), output=ctx.onode.output[0],
                attrs={"axes": tuple(sorted(idx))},
                params={f"idx{a}": v for a, v in idx.items()})


def _canonical(g: Graph, n: Node) -> Node:
    keep_batch(n, 0 in n.attrs["axes"])
    return n.with_(op="gather")


def generic_gather(n: QNode, ctx: LowerContext, xs: Sequence[relax.Expr]) -> relax.Expr:
    x = xs[0]
    rank = len(ctx.qg.tensors[n.output].shape)
    for axis in n.attrs["axes"]:
        idx = relax.const(n.params[f"idx{axis}"].astype(np.int32))
        x = ctx.emit(R.take(x, idx, axis=stored_axis(axis, rank)))
    return x


def _float_gather(bb: relax.BlockBuilder, n: Node, xs: list[relax.Expr], c: FloatContext
                  ) -> relax.Expr:
    y = xs[0]
    for ax in n.attrs["axes"]:
        y = float_relax.take(bb, y, n.params[f"idx{ax}"], int(ax))
    return y


def _to_onnx(g: Graph, n: Node, inits: list[TensorProto]) -> list[onnx.NodeProto]:
    nodes, x, axes = [], n.inputs[0], list(n.attrs["axes"])
    for i, ax in enumerate(axes):
        idx = exporting.init(inits, f"{n.name}::idx{ax}", n.params[f"idx{ax}"], np.int64)
        y = n.output if i == len(axes) - 1 else f"{n.name}::g{i}"
        nodes.append(helper.make_node("Gather", [x, idx], [y], axis=int(ax)))
        x = y
    return nodes or [helper.make_node("Identity", list(n.inputs), [n.output])]


GATHER = OpDef(
    name="gather",
    onnx={"Resize": OnnxOp(_resize, "nearest: a gather of precomputed indices"),
          "Upsample": OnnxOp(_resize, "as Resize")},
    canonicalize={"Gather": _canonical}, quantize=quantize_passthrough, qop="gather",
    oracle=oracle.gather, lower=generic_gather, float_relax=_float_gather, to_onnx=_to_onnx,
    passthrough=True)
