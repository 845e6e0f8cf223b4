"""``OpDef``: everything one canonical op needs, in one record.

Each canonical op (``conv``, ``lrn``, ``softmax`` ...) has one ``OpDef``, built in its
own module under ``qcompile/ops`` next to the functions it names; ``qcompile.ops.OPS`` is
the registry the stages read.  A part that does not apply to an op is ``None`` with the
reason in ``absent`` (softmax runs in float after dequantize, so it has no quantizer,
no integer op, no oracle and no integer lowering); ``problems`` reports a part that is
neither given nor explained.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
from tvm import relax

from qcompile.ir.graph import Graph
from qcompile.ir.node import Node
from qcompile.ir.qgraph import QNode
from qcompile.ops.contexts import FloatContext, ImportContext, LowerContext, QuantContext

# ONNX node (through the importer's context) -> the imported node(s), still carrying an
# ONNX-like op type that a rewrite turns canonical.
Handler = Callable[[ImportContext], "Node | list[Node]"]
# A whole-graph rewrite of ``frontend.prepare`` (pure: returns a new graph).
Rewrite = Callable[[Graph], Graph]
# One imported node -> its canonical node (None: not this rule's node).
NodeRule = Callable[[Graph, Node], "Node | None"]
# A canonical node -> its integer node, through the quantizer's graph walk.
Quantize = Callable[[QuantContext, Node], QNode]
# The NumPy oracle of one integer op: (node, *inputs) -> output (``verify.oracle``).
Oracle = Callable[..., np.ndarray]
# TVM's generic legalization of one integer op, in NHWC (``lower.emit``).
Lowering = Callable[[QNode, LowerContext, Sequence[relax.Expr]], relax.Expr]
# The float op as Relax ops with registered gradients (``mixed.float_model``).
FloatBuilder = Callable[[relax.BlockBuilder, Node, list[relax.Expr], FloatContext], relax.Expr]
# The canonical node as ONNX nodes (``frontend.onnx_export``); initializers go to the list.
ToOnnx = Callable[[Graph, Node, list[onnx.TensorProto]], list[onnx.NodeProto]]


@dataclass(frozen=True)
class OnnxOp:
    """How one ONNX op type is imported, and the line docs/ops.md shows for it."""

    handler: Handler
    doc: str                    # what it becomes inside the integer core
    multi_output: bool = False  # may its outputs past the first be read (Split)?


@dataclass(frozen=True, kw_only=True)
class OpDef:
    """One canonical op: its import, its canonicalisation, and what every later stage
    does with it.  ``qop`` is the integer op ``quantize`` produces (``ir.qgraph``);
    ``oracle`` and ``lower`` are that op's NumPy semantics and generic lowering."""

    name: str
    onnx: Mapping[str, OnnxOp] = field(default_factory=dict)
    # Whole-graph rewrites that produce this op; ``prepare.ORDER`` places each by name,
    # since their order against the cross-op fusions matters.  An op's family may share one.
    rewrites: tuple[Rewrite, ...] = ()
    # Imported op type -> node rule, run in prepare's order-free pass (shape_ops_to_canonical)
    canonicalize: Mapping[str, NodeRule] = field(default_factory=dict)
    quantize: Quantize | None = None
    qop: str | None = None
    oracle: Oracle | None = None
    lower: Lowering | None = None
    float_relax: FloatBuilder | None = None
    to_onnx: ToOnnx | None = None
    requantizes: bool = False   # writes a new scale: calibration measures its output
    passthrough: bool = False   # keeps its input's integer type and scale (ir.PASSTHROUGH_OPS)
    absent: Mapping[str, str] = field(default_factory=dict)  # part -> why it does not apply


# The parts every op gives, or explains in ``absent``.
PARTS = ("onnx", "quantize", "qop", "oracle", "lower", "float_relax", "to_onnx")


def problems(ops: Mapping[str, OpDef], extra_onnx: Mapping[str, OnnxOp] | None = None
             ) -> list[str]:
    """One line per gap in a registry: a part neither given nor explained, an ONNX op
    without a handler or doc line, an ONNX op or integer op claimed twice."""
    out, extra_onnx = [], extra_onnx or {}
    seen_onnx: dict[str, str] = {t: "(elided)" for t in extra_onnx}
    seen_qop: dict[str, str] = {}
    for key, d in ops.items():
        if d.name != key:
            out.append(f"{key}: registered under another name than its own ({d.name})")
        for part in PARTS:
            have, why = bool(getattr(d, part)), d.absent.get(part, "").strip()
            if have and why:
                out.append(f"{key}: {part} is given and also declared absent")
            elif not have and not why:
                out.append(f"{key}: no {part} (give it, or say why in absent)")
        out += [f"{key}: absent names an unknown part {p!r}" for p in d.absent if p not in PARTS]
        for t in d.onnx:
            if t in seen_onnx:
                out.append(f"{key}: ONNX op {t} is already imported by {seen_onnx[t]}")
            seen_onnx[t] = key
        if d.qop is not None:
            if d.qop in seen_qop:
                out.append(f"{key}: integer op {d.qop} is already produced by {seen_qop[d.qop]}")
            seen_qop[d.qop] = key
    for t, o in {**{t: o for d in ops.values() for t, o in d.onnx.items()}, **extra_onnx}.items():
        if not callable(o.handler):
            out.append(f"ONNX op {t}: no handler")
        if not o.doc.strip():
            out.append(f"ONNX op {t}: no doc line (docs/ops.md)")
    return out
