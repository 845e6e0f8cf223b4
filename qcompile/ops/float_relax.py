"""Helpers the float Relax builders share (``mixed.float_model`` builds the module).

Every op is emitted with Relax ops that have a registered gradient in TVM 0.27, since
sensitivity differentiates the loss w.r.t. every weight.
"""
from __future__ import annotations

import math

import numpy as np
from tvm import relax

from qcompile.errors import UnsupportedOpError
from qcompile.ir.node import Node
from qcompile.ops.contexts import FloatContext


def const(v: np.ndarray | float, dtype: str) -> relax.Constant:
    return relax.const(np.asarray(v, dtype=dtype), dtype)


def act(bb: relax.BlockBuilder, y: relax.Expr, act: tuple[float, float] | None,
        dtype: str) -> relax.Expr:
    # relax.clip has no registered gradient; relu / maximum / minimum do.
    if act is None:
        return y
    lo, hi = act
    if lo == 0 and math.isinf(hi):
        return bb.emit(relax.op.nn.relu(y))
    if math.isfinite(lo):
        y = bb.emit(relax.op.maximum(y, const(lo, dtype)))
    if math.isfinite(hi):
        y = bb.emit(relax.op.minimum(y, const(hi, dtype)))
    return y


def take(bb: relax.BlockBuilder, x: relax.Expr, idx: np.ndarray, axis: int) -> relax.Expr:
    # Indices are in range by construction; "clip" only avoids the "fast" mode warning.
    return bb.emit(relax.op.take(x, relax.const(np.asarray(idx, np.int64), "int64"), axis=axis,
                                 mode="clip"))


def shape_at_batch(c: FloatContext, tensor: str) -> tuple[int, ...]:
    """A tensor's shape at the module's static batch (graph shapes are at batch 1)."""
    return (c.batch, *c.graph.shapes[tensor][1:])


def unsupported(n: Node, why: str) -> UnsupportedOpError:
    """What the float builder cannot express: sensitivity has a forward-only method."""
    return UnsupportedOpError(
        f"node {n.name!r} (op {n.op}) {why}; use --sensitivity kl (forward-only) instead")
