"""The canonical ops, each defined once: ``OPS`` maps every canonical op to its ``OpDef``.

One module per op (or tight family) holds all of an op's parts: its ONNX handlers and
their docs/ops.md lines, the prepare rewrites that produce it, its quantizer, the NumPy
oracle it points to (``verify.oracle``, kept apart so that its independence stays
provable), its generic integer lowering, its float Relax builder and its ONNX export.
The stages read the registry and the tables derived from it here: the importer
(``frontend.onnx_ops``/``onnx_import``), ``frontend.prepare``, ``quant.quantize``,
``lower.emit``, ``mixed.float_model`` and ``frontend.onnx_export``.

Adding an op: docs/adding-an-op.md.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from qcompile.ops import (arith, clip, concat, elided, gather, layers, lrn, lut, pad, pool,
                          reshape, slices, softmax, transpose)
from qcompile.ops.base import (FloatBuilder, Lowering, NodeRule, OnnxOp, OpDef, Oracle, Quantize,
                               Rewrite, ToOnnx, problems)

__all__ = ["OPS", "OpDef", "OnnxOp", "ONNX_OPS", "SUPPORTED_OPS", "LOWERED_AS", "ops_table",
           "CANONICAL_OPS", "QOPS", "REWRITES", "NODE_RULES", "QUANTIZERS", "ORACLES",
           "LOWERINGS", "FLOAT_BUILDERS", "TO_ONNX", "REQUANTIZING_OPS", "PASSTHROUGH",
           "check"]


def _registry(*defs: OpDef) -> Mapping[str, OpDef]:
    return MappingProxyType({d.name: d for d in defs})


# One line per op module: the registration.
OPS: Mapping[str, OpDef] = _registry(
    layers.CONV, layers.DENSE,
    arith.ADD, arith.MUL, arith.AFFINE,
    lut.LUT,
    clip.CLIP,
    pool.MAXPOOL, pool.AVGPOOL, pool.GAP,
    lrn.LRN,
    pad.PAD,
    transpose.TRANSPOSE,
    slices.SLICE,
    gather.GATHER,
    reshape.FLATTEN, reshape.RESHAPE,
    concat.CONCAT,
    softmax.SOFTMAX,
)

# --- what the importer reads ------------------------------------------------------------
# Every ONNX op type qcompile imports, and how: the canonical ops' and the elided ones.
ONNX_OPS: Mapping[str, OnnxOp] = MappingProxyType(
    {**{t: o for d in OPS.values() for t, o in d.onnx.items()}, **elided.ONNX})
SUPPORTED_OPS: frozenset[str] = frozenset(ONNX_OPS)
# What each supported op becomes inside the integer core (docs/ops.md's table).
LOWERED_AS: Mapping[str, str] = MappingProxyType({t: o.doc for t, o in ONNX_OPS.items()})


def ops_table() -> str:
    """The supported-ops table in Markdown, one row per ONNX op."""
    rows = ["| ONNX op | inside the integer core |", "| --- | --- |"]
    rows += [f"| `{op}` | {LOWERED_AS[op]} |" for op in sorted(SUPPORTED_OPS)]
    return "\n".join(rows) + "\n"


# --- what prepare reads -----------------------------------------------------------------
CANONICAL_OPS: frozenset[str] = frozenset(OPS)
# Whole-graph rewrites by name (prepare.ORDER places them); a family's shared one once.
REWRITES: Mapping[str, Rewrite] = MappingProxyType(
    {f.__name__: f for f in (*elided.REWRITES, *(f for d in OPS.values() for f in d.rewrites))})
# Imported op type -> its node rule in prepare's order-free pass.
NODE_RULES: Mapping[str, NodeRule] = MappingProxyType(
    {t: r for d in OPS.values() for t, r in d.canonicalize.items()})

# --- what quantize, the oracle, lower, the float module and the export read -------------
QUANTIZERS: Mapping[str, Quantize] = MappingProxyType(
    {k: d.quantize for k, d in OPS.items() if d.quantize is not None})
QOPS: frozenset[str] = frozenset(d.qop for d in OPS.values() if d.qop is not None)
ORACLES: Mapping[str, Oracle] = MappingProxyType(
    {d.qop: d.oracle for d in OPS.values() if d.qop is not None and d.oracle is not None})
LOWERINGS: Mapping[str, Lowering] = MappingProxyType(
    {d.qop: d.lower for d in OPS.values() if d.qop is not None and d.lower is not None})
FLOAT_BUILDERS: Mapping[str, FloatBuilder] = MappingProxyType(
    {k: d.float_relax for k, d in OPS.items() if d.float_relax is not None})
TO_ONNX: Mapping[str, ToOnnx] = MappingProxyType(
    {k: d.to_onnx for k, d in OPS.items() if d.to_onnx is not None})
# Ops that write a new scale: calibration measures their outputs.
REQUANTIZING_OPS: frozenset[str] = frozenset(k for k, d in OPS.items() if d.requantizes)
# Ops whose output keeps the input's integer type and scale (ir.graph.PASSTHROUGH_OPS).
PASSTHROUGH: frozenset[str] = frozenset(k for k, d in OPS.items() if d.passthrough)


def check(ops: Mapping[str, OpDef] = OPS) -> list[str]:
    """Gaps in the registry, one line each (tests/ops/test_opdefs.py keeps it empty)."""
    return problems(ops, elided.ONNX)
